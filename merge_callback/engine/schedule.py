"""Everything between framework events and a round: the framework-free merge schedule.

:class:`MergeSchedule` decides which weights are kept on the host (the ring of recent snapshots,
the previous checkpoint save, EMA tracks, a recycled page-locked buffer), when a round runs, what
the round's sources and families are, and keeps the resumable state (plain Python, plus tensors
for the snapshots and tracks) and the error policy. The Lightning and Hugging Face adapters only
translate their events into calls on it and supply a :class:`Runtime` (how to evaluate, agree
across ranks, write, log and warn in that framework).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn

import torch

from merge_callback import dist
from merge_callback.engine.families import (AutoPlan, EmaTrack, Family, Mix, StoredWeights,
                                            combine_into_, ema_family, geometric_family,
                                            live_targets, mix_scratch, pairwise_family)
from merge_callback.engine.options import (AUTO, check_bool, validate_averaging_args,
                                           validate_callback_args)
from merge_callback.engine.round import (RoundConfig, RoundResult, build_mix_soup, build_soup,
                                         load_mix, run_round)
from merge_callback.engine.snapshot import (ShardedSnapshot, Snapshot, capture_nbytes,
                                             capture_snapshot)
from merge_callback.evaluate import (Metric, accuracy_metric, loss_metric, preserved_rng,
                                     resolve_metric)
from merge_callback.io import remove_stale_temporaries
from merge_callback.preflight import (PreflightError, check_heldout, check_output_dir,
                                      format_bytes, model_limits)
from merge_callback.io.soups import write_sharded_soup, write_soup_files

__all__ = ["STATE_VERSION", "Runtime", "ChosenSoup", "MergeSchedule", "ScheduleOwner"]

STATE_VERSION = 1


@dataclass
class Runtime:
    """What a framework supplies for one event.

    Attributes:
        module: the live module the evaluator calls (holds the latest weights).
        evaluate: ``module -> metric value`` on the held-out data (all ranks together).
        view: the module whose ``state_dict()`` is merged into (a shard view for sharded models);
            default ``module``.
        broadcast: rank zero's copy of a picklable object (the round's decision).
        write: ``write(soup)`` writes the chosen soup (a :class:`ChosenSoup`), or ``None`` to
            write nothing; called on every rank.
        log: ``log(result, history)`` after each round.
        warn: reports a problem (on rank zero).
        progress: ``progress(total, desc, family_range) -> callable(param, value)`` with a
            ``close()``, or ``None``.
    """

    module: nn.Module
    evaluate: Callable[[nn.Module], float]
    view: nn.Module | None = None
    broadcast: Callable[[Any], Any] = lambda obj: obj
    write: Callable[[ChosenSoup], Any] | None = None
    log: Callable[[RoundResult, list[dict]], None] | None = None
    warn: Callable[[str], None] = lambda msg: None
    progress: Callable[..., Any] | None = None

    @property
    def target(self) -> nn.Module:
        """Where candidates are written: ``view`` if given, else ``module``."""
        return self.module if self.view is None else self.view


@dataclass
class ChosenSoup:
    """The soup a round chose, ready to be written in any format.

    Attributes:
        result: the round's decision.
        family: the chosen family; ``result.param`` is its parameter.
        sources: name -> snapshot, as in the round.
        target: the module (or shard view) the round scored in; ``None`` builds the soup from
            the host snapshots alone.
        in_place_ok: the previous checkpoint's snapshot is dropped after this round, so the soup
            may be built inside it (no further host copy of the weights).
        mix: the chosen candidate of an ``averaging="auto"`` round (``family`` is then
            ``None``): stored weights on disk and in host memory, built by the same fp32 path
            as when it was scored.
    """

    result: RoundResult
    family: Family | None
    sources: Mapping[str, Snapshot]
    target: nn.Module | None = None
    in_place_ok: bool = False
    mix: Mix | None = None

    @property
    def latest(self) -> Snapshot:
        return self.sources["latest"]

    def tensors(self) -> dict[str, Tensor]:
        """The soup's full state dict on the host (bitwise the scored soup)."""
        if self.mix is not None:
            return build_mix_soup(self.latest, self.mix, module=self.target)
        into = self.family.sources[0] if (self.in_place_ok and self.family.kind == "lerp"
                                          and self.family.sources[0] == "previous") else None
        return build_soup(self.sources, self.family, self.result.param, module=self.target,
                          into=into)

    def write_files(self, soup_dir: str | os.PathLike, stem: str, *, is_writer: bool,
                    extra_metadata: Mapping[str, object] | None = None) -> Path | None:
        """Write the soup as files: a sharded soup folder when the snapshots hold local shards
        (collective: call on every rank), else ``<stem>.safetensors`` + ``<stem>.json`` written
        by the rank with ``is_writer`` (others return ``None``)."""
        if isinstance(self.latest, ShardedSnapshot):
            return write_sharded_soup(soup_dir, stem, self.tensors, self.latest.layouts,
                                      self.result, extra_metadata)
        if not is_writer:
            return None
        if self.mix is not None and self.target is not None and all(
                t.device.type == "cpu" for t in self.target.state_dict().values()):
            # averaging="auto" on the host: write the soup from the live tensors that hold it
            # (no further copy of the weights), then restore them
            with self.loaded() as module:
                return write_soup_files(soup_dir, stem, dict(module.state_dict()), self.result,
                                        extra_metadata)[0]
        return write_soup_files(soup_dir, stem, self.tensors(), self.result, extra_metadata)[0]

    @contextlib.contextmanager
    def loaded(self) -> Iterator[nn.Module]:
        """Hold the soup in the live module's own tensors inside the block (for a framework's
        own ``save_pretrained``); the latest weights are back, bitwise, on exit."""
        latest = self.latest.tensors
        targets = live_targets(self.target, latest)
        keys, live = [k for k, _ in targets], [t for _, t in targets]
        if self.mix is not None:
            scratch = mix_scratch(keys, live)
            try:
                load_mix(self.target, live, keys, self.mix, scratch)
                del scratch
                yield self.target
            finally:
                combine_into_(live, [[latest[k] for k in keys]], (1.0,), False)
                _refresh_view(self.target)
            return
        srcs = [[self.sources[n].tensors[k] for k in keys] for n in self.family.sources]
        try:
            combine_into_(live, srcs, self.family.weights(self.result.param),
                          self.family.kind == "lerp")
            yield self.target
        finally:
            combine_into_(live, [[latest[k] for k in keys]], (1.0,), False)


