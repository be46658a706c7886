"""Search for the merge weight λ ∈ [α, 1] under a fixed evaluation budget.

This is the only module that imports scikit-optimize, so the Bayesian backend can be swapped.
Every strategy evaluates λ = α and λ = 1 first (the paper's initial points; λ = 1 is the latest
checkpoint, so the best observed point is never worse than it), counts the budget in *distinct*
evaluations (a repeated proposal is answered from a cache and costs nothing) and returns the best
*observed* λ with every observation in evaluation order.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["STRATEGIES", "ACQ_FUNCS", "SearchResult", "search_lambda", "validate_search_args"]

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

    def __init__(self, objective: Callable[[float], float], higher_is_better: bool, budget: int):
        self.objective = objective
        self.sign = -1.0 if higher_is_better else 1.0
        self.budget = budget
        self.values: dict[float, float] = {}

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
                  higher_is_better: bool = False, initial: Sequence[float] = ()) -> SearchResult:
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
    alpha = float(alpha)
    ev = _Evaluations(objective, higher_is_better, budget)
    for lam in (alpha, 1.0, *[min(1.0, max(alpha, float(x))) for x in initial]):
        if ev.done:
            break
        ev(lam)

    if strategy == "grid":
        for lam in np.linspace(alpha, 1.0, budget)[1:-1]:
            if ev.done:
                break
            ev(float(lam))
        # a warm-start point can take a grid point's place in the budget: fill any gap left
        while not ev.done:
            ev(_largest_gap_midpoint(list(ev.values), alpha, 1.0))
    elif strategy == "random":
        rng = np.random.default_rng(seed)
        while not ev.done:
            ev(float(rng.uniform(alpha, 1.0)))
    elif strategy == "greedy":
        _golden_section(ev, alpha)
    else:
        _bayes(ev, alpha, acq_func, seed)
    return ev.result(strategy, acq_func if strategy == "bayes" else None)


def _golden_section(ev: _Evaluations, alpha: float) -> None:
    lo, hi = alpha, 1.0
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
        if hi - lo < 1e-6:
            while not ev.done:
                ev(_largest_gap_midpoint(list(ev.values), alpha, 1.0))


def _bayes(ev: _Evaluations, alpha: float, acq_func: str, seed: int) -> None:
    from skopt import Optimizer  # the only scikit-optimize import in the package

    told = list(ev.values.items())
    opt = Optimizer([(alpha, 1.0)], base_estimator="GP", acq_func=acq_func,
                    n_initial_points=len(told), random_state=seed, acq_optimizer="sampling",
                    acq_optimizer_kwargs={"n_points": 1000})
    with warnings.catch_warnings():
        # sklearn's GP warns about convergence on tiny, flat data sets; harmless here
        warnings.simplefilter("ignore")
        opt.tell([[x] for x, _ in told], [ev.sign * y for _, y in told])
        while not ev.done:
            x = float(opt.ask()[0])
            if min(abs(x - seen) for seen in ev.values) < 1e-4 * (1.0 - alpha):
                # the GP proposes an observed point again: explore the widest unexplored gap
                x = _largest_gap_midpoint(list(ev.values), alpha, 1.0)
            opt.tell([x], ev.loss(x))
