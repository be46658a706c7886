"""``BayesMergeCallback``: the pairwise checkpoint soup for PyTorch Lightning."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DistributedSampler
from typing_extensions import override

from merge_callback.engine import (MergeRoundError, RoundConfig, RoundResult, Snapshot, run_round,
                                   soup_state_dict, write_soup_files)
from merge_callback.evaluate import HeldoutEvaluator, MetricFn, resolve_metric
from merge_callback.tracking import log_round_to_loggers

__all__ = ["BayesMergeCallback"]

_STATE_VERSION = 1


class BayesMergeCallback(Callback):
    """Merge every new checkpoint with the previous one, θ = λ·θ_t + (1−λ)·θ_{t−1}.

    At each checkpoint save (after the first) the callback searches λ ∈ [alpha, 1] with at most
    ``budget`` held-out evaluations (Bayesian optimisation by default), writes the best soup to
    ``soup_dir/soup-step={step}.safetensors`` with a ``.json`` sidecar, and logs ``merge/lambda``,
    ``merge/soup``, ``merge/latest`` and ``merge/previous`` to every logger of the trainer. The soup
    is never swapped into training: the run is bitwise the same as without the callback.

    Args:
        heldout: held-out batches (a ``DataLoader`` or any re-iterable); ``None`` uses the trainer's
            first validation dataloader.
        metric: ``"loss"``, ``"perplexity"``, ``"accuracy"`` or ``callable(module, batch) ->
            (total, count)``.
        higher_is_better: direction of a callable metric (built-ins know theirs).
        budget: held-out evaluations per round (≥ 3), λ = alpha and λ = 1 included.
        alpha: lower bound of λ, in (0, 1).
        acq_func: ``"gp_hedge"``, ``"EI"``, ``"PI"`` or ``"LCB"``.
        strategy: ``"bayes"``, ``"grid"``, ``"random"`` or ``"greedy"``.
        max_batches: evaluate at most this many held-out batches per evaluation.
        soup_dir: where soups go; default ``<ModelCheckpoint dirpath>/soups``.
        every_n_saves: run a round at every n-th checkpoint save (the pair is always the two most
            recent saves).
        seed: seed of the search and of held-out iteration.
        on_error: ``"warn"`` (report a failed round, keep training) or ``"raise"``.
        save_soups: write soup files (set False to only log λ and the curves).

    Raises:
        ValueError: for any invalid argument, naming what is allowed.

    Example::

        trainer = L.Trainer(callbacks=[ModelCheckpoint(every_n_train_steps=500, save_top_k=-1),
                                       BayesMergeCallback(heldout=heldout_loader)])
    """

    def __init__(self, heldout: Iterable | None = None, metric: str | MetricFn = "loss", *,
                 higher_is_better: bool | None = None, budget: int = 10, alpha: float = 0.5,
                 acq_func: str = "gp_hedge", strategy: str = "bayes",
                 max_batches: int | None = None, soup_dir: str | os.PathLike | None = None,
                 every_n_saves: int = 1, seed: int = 0, on_error: str = "warn",
                 save_soups: bool = True):
        super().__init__()
        self.config = RoundConfig(alpha=alpha, budget=budget, strategy=strategy,
                                  acq_func=acq_func, seed=seed)
        self.metric = resolve_metric(metric, higher_is_better)
        if heldout is not None and not hasattr(heldout, "__iter__"):
            raise ValueError("heldout must be a DataLoader or an iterable of batches, or None to "
                             f"use the trainer's validation dataloader; got {type(heldout).__name__}")
        if max_batches is not None and (isinstance(max_batches, bool) or
                                        not isinstance(max_batches, int) or max_batches < 1):
            raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
        if isinstance(every_n_saves, bool) or not isinstance(every_n_saves, int) \
                or every_n_saves < 1:
            raise ValueError(f"every_n_saves must be a positive integer, got {every_n_saves!r}")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        self.heldout = heldout
        self.max_batches = max_batches
        self.soup_dir = Path(soup_dir) if soup_dir is not None else None
        self.every_n_saves = every_n_saves
        self.on_error = on_error
        self.save_soups = bool(save_soups)
        self._evaluator: HeldoutEvaluator | None = None
        self._previous: Snapshot | None = None
        self._state = self._initial_state()

    @staticmethod
    def _initial_state() -> dict[str, Any]:
        return {"version": _STATE_VERSION, "saves": 0, "last_save_step": None,
                "previous_step": None, "previous_value": None, "history": []}

    @property
    @override
    def state_key(self) -> str:
        c = self.config
        return self._generate_state_key(metric=self.metric.name, alpha=c.alpha, budget=c.budget,
                                        strategy=c.strategy)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per finished round: step, lambda, value_soup, value_latest, value_previous."""
        return self._state["history"]

    # ---------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "save_weights_only", False):
                rank_zero_warn("BayesMergeCallback runs when a checkpoint is saved, but "
                               f"{type(cb).__name__}(save_weights_only=True) saves without calling "
                               "callbacks, so its saves start no merge round. HINT: use "
                               "save_weights_only=False")
        data = self.heldout if self.heldout is not None else _validation_loader(trainer)
        sharded = isinstance(getattr(data, "sampler", None), DistributedSampler)
        self._evaluator = HeldoutEvaluator(
            data, self.metric, max_batches=self.max_batches, rank=trainer.global_rank,
            world_size=trainer.world_size, shard=not sharded, seed=self.config.seed,
            reduce_sum=lambda t: trainer.strategy.reduce(t, reduce_op="sum"),
            context=trainer.strategy.precision_plugin.forward_context)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        prev = self._state["previous_step"]
        if self._previous is None and prev is not None:
            if prev == trainer.global_step:  # resumed from the checkpoint saved at that step
                self._previous = Snapshot.capture(pl_module, prev)
            else:
                rank_zero_warn(f"BayesMergeCallback: resumed at step {trainer.global_step} but its "
                               f"saved state refers to step {prev}; merging restarts with the "
                               "next checkpoint save")
                self._state["previous_step"] = self._state["previous_value"] = None

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or self._evaluator is None:
            return
        if step != self._state["last_save_step"]:  # several files at one step: one round
            self._on_new_save(trainer, pl_module, step)
        checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self._state, "history": [dict(h) for h in self._state["history"]]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        fresh = self._initial_state()
        self._state = {k: state_dict.get(k, v) for k, v in fresh.items()}
        self._previous = None

    # ---------------------------------------------------------------- work
    def _on_new_save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        state = self._state
        state["saves"] += 1
        state["last_save_step"] = step
        latest = Snapshot.capture(pl_module, step)
        if self._previous is not None and state["saves"] % self.every_n_saves == 0:
            value_latest = self._guarded_round(trainer, pl_module, latest)
        else:
            value_latest = None
        self._previous = latest
        state["previous_step"] = step
        state["previous_value"] = value_latest

    def _guarded_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                       latest: Snapshot) -> float | None:
        try:
            result = self._round(trainer, pl_module, latest)
        except Exception as e:  # noqa: BLE001 - reported, training goes on (on_error="warn")
            if self.on_error == "raise":
                raise
            rank_zero_warn(f"BayesMergeCallback: the merge round at step {latest.step} failed and "
                           f"was skipped; training continues unchanged. {type(e).__name__}: {e}")
            return None
        return result.value_latest

    def _round(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
               latest: Snapshot) -> RoundResult:
        assert self._previous is not None and self._evaluator is not None
        prev_value = self._state["previous_value"]
        if self._state["previous_step"] != self._previous.step:
            prev_value = None
        result = run_round(pl_module, self._previous, latest, self._evaluator, self.config,
                           metric=self.metric.name, higher_is_better=self.metric.higher_is_better,
                           value_previous=prev_value)
        # every rank computed the same reduced values; take rank zero's decision to be certain
        result = trainer.strategy.broadcast(result, src=0)
        if self.save_soups and trainer.is_global_zero:
            soup = soup_state_dict(self._previous, latest, result.lam)
            write_soup_files(self._resolve_soup_dir(trainer), f"soup-step={result.step}", soup,
                             result)
        entry = {"step": result.step, "lambda": result.lam, "value_soup": result.value_soup,
                 "value_latest": result.value_latest, "value_previous": result.value_previous,
                 "previous_step": result.previous_step}
        self._state["history"].append(entry)
        lam_history = [(h["step"], h["lambda"]) for h in self._state["history"]]
        log_round_to_loggers(trainer.loggers, result, lam_history)
        return result

    def _resolve_soup_dir(self, trainer: pl.Trainer) -> Path:
        if self.soup_dir is not None:
            return self.soup_dir
        ckpt = trainer.checkpoint_callback
        dirpath = getattr(ckpt, "dirpath", None)
        if dirpath:
            return Path(dirpath) / "soups"
        return Path(trainer.default_root_dir) / "soups"


def _validation_loader(trainer: pl.Trainer) -> Any:
    """The user's first validation dataloader (from fit(), the module or the datamodule).

    At setup Lightning has not built ``trainer.val_dataloaders`` yet, so the loader comes from the
    validation data source; it is not yet split across ranks (the evaluator shards it).
    """
    loaders = trainer.val_dataloaders
    if loaders is None:
        source = trainer.fit_loop.epoch_loop.val_loop._data_source
        loaders = source.dataloader() if source.is_defined() else None
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    if loaders is None:
        raise ValueError("BayesMergeCallback needs held-out data: pass heldout=<DataLoader>, or "
                         "give the trainer a validation dataloader (val_dataloaders= in fit(), "
                         "LightningModule.val_dataloader or a datamodule)")
    return loaders