def _refresh_view(view: nn.Module | None) -> None:
    refresh = getattr(view, "refresh", None)
    if refresh is not None:
        refresh()


class MergeSchedule:
    """The merge schedule of one training run (see the module docstring).

    Args:
        config: the search settings.
        metric: the resolved metric (name and direction are recorded).
        every_n_saves: run a round at every n-th checkpoint save.
        history: weights kept on the host, the latest included (2: the paper's pairwise soup).
        snapshot_every: also snapshot every this many steps (``None``: at saves only).
        ema_decays: per-step decays of EMA tracks updated every ``snapshot_every`` steps.
        on_error: ``"warn"`` (a failed round is reported, training goes on) or ``"raise"``.
        averaging: ``"pairwise"`` (the families above) or ``"auto"``: two power-function EMA
            tracks on the host updated every ``snapshot_every`` steps (default 10), a snapshot
            store on disk (``store_dir`` of :meth:`preflight`) written at every save, and the
            round of :class:`~merge_callback.engine.families.AutoPlan`.

    Raises:
        ValueError: for any invalid argument, naming what is allowed.
    """

    def __init__(self, config: RoundConfig, metric: Metric, *, every_n_saves: int = 1,
                 history: int = 2, snapshot_every: int | None = None,
                 ema_decays: tuple[float, ...] = (), on_error: str = "warn",
                 averaging: str = "pairwise"):
        validate_callback_args(max_batches=None, every_n_saves=every_n_saves, on_error=on_error)
        self.ema_decays = validate_averaging_args(history=history, snapshot_every=snapshot_every,
                                                  ema_decays=ema_decays, averaging=averaging)
        self.averaging = averaging
        if averaging == "auto" and snapshot_every is None:
            snapshot_every = AUTO.snapshot_every
        self.config = config
        self.metric = metric
        self.every_n_saves = every_n_saves
        self.history_size = history
        self.snapshot_every = snapshot_every
        self.on_error = on_error
        self.ring: list[Snapshot] = []  # recent weights, oldest first
        self.last_save: Snapshot | None = None  # the weights of the previous checkpoint save
        self.spare: Snapshot | None = None  # page-locked buffers of a dropped snapshot (CUDA)
        self.emas = [EmaTrack(d, snapshot_every or 1) for d in self.ema_decays]
        self.enabled = True
        self._latest_side: dict[str, float] | None = None
        self.tracks: list = []  # averaging="auto": power-function EMA tracks
        self.store = None  # averaging="auto": the SnapshotStore (set by preflight)
        self._track_keys: list[str] | None = None
        if averaging == "auto":
            from merge_callback.posthoc import PowerEmaTrack

            self.tracks = [PowerEmaTrack(sigma) for sigma in AUTO.track_sigmas]
        self._stored_tensors: Mapping[str, Any] | None = None
        self.state = self.initial_state()

    @classmethod
    def from_args(cls, *, metric: Any, higher_is_better: Any, budget: Any, alpha: Any,
                  acq_func: Any, strategy: Any, seed: Any, warm_start: Any, stop_tol: Any,
                  every_n_saves: Any, history: Any, snapshot_every: Any, ema_decays: Any,
                  on_error: Any, max_batches: Any, save_soups: Any, soup_dir: Any,
                  keep_last_soups: Any = None, averaging: Any = "pairwise") -> MergeSchedule:
        """Validate every argument the callbacks share, in one place, and build the schedule
        (``schedule.metric`` is the resolved metric).

        Raises:
            ValueError: naming the first invalid argument and what is allowed.
        """
        check_bool("higher_is_better", higher_is_better, allow_none=True)
        config = RoundConfig(alpha=alpha, budget=budget, strategy=strategy, acq_func=acq_func,
                             seed=seed, warm_start=warm_start, stop_tol=stop_tol)
        resolved = resolve_metric(metric, higher_is_better)
        validate_callback_args(max_batches=max_batches, every_n_saves=every_n_saves,
                               on_error=on_error, save_soups=save_soups, soup_dir=soup_dir,
                               keep_last_soups=keep_last_soups)
        return cls(config, resolved, every_n_saves=every_n_saves, history=history,
                   snapshot_every=snapshot_every, ema_decays=ema_decays, on_error=on_error,
                   averaging=averaging)

    @classmethod
    def from_callback(cls, arguments: Mapping[str, Any]) -> MergeSchedule:
        """:meth:`from_args` with the arguments it takes picked from a callback constructor's
        ``locals()`` (both adapters name them the same)."""
        import inspect

        names = [n for n in inspect.signature(cls.from_args).parameters if n != "cls"]
        return cls.from_args(**{n: arguments[n] for n in names if n in arguments})

    # ---------------------------------------------------------------- state
    @property
    def pairwise_only(self) -> bool:
        """True for the paper's method: the last two saves, λ ∈ [alpha, 1]."""
        return self.history_size == 2 and not self.ema_decays and self.averaging == "pairwise"

    @property
    def auto(self) -> bool:
        """True for ``averaging="auto"``."""
        return self.averaging == "auto"

    @staticmethod
    def track_name(track: Any) -> str:
        """The snapshot kind of a power-function EMA track (``"phema0.05"``)."""
        return f"phema{track.sigma_rel:g}"

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per finished round: step, lambda, value_soup, value_latest, value_previous,
        previous_step (and family, param for averaging rounds)."""
        return self.state["history"]

    @staticmethod
    def initial_state() -> dict[str, Any]:
        return {"version": STATE_VERSION, "saves": 0, "last_save_step": None,
                "previous_step": None, "previous_value": None, "previous_side": None,
                "history": []}

    def state_dict(self) -> dict[str, Any]:
        """The resumable state: plain Python (JSON-ready)."""
        return {**self.state, "history": [dict(h) for h in self.state["history"]]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        fresh = self.initial_state()
        self.state = {k: state.get(k, v) for k, v in fresh.items()}
        self.state["history"] = [dict(h) for h in self.state["history"]]
        self.ring, self.last_save = [], None

    def tensor_state(self) -> dict[str, Any] | None:
        """The older snapshots and EMA tracks (``None`` for the pairwise soup, which needs only
        the live weights at resume), so that a resumed run averages the same weights."""
        if self.pairwise_only:
            return None
        if self.auto:
            return {"ring": [], "ema": {self.track_name(t): {"step": t.step, "tensors": t.tensors}
                                        for t in self.tracks if t.step > 0}}
        return {"ring": [(s.step, s.tensors) for s in self.ring[:-1]],
                "ema": {t.name: {"step": t.snapshot.step, "tensors": t.snapshot.tensors}
                        for t in self.emas if t.snapshot is not None}}

    def load_tensor_state(self, stored: Mapping[str, Any] | None) -> None:
        """Keep what :meth:`tensor_state` returned in the checkpoint, for :meth:`resume`."""
        self._stored_tensors = stored

    def resume(self, module: nn.Module, step: int) -> str | None:
        """Continue the schedule when training (re)starts at ``step`` with ``module``'s weights.

        Returns a warning to show when the saved state refers to another step (merging then
        restarts with the next save), else ``None``.
        """
        if self.auto:
            return self._resume_auto(step)
        prev = self.state["previous_step"]
        if self.ring or prev is None:
            return None
        if prev != step:
            self.state["previous_step"] = self.state["previous_value"] = None
            self._stored_tensors = None
            return (f"training starts at step {step} but the saved merge state refers to step "
                    f"{prev}; "
                    "merging restarts with the next checkpoint save")
        latest = capture_snapshot(module, prev)  # resumed from that save: the live weights
        stored = self._stored_tensors or {}
        self.ring = [Snapshot(dict(t), s) for s, t in stored.get("ring", [])] + [latest]
        self.last_save = latest
        for track in self.emas:
            ema = stored.get("ema", {}).get(track.name)
            if ema is not None:
                track.snapshot = Snapshot(dict(ema["tensors"]), ema["step"])
        self._stored_tensors = None
        return None

    def _resume_auto(self, step: int) -> str | None:
        """``averaging="auto"``: restore the tracks saved at ``step``; snapshots on disk from
        after ``step`` (an abandoned continuation, or another run in the same folder) are
        deleted."""
        prev = self.state["previous_step"]
        stored = self._stored_tensors or {}
        self._stored_tensors = None
        warning = None
        if self.store is not None:
            if dist.rank() == 0:  # the store is shared by the ranks: one of them edits it
                for e in self.store.entries():
                    if prev is None or e.step > step:
                        e.path.unlink(missing_ok=True)
            dist.barrier()
        if prev is None:
            return None
        if prev != step:
            self.state["previous_step"] = self.state["previous_value"] = None
            return (f"training starts at step {step} but the saved merge state refers to step "
                    f"{prev}; the averaging tracks restart empty")
        missing = []
        for track in self.tracks:
            saved = stored.get("ema", {}).get(self.track_name(track))
            if saved is None:
                missing.append(self.track_name(track))
                continue
            track.load_state_dict({"sigma_rel": track.sigma_rel, "step": int(saved["step"]),
                                   "tensors": saved["tensors"]})
        if missing:
            warning = (f"the checkpoint holds no averaging track {', '.join(missing)}; "
                       "it restarts empty, so post-hoc EMAs differ from an uninterrupted run")
        return warning

    def preflight(self, module: nn.Module, heldout: Any, soup_dir: str | os.PathLike | None, *,
                  max_batches: int | None = None,
                  store_dir: str | os.PathLike | None = None) -> str | None:
        """Check, before any round, what would make every round fail or mislead.

        The held-out data (re-iterable, LM batches with integer ids inside the module's vocabulary
        and rows no longer than its positions, non-empty; for the built-in metrics, whose
        batches the package reads — a callable metric reads its own) and the soup folder (writable, room for one
        soup; stale temporaries of a killed writer are removed first).

        With ``averaging="auto"`` the snapshot store is opened in ``store_dir`` (default
        ``<soup_dir>/.averaging``).

        Returns:
            ``None``, or (with ``on_error="warn"``) the problem to report once: rounds are then
            disabled for this run.

        Raises:
            PreflightError: with ``on_error="raise"``.
            ValueError: ``averaging="auto"`` with no folder for its snapshots, or in several
                processes.
        """
        if self.auto:
            from merge_callback.posthoc import SnapshotStore

            if store_dir is None and soup_dir is not None:
                store_dir = Path(soup_dir) / ".averaging"
            if store_dir is None:
                raise ValueError("averaging='auto' needs a folder for its snapshots: give "
                                 "soup_dir or store_dir")
            problem = None
            if dist.rank() == 0:  # one writer of the shared snapshot folder
                try:
                    check_output_dir(store_dir, 3 * _fp32_bytes(module), name="the averaging "
                                     "snapshot folder")
                    if Path(store_dir).is_dir():
                        remove_stale_temporaries(store_dir)
                except PreflightError as e:
                    problem = e
            problem = dist.broadcast_object(problem)
            if problem is not None:
                if self.on_error == "raise":
                    raise problem
                self.enabled = False
                return (f"{problem}; merge rounds are disabled for this run, training goes on "
                        "unchanged")
            self.store = SnapshotStore(store_dir, keep=AUTO.keep)
        try:
            if getattr(self.metric, "fn", None) in (loss_metric, accuracy_metric):
                vocab, positions = model_limits(module)
                with preserved_rng():  # iterating a loader draws from the global RNG
                    check_heldout(heldout, vocab_size=vocab, max_positions=positions,
                                  max_batches=max_batches)
            if soup_dir is not None:
                if Path(soup_dir).is_dir():
                    remove_stale_temporaries(soup_dir)
                check_output_dir(soup_dir, capture_nbytes(module), name="soup_dir")
        except PreflightError as e:
            if self.on_error == "raise":
                raise
            self.enabled = False
            return f"{e}; merge rounds are disabled for this run, training goes on unchanged"
        return None

    def release(self) -> None:
        """Give recycled page-locked memory back (end of training)."""
        self.spare = None

    # ---------------------------------------------------------------- events
    def on_train_step(self, module: nn.Module, step: int) -> None:
        """After an optimizer step: snapshot and update EMA tracks every ``snapshot_every``."""
        if not self.snapshot_every or step % self.snapshot_every or step == 0:
            return
        if self.auto:
            if self.tracks and self.tracks[0].step < step:
                self._update_tracks(module, step)
            return
        if self.ring and self.ring[-1].step == step:
            return  # gradient accumulation: several batches end at one optimizer step
        snap = self._capture(module, step)
        self._push(snap)
        for track in self.emas:
            track.update(module, step, snap)

    def is_new_save(self, step: int) -> bool:
        """False for a second file saved at the same step (one round per step)."""
        return step != self.state["last_save_step"]

    def on_save(self, step: int, rt: Runtime) -> RoundResult | None:
        """A checkpoint was saved at ``step``: keep its weights and run a round when due.

        A failed round is reported through ``rt.warn`` (``on_error="warn"``) or re-raised; the
        schedule advances either way. A failed soup write is reported on its own; the round is
        still recorded and logged.
        """
        if self.auto:
            return self._on_save_auto(step, rt)
        state = self.state
        state["saves"] += 1
        state["last_save_step"] = step
        if not (self.ring and self.ring[-1].step == step):
            self._push(self._capture(rt.module, step))
        result = None
        try:
            if self.enabled and len(self.ring) >= 2 and state["saves"] % self.every_n_saves == 0:
                result = self._guarded_round(rt)
        finally:  # the schedule advances also when the round re-raises (on_error="raise")
            # between rounds keep history - 1 copies: the next save brings the latest
            dropped = self.ring[:-(self.history_size - 1)] + [self.last_save]
            del self.ring[:-(self.history_size - 1)]
            self.last_save = self.ring[-1]
            self._drop([s for s in dropped if s is not None])
            state["previous_step"] = step
            state["previous_value"] = result.value_latest if result is not None else None
            state["previous_side"] = self._latest_side if result is not None else None
            self._latest_side = None
        return result

    # ---------------------------------------------------------------- averaging="auto"
    def _merge_keys(self, module: nn.Module) -> list[str]:
        """The keys averaged (floating point, each storage once), in state_dict order."""
        if self._track_keys is None:
            sd = module.state_dict()
            self._track_keys = [k for k, _ in live_targets(module, sd)]
        return self._track_keys

    def _update_tracks(self, module: nn.Module, step: int,
                       tensors: Mapping[str, Tensor] | None = None) -> None:
        keys = self._merge_keys(module)
        sd = tensors if tensors is not None else module.state_dict()
        # one host fp32 view for both tracks: no copy for fp32 CPU weights, else one transient
        # host copy (a device-to-host transfer once per update, not once per track)
        live = {k: sd[k].detach().to("cpu", torch.float32) for k in keys}
        for track in self.tracks:
            track.update(step, live)

    def _on_save_auto(self, step: int, rt: Runtime) -> RoundResult | None:
        """A save under ``averaging="auto"``: the tracks are brought to ``step``, the raw weights
        and both tracks are written to the store, and a round runs when due; the latest
        weights' host copy is dropped afterwards (the next round reads them from disk)."""
        state = self.state
        state["saves"] += 1
        state["last_save_step"] = step
        latest = self._capture(rt.module, step)
        self.ring = [latest]
        result = None
        try:
            try:
                keys = self._merge_keys(rt.target)
                if self.tracks[0].step < step:
                    self._update_tracks(rt.target, step, latest.tensors)
                if self.store is None:
                    raise RuntimeError("averaging='auto' has no snapshot folder (preflight was "
                                       "not run)")
                failure = None
                if dist.rank() == 0:  # every rank holds the same weights and tracks: one writes
                    try:
                        self.store.put(step, "raw", {k: latest.tensors[k] for k in keys})
                        for track in self.tracks:
                            self.store.put(step, self.track_name(track), track.tensors,
                                           {"gamma": track.gamma, "sigma_rel": track.sigma_rel,
                                            "every": self.snapshot_every})
                    except Exception as e:  # noqa: BLE001 - agreed on below
                        failure = e
                if not dist.all_ok(failure is None):  # also the barrier before others read
                    raise failure or RuntimeError("writing the averaging snapshots failed on "
                                                  "rank 0")
            except Exception as e:  # noqa: BLE001 - reported, training goes on
                if self.on_error == "raise":
                    raise
                rt.warn(f"storing the averaging snapshots of step {step} failed; this save "
                        f"starts no round. {type(e).__name__}: {e}")
                return None
            if self.enabled and state["saves"] % self.every_n_saves == 0 and \
                    len(self.store.entries("raw")) >= 2:
                result = self._guarded_round(rt)
        finally:
            self.ring = []
            self._drop([latest])
            state["previous_step"] = step
            state["previous_value"] = result.value_latest if result is not None else None
        return result

    def auto_plan(self, latest: Snapshot) -> AutoPlan:
        """The ``averaging="auto"`` candidates at ``latest.step``: the stored raw snapshots and
        track snapshots before it, the latest weights and the live tracks in host memory."""
        from merge_callback.posthoc import sigma_rel_to_gamma

        step = latest.step
        gammas = {self.track_name(t): t.gamma for t in self.tracks}
        entries = [e for e in self.store.entries() if e.step < step]
        latest_in = StoredWeights("raw", step, latest.tensors)
        raws = [StoredWeights("raw", e.step, e) for e in entries if e.kind == "raw"] + [latest_in]
        tracks = [(StoredWeights(e.kind, e.step, e), gammas[e.kind]) for e in entries
                  if e.kind in gammas]
        tracks += [(StoredWeights(self.track_name(t), t.step, t.tensors),
                    sigma_rel_to_gamma(t.sigma_rel)) for t in self.tracks if t.step == step]
        return AutoPlan(step=step, latest=latest_in, raws=raws, tracks=tracks,
                        alpha=self.config.alpha, mode=AUTO)

    def _auto_round(self, rt: Runtime) -> ChosenSoup:
        latest = self.ring[-1]
        plan = self.auto_plan(latest)
        prev_value = self.state["previous_value"]
        if plan.previous is None or self.state["previous_step"] != plan.previous.step:
            prev_value = None
        last = self.history[-1:]
        initial = dict(last[0].get("searched", {})) if last else {}
        progress = None
        if rt.progress is not None:
            progress = rt.progress(AUTO.budget + (prev_value is None),
                                   f"merge step={latest.step}", None)
        try:
            result = run_round(rt.module, {"latest": latest}, plan, rt.evaluate, self.config,
                               metric=self.metric.name,
                               higher_is_better=self.metric.higher_is_better,
                               value_previous=prev_value, initial=initial,
                               on_evaluation=progress, view=rt.view)
        finally:
            if progress is not None:
                progress.close()
        result = rt.broadcast(result)
        x = result.extras
        entry = {"step": result.step, "lambda": result.lam, "value_soup": result.value_soup,
                 "value_latest": result.value_latest, "value_previous": result.value_previous,
                 "previous_step": result.previous_step, "family": result.family,
                 "param": result.param, "searched": dict(x["searched"])}
        if "blend_of" in x:
            entry["blend_of"] = dict(x["blend_of"])
        self.history.append(entry)
        if rt.log is not None:
            rt.log(result, self.history)
        base = (x["blend_of"]["family"], x["blend_of"]["param"]) if "blend_of" in x else None
        mix = plan.mix(result.family, result.param, base)
        return ChosenSoup(result, None, {"latest": latest}, rt.target, mix=mix)

    # ---------------------------------------------------------------- work
    def _capture(self, module: nn.Module, step: int) -> Snapshot:
        spare, self.spare = self.spare, None
        return capture_snapshot(module, step, reuse=spare)

    def _push(self, snap: Snapshot) -> None:
        self.ring.append(snap)
        dropped = self.ring[:-self.history_size]
        del self.ring[:-self.history_size]
        self._drop(dropped)

    def _drop(self, dropped: list[Snapshot]) -> None:
        """Keep the page-locked buffers of one snapshot nothing refers to any more, for the next
        capture (page-locking is slow; pageable host memory is simply freed)."""
        in_use = {id(s) for s in self.ring} | {id(self.last_save)}
        in_use |= {id(t.snapshot) for t in self.emas}
        for snap in dropped:
            if id(snap) not in in_use and snap.page_locked:
                self.spare = snap

    def _guarded_round(self, rt: Runtime) -> RoundResult | None:
        step = self.ring[-1].step
        try:
            chosen = self._round(rt)
        except Exception as e:  # noqa: BLE001 - reported, training goes on (on_error="warn")
            if self.on_error == "raise":
                raise
            rt.warn(f"the merge round at step {step} failed and was skipped; training continues "
                    f"unchanged. {type(e).__name__}: {e}")
            return None
        if rt.write is not None:
            try:
                rt.write(chosen)
            except Exception as e:  # noqa: BLE001
                if self.on_error == "raise":
                    raise
                where = f" ({e.filename})" if getattr(e, "filename", None) else ""
                rt.warn(f"writing the soup of step {step} failed{where}: a soup needs about "
                        f"{format_bytes(chosen.latest.nbytes)} "
                        f"({chosen.latest.nbytes} bytes); the round's result was recorded and "
                        f"logged and training continues unchanged. {type(e).__name__}: {e}")
        return chosen.result

    def _side_metrics(self, result: RoundResult, first: Family) -> dict[str, dict[str, float]]:
        """The evaluator's side values (loss, perplexity, accuracy of the same forward passes)
        of the soup, the latest and the previous weights; the previous weights' come from the
        last round (where they were the latest) when this round did not score them."""
        values = result.extras.get("side_values", [])

        def at(family: str | None, param: float | None = None,
               value: float | None = None) -> dict[str, float] | None:
            for v in values:
                if (v["family"], v["param"]) == (family, param) or v["value"] == value:
                    return {k: x for k, x in v.items() if k not in ("family", "param", "value")}
            return None

        # the soup may have been scored under another family's name (the same weights)
        side = {"soup": at(result.family, result.param) or at(None, value=result.value_soup),
                "latest": at(first.name, first.latest_at),
                "previous": at("pairwise", 0.0) or self.state.get("previous_side")}
        self._latest_side = side["latest"]
        return {k: v for k, v in side.items() if v}

    def previous_save(self) -> Snapshot:
        """The previous checkpoint save's weights (kept even when newer snapshots pushed them out
        of the ring), else the most recent older snapshot."""
        last = self.last_save
        if last is not None and last.step == self.state["previous_step"] \
                and last.step < self.ring[-1].step:
            return last
        return self.ring[-2]

    def sources_and_families(self) -> tuple[dict[str, Snapshot], list[Family]]:
        """The round's inputs by name and its candidate families (the pairwise one first)."""
        ring = self.ring
        sources: dict[str, Snapshot] = {"latest": ring[-1], "previous": self.previous_save()}
        families = [pairwise_family("previous", "latest", self.config.alpha)]
        if self.pairwise_only:
            return sources, families
        if len(ring) >= 3:
            names = [f"step{s.step}" for s in ring[:-1]]
            sources.update(zip(names, ring[:-1]))
            families.append(geometric_family([*names, "latest"]))
        for track in self.emas:
            if track.snapshot is not None:
                sources[track.name] = track.snapshot
                families.append(ema_family(track.name, "latest"))
        return sources, families

    def _round(self, rt: Runtime) -> ChosenSoup:
        if self.auto:
            return self._auto_round(rt)
        sources, families = self.sources_and_families()
        latest = sources["latest"]
        prev_value = self.state["previous_value"]
        if self.state["previous_step"] != sources["previous"].step:
            prev_value = None
        last = self.history[-1:]
        initial = {h.get("family", "pairwise"): h.get("param", h["lambda"]) for h in last}
        progress = None
        if rt.progress is not None:
            total = self.config.budget + (prev_value is None)
            progress = rt.progress(total, f"merge step={latest.step}",
                                   (families[0].lo, families[0].hi) if len(families) == 1
                                   else None)
        try:
            result = run_round(rt.module, sources, families, rt.evaluate, self.config,
                               metric=self.metric.name,
                               higher_is_better=self.metric.higher_is_better,
                               value_previous=prev_value, initial=initial,
                               on_evaluation=progress, view=rt.view)
        finally:
            if progress is not None:
                progress.close()
        # every rank computed the same reduced values; take rank zero's decision to be certain
        result = rt.broadcast(result)
        side = self._side_metrics(result, families[0])
        if side:
            result = replace(result, extras={**result.extras, "side": side})
        entry = {"step": result.step, "lambda": result.lam, "value_soup": result.value_soup,
                 "value_latest": result.value_latest, "value_previous": result.value_previous,
                 "previous_step": result.previous_step}
        if len(families) > 1:
            entry.update(family=result.family, param=result.param)
        for which, values in result.extras.get("side", {}).items():
            entry.update({f"{which}_{name}": v for name, v in values.items()})
        self.history.append(entry)
        if rt.log is not None:
            rt.log(result, self.history)
        family = next(f for f in families if f.name == result.family)
        return ChosenSoup(result, family, sources, rt.target,
                          in_place_ok=self.history_size == 2 and not self.ema_decays)


