"""The recipe's Lightning callbacks: :class:`StepProgressBar` (optimizer steps out of
``max_steps``), :class:`OutOfDomainCallback` (scores each merge round on an out-of-domain shard)
and :class:`KeepNewest` (prunes old checkpoint and soup files)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from merge_callback.engine import Snapshot, check_positive_int
from merge_callback.evaluate import HeldoutEvaluator
from merge_callback.lightning import BayesMergeCallback

__all__ = ["StepProgressBar", "OutOfDomainCallback", "KeepNewest", "step_of"]


class StepProgressBar(TQDMProgressBar):
    """A training progress bar that counts optimizer steps out of ``max_steps`` across epochs
    (Lightning's own bar counts batches per epoch and reads "Epoch 0/-2" under ``max_steps``).

    Args:
        description: the bar's label, e.g. ``"training"``.
        refresh_rate: redraw every this many steps; ``None``: every step on a terminal, every
            5 % of the run otherwise (a log file gets 20 lines, not one per step).

    Raises:
        ValueError: ``refresh_rate`` is not a positive integer or None.

    Example::

        trainer = L.Trainer(max_steps=800, callbacks=[StepProgressBar("training")])
    """

    def __init__(self, description: str = "training", refresh_rate: int | None = None):
        if refresh_rate is not None:
            check_positive_int("refresh_rate", refresh_rate)
        super().__init__(refresh_rate=refresh_rate or 1)
        self.description = description
        self._fixed_rate = refresh_rate

    @override
    def init_train_tqdm(self) -> Any:
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        trainer = self.trainer
        total = trainer.max_steps
        if self._fixed_rate is None:
            tty = bool(getattr(sys.stdout, "isatty", lambda: False)())
            self._refresh_rate = 1 if tty else max(1, total // 20)
        return Tqdm(desc=self.description, total=total, initial=trainer.global_step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, smoothing=0, unit="step",
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps "
                               "[{elapsed}<{remaining}, {rate_fmt}]{postfix}")

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run: no reset per epoch

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        n = trainer.global_step
        if bar is None or bar.disable or n == bar.n:
            return
        if n % self.refresh_rate == 0 or n >= (bar.total or 0):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # the bar is drawn at its refresh steps and closed at the end of training

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {("loss" if k == "train_loss" else k): v for k, v in items.items()}


class OutOfDomainCallback(Callback):
    """Score the latest weights and the soup of each merge round on an out-of-domain shard.

    Runs after a :class:`~merge_callback.lightning.BayesMergeCallback` (put it later in the
    trainer's callback list): when a checkpoint save at step ``s`` finished a merge round, it
    evaluates the live (latest) weights, loads ``soup_dir/soup-step=s.safetensors`` into the live
    module, evaluates it, and restores the live weights bitwise from a host copy. The shard never
    influences λ. Values are logged as ``merge/ood_latest`` and ``merge/ood_soup``, kept in
    :attr:`records` and saved in checkpoints (a resumed run keeps them).

    Args:
        merge_callback: the merge callback whose rounds are scored.
        ood: out-of-domain batches (a ``DataLoader``); ``None`` only reports each round.
        soup_dir: the merge callback's soup folder.
        max_batches: evaluate at most this many batches.
        echo: receives a one-line summary of each round on rank zero (default
            ``rank_zero_info``; ``None``: no line).

    Raises:
        ValueError: ``max_batches`` is not a positive integer or None.
    """

    def __init__(self, merge_callback: BayesMergeCallback, ood: Any,
                 soup_dir: str | os.PathLike, max_batches: int | None = None,
                 echo: Callable[[str], None] | None = rank_zero_info):
        super().__init__()
        check_positive_int("max_batches", max_batches, allow_none=True)
        self.echo = echo
        self.merge_callback = merge_callback
        self.ood = ood
        self.soup_dir = Path(soup_dir)
        self.max_batches = max_batches
        self.records: dict[int, dict[str, float]] = {}
        self._reported: set[int] = set()
        self._evaluator: HeldoutEvaluator | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.ood is None:
            return
        self._evaluator = HeldoutEvaluator(
            self.ood, self.merge_callback.metric, max_batches=self.max_batches,
            rank=trainer.global_rank, world_size=trainer.world_size,
            seed=self.merge_callback.config.seed,
            reduce_sum=lambda t: trainer.strategy.reduce(t, reduce_op="sum"),
            context=trainer.strategy.precision_plugin.forward_context)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        step = trainer.global_step
        history = self.merge_callback.history
        if not trainer.sanity_checking and history and history[-1]["step"] == step \
                and step not in self._reported:
            self._report_round(trainer, pl_module, history[-1])
        checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()

    def _report_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                      entry: Mapping[str, Any]) -> None:
        step = entry["step"]
        self._reported.add(step)
        metric = self.merge_callback.metric.name
        line = (f"  step {step}: λ = {entry['lambda']:.3f}, held-out {metric} latest "
                f"{entry['value_latest']:.4f}, soup {entry['value_soup']:.4f}")
        if self._evaluator is not None:
            trainer.strategy.barrier()  # rank zero has written the soup file
            self.records[step] = rec = self._score(pl_module, step)
            for logger in trainer.loggers:
                logger.log_metrics({"merge/ood_latest": rec["latest"],
                                    "merge/ood_soup": rec["soup"]}, step=step)
            line += f"; out-of-domain latest {rec['latest']:.4f}, soup {rec['soup']:.4f}"
        if self.echo is not None and trainer.is_global_zero:
            self.echo(line)

    def _score(self, pl_module: pl.LightningModule, step: int) -> dict[str, float]:
        from safetensors.torch import load_file

        assert self._evaluator is not None
        latest_value = float(self._evaluator(pl_module))
        soup = load_file(str(self.soup_dir / f"soup-step={step}.safetensors"))
        latest = Snapshot.capture(pl_module, step, pin_memory=False)  # read once, on the host
        try:
            pl_module.load_state_dict(soup, strict=True)
            soup_value = float(self._evaluator(pl_module))
        finally:
            pl_module.load_state_dict(latest.tensors, strict=True)  # bitwise restore
        return {"latest": latest_value, "soup": soup_value}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"records": {str(k): dict(v) for k, v in self.records.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = {int(k): dict(v) for k, v in state_dict.get("records", {}).items()}
        self._reported = set(self.records)


class KeepNewest(Callback):
    """Delete all but the newest ``keep`` files ``folder/<prefix>=<step>.<suffix>`` (rank zero).

    Runs at every batch end and at the end of training. Lightning runs checkpoint callbacks last,
    so between a save and the next batch end ``keep + 1`` files may exist; the newest file is never
    deleted. (``ModelCheckpoint(save_top_k=k)`` forgets the files of the run before a resume.)
    """

    def __init__(self, folder: Path, prefix: str, suffix: str, keep: int):
        super().__init__()
        self.folder, self.prefix, self.suffix, self.keep = folder, prefix, suffix, keep

    def prune(self) -> None:
        if not self.folder.is_dir():
            return
        files = [(step_of(p), p) for p in self.folder.glob(f"{self.prefix}=*{self.suffix}")]
        files = sorted(((s, p) for s, p in files if s is not None), key=lambda t: t[0])
        for _, path in files[:-self.keep]:
            path.unlink(missing_ok=True)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        if trainer.is_global_zero:
            self.prune()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.prune()


def step_of(path: Path) -> int | None:
    """The step ``N`` in a file name ``<prefix>=N.<suffix>``, or None if it has none."""
    try:
        return int(path.name.split("=", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return None
