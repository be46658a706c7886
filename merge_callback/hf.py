"""``BayesMergeTrainerCallback``: the pairwise checkpoint soup for the Hugging Face ``Trainer``."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import shutil
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError("BayesMergeTrainerCallback needs transformers and accelerate; install them "
                      "with `pip install 'merge_callback[hf]'`") from _e

from merge_callback.engine import (RoundConfig, RoundResult, Snapshot, _live_targets, run_round,
                                   soup_state_dict, validate_callback_args)
from merge_callback.evaluate import HeldoutEvaluator, MetricFn, resolve_metric
from merge_callback.io import (atomic_directory, atomic_write_bytes, atomic_write_json,
                               save_safetensors_atomic)
from merge_callback.merge import lerp_tensors_
from merge_callback.tracking import log_round_to_wandb_run, round_scalars

__all__ = ["BayesMergeTrainerCallback", "MergeSchedule", "validate_callback_args", "soup_in_place"]

_STATE_VERSION = 1
_SOUP_NAME = re.compile(r"^soup-(\d+)$")


# --------------------------------------------------------------------------- framework-free parts
class MergeSchedule:
    """Which checkpoint saves run a round, the previous snapshot, and the resumable state.

    The state is plain Python (JSON-ready): ``saves``, ``last_save_step``, ``previous_step``,
    ``previous_value`` (the previous weights' metric when the last round measured it) and
    ``history`` (one dict per finished round).

    Args:
        every_n_saves: run a round at every n-th save; the pair is always the two latest saves.
    """

    def __init__(self, every_n_saves: int = 1):
        self.every_n_saves = every_n_saves
        self.previous: Snapshot | None = None
        self.spare: Snapshot | None = None  # page-locked buffers to reuse (CUDA), see on_save
        self.state = self.initial_state()

    @staticmethod
    def initial_state() -> dict[str, Any]:
        return {"version": _STATE_VERSION, "saves": 0, "last_save_step": None,
                "previous_step": None, "previous_value": None, "history": []}

    def state_dict(self) -> dict[str, Any]:
        return {**self.state, "history": [dict(h) for h in self.state["history"]]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fresh = self.initial_state()
        self.state = {k: state.get(k, v) for k, v in fresh.items()}
        self.state["history"] = [dict(h) for h in self.state["history"]]
        self.previous = None

    def resume(self, module: nn.Module, step: int) -> bool:
        """Take the previous snapshot from ``module`` when training resumes at the saved step.

        Returns False (and forgets the previous checkpoint) when the saved state refers to
        another step, so that merging restarts with the next save.
        """
        prev = self.state["previous_step"]
        if prev is None or (self.previous is not None and self.previous.step == step == prev):
            return True
        if prev == step:
            self.previous = Snapshot.capture(module, step)
            return True
        self.previous = None
        self.state["previous_step"] = self.state["previous_value"] = None
        return False

    def is_new_save(self, step: int) -> bool:
        return step != self.state["last_save_step"]

    def on_save(self, module: nn.Module, step: int,
                round_fn: Callable[[Snapshot, Snapshot, float | None], RoundResult]
                ) -> RoundResult | None:
        """Snapshot ``module`` at ``step``; run ``round_fn(previous, latest, value_previous)`` when
        this save is due. The schedule advances also when ``round_fn`` raises."""
        st = self.state
        st["saves"] += 1
        st["last_save_step"] = step
        spare, self.spare = self.spare, None
        latest = Snapshot.capture(module, step, reuse=spare)
        previous, self.previous = self.previous, latest
        value_previous = st["previous_value"]
        if previous is None or st["previous_step"] != previous.step:
            value_previous = None
        st["previous_step"], st["previous_value"] = step, None
        if previous is None or st["saves"] % self.every_n_saves:
            self._drop(previous)
            return None
        try:
            result = round_fn(previous, latest, value_previous)
        finally:
            self._drop(previous)
        st["previous_value"] = result.value_latest
        st["history"].append({"step": result.step, "lambda": result.lam,
                              "value_soup": result.value_soup,
                              "value_latest": result.value_latest,
                              "value_previous": result.value_previous,
                              "previous_step": result.previous_step})
        return result

    def _drop(self, snap: Snapshot | None) -> None:
        # page-locking host memory is slow: keep one dropped snapshot's buffers for the next save
        if snap is not None and snap.page_locked:
            self.spare = snap


@contextlib.contextmanager
def soup_in_place(module: nn.Module, previous: Snapshot, latest: Snapshot,
                  lam: float) -> Iterator[nn.Module]:
    """Hold ``lerp(previous, latest, lam)`` in ``module``'s own tensors inside the block.

    ``module`` must hold ``latest`` on entry; it holds ``latest`` again, bitwise, on exit (also on
    an exception). Uses no memory beyond the two snapshots.
    """
    targets = _live_targets(module, latest.tensors)
    live = [t for _, t in targets]
    prev_t = [previous.tensors[k] for k, _ in targets]
    latest_t = [latest.tensors[k] for k, _ in targets]
    try:
        lerp_tensors_(live, prev_t, latest_t, lam)
        yield module
    finally:
        lerp_tensors_(live, prev_t, latest_t, 1.0)


# --------------------------------------------------------------------------- distributed helpers
def _dist_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def _broadcast(obj: Any) -> Any:
    if _dist_world() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if _dist_world() > 1:
        torch.distributed.barrier()


def _chmod_like_mkdir(path: Path) -> None:
    """Give a ``mkdtemp`` folder (mode 0700) the mode ``mkdir`` would (0777 minus the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose ``state_dict`` has the checkpoint's keys (no ``_orig_mod.`` prefix)."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


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


# --------------------------------------------------------------------------- the callback
class BayesMergeTrainerCallback(TrainerCallback, ExportableState):
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

    Args:
        heldout: a ``Dataset`` (batched with the Trainer's data collator and
            ``per_device_eval_batch_size``), a ``DataLoader`` or any re-iterable of batches;
            ``None`` uses the Trainer's ``eval_dataset`` (the first one if it is a dict).
        metric: ``"loss"``, ``"perplexity"``, ``"accuracy"`` or ``callable(module, batch) ->
            (total, count)``.
        higher_is_better: direction of a callable metric (built-ins know theirs).
        budget: held-out evaluations per round (≥ 3), λ = alpha and λ = 1 included.
        alpha: lower bound of λ, in (0, 1).
        acq_func: ``"gp_hedge"``, ``"EI"``, ``"PI"`` or ``"LCB"``.
        strategy: ``"bayes"``, ``"grid"``, ``"random"`` or ``"greedy"``.
        max_batches: evaluate at most this many held-out batches per evaluation.
        soup_dir: where soup folders go; default ``<output_dir>/soups``.
        every_n_saves: run a round at every n-th checkpoint save.
        seed: seed of the search and of held-out iteration.
        on_error: ``"warn"`` (report a failed round, keep training) or ``"raise"``.
        save_soups: write soup folders (False: only log λ and the curves).
        keep_last_soups: keep only the newest K soup folders (``None``: keep all).
        warm_start: also evaluate the last round's λ right after α and 1.
        stop_tol: end a round early once the Gaussian process expects no λ to improve the metric
            by ``stop_tol`` or more (``strategy="bayes"`` only).

    The averaging families of ``BayesMergeCallback`` (``history``, ``snapshot_every``,
    ``ema_decays``) are not available in this adapter yet.

    Raises:
        ValueError: for any invalid argument, naming what is allowed.

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
                 stop_tol: float | None = None):
        self.config = RoundConfig(alpha=alpha, budget=budget, strategy=strategy,
                                  acq_func=acq_func, seed=seed, warm_start=warm_start,
                                  stop_tol=stop_tol)
        self.metric = resolve_metric(metric, higher_is_better)
        if heldout is not None and (isinstance(heldout, (str, bytes)) or (
                not isinstance(heldout, (Dataset, IterableDataset)) and
                not hasattr(heldout, "__iter__"))):
            raise ValueError("heldout must be a Dataset, a DataLoader or an iterable of batches, "
                             "or None to use the Trainer's eval_dataset; got "
                             f"{type(heldout).__name__}")
        validate_callback_args(max_batches=max_batches, every_n_saves=every_n_saves,
                               on_error=on_error, keep_last_soups=keep_last_soups)
        self.heldout = heldout
        self.max_batches = max_batches
        self.soup_dir = Path(soup_dir) if soup_dir is not None else None
        self.on_error = on_error
        self.save_soups = bool(save_soups)
        self.keep_last_soups = keep_last_soups
        self.schedule = MergeSchedule(every_n_saves)
        self.unsaved_args: list[str] = []
        self._metric_is_name = isinstance(metric, str)
        self._trainer_ref: Callable[[], Trainer | None] = lambda: None
        self._evaluator: HeldoutEvaluator | None = None

    # ------------------------------------------------------------- public helpers
    @property
    def every_n_saves(self) -> int:
        return self.schedule.every_n_saves

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per finished round: step, lambda, value_soup, value_latest, value_previous,
        previous_step."""
        return self.schedule.state["history"]

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
        c = self.config
        args: dict[str, Any] = {
            "budget": c.budget, "alpha": c.alpha, "acq_func": c.acq_func,
            "strategy": c.strategy, "max_batches": self.max_batches,
            "soup_dir": str(self.soup_dir) if self.soup_dir is not None else None,
            "every_n_saves": self.every_n_saves, "seed": c.seed, "on_error": self.on_error,
            "save_soups": self.save_soups, "keep_last_soups": self.keep_last_soups,
            "warm_start": c.warm_start, "stop_tol": c.stop_tol}
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
        if getattr(trainer, "is_deepspeed_enabled", False) or \
                getattr(trainer, "is_fsdp_enabled", False):
            raise ValueError("BayesMergeTrainerCallback needs the full weights on every process; "
                             "DeepSpeed and FSDP (sharded weights) are not supported")
        data, sharded = self._heldout_data(trainer, args)
        world = args.world_size
        self._evaluator = HeldoutEvaluator(
            data, self.metric, max_batches=self.max_batches, rank=args.process_index,
            world_size=world, shard=not sharded, seed=self.config.seed,
            reduce_sum=_all_reduce_sum if _dist_world() > 1 else None,
            context=trainer.accelerator.autocast)
        self._restore(state, _unwrap(model if model is not None else trainer.model))

    def on_train_end(self, args, state, control, **kwargs):
        self.schedule.spare = None  # give recycled page-locked memory back

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        step = state.global_step
        if self._evaluator is None or not self.schedule.is_new_save(step):
            return
        target = _unwrap(model)

        def round_fn(previous: Snapshot, latest: Snapshot, value_previous: float | None):
            return self._round(args, target, processing_class, previous, latest, value_previous)

        result = None
        try:
            result = self.schedule.on_save(target, step, round_fn)
        except Exception as e:  # noqa: BLE001 - reported, training goes on (on_error="warn")
            self._report(state, e, f"the merge round at step {step} failed and was skipped")
        try:
            if result is not None:
                self._log(args, state, result)
            self._store_state_in_checkpoint(args, state, step)
        except Exception as e:  # noqa: BLE001
            self._report(state, e, f"recording the merge round at step {step} failed")
        _barrier()

    def _report(self, state, error: Exception, what: str) -> None:
        if self.on_error == "raise":
            raise error
        if state.is_world_process_zero:
            warnings.warn(f"BayesMergeTrainerCallback: {what}; training continues unchanged. "
                          f"{type(error).__name__}: {error}", UserWarning, stacklevel=3)

    # ------------------------------------------------------------- work
    def _heldout_data(self, trainer: Trainer, args) -> tuple[Iterable, bool]:
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

    def _restore(self, state, module: nn.Module) -> None:
        if state.global_step == 0:  # a new run, also when this instance ran before
            self.merge_state = MergeSchedule.initial_state()
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
        prev = self.schedule.state["previous_step"]
        if not self.schedule.resume(module, state.global_step) and state.is_world_process_zero:
            warnings.warn(f"BayesMergeTrainerCallback: training starts at step "
                          f"{state.global_step} but the saved merge state refers to step {prev}; "
                          "merging restarts with the next checkpoint save", UserWarning,
                          stacklevel=2)

    def _round(self, args, target: nn.Module, processing_class, previous: Snapshot,
               latest: Snapshot, value_previous: float | None) -> RoundResult:
        assert self._evaluator is not None
        last = self.history[-1:]
        result = run_round(target, previous, latest, self._evaluator, self.config,
                           metric=self.metric.name, higher_is_better=self.metric.higher_is_better,
                           value_previous=value_previous,
                           initial=tuple(h["lambda"] for h in last))
        result = _broadcast(result)  # every rank reduced the same values; rank zero decides
        if self.save_soups and args.should_save:
            self._write_soup(args, target, processing_class, previous, latest, result)
        return result

    def _soup_root(self, args) -> Path:
        return self.soup_dir if self.soup_dir is not None else Path(args.output_dir) / "soups"

    def _write_soup(self, args, target: nn.Module, processing_class, previous: Snapshot,
                    latest: Snapshot, result: RoundResult) -> Path:
        root = self._soup_root(args)
        folder = root / f"soup-{result.step}"
        info = result.to_json()
        info.update(checkpoint=f"checkpoint-{result.step}",
                    previous_checkpoint=f"checkpoint-{result.previous_step}")
        with atomic_directory(folder) as tmp:
            _chmod_like_mkdir(Path(tmp))
            if hasattr(target, "save_pretrained"):
                with soup_in_place(target, previous, latest, result.lam):
                    target.save_pretrained(str(tmp))
            else:
                save_safetensors_atomic(Path(tmp) / "model.safetensors",
                                        soup_state_dict(previous, latest, result.lam,
                                                        module=target),
                                        {"format": "pt"})
            if processing_class is not None and hasattr(processing_class, "save_pretrained"):
                processing_class.save_pretrained(str(tmp))
            atomic_write_json(Path(tmp) / "merge.json", info)
        if self.keep_last_soups is not None:
            self._prune_soups(root, result.step)
        return folder

    def _prune_soups(self, root: Path, step: int) -> None:
        soups = []
        for p in root.iterdir():
            m = _SOUP_NAME.match(p.name)
            if m and p.is_dir() and int(m.group(1)) <= step:
                soups.append((int(m.group(1)), p))
        soups.sort()
        for _, p in soups[:-self.keep_last_soups]:
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
        path = Path(args.output_dir) / f"checkpoint-{step}" / "trainer_state.json"
        if not path.is_file():
            return
        data = json.loads(path.read_text())
        data.setdefault("stateful_callbacks", {})[name] = mine
        atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
