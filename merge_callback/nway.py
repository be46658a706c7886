"""Search merge weights for N checkpoints on the simplex.

The soup is ``θ = Σ_i α_i·θ_i`` with ``α_i ≥ 0`` and ``Σ_i α_i = 1``. Searches sample unnormalised
weights in ``[0, 1]^N`` and divide by their sum ("Recycle Them", Khalifa et al. 2024). Methods:

* ``"cmaes"``: CMA-ES from Optuna, population ``4 + ⌊3·ln N⌋``, started at the centre of
  ``[0, 1]^N`` (uniform weights) with step size ``sigma0`` (Optuna's default: 1/6);
* ``"bayes"``: a Gaussian process over the same parametrisation
  (:func:`merge_callback.search.bayes_simplex`);
* ``"greedy"``: greedy soup (Wortsman et al. 2022): checkpoints sorted by score, best first, each
  added to the uniform soup only if the soup's score improves (``2N − 1`` evaluations at most);
* ``"uniform"``: the uniform soup alone.

``cmaes`` and ``bayes`` first evaluate each checkpoint alone and the uniform soup (the warm start),
so the best observed point is never worse than the best single checkpoint or the uniform soup.
The budget counts distinct weight vectors; a repeated proposal costs nothing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["METHODS", "WeightSearchResult", "default_popsize", "warm_start_points",
           "search_weights", "import_optuna"]

METHODS = ("cmaes", "bayes", "greedy", "uniform")
_OPTUNA_HINT = 'pip install optuna cmaes  (or: pip install "merge_callback[cmaes]")'


def default_popsize(n: int) -> int:
    """CMA-ES population ``4 + ⌊3·ln n⌋``."""
    return 4 + int(math.floor(3.0 * math.log(n)))


def warm_start_points(n: int) -> list[tuple[float, ...]]:
    """Each checkpoint alone (one-hot), then the uniform soup."""
    pts = [tuple(1.0 if j == i else 0.0 for j in range(n)) for i in range(n)]
    pts.append(tuple(1.0 / n for _ in range(n)))
    return pts


@dataclass(frozen=True)
class WeightSearchResult:
    """Outcome of an N-checkpoint weight search (plain floats only).

    Attributes:
        weights: the best observed weights (≥ 0, sum 1), one per checkpoint.
        value: the metric at ``weights``.
        observations: ``((weights, value), ...)`` in evaluation order, distinct weights only.
        method: the method used.
        higher_is_better: the direction the metric was optimised in.
    """

    weights: tuple[float, ...]
    value: float
    observations: tuple[tuple[tuple[float, ...], float], ...]
    method: str
    higher_is_better: bool = False

    @property
    def n_evaluations(self) -> int:
        return len(self.observations)


class _Evaluations:
    """Distinct-weights cache around the objective; keeps evaluation order."""

    def __init__(self, objective: Callable[[tuple[float, ...]], float], n: int,
                 higher_is_better: bool, budget: int | None):
        self.objective = objective
        self.n = n
        self.sign = -1.0 if higher_is_better else 1.0
        self.budget = budget
        self.values: dict[tuple[float, ...], float] = {}
        self.points: dict[tuple[float, ...], tuple[float, ...]] = {}

    @property
    def done(self) -> bool:
        return self.budget is not None and len(self.values) >= self.budget

    def point(self, x: Sequence[float]) -> tuple[float, ...]:
        """``x`` normalised onto the simplex (all zeros → uniform)."""
        xs = [max(0.0, float(v)) for v in x]
        total = sum(xs)
        if total <= 0.0:
            return tuple(1.0 / self.n for _ in xs)
        return tuple(v / total for v in xs)

    def __call__(self, x: Sequence[float]) -> float:
        w = self.point(x)
        k = tuple(round(v, 12) for v in w)  # repeats within rounding cost nothing
        if k not in self.values:
            value = float(self.objective(w))
            if not math.isfinite(value):
                raise FloatingPointError(f"held-out metric is {value} at weights {list(w)}")
            self.values[k] = value
            self.points[k] = w
        return self.values[k]

    def loss(self, x: Sequence[float]) -> float:
        return self.sign * self(x)

    def result(self, method: str) -> WeightSearchResult:
        obs = tuple((self.points[k], v) for k, v in self.values.items())
        # best observed; ties go to the larger weight on the last (latest) checkpoint
        w, value = min(obs, key=lambda o: (self.sign * o[1], -o[0][-1]))
        return WeightSearchResult(w, value, obs, method, self.sign < 0)


def import_optuna():
    try:
        import optuna
        import cmaes  # noqa: F401  (optuna's CmaEsSampler needs it)
    except ImportError as exc:
        raise ImportError(f"method='cmaes' needs optuna and cmaes ({exc.name} is missing): "
                          f"{_OPTUNA_HINT}") from exc
    return optuna


def validate_weight_search_args(n: int, method: str, budget: int, sigma0: float | None,
                                popsize: int | None, warm_start: bool = True) -> None:
    """Raise ``ValueError`` naming the argument and what is allowed."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"need at least 2 checkpoints to merge, got {n!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if method in ("cmaes", "bayes"):
        low = n + 1 if warm_start else 1
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < low:
            raise ValueError(
                f"budget must be an integer >= {low} for method={method!r} with {n} checkpoints"
                + (" (each checkpoint alone and the uniform soup are evaluated first)"
                   if warm_start else "") + f", got {budget!r}")
    if sigma0 is not None and (isinstance(sigma0, bool) or not isinstance(sigma0, (int, float))
                               or not (math.isfinite(sigma0) and sigma0 > 0)):
        raise ValueError(f"sigma0 must be None (1/6) or a number > 0, got {sigma0!r}")
    if popsize is not None and (isinstance(popsize, bool) or not isinstance(popsize, int)
                                or popsize < 4):
        raise ValueError(f"popsize must be None (4 + 3·ln N) or an integer >= 4, got {popsize!r}")


def search_weights(objective: Callable[[tuple[float, ...]], float], n: int, *,
                   method: str = "cmaes", budget: int = 20, seed: int = 0,
                   higher_is_better: bool = False, sigma0: float | None = None,
                   popsize: int | None = None, acq_func: str = "gp_hedge",
                   warm_start: bool = True) -> WeightSearchResult:
    """Find merge weights for ``n`` checkpoints with a bounded number of evaluations.

    Args:
        objective: ``f(weights) -> metric`` for a tuple of ``n`` weights on the simplex.
        n: number of checkpoints, ≥ 2.
        method: ``"cmaes"``, ``"bayes"``, ``"greedy"`` or ``"uniform"`` (see the module docstring).
        budget: distinct evaluations for ``cmaes``/``bayes``, including the ``n + 1`` warm-start
            points (so ≥ ``n + 1``); ``greedy`` uses at most ``2n − 1`` and ``uniform`` one,
            whatever the budget.
        seed: makes ``cmaes`` and ``bayes`` deterministic.
        higher_is_better: maximise instead of minimise.
        sigma0: initial CMA-ES step size in the unnormalised ``[0, 1]^n`` space (default: Optuna's,
            1/6 of the range).
        popsize: CMA-ES population (default ``4 + ⌊3·ln n⌋``).
        acq_func: acquisition function for ``bayes``.
        warm_start: evaluate each checkpoint alone and the uniform soup first.

    Returns:
        WeightSearchResult with the best observed weights and every observation.

    Raises:
        ValueError: on invalid arguments.
        ImportError: ``method="cmaes"`` without optuna and cmaes installed (with the install
            command).
        FloatingPointError: if the objective returns NaN or ±inf.

    Example:
        >>> target = (0.2, 0.3, 0.5)
        >>> f = lambda w: sum((a - b) ** 2 for a, b in zip(w, target))
        >>> r = search_weights(f, 3, method="greedy")
        >>> r.n_evaluations <= 5
        True
    """
    validate_weight_search_args(n, method, budget, sigma0, popsize, warm_start)
    if method == "uniform":
        ev = _Evaluations(objective, n, higher_is_better, None)
        ev([1.0] * n)
        return ev.result(method)
    if method == "greedy":
        return _greedy_soup(_Evaluations(objective, n, higher_is_better, None))
    ev = _Evaluations(objective, n, higher_is_better, budget)
    initial = warm_start_points(n) if warm_start else []
    if method == "cmaes":
        optuna = import_optuna()  # fail before any evaluation when it is missing
        for point in initial:
            if ev.done:
                break
            ev(point)
        _cmaes(optuna, ev, n, seed, sigma0, popsize or default_popsize(n))
    else:
        from merge_callback.search import bayes_simplex

        bayes_simplex(ev.loss, n, budget=budget, initial=initial, acq_func=acq_func, seed=seed)
    return ev.result(method)


def _cma_sampler(optuna, seed: int, sigma0: float | None, popsize: int):
    kwargs = dict(popsize=popsize, seed=seed, n_startup_trials=0, warn_independent_sampling=False)
    if sigma0 is None:
        # the search starts at the centre of [0, 1]^n: uniform weights
        return optuna.samplers.CmaEsSampler(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # optuna >= 4.9 deprecates sigma0
        try:
            return optuna.samplers.CmaEsSampler(sigma0=float(sigma0), **kwargs)
        except TypeError:
            raise ValueError(f"optuna {optuna.__version__} no longer accepts sigma0; leave sigma0 "
                             "unset (None)") from None


def _cmaes(optuna, ev: _Evaluations, n: int, seed: int, sigma0: float | None,
           popsize: int) -> None:
    names = [f"w{i}" for i in range(n)]
    sampler = _cma_sampler(optuna, seed, sigma0, popsize)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="minimize", sampler=sampler)
        # the warm-start points join the study's history (already evaluated: no extra cost)
        dists = {name: optuna.distributions.FloatDistribution(0.0, 1.0) for name in names}
        for w, value in [(ev.points[k], v) for k, v in ev.values.items()]:
            study.add_trial(optuna.trial.create_trial(
                params=dict(zip(names, w)), distributions=dists, value=ev.sign * value))
        max_trials = 20 * (ev.budget or 1) + 100
        trials = 0
        while not ev.done:
            trials += 1
            if trials > max_trials:
                raise RuntimeError(f"CMA-ES proposed only already-evaluated weights in "
                                   f"{max_trials} trials; lower the budget or raise sigma0")
            trial = study.ask(dists)
            x = [trial.params[name] for name in names]
            study.tell(trial, ev.loss(x))
    finally:
        optuna.logging.set_verbosity(verbosity)


def _greedy_soup(ev: _Evaluations) -> WeightSearchResult:
    """The greedy soup of :func:`merge_callback.baselines.greedy_selection` (one rule for the
    package): uniform weights over the members."""
    from merge_callback.baselines import greedy_selection

    n = ev.n

    def score(members: tuple[int, ...]) -> float:
        return ev.loss([1.0 if j in members else 0.0 for j in range(n)])

    greedy_selection(n, score)  # ev.loss is sign-adjusted: lower is better
    return ev.result("greedy")
