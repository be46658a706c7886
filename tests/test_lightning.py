import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from safetensors import safe_open
from safetensors.torch import load_file

from lightning_helpers import loaders, module, trainer
from merge_callback import BayesMergeCallback
from merge_callback.io import load_state_dict

SIDE_KEYS = {"step", "lambda", "alpha", "budget", "metric", "higher_is_better", "value_soup",
             "value_latest", "value_previous", "observations", "previous_step", "seconds"}


def ckpt_files(root):
    return sorted(Path(root, "ckpt").glob("*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))


def optimizer_state(tr):
    return tr.optimizers[0].state_dict()["state"]


def assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def run(root, *callbacks, dropout=0.0, shuffle=False, max_steps=30, ckpt_path=None, logger=False,
        val=False, pl_module=None):
    L.seed_everything(0, verbose=False)
    train, heldout = loaders(shuffle=shuffle)
    m = pl_module or module(dropout=dropout)
    tr = trainer(root, *callbacks, max_steps=max_steps, logger=logger)
    tr.fit(m, train, val_dataloaders=heldout if val else None, ckpt_path=ckpt_path)
    return tr, m


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 1.5}, r"alpha must be a number in \(0, 1\), got 1.5"),
    ({"budget": 2}, r"budget must be an integer >= 3"),
    ({"acq_func": "ucb"}, r"acq_func must be one of 'gp_hedge', 'EI', 'PI', 'LCB', got 'ucb'"),
    ({"strategy": "optuna"}, r"strategy must be one of 'bayes', 'grid', 'random', 'greedy'"),
    ({"metric": "f1"}, r"metric must be one of 'loss', 'perplexity', 'accuracy' or a callable"),
    ({"metric": len}, r"a callable metric needs higher_is_better=True or False"),
    ({"max_batches": 0}, r"max_batches must be a positive integer or None, got 0"),
    ({"every_n_saves": 0}, r"every_n_saves must be a positive integer, got 0"),
    ({"on_error": "ignore"}, r"on_error must be 'warn' or 'raise', got 'ignore'"),
    ({"seed": "1"}, r"seed must be an integer, got '1'"),
    ({"heldout": 3}, r"heldout must be a DataLoader or an iterable of batches, or None"),
    ({"heldout": "val.txt"}, r"heldout must be a DataLoader or an iterable of batches, or None"),
])
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BayesMergeCallback(**kwargs)


def test_soups_are_exact_merges_of_the_checkpoints(tmp_path):
    _, heldout = loaders()
    cb = BayesMergeCallback(heldout=heldout, budget=4)
    tr, m = run(tmp_path, cb)
    ckpts = ckpt_files(tmp_path)
    assert [p.name for p in ckpts] == ["epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt",
                                       "epoch=2-step=30.ckpt"]
    soups = tmp_path / "ckpt" / "soups"
    assert sorted(p.name for p in soups.iterdir()) == [
        "soup-step=20.json", "soup-step=20.safetensors", "soup-step=30.json",
        "soup-step=30.safetensors"]
    for prev, latest in zip(ckpts, ckpts[1:]):
        step = int(latest.stem.split("step=")[1])
        info = json.loads((soups / f"soup-step={step}.json").read_text())
        assert SIDE_KEYS <= set(info)
        assert info["step"] == step and info["previous_step"] == step - 10
        lam = info["lambda"]
        assert 0.5 <= lam <= 1.0 and info["budget"] == 4 and len(info["observations"]) == 4
        assert [o[0] for o in info["observations"][:2]] == [0.5, 1.0]
        assert info["value_soup"] == min(v for _, v in info["observations"])
        assert info["value_latest"] == dict(map(tuple, info["observations"]))[1.0]
        soup = load_file(str(soups / f"soup-step={step}.safetensors"))
        a, b = load_state_dict(prev), load_state_dict(latest)
        assert sorted(soup) == sorted(m.state_dict())  # safetensors stores keys sorted
        for k in soup:
            assert torch.equal(soup[k], torch.lerp(a[k], b[k], lam)), k
        with safe_open(str(soups / f"soup-step={step}.safetensors"), "pt") as f:
            meta = f.metadata()
        assert float(meta["lambda"]) == lam and meta["step"] == str(step)
    # the previous value of a round is the latest value of the round before (same weights)
    h = cb.history
    assert [r["step"] for r in h] == [20, 30]
    assert h[1]["value_previous"] == h[0]["value_latest"]
    # the soup's value is what the evaluator gives for the written soup
    soup_module = module()
    soup_module.load_state_dict(load_file(str(soups / "soup-step=30.safetensors")))
    assert cb._evaluator(soup_module) == pytest.approx(h[1]["value_soup"], rel=1e-9)
    assert not list(soups.glob(".*"))  # no temporary files left behind


