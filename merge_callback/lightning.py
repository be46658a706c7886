"""``BayesMergeCallback``: the pairwise checkpoint soup for PyTorch Lightning."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DistributedSampler
from typing_extensions import override

from merge_callback.averaging import (EmaTrack, Family, combine, ema_family, geometric_family,
                                      pairwise_family, run_averaging_round)
from merge_callback.engine import (RoundConfig, RoundResult, Snapshot, check_positive_int,
                                   soup_state_dict, validate_callback_args, write_soup_files)
from merge_callback.evaluate import HeldoutEvaluator, MetricFn, resolve_metric
from merge_callback.fsdp import (BalancedHeldoutEvaluator, ShardedSnapshot, capture_snapshot,
                                 check_strategy_supported, run_any_round, write_any_soup)
from merge_callback.progress import RoundProgress
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
        history: weights kept on the host, the latest included. ``2`` (default) is the paper's
            pairwise soup of the last two saves. With ``history = k > 2`` a round also searches
            geometric weights ``w_i ∝ γ^(k−1−i)`` over the last ``k`` snapshots (γ = 0: latest
            only; γ = 1: their uniform average).
        snapshot_every: also keep an in-memory snapshot every this many steps (host memory, no
            disk writes); ``None`` snapshots only at checkpoint saves.
        ema_decays: per-step decays of host-side EMA tracks (updated every ``snapshot_every``
            steps with decay ``d ** snapshot_every``); each is offered as a candidate and blended
            with the latest weights, ``lerp(ema, latest, λ)``, λ ∈ [0, 1].
        warm_start: also evaluate the last round's λ right after α and 1 (pairwise rounds).
        stop_tol: end a round before the budget is spent once the Gaussian process expects no λ
            to improve the metric by ``stop_tol`` or more (``strategy="bayes"`` only).

    Memory on the host: ``history`` copies of the weights at most (``history − 1`` between
    saves when ``snapshot_every`` is None), plus the previous save's weights when newer snapshots
    have pushed them out of those (``history · snapshot_every`` < the save interval), plus one per
    EMA decay. The candidate families share one
    budget: the latest weights, then one far-end point per family, then a 1-D search inside the
    family that did best. With snapshots or EMA tracks the checkpoint also stores them, so a
    resumed run averages the same weights.

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
                 save_soups: bool = True, history: int = 2, snapshot_every: int | None = None,
                 ema_decays: Sequence[float] = (), warm_start: bool = False,
                 stop_tol: float | None = None):
        super().__init__()
        self.config = RoundConfig(alpha=alpha, budget=budget, strategy=strategy,
                                  acq_func=acq_func, seed=seed, warm_start=warm_start,
                                  stop_tol=stop_tol)
        self.metric = resolve_metric(metric, higher_is_better)
        if heldout is not None and (not hasattr(heldout, "__iter__")
                                    or isinstance(heldout, (str, bytes))):
            raise ValueError("heldout must be a DataLoader or an iterable of batches, or None to "
                             f"use the trainer's validation dataloader; got {type(heldout).__name__}")
        validate_callback_args(max_batches=max_batches, every_n_saves=every_n_saves,
                               on_error=on_error)
        if isinstance(history, bool) or not isinstance(history, int) or history < 2:
            raise ValueError(f"history must be an integer >= 2 (weights kept, the latest included), "
                             f"got {history!r}")
        check_positive_int("snapshot_every", snapshot_every, allow_none=True)
        decays = tuple(ema_decays)
        if any(isinstance(d, bool) or not isinstance(d, (int, float)) or not (0.0 < d < 1.0)
               for d in decays) or len(set(decays)) != len(decays):
            raise ValueError(f"ema_decays must be distinct numbers in (0, 1), got {list(decays)}")
        if decays and snapshot_every is None:
            raise ValueError("ema_decays need snapshot_every (the EMA tracks are updated every "
                             "snapshot_every steps)")
        self.heldout = heldout
        self.max_batches = max_batches
        self.soup_dir = Path(soup_dir) if soup_dir is not None else None
        self.every_n_saves = every_n_saves
        self.on_error = on_error
        self.save_soups = bool(save_soups)
        self.history_size = history
        self.snapshot_every = snapshot_every
        self.ema_decays = decays
        self._evaluator: HeldoutEvaluator | None = None
        self._ring: list[Snapshot] = []  # recent weights, oldest first
        self._last_save: Snapshot | None = None  # the weights of the previous checkpoint save
        self._spare: Snapshot | None = None  # page-locked buffers of a dropped snapshot (CUDA)
        self._emas = [EmaTrack(d, snapshot_every or 1) for d in decays]
        self._restored_tensors: dict[str, Any] | None = None
        self._state = self._initial_state()

    @property
    def pairwise_only(self) -> bool:
        """True for the paper's method: the last two saves, λ ∈ [alpha, 1]."""
        return self.history_size == 2 and not self.ema_decays

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
        self._mode = check_strategy_supported(trainer, pairwise_only=self.pairwise_only)
        data = self.heldout if self.heldout is not None else _validation_loader(trainer)
        sharded = isinstance(getattr(data, "sampler", None), DistributedSampler)
        # under FSDP2 every rank must run the same number of forward passes (parameter gathers)
        evaluator_cls = BalancedHeldoutEvaluator if self._mode == "fsdp2" else HeldoutEvaluator
        self._evaluator = evaluator_cls(
            data, self.metric, max_batches=self.max_batches, rank=trainer.global_rank,
            world_size=trainer.world_size, shard=not sharded, seed=self.config.seed,
            reduce_sum=lambda t: trainer.strategy.reduce(t, reduce_op="sum"),
            context=trainer.strategy.precision_plugin.forward_context)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        prev = self._state["previous_step"]
        if self._ring or prev is None:
            return
        if prev != trainer.global_step:
            rank_zero_warn(f"BayesMergeCallback: resumed at step {trainer.global_step} but its "
                           f"saved state refers to step {prev}; merging restarts with the next "
                           "checkpoint save")
            self._state["previous_step"] = self._state["previous_value"] = None
            return
        # resumed from the checkpoint saved at that step: its weights are the live weights
        latest = capture_snapshot(pl_module, prev)
        stored = self._restored_tensors or {}
        self._ring = [Snapshot(t, s) for s, t in stored.get("ring", [])] + [latest]
        self._last_save = latest
        for track in self._emas:
            ema = stored.get("ema", {}).get(track.name)
            if ema is not None:
                track.snapshot = Snapshot(ema["tensors"], ema["step"])
        self._restored_tensors = None

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.snapshot_every or step % self.snapshot_every or step == 0:
            return
        if self._ring and self._ring[-1].step == step:
            return  # gradient accumulation: several batches end at one optimizer step
        snap = self._capture(pl_module, step)
        self._push(snap)
        for track in self._emas:
            track.update(pl_module, step, snap)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or self._evaluator is None:
            return
        if step != self._state["last_save_step"]:  # several files at one step: one round
            self._on_new_save(trainer, pl_module, step)
        checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()
        if not self.pairwise_only:
            # the older snapshots and EMA tracks, so that a resumed run averages the same weights
            checkpoint[self._tensors_key] = {
                "ring": [(s.step, s.tensors) for s in self._ring[:-1]],
                "ema": {t.name: {"step": t.snapshot.step, "tensors": t.snapshot.tensors}
                        for t in self._emas if t.snapshot is not None}}

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._spare = None  # give recycled page-locked memory back when fit ends

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._restored_tensors = checkpoint.get(self._tensors_key)

    @property
    def _tensors_key(self) -> str:
        return f"merge_callback_tensors:{self.state_key}"

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self._state, "history": [dict(h) for h in self._state["history"]]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        fresh = self._initial_state()
        self._state = {k: state_dict.get(k, v) for k, v in fresh.items()}
        self._ring = []
        self._last_save = None

    # ---------------------------------------------------------------- work
    def _capture(self, pl_module: pl.LightningModule, step: int) -> Snapshot:
        spare, self._spare = self._spare, None
        return capture_snapshot(pl_module, step, reuse=spare)

    def _push(self, snap: Snapshot) -> None:
        self._ring.append(snap)
        dropped = self._ring[:-self.history_size]
        del self._ring[:-self.history_size]
        self._drop(dropped)

    def _drop(self, dropped: list[Snapshot]) -> None:
        """Keep the page-locked buffers of one snapshot nothing refers to any more, for the next
        capture (page-locking is slow; pageable host memory is simply freed)."""
        in_use = {id(s) for s in self._ring} | {id(self._last_save)}
        in_use |= {id(t.snapshot) for t in self._emas}
        for snap in dropped:
            if id(snap) not in in_use and snap.page_locked:
                self._spare = snap

    def _on_new_save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        state = self._state
        state["saves"] += 1
        state["last_save_step"] = step
        if not (self._ring and self._ring[-1].step == step):
            self._push(self._capture(pl_module, step))
        value_latest = None
        if len(self._ring) >= 2 and state["saves"] % self.every_n_saves == 0:
            value_latest = self._guarded_round(trainer, pl_module)
        # between rounds keep history - 1 copies: the next save brings the latest
        dropped = self._ring[:-(self.history_size - 1)] + [self._last_save]
        del self._ring[:-(self.history_size - 1)]
        self._last_save = self._ring[-1]
        self._drop([s for s in dropped if s is not None])
        state["previous_step"] = step
        state["previous_value"] = value_latest

    def _guarded_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        try:
            result = self._round(trainer, pl_module)
        except Exception as e:  # noqa: BLE001 - reported, training goes on (on_error="warn")
            if self.on_error == "raise":
                raise
            rank_zero_warn(f"BayesMergeCallback: the merge round at step {self._ring[-1].step} "
                           "failed and was skipped; training continues unchanged. "
                           f"{type(e).__name__}: {e}")
            return None
        return result.value_latest

    def _round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> RoundResult:
        assert self._evaluator is not None
        previous, latest = self._previous_save(), self._ring[-1]
        prev_value = self._state["previous_value"]
        if self._state["previous_step"] != previous.step:
            prev_value = None
        if self.pairwise_only:
            last = self._state["history"][-1:]
            progress = RoundProgress.for_trainer(trainer)
            progress.start(self.config.budget + (prev_value is None), f"merge step={latest.step}",
                           metric=self.metric.name, higher_is_better=self.metric.higher_is_better,
                           lam_range=(self.config.alpha, 1.0))
            try:
                result = run_any_round(pl_module, previous, latest, self._evaluator, self.config,
                                       metric=self.metric.name,
                                       higher_is_better=self.metric.higher_is_better,
                                       value_previous=prev_value,
                                       initial=tuple(h["lambda"] for h in last),
                                       on_evaluation=progress)
            finally:
                progress.close()
            sources = families = None
        else:
            sources, families = self._families()
            c = self.config
            result = run_averaging_round(
                pl_module, sources, "latest", families, self._evaluator, budget=c.budget,
                strategy=c.strategy, acq_func=c.acq_func, seed=(c.seed + latest.step) % 2**31,
                metric=self.metric.name, higher_is_better=self.metric.higher_is_better,
                alpha=c.alpha, value_previous=prev_value, previous_name="previous")
        # every rank computed the same reduced values; take rank zero's decision to be certain
        result = trainer.strategy.broadcast(result, src=0)
        stem = f"soup-step={result.step}"
        if self.save_soups and isinstance(latest, ShardedSnapshot):
            write_any_soup(self._resolve_soup_dir(trainer), stem, previous, latest, result,
                           is_global_zero=trainer.is_global_zero,
                           module=pl_module)  # collective: every rank
        elif self.save_soups and trainer.is_global_zero:
            if families is None:
                # history=2: the previous weights are dropped after this round, so the soup is
                # built inside them (no third copy of the weights on the host)
                soup = soup_state_dict(previous, latest, result.lam,
                                       in_place=self.history_size == 2, module=pl_module)
            else:
                fam = next(f for f in families if f.name == result.extras["family"])
                soup = combine(fam, result.extras["param"],
                               {n: s.tensors for n, s in sources.items()}, latest.tensors,
                               module=pl_module)
            write_soup_files(self._resolve_soup_dir(trainer), stem, soup, result)
        entry = {"step": result.step, "lambda": result.lam, "value_soup": result.value_soup,
                 "value_latest": result.value_latest, "value_previous": result.value_previous,
                 "previous_step": result.previous_step}
        if families is not None:
            entry.update(family=result.extras["family"], param=result.extras["param"])
        self._state["history"].append(entry)
        lam_history = [(h["step"], h["lambda"]) for h in self._state["history"]]
        log_round_to_loggers(trainer.loggers, result, lam_history)
        return result

    def _previous_save(self) -> Snapshot:
        """The previous checkpoint save's weights (kept even when newer snapshots pushed them out
        of the ring), else the most recent older snapshot."""
        last = self._last_save
        if last is not None and last.step == self._state["previous_step"] \
                and last.step < self._ring[-1].step:
            return last
        return self._ring[-2]

    def _families(self) -> tuple[dict[str, Snapshot], list[Family]]:
        ring = self._ring
        sources: dict[str, Snapshot] = {"latest": ring[-1], "previous": self._previous_save()}
        families = [pairwise_family("previous", "latest", self.config.alpha)]
        if len(ring) >= 3:
            names = [f"step{s.step}" for s in ring[:-1]]
            sources.update(zip(names, ring[:-1]))
            families.append(geometric_family([*names, "latest"]))
        for track in self._emas:
            if track.snapshot is not None:
                sources[track.name] = track.snapshot
                families.append(ema_family(track.name, "latest"))
        return sources, families

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
