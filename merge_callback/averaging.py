"""Search the averaging itself: pairwise soups, geometric weights over recent snapshots, EMA tracks.

A round has *sources* (host copies of the weights: recent snapshots, the previous checkpoint, EMA
tracks, and always the latest weights) and *families* of candidate averages, each a one-parameter
curve through the simplex of its sources:

- ``pairwise``: ``lerp(previous, latest, λ)``, λ ∈ [α, 1] (the paper's soup);
- ``geometric``: weights ``w_i ∝ γ^(k−1−i)`` over the last ``k`` snapshots (``i = k−1`` is the
  latest), γ ∈ [0, 1]: γ = 0 is the latest alone, γ = 1 the uniform average (LAWA);
- ``ema``: ``lerp(ema_d, latest, λ)``, λ ∈ [0, 1]: λ = 0 is the EMA track itself.

Every family contains the latest weights, which are evaluated first, so the chosen soup is never
worse than the latest weights on the held-out data. The budget is shared: one evaluation of each
family's far end (its "anchor"), then the remaining evaluations refine the family whose anchor did
best with the 1-D search of :mod:`merge_callback.search`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from merge_callback.engine import (MergeRoundError, RoundResult, Snapshot, _live_targets,
                                   soup_from_live, stage_on_devices)
from merge_callback.merge import check_compatible, is_mergeable
from merge_callback.search import search_interval

__all__ = ["Family", "pairwise_family", "geometric_family", "ema_family", "combine_into_",
           "combine", "EmaTrack", "run_averaging_round"]


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

    With ``lerp=True`` (two sources) this is ``torch.lerp(sources[0], sources[1], weights[1])``
    bitwise. Otherwise sources are accumulated in source order with ``add_(alpha=w)`` after a
    copy and scale of the first. Sources with weight 0 are skipped.
    """
    out = list(out)
    with torch.no_grad():
        if lerp:
            a, b = sources
            t = float(weights[1])
            torch._foreach_copy_(out, list(a) if t != 1.0 else list(b))
            if 0.0 < t < 1.0:
                _foreach_on_out_devices(lambda o, x: torch._foreach_lerp_(o, x, t), out, b)
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


def combine(family: Family, t: float, sources: Mapping[str, Mapping[str, Tensor]],
            latest: Mapping[str, Tensor], module: nn.Module | None = None) -> dict[str, Tensor]:
    """The full state dict of ``family`` at ``t`` (new host tensors; non-float from ``latest``).

    ``module``: the live module the round scored in (holding ``latest``); when its weights are not
    on the CPU the average is computed there, as it was when scored, and copied back (see
    :func:`merge_callback.engine.soup_state_dict`).
    """
    if module is not None:
        targets = _live_targets(module, latest)
        if any(x.device.type != "cpu" for _, x in targets):
            keys = [k for k, _ in targets]
            live = [x for _, x in targets]
            dests = [torch.empty_like(latest[k]) for k in keys]
            srcs = stage_on_devices(live, [[sources[n][k] for k in keys]
                                           for n in family.sources])  # as in the round
            return soup_from_live(latest, keys, live, dests, lambda: combine_into_(
                live, srcs, family.weights(t), family.kind == "lerp"))
    keys = [k for k, v in latest.items() if is_mergeable(v)]
    out_t = {k: torch.empty_like(latest[k]) for k in keys}
    combine_into_([out_t[k] for k in keys], [[sources[n][k] for k in keys] for n in family.sources],
                  family.weights(t), family.kind == "lerp")
    return {k: (out_t[k] if k in out_t else v.clone()) for k, v in latest.items()}


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