def test_training_is_bitwise_unchanged(tmp_path):
    """Dropout and a shuffling loader make the run depend on every RNG draw."""
    _, heldout = loaders(shuffle=True)
    with_cb, m1 = run(tmp_path / "a", BayesMergeCallback(heldout=heldout, budget=3), dropout=0.1,
                      shuffle=True)
    without, m2 = run(tmp_path / "b", dropout=0.1, shuffle=True)
    assert_same_tensors(m1.state_dict(), m2.state_dict())
    s1, s2 = optimizer_state(with_cb), optimizer_state(without)
    assert s1.keys() == s2.keys()
    for k in s1:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[k][name], s2[k][name])
    for a, b in zip(ckpt_files(tmp_path / "a"), ckpt_files(tmp_path / "b")):
        assert_same_tensors(load_state_dict(a), load_state_dict(b))
    assert len(list((tmp_path / "a" / "ckpt" / "soups").glob("*.safetensors"))) == 2


def test_resume_continues_the_schedule_with_identical_soups(tmp_path):
    _, heldout = loaders()
    full_cb = BayesMergeCallback(heldout=heldout, budget=4)
    run(tmp_path / "full", full_cb, max_steps=40)

    first = BayesMergeCallback(heldout=heldout, budget=4)
    run(tmp_path / "part", first, max_steps=20)
    resumed = BayesMergeCallback(heldout=heldout, budget=4)
    ckpt = tmp_path / "part" / "ckpt" / "epoch=1-step=20.ckpt"
    state = torch.load(ckpt, weights_only=True)["callbacks"][resumed.state_key]
    assert state["previous_step"] == 20 and [h["step"] for h in state["history"]] == [20]
    run(tmp_path / "part", resumed, max_steps=40, ckpt_path=str(ckpt))

    assert resumed.history == full_cb.history  # same λ, values, steps: continued, not restarted
    for step in (20, 30, 40):
        a = tmp_path / "full" / "ckpt" / "soups" / f"soup-step={step}.safetensors"
        b = tmp_path / "part" / "ckpt" / "soups" / f"soup-step={step}.safetensors"
        assert_same_tensors(load_file(str(a)), load_file(str(b)))


