"""One merge round, independent of the training framework.

A round takes the previous checkpoint's weights and the latest weights (both as host snapshots),
searches λ on a held-out evaluator by writing each candidate soup *into the live module in place*,
and always restores the live weights bitwise from the latest snapshot before returning, also when
the search raises. It returns a :class:`RoundResult`; writing and logging are the adapters' job.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from merge_callback.io import atomic_write_json, save_safetensors_atomic
from merge_callback.merge import (check_compatible, is_mergeable, lerp_state_dicts, lerp_tensors_,
                                  storage_ident)
from merge_callback.search import search_lambda, validate_search_args

__all__ = ["Snapshot", "RoundConfig", "RoundResult", "MergeRoundError", "run_round",
           "stage_on_devices", "soup_state_dict", "soup_from_live", "write_soup_files",
           "check_positive_int", "validate_callback_args"]


class MergeRoundError(RuntimeError):
    """A merge round failed; the live weights were restored and no soup was written."""


class Snapshot:
    """A host copy of a module's ``state_dict()`` at a training step.

    Tensors that share memory in the module (tied weights) share one host copy. The copies are
    views into one flat host buffer per dtype (each tensor 64-byte aligned). On CUDA that buffer is
    page-locked in place (``cudaHostRegister``: exactly the bytes needed, where pinned tensors from
    the caching host allocator are rounded up to a power of two) and the copies are issued
    asynchronously on the current stream: :meth:`capture` returns while they run, training's
    next kernels on that stream come after them, and reading :attr:`tensors` waits for them.

    Args:
        tensors: key -> host tensor, in ``state_dict()`` order.
        step: the global step the weights belong to.
    """

    def __init__(self, tensors: dict[str, Tensor], step: int):
        self._tensors = tensors
        self.step = int(step)
        self._ready: list = []  # CUDA events recorded after the asynchronous copies
        self._buffers: _HostBuffers | None = None  # set by capture; what reuse= takes over

    @property
    def tensors(self) -> dict[str, Tensor]:
        """key -> host tensor; waits for pending device-to-host copies first."""
        self.wait()
        return self._tensors

    def wait(self) -> None:
        """Block until the copies issued by :meth:`capture` have landed in host memory."""
        ready, self._ready = self._ready, []
        for event in ready:
            event.synchronize()

    @classmethod
    def capture(cls, module: nn.Module, step: int, pin_memory: bool | None = None,
                reuse: Snapshot | None = None) -> Snapshot:
        """Copy ``module.state_dict()`` to host memory.

        Args:
            module: the live module.
            step: the training step recorded with the copy.
            pin_memory: page-lock the host buffer (default: when any tensor is on CUDA).
            reuse: a snapshot nobody uses any more; when its tensors have the same keys, shapes
                and dtypes, the copy goes into its buffers (no new allocation, no page faults,
                no new page-locking) and ``reuse`` must not be used afterwards.
        """
        sd = module.state_dict()
        index: dict[tuple, int] = {}
        sources: list[Tensor] = []
        entries: list[tuple[str, int]] = []
        for key, t in sd.items():
            t = t.detach()
            ident = storage_ident(t)
            if ident not in index:
                index[ident] = len(sources)
                sources.append(t)
            entries.append((key, index[ident]))
        layout = (tuple(entries), tuple((tuple(t.shape), t.dtype) for t in sources))
        if reuse is not None and reuse._buffers is not None and reuse._buffers.layout == layout:
            reuse.wait()
            buffers, reuse._buffers, reuse._tensors = reuse._buffers, None, {}
        else:
            any_cuda = any(t.is_cuda for t in sources)
            pin = (any_cuda if pin_memory is None else bool(pin_memory)) and any_cuda
            buffers = _flat_host_buffers(sources, pin, layout)
        devices = set()
        with torch.no_grad():
            for host, t in zip(buffers.hosts, sources):
                host.copy_(t, non_blocking=t.is_cuda and buffers.locked)
                if t.is_cuda:
                    devices.add(t.device)
        snap = cls({key: buffers.hosts[i] for key, i in entries}, step)
        snap._buffers = buffers
        for device in devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            snap._ready.append(event)
        return snap

    @property
    def page_locked(self) -> bool:
        """Whether the host buffers are page-locked (CUDA training): worth keeping for reuse."""
        return self._buffers is not None and self._buffers.locked

    def _take_buffers(self, other: Snapshot) -> None:
        """Adopt ``other``'s tensors, buffers and pending copies (``other`` is left empty)."""
        self._tensors, self._ready, self._buffers = other._tensors, other._ready, other._buffers
        other._tensors, other._ready, other._buffers = {}, [], None

    @property
    def nbytes(self) -> int:
        """Bytes held (shared tensors counted once)."""
        seen: set[int] = set()
        total = 0
        for t in self.tensors.values():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


