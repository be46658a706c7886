"""N-checkpoint weight search on the simplex: CMA-ES (optuna), Bayesian, greedy soup, uniform."""

import math
import sys

import numpy as np
import pytest

from merge_callback.nway import (
    METHODS,
    WeightSearchResult,
    default_popsize,
    search_weights,
    warm_start_points,
)
from merge_callback.search import bayes_simplex

TARGET = (0.1, 0.2, 0.3, 0.4)


def quadratic(w, target=TARGET):
    return float(sum((a - b) ** 2 for a, b in zip(w, target)))


class Recorder:
    """Objective wrapper that records every call."""

    def __init__(self, fn=quadratic):
        self.fn = fn
        self.calls = []

    def __call__(self, w):
        self.calls.append(tuple(w))
        return self.fn(w)


def test_popsize_formula():
    assert [default_popsize(n) for n in (2, 3, 4, 8, 16)] == [6, 7, 8, 10, 12]
    assert [4 + math.floor(3 * math.log(n)) for n in (2, 3, 4, 8, 16)] == [6, 7, 8, 10, 12]


def test_warm_start_points():
    assert warm_start_points(3) == [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0),
                                    (1 / 3, 1 / 3, 1 / 3)]


@pytest.mark.parametrize("method", ["cmaes", "bayes"])
def test_warm_start_budget_and_simplex(method):
    f = Recorder()
    r = search_weights(f, 4, method=method, budget=12, seed=0)
    assert isinstance(r, WeightSearchResult)
    # each checkpoint alone, then the uniform soup, are evaluated first
    assert f.calls[:5] == [(1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0),
                           (0.0, 0.0, 0.0, 1.0), (0.25, 0.25, 0.25, 0.25)]
    # the budget counts distinct evaluations, each evaluated once
    assert r.n_evaluations == 12 == len(f.calls) == len(set(f.calls))
    for w, value in r.observations:
        assert all(x >= 0 for x in w) and abs(sum(w) - 1.0) < 1e-9
        assert value == quadratic(w)
    # best observed, never worse than the warm start
    assert r.value == min(v for _, v in r.observations)
    assert r.value == quadratic(r.weights)
    assert r.value < quadratic((0.25, 0.25, 0.25, 0.25))


@pytest.mark.parametrize("method", ["cmaes", "bayes"])
def test_deterministic_for_a_seed(method):
    a = search_weights(quadratic, 3, method=method, budget=10, seed=7)
    b = search_weights(quadratic, 3, method=method, budget=10, seed=7)
    c = search_weights(quadratic, 3, method=method, budget=10, seed=8)
    assert a == b
    assert a.observations != c.observations


def test_cmaes_gets_close_to_the_optimum_and_beats_the_warm_start():
    target = (0.05, 0.15, 0.2, 0.25, 0.35)
    r = search_weights(lambda w: quadratic(w, target), 5, method="cmaes", budget=60, seed=0)
    warm = min(quadratic(w, target) for w in warm_start_points(5))
    assert r.value < warm / 10
    assert max(abs(a - b) for a, b in zip(r.weights, target)) < 0.1


def test_higher_is_better_maximises():
    r = search_weights(lambda w: -quadratic(w), 4, method="cmaes", budget=20, seed=0,
                       higher_is_better=True)
    assert r.higher_is_better
    assert r.value == max(v for _, v in r.observations)
    assert r.value > -quadratic((0.25,) * 4)


def test_sigma0_and_popsize_change_the_search():
    base = search_weights(quadratic, 3, method="cmaes", budget=14, seed=0)
    wide = search_weights(quadratic, 3, method="cmaes", budget=14, seed=0, sigma0=0.5)
    pop = search_weights(quadratic, 3, method="cmaes", budget=14, seed=0, popsize=4)
    assert base.observations[:4] == wide.observations[:4] == pop.observations[:4]
    assert base.observations[4:] != wide.observations[4:]
    assert base.observations[4:] != pop.observations[4:]


def test_greedy_soup():
    # checkpoint scores: c2 best, then c0, then c1; adding c0 helps, adding c1 hurts
    table = {(0.0, 0.0, 1.0): 1.0, (1.0, 0.0, 0.0): 2.0, (0.0, 1.0, 0.0): 3.0,
             (0.5, 0.0, 0.5): 0.5, (1 / 3, 1 / 3, 1 / 3): 0.9}
    f = Recorder(lambda w: table[tuple(w)])
    r = search_weights(f, 3, method="greedy")
    assert f.calls == [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.0, 0.5),
                       (1 / 3, 1 / 3, 1 / 3)]
    assert r.weights == (0.5, 0.0, 0.5) and r.value == 0.5 and r.method == "greedy"


def test_uniform():
    f = Recorder()
    r = search_weights(f, 4, method="uniform", budget=1)
    assert f.calls == [(0.25, 0.25, 0.25, 0.25)]
    assert r.weights == (0.25, 0.25, 0.25, 0.25)


def test_ties_prefer_the_latest_checkpoint():
    r = search_weights(lambda w: 1.0, 3, method="cmaes", budget=5, seed=0)
    assert r.weights == (0.0, 0.0, 1.0)


def test_nonfinite_objective_raises():
    with pytest.raises(FloatingPointError, match="held-out metric is nan"):
        search_weights(lambda w: float("nan"), 2, method="cmaes", budget=4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=1), "at least 2 checkpoints"),
    (dict(method="evolve"), "method must be one of 'cmaes', 'bayes', 'greedy', 'uniform'"),
    (dict(budget=4), r"budget must be an integer >= 5 for method='cmaes' with 4 checkpoints"),
    (dict(method="bayes", budget=2.5), "budget must be an integer >= 5"),
    (dict(sigma0=0.0), "sigma0 must be None"),
    (dict(popsize=3), "popsize must be None .* or an integer >= 4"),
])
def test_invalid_arguments(kwargs, match):
    args = dict(n=4, method="cmaes", budget=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        search_weights(quadratic, args.pop("n"), **args)


def test_missing_optuna_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # what an uninstalled package looks like
    with pytest.raises(ImportError, match=r"pip install optuna cmaes"):
        search_weights(quadratic, 3, method="cmaes", budget=6)
    # the other methods do not need it
    assert search_weights(quadratic, 3, method="greedy").n_evaluations <= 5


def test_bayes_simplex_direct():
    calls = []

    def loss(w):
        calls.append(w)
        return quadratic(w)

    obs = bayes_simplex(loss, 4, budget=9, initial=[(1, 0, 0, 0), (1, 1, 1, 1)], seed=3)
    assert calls[:2] == [(1.0, 0.0, 0.0, 0.0), (0.25, 0.25, 0.25, 0.25)]
    assert len(obs) == 9 == len(calls) == len({w for w, _ in obs})
    assert all(abs(sum(w) - 1) < 1e-9 and min(w) >= 0 for w, _ in obs)
    assert obs == bayes_simplex(quadratic, 4, budget=9, initial=[(1, 0, 0, 0), (1, 1, 1, 1)],
                                seed=3)
    with pytest.raises(ValueError, match="acq_func must be one of"):
        bayes_simplex(quadratic, 4, budget=9, acq_func="UCB")
    with pytest.raises(ValueError, match="n must be an integer >= 2"):
        bayes_simplex(quadratic, 1, budget=9)


def test_methods_listed():
    assert METHODS == ("cmaes", "bayes", "greedy", "uniform")
    assert np.isclose(sum(search_weights(quadratic, 4, method="bayes", budget=6).weights), 1.0)
