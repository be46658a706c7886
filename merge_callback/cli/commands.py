"""The ``merge-callback`` commands (merge, sweep, heatmap), what they write (soup folders,
``merge.json``, CSV and PNG files, the printed summaries), and :func:`main`."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from merge_callback.cli.args import (DEFAULT_ALPHA, PROG, CLIError, config_dict, dump_config,
                                     parse_args)
from merge_callback.cli.plots import check_matplotlib, plot_heatmap, plot_sweep
from merge_callback.cli.session import (CONFIG_FILE_KEYS, TOKENIZER_FILES, MergeSession,
                                        check_out_writable)
from merge_callback.io import atomic_directory, json_safe, remove_stale_temporaries
from merge_callback.stream import parse_size, validate_weights, write_merged

__all__ = ["run", "main"]

def _copy_hf_files(session: MergeSession, tmp: Path) -> list[str]:
    copied = []
    ref = session.paths[-1]
    for name in CONFIG_FILE_KEYS + TOKENIZER_FILES:
        if (ref / name).is_file():
            shutil.copy2(ref / name, tmp / name)
            copied.append(name)
    if not any(n in copied for n in TOKENIZER_FILES) and session.tokenizer_path is not None \
            and session.tokenizer_path.is_dir():
        for name in TOKENIZER_FILES:
            if (session.tokenizer_path / name).is_file():
                shutil.copy2(session.tokenizer_path / name, tmp / name)
                copied.append(name)
    return copied


def _per_shard(values: dict[str, float]) -> str:
    if len(values) < 2:
        return ""
    return " (" + ", ".join(f"{k}={v:.4f}" for k, v in values.items()) + ")"


def _fmt_weights(w: Sequence[float]) -> str:
    return "[" + " ".join(f"{x:.4f}" for x in w) + "]"


def _common_record(session: MergeSession, ns: argparse.Namespace) -> dict[str, Any]:
    from merge_callback import __version__

    return {
        "command": ns.command,
        "checkpoints": [str(p) for p in session.paths],
        "labels": session.labels,
        "format": session.format,
        "heldout": session.heldout_info(),
        "fitness": ({"name": session.fitness_name, "higher_is_better": session.higher_is_better}
                    if session.shards else None),
        "merge_callback_version": __version__,
        "config": config_dict(ns),
    }


def _cmd_merge(ns: argparse.Namespace) -> dict[str, Any]:
    check_out_writable(ns)
    n = len(ns.checkpoints)
    if n < 2:
        raise CLIError(f"merge needs at least 2 checkpoints, got {n}")
    if ns.weights is not None and ns.method is not None:
        raise CLIError("give either --weights (fixed) or --method (searched), not both")
    if ns.weights is not None:
        try:
            fixed = validate_weights(ns.weights, n, name="--weights")
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        method = "fixed"
    else:
        fixed = None
        method = ns.method or ("bayes" if n == 2 else "cmaes")
    if not (0.0 < ns.alpha < 1.0):
        raise CLIError(f"--alpha must be in (0, 1), got {ns.alpha}")
    try:
        parse_size(ns.max_shard_size)
    except ValueError as exc:
        raise CLIError(f"--max_shard_size: {exc}") from None
    searched = method in ("bayes", "cmaes", "greedy")
    if searched and not ns.heldout and not ns.lm_eval:
        raise CLIError(f"--heldout is required for --method {method} (candidates are scored on "
                       "held-out data, or on lm-eval tasks with --lm_eval); for a plain merge "
                       "pass --weights or --method uniform")
    if method == "cmaes":
        from merge_callback.nway import import_optuna

        try:
            import_optuna()
        except ImportError as exc:
            raise CLIError(str(exc)) from None
    pairwise = method == "bayes" and n == 2
    if method in ("bayes", "cmaes") and not pairwise:
        from merge_callback.nway import validate_weight_search_args

        try:
            validate_weight_search_args(n, method, ns.budget, ns.sigma0, ns.popsize)
        except ValueError as exc:
            raise CLIError(f"--{str(exc)}") from None
    if pairwise and ns.budget < 3:
        raise CLIError(f"--budget must be >= 3 for 2 checkpoints (λ = alpha, λ = 1 and at least "
                       f"one searched point), got {ns.budget}")

    session = MergeSession(ns, need_eval=searched, soup_output=True)
    try:
        return _run_merge(session, ns, method, fixed, pairwise)
    finally:
        session.close()


def _run_merge(session: MergeSession, ns, method: str, fixed, pairwise: bool) -> dict[str, Any]:
    n = len(session.paths)
    t0 = time.perf_counter()
    observations: list[dict[str, Any]] = []
    best: dict[str, Any] = {"value": None}
    hib = session.higher_is_better if session.shards else False
    expected = {"bayes": ns.budget, "cmaes": ns.budget, "greedy": 2 * n - 1, "uniform": 1,
                "fixed": 1}[method]
    if session.shards:
        session.plan(expected, at_most=method == "greedy")

    def objective(weights: Sequence[float], lam: float | None = None) -> float:
        k = len(observations) + 1
        label = f"/{expected}" if method != "greedy" else ""
        value, values = session.evaluate(weights, label)
        obs = {"weights": list(weights), "value": value, "values": values}
        if lam is not None:
            obs = {"lam": lam, **obs}
        observations.append(obs)
        if best["value"] is None or (value > best["value"] if hib else value < best["value"]):
            best.update(value=value, weights=list(weights))
        where = f"λ={lam:.4f}" if lam is not None else f"w={_fmt_weights(weights)}"
        session.log(f"[{k}/{expected if method != 'greedy' else '≤' + str(expected)}] {where}  "
                    f"{session.fitness_name}={value:.6f}{_per_shard(values)}  "
                    f"best={best['value']:.6f}")
        return value

    result: dict[str, Any] = {}
    if method == "fixed" or (method == "uniform"):
        weights = list(fixed) if fixed is not None else [1.0 / n] * n
        value = objective(weights) if session.shards else None
        result.update(weights=weights, value=value)
    elif pairwise:
        from merge_callback.search import search_lambda

        r = search_lambda(lambda lam: objective([1.0 - lam, lam], lam), alpha=ns.alpha,
                          budget=ns.budget, strategy="bayes", acq_func=ns.acq_func, seed=ns.seed,
                          higher_is_better=hib)
        result.update(weights=[1.0 - r.lam, r.lam], lam=r.lam, value=r.value,
                      alpha=ns.alpha, acq_func=ns.acq_func)
    else:
        from merge_callback.nway import default_popsize, search_weights

        r = search_weights(lambda w: objective(w), n, method=method, budget=ns.budget,
                           seed=ns.seed, higher_is_better=hib, sigma0=ns.sigma0,
                           popsize=ns.popsize, acq_func=ns.acq_func)
        result.update(weights=list(r.weights), value=r.value)
        if method == "cmaes":
            result.update(popsize=ns.popsize or default_popsize(n), sigma0=ns.sigma0)
    weights = validate_weights(result["weights"], n)
    result["weights"] = list(weights)

    baselines = {}
    for obs in observations:
        w = obs["weights"]
        if w == [1.0 / n] * n:
            baselines["uniform"] = obs["value"]
        for i in range(n):
            if w[i] == 1.0:
                baselines[session.labels[i]] = obs["value"]
    record = {
        **_common_record(session, ns),
        "method": method,
        **result,
        "weights_by_checkpoint": dict(zip(session.labels, result["weights"])),
        "values": next((o["values"] for o in observations if o["weights"] == result["weights"]),
                       None),
        "baselines": baselines,
        "observations": observations,
        "evaluations": len(observations),
        "seed": ns.seed,
        "seconds_evaluating": round(session.eval_seconds, 3),
    }
    out = Path(ns.out)
    metadata = {"merge_callback": json.dumps(json_safe({
        "checkpoints": record["labels"], "weights": result["weights"], "method": method}))}
    session.close_progress()
    _remove_debris(session, out)
    with atomic_directory(out) as tmp:
        if session.format != "hf" and session.writes_hf_folder:
            files = session.save_pretrained(weights, tmp)
        else:
            files = write_merged(session.readers, weights, tmp, max_shard_size=ns.max_shard_size,
                                 metadata=metadata)
        if session.format == "hf":
            files += _copy_hf_files(session, tmp)
        record["files"] = sorted(files) + ["merge.json"]
        record["seconds"] = round(time.perf_counter() - t0, 3)
        (tmp / "merge.json").write_text(json.dumps(json_safe(record), indent=2) + "\n")
    _print_merge_summary(session, record)
    return record


def _print_merge_summary(session: MergeSession, record: dict[str, Any]) -> None:
    lines = []
    w = " + ".join(f"{x:.4f}·{lab}" for lab, x in zip(session.labels, record["weights"]))
    head = f"soup = {w}"
    if "lam" in record:
        head = f"λ = {record['lam']:.4f} (weight of {session.labels[-1]});  " + head
    lines.append(head)
    if record.get("value") is not None:
        lines.append(f"held-out {session.fitness_name}: {record['value']:.6f}"
                     f"{_per_shard(record['values'] or {})}  "
                     f"({record['evaluations']} evaluations, method {record['method']})")
        for name, v in record["baselines"].items():
            lines.append(f"  {name:>20s}: {v:.6f}")
    lines.append(f"wrote {record['config']['out']}: {', '.join(record['files'])}")
    print("\n".join(lines))


def _remove_debris(session: MergeSession, out: Path) -> None:
    """Remove what killed writes left next to ``out`` (temporaries of dead processes)."""
    for p in remove_stale_temporaries(out.parent):
        session.log(f"removed {p}, left by an interrupted write")


def _pair_rows(session: MergeSession, points: list[tuple[str, list[float], dict[str, Any]]]):
    session.plan(len(points))
    rows = []
    for label, weights, extra in points:
        value, values = session.evaluate(weights, label)
        rows.append({**extra, "value": value, **{f"heldout:{k}": v for k, v in values.items()}})
        session.log(f"[{len(rows)}/{len(points)}] {label.strip()}  "
                    f"{session.fitness_name}={value:.6f}{_per_shard(values)}")
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.10g}" if isinstance(v, float) else v)
                             for k, v in r.items()})


def _cmd_sweep(ns: argparse.Namespace) -> dict[str, Any]:
    check_out_writable(ns)
    if len(ns.checkpoints) != 2:
        raise CLIError(f"sweep needs exactly 2 checkpoints (A B, oldest first), got "
                       f"{len(ns.checkpoints)}")
    if ns.points < 2:
        raise CLIError(f"--points must be >= 2, got {ns.points}")
    check_matplotlib()
    session = MergeSession(ns, need_eval=True)
    try:
        lams = [i / (ns.points - 1) for i in range(ns.points)]
        points = [(f" λ={lam:.4f}", [1.0 - lam, lam], {"lam": lam, "weight_a": 1.0 - lam,
                                                        "weight_b": lam}) for lam in lams]
        rows = _pair_rows(session, points)
        hib = session.higher_is_better
        best = (max if hib else min)(rows, key=lambda r: r["value"])
        record = {**_common_record(session, ns), "points": rows,
                  "best": {"lam": best["lam"], "value": best["value"]},
                  "seconds_evaluating": round(session.eval_seconds, 3)}
        session.close_progress()
        _remove_debris(session, Path(ns.out))
        with atomic_directory(Path(ns.out)) as tmp:
            _write_csv(tmp / "sweep.csv", rows)
            plot_sweep(tmp / "sweep.png", rows, labels=session.labels,
                       fitness_name=session.fitness_name,
                       shard_names=[s.spec.name for s in session.shards],
                       alpha=DEFAULT_ALPHA)
            (tmp / "sweep.json").write_text(json.dumps(json_safe(record), indent=2) + "\n")
        print(f"{'λ':>8s}  {session.fitness_name}")
        for r in rows:
            mark = "  <- best" if r is best else ""
            print(f"{r['lam']:8.4f}  {r['value']:.6f}{mark}")
        print(f"wrote {ns.out}: sweep.csv, sweep.png, sweep.json")
        return record
    finally:
        session.close()


def _cmd_heatmap(ns: argparse.Namespace) -> dict[str, Any]:
    check_out_writable(ns)
    n = len(ns.checkpoints)
    if n < 2:
        raise CLIError(f"heatmap needs at least 2 checkpoints, got {n}")
    if not (0.0 <= ns.lam <= 1.0):
        raise CLIError(f"--lam must be in [0, 1], got {ns.lam}")
    check_matplotlib()
    session = MergeSession(ns, need_eval=True)
    try:
        labels = session.labels
        points = []
        for i in range(n):
            w = [0.0] * n
            w[i] = 1.0
            points.append((f" {labels[i]}", w, {"i": i, "j": i, "checkpoint_i": labels[i],
                                                 "checkpoint_j": labels[i], "lam": 1.0}))
        for i in range(n):
            for j in range(i + 1, n):
                w = [0.0] * n
                w[i], w[j] = 1.0 - ns.lam, ns.lam
                points.append((f" {labels[i]}+{labels[j]}", w,
                               {"i": i, "j": j, "checkpoint_i": labels[i],
                                "checkpoint_j": labels[j], "lam": ns.lam}))
        rows = _pair_rows(session, points)
        hib = session.higher_is_better
        single = {r["i"]: r["value"] for r in rows if r["i"] == r["j"]}
        for r in rows:
            parent = (max if hib else min)(single[r["i"]], single[r["j"]])
            r["gain_vs_best_parent"] = (r["value"] - parent) if hib else (parent - r["value"])
        record = {**_common_record(session, ns), "lam": ns.lam, "pairs": rows,
                  "seconds_evaluating": round(session.eval_seconds, 3)}
        session.close_progress()
        _remove_debris(session, Path(ns.out))
        with atomic_directory(Path(ns.out)) as tmp:
            _write_csv(tmp / "heatmap.csv", rows)
            plot_heatmap(tmp / "heatmap.png", rows, labels=session.labels,
                         fitness_name=session.fitness_name,
                         higher_is_better=session.higher_is_better, lam=ns.lam)
            (tmp / "heatmap.json").write_text(json.dumps(json_safe(record), indent=2) + "\n")
        width = max(len(lab) for lab in labels)
        print(f"held-out {session.fitness_name} (diagonal: single checkpoint; above: "
              f"{1 - ns.lam:g}·row + {ns.lam:g}·column)")
        table = {(r["i"], r["j"]): r["value"] for r in rows}
        print(" " * width + "  " + "  ".join(f"{lab:>{max(10, len(lab))}s}" for lab in labels))
        for i in range(n):
            cells = []
            for j in range(n):
                v = table.get((i, j))
                cells.append(f"{v:>{max(10, len(labels[j]))}.5f}" if v is not None
                             else " " * max(10, len(labels[j])))
            print(f"{labels[i]:>{width}s}  " + "  ".join(cells))
        print(f"wrote {ns.out}: heatmap.csv, heatmap.png, heatmap.json")
        return record
    finally:
        session.close()


_COMMANDS = {"merge": _cmd_merge, "sweep": _cmd_sweep, "heatmap": _cmd_heatmap}


def run(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run a command and return its record (what it writes as JSON); ``None`` for
    ``--print_config``.

    Raises:
        CLIError, ValueError, FileNotFoundError: bad input, before any work.
        SystemExit: ``--help``.
    """
    ns = parse_args(argv)
    if ns.print_config:
        sys.stdout.write(dump_config(ns))
        return None
    return _COMMANDS[ns.command](ns)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``merge-callback``; returns the exit code: 0, 2 on bad input (one line
    ``merge-callback: error: ...`` on stderr, nothing written), 130 when interrupted."""
    try:
        run(argv)
    except (CLIError, ValueError, OSError, ImportError) as exc:
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output was written", file=sys.stderr)
        return 130
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return 0
