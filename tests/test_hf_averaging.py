"""The averaging families (history, snapshot_every, ema_decays) under a real transformers.Trainer:
the same schedule and rounds as BayesMergeCallback's."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from merge_callback import BayesMergeTrainerCallback  # noqa: E402
from merge_callback.io import load_state_dict  # noqa: E402
from test_hf import (HERE, assert_same_tensors, from_pretrained, heldout_set,  # noqa: E402
                     plain_run, run)

AVG = dict(budget=6, history=4, snapshot_every=5, ema_decays=(0.8, 0.95))
__all__ = ["plain_run"]  # the fixture, shared with test_hf.py


def test_averaging_rounds_write_what_they_evaluated(tmp_path):
    cb = BayesMergeTrainerCallback(heldout=heldout_set(), **AVG)
    ring_sizes = []
    push = cb.schedule._push

    def spy(snap):
        push(snap)
        ring_sizes.append(len(cb.schedule.ring))

    cb.schedule._push = spy
    run(tmp_path, cb)
    assert max(ring_sizes) == 4 and len(cb.schedule.ring) == 3
    assert [h["step"] for h in cb.history] == [10, 20, 30]
    for h in cb.history:
        info = json.loads((tmp_path / "soups" / f"soup-{h['step']}" / "merge.json").read_text())
        assert info["evaluations"] - info["extra_evaluations"] == 6
        assert h["family"] == info["family"] and h["param"] == info["param"]
        assert {"pairwise", "ema0.8", "ema0.95"} <= {c["family"] for c in info["candidates"]}
        assert info["value_soup"] == min(c["value"] for c in info["candidates"])
        assert info["value_soup"] <= info["value_latest"]
        assert info["lambda"] == info["weights"][-1]
        soup = from_pretrained(tmp_path / "soups" / f"soup-{h['step']}")
        assert cb._evaluator(soup) == pytest.approx(info["value_soup"], rel=1e-9)
    info = json.loads((tmp_path / "soups" / "soup-30" / "merge.json").read_text())
    assert any(c["family"].startswith("geometric") for c in info["candidates"])
    # the older snapshots and the EMA tracks travel with each checkpoint for resume
    assert (tmp_path / "checkpoint-30" / "merge_callback_state.safetensors").is_file()


def test_averaging_keeps_training_bitwise_unchanged(tmp_path, plain_run):
    a = run(tmp_path, BayesMergeTrainerCallback(heldout=heldout_set(), **AVG), dropout=0.1)
    root, b = plain_run
    assert_same_tensors(a.model.state_dict(), b.model.state_dict())
    for step in (10, 20, 30):
        assert_same_tensors(load_state_dict(tmp_path / f"checkpoint-{step}"),
                            load_state_dict(root / f"checkpoint-{step}"))
    losses = [[r["loss"] for r in t.state.log_history if "loss" in r] for t in (a, b)]
    assert losses[0] == losses[1]


def test_resume_with_snapshots_and_ema_tracks_gives_the_same_soups(tmp_path):
    full = BayesMergeTrainerCallback(heldout=heldout_set(), **AVG)
    run(tmp_path / "full", full, max_steps=40)
    part = tmp_path / "part"
    run(part, BayesMergeTrainerCallback(heldout=heldout_set(), **AVG), max_steps=20)
    ckpt = part / "checkpoint-20"
    resumed = BayesMergeTrainerCallback(heldout=heldout_set(), **AVG)
    run(part, resumed, max_steps=40, resume=ckpt, model=from_pretrained(ckpt))
    assert resumed.history == full.history
    for step in (30, 40):
        assert_same_tensors(load_state_dict(tmp_path / "full" / "soups" / f"soup-{step}"),
                            load_state_dict(part / "soups" / f"soup-{step}"))


def _torchrun_hf_script(tmp_path, mode: str) -> list[dict]:
    """Two gloo processes of tests/hf_ddp_script.py under torchrun; each rank's JSON."""
    dist_vars = {"LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "TORCHELASTIC_RUN_ID"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(HERE / "hf_ddp_script.py"), str(tmp_path),
                        mode], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]


def test_averaging_under_ddp_two_processes(tmp_path):
    ranks = _torchrun_hf_script(tmp_path, "averaging")
    assert ranks[0]["history"] == ranks[1]["history"]
    history = ranks[0]["history"]
    assert [h["step"] for h in history] == [10, 20, 30] and all("family" in h for h in history)
    out = tmp_path / "out"
    from merge_callback.evaluate import HeldoutEvaluator, resolve_metric
    from test_hf import heldout_loader

    for h in history:  # the reduced value equals a one-process evaluation of the written soup
        soup = from_pretrained(out / "soups" / f"soup-{h['step']}")
        value = HeldoutEvaluator(heldout_loader(), resolve_metric("loss"))(soup)
        assert value == pytest.approx(h["value_soup"], rel=1e-9)


def test_auto_averaging_under_ddp_two_processes(tmp_path):
    """averaging="auto" under torchrun: rank 0 writes the shared snapshot store, both ranks read
    it and agree, and each written soup re-evaluates to its recorded value in one process."""
    from merge_callback.evaluate import HeldoutEvaluator, resolve_metric
    from test_hf import heldout_loader

    ranks = _torchrun_hf_script(tmp_path, "auto")
    assert ranks[0]["history"] == ranks[1]["history"]
    history = ranks[0]["history"]
    # saves at 10, 20, 30: the first round needs two stored saves
    assert [h["step"] for h in history] == [20, 30]
    soups = tmp_path / "out" / "soups"
    store = sorted(p.name for p in (soups / ".averaging").iterdir())
    assert len([n for n in store if n.endswith("-raw.safetensors")]) == 3
    for h in history:
        info = json.loads((soups / f"soup-{h['step']}" / "merge.json").read_text())
        assert info["averaging"] == "auto" and info["value_soup"] == h["value_soup"]
        soup = from_pretrained(soups / f"soup-{h['step']}")
        value = HeldoutEvaluator(heldout_loader(), resolve_metric("loss"))(soup)
        assert value == pytest.approx(h["value_soup"], rel=1e-9)