class ScheduleOwner:
    """What both callbacks share: their validated settings, the schedule and views of it.

    An adapter's constructor checks its own ``heldout`` type, then calls
    :meth:`_own_schedule` with its ``locals()``.
    """

    schedule: MergeSchedule

    def _own_schedule(self, arguments: Mapping[str, Any]) -> None:
        self.schedule = MergeSchedule.from_callback(arguments)  # validates every argument
        self.metric = self.schedule.metric
        self.heldout = arguments["heldout"]
        self.max_batches = arguments["max_batches"]
        soup_dir = arguments["soup_dir"]
        self.soup_dir = Path(soup_dir) if soup_dir is not None else None
        self.save_soups = arguments["save_soups"]
        self._evaluator = None

    @property
    def config(self) -> RoundConfig:
        """The search settings."""
        return self.schedule.config

    @property
    def on_error(self) -> str:
        return self.schedule.on_error

    @property
    def every_n_saves(self) -> int:
        return self.schedule.every_n_saves

    @property
    def pairwise_only(self) -> bool:
        """True for the paper's method: the last two saves, λ ∈ [alpha, 1]."""
        return self.schedule.pairwise_only

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per finished round: step, lambda, value_soup, value_latest, value_previous,
        previous_step (and family, param for averaging rounds)."""
        return self.schedule.history


def _fp32_bytes(module: nn.Module) -> int:
    """Bytes of the module's floating-point tensors in fp32 (each storage once)."""
    sd = module.state_dict()
    return sum(t.numel() * 4 for _, t in live_targets(module, sd))
