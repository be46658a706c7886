import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# messages a new user saw from third-party code when running the examples; each example silences
# them around its own calls (merge_callback.console.quiet_third_party)
THIRD_PARTY_NOISE = ("litlogger", "LeafSpec", "GPU available", "TPU available", "validation_step",
                     "Running in WANDB offline mode", "Setting accelerator to", "Trainable params",
                     "`Trainer.fit` stopped", "does not have many workers")


def run_example(name: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run an example as a user would, in a fresh process (import-time messages included), with
    no W&B environment variable set (the examples set it only when W&B is asked for)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_lightning_example_runs_reports_every_round_and_prints_only_its_own_lines(tmp_path):
    proc = run_example("lightning_gpt_neox", [
        "--output_dir", str(tmp_path / "run"), "--steps", "6", "--save_every", "2",
        "--batch_size", "4", "--block_size", "32", "--hidden_size", "32", "--num_layers", "1",
        "--heldout_tokens", "512", "--budget", "3", "--warmup", "0"], tmp_path)
    (table,) = tmp_path.glob("run/**/merge_rounds.json")
    rows = json.loads(table.read_text())["rounds"]
    assert [r["step"] for r in rows] == [4, 6]
    for r in rows:
        assert 0.5 <= r["lambda"] <= 1.0
        assert r["heldout_soup"] <= r["heldout_latest"]  # λ = 1 is always evaluated
        assert r["heldout_gain_pct"] >= 0 and r["ood_latest"] > 0 and r["ood_soup"] > 0
        assert Path(r["soup"]).exists()
    assert "| step |" in proc.stdout and "held-out soup" in proc.stdout
    assert len(list(tmp_path.glob("run/**/soups/soup-step=*.safetensors"))) == 2
    for noise in THIRD_PARTY_NOISE:
        assert noise not in proc.stdout + proc.stderr, noise


def test_hf_example_runs_reloads_its_soup_and_prints_only_its_own_lines(tmp_path):
    pytest.importorskip("transformers")
    proc = run_example("hf_trainer_gpt_neox", [
        "--output_dir", str(tmp_path / "run"), "--steps", "6", "--save_steps", "2",
        "--batch_size", "4", "--block_size", "32", "--hidden_size", "32", "--num_layers", "1",
        "--heldout_tokens", "512", "--budget", "3", "--warmup", "0"], tmp_path)
    out = proc.stdout
    assert "| step |" in out and "held-out soup" in out
    for step in (4, 6):
        assert f"merge round: step {step}, λ " in out
        merge = json.loads((tmp_path / "run" / "soups" / f"soup-{step}" / "merge.json").read_text())
        assert merge["step"] == step and 0.5 <= merge["lambda"] <= 1.0
    # the example reloads the last soup with from_pretrained and re-measures it
    assert "reloaded " in out and "with AutoModelForCausalLM.from_pretrained" in out
    for noise in THIRD_PARTY_NOISE:
        assert noise not in out + proc.stderr, noise


def test_lightning_example_rejects_bad_options():
    example = load("lightning_gpt_neox")
    with pytest.raises(SystemExit):
        example.parse_args(["--alpha", "1.5"])
