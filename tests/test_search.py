import math

import pytest

from merge_callback.search import search_lambda


def quad(opt=0.62, curv=0.2, base=4.04):
    calls = []

    def f(x):
        calls.append(x)
        return base + curv * (x - opt) ** 2

    return f, calls


@pytest.mark.parametrize("strategy", ["bayes", "grid", "random", "greedy"])
def test_initial_points_budget_and_best_observed(strategy):
    f, calls = quad()
    r = search_lambda(f, alpha=0.5, budget=7, strategy=strategy, seed=3)
    assert calls[:2] == [0.5, 1.0]
    assert r.n_evaluations == 7 == len(calls) == len(set(calls))
    assert [x for x, _ in r.observations] == calls
    best = min(r.observations, key=lambda o: o[1])
    assert (r.lam, r.value) == best
    assert all(0.5 <= x <= 1.0 for x in calls)
    assert r.value <= f(1.0)  # never worse than the latest checkpoint


@pytest.mark.parametrize("acq", ["gp_hedge", "EI", "PI", "LCB"])
def test_bayes_is_deterministic_for_a_seed_and_finds_the_optimum(acq):
    r1 = search_lambda(quad()[0], budget=10, acq_func=acq, seed=0)
    r2 = search_lambda(quad()[0], budget=10, acq_func=acq, seed=0)
    assert r1 == r2
    assert abs(r1.lam - 0.62) < 0.05
    assert r1.acq_func == acq and r1.strategy == "bayes"


def test_higher_is_better_maximises():
    r = search_lambda(lambda x: -((x - 0.8) ** 2), budget=9, strategy="grid", higher_is_better=True)
    assert r.lam == pytest.approx(0.8125)


def test_flat_objective_prefers_latest_and_spends_distinct_budget():
    calls = []
    r = search_lambda(lambda x: calls.append(x) or 1.0, budget=6)
    assert r.lam == 1.0
    assert len(calls) == len(set(calls)) == 6


def test_grid_points_and_initial_warm_start():
    f, calls = quad()
    search_lambda(f, alpha=0.6, budget=5, strategy="grid")
    assert [round(c, 6) for c in calls] == [0.6, 1.0, 0.7, 0.8, 0.9]
    f, calls = quad()
    search_lambda(f, alpha=0.5, budget=4, strategy="grid", initial=[0.73, 2.0])
    assert calls[:3] == [0.5, 1.0, 0.73]  # 2.0 is clipped to 1.0, already evaluated
    assert len(calls) == 4


def test_nan_is_an_error():
    with pytest.raises(FloatingPointError, match=r"held-out metric is nan at lambda=1"):
        search_lambda(lambda x: math.nan if x == 1.0 else 1.0, budget=4)


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 1.0}, r"alpha must be a number in \(0, 1\), got 1.0"),
    ({"alpha": 0}, r"alpha must be a number in \(0, 1\), got 0"),
    ({"budget": 2}, r"budget must be an integer >= 3"),
    ({"budget": 5.0}, r"budget must be an integer >= 3"),
    ({"strategy": "bo"}, r"strategy must be one of 'bayes', 'grid', 'random', 'greedy', got 'bo'"),
    ({"acq_func": "UCB"}, r"acq_func must be one of 'gp_hedge', 'EI', 'PI', 'LCB', got 'UCB'"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        search_lambda(lambda x: x, **kwargs)


def test_stop_tol_ends_a_flat_round_early_and_keeps_the_optimum():
    f, calls = quad(curv=0.2)
    full = search_lambda(f, budget=10)
    f2, calls2 = quad(curv=0.2)
    early = search_lambda(f2, budget=10, stop_tol=1e-4)
    assert 4 <= early.n_evaluations < 10
    assert early.value - full.value < 1e-4  # within the tolerance of the full search
    with pytest.raises(ValueError, match="stop_tol must be a positive number or None, got 0"):
        search_lambda(f, stop_tol=0)


def test_objective_runs_with_the_callers_torch_threads():
    import torch

    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        search_lambda(lambda x: seen.append(torch.get_num_threads()) or (x - 0.7) ** 2, budget=5)
    finally:
        torch.set_num_threads(before)
    assert set(seen) == {2}  # the GP's one-thread limit does not reach the evaluations
