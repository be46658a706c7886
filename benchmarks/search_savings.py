"""Evaluations saved by warm-starting rounds and stopping them early, at equal soup quality.

Replays the merge rounds of a real training trajectory (the one ``benchmarks/quality.py`` trains
and caches: a Pythia-architecture GPT-NeoX on Shakespeare, constant then decaying learning rate):
for every adjacent checkpoint pair, λ is searched on the selection shard by

- ``cold``: the default round (Bayesian optimisation, GP-hedge, budget 10);
- ``warm``: the previous pair's λ* evaluated right after α and 1 (``warm_start=True``);
- ``stop``: the round stops when the GP's largest expected improvement is below ``stop_tol``;
- ``warm+stop``: both.

It reports the evaluations each spent and the soup's selection-shard loss relative to ``cold``
(median and worst over pairs and seeds), and writes ``benchmarks/results/search_savings.md``
and ``.json``.

Usage::

    python -m benchmarks.search_savings            # the full trajectory (trains it if not cached)
    python -m benchmarks.search_savings --quick    # a tiny trajectory, about a minute
"""

from __future__ import annotations

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]  # `python benchmarks/<name>.py` finds the packages
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import argparse
import json
import statistics
import time

import torch

from benchmarks.common import FULL, QUICK, Scorer, environment, lam_key, log, train_trajectory
from merge_callback.io import atomic_write_bytes, atomic_write_json
from merge_callback.merge import lerp_state_dicts
from merge_callback.search import search_lambda

RESULTS = Path(__file__).parent / "results"
STOP_TOLS = (1e-4, 3e-4)
SEEDS = (0, 1, 2)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny trajectory (tests, smoke runs)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--cache", default=None, help="benchmark cache folder")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    traj = train_trajectory(cfg, args.cache)
    scorer = Scorer(cfg, {"sel": traj.data.shards["sel"]})
    steps = cfg.checkpoint_steps
    pairs = list(zip(steps, steps[1:]))
    budget = cfg.search_budget

    def objective(a: int, b: int):
        def f(lam: float) -> float:
            key = lam_key(a, b, lam)
            if (key, "sel") not in scorer.memo:
                sd = lerp_state_dicts(traj.checkpoints[a], traj.checkpoints[b], lam)
                return scorer(sd, "sel", key=key)[0]
            return scorer.memo[(key, "sel")][0]
        return f

    configs = {"cold": dict(warm=False, tol=None)}
    for tol in STOP_TOLS:
        configs[f"stop {tol:g}"] = dict(warm=False, tol=tol)
    configs["warm"] = dict(warm=True, tol=None)
    for tol in STOP_TOLS:
        configs[f"warm+stop {tol:g}"] = dict(warm=True, tol=tol)

    rows = []
    for seed in SEEDS:
        last = {name: None for name in configs}
        for a, b in pairs:
            for name, c in configs.items():
                initial = (last[name],) if c["warm"] and last[name] is not None else ()
                r = search_lambda(objective(a, b), alpha=cfg.alpha, budget=budget, seed=seed,
                                  initial=initial, stop_tol=c["tol"])
                last[name] = r.lam
                rows.append({"seed": seed, "previous": a, "latest": b, "config": name,
                             "evaluations": r.n_evaluations, "lambda": r.lam, "value": r.value})
        log(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)")

    cold = {(r["seed"], r["latest"]): r for r in rows if r["config"] == "cold"}
    late = cfg.checkpoint_steps[len(cfg.checkpoint_steps) // 2]
    summary = {}
    for name in configs:
        sel = [r for r in rows if r["config"] == name]
        for scope, keep in (("all", lambda r: True), ("late", lambda r: r["latest"] > late)):
            rs = [r for r in sel if keep(r)]
            gaps = [r["value"] - cold[(r["seed"], r["latest"])]["value"] for r in rs]
            evals = [r["evaluations"] for r in rs]
            summary[f"{name}|{scope}"] = {
                "config": name, "pairs": scope, "rounds": len(rs),
                "mean_evaluations": statistics.fmean(evals),
                "evaluations_saved": 1 - statistics.fmean(evals) / budget,
                "median_gap": statistics.median(gaps), "worst_gap": max(gaps),
                "rounds_worse_than_cold_by_1e-4": sum(g > 1e-4 for g in gaps),
            }
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    name = "search_savings_quick" if args.quick else "search_savings"
    command = " ".join(["python -m benchmarks.search_savings", *(argv or [])])
    result = {"command": command, "environment": environment(), "config": cfg.name,
              "budget": budget, "alpha": cfg.alpha, "seeds": list(SEEDS), "pairs": pairs,
              "late_after_step": late, "seconds": seconds, "summary": summary, "rounds": rows,
              "trajectory": traj.meta}
    atomic_write_json(out / f"{name}.json", result)
    atomic_write_bytes(out / f"{name}.md", render(result).encode())
    print(render(result))
    return result


def render(res: dict) -> str:
    lines = [
        "# Warm start and early stopping: evaluations saved at equal soup quality",
        "",
        f"Command: `{res['command']}` ({res['seconds']:.0f} s). Trajectory: config "
        f"`{res['config']}`, {len(res['pairs'])} adjacent checkpoint pairs × seeds "
        f"{res['seeds']}, budget {res['budget']}, α = {res['alpha']}. Soup quality is the "
        "selection-shard loss of the best observed λ; *gap* = that loss minus the cold round's "
        "(negative = better than cold). Late pairs: latest step > "
        f"{res['late_after_step']}.",
        "",
        "| configuration | pairs | rounds | mean evaluations | saved | median gap | worst gap "
        "| rounds worse by > 1e-4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in res["summary"].values():
        lines.append(f"| {s['config']} | {s['pairs']} | {s['rounds']} | "
                     f"{s['mean_evaluations']:.2f} | {100 * s['evaluations_saved']:.0f}% | "
                     f"{s['median_gap']:+.5f} | {s['worst_gap']:+.5f} | "
                     f"{s['rounds_worse_than_cold_by_1e-4']} |")
    env = res["environment"]
    lines += ["", f"Environment: {json.dumps(env)}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    from merge_callback.console import quiet_third_party

    with quiet_third_party():  # Lightning's banner and tips; our lines and warnings stay
        main(sys.argv[1:])
