import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_helpers import loaders, module
from merge_callback.evaluate import HeldoutEvaluator, resolve_metric
from merge_callback.io import load_state_dict

HERE = Path(__file__).parent
DIST_VARS = {"LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR",
             "MASTER_PORT", "GROUP_RANK"}


def launch(script: str, out: Path, *prefix: str, args: tuple = ()) -> None:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]))
    r = subprocess.run([*prefix, str(HERE / script), str(out), *args], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_lightning_ddp_two_processes_agree_and_reduce(tmp_path):
    launch("ddp_lightning_script.py", tmp_path, sys.executable)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["history"] == ranks[1]["history"]  # one λ on every rank
    assert [h["step"] for h in ranks[0]["history"]] == [10]
    # 3 held-out batches: rank 0 evaluated 2, rank 1 one, and the reduced count is all 3
    assert ranks[0]["evaluated_batches"] == 3
    soups = sorted(p.name for p in (tmp_path / "ckpt" / "soups").iterdir())
    assert soups == ["soup-step=10.json", "soup-step=10.safetensors"]
    # the reduced value equals a single-process evaluation of the checkpoint on the whole shard
    (ckpt,) = (tmp_path / "ckpt").glob("*step=10.ckpt")
    m = module()
    m.load_state_dict(load_state_dict(ckpt))
    full = HeldoutEvaluator(loaders()[1], resolve_metric("loss"))(m)
    assert ranks[0]["history"][0]["value_latest"] == pytest.approx(full, rel=1e-9)
    info = json.loads((tmp_path / "ckpt" / "soups" / "soup-step=10.json").read_text())
    assert info["lambda"] == ranks[0]["history"][0]["lambda"]


def test_lightning_ddp_averaging_families(tmp_path):
    launch("ddp_lightning_script.py", tmp_path, sys.executable, args=("averaging",))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["history"] == ranks[1]["history"]
    (h,) = [h for h in ranks[0]["history"] if h["step"] == 10]
    info = json.loads((tmp_path / "ckpt" / "soups" / "soup-step=10.json").read_text())
    assert info["family"] == h["family"] and info["lambda"] == h["lambda"]
    assert {c["family"] for c in info["candidates"]} >= {"pairwise", "ema0.9", "geometric3"}


def test_lightning_ddp_auto_averaging(tmp_path):
    """averaging="auto" under DDP: rank 0 writes the shared snapshot store, every rank reads it,
    the ranks agree, and the written soup re-evaluates to the recorded value."""
    from safetensors.torch import load_file

    launch("ddp_lightning_script.py", tmp_path, sys.executable, args=("auto",))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["history"] == ranks[1]["history"]
    (h,) = ranks[0]["history"]  # saves at 5 and 10: the first round needs two stored saves
    assert h["step"] == 10
    store = sorted(p.name for p in (tmp_path / "ckpt" / "soups" / ".averaging").iterdir())
    assert len([n for n in store if n.endswith("-raw.safetensors")]) == 2
    info = json.loads((tmp_path / "ckpt" / "soups" / "soup-step=10.json").read_text())
    assert info["averaging"] == "auto" and info["value_soup"] == h["value_soup"]
    m = module()
    m.load_state_dict(load_file(str(tmp_path / "ckpt" / "soups" / "soup-step=10.safetensors")))
    value = HeldoutEvaluator(loaders()[1], resolve_metric("loss"))(m)
    assert value == pytest.approx(h["value_soup"], rel=1e-9)
