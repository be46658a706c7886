"""``BayesMergeCallback``: the checkpoint soup for PyTorch Lightning.

Lightning glue only: hooks translate Lightning's events into calls on the engine's
:class:`~merge_callback.engine.MergeSchedule`; the strategy check, the logger loop and the progress
bar that fits the trainer's own live here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DistributedSampler
from typing_extensions import override

from merge_callback.engine import RoundResult, Runtime, ShardLocalView
from merge_callback.engine.schedule import ChosenSoup, ScheduleOwner
from merge_callback.engine.sharded import is_sharded
from merge_callback.engine.zero import without_inference_mode, zero_config_problem
from merge_callback.evaluate import HeldoutEvaluator, MetricFn
from merge_callback.progress import RoundProgress
from merge_callback.tracking import log_round_to_wandb_run, round_scalars

__all__ = ["BayesMergeCallback", "UnsupportedStrategyError", "check_strategy_supported"]


class BayesMergeCallback(ScheduleOwner, Callback):
    """Merge every new checkpoint with the previous one, θ = λ·θ_t + (1−λ)·θ_{t−1}.

    At each checkpoint save (after the first) the callback searches λ ∈ [alpha, 1] with at most
    ``budget`` held-out evaluations (Bayesian optimisation by default), writes the best soup to
    ``soup_dir/soup-step={step}.safetensors`` with a ``.json`` sidecar, and logs ``merge/lambda``,
    ``merge/soup``, ``merge/latest`` and ``merge/previous`` to every logger of the trainer. The soup
    is never swapped into training: the run is bitwise the same as without the callback.

    Strategies: single device, DDP, DeepSpeed (ZeRO-1/2 as DDP), and, shard-locally (each rank
    merges and evaluates its own shards; soups are written by every rank as a sharded folder
    ``soup-step={step}.sharded/``, see ``python -m merge_callback.fsdp``), DeepSpeed ZeRO-3,
    ``FSDPStrategy`` (FSDP1) and ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2); see
    :func:`check_strategy_supported`.

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
        averaging: ``"pairwise"`` (default: the paper's soup, extended by ``history``,
            ``snapshot_every`` and ``ema_decays`` as given) or ``"auto"``, the recommended
            anytime averaging (docs/averaging.md): two power-function EMA tracks on the host
            updated every ``snapshot_every`` steps (default 10), snapshots of them and of the
            weights written at every save to ``<soup_dir>/.averaging/``, and rounds of 12
            held-out evaluations choosing among the latest weights, a post-hoc EMA
            (σ_rel ∈ [0.02, 0.28]), a 1−√ window over the last W ∈ [2, 16] saves, the pairwise
            soup λ ∈ [alpha, 1] and a blend of the best of these with the latest weights
            (``budget`` does not apply). Not with ``history > 2`` or ``ema_decays``; under DDP
            rank 0 writes the snapshot folder every rank reads (a shared file system); refused
            under sharded strategies.

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
                 stop_tol: float | None = None, averaging: str = "pairwise"):
        super().__init__()
        if heldout is not None and (not hasattr(heldout, "__iter__")
                                    or isinstance(heldout, (str, bytes))):
            raise ValueError("heldout must be a DataLoader or an iterable of batches, or None to "
                             f"use the trainer's validation dataloader; got {type(heldout).__name__}")
        self._own_schedule(locals())

    @property
    @override
    def state_key(self) -> str:
        c = self.config
        return self._generate_state_key(metric=self.metric.name, alpha=c.alpha, budget=c.budget,
                                        strategy=c.strategy)

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
        if self.heldout is None and getattr(self.metric, "scores_module", False):
            data = ()  # a module metric (lm-eval) reads no held-out batches
        else:
            data = self.heldout if self.heldout is not None else _validation_loader(trainer)
        sharded = isinstance(getattr(data, "sampler", None), DistributedSampler)
        context = trainer.strategy.precision_plugin.forward_context
        if self._mode == "zero3":
            context = without_inference_mode(context)
        self._evaluator = HeldoutEvaluator(
            data, self.metric, max_batches=self.max_batches, rank=trainer.global_rank,
            world_size=trainer.world_size, shard=not sharded, seed=self.config.seed,
            reduce_sum=lambda t: trainer.strategy.reduce(t, reduce_op="sum"), context=context)
        # with sharded weights a forward gathers parameters (a collective): every rank must run
        # the same number of forward passes
        self._evaluator.balanced = self._mode in SHARDED_MODES

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._evaluator is not None
        target = self._target(trainer, pl_module)
        for warning in (self.schedule.preflight(
                target, self._evaluator.data,
                self._resolve_soup_dir(trainer) if self.save_soups else None,
                max_batches=self.max_batches,
                store_dir=self._resolve_soup_dir(trainer) / ".averaging"),
                self.schedule.resume(target, trainer.global_step)):
            if warning:
                rank_zero_warn(f"BayesMergeCallback: {warning}")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.schedule.on_train_step(self._target(trainer, pl_module), trainer.global_step)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or self._evaluator is None:
            return
        if self.schedule.is_new_save(step):  # several files at one step: one round
            self.schedule.on_save(step, self._runtime(trainer, pl_module))
        checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()
        tensors = self.schedule.tensor_state()
        if tensors is not None:
            checkpoint[self._tensors_key] = tensors

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.schedule.release()  # give recycled page-locked memory back when fit ends

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self.schedule.load_tensor_state(checkpoint.get(self._tensors_key))

    @property
    def _tensors_key(self) -> str:
        return f"merge_callback_tensors:{self.state_key}"

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict)

    # ---------------------------------------------------------------- glue
    def _target(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """The module that holds the weights and is called for evaluation: under FSDP1 the root
        ``FullyShardedDataParallel`` wrapper (``trainer.strategy.model``: its forward gathers
        the root's own parameters, and its local view has the LightningModule's keys);
        otherwise the LightningModule (DeepSpeed's ZeRO-3 hooks sit on its submodules)."""
        if getattr(self, "_mode", None) == "fsdp1":
            return trainer.strategy.model
        return pl_module

    def _runtime(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Runtime:
        """How a round evaluates, agrees, writes, logs and reports under this trainer."""
        assert self._evaluator is not None

        def write(soup: ChosenSoup) -> None:
            soup.write_files(self._resolve_soup_dir(trainer), f"soup-step={soup.result.step}",
                             is_writer=trainer.is_global_zero)

        def log(result: RoundResult, history: list[dict]) -> None:
            log_round_to_loggers(trainer.loggers, result,
                                 [(h["step"], h["lambda"]) for h in history])

        def progress(total: int, desc: str, lam_range: tuple[float, float] | None):
            bar = _round_progress(trainer)
            bar.start(total, desc, metric=self.metric.name,
                      higher_is_better=self.metric.higher_is_better, lam_range=lam_range)
            return bar

        target = self._target(trainer, pl_module)
        return Runtime(module=target, evaluate=self._evaluator,
                       view=ShardLocalView(target) if is_sharded(target) else None,
                       broadcast=lambda obj: trainer.strategy.broadcast(obj, src=0),
                       write=write if self.save_soups else None, log=log,
                       warn=lambda msg: rank_zero_warn(f"BayesMergeCallback: {msg}"),
                       progress=progress)

    def _resolve_soup_dir(self, trainer: pl.Trainer) -> Path:
        if self.soup_dir is not None:
            return self.soup_dir
        ckpt = trainer.checkpoint_callback
        dirpath = getattr(ckpt, "dirpath", None)
        if dirpath:
            return Path(dirpath) / "soups"
        return Path(trainer.default_root_dir) / "soups"


def log_round_to_loggers(loggers: Iterable[Any], result: RoundResult,
                         history: Sequence[tuple[int, float]]) -> None:
    """Send the round's scalars to every Lightning logger at the checkpoint's step, and the curve
    to W&B loggers. Lightning loggers log on rank zero only."""
    from lightning.pytorch.utilities import rank_zero_only

    scalars = round_scalars(result)
    for logger in loggers:
        logger.log_metrics(scalars, step=result.step)
        if type(logger).__name__ == "WandbLogger" and rank_zero_only.rank == 0:
            log_round_to_wandb_run(logger.experiment, result, history)


def _round_progress(trainer: pl.Trainer) -> RoundProgress:
    """A round bar that fits the trainer's own: silent when the trainer has no enabled progress
    bar (``enable_progress_bar=False``, a disabled bar, or any rank but zero), a task inside the
    ``RichProgressBar``'s live display when that is the trainer's bar, otherwise a ``tqdm`` bar on
    the stream ``TQDMProgressBar`` writes to, placed on a free line below it and cleared when the
    round ends. A second ``tqdm`` line needs a terminal (it moves the cursor), so when that stream
    is a file or a pipe (a log) the round draws nothing; its result is logged either way."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    bar = trainer.progress_bar_callback
    if bar is None or not trainer.is_global_zero or not getattr(bar, "is_enabled", True):
        return RoundProgress(disable=True)
    if isinstance(bar, RichProgressBar):
        if bar.progress is not None:
            return RoundProgress(rich_progress=bar.progress)
        return RoundProgress(disable=True)
    stream = sys.stdout if isinstance(bar, TQDMProgressBar) else sys.stderr
    if not _is_terminal(stream):
        return RoundProgress(disable=True)
    return RoundProgress(file=stream)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


# --------------------------------------------------------------------------- strategies
_SUPPORTED = ("single-device strategies, DDPStrategy, DeepSpeedStrategy (ZeRO stages 1-3), "
              "FSDPStrategy (FSDP1, FULL_SHARD / SHARD_GRAD_OP / NO_SHARD), and "
              "ModelParallelStrategy with tensor_parallel_size=1 and fully_shard (FSDP2) applied "
              "in LightningModule.configure_model")
_FSDP2_HINT = ("HINT: use Trainer(strategy=ModelParallelStrategy(data_parallel_size=N, "
               "tensor_parallel_size=1)) and call torch.distributed.fsdp.fully_shard(module, "
               "mesh=self.device_mesh['data_parallel']) in LightningModule.configure_model")
#: strategy modes whose weights are sharded: rounds merge each rank's pieces, pairwise only
SHARDED_MODES = ("fsdp2", "zero3", "fsdp1")


class UnsupportedStrategyError(NotImplementedError):
    """The trainer's strategy is one the merge callback cannot run under."""


def _tensor_parallel_size(strategy: Any) -> int:
    try:
        return int(strategy.device_mesh["tensor_parallel"].size())
    except (RuntimeError, KeyError, AttributeError):
        pass
    tp = getattr(strategy, "_tensor_parallel_size", 1)
    if tp == "auto":  # Lightning resolves "auto" to the number of processes per node
        return int(getattr(strategy, "num_processes", 1) or 1)
    return int(tp)


def _deepspeed_mode(strategy: Any, prefix: str) -> str:
    """``"deepspeed"`` (ZeRO-1/2: full weights on every rank) or ``"zero3"``; raises for ZeRO-3
    settings whose partitions cannot be merged in place."""
    zero = (getattr(strategy, "config", None) or {}).get("zero_optimization") or {}
    problem = zero_config_problem(zero)
    if problem is not None:
        raise UnsupportedStrategyError(f"{prefix}: {problem}. Supported: {_SUPPORTED}")
    return "zero3" if int(zero.get("stage", 0) or 0) >= 3 else "deepspeed"


def check_strategy_supported(trainer_or_strategy: Any, *, pairwise_only: bool = True) -> str:
    """Return how the callback runs under the trainer's strategy; raise if it cannot.

    Returns:
        ``"single"``, ``"ddp"``, ``"deepspeed"`` (ZeRO-1/2: full weights on every rank, as under
        DDP), ``"zero3"`` (DeepSpeed ZeRO-3: each rank merges its parameter partitions),
        ``"fsdp1"`` (``FSDPStrategy``: each rank merges its flat-parameter shards) or
        ``"fsdp2"`` (``ModelParallelStrategy`` with ``fully_shard``: each rank merges its
        ``DTensor`` shards).

    Args:
        trainer_or_strategy: a Lightning ``Trainer`` (its ``strategy`` is checked) or a strategy.
        pairwise_only: the callback merges only the last two saves (no ``history > 2``,
            ``ema_decays`` or ``snapshot_every``); sharded models support nothing else.

    Raises:
        UnsupportedStrategyError: XLA strategies; ``ModelParallelStrategy`` with tensor
            parallelism; ``FSDPStrategy`` with hybrid sharding; DeepSpeed ZeRO-3 with parameters
            on NVMe, ZeRO++ hpZ or MiCS; ``pairwise_only=False`` under ZeRO-3, FSDP1 or FSDP2; an
            unknown strategy. The message names the strategy, what is supported and how to
            switch.
    """
    from lightning.pytorch.strategies import (DDPStrategy, DeepSpeedStrategy, FSDPStrategy,
                                              ModelParallelStrategy, SingleDeviceStrategy,
                                              SingleDeviceXLAStrategy, XLAStrategy)

    strategy = getattr(trainer_or_strategy, "strategy", trainer_or_strategy)
    name = type(strategy).__name__
    prefix = f"BayesMergeCallback does not support {name}"
    mode = None
    if isinstance(strategy, (XLAStrategy, SingleDeviceXLAStrategy)):
        raise UnsupportedStrategyError(f"{prefix} (XLA devices). Supported: {_SUPPORTED}")
    if isinstance(strategy, FSDPStrategy):
        sharding = getattr(getattr(strategy, "sharding_strategy", None), "name", "FULL_SHARD")
        if "HYBRID" in str(sharding):
            raise UnsupportedStrategyError(
                f"{prefix} with sharding_strategy={sharding}: parameters are sharded within "
                "groups smaller than all ranks. HINT: use sharding_strategy='FULL_SHARD' or "
                f"'SHARD_GRAD_OP'. Supported: {_SUPPORTED}")
        mode = "fsdp1"
    elif isinstance(strategy, DeepSpeedStrategy):
        mode = _deepspeed_mode(strategy, prefix)
    elif isinstance(strategy, ModelParallelStrategy):
        tp = _tensor_parallel_size(strategy)
        if tp != 1:
            raise UnsupportedStrategyError(
                f"{prefix} with tensor_parallel_size={tp}: held-out batches are split across "
                "data-parallel ranks only. Supported: " + _SUPPORTED + ". " + _FSDP2_HINT)
        mode = "fsdp2"
    elif isinstance(strategy, DDPStrategy):
        return "ddp"
    elif isinstance(strategy, SingleDeviceStrategy):
        return "single"
    if mode is None:
        raise UnsupportedStrategyError(f"{prefix}. Supported: {_SUPPORTED}")
    if mode in SHARDED_MODES and not pairwise_only:
        what = {"fsdp2": "FSDP2", "zero3": "DeepSpeed ZeRO-3", "fsdp1": "FSDP1"}[mode]
        raise UnsupportedStrategyError(
            f"BayesMergeCallback(history > 2, ema_decays or snapshot_every) does not support "
            f"{name}: with sharded ({what}) weights only the pairwise merge of the last two "
            "checkpoint saves is built shard-locally. HINT: use the defaults history=2, "
            "ema_decays=(), snapshot_every=None (or DeepSpeed ZeRO stage 1 or 2, DDP)")
    return mode


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
