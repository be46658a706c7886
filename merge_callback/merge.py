"""Pure tensor math for checkpoint merging.

Everything here works on state dicts (``Mapping[str, Tensor]``) or on lists of tensors and has no
knowledge of training frameworks. The pairwise soup is

    soup(λ) = λ·latest + (1 − λ)·previous = torch.lerp(previous, latest, λ)

computed with ``torch.lerp`` so that λ = 1 returns ``latest`` and λ = 0 returns ``previous`` exactly.
Floating-point tensors are merged; integer and bool tensors (step counters, masks) are taken from
the latest checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "is_mergeable",
    "check_compatible",
    "lerp_state_dicts",
    "weighted_average",
    "lerp_tensors_",
    "unique_tensors",
    "storage_ident",
]


def is_mergeable(t: Tensor) -> bool:
    """True for tensors that are averaged (floating point); others are copied from the latest."""
    return t.is_floating_point()


def check_compatible(reference: Mapping[str, Tensor], other: Mapping[str, Tensor],
                     names: tuple[str, str] = ("previous", "latest")) -> None:
    """Raise ``ValueError`` naming the first tensor whose key, shape or dtype disagrees.

    Args:
        reference: first state dict.
        other: second state dict.
        names: how the two are called in the message.
    """
    a, b = names
    missing = [k for k in reference if k not in other]
    extra = [k for k in other if k not in reference]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) only in {a} (e.g. {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} key(s) only in {b} (e.g. {extra[0]!r})")
        raise ValueError("checkpoints have different tensors: " + "; ".join(parts))
    for key, ta in reference.items():
        tb = other[key]
        if ta.shape != tb.shape:
            raise ValueError(f"tensor {key!r} has shape {tuple(ta.shape)} in {a} "
                             f"but {tuple(tb.shape)} in {b}")
        if ta.dtype != tb.dtype:
            raise ValueError(f"tensor {key!r} has dtype {ta.dtype} in {a} but {tb.dtype} in {b}")


def _check_weight(lam: float, name: str = "lam") -> float:
    lam = float(lam)
    if not (0.0 <= lam <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {lam}")
    return lam


def lerp_state_dicts(previous: Mapping[str, Tensor], latest: Mapping[str, Tensor],
                     lam: float) -> dict[str, Tensor]:
    """Return ``{k: torch.lerp(previous[k], latest[k], lam)}`` as a new state dict.

    Non-floating tensors are taken (cloned) from ``latest``. Keys keep ``latest``'s order.

    Raises:
        ValueError: if keys, shapes or dtypes disagree, or ``lam`` is outside [0, 1].

    Example:
        >>> a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
        >>> lerp_state_dicts(a, b, 0.25)["w"].tolist()
        [0.25, 0.25]
    """
    lam = _check_weight(lam)
    check_compatible(previous, latest)
    out: dict[str, Tensor] = {}
    for key, t in latest.items():
        if is_mergeable(t):
            out[key] = torch.lerp(previous[key], t, lam)
        else:
            out[key] = t.clone()
    return out


def weighted_average(state_dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float],
                     accumulate_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Return ``Σ_i w_i·θ_i`` for weights on the simplex (w_i ≥ 0, Σ w_i = 1).

    Accumulates in ``accumulate_dtype`` (or the tensor's dtype if wider) and casts back. Non-floating
    tensors come from the last state dict (the latest checkpoint).

    Raises:
        ValueError: on an empty list, a length mismatch, negative weights or weights whose sum is
            not 1 (tolerance 1e-6), or incompatible state dicts.
    """
    if len(state_dicts) == 0:
        raise ValueError("weighted_average needs at least one state dict, got none")
    if len(weights) != len(state_dicts):
        raise ValueError(f"got {len(weights)} weights for {len(state_dicts)} state dicts")
    ws = [float(w) for w in weights]
    if any(w < 0 or w != w for w in ws):
        raise ValueError(f"weights must be >= 0, got {ws}")
    if abs(sum(ws) - 1.0) > 1e-6:
        raise ValueError(f"weights must sum to 1, got sum {sum(ws):.8g} for {ws}")
    latest = state_dicts[-1]
    for i, sd in enumerate(state_dicts[:-1]):
        check_compatible(sd, latest, (f"checkpoint {i}", f"checkpoint {len(state_dicts) - 1}"))
    out: dict[str, Tensor] = {}
    for key, t in latest.items():
        if not is_mergeable(t):
            out[key] = t.clone()
            continue
        acc_dtype = t.dtype if torch.finfo(t.dtype).bits > torch.finfo(accumulate_dtype).bits \
            else accumulate_dtype
        acc = torch.zeros(t.shape, dtype=acc_dtype, device=t.device)
        for sd, w in zip(state_dicts, ws):
            if w != 0.0:
                acc.add_(sd[key].to(acc_dtype), alpha=w)
        out[key] = acc.to(t.dtype)
    return out


def lerp_tensors_(out: Sequence[Tensor], previous: Sequence[Tensor], latest: Sequence[Tensor],
                  lam: float) -> None:
    """In place: ``out[i] = torch.lerp(previous[i], latest[i], lam)``, bitwise like ``torch.lerp``.

    ``out`` may live on another device than the inputs (e.g. live weights on a GPU, inputs in host
    memory): the inputs are copied over first and merged by the same ``torch.lerp(out=)`` call as
    inputs already on that device, so the result does not depend on where the inputs live.
    ``out`` tensors must not share storage with each other (see :func:`unique_tensors`).
    """
    lam = _check_weight(lam)
    if not (len(out) == len(previous) == len(latest)):
        raise ValueError(f"length mismatch: out {len(out)}, previous {len(previous)}, "
                         f"latest {len(latest)}")
    if not out:
        return
    with torch.no_grad():
        if lam == 1.0:
            torch._foreach_copy_(list(out), list(latest))
            return
        if lam == 0.0:
            torch._foreach_copy_(list(out), list(previous))
            return
        for o, a, b in zip(out, previous, latest):
            if not o.device == a.device == b.device:
                a = a.to(o.device, non_blocking=True)
                b = b.to(o.device, non_blocking=True)
            torch.lerp(a, b, lam, out=o)  # one pass: reads both inputs, writes once


def storage_ident(t: Tensor) -> tuple:
    """Identifies tensors that are the same memory (tied weights)."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            tuple(t.stride()), t.dtype)


def unique_tensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop entries that alias an earlier entry's memory (tied weights), keeping the first key."""
    seen: set[tuple] = set()
    out: dict[str, Tensor] = {}
    for key, t in state_dict.items():
        ident = storage_ident(t)
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = t
    return out
