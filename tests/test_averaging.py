import json

import pytest
import torch
from safetensors.torch import load_file

from lightning_helpers import loaders, module
from merge_callback import BayesMergeCallback
from merge_callback.engine import (EmaTrack, RoundConfig, Snapshot, build_soup, ema_family,
                                   geometric_family, pairwise_family, run_round)
from merge_callback.merge import lerp_state_dicts
from merge_callback.search import search_lambda
from merge_callback.evaluate import HeldoutEvaluator, resolve_metric
from test_lightning import assert_same_tensors, run


def test_geometric_weights_exact():
    fam = geometric_family(["a", "b", "latest"])
    assert fam.weights(0.0) == (0.0, 0.0, 1.0)
    assert fam.weights(1.0) == pytest.approx((1 / 3, 1 / 3, 1 / 3), abs=0)
    assert fam.weights(0.5) == pytest.approx((1 / 7, 2 / 7, 4 / 7), rel=1e-15)
    with pytest.raises(ValueError, match="the geometric family needs >= 3 snapshots, got 2"):
        geometric_family(["a", "latest"])


def test_combine_matches_definitions():
    g = torch.Generator().manual_seed(0)
    src = {n: {"w": torch.randn(4, 3, generator=g), "n": torch.tensor(i)}
           for i, n in enumerate(["a", "b", "latest"])}
    snaps = {n: Snapshot(sd, 0) for n, sd in src.items()}
    lat = src["latest"]

    def combine(family, t, *_):
        return build_soup(snaps, family, t)

    out = combine(pairwise_family("b", "latest", 0.5), 0.7, src, lat)
    assert torch.equal(out["w"], torch.lerp(src["b"]["w"], lat["w"], 0.7))
    assert out["n"].item() == 2
    out = combine(geometric_family(["a", "b", "latest"]), 1.0, src, lat)
    want = src["a"]["w"] * (1 / 3)
    want.add_(src["b"]["w"], alpha=1 / 3).add_(lat["w"], alpha=1 / 3)
    assert torch.equal(out["w"], want)
    assert torch.equal(combine(ema_family("a", "latest"), 1.0, src, lat)["w"], lat["w"])


def test_ema_track_is_per_step_ema():
    lin = torch.nn.Linear(3, 2)
    per_step = EmaTrack(0.9, every=1)
    every3 = EmaTrack(0.9, every=3)
    manual = None
    for step in range(1, 10):
        with torch.no_grad():
            lin.weight.add_(0.1 * step)
        per_step.update(lin, step)
        if step % 3 == 0 or step == 1:
            every3.update(lin, step)
        w = lin.weight.detach().clone()
        manual = w if manual is None else torch.lerp(manual, w, 1 - 0.9)
    assert torch.allclose(per_step.snapshot.tensors["weight"], manual, rtol=0, atol=1e-6)
    # updating every 3 steps uses decay 0.9**steps since the last update
    assert every3.snapshot.step == 9
    with pytest.raises(ValueError, match=r"EMA decay must be in \(0, 1\), got 1.0"):
        EmaTrack(1.0, every=1)


def test_pairwise_family_agrees_with_the_paper_round(tiny_neox):
    data = [{"input_ids": torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(i))}
            for i in range(2)]
    ev = HeldoutEvaluator(data, resolve_metric("loss"))
    prev = Snapshot.capture(tiny_neox, 10)
    with torch.no_grad():
        for p in tiny_neox.parameters():
            p.add_(0.05 * torch.randn_like(p))
    latest = Snapshot.capture(tiny_neox, 20)
    # the paper's round, written out: the lerp of the two state dicts loaded into a copy
    import copy

    other = copy.deepcopy(tiny_neox)

    def objective(lam):
        other.load_state_dict(lerp_state_dicts(prev.tensors, latest.tensors, lam))
        return ev(other)

    paper = search_lambda(objective, alpha=0.5, budget=6, strategy="grid")
    avg = run_round(tiny_neox, {"previous": prev, "latest": latest},
                    [pairwise_family("previous", "latest", 0.5)], ev,
                    RoundConfig(budget=6, strategy="grid"), value_previous=1.0)
    paper = type("Paper", (), {"lam": paper.lam, "value_soup": paper.value,
                               "observations": paper.observations})
    assert avg.lam == paper.lam and avg.value_soup == paper.value_soup
    assert sorted(avg.observations) == sorted(paper.observations)
    assert_same_tensors(tiny_neox.state_dict(), latest.tensors)  # restored exactly