def run_averaging_round(module: nn.Module, sources: Mapping[str, Snapshot], latest_name: str,
                        families: Sequence[Family], evaluate: Callable[[nn.Module], float], *,
                        budget: int, strategy: str = "bayes", acq_func: str = "gp_hedge",
                        seed: int = 0, metric: str = "loss", higher_is_better: bool = False,
                        alpha: float = 0.5, value_previous: float | None = None,
                        previous_name: str | None = None,
                        on_evaluation: Callable[[float, float], None] | None = None
                        ) -> RoundResult:
    """Choose the best average among ``families`` with at most ``budget`` evaluations.

    The live ``module`` must hold the weights of ``sources[latest_name]`` on entry; it holds them
    again (bitwise) on return, also after an exception.

    Returns:
        RoundResult whose ``lam`` is the weight of the latest weights in the chosen soup, with
        ``extras``: ``family``, ``param``, ``inputs`` (source names and steps), ``weights`` and
        ``candidates`` (every evaluation as ``{"family", "param", "value"}`` in order).

    Raises:
        MergeRoundError: incompatible sources, a NaN/inf metric.
    """
    t0 = time.perf_counter()
    latest = sources[latest_name]
    try:
        for name, snap in sources.items():
            if name != latest_name:
                check_compatible(snap.tensors, latest.tensors, (name, latest_name))
        targets = _live_targets(module, latest.tensors)
    except ValueError as e:
        raise MergeRoundError(f"cannot average at step {latest.step}: {e}") from e
    keys = [k for k, _ in targets]
    live = [t for _, t in targets]
    names = list(sources)
    src_lists = dict(zip(names, stage_on_devices(
        live, [[sources[n].tensors[k] for k in keys] for n in names])))
    sign = -1.0 if higher_is_better else 1.0
    candidates: list[dict] = []
    cache: dict[tuple, float] = {}

    def evaluate_weights(family: Family, t: float) -> float:
        w = family.weights(t)
        active = tuple((n, round(x, 12)) for n, x in zip(family.sources, w) if x != 0.0)
        if active == ((latest_name, 1.0),):
            active = ("latest",)
        if active not in cache:
            combine_into_(live, [src_lists[n] for n in family.sources], w, family.kind == "lerp")
            value = float(evaluate(module))
            if not math.isfinite(value):
                raise FloatingPointError(f"held-out metric is {value} for {family.name} at {t:.6g}")
            cache[active] = value
            if on_evaluation is not None:
                on_evaluation(t, value)
        candidates.append({"family": family.name, "param": float(t), "value": cache[active]})
        return cache[active]

    def evaluations() -> int:
        return len(cache)

    try:
        value_latest = evaluate_weights(families[0], families[0].latest_at)
        anchors: list[tuple[float, Family]] = []
        for fam in families:
            if evaluations() >= budget:
                break
            anchors.append((sign * evaluate_weights(fam, fam.anchor), fam))
        per_family: dict[str, dict[float, float]] = {
            f.name: {f.latest_at: value_latest} for f in families}
        for score, fam in anchors:
            per_family[fam.name][fam.anchor] = sign * score
        if anchors and evaluations() < budget:
            best_fam = min(anchors, key=lambda a: a[0])[1]
            known = per_family[best_fam.name]
            search_interval(lambda t: evaluate_weights(best_fam, t), best_fam.lo, best_fam.hi,
                            budget=len(known) + budget - evaluations(), strategy=strategy,
                            acq_func=acq_func, seed=seed, higher_is_better=higher_is_better,
                            known=known)
        if value_previous is None and previous_name is not None:
            fam = next(f for f in families if f.name == "pairwise")
            value_previous = evaluate_weights(fam, 0.0)
            candidates.pop()
    except FloatingPointError as e:
        raise MergeRoundError(f"averaging round at step {latest.step}: {e}; no soup was written") \
            from e
    finally:
        combine_into_(live, [src_lists[latest_name]], (1.0,), False)
    fam_by_name = {f.name: f for f in families}
    best = min(candidates, key=lambda c: (sign * c["value"],
                                          -fam_by_name[c["family"]].weights(c["param"])[-1]))
    fam = fam_by_name[best["family"]]
    weights = fam.weights(best["param"])
    return RoundResult(
        step=latest.step,
        previous_step=sources[previous_name].step if previous_name else latest.step,
        lam=float(weights[-1]), value_soup=best["value"], value_latest=value_latest,
        value_previous=float(value_previous) if value_previous is not None else math.nan,
        observations=tuple((c["param"], c["value"]) for c in candidates
                           if c["family"] == best["family"]),
        metric=metric, higher_is_better=higher_is_better, alpha=alpha, budget=budget,
        strategy=strategy, acq_func=acq_func if strategy == "bayes" else None,
        seconds=time.perf_counter() - t0, extra_evaluations=max(0, evaluations() - budget),
        extras={"family": fam.name, "param": best["param"],
                "inputs": [{"name": n, "step": sources[n].step} for n in fam.sources],
                "weights": list(weights), "candidates": candidates,
                "evaluations": evaluations()})
