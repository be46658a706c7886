"""Averaging families: one-parameter curves of averages over named host copies of the weights.

A round has *sources* (host snapshots: the previous checkpoint, recent snapshots, EMA tracks, and
always the latest weights) and *families*, each a one-parameter curve through the simplex of its
sources:

- ``pairwise``: ``lerp(previous, latest, λ)``, λ ∈ [α, 1] (the paper's soup);
- ``geometric``: weights ``w_i ∝ γ^(k−1−i)`` over the last ``k`` snapshots (``i = k−1`` is the
  latest), γ ∈ [0, 1]: γ = 0 is the latest alone, γ = 1 the uniform average (LAWA);
- ``ema``: ``lerp(ema_d, latest, λ)``, λ ∈ [0, 1]: λ = 0 is the EMA track itself.

:func:`combine_into_` writes any family member into a list of tensors (the live module's, in
place, or new host tensors) with one kernel, wherever the operands live.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from merge_callback.engine.snapshot import Snapshot
from merge_callback.merge import check_compatible, is_mergeable, lerp_tensors_, storage_ident

__all__ = ["Family", "pairwise_family", "geometric_family", "ema_family", "combine_into_",
           "EmaTrack", "live_targets", "stage_on_devices"]


@dataclass(frozen=True)
class Family:
    """A one-parameter family of averages of ``sources`` (names), parameter in ``[lo, hi]``.

    ``weights(t)`` gives one weight per source (≥ 0, summing to 1); ``latest_at`` is the parameter
    value that selects the latest weights alone; ``anchor`` is the far end evaluated first.
    """

    name: str
    sources: tuple[str, ...]
    lo: float
    hi: float
    latest_at: float
    anchor: float
    kind: str

    def weights(self, t: float) -> tuple[float, ...]:
        if self.kind == "lerp":  # sources = (other, latest), t = weight of the latest
            return (1.0 - t, t)
        k = len(self.sources)  # geometric, t = γ
        raw = [t ** (k - 1 - i) if (k - 1 - i) > 0 else 1.0 for i in range(k)]
        total = sum(raw)
        return tuple(r / total for r in raw)


def pairwise_family(previous: str, latest: str, alpha: float) -> Family:
    return Family("pairwise", (previous, latest), alpha, 1.0, 1.0, alpha, "lerp")


def geometric_family(snapshots: Sequence[str]) -> Family:
    if len(snapshots) < 3:
        raise ValueError(f"the geometric family needs >= 3 snapshots, got {len(snapshots)}")
    return Family(f"geometric{len(snapshots)}", tuple(snapshots), 0.0, 1.0, 0.0, 1.0, "geometric")


def ema_family(track: str, latest: str) -> Family:
    return Family(track, (track, latest), 0.0, 1.0, 1.0, 0.0, "lerp")


def combine_into_(out: Sequence[Tensor], sources: Sequence[Sequence[Tensor]],
                  weights: Sequence[float], lerp: bool) -> None:
    """Write ``Σ_i weights[i]·sources[i]`` into ``out`` (in place, tensor lists aligned).

    With ``lerp=True`` (two sources) this is ``torch.lerp(sources[0], sources[1], weights[1],
    out=...)`` per tensor (:func:`merge_callback.merge.lerp_tensors_`; ``out`` may be
    ``sources[0]`` itself). Otherwise sources are accumulated in source order with
    ``add_(alpha=w)`` after a copy and scale of the first. Sources with weight 0 are skipped.
    """
    out = list(out)
    with torch.no_grad():
        if lerp:  # one pass per tensor: reads both operands, writes once
            a, b = sources
            lerp_tensors_(out, list(a), list(b), float(weights[1]))
            return
        active = [(s, float(w)) for s, w in zip(sources, weights) if w != 0.0]
        first, w0 = active[0]
        torch._foreach_copy_(out, list(first))
        if w0 != 1.0:
            torch._foreach_mul_(out, w0)
        for src, w in active[1:]:
            _foreach_on_out_devices(lambda o, x, w=w: torch._foreach_add_(o, x, alpha=w), out,
                                    src)


def _foreach_on_out_devices(op: Callable[[list[Tensor], list[Tensor]], None], out: list[Tensor],
                            src: Sequence[Tensor]) -> None:
    """``op(out, src)`` with ``src`` copied to each ``out`` tensor's device where they differ;
    always the same multi-tensor kernel, so the result does not depend on where ``src`` lives
    (host snapshot or a copy on the device)."""
    if _same_devices(out, src):
        op(out, list(src))
        return
    for o, x in zip(out, src):
        op([o], [x.to(o.device, non_blocking=True)])


def _same_devices(out: Sequence[Tensor], src: Sequence[Tensor]) -> bool:
    """True when every pair is on one device (a model may span several devices)."""
    return all(o.device == x.device for o, x in zip(out, src))


class EmaTrack:
    """A host-side exponential moving average of a module's weights.

    ``decay`` is per training step; the track is updated every ``every`` steps with the equivalent
    decay ``decay ** every``. The first update copies the weights. Non-float tensors follow the
    latest weights.
    """

    def __init__(self, decay: float, every: int):
        if not (0.0 < decay < 1.0):
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.every = int(every)
        self.snapshot: Snapshot | None = None

    @property
    def name(self) -> str:
        return f"ema{self.decay:g}"

    def update(self, module: nn.Module, step: int, current: Snapshot | None = None) -> None:
        """Fold the module's current weights (or the given snapshot of them) into the track."""
        if self.snapshot is None:
            src = current if current is not None else Snapshot.capture(module, step)
            self.snapshot = Snapshot({k: v.clone() for k, v in src.tensors.items()}, step)
            return
        steps = max(1, step - self.snapshot.step)
        weight = 1.0 - self.decay ** steps
        cur = current.tensors if current is not None else {
            k: v.detach() for k, v in module.state_dict().items()}
        ema = self.snapshot.tensors
        keys = [k for k, v in ema.items() if is_mergeable(v)]
        seen: set[int] = set()
        with torch.no_grad():
            for k in keys:
                e = ema[k]
                if e.data_ptr() in seen:
                    continue
                seen.add(e.data_ptr())
                e.lerp_(cur[k].to(e.device, e.dtype), weight)
            for k, v in ema.items():
                if not is_mergeable(v):
                    v.copy_(cur[k])
        self.snapshot.step = int(step)


def live_targets(module: nn.Module, reference: Mapping[str, Tensor]) -> list[tuple[str, Tensor]]:
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
