"""Search for the merge weight λ ∈ [α, 1] under a fixed evaluation budget.

This is the only module that imports scikit-optimize, so the Bayesian backend can be swapped.
Every strategy evaluates λ = α and λ = 1 first (the paper's initial points; λ = 1 is the latest
checkpoint, so the best observed point is never worse than it), counts the budget in *distinct*
evaluations (a repeated proposal is answered from a cache and costs nothing) and returns the best
*observed* λ with every observation in evaluation order.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["STRATEGIES", "ACQ_FUNCS", "SearchResult", "search_lambda", "search_interval",
           "validate_search_args"]

STRATEGIES = ("bayes", "grid", "random", "greedy")
ACQ_FUNCS = ("gp_hedge", "EI", "PI", "LCB")
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class SearchResult:
    """Outcome of one λ search (plain floats only, safe to serialise).

    Attributes:
        lam: the best observed λ.
        value: the metric at ``lam``.
        observations: ``((λ, value), ...)`` in evaluation order, distinct λ only.
        strategy: the strategy used.
        acq_func: the acquisition function (``None`` unless ``strategy == "bayes"``).
    """

    lam: float
    value: float
    observations: tuple[tuple[float, float], ...]
    strategy: str
    acq_func: str | None = None

    @property
    def n_evaluations(self) -> int:
        return len(self.observations)

    def value_at(self, lam: float) -> float:
        for x, y in self.observations:
            if x == lam:
                return y
        raise KeyError(f"lambda {lam} was not evaluated")


def validate_search_args(alpha: float, budget: int, strategy: str, acq_func: str) -> None:
    """Raise ``ValueError`` naming the argument and what is allowed."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 3:
        raise ValueError(f"budget must be an integer >= 3 (held-out evaluations per round), "
                         f"got {budget!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}, "
                         f"got {strategy!r}")
    if acq_func not in ACQ_FUNCS:
        raise ValueError(f"acq_func must be one of {', '.join(map(repr, ACQ_FUNCS))}, "
                         f"got {acq_func!r}")


class _Evaluations:
    """Distinct-λ cache around the objective; keeps evaluation order."""

    def __init__(self, objective: Callable[[float], float], higher_is_better: bool, budget: int,
                 known: Mapping[float, float] | None = None):
        self.objective = objective
        self.sign = -1.0 if higher_is_better else 1.0
        self.budget = budget
        self.values: dict[float, float] = {self.key(k): float(v) for k, v in (known or {}).items()}

    def key(self, lam: float) -> float:
        return round(float(lam), 12)

    @property
    def done(self) -> bool:
        return len(self.values) >= self.budget

    def __call__(self, lam: float) -> float:
        """Return the metric at ``lam`` (evaluated once)."""
        k = self.key(lam)
        if k not in self.values:
            value = float(self.objective(k))
            if not math.isfinite(value):
                raise FloatingPointError(f"held-out metric is {value} at lambda={k:.6g}")
            self.values[k] = value
        return self.values[k]

    def loss(self, lam: float) -> float:
        """The minimised quantity (sign-adjusted metric)."""
        return self.sign * self(lam)

    def result(self, strategy: str, acq_func: str | None) -> SearchResult:
        obs = tuple(self.values.items())
        # best observed; ties go to the larger λ (closer to the latest checkpoint)
        lam, value = min(obs, key=lambda o: (self.sign * o[1], -o[0]))
        return SearchResult(lam, value, obs, strategy, acq_func)


def _largest_gap_midpoint(xs: Sequence[float], lo: float, hi: float) -> float:
    pts = sorted(set([lo, hi, *xs]))
    gaps = [(b - a, (a + b) / 2.0) for a, b in zip(pts, pts[1:])]
    return max(gaps)[1]


def search_lambda(objective: Callable[[float], float], *, alpha: float = 0.5, budget: int = 10,
                  strategy: str = "bayes", acq_func: str = "gp_hedge", seed: int = 0,
                  higher_is_better: bool = False, initial: Sequence[float] = (),
                  stop_tol: float | None = None) -> SearchResult:
    """Find the best λ ∈ [alpha, 1] with at most ``budget`` distinct evaluations of ``objective``.

    Args:
        objective: ``f(λ) -> metric`` (e.g. held-out loss of the soup at λ).
        alpha: lower bound of λ, in (0, 1).
        budget: distinct evaluations, ≥ 3, including λ = alpha and λ = 1.
        strategy: ``"bayes"`` (Gaussian process, scikit-optimize), ``"grid"`` (``budget`` evenly
            spaced points), ``"random"`` (uniform draws) or ``"greedy"`` (golden-section search).
        acq_func: acquisition for ``"bayes"``: ``"gp_hedge"`` (portfolio of EI, PI, LCB), ``"EI"``,
            ``"PI"`` or ``"LCB"``.
        seed: makes ``"bayes"`` and ``"random"`` deterministic.
        higher_is_better: maximise instead of minimise.
        initial: extra λ values evaluated right after alpha and 1 (e.g. last round's best λ);
            values outside [alpha, 1] are clipped.
        stop_tol: see :func:`search_interval`; ``None`` always spends the whole budget.

    Returns:
        SearchResult with the best observed λ and all observations.

    Raises:
        ValueError: on invalid arguments.
        FloatingPointError: if the objective returns NaN or ±inf.

    Example:
        >>> r = search_lambda(lambda x: (x - 0.7) ** 2, alpha=0.5, budget=8, strategy="grid")
        >>> round(r.lam, 3), r.n_evaluations
        (0.714, 8)
    """
    validate_search_args(alpha, budget, strategy, acq_func)
    return search_interval(objective, float(alpha), 1.0, budget=budget, strategy=strategy,
                           acq_func=acq_func, seed=seed, higher_is_better=higher_is_better,
                           initial=initial, stop_tol=stop_tol)


