"""Benchmarks end to end in their --quick modes (quality, overhead), and the per-step EMA tracker."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import QUICK, MultiEMA  # noqa: E402
from benchmarks.quality import METHODS, main  # noqa: E402
from benchmarks.search_strategies import STRATEGY_NAMES  # noqa: E402


def test_multi_ema_matches_lightnings_ema_weight_averaging(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from torch.utils.data import DataLoader

    from merge_callback.data import BlockDataset, tiny_gpt_neox
    from merge_callback.lm import CausalLMModule

    blocks = torch.randint(0, 64, (24, 16), generator=torch.Generator().manual_seed(0))
    module = CausalLMModule(tiny_gpt_neox(64, hidden_size=32, num_layers=2, num_heads=4, max_len=16),
                            lr=1e-2)
    ours = MultiEMA((0.9, 0.5), snapshot_steps=(3, 6))
    theirs = EMAWeightAveraging(decay=0.9)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), callbacks=[theirs, ours])
    trainer.fit(module, DataLoader(BlockDataset(blocks), batch_size=4))
    assert ours.updates == 6
    # Lightning copies its average into the module when training ends
    lightning_ema = module.model.state_dict()
    mine = ours.state_dict_for(0.9)
    assert list(mine) == list(lightning_ema)
    for k, v in lightning_ema.items():
        assert torch.equal(mine[k], v), k
    assert ours.snapshots[(0.9, 6)].keys() == mine.keys()
    assert all(torch.equal(ours.snapshots[(0.9, 6)][k], mine[k]) for k in mine)
    # a different decay and an earlier snapshot are different weights
    k = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    assert not torch.equal(ours.snapshots[(0.5, 6)][k], mine[k])
    assert not torch.equal(ours.snapshots[(0.9, 3)][k], mine[k])
    with pytest.raises(ValueError, match=r"EMA decays must be in \(0, 1\), got 1.0"):
        MultiEMA((1.0,))


def test_quick_benchmark_writes_consistent_results(tmp_path, capsys):
    out, cache = tmp_path / "results", tmp_path / "cache"
    assert main(["--quick", "--out", str(out), "--cache", str(cache)]) == 0
    names = ["quality_quick.md", "quality_quick.json", "pilot_quick.md", "pilot_quick.json",
             "pilot_quick_heatmap.png", "pilot_quick_sweeps.png", "search_quick.md",
             "search_quick.json", "search_quick_regret.png"]
    for name in names:
        assert (out / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = QUICK
    q = json.loads((out / "quality_quick.json").read_text())
    assert q["command"].startswith("python -m benchmarks.quality --quick")
    assert q["config"]["name"] == "quick" and q["environment"]["torch_threads"] == 1
    assert q["trajectory"]["loaded_from_cache"] is False
    assert [(r["previous"], r["latest"]) for r in q["quality"]] == [(a, b) for _, a, b in cfg.quality_pairs]
    for r in q["quality"]:
        v = r["values"]
        assert set(v) == set(METHODS)
        for m in METHODS:
            for shard in ("sel", "test", "ood"):
                assert math.isfinite(v[m][shard]["loss"]) and 0.0 <= v[m][shard]["accuracy"] <= 1.0
        sel = {m: v[m]["sel"]["loss"] for m in METHODS}
        # λ = 1 is always evaluated and the best observed λ wins; greedy keeps the best parent at least
        assert sel["BO soup"] <= sel["latest"]
        assert sel["greedy"] <= min(sel["latest"], sel["previous"])
        assert cfg.alpha <= r["bo_lambda"] <= 1.0
        assert len(r["bo_observations"]) == cfg.budget
        assert min(y for _, y in r["bo_observations"]) == sel["BO soup"]
    md = (out / "quality_quick.md").read_text()
    assert "Produced by `python -m benchmarks.quality --quick" in md
    assert "| pair | latest | previous | uniform | greedy | fisher | regmean | BO soup |" in md

    users = {r["step"]: r["values"] for r in q["users"]}
    assert sorted(users) == cfg.user_steps
    for step, vals in users.items():
        assert all(f"EMA {d}" in vals for d in cfg.ema_decays)
        assert vals["latest"] == next(r["values"]["latest"] for r in q["quality"] if r["latest"] == step)
        # LAWA k=3 needs three kept checkpoints ending at this step
        assert ("LAWA k=3" in vals) == (step - 2 * cfg.ckpt_every >= cfg.ckpt_every)

    s = json.loads((out / "search_quick.json").read_text())["search"]
    assert [(p["previous"], p["latest"]) for p in s["pairs"]] == list(cfg.search_pairs)
    for p in s["pairs"]:
        assert len(p["sweep"]["loss"]) == cfg.dense_points
        assert p["f_star"] == min(p["sweep"]["loss"])
        start = None
        for name in STRATEGY_NAMES:
            runs = p["runs"][name]
            assert len(runs) == (1 if name in ("grid", "greedy (golden section)") else len(cfg.search_seeds))
            for run in runs:
                reg = run["regret"]
                assert len(reg) == cfg.search_budget
                # every strategy starts with λ = α, then λ = 1
                start = reg[:2] if start is None else start
                assert reg[:2] == start
                if name != "grid":  # anytime strategies: best-so-far cannot get worse
                    assert all(b <= a for a, b in zip(reg, reg[1:]))
        assert start[1] == pytest.approx(min(p["sweep"]["loss"][0], p["f_latest"]) - p["f_star"])
    assert s["summary"]["BO gp_hedge"][-1]["n_runs"] == len(cfg.search_pairs) * len(cfg.search_seeds)
    assert s["summary"]["grid"][-1]["n_runs"] == len(cfg.search_pairs)

    pilot = json.loads((out / "pilot_quick.json").read_text())["pilot"]
    steps = pilot["steps"]
    assert steps == [x for x in range(cfg.ckpt_every, cfg.total_steps + 1, cfg.ckpt_every)
                     if x % cfg.heatmap_every == 0]
    gain = pilot["uniform_gain"]
    for i in range(len(steps)):
        for j in range(len(steps)):
            assert (isinstance(gain[i][j], float) and math.isfinite(gain[i][j])) == (j > i)
    # the same λ = 0.5 soup appears in the search sweep (λ = α) and the heatmap
    first = s["pairs"][0]
    assert (first["previous"], first["latest"]) == (steps[0], steps[1])
    single = pilot["single_sel_loss"]
    better = min(single[str(steps[0])], single[str(steps[1])])
    assert gain[0][1] == better - first["sweep"]["loss"][0]

    # a rerun reuses the cached trajectory instead of training again
    assert main(["--quick", "--parts", "users", "--out", str(out), "--cache", str(cache)]) == 0
    again = json.loads((out / "quality_quick.json").read_text())
    assert again["trajectory"]["loaded_from_cache"] is True
    assert {r["step"]: r["values"] for r in again["users"]}[cfg.user_steps[-1]]["latest"] == \
        users[cfg.user_steps[-1]]["latest"]

    with pytest.raises(SystemExit):
        main(["--quick", "--parts", "nope", "--out", str(out)])
    assert "--parts must be a comma-separated subset of quality,users,pilot,search" in capsys.readouterr().err


def test_overhead_benchmark_quick_runs_the_package(tmp_path):
    """``benchmarks/overhead.py --quick`` end to end: the kernels it times are the package's and
    agree bitwise, the measured memory counts hold, and the report is written."""
    from benchmarks import overhead

    assert overhead.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "overhead_quick.json").read_text())
    merge = res["merge"][0]
    assert merge["model"] == "tiny" and all(merge["bitwise"].values())
    snap = res["snapshot"][0]
    assert snap["reuse_kept_buffers"] and snap["capture_equals_weights"]
    mem = res["memory"][0]
    assert mem["between_rounds_counted"] == 1 and mem["during_round_counted"] == 2
    rnd = res["round"][0]
    assert rnd["budget"] == 10 and 0.0 < rnd["non_pass_share"] < 1.0
    assert res["steps"][0]["callback_held_a_snapshot"]
    text = (tmp_path / "overhead_quick.md").read_text()
    assert "## Targets missed, and why" in text and "| tiny |" in text