_ALIGN_BYTES = 64


@dataclass
class _HostBuffers:
    """A snapshot's memory: ``hosts`` (one per distinct tensor, in capture order) are views into
    the ``flats`` (one per dtype; page-locked if ``locked``); ``layout`` is what a capture
    with ``reuse=`` must match."""

    layout: tuple
    hosts: list[Tensor]
    flats: list[Tensor]
    locked: bool


def _flat_host_buffers(sources: list[Tensor], pin: bool, layout: tuple) -> _HostBuffers:
    """Contiguous host tensors shaped like ``sources``: views into one flat buffer per dtype."""
    offsets: list[int] = []
    sizes: dict[torch.dtype, int] = {}
    gaps: list[tuple[torch.dtype, int, int]] = []
    for t in sources:
        align = max(1, _ALIGN_BYTES // t.element_size())
        end = sizes.get(t.dtype, 0)
        start = -(-end // align) * align
        if start > end:
            gaps.append((t.dtype, end, start))
        offsets.append(start)
        sizes[t.dtype] = start + t.numel()
    flats = {dtype: torch.empty(n, dtype=dtype, device="cpu") for dtype, n in sizes.items()}
    for dtype, a, b in gaps:  # the alignment padding: no stale process memory in saved buffers
        flats[dtype][a:b].zero_()
    devices = tuple(sorted({t.device.index or 0 for t in sources if t.is_cuda}))
    locked = pin and all([_page_lock(flat, devices) for flat in flats.values()])
    hosts = [flats[t.dtype][o:o + t.numel()].view(t.shape) for t, o in zip(sources, offsets)]
    return _HostBuffers(layout, hosts, list(flats.values()), locked)


_PAGE_LOCK_REFUSED = False  # after one refusal, later snapshots stay pageable


def _page_lock(flat: Tensor, devices: tuple[int, ...] = ()) -> bool:
    """Page-lock ``flat``'s memory for asynchronous copies; unlocked when ``flat`` is freed.

    Returns False (the memory stays pageable and copies into it are synchronous) if CUDA refuses;
    then it is not tried again in this process. ``devices``: the CUDA devices that copy into it
    (synchronised before it is unlocked).
    """
    import weakref

    global _PAGE_LOCK_REFUSED
    nbytes = flat.numel() * flat.element_size()
    if nbytes == 0 or _PAGE_LOCK_REFUSED:
        return False
    ptr = flat.data_ptr()
    try:
        cudart = torch.cuda.cudart()
        status = int(cudart.cudaHostRegister(ptr, nbytes, 0))
    except (AttributeError, RuntimeError):  # a torch build without the runtime binding
        _PAGE_LOCK_REFUSED = True
        return False
    if status != 0:
        _PAGE_LOCK_REFUSED = True
        # the runtime keeps the error as its "last error", which torch's binding cannot clear;
        # the next checked kernel launch would raise it somewhere unrelated: consume it here
        try:
            torch.empty(1, device="cuda").zero_()
        except RuntimeError:
            pass
        import warnings
        warnings.warn(f"merge_callback: CUDA refused to page-lock {nbytes} bytes of host memory; "
                      "weight snapshots use pageable memory and synchronous copies from now on",
                      RuntimeWarning, stacklevel=3)
        return False
    weakref.finalize(flat, _page_unlock, ptr, devices)
    return True


def _page_unlock(ptr: int, devices: tuple[int, ...]) -> None:
    # a copy into the buffer may still be in flight (a snapshot dropped right after its capture):
    # let those devices finish before the memory becomes pageable and is freed
    try:
        for device in devices:
            torch.cuda.synchronize(device)
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001 - at interpreter exit CUDA may already be shut down
        pass


def check_positive_int(name: str, value: Any, allow_none: bool = False,
                       none_means: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is an integer >= 1 (or None, if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = f" or None{none_means}" if allow_none else ""
        raise ValueError(f"{name} must be a positive integer{extra}, got {value!r}")


def validate_callback_args(*, max_batches: Any, every_n_saves: Any, on_error: Any,
                           keep_last_soups: Any = None) -> None:
    """Check the adapter arguments that are not search settings or the metric.

    Raises:
        ValueError: naming the argument and what is allowed.
    """
    check_positive_int("max_batches", max_batches, allow_none=True)
    check_positive_int("every_n_saves", every_n_saves)
    if on_error not in ("warn", "raise"):
        raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
    check_positive_int("keep_last_soups", keep_last_soups, allow_none=True,
                       none_means=" (keep all)")


@dataclass(frozen=True)
class RoundConfig:
    """Search settings for a round (validated on construction)."""

    alpha: float = 0.5
    budget: int = 10
    strategy: str = "bayes"
    acq_func: str = "gp_hedge"
    seed: int = 0
    warm_start: bool = False
    stop_tol: float | None = None

    def __post_init__(self) -> None:
        validate_search_args(self.alpha, self.budget, self.strategy, self.acq_func)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"warm_start must be True or False, got {self.warm_start!r}")
        if self.stop_tol is not None:
            if isinstance(self.stop_tol, bool) or not isinstance(self.stop_tol, (int, float)) \
                    or not self.stop_tol > 0:
                raise ValueError(f"stop_tol must be a positive number or None, got "
                                 f"{self.stop_tol!r}")
            if self.strategy != "bayes":
                raise ValueError(f"stop_tol needs strategy='bayes', got strategy="
                                 f"{self.strategy!r}")


@dataclass(frozen=True)
class RoundResult:
    """What a round decided (plain Python values, JSON-ready via :meth:`to_json`)."""

    step: int
    previous_step: int
    lam: float
    value_soup: float
    value_latest: float
    value_previous: float
    observations: tuple[tuple[float, float], ...]
    metric: str
    higher_is_better: bool
    alpha: float
    budget: int
    strategy: str
    acq_func: str | None
    seconds: float
    extra_evaluations: int = 0
    extras: dict = field(default_factory=dict)

    @property
    def gain(self) -> float:
        """Improvement of the soup over the latest weights (positive = better)."""
        diff = self.value_soup - self.value_latest
        return diff if self.higher_is_better else -diff

    def to_json(self) -> dict:
        d = asdict(self)
        d["lambda"] = d.pop("lam")
        d["observations"] = [list(o) for o in self.observations]
        extras = d.pop("extras")
        d.update(extras)
        return d


def _live_targets(module: nn.Module, reference: Mapping[str, Tensor]) -> list[tuple[str, Tensor]]:
    """(key, live tensor) for every mergeable entry, each storage once, in state_dict order."""
    sd = module.state_dict()
    check_compatible(reference, {k: v for k, v in sd.items()}, ("the previous checkpoint",
                                                                 "the live module"))
    seen: set[tuple] = set()
    out = []
    for key, t in sd.items():
        if not is_mergeable(t):
            continue
        ident = storage_ident(t)
        if ident in seen:
            continue
        seen.add(ident)
        out.append((key, t))
    return out


def stage_on_devices(live: list[Tensor], host_lists: list[list[Tensor]],
                     headroom: float = 0.5) -> list[list[Tensor]]:
    """Copies of ``host_lists`` (each aligned with ``live``) on the live tensors' devices, when
    they take at most ``headroom`` of the memory free there; otherwise the host tensors.

    With the operands on the device, each candidate soup is one device-bandwidth pass instead of
    two host-to-device transfers of the weights; the copies live for one round, and the rest of
    the free memory stays for the evaluation. The copies are issued asynchronously (from
    page-locked snapshots) on the current stream. A host tensor that appears in several lists
    (one snapshot under two names) is copied once.
    """
    if not any(t.device.type == "cuda" for t in live):
        return host_lists
    need: dict[torch.device, int] = {}
    seen: set[int] = set()
    for hosts in host_lists:
        for h, o in zip(hosts, live):
            if o.device.type == "cuda" and id(h) not in seen:
                seen.add(id(h))
                need[o.device] = need.get(o.device, 0) + h.numel() * h.element_size()
    for device, nbytes in need.items():
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if nbytes > headroom * free:
            return host_lists
    copies: dict[int, Tensor] = {}

    def on_device(h: Tensor, o: Tensor) -> Tensor:
        if o.device.type != "cuda":
            return h
        if id(h) not in copies:
            copies[id(h)] = h.to(o.device, non_blocking=True)
        return copies[id(h)]

    try:
        return [[on_device(h, o) for h, o in zip(hosts, live)] for hosts in host_lists]
    except torch.cuda.OutOfMemoryError:
        return host_lists


def run_round(module: nn.Module, previous: Snapshot, latest: Snapshot,
              evaluate: Callable[[nn.Module], float], config: RoundConfig, *,
              metric: str = "loss", higher_is_better: bool = False,
              value_previous: float | None = None, initial: tuple[float, ...] = (),
              on_evaluation: Callable[[float, float], None] | None = None) -> RoundResult:
    """Search λ for ``soup = lerp(previous, latest, λ)`` on ``evaluate``; restore ``module``.

    Args:
        module: the live module; its weights must equal ``latest`` on entry, and equal it bitwise
            again on return (also when an exception propagates).
        previous, latest: host snapshots.
        evaluate: ``module -> metric value`` on the held-out data.
        config: search settings; the round's seed is ``config.seed + latest.step``.
        metric, higher_is_better: recorded in the result; ``higher_is_better`` steers the search.
        value_previous: the previous weights' metric if already known (e.g. from the last round,
            where they were the latest); otherwise λ = 0 is evaluated once, outside the budget.
        initial: λ values evaluated right after α and 1 (warm start, e.g. the last round's λ*;
            used when ``config.warm_start``).
        on_evaluation: called with ``(λ, value)`` after each evaluation (progress reporting).

    Raises:
        MergeRoundError: incompatible snapshots, or a NaN/inf metric value; weights restored.
    """
    t0 = time.perf_counter()
    try:
        check_compatible(previous.tensors, latest.tensors)
        targets = _live_targets(module, latest.tensors)
    except ValueError as e:
        raise MergeRoundError(f"cannot merge step {previous.step} with step {latest.step}: {e}") \
            from e
    keys = [k for k, _ in targets]
    live = [t for _, t in targets]
    prev_t, latest_t = stage_on_devices(live, [[previous.tensors[k] for k in keys],
                                               [latest.tensors[k] for k in keys]])

    def objective(lam: float) -> float:
        lerp_tensors_(live, prev_t, latest_t, lam)
        value = float(evaluate(module))
        if on_evaluation is not None:
            on_evaluation(lam, value)
        return value

    extra = 0
    try:
        result = search_lambda(objective, alpha=config.alpha, budget=config.budget,
                               strategy=config.strategy, acq_func=config.acq_func,
                               seed=(config.seed + latest.step) % (2**31),
                               higher_is_better=higher_is_better,
                               initial=initial if config.warm_start else (),
                               stop_tol=config.stop_tol)
        if value_previous is None:
            value_previous = objective(0.0)
            extra = 1
            if not math.isfinite(value_previous):
                raise FloatingPointError(f"held-out metric is {value_previous} at lambda=0")
    except FloatingPointError as e:
        raise MergeRoundError(f"merge round at step {latest.step}: {e}; no soup was written") \
            from e
    finally:
        lerp_tensors_(live, prev_t, latest_t, 1.0)  # exact restore: copies the latest snapshot
    return RoundResult(
        step=latest.step, previous_step=previous.step, lam=result.lam, value_soup=result.value,
        value_latest=result.value_at(1.0), value_previous=float(value_previous),
        observations=result.observations, metric=metric, higher_is_better=higher_is_better,
        alpha=config.alpha, budget=config.budget, strategy=config.strategy,
        acq_func=result.acq_func, seconds=time.perf_counter() - t0, extra_evaluations=extra)


def soup_state_dict(previous: Snapshot, latest: Snapshot, lam: float,
                    in_place: bool = False, module: nn.Module | None = None) -> dict[str, Tensor]:
    """The soup's full state dict (all keys of ``latest``; non-float tensors from ``latest``).

    With ``in_place=True`` the soup is built inside ``previous``'s tensors (no third copy of the
    weights); ``previous`` must not be used afterwards. Both ways give ``torch.lerp`` bitwise.

    ``module`` is the live module the round scored the candidates in (holding ``latest``). When
    its weights are not on the CPU, the soup is computed there by the same kernels, copied back
    and the live weights restored, so that the soup written is bitwise the soup that was scored
    (device and host kernels may round the last bit differently).
    """
    if module is not None:
        targets = _live_targets(module, latest.tensors)
        if any(t.device.type != "cpu" for _, t in targets):
            keys = [k for k, _ in targets]
            live = [t for _, t in targets]
            prev_t = [previous.tensors[k] for k in keys]
            latest_t = [latest.tensors[k] for k in keys]
            dests = prev_t if in_place else [torch.empty_like(t) for t in latest_t]
            # operands on the device as in the round (same kernel on the same inputs)
            prev_d, latest_d = stage_on_devices(live, [prev_t, latest_t])
            return soup_from_live(latest.tensors, keys, live, dests,
                                  lambda: lerp_tensors_(live, prev_d, latest_d, lam))
    if not in_place:
        return lerp_state_dicts(previous.tensors, latest.tensors, lam)
    check_compatible(previous.tensors, latest.tensors)
    done: set[int] = set()
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for key, t in latest.tensors.items():
            p = previous.tensors[key]
            if not is_mergeable(t):
                out[key] = t
                continue
            if id(p) not in done:  # tied weights share one host tensor: merge it once
                p.lerp_(t, float(lam))
                done.add(id(p))
            out[key] = p
    return out


def soup_from_live(latest: Mapping[str, Tensor], keys: list[str], live: list[Tensor],
                   dests: list[Tensor], apply: Callable[[], None]) -> dict[str, Tensor]:
    """Run ``apply()`` (which writes the soup into the ``live`` tensors of ``keys``), copy the
    live tensors into the host tensors ``dests``, and restore the live tensors from the host
    state dict ``latest`` (also on an exception). Returns the soup's full state dict (non-float
    tensors from ``latest``; tied keys share one tensor)."""
    latest_t = [latest[k] for k in keys]
    try:
        apply()
        with torch.no_grad():
            for d, t in zip(dests, live):
                d.copy_(t, non_blocking=t.is_cuda and d.is_pinned())
        for device in {t.device for t in live if t.is_cuda}:
            torch.cuda.current_stream(device).synchronize()
    finally:
        lerp_tensors_(live, latest_t, latest_t, 1.0)  # exact restore: copies the latest snapshot
    by_id = {id(latest[k]): d for k, d in zip(keys, dests)}
    return {k: by_id.get(id(t), t) if is_mergeable(t) else t for k, t in latest.items()}


def write_soup_files(soup_dir, stem: str, tensors: Mapping[str, Tensor], result: RoundResult,
                     extra_metadata: Mapping[str, object] | None = None) -> tuple:
    """Write ``<stem>.safetensors`` (header metadata: lambda, step, ...) and ``<stem>.json``.

    Both are written atomically; the JSON sidecar goes last, so its presence marks a complete soup.
    """
    from pathlib import Path

    soup_dir = Path(soup_dir)
    info = result.to_json()
    if extra_metadata:
        info.update(extra_metadata)
    meta = {"format": "pt", "lambda": repr(result.lam), "step": str(result.step),
            "previous_step": str(result.previous_step), "alpha": repr(result.alpha),
            "metric": result.metric, "value_soup": repr(result.value_soup),
            "value_latest": repr(result.value_latest)}
    st = save_safetensors_atomic(soup_dir / f"{stem}.safetensors", tensors, meta)
    js = atomic_write_json(soup_dir / f"{stem}.json", info)
    return st, js
