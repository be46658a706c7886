"""Averaging families: one-parameter curves of averages over named host copies of the weights.

A round has *sources* (host snapshots: the previous checkpoint, recent snapshots, EMA tracks, and
always the latest weights) and *families*, each a one-parameter curve through the simplex of its
sources:

- ``pairwise``: ``lerp(previous, latest, λ)``, λ ∈ [α, 1] (the paper's soup);
- ``geometric``: weights ``w_i ∝ γ^(k−1−i)`` over the last ``k`` snapshots (``i = k−1`` is the
  latest), γ ∈ [0, 1]: γ = 0 is the latest alone, γ = 1 the uniform average (LAWA);
- ``ema``: ``lerp(ema_d, latest, λ)``, λ ∈ [0, 1]: λ = 0 is the EMA track itself.

``averaging="auto"`` uses an :class:`AutoPlan` instead: weighted sums (*mixes*) of
:class:`StoredWeights` — snapshot files on disk and host tensors (the latest weights, the live
power-function EMA tracks) — written into the live tensors through one fp32 host scratch by
:func:`mix_into_`.

:func:`combine_into_` writes any family member into a list of tensors (the live module's, in
place, or new host tensors) with one kernel, wherever the operands live.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from merge_callback.engine.snapshot import Snapshot
from merge_callback.merge import check_compatible, is_mergeable, lerp_tensors_, storage_ident

__all__ = ["Family", "pairwise_family", "geometric_family", "ema_family", "combine_into_",
           "EmaTrack", "live_targets", "stage_on_devices", "mix_scratch", "StoredWeights",
           "effective_mix", "mix_into_", "AutoPlan"]


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


# --------------------------------------------------------------------------- averaging="auto"


@dataclass(frozen=True, eq=False)
class StoredWeights:
    """One input of a mix: ``name`` (the snapshot kind, e.g. ``"raw"`` or ``"phema0.05"``), the
    training ``step`` and the weights: a :class:`merge_callback.posthoc.SnapshotEntry` (a file
    read one tensor at a time) or a ``{key: tensor}`` mapping in host memory. Compared by
    identity: one object per input of a round."""

    name: str
    step: int
    source: Any

    def label(self) -> dict[str, Any]:
        return {"name": self.name, "step": int(self.step)}


#: a weighted sum of stored weights, ``((input, weight), ...)``
Mix = tuple[tuple[StoredWeights, float], ...]


def effective_mix(mix: Sequence[tuple[StoredWeights, float]]) -> Mix:
    """The weights :func:`mix_into_` applies: repeated inputs merged (first occurrence order),
    weights below ``NEGLIGIBLE_WEIGHT · Σ|w|`` dropped and the rest scaled to keep ``Σ w``
    (the rule of :meth:`merge_callback.posthoc.SnapshotStore.accumulate_into_`).

    Raises:
        ValueError: non-finite weights or weights summing to 0.
    """
    from merge_callback.posthoc import NEGLIGIBLE_WEIGHT

    merged: dict[StoredWeights, float] = {}
    for src, w in mix:
        merged[src] = merged.get(src, 0.0) + float(w)
    pairs = list(merged.items())
    if not pairs or not all(math.isfinite(w) for _, w in pairs):
        raise ValueError(f"mix weights must be finite and non-empty, got {[w for _, w in pairs]}")
    total = math.fsum(w for _, w in pairs)
    abs_total = math.fsum(abs(w) for _, w in pairs)
    if total == 0 or abs_total == 0:
        raise ValueError("the mix weights sum to 0")
    kept = [(s, w) for s, w in pairs if w != 0 and abs(w) >= NEGLIGIBLE_WEIGHT * abs_total]
    scale = total / math.fsum(w for _, w in kept)
    return tuple((s, w * scale) for s, w in kept)


def mix_into_(live: Sequence[Tensor], keys: Sequence[str], mix: Mix,
              scratch: Mapping[str, Tensor]) -> None:
    """Write the mix into ``live`` (aligned with ``keys``): ``Σ w·input`` accumulated in fp32 in
    the host ``scratch`` (``{key: fp32 tensor}``, one per key) by
    :meth:`~merge_callback.posthoc.SnapshotStore.accumulate_into_`, then copied into each live
    tensor in its dtype. ``mix`` must be an :func:`effective_mix` (applied as given)."""
    from merge_callback.posthoc import SnapshotStore

    SnapshotStore.accumulate_into_(scratch, [(s.source, w) for s, w in mix], negligible=0.0)
    with torch.no_grad():
        for t, k in zip(live, keys):
            if scratch[k] is not t:  # a live fp32 host tensor is its own scratch
                t.copy_(scratch[k])


def mix_scratch(keys: Sequence[str], live: Sequence[Tensor]) -> dict[str, Tensor]:
    """The fp32 host scratch :func:`mix_into_` accumulates in: a live tensor that is already fp32
    on the CPU is used itself (no further copy of the weights; the sum is the same, bitwise),
    others get a new fp32 host tensor."""
    return {k: t if (t.dtype == torch.float32 and t.device.type == "cpu")
            else torch.empty(t.shape, dtype=torch.float32) for k, t in zip(keys, live)}


@dataclass
class AutoPlan:
    """The candidates of an ``averaging="auto"`` round at ``step``, over stored weights.

    Attributes:
        step: the latest weights' step.
        latest: the latest weights (an input named ``"raw"`` at ``step``).
        raws: raw snapshots of the saves, oldest first, ending with ``latest``.
        tracks: ``(input, gamma)`` of every power-function EMA snapshot at or before ``step``
            (the live tracks included, as inputs at ``step``).
        alpha: the pairwise soup's lower bound.
        mode: the :class:`~merge_callback.engine.options.AutoMode` settings.
    """

    step: int
    latest: StoredWeights
    raws: list[StoredWeights]
    tracks: list[tuple[StoredWeights, float]]
    alpha: float
    mode: Any

    @property
    def previous(self) -> StoredWeights | None:
        return self.raws[-2] if len(self.raws) >= 2 else None

    def latest_mix(self) -> Mix:
        return ((self.latest, 1.0),)

    def phema_mix(self, sigma_rel: float) -> tuple[Mix, list[float]]:
        """Post-hoc EMA of relative width ``sigma_rel`` ending at ``step``, and its least-squares
        coefficients (one per track snapshot, summing to 1)."""
        from merge_callback.posthoc import reconstruction_weights

        c = reconstruction_weights([s.step for s, _ in self.tracks], [g for _, g in self.tracks],
                                   sigma_rel, self.step)
        return tuple((s, float(w)) for (s, _), w in zip(self.tracks, c.tolist())), \
            [float(x) for x in c.tolist()]

    def window_size(self, W: int) -> int:
        """``W`` clipped to the saves available."""
        return max(1, min(int(W), len(self.raws)))

    def window_mix(self, W: int) -> Mix:
        from merge_callback.posthoc import window_weights

        W = self.window_size(W)
        w = window_weights(self.mode.window_kind, W)
        return tuple(zip(self.raws[-W:], w))

    def pair_mix(self, lam: float) -> Mix:
        assert self.previous is not None
        return ((self.previous, 1.0 - lam), (self.latest, lam))

    def blend_mix(self, base: Mix, mu: float) -> Mix:
        return tuple((s, mu * w) for s, w in base) + ((self.latest, 1.0 - mu),)

    def mix(self, family: str, param: float, base: tuple[str, float] | None = None) -> Mix:
        """The candidate ``family`` at ``param`` (``"latest"``, ``"phema"`` σ_rel, ``"window"``
        W, ``"pairwise"`` λ, ``"blend"`` μ of the ``base`` ``(family, param)``) as an
        :func:`effective_mix`.

        Raises:
            ValueError: an unknown family, or a blend without its base.
        """
        if family == "latest":
            raw = self.latest_mix()
        elif family == "phema":
            raw = self.phema_mix(param)[0]
        elif family == "window":
            raw = self.window_mix(int(param))
        elif family == "pairwise":
            raw = self.pair_mix(param)
        elif family == "blend":
            if base is None or base[0] == "blend":
                raise ValueError("a blend needs the (family, param) it blends with the latest")
            raw = self.blend_mix(self.mix(*base), param)
        else:
            raise ValueError(f"unknown auto family {family!r}")
        return effective_mix(raw)