def test_failed_round_warns_and_training_goes_on(tmp_path):
    calls = []

    def flaky(module, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("evaluation exploded")
        return torch.tensor(1.0), torch.tensor(1.0)

    _, heldout = loaders()
    cb = BayesMergeCallback(heldout=heldout, metric=flaky, higher_is_better=False, budget=3,
                            max_batches=1)
    with pytest.warns(UserWarning, match=r"merge round at step 20 failed and was skipped; "
                                         r"training continues unchanged. RuntimeError: "
                                         r"evaluation exploded"):
        _, m1 = run(tmp_path / "a", cb)
    _, m2 = run(tmp_path / "b")
    assert_same_tensors(m1.state_dict(), m2.state_dict())  # weights restored after the failure
    assert [h["step"] for h in cb.history] == [30]  # the next round ran normally
    assert not (tmp_path / "a" / "ckpt" / "soups" / "soup-step=20.json").exists()

    raising = BayesMergeCallback(heldout=heldout, metric=flaky, higher_is_better=False, budget=3,
                                 max_batches=1, on_error="raise")
    calls.clear()
    with pytest.raises(RuntimeError, match="evaluation exploded"):
        run(tmp_path / "c", raising)


def test_nan_metric_and_empty_heldout_write_nothing(tmp_path):
    def nan_metric(module, batch):
        return torch.tensor(float("nan")), torch.tensor(1.0)

    cb = BayesMergeCallback(heldout=loaders()[1], metric=nan_metric, higher_is_better=False)
    with pytest.warns(UserWarning, match=r"held-out metric is nan at lambda=0.5; no soup was written"):
        run(tmp_path / "nan", cb)
    assert not (tmp_path / "nan" / "ckpt" / "soups").exists()

    # found before training (pre-flight): one warning, rounds disabled
    with pytest.warns(UserWarning, match=r"heldout yields no batches; pass non-empty held-out "
                                         r"data; merge rounds are disabled for this run"):
        run(tmp_path / "empty", BayesMergeCallback(heldout=[]))
    assert not (tmp_path / "empty" / "ckpt" / "soups").exists()


def test_validation_loader_is_the_default_heldout(tmp_path):
    cb = BayesMergeCallback(budget=3, soup_dir=tmp_path / "my_soups")
    run(tmp_path, cb, val=True)
    explicit = BayesMergeCallback(heldout=loaders()[1], budget=3, soup_dir=tmp_path / "explicit")
    run(tmp_path / "x", explicit)
    assert cb.history == explicit.history
    assert (tmp_path / "my_soups" / "soup-step=30.safetensors").exists()

    with pytest.raises(ValueError, match=r"BayesMergeCallback needs held-out data: pass "
                                         r"heldout=<DataLoader>, or give the trainer a validation"):
        run(tmp_path / "none", BayesMergeCallback())


def test_every_n_saves_and_duplicate_saves_at_one_step(tmp_path):
    cb = BayesMergeCallback(heldout=loaders()[1], budget=3, every_n_saves=2)
    tr, m = run(tmp_path, cb, max_steps=40)
    assert [(h["previous_step"], h["step"]) for h in cb.history] == [(10, 20), (30, 40)]
    # a second file saved at the same step (e.g. last.ckpt) runs no second round
    tr.save_checkpoint(tmp_path / "extra.ckpt")
    assert len(cb.history) == 2
    assert torch.load(tmp_path / "extra.ckpt", weights_only=True)["callbacks"][cb.state_key][
        "history"] == cb.history


def test_logs_to_csv_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = BayesMergeCallback(heldout=loaders()[1], budget=3)
    csv_logger = CSVLogger(tmp_path, name="csv")
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    run(tmp_path, cb, logger=[csv_logger, tb_logger])
    rows = [r for r in csv.DictReader(open(Path(csv_logger.log_dir) / "metrics.csv"))
            if r.get("merge/lambda")]
    assert [int(r["step"]) for r in rows] == [20, 30]
    for r, h in zip(rows, cb.history):
        assert float(r["merge/lambda"]) == pytest.approx(h["lambda"])
        assert float(r["merge/soup"]) == pytest.approx(h["value_soup"])
        assert float(r["merge/latest"]) == pytest.approx(h["value_latest"])
        assert float(r["merge/previous"]) == pytest.approx(h["value_previous"])
    acc = EventAccumulator(tb_logger.log_dir)
    acc.Reload()
    for tag in ("merge/lambda", "merge/soup", "merge/latest", "merge/previous"):
        assert [e.step for e in acc.Scalars(tag)] == [20, 30]


def test_wandb_offline_run_holds_scalars_and_curves(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    from wandb_records import history_rows

    monkeypatch.setenv("WANDB_MODE", "offline")
    cb = BayesMergeCallback(heldout=loaders()[1], budget=3)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="merge-test")
    run(tmp_path, cb, logger=logger)
    logger.experiment.finish()
    rows = history_rows(tmp_path)
    scalars = [r for r in rows if "merge/lambda" in r]
    assert [r["trainer/global_step"] for r in scalars] == [20, 30]
    assert [r["merge/lambda"] for r in scalars] == [h["lambda"] for h in cb.history]
    assert [r["merge/soup"] for r in scalars] == [h["value_soup"] for h in cb.history]
    curves = [r for r in rows if "merge/curve_table" in r]
    assert [r["trainer/global_step"] for r in curves] == [20, 30]
    assert curves[-1]["merge/curve_table"]["_type"] == "table-file"
    assert curves[-1]["merge/curve_table"]["nrows"] == 3
    assert any("merge/lambda_history_table" in r for r in rows)


def test_missing_wandb_says_how_to_install(monkeypatch):
    import sys

    from merge_callback.tracking import require_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"install it with `pip install wandb`"):
        require_wandb()


def test_weights_only_checkpoints_are_reported(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = BayesMergeCallback(heldout=loaders()[1], budget=3)
    tr = L.Trainer(default_root_dir=str(tmp_path), max_steps=2, accelerator="cpu", logger=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1,
                                              save_weights_only=True), cb])
    with pytest.warns(UserWarning, match=r"save_weights_only=True\) saves without calling callbacks"):
        tr.fit(module(), loaders()[0])
    assert cb.history == []


def test_warm_start_evaluates_the_last_lambda_and_stop_tol_is_validated(tmp_path):
    cb = BayesMergeCallback(heldout=loaders()[1], budget=4, warm_start=True)
    run(tmp_path, cb, max_steps=40)
    soups = tmp_path / "ckpt" / "soups"
    for prev, cur in zip(cb.history, cb.history[1:]):
        info = json.loads((soups / f"soup-step={cur['step']}.json").read_text())
        third = info["observations"][2][0]
        assert third == pytest.approx(min(1.0, max(0.5, prev["lambda"])), abs=1e-12) or \
            prev["lambda"] in (0.5, 1.0)
    with pytest.raises(ValueError, match=r"stop_tol needs strategy='bayes', got strategy='grid'"):
        BayesMergeCallback(stop_tol=1e-4, strategy="grid")
    with pytest.raises(ValueError, match=r"warm_start must be True or False, got 1"):
        BayesMergeCallback(warm_start=1)
