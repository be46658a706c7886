"""Whatever metric chooses λ, every round reports the loss and next-token accuracy of the soup,
the latest and the previous weights from the same forward passes, and logs them."""

import csv
import json

import pytest
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file

from lightning_helpers import loaders, module
from merge_callback import BayesMergeCallback
from merge_callback.evaluate import HeldoutEvaluator, resolve_metric
from merge_callback.io import load_state_dict
from test_lightning import ckpt_files, run


def _evaluate(state_dict, metric):
    m = module()
    m.load_state_dict(state_dict)
    return HeldoutEvaluator(loaders()[1], resolve_metric(metric))(m)


def test_loss_chosen_rounds_log_the_accuracy_of_soup_latest_and_previous(tmp_path):
    cb = BayesMergeCallback(heldout=loaders()[1], budget=4)
    logger = CSVLogger(str(tmp_path / "logs"), name="run")
    run(tmp_path, cb, logger=logger)
    assert [h["step"] for h in cb.history] == [20, 30]
    ckpts = {int(p.stem.split("step=")[1]): p for p in ckpt_files(tmp_path)}
    soups = tmp_path / "ckpt" / "soups"
    for h in cb.history:
        soup = load_file(str(soups / f"soup-step={h['step']}.safetensors"))
        # the soup's accuracy equals a direct evaluation of the written soup
        assert h["soup_accuracy"] == pytest.approx(_evaluate(soup, "accuracy"), rel=1e-12)
        assert h["soup_loss"] == pytest.approx(h["value_soup"], rel=1e-12)
        latest = load_state_dict(ckpts[h["step"]])
        previous = load_state_dict(ckpts[h["previous_step"]])
        assert h["latest_accuracy"] == pytest.approx(_evaluate(latest, "accuracy"), rel=1e-12)
        assert h["previous_accuracy"] == pytest.approx(_evaluate(previous, "accuracy"),
                                                       rel=1e-12)
        info = json.loads((soups / f"soup-step={h['step']}.json").read_text())
        assert info["side"]["soup"]["accuracy"] == h["soup_accuracy"]
        # every evaluated λ has its accuracy: the λ-vs-accuracy curve
        assert sorted(v["param"] for v in info["side_values"]) == sorted(
            [lam for lam, _ in info["observations"]] + ([0.0] if info["extra_evaluations"] else []))
    # the second round reuses the previous weights' values from the first (no λ = 0 pass)
    assert cb.history[1]["previous_accuracy"] == cb.history[0]["latest_accuracy"]
    logger.finalize("success")
    with open(tmp_path / "logs" / "run" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("merge/soup_accuracy")]
    assert [float(r["merge/soup_accuracy"]) for r in rows] == pytest.approx(
        [h["soup_accuracy"] for h in cb.history], rel=1e-12)
    assert [float(r["merge/previous_accuracy"]) for r in rows] == pytest.approx(
        [h["previous_accuracy"] for h in cb.history], rel=1e-12)
