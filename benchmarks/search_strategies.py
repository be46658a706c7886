"""Search strategies for λ at equal budget: regret to a dense sweep optimum vs evaluations.

For every pair ``(previous, latest)`` in ``search_pairs`` the held-out loss of the soup
``λ·θ_latest + (1 − λ)·θ_previous`` on the selection shard is swept at ``dense_points`` evenly
spaced λ in [α, 1]; the sweep minimum ``f*`` is the reference. Each strategy then searches [α, 1]
with ``search_budget`` distinct evaluations (BO with gp_hedge / EI / PI / LCB and random search
once per seed; greedy golden-section search once; grid search once per budget, since a k-point
grid is not the first k points of a larger one). The regret after k evaluations is
``min(f over the first k evaluations) − f*`` (it can be slightly negative when a search lands
between two sweep points).

Run (the trajectory is trained once and cached; see ``benchmarks/README.md``)::

    python -m benchmarks.search_strategies            # full, ~ half of the full benchmark
    python -m benchmarks.search_strategies --quick    # tiny settings
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]  # `python benchmarks/<name>.py` finds the packages
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import math
import time
from typing import Any

import numpy as np

from benchmarks.common import BenchConfig, Scorer, Trajectory, log, soup_objective
from merge_callback.search import search_lambda

BAYES_ACQS = ("gp_hedge", "EI", "PI", "LCB")
STRATEGY_NAMES = tuple(f"BO {a}" for a in BAYES_ACQS) + ("random", "grid", "greedy (golden section)")


def _best_so_far(observations: tuple[tuple[float, float], ...]) -> list[float]:
    out, best = [], math.inf
    for _, y in observations:
        best = min(best, y)
        out.append(best)
    return out


def run_search(traj: Trajectory, scorer: Scorer) -> dict[str, Any]:
    """Run the comparison; returns plain data (per pair: sweep, runs; summary per strategy)."""
    cfg: BenchConfig = traj.config
    budget = cfg.search_budget
    pairs = []
    for previous, latest in cfg.search_pairs:
        t0 = time.perf_counter()
        f = soup_objective(traj, scorer, previous, latest)
        lams = np.linspace(cfg.alpha, 1.0, cfg.dense_points)
        sweep = [float(f(float(x))) for x in lams]
        i_best = int(np.argmin(sweep))
        f_star, lam_star = sweep[i_best], float(lams[i_best])
        f_one = f(1.0)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in STRATEGY_NAMES}
        for acq in BAYES_ACQS:
            for seed in cfg.search_seeds:
                r = search_lambda(f, alpha=cfg.alpha, budget=budget, strategy="bayes", acq_func=acq,
                                  seed=seed)
                runs[f"BO {acq}"].append({"seed": seed, "observations": r.observations,
                                          "best": _best_so_far(r.observations)})
        for seed in cfg.search_seeds:
            r = search_lambda(f, alpha=cfg.alpha, budget=budget, strategy="random", seed=seed)
            runs["random"].append({"seed": seed, "observations": r.observations,
                                   "best": _best_so_far(r.observations)})
        r = search_lambda(f, alpha=cfg.alpha, budget=budget, strategy="greedy")
        runs["greedy (golden section)"].append({"seed": None, "observations": r.observations,
                                                "best": _best_so_far(r.observations)})
        grid_best = _best_so_far(((cfg.alpha, f(cfg.alpha)), (1.0, f(1.0))))
        grid_obs = {}
        for k in range(3, budget + 1):
            r = search_lambda(f, alpha=cfg.alpha, budget=k, strategy="grid")
            grid_best.append(r.value)
            grid_obs[k] = r.observations
        runs["grid"].append({"seed": None, "observations_by_budget": grid_obs, "best": grid_best})
        for name in STRATEGY_NAMES:
            for run in runs[name]:
                run["regret"] = [b - f_star for b in run["best"]]
        pairs.append({"previous": previous, "latest": latest, "f_star": f_star, "lam_star": lam_star,
                      "f_latest": f_one, "available_gain": f_one - f_star,
                      "sweep": {"lams": [float(x) for x in lams], "loss": sweep}, "runs": runs,
                      "seconds": time.perf_counter() - t0})
        log(f"search pair ({previous}, {latest}): f*={f_star:.5f} at λ={lam_star:.3f}, "
            f"gain over latest {f_one - f_star:.5f} ({time.perf_counter() - t0:.0f} s)")
    return {"pairs": pairs, "summary": summarize(pairs, budget), "budget": budget,
            "seeds": list(cfg.search_seeds), "alpha": cfg.alpha, "dense_points": cfg.dense_points}


def summarize(pairs: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    """Per strategy and k: median, quartiles and max of regret; median share of the gain captured."""
    out: dict[str, Any] = {}
    for name in STRATEGY_NAMES:
        per_k = []
        for k in range(1, budget + 1):
            regrets, shares = [], []
            for p in pairs:
                for run in p["runs"][name]:
                    reg = run["regret"][k - 1]
                    regrets.append(reg)
                    gain = p["available_gain"]
                    if gain > 0:
                        shares.append((p["f_latest"] - run["best"][k - 1]) / gain)
            r = np.asarray(regrets)
            per_k.append({"k": k, "n_runs": len(regrets), "median": float(np.median(r)),
                          "q25": float(np.quantile(r, 0.25)), "q75": float(np.quantile(r, 0.75)),
                          "max": float(r.max()), "mean": float(r.mean()),
                          "median_share_of_gain": float(np.median(shares)) if shares else None})
        out[name] = per_k
    return out


def markdown(result: dict[str, Any], cfg: BenchConfig) -> str:
    """Tables: per-pair sweep optimum, and regret by strategy at several budgets."""
    budget = result["budget"]
    ks = [k for k in (3, 4, 5, 6, 8, 10, budget) if k <= budget]
    ks = sorted(set(ks))
    lines = ["### Pairs (selection-shard loss, dense sweep of "
             f"{result['dense_points']} points on [{cfg.alpha}, 1])", "",
             "| pair | λ* (sweep) | loss at λ=1 (latest) | sweep optimum f* | available gain |",
             "|---|---:|---:|---:|---:|"]
    for p in result["pairs"]:
        lines.append(f"| {p['previous']}→{p['latest']} | {p['lam_star']:.3f} | {p['f_latest']:.5f} | "
                     f"{p['f_star']:.5f} | {p['available_gain']:.5f} |")
    lines += ["", f"### Regret (nats ×10⁻³) after k evaluations: median [25th–75th percentile] "
              f"(max), over {len(result['pairs'])} pairs × {len(result['seeds'])} seeds "
              "(grid and golden section are deterministic: one run per pair)", "",
              "| strategy | " + " | ".join(f"k={k}" for k in ks) + " |",
              "|---|" + "---:|" * len(ks)]
    for name in STRATEGY_NAMES:
        row = []
        for k in ks:
            s = result["summary"][name][k - 1]
            row.append(f"{1e3 * s['median']:.3f} [{1e3 * s['q25']:.3f}–{1e3 * s['q75']:.3f}] "
                       f"({1e3 * s['max']:.3f})")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += ["", "### Median share of the available gain (f(λ=1) − f*) captured after k evaluations",
              "", "| strategy | " + " | ".join(f"k={k}" for k in ks) + " |",
              "|---|" + "---:|" * len(ks)]
    for name in STRATEGY_NAMES:
        row = []
        for k in ks:
            v = result["summary"][name][k - 1]["median_share_of_gain"]
            row.append("n/a" if v is None else f"{100 * v:.1f}%")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path) -> None:
    """Median regret (IQR band) vs evaluations, one line per strategy (symlog y axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = result["budget"]
    ks = np.arange(1, budget + 1)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"random": "--", "grid": "-.", "greedy (golden section)": ":"}
    for name in STRATEGY_NAMES:
        s = result["summary"][name]
        med = np.array([x["median"] for x in s])
        lo = np.array([x["q25"] for x in s])
        hi = np.array([x["q75"] for x in s])
        line, = ax.plot(ks, med, styles.get(name, "-"), marker="o", ms=3, label=name)
        ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.12)
    ax.set_yscale("symlog", linthresh=1e-5)
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xlabel("distinct held-out evaluations (λ=α and λ=1 first)")
    ax.set_ylabel("regret to the dense-sweep optimum (nats)")
    ax.set_title(f"λ search on [{result['alpha']}, 1]: median over {len(result['pairs'])} pairs × "
                 f"{len(result['seeds'])} seeds (band: 25–75%)", fontsize=9)
    ax.set_xticks(ks)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    """``python -m benchmarks.search_strategies [--quick] [--out DIR] [--cache DIR]``."""
    from benchmarks.quality import main as quality_main

    return quality_main(argv, prog="python -m benchmarks.search_strategies", default_parts="search")


if __name__ == "__main__":
    from merge_callback.console import quiet_third_party

    with quiet_third_party():  # Lightning's banner and tips; our lines and warnings stay
        raise SystemExit(main())
