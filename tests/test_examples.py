import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lightning_example_runs_and_reports_every_round(tmp_path, capsys):
    example = load("lightning_gpt_neox")
    rows = example.main(["--output_dir", str(tmp_path), "--steps", "6", "--save_every", "2",
                         "--batch_size", "4", "--block_size", "32", "--hidden_size", "32",
                         "--num_layers", "1", "--heldout_tokens", "512", "--budget", "3",
                         "--warmup", "0"])
    assert [r["step"] for r in rows] == [4, 6]
    for r in rows:
        assert 0.5 <= r["lambda"] <= 1.0
        assert r["heldout_soup"] <= r["heldout_latest"]  # λ = 1 is always evaluated
        assert r["heldout_gain_pct"] >= 0 and r["ood_latest"] > 0 and r["ood_soup"] > 0
        assert Path(r["soup"]).exists()
    out = capsys.readouterr().out
    assert "| step |" in out and "held-out soup" in out
    assert len(list(tmp_path.glob("**/soups/soup-step=*.safetensors"))) == 2


def test_lightning_example_rejects_bad_options():
    example = load("lightning_gpt_neox")
    with pytest.raises(SystemExit):
        example.parse_args(["--alpha", "1.5"])