@pytest.mark.parametrize("kwargs, match", [
    ({"history": 1}, r"history must be an integer >= 2 \(weights kept, the latest included\)"),
    ({"snapshot_every": 0}, r"snapshot_every must be a positive integer or None, got 0"),
    ({"ema_decays": [0.99, 1.0], "snapshot_every": 5},
     r"ema_decays must be distinct numbers in \(0, 1\), got \[0.99, 1.0\]"),
    ({"ema_decays": [0.9, 0.9], "snapshot_every": 5}, r"ema_decays must be distinct numbers"),
    ({"ema_decays": [0.99]}, r"ema_decays need snapshot_every"),
])
def test_new_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BayesMergeCallback(**kwargs)


AVG = dict(budget=6, history=4, snapshot_every=5, ema_decays=(0.8, 0.95))


def test_averaging_round_writes_what_it_evaluated(tmp_path):
    cb = BayesMergeCallback(heldout=loaders()[1], **AVG)
    ring_sizes = []
    orig_push = cb.schedule._push

    def spy(snap):
        orig_push(snap)
        ring_sizes.append(len(cb.schedule.ring))

    cb.schedule._push = spy
    run(tmp_path, cb)
    assert max(ring_sizes) == 4  # never more than `history` snapshots on the host
    assert len(cb.schedule.ring) == 3  # history - 1 between saves
    soups = tmp_path / "ckpt" / "soups"
    for h in cb.history:
        info = json.loads((soups / f"soup-step={h['step']}.json").read_text())
        # the budget, plus λ = 0 (the previous weights) once when their value is not known yet
        assert info["evaluations"] - info["extra_evaluations"] == 6
        assert info["extra_evaluations"] == (1 if h["step"] == 10 else 0)
        # the pairwise family pairs with the previous checkpoint save (its value is known)
        assert h["previous_step"] == (5 if h["step"] == 10 else h["step"] - 10)
        fams = {c["family"] for c in info["candidates"]}
        assert {"pairwise", "ema0.8", "ema0.95"} <= fams
        assert info["value_soup"] == min(c["value"] for c in info["candidates"])
        assert info["value_soup"] <= info["value_latest"]
        assert sum(info["weights"]) == pytest.approx(1.0)
        assert info["lambda"] == info["weights"][-1]
        m = module()
        m.load_state_dict(load_file(str(soups / f"soup-step={h['step']}.safetensors")))
        assert cb._evaluator(m) == pytest.approx(info["value_soup"], rel=1e-9)
    assert any(c["family"].startswith("geometric") for c in
               json.loads((soups / "soup-step=30.json").read_text())["candidates"])


def test_averaging_keeps_training_bitwise_unchanged(tmp_path):
    _, m1 = run(tmp_path / "a", BayesMergeCallback(heldout=loaders()[1], **AVG), dropout=0.1,
                shuffle=True)
    _, m2 = run(tmp_path / "b", dropout=0.1, shuffle=True)
    assert_same_tensors(m1.state_dict(), m2.state_dict())


def test_resume_with_snapshots_and_ema_tracks(tmp_path):
    full = BayesMergeCallback(heldout=loaders()[1], **AVG)
    run(tmp_path / "full", full, max_steps=40)
    run(tmp_path / "part", BayesMergeCallback(heldout=loaders()[1], **AVG), max_steps=20)
    resumed = BayesMergeCallback(heldout=loaders()[1], **AVG)
    ckpt = tmp_path / "part" / "ckpt" / "epoch=1-step=20.ckpt"
    stored = torch.load(ckpt, weights_only=True)[resumed._tensors_key]
    assert [s for s, _ in stored["ring"]] == [10, 15]  # snapshots older than the checkpoint
    assert sorted(stored["ema"]) == ["ema0.8", "ema0.95"]
    run(tmp_path / "part", resumed, max_steps=40, ckpt_path=str(ckpt))
    assert resumed.history == full.history
    for step in (30, 40):
        a = tmp_path / "full" / "ckpt" / "soups" / f"soup-step={step}.safetensors"
        b = tmp_path / "part" / "ckpt" / "soups" / f"soup-step={step}.safetensors"
        assert_same_tensors(load_file(str(a)), load_file(str(b)))


def test_pairwise_family_pairs_with_the_previous_save_beyond_the_ring(tmp_path):
    # 2 snapshots every 2 steps cover 4 steps, saves are 10 apart: the previous save leaves the ring
    cb = BayesMergeCallback(heldout=loaders()[1], budget=5, history=3, snapshot_every=2,
                            ema_decays=(0.9,))
    run(tmp_path, cb)
    assert [(h["previous_step"], h["step"]) for h in cb.history] == [(8, 10), (10, 20), (20, 30)]
    for h in cb.history[1:]:
        info = json.loads((tmp_path / "ckpt" / "soups" / f"soup-step={h['step']}.json").read_text())
        assert info["extra_evaluations"] == 0  # the previous save's value is known from its round
