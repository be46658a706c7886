"""averaging="auto": power-function EMA tracks, the snapshot store and the 12-evaluation round,
under a real Lightning Trainer and a real Hugging Face Trainer (tiny GPT-NeoX)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lightning_helpers import loaders, module
from merge_callback import BayesMergeCallback
from merge_callback.engine.options import AUTO
from merge_callback.posthoc import SnapshotStore, reconstruction_weights, sigma_rel_to_gamma
from test_lightning import assert_same_tensors, run

AUTO_ARGS = dict(averaging="auto", snapshot_every=2)


@pytest.mark.parametrize("kwargs, match", [
    ({"averaging": "mean"}, r"averaging must be one of 'pairwise', 'auto', got 'mean'"),
    ({"averaging": None}, r"averaging must be one of 'pairwise', 'auto', got None"),
    ({"averaging": "auto", "history": 4},
     r"averaging='auto' chooses its own averages and cannot be combined with history=4"),
    ({"averaging": "auto", "ema_decays": (0.9,), "snapshot_every": 5},
     r"averaging='auto' .* cannot be combined with ema_decays=\[0.9\]"),
    ({"averaging": "auto", "history": 3, "ema_decays": (0.9,)},
     r"cannot be combined with history=3, ema_decays=\[0.9\]"),
    ({"averaging": "auto", "snapshot_every": 0},
     r"snapshot_every must be a positive integer or None, got 0"),
])
def test_averaging_argument_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BayesMergeCallback(**kwargs)


def test_auto_defaults():
    cb = BayesMergeCallback(averaging="auto")
    assert cb.schedule.snapshot_every == 10 and not cb.pairwise_only
    assert [t.sigma_rel for t in cb.schedule.tracks] == [0.05, 0.15]
    assert AUTO.budget == 12
    assert BayesMergeCallback().schedule.averaging == "pairwise"


def _check_soups(cb, soups, steps):
    assert [h["step"] for h in cb.history] == steps
    for h in cb.history:
        info = json.loads((soups / f"soup-step={h['step']}.json").read_text())
        assert info["averaging"] == "auto"
        # 12 evaluations at most (repeated candidates are not evaluated twice), plus the
        # previous save once when its value is not known from the last round
        assert info["evaluations"] - info["extra_evaluations"] <= 12
        assert info["extra_evaluations"] == (1 if h is cb.history[0] else 0)
        assert info["value_soup"] == min(c["value"] for c in info["candidates"])
        assert info["value_soup"] <= info["value_latest"]
        assert {c["family"] for c in info["candidates"]} >= {"latest", "phema", "window",
                                                            "pairwise"}
        assert math.fsum(info["weights"]) == pytest.approx(1.0, abs=1e-12)
        assert len(info["inputs"]) == len(info["weights"])
        assert h["family"] == info["family"] and h["param"] == info["param"]
        m = module()
        m.load_state_dict(load_file(str(soups / f"soup-step={h['step']}.safetensors")))
        assert cb._evaluator(m) == pytest.approx(info["value_soup"], rel=1e-9)
    return [json.loads((soups / f"soup-step={h['step']}.json").read_text()) for h in cb.history]


def test_auto_rounds_write_what_they_evaluated(tmp_path):
    soups = tmp_path / "ckpt" / "soups"
    store = SnapshotStore(soups / ".averaging", keep=None)
    store.put(15, "raw", module().state_dict())  # another run's snapshot: a new run removes it
    cb = BayesMergeCallback(heldout=loaders()[1], **AUTO_ARGS)
    run(tmp_path, cb, max_steps=40)
    infos = _check_soups(cb, soups, [20, 30, 40])  # the first save has no previous one
    # the store: the raw weights and both tracks at every save, fp32
    assert [(e.step, e.kind) for e in store.entries()] == [
        (s, k) for s in (10, 20, 30, 40) for k in ("phema0.05", "phema0.15", "raw")]
    # between saves the host keeps the two tracks only; they were last updated at step 40
    assert cb.schedule.ring == [] and [t.step for t in cb.schedule.tracks] == [40, 40]
    # the post-hoc EMA's least-squares coefficients, as recorded, sum to 1 and are exactly the
    # reconstruction over every track snapshot up to the round's step
    for info in infos:
        rec = info.get("reconstruction")
        if rec is None:
            continue
        assert math.fsum(rec["weights"]) == pytest.approx(1.0, abs=1e-12)
        want = reconstruction_weights(
            [i["step"] for i in rec["inputs"]],
            [sigma_rel_to_gamma(float(i["name"][5:])) for i in rec["inputs"]],
            rec["sigma_rel"], info["step"])
        assert rec["weights"] == want.tolist()
    assert any("reconstruction" in info for info in infos)
    # each soup is, bitwise, the recorded weights applied to the stored snapshots (the fp32
    # accumulation of the round; the tiny model is fp32)
    entries = {(e.kind, e.step): e for e in store.entries()}
    for info in infos:
        soup = load_file(str(soups / f"soup-step={info['step']}.safetensors"))
        out = {k: torch.zeros_like(v) for k, v in soup.items() if v.is_floating_point()}
        SnapshotStore.accumulate_into_(out, [(entries[(i["name"], i["step"])], w) for i, w in
                                             zip(info["inputs"], info["weights"])], negligible=0)
        for k, v in out.items():
            assert torch.equal(v, soup[k]), k


def test_auto_keeps_training_bitwise_unchanged(tmp_path):
    _, m1 = run(tmp_path / "a", BayesMergeCallback(heldout=loaders()[1], **AUTO_ARGS),
                dropout=0.1, shuffle=True)
    _, m2 = run(tmp_path / "b", dropout=0.1, shuffle=True)
    assert_same_tensors(m1.state_dict(), m2.state_dict())


def test_auto_resume_gives_the_same_history_and_soups(tmp_path):
    full = BayesMergeCallback(heldout=loaders()[1], **AUTO_ARGS)
    run(tmp_path / "full", full, max_steps=40)
    run(tmp_path / "part", BayesMergeCallback(heldout=loaders()[1], **AUTO_ARGS), max_steps=20)
    resumed = BayesMergeCallback(heldout=loaders()[1], **AUTO_ARGS)
    ckpt = tmp_path / "part" / "ckpt" / "epoch=1-step=20.ckpt"
    stored = torch.load(ckpt, weights_only=True)[resumed._tensors_key]
    assert {k: v["step"] for k, v in stored["ema"].items()} == {"phema0.05": 20,
                                                                 "phema0.15": 20}
    run(tmp_path / "part", resumed, max_steps=40, ckpt_path=str(ckpt))
    assert resumed.history == full.history
    for step in (30, 40):
        a = tmp_path / "full" / "ckpt" / "soups" / f"soup-step={step}.safetensors"
        b = tmp_path / "part" / "ckpt" / "soups" / f"soup-step={step}.safetensors"
        assert_same_tensors(load_file(str(a)), load_file(str(b)))


def test_auto_under_the_hf_trainer(tmp_path):
    pytest.importorskip("transformers")
    from merge_callback import BayesMergeTrainerCallback
    from merge_callback.io.soups import read_tensor_state
    from test_hf import from_pretrained, heldout_set
    from test_hf import run as hf_run

    cb = BayesMergeTrainerCallback(heldout=heldout_set(), **AUTO_ARGS)
    hf_run(tmp_path, cb, max_steps=20)
    assert [h["step"] for h in cb.history] == [20]
    info = json.loads((tmp_path / "soups" / "soup-20" / "merge.json").read_text())
    assert info["averaging"] == "auto" and info["value_soup"] <= info["value_latest"]
    assert math.fsum(info["weights"]) == pytest.approx(1.0, abs=1e-12)
    soup = from_pretrained(tmp_path / "soups" / "soup-20")
    assert cb._evaluator(soup) == pytest.approx(info["value_soup"], rel=1e-9)
    state = read_tensor_state(tmp_path / "checkpoint-20" / "merge_callback_state.safetensors")
    assert {k: v["step"] for k, v in state["ema"].items()} == {"phema0.05": 20,
                                                                "phema0.15": 20}
    for track in cb.schedule.tracks:
        assert_same_tensors(state["ema"][f"phema{track.sigma_rel:g}"]["tensors"], track.tensors)
    assert cb.state()["args"]["averaging"] == "auto"


def _engine_setup(tmp_path, dtype):
    """A small module trained by hand for 40 steps with the auto schedule's tracks and store
    (tracks every 2 steps, saves every 10); returns (module, schedule, latest, plan, evaluate,
    scored) with ``evaluate`` a deterministic distance to a fixed target that records each
    scored state."""
    from merge_callback.engine import RoundConfig, Snapshot
    from merge_callback.engine.schedule import MergeSchedule
    from merge_callback.evaluate import resolve_metric

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(dtype)
    sch = MergeSchedule(RoundConfig(), resolve_metric("loss"), averaging="auto")
    sch.store = SnapshotStore(tmp_path / "store", keep=16)
    target = {k: torch.randn_like(v, dtype=torch.float32) for k, v in net.state_dict().items()}
    keys = list(net.state_dict())
    for step in range(1, 41):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        if step % 2 == 0:
            sch.on_train_step(net, step)
        if step % 10 == 0:
            latest = Snapshot.capture(net, step)
            sch.store.put(step, "raw", latest.tensors)
            for t in sch.tracks:
                sch.store.put(step, sch.track_name(t), t.tensors, {"gamma": t.gamma})
    scored = []

    def evaluate(m):
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        scored.append(sd)
        return float(sum(((sd[k].float() - target[k]) ** 2).sum() for k in keys))

    return net, sch, latest, sch.auto_plan(latest), evaluate, scored


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_round_restores_and_writes_the_scored_candidate(tmp_path, dtype):
    """run_round with an AutoPlan on a module in ``dtype``: every candidate is scored in the live
    tensors, the live weights come back bitwise, and build_mix_soup gives bitwise the tensors
    that were scored for the chosen candidate."""
    from merge_callback.engine import RoundConfig, run_round
    from merge_callback.engine.round import build_mix_soup

    net, sch, latest, plan, evaluate, scored = _engine_setup(tmp_path, dtype)
    keys = list(net.state_dict())
    assert [r.step for r in plan.raws] == [10, 20, 30, 40]
    assert [t.step for t in sch.tracks] == [40, 40]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = run_round(net, {"latest": latest}, plan, evaluate, RoundConfig())
    assert_same_tensors(net.state_dict(), before)
    # at most the mode's 12 evaluations (a repeated candidate is not evaluated again), plus the
    # previous save once (its value is not known here)
    assert len(scored) == res.extras["evaluations"] and res.extra_evaluations == 1
    assert 9 <= len(scored) - 1 <= 12
    base = (res.extras["blend_of"]["family"], res.extras["blend_of"]["param"]) \
        if "blend_of" in res.extras else None
    soup = build_mix_soup(latest, plan.mix(res.family, res.param, base), module=net)
    assert res.value_soup == min(c["value"] for c in res.extras["candidates"])
    matches = [sd for sd in scored if all(torch.equal(sd[k], soup[k]) for k in keys)]
    assert matches, "the written soup is none of the scored candidates"
    assert all(v.dtype == dtype for v in soup.values())


def test_engine_round_warm_start_and_failure(tmp_path):
    from merge_callback.engine import MergeRoundError, RoundConfig, run_round

    net, _, latest, plan, evaluate, _ = _engine_setup(tmp_path, torch.float32)
    res = run_round(net, {"latest": latest}, plan, evaluate, RoundConfig(warm_start=True),
                    initial={"phema": 0.1, "window": 3, "pairwise": 0.8}, value_previous=1.0)
    params = {}
    for c in res.extras["candidates"]:
        params.setdefault(c["family"], []).append(c["param"])
    # each family's search evaluates the last round's optimum right after its two ends
    assert params["phema"][:3] == [0.02, 0.28, 0.1]
    assert params["window"][:3] == [2, 4, 3]  # W = 16 is clipped to the 4 saves there are
    assert params["pairwise"][:2] == [0.5, 0.8] and res.extra_evaluations == 0
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(MergeRoundError, match=r"merge round at step 40: held-out metric is nan"):
        run_round(net, {"latest": latest}, plan, lambda m: float("nan"), RoundConfig())
    assert_same_tensors(net.state_dict(), before)


def test_engine_round_chooses_what_the_anytime_benchmark_chose(tmp_path):
    """benchmarks/anytime.py --quick simulates the mode offline; the engine's round, on the
    snapshots that run stored and the same selection shard, makes the same choice with the same
    held-out value at every late save (bitwise: the same searches over the same evaluations)."""
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import averaging as av
    from benchmarks.anytime import QUICK as cfg
    from benchmarks.anytime import main
    from merge_callback.engine import RoundConfig, Snapshot, run_round
    from merge_callback.engine.families import AutoPlan, StoredWeights
    from merge_callback.engine.options import AutoMode
    from merge_callback.io import load_state_dict

    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(["--quick", "--out", str(out), "--cache", str(cache)]) == 0
    res = json.loads((out / "anytime_quick.json").read_text())["results"]
    data = av.build_data(av.QUICK, cache)
    mode = AutoMode(track_sigmas=cfg.track_sigmas, snapshot_every=cfg.snapshot_every,
                    sigma_range=cfg.sigma_range, window_kind=cfg.window_kind,
                    window_range=cfg.window_range, budget_phema=cfg.budget_phema,
                    budget_window=cfg.budget_window, budget_pairwise=cfg.budget_pairwise,
                    budget_blend=cfg.budget_blend)
    size, seed = cfg.sizes[0], cfg.seeds[0]
    (folder,) = cache.glob(f"anytime-{cfg.name}-{size[0]}-s{seed}-*")
    rows = {r["step"]: r for r in res[size[0]]["runs"][0]["rows"]}
    scorer = av.Scorer(cfg.avg_config(size, seed), {"sel": data.shards["sel"][: cfg.shard_blocks]})
    net, evaluate = scorer.module, scorer.evaluators["sel"]
    entries = SnapshotStore(folder / "snaps", keep=None).entries()
    gammas = {e.kind: float(e.metadata()["info"]["gamma"]) for e in entries if e.kind != "raw"}
    for t in cfg.late_steps:
        sd = net.state_dict()
        sd.update(load_state_dict(folder / "snaps" / f"snap-step{t:09d}-raw.safetensors"))
        net.load_state_dict(sd)
        latest = Snapshot.capture(net, t)
        lat = StoredWeights("raw", t, latest.tensors)
        plan = AutoPlan(
            step=t, latest=lat, alpha=0.5, mode=mode,
            raws=[StoredWeights("raw", e.step, e) for e in entries
                  if e.kind == "raw" and e.step < t] + [lat],
            tracks=[(StoredWeights(e.kind, e.step, e), gammas[e.kind]) for e in entries
                    if e.kind != "raw" and e.step <= t])
        r = run_round(net, {"latest": latest}, plan, evaluate, RoundConfig(alpha=0.5),
                      value_previous=0.0)
        ch = rows[t]["choice"]["mode"]
        assert r.value_soup == ch["sel"]
        assert r.extras["searched"] == {"phema": ch["phema_sigma"], "window": ch["window_W"],
                                        "pairwise": ch["pair_lambda"]}
        assert {"ph": "phema", "win": "window", "pair": "pairwise"}.get(
            ch["key"][0], ch["key"][0]) == r.family


def test_fp32_host_weights_are_their_own_scratch():
    """An fp32 CPU model's candidates are accumulated straight into its live tensors (no fp32
    scratch copy: 3 host copies in a round); other dtypes get an fp32 host scratch."""
    from merge_callback.engine.families import mix_scratch

    live = [torch.zeros(3), torch.zeros(2, dtype=torch.bfloat16)]
    scratch = mix_scratch(["a", "b"], live)
    assert scratch["a"] is live[0]
    assert scratch["b"] is not live[1] and scratch["b"].dtype == torch.float32
    assert scratch["b"].shape == live[1].shape