def search_interval(objective: Callable[[float], float], lo: float, hi: float, *, budget: int,
                    strategy: str = "bayes", acq_func: str = "gp_hedge", seed: int = 0,
                    higher_is_better: bool = False, initial: Sequence[float] = (),
                    known: Mapping[float, float] | None = None,
                    stop_tol: float | None = None) -> SearchResult:
    """Like :func:`search_lambda` on any interval ``[lo, hi]``, ``lo`` and ``hi`` evaluated first.

    Args:
        known: observations made earlier (``{x: value}``); they are not re-evaluated but count
            towards ``budget`` and appear first in the observations.
        stop_tol: ``"bayes"`` only: stop before ``budget`` is spent once the Gaussian process
            expects no point to improve on the best observation by ``stop_tol`` or more (in the
            metric's units, e.g. nats for the loss).
        initial: points evaluated right after the endpoints (clipped to the interval).
        Other arguments as in :func:`search_lambda`; ``budget`` ≥ 1.

    Raises:
        ValueError: on invalid arguments.
        FloatingPointError: if the objective returns NaN or ±inf.
    """
    if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo < hi):
        raise ValueError(f"the search interval needs lo < hi, got [{lo!r}, {hi!r}]")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}, "
                         f"got {strategy!r}")
    if acq_func not in ACQ_FUNCS:
        raise ValueError(f"acq_func must be one of {', '.join(map(repr, ACQ_FUNCS))}, "
                         f"got {acq_func!r}")
    if stop_tol is not None and (isinstance(stop_tol, bool) or
                                 not isinstance(stop_tol, (int, float)) or not stop_tol > 0):
        raise ValueError(f"stop_tol must be a positive number or None, got {stop_tol!r}")
    lo, hi = float(lo), float(hi)
    ev = _Evaluations(objective, higher_is_better, budget, known)
    for x in (lo, hi, *[min(hi, max(lo, float(x))) for x in initial]):
        if ev.done:
            break
        ev(x)

    if strategy == "grid":
        for x in np.linspace(lo, hi, budget)[1:-1]:
            if ev.done:
                break
            ev(float(x))
        # a warm-start point can take a grid point's place in the budget: fill any gap left
        while not ev.done:
            ev(_largest_gap_midpoint(list(ev.values), lo, hi))
    elif strategy == "random":
        rng = np.random.default_rng(seed)
        while not ev.done:
            ev(float(rng.uniform(lo, hi)))
    elif strategy == "greedy":
        _golden_section(ev, lo, hi)
    elif not ev.done:
        _bayes(ev, lo, hi, acq_func, seed, stop_tol)
    return ev.result(strategy, acq_func if strategy == "bayes" else None)


def _golden_section(ev: _Evaluations, lo0: float, hi0: float) -> None:
    lo, hi = lo0, hi0
    while not ev.done:
        c = hi - _GOLDEN * (hi - lo)
        d = lo + _GOLDEN * (hi - lo)
        fc = ev.loss(c)
        if ev.done:
            break
        fd = ev.loss(d)
        if fc < fd:
            hi = d
        else:
            lo = c
        if hi - lo < 1e-6 * (hi0 - lo0):
            while not ev.done:
                ev(_largest_gap_midpoint(list(ev.values), lo0, hi0))


def _gp_optimizer(dimensions: list, acq_func: str, n_initial_points: int, seed: int,
                  n_points: int):
    """A scikit-optimize GP ``Optimizer`` (the package's one use of scikit-optimize)."""
    from skopt import Optimizer

    return Optimizer(dimensions, base_estimator="GP", acq_func=acq_func,
                     n_initial_points=n_initial_points, random_state=seed,
                     acq_optimizer="sampling", acq_optimizer_kwargs={"n_points": n_points})


def _quiet_gp() -> contextlib.ExitStack:
    """One BLAS thread for the tiny GP fits (more only compete with training for cores; the limit
    is kept away from the objective, whose torch threads it would cap too); sklearn's
    convergence warnings on tiny, flat data sets are harmless."""
    from threadpoolctl import threadpool_limits  # comes with scikit-learn

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(threadpool_limits(limits=1))
    return stack


