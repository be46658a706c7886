"""The anytime-averaging benchmark end to end in its --quick mode."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.anytime import QUICK, main  # noqa: E402

torch.set_num_threads(1)


def test_anytime_quick_end_to_end(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(["--quick", "--out", str(out), "--cache", str(cache)]) == 0
    for ext in ("md", "json", "png"):
        assert (out / f"anytime_quick.{ext}").stat().st_size > 0
    res = json.loads((out / "anytime_quick.json").read_text())["results"]
    assert set(res) == {s[0] for s in QUICK.sizes}
    for size in res.values():
        (run,) = size["runs"]
        meta = run["meta"]
        assert [r["step"] for r in run["rows"]] == QUICK.late_steps
        # the warmup-stable-decay branch really decayed: from the constant lr to ~0.1x at its end
        (branch,) = meta["branches"].values()
        assert branch["steps"] == QUICK.branch_targets[0] - branch["from_step"]
        assert branch["lr_first"] == pytest.approx(QUICK.lr)
        assert branch["lr_last"] < 0.25 * QUICK.lr
        assert meta["snapshot_bytes_per_save"] >= 3 * meta["model_bytes_fp32"]
        for r in run["rows"]:
            loss = r["loss"]
            # the mode's soup is the best of its candidates on the selection shard, so never
            # worse there than the latest weights, the pairwise candidates or the windows
            assert loss["mode"]["sel"] <= loss["latest"]["sel"]
            assert loss["mode"]["sel"] <= min(loss[v]["sel"] for v in
                                              ("phema_only", "window_only", "phema+window"))
            assert r["mode_sel_evaluations"] <= (1 + QUICK.budget_phema + QUICK.budget_window
                                                 + QUICK.budget_pairwise + QUICK.budget_blend)
            ch = r["choice"]["mode"]
            assert sum(ch["weights"].values()) == pytest.approx(1.0, abs=1e-9)
            assert QUICK.sigma_range[0] <= ch["phema_sigma"] <= QUICK.sigma_range[1]
            # a rebuilt profile equal to a stored track's is exact: weight 1 on that snapshot
            acc = r["reconstruction"]
            for a in acc.values():
                assert a["max_weight_error"] >= 0 and a["ls_l1_weight_error"] >= 0
            assert {"test_loss_rebuilt", "test_loss_exact"} <= set(acc[f"{QUICK.recon_check[0]:g}"])
        assert "wsd_branch" in run["rows"][-1]["loss"]
    # a second invocation reuses the cached runs and analyses
    assert main(["--quick", "--out", str(out), "--cache", str(cache)]) == 0
