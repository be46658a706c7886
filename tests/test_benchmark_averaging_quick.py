"""The averaging benchmark end to end in its --quick mode, and the per-step EMA it compares against."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.averaging import QUICK, SHARDS, PerStepEMA, main  # noqa: E402


def test_per_step_ema_matches_lightnings_ema_weight_averaging(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader

    from merge_callback.data import BlockDataset, tiny_gpt_neox
    from merge_callback.lm import CausalLMModule

    blocks = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    module = CausalLMModule(tiny_gpt_neox(64, hidden_size=32, num_layers=2, num_heads=4,
                                          max_len=16), lr=1e-2)
    ours = PerStepEMA((0.9, 0.5), save_every=4, save_dir=tmp_path / "ema")
    theirs = EMAWeightAveraging(decay=0.9)

    class LastWeights(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.sd = {k: v.clone() for k, v in pl_module.state_dict().items()}

    last = LastWeights()
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), callbacks=[theirs, ours, last])
    trainer.fit(module, DataLoader(BlockDataset(blocks), batch_size=4))
    assert ours.updates == 8
    at_end = {k: v.clone() for k, v in module.state_dict().items()}
    # Lightning copies its average into the module when training ends: compare with ours.
    # torch.lerp and Lightning's decay*ema + (1 - decay)*x differ only in rounding.
    mine = ours.state_dict_for(0.9)
    assert list(mine) == [k for k, v in at_end.items() if v.is_floating_point()]
    for k in mine:
        torch.testing.assert_close(mine[k], at_end[k], rtol=1e-6, atol=1e-7, msg=k)
    # the comparison is not trivial: the EMA is far from the last weights and from another decay
    k = "model.gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    assert not torch.allclose(last.sd[k], mine[k], atol=1e-4)
    assert not torch.allclose(ours.state_dict_for(0.5)[k], mine[k], atol=1e-4)
    # the files written at steps 4 and 8 hold the EMA at those steps, non-float entries included
    saved = load_file(str(tmp_path / "ema" / "ema0.9-step000008.safetensors"))
    assert saved.keys() == at_end.keys()
    assert all(torch.equal(saved[k], mine[k]) for k in mine)
    early = load_file(str(tmp_path / "ema" / "ema0.9-step000004.safetensors"))
    assert not torch.equal(early[k], saved[k])
    assert sorted(p.name for p in (tmp_path / "ema").iterdir()) == [
        "ema0.5-step000004.safetensors", "ema0.5-step000008.safetensors",
        "ema0.9-step000004.safetensors", "ema0.9-step000008.safetensors"]


@pytest.mark.parametrize("kwargs, match", [
    ({"decays": (0.9, 1.0)}, r"decays must be numbers in \(0, 1\), got \[0.9, 1.0\]"),
    ({"decays": ()}, r"decays must be numbers in \(0, 1\), got \[\]"),
    ({"decays": (0.9,), "save_every": 5}, r"save_every needs save_dir"),
])
def test_per_step_ema_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PerStepEMA(**kwargs)


def test_quick_benchmark_writes_consistent_results(tmp_path):
    out, cache = tmp_path / "results", tmp_path / "cache"
    assert main(["--quick", "--out", str(out), "--cache", str(cache)]) == 0
    for ext in ("md", "json", "png"):
        assert (out / f"averaging_quick.{ext}").stat().st_size > 0
    assert (out / "averaging_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "averaging_quick.json").read_text())
    assert res["config"]["name"] == "quick"
    steps = list(range(QUICK.ckpt_every, QUICK.total_steps + 1, QUICK.ckpt_every))
    emas = [f"ema{d:g}" for d in QUICK.user_ema_decays]
    md = (out / "averaging_quick.md").read_text()
    assert set(res["results"]) == {"constant", "wsd"}
    for sched, r in res["results"].items():
        rows = r["rows"]
        assert [row["step"] for row in rows] == steps
        assert [row["step"] for row in rows if row["late"]] == res["late_steps"] == [32, 40, 48]
        # the two schedules coincide until the decay starts (same seed, same data order)
        for row, other in zip(rows, res["results"]["constant"]["rows"]):
            if row["step"] <= QUICK.total_steps - QUICK.decay_steps:
                assert row["loss"] == other["loss"]
        for row in rows:
            loss = row["loss"]
            # every method on every shard; LAWA and pairwise once enough checkpoints exist
            want = {"latest", "soup", *emas}
            want |= {f"lawa{k}" for k in QUICK.lawa_ks if row["step"] >= k * QUICK.ckpt_every}
            want |= {"pairwise"} if row["step"] > QUICK.ckpt_every else set()
            assert set(loss) == want
            assert all(set(v) == set(SHARDS) for v in loss.values())
            # the soup file the callback wrote re-evaluates to the value in its sidecar, exactly
            assert row["soup"]["sel_recomputed_minus_json"] == 0.0
            assert loss["soup"]["sel"] == row["soup"]["value_soup"]
            assert loss["latest"]["sel"] == row["soup"]["value_latest"]
            assert loss["soup"]["sel"] <= loss["latest"]["sel"]
            assert sum(row["soup"]["weights"]) == pytest.approx(1.0)
            assert row["soup"]["evaluations"] >= QUICK.cb_budget
            for s in SHARDS:
                best = row["best_ema"][s]
                assert best["loss"] == min(loss[e][s] for e in emas)
                assert loss[f"ema{best['decay']:g}"][s] == best["loss"]
        # win counts agree with the rows
        late = [row for row in rows if row["late"]]
        for s in SHARDS:
            c = r["summary"][s]["best_ema"]
            assert c["n"] == len(late)
            assert c["wins"] == sum(row["loss"]["soup"][s] < row["best_ema"][s]["loss"]
                                    for row in late)
            c = r["summary"][s]["lawa3"]
            assert c["wins"] + c["ties"] + c["losses"] == c["n"] == len(late)
            assert c["wins"] == sum(row["loss"]["soup"][s] < row["loss"]["lawa3"][s]
                                    for row in late)
        assert r["summary"]["must_show"]["soup_never_worse_than_latest_on_sel"] is True
        assert f"## Schedule `{sched}`" in md
        last = rows[-1]
        assert f"| {last['step']} † | {last['loss']['latest']['sel']:.4f} |" in md
    # a second call reuses the cached runs and their analysis and reports the same numbers
    again = tmp_path / "again"
    assert main(["--quick", "--out", str(again), "--cache", str(cache)]) == 0
    res2 = json.loads((again / "averaging_quick.json").read_text())
    for sched in res["results"]:
        assert res2["results"][sched]["meta"]["reused"] is True
        assert res2["results"][sched]["rows"] == res["results"][sched]["rows"]
