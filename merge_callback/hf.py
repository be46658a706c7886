"""``BayesMergeTrainerCallback``: the checkpoint soup for the Hugging Face ``Trainer``.

transformers glue only: ``TrainerCallback`` events become calls on the engine's
:class:`~merge_callback.engine.MergeSchedule`; soups are written as Hugging Face model folders.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError("BayesMergeTrainerCallback needs transformers and accelerate; install them "
                      "with `pip install 'merge_callback[hf]'`") from _e

from merge_callback import dist
from merge_callback.engine import ChosenSoup, MergeSchedule, RoundResult, Runtime, ShardLocalView
from merge_callback.engine.schedule import ScheduleOwner
from merge_callback.engine.sharded import is_sharded
from merge_callback.engine.zero import without_inference_mode, zero_config_problem
from merge_callback.evaluate import HeldoutEvaluator, MetricFn
from merge_callback.io import atomic_write_bytes, save_safetensors_atomic
from merge_callback.io.soups import read_tensor_state, write_hf_soup_folder, write_tensor_state
from merge_callback.tracking import log_round_to_wandb_run, round_scalars

__all__ = ["BayesMergeTrainerCallback"]

_SOUP_NAME = re.compile(r"^soup-(\d+)(\.sharded)?$")
#: runs whose weights are sharded: each rank merges its own pieces, soups are sharded folders
SHARDED_MODES = ("zero3", "fsdp1", "fsdp2")
#: the schedule's snapshots and EMA tracks, beside the Trainer's files in ``checkpoint-<step>/``
TENSOR_STATE_FILE = "merge_callback_state.safetensors"


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose ``state_dict`` has the checkpoint's keys (no ``_orig_mod.`` prefix)."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def _parallel_mode(trainer: Trainer) -> str:
    """How the Trainer holds the weights: ``"zero3"`` (DeepSpeed ZeRO-3 partitions),
    ``"fsdp1"`` / ``"fsdp2"`` (FSDP shards), else ``"replicated"`` (one process, DDP, DeepSpeed
    ZeRO-1/2).

    Raises:
        ValueError: a DeepSpeed ZeRO-3 setting whose partitions cannot be merged in place.
    """
    state = trainer.accelerator.state
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = state.deepspeed_plugin
        config = getattr(getattr(plugin, "hf_ds_config", None), "config", None) or \
            getattr(plugin, "deepspeed_config", None) or {}
        zero = dict(config.get("zero_optimization") or {})
        zero.setdefault("stage", plugin.zero_stage)
        problem = zero_config_problem(zero)
        if problem is not None:
            raise ValueError(f"BayesMergeTrainerCallback cannot merge this DeepSpeed run: "
                             f"{problem}")
        return "zero3" if int(plugin.zero_stage) == 3 else "replicated"
    if getattr(trainer, "is_fsdp_enabled", False):
        return "fsdp2" if int(getattr(state.fsdp_plugin, "fsdp_version", 1) or 1) == 2 \
            else "fsdp1"
    return "replicated"


def _find_trainer(callback: TrainerCallback) -> Trainer | None:
    frame = inspect.currentframe()
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer) and any(cb is callback for cb in
                                                obj.callback_handler.callbacks):
                return obj
            frame = frame.f_back
    finally:
        del frame
    return None


class BayesMergeTrainerCallback(ScheduleOwner, TrainerCallback, ExportableState):
    """Merge every new ``checkpoint-<step>`` with the previous one, θ = λ·θ_t + (1−λ)·θ_{t−1}.

    At each checkpoint save of a ``transformers.Trainer`` (after the first) the callback searches
    λ ∈ [alpha, 1] with at most ``budget`` held-out evaluations (Bayesian optimisation by
    default) and writes the best soup as a Hugging Face folder
    ``<output_dir>/soups/soup-<step>/`` (``save_pretrained`` weights and config, the tokenizer
    or processor when the Trainer has one, and ``merge.json``), loadable with
    ``AutoModelForCausalLM.from_pretrained``. It logs ``merge/lambda``, ``merge/soup``,
    ``merge/latest`` and ``merge/previous`` through ``Trainer.log`` (every ``report_to``
    integration; W&B shows them as ``train/merge/...``) and, with W&B, the λ-vs-metric curve.
    Training is bitwise the same as without the callback: the soup is never swapped in.

    Under DeepSpeed ZeRO-1/2 it runs as under DDP. Under DeepSpeed ZeRO-3 and FSDP (weights
    sharded across ranks) every rank merges and evaluates only its own shards, and the soup is
    written by every rank as a sharded folder ``<soup_dir>/soup-<step>.sharded/`` with the
    sidecar ``soup-<step>.json`` instead of a ``save_pretrained`` folder; make a Hugging Face
    folder of it with ``python -m merge_callback.fsdp SRC OUT --hf-config checkpoint-<step>``.
    Only the pairwise soup (the default ``history``, ``snapshot_every``, ``ema_decays``) is
    supported there.

    Args:
        heldout: a ``Dataset`` (batched with the Trainer's data collator and
            ``per_device_eval_batch_size``), a ``DataLoader`` or any re-iterable of batches;
            ``None`` uses the Trainer's ``eval_dataset`` (the first one if it is a dict).
        metric, higher_is_better, budget, alpha, acq_func, strategy, max_batches,
        every_n_saves, seed, on_error, warm_start, stop_tol: as in
            :class:`merge_callback.BayesMergeCallback` (the same validation and meaning).
        soup_dir: where soup folders go; default ``<output_dir>/soups``.
        save_soups: write soup folders (False: only log λ and the curves).
        keep_last_soups: keep only the newest K soup folders (``None``: keep all).
        history, snapshot_every, ema_decays: the averaging families, exactly as in
            ``BayesMergeCallback``: geometric weights over the last ``history`` snapshots
            (taken every ``snapshot_every`` steps and at saves) and EMA tracks blended with the
            latest weights. Their host copies are stored in
            ``checkpoint-<step>/merge_callback_state.safetensors``, so a resumed run averages the
            same weights.
        averaging: ``"pairwise"`` (default) or ``"auto"``, as in ``BayesMergeCallback``; the
            snapshots go to ``<soup_dir>/.averaging/`` and the two EMA tracks travel in
            ``checkpoint-<step>/merge_callback_state.safetensors``.

    Raises:
        ValueError: for any invalid argument, naming what is allowed; at train begin, for
            averaging families with sharded weights, or ZeRO-3 with parameters on NVMe, ZeRO++
            hpZ or MiCS.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=heldout,
                          callbacks=[BayesMergeTrainerCallback()])
        trainer.train()
    """

    def __init__(self, heldout: Dataset | DataLoader | Iterable | None = None,
                 metric: str | MetricFn = "loss", *, higher_is_better: bool | None = None,
                 budget: int = 10, alpha: float = 0.5, acq_func: str = "gp_hedge",
                 strategy: str = "bayes", max_batches: int | None = None,
                 soup_dir: str | os.PathLike | None = None, every_n_saves: int = 1,
                 seed: int = 0, on_error: str = "warn", save_soups: bool = True,
                 keep_last_soups: int | None = None, warm_start: bool = False,
                 stop_tol: float | None = None, history: int = 2,
                 snapshot_every: int | None = None, ema_decays: Sequence[float] = (),
                 averaging: str = "pairwise"):
        if heldout is not None and (isinstance(heldout, (str, bytes)) or (
                not isinstance(heldout, (Dataset, IterableDataset)) and
                not hasattr(heldout, "__iter__"))):
            raise ValueError("heldout must be a Dataset, a DataLoader or an iterable of batches, "
                             "or None to use the Trainer's eval_dataset; got "
                             f"{type(heldout).__name__}")
        self._own_schedule(locals())
        self.keep_last_soups = keep_last_soups
        self.unsaved_args: list[str] = []
        self._metric_is_name = isinstance(metric, str)
        self._trainer_ref: Callable[[], Trainer | None] = lambda: None

    # ------------------------------------------------------------- public helpers
    @property
    def merge_state(self) -> dict[str, Any]:
        """The resumable state (plain Python)."""
        return self.schedule.state_dict()

    @merge_state.setter
    def merge_state(self, value: dict[str, Any]) -> None:
        self.schedule.load_state_dict(value)

    def bind(self, trainer: Trainer) -> BayesMergeTrainerCallback:
        """Attach the callback to ``trainer`` explicitly (it is otherwise found at train begin).

        Raises:
            TypeError: ``trainer`` is not a ``transformers.Trainer``.
        """
        if not isinstance(trainer, Trainer):
            raise TypeError(f"bind() needs a transformers.Trainer, got {type(trainer).__name__}")
        self._trainer_ref = weakref.ref(trainer)
        return self

    def state(self) -> dict[str, Any]:
        """``ExportableState``: JSON-only constructor arguments and the resumable state.

        A held-out ``Dataset``/``DataLoader`` and a callable metric cannot be stored; they are
        listed in ``attributes["unsaved_args"]``.
        """
        c, sch = self.config, self.schedule
        args: dict[str, Any] = {
            "budget": c.budget, "alpha": c.alpha, "acq_func": c.acq_func,
            "strategy": c.strategy, "max_batches": self.max_batches,
            "soup_dir": str(self.soup_dir) if self.soup_dir is not None else None,
            "every_n_saves": self.every_n_saves, "seed": c.seed, "on_error": self.on_error,
            "save_soups": self.save_soups, "keep_last_soups": self.keep_last_soups,
            "warm_start": c.warm_start, "stop_tol": c.stop_tol}
        if not sch.pairwise_only or sch.snapshot_every is not None:
            args.update(history=sch.history_size, snapshot_every=sch.snapshot_every,
                        ema_decays=list(sch.ema_decays))
        if sch.auto:
            args["averaging"] = sch.averaging
        unsaved = []
        if self._metric_is_name:
            args["metric"] = self.metric.name
        else:
            unsaved.append("metric")
        if self.heldout is not None:
            unsaved.append("heldout")
        return {"args": args, "attributes": {"merge_state": self.merge_state,
                                             "unsaved_args": unsaved}}

    # ------------------------------------------------------------- hooks
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.unsaved_args:
            raise ValueError(
                "restore_callback_states_from_checkpoint=True made the Trainer rebuild "
                "BayesMergeTrainerCallback from the JSON arguments in trainer_state.json, which "
                f"cannot hold {' and '.join(self.unsaved_args)}; leave "
                "restore_callback_states_from_checkpoint=False (the default): the callback "
                "restores its own state when training resumes")
        trainer = _find_trainer(self) or self._trainer_ref()
        if trainer is None:
            raise RuntimeError("BayesMergeTrainerCallback could not find the Trainer it belongs "
                               "to; call callback.bind(trainer) before trainer.train()")
        self._trainer_ref = weakref.ref(trainer)
        self._mode = _parallel_mode(trainer)
        if self._mode in SHARDED_MODES and not self.pairwise_only:
            raise ValueError(
                f"BayesMergeTrainerCallback(history > 2, ema_decays or snapshot_every) does not "
                f"support sharded weights ({self._mode}): only the pairwise merge of the last two "
                "checkpoint saves is built shard-locally. HINT: use the defaults history=2, "
                "ema_decays=(), snapshot_every=None (or DeepSpeed ZeRO stage 1 or 2, or DDP)")
        data, sharded = self._heldout_data(trainer, args)
        context = trainer.accelerator.autocast
        if self._mode == "zero3":  # see merge_callback.engine.zero.evaluation_context
            context = without_inference_mode(context)
        self._evaluator = HeldoutEvaluator(
            data, self.metric, max_batches=self.max_batches, rank=args.process_index,
            world_size=args.world_size, shard=not sharded, seed=self.config.seed,
            reduce_sum=dist.all_reduce_sum if dist.world_size() > 1 else None,
            context=context)
        # a sharded forward gathers parameters (collective): every rank runs as many forwards
        self._evaluator.balanced = self._mode in SHARDED_MODES
        module = self._target(model if model is not None else trainer.model)
        warning = self.schedule.preflight(
            module, data, self._soup_root(args) if self.save_soups and args.should_save else None,
            max_batches=self.max_batches, store_dir=self._soup_root(args) / ".averaging")
        if warning:
            self._warn(state, warning)
        self._restore(args, state, module)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._evaluator is not None:
            self.schedule.on_train_step(self._target(model), state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.schedule.release()  # give recycled page-locked memory back

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        step = state.global_step
        if self._evaluator is None or not self.schedule.is_new_save(step):
            return
        self.schedule.on_save(step, self._runtime(args, state, self._target(model),
                                                  processing_class))
        try:
            self._store_state_in_checkpoint(args, state, step)
        except Exception as e:  # noqa: BLE001 - reported, training goes on (on_error="warn")
            if self.on_error == "raise":
                raise
            self._warn(state, f"recording the merge state at step {step} failed; training "
                              f"continues unchanged. {type(e).__name__}: {e}")
        dist.barrier()

    # ------------------------------------------------------------- glue
    def _warn(self, state, message: str) -> None:
        if state.is_world_process_zero:
            warnings.warn(f"BayesMergeTrainerCallback: {message}", UserWarning, stacklevel=3)

    def _target(self, model: nn.Module) -> nn.Module:
        """The module that holds the weights and is evaluated: the root FSDP1 wrapper under FSDP1
        (the Trainer's ``model`` then), else the model without ``torch.compile``'s wrapper."""
        if getattr(self, "_mode", None) == "fsdp1":
            return model
        return _unwrap(model)

    def _runtime(self, args, state, target: nn.Module, processing_class) -> Runtime:
        """How a round evaluates, agrees, writes, logs and reports under this Trainer."""
        assert self._evaluator is not None
        sharded = is_sharded(target)

        def write(soup: ChosenSoup) -> None:
            if sharded:  # collective: every rank writes its own pieces
                self._write_sharded_soup(args, soup)
            elif args.should_save:
                self._write_soup(args, soup, processing_class)

        return Runtime(module=target, evaluate=self._evaluator,
                       view=ShardLocalView(target) if sharded else None,
                       broadcast=dist.broadcast_object,
                       write=write if self.save_soups else None,
                       log=lambda result, history: self._log(args, state, result),
                       warn=lambda msg: self._warn(state, msg))

    def _heldout_data(self, trainer: Trainer, args) -> tuple[Iterable, bool]:
        if self.heldout is None and getattr(self.metric, "scores_module", False):
            return (), False  # a module metric (lm-eval) reads no held-out batches
        data = self.heldout
        if data is None:
            data = trainer.eval_dataset
            if isinstance(data, dict):
                data = next(iter(data.values()), None)
            if data is None:
                raise ValueError("BayesMergeTrainerCallback needs held-out data: pass "
                                 "heldout=<Dataset or DataLoader>, or give the Trainer an "
                                 "eval_dataset")
        if isinstance(data, DataLoader):
            return data, isinstance(data.sampler, DistributedSampler)
        if isinstance(data, (Dataset, IterableDataset)) or hasattr(data, "column_names"):
            if hasattr(data, "column_names") and args.remove_unused_columns and \
                    hasattr(trainer, "_remove_unused_columns"):
                data = trainer._remove_unused_columns(data, description="held-out")
            return DataLoader(data, batch_size=args.per_device_eval_batch_size, shuffle=False,
                              collate_fn=trainer.data_collator), False
        return data, False

    def _restore(self, args, state, module: nn.Module) -> None:
        if state.global_step == 0:  # a new run, also when this instance ran before
            self.merge_state = MergeSchedule.initial_state()
            self.schedule.resume(module, 0)  # averaging="auto": clears a stale snapshot store
            return
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(stored, list):
            trainer = self._trainer_ref()
            same = [cb for cb in (trainer.callback_handler.callbacks if trainer else [])
                    if type(cb) is type(self)]
            index = next((i for i, cb in enumerate(same) if cb is self), 0)
            stored = stored[index] if index < len(stored) else None
        if isinstance(stored, dict) and "merge_state" in stored.get("attributes", {}):
            saved = stored["attributes"]["merge_state"]
            if saved != self.merge_state:
                self.merge_state = saved
        tensors = Path(args.output_dir) / f"checkpoint-{state.global_step}" / TENSOR_STATE_FILE
        if not self.schedule.pairwise_only and tensors.is_file():
            self.schedule.load_tensor_state(read_tensor_state(tensors))
        warning = self.schedule.resume(module, state.global_step)
        if warning:
            self._warn(state, warning)

    def _write_soup(self, args, soup: ChosenSoup, processing_class) -> Path:
        result = soup.result
        root = self._soup_root(args)
        info = result.to_json()
        info.update(checkpoint=f"checkpoint-{result.step}",
                    previous_checkpoint=f"checkpoint-{result.previous_step}")
        target = soup.target

        def save(tmp: Path) -> None:
            if hasattr(target, "save_pretrained"):
                with soup.loaded():
                    target.save_pretrained(str(tmp))
            else:
                save_safetensors_atomic(tmp / "model.safetensors", soup.tensors(),
                                        {"format": "pt"})

        folder = write_hf_soup_folder(root / f"soup-{result.step}", save, info, processing_class)
        if self.keep_last_soups is not None:
            self._prune_soups(root, result.step)
        return folder

    def _write_sharded_soup(self, args, soup: ChosenSoup) -> Path:
        """``soup-<step>.sharded/`` (every rank's pieces) and the sidecar ``soup-<step>.json``."""
        result = soup.result
        root = self._soup_root(args)
        folder = soup.write_files(root, f"soup-{result.step}", is_writer=args.should_save,
                                  extra_metadata={
                                      "checkpoint": f"checkpoint-{result.step}",
                                      "previous_checkpoint": f"checkpoint-{result.previous_step}"})
        if self.keep_last_soups is not None and dist.rank() == 0:
            self._prune_soups(root, result.step)
        return folder

    def _soup_root(self, args) -> Path:
        return self.soup_dir if self.soup_dir is not None else Path(args.output_dir) / "soups"

    def _prune_soups(self, root: Path, step: int) -> None:
        soups = []
        for p in root.iterdir():
            m = _SOUP_NAME.match(p.name)
            if m and p.is_dir() and int(m.group(1)) <= step:
                soups.append((int(m.group(1)), p))
        soups.sort()
        for _, p in soups[:-self.keep_last_soups]:
            if p.suffix == ".sharded":  # the sidecar first: it marks a complete soup
                p.with_suffix(".json").unlink(missing_ok=True)
            shutil.rmtree(p)

    def _log(self, args, state, result: RoundResult) -> None:
        trainer = self._trainer_ref()
        if trainer is not None:
            trainer.log(dict(round_scalars(result)))
        report_to = args.report_to or []
        if "wandb" in report_to and state.is_world_process_zero:
            import sys

            wandb = sys.modules.get("wandb")
            run = getattr(wandb, "run", None) if wandb is not None else None
            if run is not None:
                history = [(h["step"], h["lambda"]) for h in self.history]
                log_round_to_wandb_run(run, result, history, step_key="train/global_step")

    def _store_state_in_checkpoint(self, args, state, step: int) -> None:
        """Bring this callback's entry in ``checkpoint-<step>/trainer_state.json`` up to date.

        The Trainer writes that file before ``on_save``; only this callback's own entry under
        ``stateful_callbacks`` is replaced (atomically), nothing else in the folder is touched.
        """
        name = type(self).__name__
        mine = self.state()
        stored = state.stateful_callbacks.get(name) if state.stateful_callbacks else None
        if isinstance(stored, list):
            return  # several instances: the Trainer's own (one save late) entries are kept
        state.stateful_callbacks[name] = mine
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        tensors = self.schedule.tensor_state()
        if tensors is not None and folder.is_dir():
            write_tensor_state(folder / TENSOR_STATE_FILE, tensors)
        path = folder / "trainer_state.json"
        if not path.is_file():
            return
        data = json.loads(path.read_text())
        data.setdefault("stateful_callbacks", {})[name] = mine
        atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
