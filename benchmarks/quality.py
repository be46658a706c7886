"""Merge quality on one Pythia-architecture training run: baselines, what users pick instead, pilot.

Parts (``--parts``, default all):

* ``quality`` — Table 1/2 style: for early, late (constant LR), late (decaying LR) and distant
  checkpoint pairs: latest, previous, uniform soup, greedy soup, Fisher-weighted averaging,
  RegMean and the BO soup (λ ∈ [α, 1], GP-hedge, ``budget`` evaluations), chosen on the selection
  shard, reported on the selection, in-domain test and out-of-domain shards.
* ``users`` — what users pick instead, at the latest step of every quality pair: per-step EMA
  (several decays, tracked during the same run) and a LAWA-style uniform average of the last k
  checkpoints, next to the latest checkpoint and the BO soup.
* ``pilot`` — the pairwise heatmap over checkpoints (gain of the λ=0.5 soup over the better parent
  and gain of the searched λ over the later checkpoint) and λ sweep curves on [0, 1].
* ``search`` — search strategies at equal budget (see :mod:`benchmarks.search_strategies`).

Usage::

    python -m benchmarks.quality            # full benchmark, results in benchmarks/results/
    python -m benchmarks.quality --quick    # tiny settings (files named *_quick*)
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

import argparse
import copy
import math
import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import (FULL, QUICK, SHARD_TITLES, SHARDS, BenchConfig, Scorer, Trajectory,
                               environment, lam_key, log, soup_objective, train_trajectory)
from merge_callback.baselines import fisher_weighted_average, greedy_soup, regmean, uniform_soup
from merge_callback.io import atomic_write_bytes, atomic_write_json
from merge_callback.merge import lerp_state_dicts
from merge_callback.search import search_lambda

PARTS = ("quality", "users", "pilot", "search")
METHODS = ("latest", "previous", "uniform", "greedy", "fisher", "regmean", "BO soup")


# --------------------------------------------------------------------------- quality (Tables 1/2)


def _bo_soup(traj: Trajectory, scorer: Scorer, previous: int, latest: int, budget: int,
             seed: int = 0):
    cfg = traj.config
    f = soup_objective(traj, scorer, previous, latest)
    return search_lambda(f, alpha=cfg.alpha, budget=budget, strategy="bayes", acq_func="gp_hedge",
                         seed=seed)


def run_quality(traj: Trajectory, scorer: Scorer) -> list[dict[str, Any]]:
    cfg = traj.config
    sel_batches = scorer.batches("sel")
    fisher_batches = scorer.batches("sel", batch_size=1)[: cfg.fisher_sequences]
    work = copy.deepcopy(scorer.model)
    rows = []
    for label, a, b in cfg.quality_pairs:
        t0 = time.perf_counter()
        prev_sd, last_sd = traj.checkpoints[a], traj.checkpoints[b]
        keys = {id(prev_sd): ("ckpt", a), id(last_sd): ("ckpt", b)}
        soups: dict[str, tuple[dict, Any]] = {
            "latest": (last_sd, ("ckpt", b)),
            "previous": (prev_sd, ("ckpt", a)),
            "uniform": (uniform_soup([prev_sd, last_sd]), ("uniform", a, b)),
        }
        g = greedy_soup([prev_sd, last_sd],
                        lambda sd: scorer(sd, "sel", key=keys.get(id(sd)))[0])
        members = [(a, b)[i] for i in g.members]
        soups["greedy"] = (g.state_dict, ("greedy", a, b))
        t1 = time.perf_counter()
        soups["fisher"] = (fisher_weighted_average([prev_sd, last_sd], work, fisher_batches),
                           ("fisher", a, b))
        t_fisher = time.perf_counter() - t1
        t1 = time.perf_counter()
        soups["regmean"] = (regmean([prev_sd, last_sd], work, sel_batches, alpha=cfg.regmean_alpha),
                            ("regmean", a, b))
        t_regmean = time.perf_counter() - t1
        bo = _bo_soup(traj, scorer, a, b, cfg.budget)
        soups["BO soup"] = (lerp_state_dicts(prev_sd, last_sd, bo.lam), lam_key(a, b, bo.lam))
        values = {}
        for method in METHODS:
            sd, key = soups[method]
            values[method] = {shard: dict(zip(("loss", "accuracy"), scorer(sd, shard, key=key)))
                              for shard in SHARDS}
        rows.append({"label": label, "previous": a, "latest": b, "values": values,
                     "bo_lambda": bo.lam, "bo_observations": bo.observations,
                     "greedy_members": members, "fisher_seconds": t_fisher,
                     "regmean_seconds": t_regmean, "seconds": time.perf_counter() - t0})
        log(f"quality pair {label} ({a}, {b}): latest {values['latest']['sel']['loss']:.4f} "
            f"BO {values['BO soup']['sel']['loss']:.4f} (λ={bo.lam:.3f}) "
            f"uniform {values['uniform']['sel']['loss']:.4f} fisher {values['fisher']['sel']['loss']:.4f} "
            f"regmean {values['regmean']['sel']['loss']:.4f} ({time.perf_counter() - t0:.0f} s)")
    return rows


def _fmt_table(header: list[str], rows: list[list[str]], align: str = "r") -> list[str]:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] + [("---:" if align == "r" else "---")] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _best_marked(vals: dict[str, float], higher: bool, digits: int, scale: float = 1.0) -> dict[str, str]:
    best = (max if higher else min)(vals.values())
    out = {}
    for k, v in vals.items():
        s = f"{scale * v:.{digits}f}"
        out[k] = f"**{s}**" if v == best else s
    return out


def quality_markdown(rows: list[dict[str, Any]], cfg: BenchConfig) -> str:
    lines: list[str] = []
    for shard in SHARDS:
        for metric, higher, digits, scale, unit in (("loss", False, 4, 1.0, "nats/token"),
                                                     ("accuracy", True, 2, 100.0, "%")):
            lines += ["", f"#### {SHARD_TITLES[shard]} — next-token {metric} ({unit}; best in bold)", ""]
            table = []
            for r in rows:
                vals = {m: r["values"][m][shard][metric] for m in METHODS}
                marked = _best_marked(vals, higher, digits, scale)
                table.append([f"{r['label']} {r['previous']}→{r['latest']}"] + [marked[m] for m in METHODS])
            lines += _fmt_table(["pair"] + list(METHODS), table)
    # wins summary: BO soup vs each baseline, per shard, loss
    lines += ["", "#### BO soup against each method: pairs where the BO soup has the lower loss "
              "(ties count as not lower), per shard", ""]
    table = []
    for m in METHODS:
        if m == "BO soup":
            continue
        cells = []
        for shard in SHARDS:
            wins = sum(r["values"]["BO soup"][shard]["loss"] < r["values"][m][shard]["loss"] for r in rows)
            cells.append(f"{wins}/{len(rows)}")
        table.append([m] + cells)
    lines += _fmt_table(["vs"] + [SHARD_TITLES[s] for s in SHARDS], table)
    # Table 2 style: gain over latest, in-domain vs out-of-domain
    lines += ["", "#### Transfer (Table 2 style): loss reduction vs the latest checkpoint "
              "(nats ×10⁻³, positive = better), weights chosen on the selection shard", ""]
    table = []
    for r in rows:
        cells = []
        for m in ("uniform", "greedy", "fisher", "regmean", "BO soup"):
            d = [1e3 * (r["values"]["latest"][s]["loss"] - r["values"][m][s]["loss"]) for s in SHARDS]
            cells.append(" / ".join(f"{x:+.1f}" for x in d))
        table.append([f"{r['label']} {r['previous']}→{r['latest']}"] + cells)
    lines += _fmt_table(["pair (sel / test / ood)", "uniform", "greedy", "fisher", "regmean", "BO soup"], table)
    lines += ["", "BO soup λ (weight of the later checkpoint) and greedy-soup members per pair: "
              + "; ".join(f"{r['previous']}→{r['latest']}: λ={r['bo_lambda']:.3f}, greedy "
                          f"{'+'.join(map(str, r['greedy_members']))}" for r in rows)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- what users pick instead


def run_users(traj: Trajectory, scorer: Scorer, quality_rows: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    cfg = traj.config
    bo_by_pair = {(r["previous"], r["latest"]): r["bo_lambda"] for r in (quality_rows or [])}
    rows = []
    for step in cfg.user_steps:
        prev = step - cfg.ckpt_every
        entries: dict[str, tuple[dict, Any]] = {"latest": (traj.checkpoints[step], ("ckpt", step))}
        if prev in traj.checkpoints:
            lam = bo_by_pair.get((prev, step))
            if lam is None:
                lam = _bo_soup(traj, scorer, prev, step, cfg.budget).lam
            entries[f"BO soup ({prev}+{step}, λ={lam:.2f})"] = (
                lerp_state_dicts(traj.checkpoints[prev], traj.checkpoints[step], lam),
                lam_key(prev, step, lam))
        for d in cfg.ema_decays:
            entries[f"EMA {d}"] = (traj.ema[(d, step)], ("ema", d, step))
        for k in cfg.lawa_ks:
            steps = [step - i * cfg.ckpt_every for i in range(k - 1, -1, -1)]
            if all(s in traj.checkpoints for s in steps):
                entries[f"LAWA k={k}"] = (uniform_soup([traj.checkpoints[s] for s in steps]),
                                          ("lawa", k, step))
        values = {name: {shard: dict(zip(("loss", "accuracy"), scorer(sd, shard, key=key)))
                         for shard in SHARDS} for name, (sd, key) in entries.items()}
        rows.append({"step": step, "values": values})
        best = min(values, key=lambda n: values[n]["test"]["loss"])
        log(f"users step {step}: best on test = {best} ({values[best]['test']['loss']:.4f}), "
            f"latest {values['latest']['test']['loss']:.4f}")
    return rows


def users_markdown(rows: list[dict[str, Any]], cfg: BenchConfig) -> str:
    lines: list[str] = []
    for shard in SHARDS:
        lines += ["", f"#### {SHARD_TITLES[shard]} — loss (nats/token; best per step in bold)", ""]
        table = []
        for r in rows:
            names = list(r["values"])
            vals = {n: r["values"][n][shard]["loss"] for n in names}
            marked = _best_marked(vals, False, 4)
            bo = next((n for n in names if n.startswith("BO soup")), None)
            cols = ["latest", "BO soup"] + [f"EMA {d}" for d in cfg.ema_decays] + \
                   [f"LAWA k={k}" for k in cfg.lawa_ks]
            cells = []
            for c in cols:
                n = bo if c == "BO soup" else c
                cells.append(marked[n] if n in marked else "n/a")
            table.append([str(r["step"])] + cells)
        lines += _fmt_table(["step", "latest", "BO soup (adjacent pair)"] +
                            [f"EMA {d}" for d in cfg.ema_decays] +
                            [f"LAWA k={k}" for k in cfg.lawa_ks], table)
    lines += ["", "BO soup λ per step: " + "; ".join(
        f"{r['step']}: " + next((n.split('λ=')[1].rstrip(')') for n in r["values"] if n.startswith("BO")), "n/a")
        for r in rows)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- pilot


def run_pilot(traj: Trajectory, scorer: Scorer) -> dict[str, Any]:
    cfg = traj.config
    steps = [s for s in cfg.checkpoint_steps if s % cfg.heatmap_every == 0]
    single = {s: scorer(traj.checkpoints[s], "sel", key=("ckpt", s))[0] for s in steps}
    n = len(steps)
    uniform_gain = np.full((n, n), np.nan)
    searched_gain = np.full((n, n), np.nan)
    searched_lam = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i + 1, n):
            a, b = steps[i], steps[j]
            f = soup_objective(traj, scorer, a, b)
            half = f(0.5)
            uniform_gain[i, j] = min(single[a], single[b]) - half
            r = search_lambda(f, alpha=cfg.alpha, budget=cfg.heatmap_budget, strategy="bayes",
                              acq_func="gp_hedge", seed=0)
            searched_gain[i, j] = single[b] - r.value
            searched_lam[i, j] = r.lam
    log(f"pilot heatmap over {n} checkpoints done")
    sweeps = []
    lams = np.linspace(0.0, 1.0, cfg.sweep_points)
    for a, b in cfg.sweep_pairs:
        curves = {}
        for shard in SHARDS:
            f = soup_objective(traj, scorer, a, b, shard)
            curves[shard] = [float(f(float(x))) for x in lams]
        stats = {}
        for shard, ys in curves.items():
            better_parent = min(ys[0], ys[-1])
            stats[shard] = {"best_lambda": float(lams[int(np.argmin(ys))]),
                            "gain_over_better_parent": better_parent - min(ys),
                            "share_of_lambdas_beating_better_parent":
                                float(np.mean([y < better_parent for y in ys[1:-1]]))}
        sweeps.append({"previous": a, "latest": b, "lams": [float(x) for x in lams], "loss": curves,
                       "stats": stats})
    log("pilot sweeps done")
    return {"steps": steps, "single_sel_loss": single, "uniform_gain": uniform_gain.tolist(),
            "searched_gain": searched_gain.tolist(), "searched_lambda": searched_lam.tolist(),
            "sweeps": sweeps, "heatmap_budget": cfg.heatmap_budget}


def pilot_markdown(p: dict[str, Any], cfg: BenchConfig) -> str:
    steps = p["steps"]
    ug = np.array(p["uniform_gain"], dtype=float)
    sg = np.array(p["searched_gain"], dtype=float)
    n = len(steps)
    adj = [ug[i, i + 1] for i in range(n - 1)]
    far = [ug[i, j] for i in range(n) for j in range(i + 2, n)]
    lines = ["", f"Checkpoints every {cfg.heatmap_every} steps ({steps[0]}…{steps[-1]}); "
             "selection-shard loss.", "",
             f"- λ=0.5 soup vs the better parent: adjacent pairs gain {_summ(adj)}; "
             f"non-adjacent pairs gain {_summ(far)}; pairs where it helps: "
             f"{int(np.nansum(ug > 0))}/{n * (n - 1) // 2}.",
             f"- searched λ ∈ [{cfg.alpha}, 1] ({p['heatmap_budget']} evaluations) vs the later "
             f"checkpoint: adjacent {_summ([sg[i, i + 1] for i in range(n - 1)])}; non-adjacent "
             f"{_summ([sg[i, j] for i in range(n) for j in range(i + 2, n)])}.", "",
             "#### λ sweeps on [0, 1] (θ = λ·later + (1 − λ)·earlier)", ""]
    table = []
    for s in p["sweeps"]:
        for shard in SHARDS:
            st = s["stats"][shard]
            table.append([f"{s['previous']}→{s['latest']}", SHARD_TITLES[shard],
                          f"{st['best_lambda']:.2f}", f"{1e3 * st['gain_over_better_parent']:.2f}",
                          f"{100 * st['share_of_lambdas_beating_better_parent']:.0f}%"])
    lines += _fmt_table(["pair", "shard", "best λ", "gain over better parent (×10⁻³ nats)",
                         "interior λ beating the better parent"], table)
    return "\n".join(lines) + "\n"


def _summ(xs) -> str:
    xs = np.asarray([x for x in xs if not math.isnan(x)])
    if xs.size == 0:
        return "n/a"
    return (f"median {1e3 * np.median(xs):+.2f}×10⁻³ nats (min {1e3 * xs.min():+.2f}, "
            f"max {1e3 * xs.max():+.2f})")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(p: dict[str, Any], cfg: BenchConfig, path: Path) -> None:
    """Two panels over checkpoint pairs: λ=0.5 gain vs better parent, searched-λ gain vs later."""
    plt = _pyplot()
    steps = p["steps"]
    n = len(steps)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, key, title in ((axes[0], "uniform_gain", "λ=0.5 soup: gain over the better parent"),
                           (axes[1], "searched_gain",
                            f"searched λ∈[{cfg.alpha},1], {p['heatmap_budget']} evals: gain over later")):
        m = np.array(p[key], dtype=float) * 1e3
        lim = np.nanmax(np.abs(m)) if np.isfinite(m).any() else 1.0
        im = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim)
        ax.set_xticks(range(n), [str(s) for s in steps], rotation=90, fontsize=7)
        ax.set_yticks(range(n), [str(s) for s in steps], fontsize=7)
        ax.set_xlabel("later checkpoint (step)")
        ax.set_ylabel("earlier checkpoint (step)")
        ax.set_title(title, fontsize=9)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    if np.isfinite(m[i, j]):
                        ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=5.5)
        fig.colorbar(im, ax=ax, label="selection loss reduction (nats ×10⁻³)")
    fig.suptitle(f"Pairwise merges over one run (LR decays from step {cfg.decay_start})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweeps(p: dict[str, Any], cfg: BenchConfig, path: Path) -> None:
    """Loss relative to the later checkpoint vs λ ∈ [0, 1], one panel per pair, one line per shard."""
    plt = _pyplot()
    k = len(p["sweeps"])
    fig, axes = plt.subplots(2, k, figsize=(3.6 * k, 6.4), squeeze=False)
    for col, s in enumerate(p["sweeps"]):
        lams = np.array(s["lams"])
        for row in range(2):
            ax = axes[row][col]
            for shard in SHARDS:
                ys = np.array(s["loss"][shard])
                ax.plot(lams, 1e3 * (ys - ys[-1]), marker="o", ms=2.5, label=SHARD_TITLES[shard])
            ax.axhline(0.0, color="k", lw=0.5)
            ax.axvline(cfg.alpha, color="grey", lw=0.8, ls=":",
                       label=f"α = {cfg.alpha} (lower end of the λ search)")
            ax.set_xlabel("λ (weight of the later checkpoint)")
            ax.set_ylabel("loss − loss(later)  (nats ×10⁻³)")
        axes[0][col].set_title(f"{s['previous']} → {s['latest']}", fontsize=9)
        # second row: zoom on λ ∈ [α, 1], where the search operates
        ax = axes[1][col]
        inside = lams >= cfg.alpha - 1e-9
        vals = [1e3 * (np.array(s["loss"][sh])[inside] - s["loss"][sh][-1]) for sh in SHARDS]
        lo, hi = min(v.min() for v in vals), max(v.max() for v in vals)
        pad = 0.1 * (hi - lo) + 0.05
        ax.set_xlim(cfg.alpha - 0.02, 1.02)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(f"zoom: λ ∈ [{cfg.alpha}, 1]", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def _header(title: str, cfg: BenchConfig, traj: Trajectory, command: str, env: dict[str, Any],
            seconds: dict[str, float], cpu_seconds: dict[str, float]) -> str:
    m = traj.meta
    lines = [f"# {title}", "",
             f"Produced by `{command}` ({cfg.name} configuration).", "",
             f"- Model: GPT-NeoX (Pythia architecture), hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
             f"{cfg.num_heads} heads, context {cfg.block_size}, vocab {cfg.vocab_size} "
             f"({m.get('parameters', 'n/a')} parameters).",
             f"- Training: Shakespeare without Macbeth and Julius Caesar, batch {cfg.batch_size}×{cfg.block_size}, "
             f"AdamW lr {cfg.lr}, warmup {cfg.warmup_steps}, constant to step {cfg.decay_start}, linear decay "
             f"to 0.1× at step {cfg.total_steps}, seed {cfg.seed}; weights kept every {cfg.ckpt_every} steps; "
             f"trained in {m.get('train_seconds', float('nan')):.0f} s "
             f"({m.get('steps_per_second', float('nan')):.2f} steps/s)"
             + (" — loaded from the cache in this run." if m.get("loaded_from_cache") else "."),
             f"- Shards ({cfg.block_size}-token blocks, fixed seed {cfg.shard_seed}): selection = "
             f"{cfg.sel_blocks} blocks of Macbeth; in-domain test = {cfg.test_blocks} blocks of Julius Caesar; "
             f"out-of-domain = {cfg.ood_blocks} blocks of Python standard-library source.",
             f"- Environment: Python {env['python']}, torch {env['torch']} ({env['torch_threads']} thread), "
             f"lightning {env['lightning']}, transformers {env['transformers']}, scikit-optimize "
             f"{env['scikit-optimize']}, {env['cpu_count']} CPUs, {env['platform']}.",
             "- Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
             + (f"; machine load average (1 min) {env['load_average_1_5_15_min'][0]:.1f} at the start and "
                f"{env['load_average_end'][0]:.1f} at the end of the analysis"
                if env.get("load_average_1_5_15_min") and env.get("load_average_end") else "") + ".",
             "- CPU time of the process (s): " + ", ".join(f"{k} {v:.0f}" for k, v in cpu_seconds.items())
             + " (with 1 torch thread, about the wall time on an otherwise idle machine)."]
    return "\n".join(lines) + "\n"


def _png(path: Path, draw) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        draw(tmp)
        atomic_write_bytes(path, tmp.read_bytes())
    finally:
        if tmp.exists():
            tmp.unlink()


def main(argv=None, *, prog: str = "python -m benchmarks.quality",
         default_parts: str = ",".join(PARTS)) -> int:
    """Command line; see the module docstring.

    Args:
        argv: arguments (default ``sys.argv[1:]``).
        prog: the command recorded with the results.
        default_parts: parts run when ``--parts`` is not given.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (minutes)")
    parser.add_argument("--parts", default=default_parts,
                        help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results folder")
    parser.add_argument("--cache", default=None, help="trajectory cache folder "
                        "(default $MERGE_CALLBACK_CACHE/benchmarks or ~/.cache/merge_callback/benchmarks)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        parser.error(f"--parts must be a comma-separated subset of {','.join(PARTS)}, got {args.parts!r}")
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = QUICK if args.quick else FULL
    suffix = "_quick" if args.quick else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join([prog, *argv])
    env = environment()
    t_start, c_start = time.perf_counter(), time.process_time()
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}

    t0, c0 = time.perf_counter(), time.process_time()
    traj = train_trajectory(cfg, args.cache)
    seconds["trajectory (train or load)"] = time.perf_counter() - t0
    cpu_seconds["trajectory (train or load)"] = time.process_time() - c0
    scorer = Scorer(cfg, traj.data.shards)
    results: dict[str, Any] = {}

    if "quality" in parts or "users" in parts:
        quality_rows = None
        if "quality" in parts:
            t0, c0 = time.perf_counter(), time.process_time()
            quality_rows = run_quality(traj, scorer)
            seconds["quality"] = time.perf_counter() - t0
            cpu_seconds["quality"] = time.process_time() - c0
        user_rows = None
        if "users" in parts:
            t0, c0 = time.perf_counter(), time.process_time()
            user_rows = run_users(traj, scorer, quality_rows)
            seconds["users"] = time.perf_counter() - t0
            cpu_seconds["users"] = time.process_time() - c0
        results["quality"] = quality_rows
        results["users"] = user_rows
    if "pilot" in parts:
        t0, c0 = time.perf_counter(), time.process_time()
        pilot = run_pilot(traj, scorer)
        seconds["pilot"] = time.perf_counter() - t0
        cpu_seconds["pilot"] = time.process_time() - c0
        results["pilot"] = pilot
    if "search" in parts:
        from benchmarks import search_strategies

        t0, c0 = time.perf_counter(), time.process_time()
        results["search"] = search_strategies.run_search(traj, scorer)
        seconds["search"] = time.perf_counter() - t0
        cpu_seconds["search"] = time.process_time() - c0
    seconds["total"] = time.perf_counter() - t_start
    cpu_seconds["total"] = time.process_time() - c_start
    if hasattr(os, "getloadavg"):
        env["load_average_end"] = list(os.getloadavg())
    common = {"command": command, "config": cfg.to_dict(), "environment": env,
              "trajectory": traj.meta, "seconds": seconds, "cpu_seconds": cpu_seconds,
              "evaluations": scorer.evaluations, "evaluation_seconds": scorer.seconds}

    if results.get("quality") is not None or results.get("users") is not None:
        md = _header("Merge quality: baselines and what users pick instead", cfg, traj, command, env,
                     seconds, cpu_seconds)
        if results.get("quality") is not None:
            md += ("\n## Baselines (Table 1 / Table 2 style)\n\nAll weights and memberships chosen on "
                   "the selection shard; the test and out-of-domain shards are never used for a choice. "
                   f"BO soup: λ ∈ [{cfg.alpha}, 1], GP-hedge, {cfg.budget} evaluations, seed 0. Fisher: "
                   f"diagonal empirical Fisher from {cfg.fisher_sequences} single-sequence batches. "
                   f"RegMean: Gram matrices over the whole selection shard, off-diagonal scale "
                   f"{cfg.regmean_alpha}.\n")
            md += quality_markdown(results["quality"], cfg)
        if results.get("users") is not None:
            md += ("\n## What users pick instead (same run, same steps, same shards)\n\n"
                   "EMA: per-step exponential moving average of the weights from step 1 (first update "
                   "copies), tracked during training. LAWA k: uniform average of the last k kept "
                   f"checkpoints ({cfg.ckpt_every} steps apart).\n")
            md += users_markdown(results["users"], cfg)
        atomic_write_bytes(out / f"quality{suffix}.md", md.encode())
        atomic_write_json(out / f"quality{suffix}.json",
                          {**common, "quality": results.get("quality"), "users": results.get("users")})
    if "pilot" in results:
        md = _header("Pilot study: which pairs merge well, and how the loss depends on λ", cfg, traj,
                     command, env, seconds, cpu_seconds)
        md += pilot_markdown(results["pilot"], cfg)
        md += (f"\n![heatmap](pilot{suffix}_heatmap.png)\n\n![sweeps](pilot{suffix}_sweeps.png)\n")
        _png(out / f"pilot{suffix}_heatmap.png", lambda p: plot_heatmap(results["pilot"], cfg, p))
        _png(out / f"pilot{suffix}_sweeps.png", lambda p: plot_sweeps(results["pilot"], cfg, p))
        atomic_write_bytes(out / f"pilot{suffix}.md", md.encode())
        atomic_write_json(out / f"pilot{suffix}.json", {**common, "pilot": results["pilot"]})
    if "search" in results:
        from benchmarks import search_strategies

        md = _header("Search strategies for λ at equal budget", cfg, traj, command, env, seconds, cpu_seconds)
        md += "\n" + search_strategies.markdown(results["search"], cfg)
        md += f"\n![regret](search{suffix}_regret.png)\n"
        _png(out / f"search{suffix}_regret.png", lambda p: search_strategies.plot(results["search"], p))
        atomic_write_bytes(out / f"search{suffix}.md", md.encode())
        atomic_write_json(out / f"search{suffix}.json", {**common, "search": results["search"]})
    log(f"done in {seconds['total']:.0f} s ({scorer.evaluations} held-out evaluations, "
        f"{scorer.seconds:.0f} s); results in {out}")
    return 0


if __name__ == "__main__":
    from merge_callback.console import quiet_third_party

    with quiet_third_party():  # Lightning's banner and tips; our lines and warnings stay
        raise SystemExit(main())
