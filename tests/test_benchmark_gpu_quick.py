"""The prepared GPU check (``benchmarks/gpu.py``) in its quick mode on the CPU, in a process where
wandb and optuna cannot be imported (as on the lent GPU image), and its offline bundle."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# run benchmarks.gpu as __main__ with wandb, optuna and cmaes as if not installed: every finder
# on sys.meta_path is wrapped so that it finds none of them (importlib.util.find_spec gives None,
# the way libraries probe for optional packages, and importing them raises ModuleNotFoundError)
BLOCKED_RUN = """
import runpy, sys
BLOCKED = ("wandb", "optuna", "cmaes")
class Hiding:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [Hiding(f) for f in sys.meta_path]
import importlib.util
assert importlib.util.find_spec("wandb") is None and importlib.util.find_spec("optuna") is None
sys.argv = ["benchmarks/gpu.py"] + sys.argv[1:]
try:
    runpy.run_module("benchmarks.gpu", run_name="__main__")
finally:
    print("LOADED", sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED)))
"""


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_gpu_check_quick_mode_without_wandb_or_optuna(tmp_path):
    from benchmarks import gpu
    from merge_callback.data import shakespeare_texts

    texts = shakespeare_texts()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    works = {k: texts[k] for k in ("macbeth", "julius_caesar", "hamlet", "othello")}
    (bundle / gpu.SHAKESPEARE_FILE).write_bytes(gzip.compress(json.dumps(works).encode()))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "--quick", "--out", str(out),
                           "--bundle", str(bundle)], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "LOADED []" in proc.stdout
    # the summary table is printed
    assert "round: share not a held-out pass (pass s)" in proc.stdout

    res = json.loads((out / "gpu_quick.json").read_text())
    assert res["errors"] == {} and res["stops"] == []
    assert res["device"] == "cpu" and res["environment"]["torch_threads"] == 1
    assert res["callback"] == {k: list(v) if isinstance(v, tuple) else v
                               for k, v in gpu.CALLBACK_SETTINGS.items()}

    # 1. kernels: every kernel timed for both dtypes; the written soup is the scored candidate
    assert [k["dtype"] for k in res["kernels"]] == ["fp32", "bf16"]
    for k in res["kernels"]:
        assert set(k["rows"]) == set(gpu.KERNEL_VOLUMES)
        assert all(r["median_s"] > 0 and r["bytes_per_s"] > 0 for r in k["rows"].values())
        assert k["rows"][gpu.KERNEL_COPY]["bytes_per_s_vs_copy"] == 1.0
        assert k["bitwise"]["soup_equals_scored_candidate"] and k["bitwise"]["live_restored"]
        assert k["stage"]["on_device"] is False and k["stage"]["bytes_per_s"] is None  # CPU
        assert k["soup_in_place"]["median_s"] > 0

    # 2. snapshots: a capture followed by training steps holds its own step's weights
    snap = res["snapshots"]
    assert snap["capture_exact_while_training"] is True and snap["page_locked"] is False
    assert snap["stretch"]["steps"] == gpu.QUICK.plain_steps
    steps = res["steps"]
    assert set(steps["runs"]) == {"with", "without"}
    assert len(steps["runs"]["with"]["rounds"]) == 1 and steps["runs"]["without"]["rounds"] == []
    assert steps["outside_rounds_ratio"] > 0 and steps["with_round_ratio"] > 0
    # the recommended mode stores its snapshots and EMA tracks in the checkpoint
    assert steps["runs"]["with"]["checkpoint_bytes"] > steps["runs"]["without"]["checkpoint_bytes"]

    # 3. round: the written file re-scores to the chosen value and equals the recomputation
    rnd = res["round"]
    assert all(rnd["bitwise"].values()), rnd["bitwise"]
    assert rnd["value_soup_rescored"] == rnd["value_soup"] <= rnd["value_latest"]
    assert 3 <= rnd["evaluations"] <= gpu.ROUND_BUDGET and 0.0 < rnd["non_pass_share"] < 1.0
    assert rnd["parts_s"]["passes"] == pytest.approx(rnd["evaluations"] * rnd["pass_s"], rel=1.0)
    assert rnd["memory"]["host_counted_between"] == 1 and rnd["memory"]["host_counted_during"] == 2

    # 4. quality: one row per checkpoint; every soup written re-scores bitwise to the value the
    # callback chose on the selection shard, which is never worse than the latest weights there
    q = res["quality"]
    interval = q["interval"]
    assert [s["step"] for s in q["per_save"]] == [interval * (i + 1)
                                                  for i in range(gpu.QUICK.q_saves)]
    assert q["corpus"]["shakespeare"]["works"] == 4
    assert q["shards"]["sel"][0] == gpu.QUICK.q_sel_blocks
    soups = [s for s in q["per_save"] if "soup" in s]
    assert len(soups) == q["summary"]["saves_with_soup"] >= gpu.QUICK.q_saves - 1
    for s in soups:
        assert s["soup"]["rescored_equals_scored"] and s["soup"]["callback_latest_equals_ours"]
        assert s["soup"]["sel"] <= s["latest"]["sel"]
    for s in q["per_save"]:
        assert set(s["ema"]) == {str(d) for d in gpu.EMA_DECAYS}
        assert s["best_ema"]["sel"] == min(e["sel"] for e in s["ema"].values())
    assert q["summary"]["rescored_equal"] == len(soups)

    md = (out / "gpu_quick.md").read_text()
    assert "## Summary" in md and "## 4. Quality: Pythia-70M architecture" in md
    assert "| quality: soups re-scored bitwise to the chosen value | all |" in md


def test_bundle_wheels_install_offline_and_phases_are_checked(tmp_path, capsys):
    """``--prepare``'s wheel download, then the offline install ``run.sh`` does."""
    from benchmarks import gpu

    wheels = tmp_path / "wheels"
    subprocess.run(gpu.WHEEL_DOWNLOAD + [str(wheels), *gpu.WHEELS], check=True,
                   capture_output=True, timeout=300)
    files = sorted(p.name for p in wheels.glob("*.whl"))
    assert [f.split("-")[0] for f in files] == ["pyaml", "scikit_optimize"]
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--target", str(site), *map(str, wheels.glob("*.whl"))], check=True,
                   timeout=300)
    found = subprocess.run([sys.executable, "-c", "import skopt, pyaml; print(skopt.__file__)"],
                           env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True,
                           text=True, check=True).stdout
    assert found.startswith(str(site))
    script = tmp_path / "run.sh"
    script.write_text(gpu.RUN_SCRIPT)
    subprocess.run(["bash", "-n", str(script)], check=True)

    # the time guard: phases that do not fit in the budget are skipped, and the results say so
    out = tmp_path / "guarded"
    assert gpu.main(["--quick", "--budget-s", "0.5", "--phases", "kernels,quality",
                     "--out", str(out)]) == 0
    res = json.loads((out / "gpu_quick.json").read_text())
    assert "kernels" not in res and "quality" not in res
    assert [x.split(":")[0] for x in res["stops"]] == ["kernels fp32", "kernels bf16", "quality"]
    md = (out / "gpu_quick.md").read_text()
    assert "**Cut short by the time guard:** kernels fp32: skipped" in md

    with pytest.raises(SystemExit):
        gpu.main(["--quick", "--phases", "kernels,nope"])
    assert ("--phases must be a comma-separated subset of kernels,snapshots,round,steps,quality"
            in capsys.readouterr().err)