def _bayes(ev: _Evaluations, lo: float, hi: float, acq_func: str, seed: int,
           stop_tol: float | None = None) -> None:
    told = list(ev.values.items())
    opt = _gp_optimizer([(lo, hi)], acq_func, len(told), seed, 1000)
    quiet_gp = _quiet_gp

    with quiet_gp():
        opt.tell([[x] for x, _ in told], [ev.sign * y for _, y in told])
    while not ev.done:
        with quiet_gp():
            if (stop_tol is not None and len(ev.values) >= 4
                    and _max_expected_improvement(opt, lo, hi) < stop_tol):
                break
            x = float(opt.ask()[0])
        if min(abs(x - seen) for seen in ev.values) < 1e-4 * (hi - lo):
            # the GP proposes an observed point again: explore the widest unexplored gap
            x = _largest_gap_midpoint(list(ev.values), lo, hi)
        y = ev.loss(x)
        with quiet_gp():
            opt.tell([x], y)


def _max_expected_improvement(opt, lo: float, hi: float) -> float:
    """Largest expected improvement (in metric units) of the fitted GP over a 201-point grid."""
    from skopt.acquisition import gaussian_ei

    if not opt.models:
        return math.inf
    grid = [[float(x)] for x in np.linspace(lo, hi, 201)]
    ei = gaussian_ei(opt.space.transform(grid), opt.models[-1], y_opt=float(np.min(opt.yi)),
                     xi=0.0)
    return float(np.max(ei))


__all__ += ["bayes_simplex"]


def _simplex_point(x: Sequence[float]) -> tuple[float, ...]:
    """Normalise non-negative ``x`` onto the simplex (all zeros → uniform)."""
    xs = [max(0.0, float(v)) for v in x]
    total = sum(xs)
    if total <= 0.0:
        return tuple(1.0 / len(xs) for _ in xs)
    return tuple(v / total for v in xs)


def bayes_simplex(loss: Callable[[tuple[float, ...]], float], n: int, *, budget: int,
                  initial: Sequence[Sequence[float]] = (), acq_func: str = "gp_hedge",
                  seed: int = 0) -> tuple[tuple[tuple[float, ...], float], ...]:
    """Minimise ``loss(weights)`` over the simplex with a Gaussian process (scikit-optimize).

    Points are sampled unnormalised in ``[0, 1]^n`` and divided by their sum, so weights are
    ``≥ 0`` and sum to 1. ``initial`` points (weights) are evaluated first, in order. The budget
    counts distinct weight vectors (compared after rounding to 12 decimals): a proposal that
    normalises to an observed point is answered from the cache; if the GP keeps proposing observed points, random
    simplex points fill the rest of the budget.

    Args:
        loss: the minimised quantity, called with a tuple of ``n`` weights.
        n: number of weights, ≥ 2.
        budget: distinct evaluations, ≥ 1.
        initial: warm-start weight vectors (each normalised onto the simplex).
        acq_func: ``"gp_hedge"``, ``"EI"``, ``"PI"`` or ``"LCB"``.
        seed: makes the search deterministic.

    Returns:
        ``((weights, loss), ...)`` in evaluation order.

    Raises:
        ValueError: on invalid arguments.
        FloatingPointError: if ``loss`` returns NaN or ±inf.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2 (number of checkpoints), got {n!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
    if acq_func not in ACQ_FUNCS:
        raise ValueError(f"acq_func must be one of {', '.join(map(repr, ACQ_FUNCS))}, "
                         f"got {acq_func!r}")
    values: dict[tuple[float, ...], float] = {}

    points: dict[tuple[float, ...], tuple[float, ...]] = {}

    def evaluate(x: Sequence[float]) -> tuple[tuple[float, ...], float]:
        w = _simplex_point(x)
        key = tuple(round(v, 12) for v in w)
        if key not in values:
            y = float(loss(w))
            if not math.isfinite(y):
                raise FloatingPointError(f"held-out metric is {y} at weights {list(w)}")
            values[key] = y
            points[key] = w
        return points[key], values[key]

    told_x: list[list[float]] = []
    told_y: list[float] = []
    for point in initial:
        if len(values) >= budget:
            break
        if len(point) != n:
            raise ValueError(f"initial point {list(point)} has {len(point)} weights, expected {n}")
        w, y = evaluate(point)
        told_x.append(list(w))
        told_y.append(y)
    if len(values) >= budget:
        return tuple((points[k], v) for k, v in values.items())

    rng = np.random.default_rng(seed)
    opt = _gp_optimizer([(0.0, 1.0)] * n, acq_func, max(2, len(told_x)), seed, 2000)

    def gp(call, *args):
        with _quiet_gp():
            return call(*args)

    if told_x:
        gp(opt.tell, told_x, told_y)
    asks = 0
    while len(values) < budget:
        asks += 1
        if asks > 5 * budget + 20:
            x = list(rng.dirichlet(np.ones(n)))
        else:
            x = [float(v) for v in gp(opt.ask)]
        _, y = evaluate(x)
        gp(opt.tell, x, y)
    return tuple((points[k], v) for k, v in values.items())
