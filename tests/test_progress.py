import io
import re
import sys

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar

from lightning_helpers import loaders, module
from merge_callback import BayesMergeCallback
from merge_callback.progress import RoundProgress


def test_bar_counts_evaluations_and_tracks_the_best_lower_value():
    out = io.StringIO()
    p = RoundProgress(file=out, leave=True)
    p.start(3, "merge step=20", metric="loss")
    for lam, value in [(0.5, 4.0), (1.0, 3.5), (0.8, 3.8)]:
        p(lam, value)
    assert p.best == 3.5 and p.done == 3
    p.close()
    text = out.getvalue()
    final = text.split("\r")[-1]
    assert re.search(r"merge step=20: 100%.*\| 3/3 .*λ=0\.8000 loss=3\.8 best=3\.5", final), final
    assert "1/3" in text and "λ=0.5000 loss=4 best=4" in text


def test_higher_is_better_and_explicit_best():
    out = io.StringIO()
    p = RoundProgress(file=out, leave=True)
    p.start(2, "round", metric="accuracy", higher_is_better=True)
    p(0.5, 0.25)
    p(1.0, 0.75)
    assert p.best == 0.75
    p.update(0.7, 0.5, best=0.9)
    assert p.best == 0.9
    p.close()
    assert "accuracy=0.5 best=0.9" in out.getvalue()


def test_lambda_outside_the_range_is_shown_but_not_best():
    out = io.StringIO()
    p = RoundProgress(file=out, leave=True)
    p.start(3, "round", metric="loss", lam_range=(0.5, 1.0))
    p(0.0, 1.0)  # the previous checkpoint's score, evaluated outside the search range
    assert p.best is None
    p(0.5, 3.0)
    p(1.0, 2.0)
    assert p.best == 2.0
    p.close()
    assert "λ=0.0000 loss=1 best=-" in out.getvalue()


def test_disabled_bar_writes_nothing_but_keeps_count():
    out = io.StringIO()
    with RoundProgress(disable=True, file=out) as p:
        p.start(2)
        p(0.5, 2.0)
        p(1.0, 1.0)
        assert p.best == 1.0 and p.done == 2
    assert out.getvalue() == ""


@pytest.mark.parametrize("total", [0, -1, 2.0, True, None])
def test_start_rejects_a_bad_total(total):
    with pytest.raises(ValueError, match=r"total must be a positive integer, got"):
        RoundProgress(disable=True).start(total)


def test_close_without_start_and_twice_is_harmless():
    p = RoundProgress(file=io.StringIO())
    p.close()
    p.start(1)
    p.close()
    p.close()


class ProgressMergeCallback(BayesMergeCallback):
    """The real BayesMergeCallback, recording the RoundProgress each of its rounds shows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []
        self.rich_descriptions = []

    def _runtime(self, trainer, pl_module):
        rt = super()._runtime(trainer, pl_module)
        make = rt.progress
        cb = self

        def recording(*args):
            p = make(*args)
            cb.seen.append(p)
            call = p.__call__

            class Recording(type(p)):
                def __call__(self, lam, value):
                    call(lam, value)
                    bar = trainer.progress_bar_callback
                    if isinstance(bar, RichProgressBar) and bar.progress is not None:
                        cb.rich_descriptions.append([t.description for t in bar.progress.tasks])

            p.__class__ = Recording
            return p

        if make is not None:
            rt.progress = recording
        return rt


def _fit(tmp_path, *bars, enable_progress_bar=False):
    """A 20-step run with checkpoints at steps 10 and 20: one merge round, at step 20."""
    train, heldout = loaders()
    cb = ProgressMergeCallback(heldout=heldout, budget=3, save_soups=False)
    tr = L.Trainer(default_root_dir=str(tmp_path), max_steps=20, accelerator="cpu", devices=1,
                   logger=False, enable_progress_bar=enable_progress_bar,
                   enable_model_summary=False, num_sanity_val_steps=0,
                   callbacks=[ModelCheckpoint(dirpath=f"{tmp_path}/ckpt", every_n_train_steps=10,
                                              save_top_k=-1), cb, *bars])
    tr.fit(module(), train)
    return cb, tr


def _as_terminal(monkeypatch, *streams):
    """Make the captured streams report a terminal, as an interactive run's would."""
    for stream in streams:
        monkeypatch.setattr(stream, "isatty", lambda: True, raising=False)


def test_round_bar_beside_lightnings_tqdm_bar(tmp_path, capsys, monkeypatch):
    _as_terminal(monkeypatch, sys.stdout)
    cb, tr = _fit(tmp_path, TQDMProgressBar(), enable_progress_bar=True)
    out = capsys.readouterr().out
    assert "Epoch 1" in out  # Lightning's own bar, on the same stream
    (p,) = cb.seen
    assert not p.disable and p.done == 4  # budget 3 + lambda=0 once (previous value unknown)
    assert re.search(r"merge step=20: 100%.*\| 4/4 .*best=", out)
    assert p._bar is None  # closed


def test_round_bar_is_silent_when_lightnings_tqdm_bar_writes_to_a_log(tmp_path, capsys):
    # stdout captured to a file-like object, as in `python train.py > log`: Lightning's bar still
    # prints, the round bar (a second line that moves the cursor) does not
    cb, tr = _fit(tmp_path, TQDMProgressBar(), enable_progress_bar=True)
    out = capsys.readouterr().out
    assert "Epoch 1" in out
    (p,) = cb.seen
    assert p.disable and p.done == 4
    assert "merge step" not in out and "\x1b[A" not in out


def test_round_bar_is_silent_without_a_progress_bar(tmp_path, capsys):
    cb, tr = _fit(tmp_path)
    assert tr.progress_bar_callback is None
    captured = capsys.readouterr()
    (p,) = cb.seen
    assert p.disable and p.done == 4
    assert "merge step" not in captured.out + captured.err


def test_round_bar_is_silent_when_lightnings_bar_is_disabled(tmp_path, capsys):
    bar = TQDMProgressBar(refresh_rate=0)
    cb, tr = _fit(tmp_path, bar, enable_progress_bar=True)
    captured = capsys.readouterr()
    assert cb.seen[0].disable
    assert "merge step" not in captured.out + captured.err


def test_round_is_a_task_of_lightnings_rich_bar(tmp_path):
    cb, tr = _fit(tmp_path, RichProgressBar(), enable_progress_bar=True)
    (p,) = cb.seen
    assert p.rich_progress is tr.progress_bar_callback.progress and p.done == 4
    during = cb.rich_descriptions
    assert len(during) == 4
    assert any(d.startswith("merge step=20 λ=") and "best=" in d for d in during[-1])
    remaining = [t.description for t in tr.progress_bar_callback.progress.tasks]
    assert not any(d.startswith("merge step") for d in remaining)


def test_lightnings_default_bar_gets_a_round_bar(tmp_path, monkeypatch):
    _as_terminal(monkeypatch, sys.stdout, sys.stderr)
    cb, tr = _fit(tmp_path, enable_progress_bar=True)
    (p,) = cb.seen
    bar = tr.progress_bar_callback
    assert isinstance(bar, (RichProgressBar, TQDMProgressBar)) and not p.disable
    assert (p.rich_progress is not None) == isinstance(bar, RichProgressBar)
