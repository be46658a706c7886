"""The run's report: ``rounds.json``, the plots (``lambda.png``, ``heldout.png``, ``curve.png``)
and ``report.md``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from merge_callback.recipe.config import RecipeConfig, dump_config

__all__ = ["write_report", "round_records", "format_value"]


def _plots(rounds: list[dict], metric: str, run_dir: Path, alpha: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rounds]
    names = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["lambda"] for r in rounds], "o-", label="λ chosen")
    ax.axhline(alpha, color="grey", ls=":", lw=0.8, label=f"α = {alpha:g} (lowest λ searched)")
    ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("λ (weight of the latest checkpoint)")
    ax.set_ylim(0, 1.05)
    ax.set_title("λ chosen per merge round")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "lambda.png", dpi=110)
    plt.close(fig)
    names.append("lambda.png")

    has_ood = all("ood_latest" in r for r in rounds)
    fig, axes = plt.subplots(1, 2 if has_ood else 1, figsize=(11 if has_ood else 6, 3.8),
                             squeeze=False)
    panels = [("held-out (chooses λ)", "value_latest", "value_soup")]
    if has_ood:
        panels.append(("out-of-domain (reported only)", "ood_latest", "ood_soup"))
    for ax, (title, kl, ks) in zip(axes[0], panels):
        ax.plot(steps, [r[kl] for r in rounds], "o-", label="latest checkpoint")
        ax.plot(steps, [r[ks] for r in rounds], "s-", label="soup")
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "heldout.png", dpi=110)
    plt.close(fig)
    names.append("heldout.png")

    last = rounds[-1]
    obs = sorted((float(lam), float(v)) for lam, v in last.get("observations", []))
    if obs:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([o[0] for o in obs], [o[1] for o in obs], "o-", label="evaluated λ")
        ax.plot([last["lambda"]], [last["value_soup"]], "r*", markersize=14,
                label=f"chosen λ = {last['lambda']:.3f}")
        ax.set_xlabel("λ")
        ax.set_ylabel(f"held-out {metric}")
        ax.set_title(f"last round (step {last['previous_step']} → {last['step']})")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "curve.png", dpi=110)
        plt.close(fig)
        names.append("curve.png")
    return names


def format_value(v: Any, digits: int = 4) -> str:
    """``v`` with ``digits`` decimals; ``–`` for None."""
    return "–" if v is None else f"{v:.{digits}f}"


def write_report(run_dir: str | os.PathLike, rounds: list[dict], config: RecipeConfig,
                 facts: Mapping[str, Any]) -> Path:
    """Write ``rounds.json``, the PNG plots and ``report.md`` into ``run_dir``.

    Args:
        run_dir: the run folder.
        rounds: the merge callback's history (one dict per round).
        config: the resolved config.
        facts: model, data and timing facts shown at the top of the report.
    """
    from merge_callback.io import atomic_write_bytes, atomic_write_json

    run_dir = Path(run_dir)
    metric = config.merge_metric
    higher = metric == "accuracy"
    sign = 1.0 if higher else -1.0
    atomic_write_json(run_dir / "rounds.json", {"metric": metric, "rounds": rounds,
                                                **{k: v for k, v in facts.items()}})
    plots = _plots(rounds, metric, run_dir, config.merge_alpha) if rounds else []
    has_ood = bool(rounds) and all("ood_latest" in r for r in rounds)
    lines = ["# Continued pretraining with checkpoint soups", ""]
    for k, v in facts.items():
        lines.append(f"- **{k}**: {v}")
    lines += ["", "## Merge rounds", "",
              f"Held-out {metric} of the latest checkpoint and of the soup "
              "θ = λ·θ_t + (1−λ)·θ_{t−1} chosen by the search. λ is chosen on the held-out "
              "shard, where λ = 1 (the latest checkpoint) is always a candidate, so the soup is "
              "never worse there; the out-of-domain shard (OOD) is never used to choose λ. "
              "Gain = improvement of the soup over the latest "
              f"({'higher' if higher else 'lower'} is better).", ""]
    head = "| step | λ | held-out latest | held-out soup | gain |"
    rule = "|---:|---:|---:|---:|---:|"
    if has_ood:
        head += " OOD latest | OOD soup | OOD gain |"
        rule += "---:|---:|---:|"
    lines += [head, rule]
    for r in rounds:
        gain = sign * (r["value_soup"] - r["value_latest"]) + 0.0  # no "-0.0000"
        row = (f"| {r['step']} | {r['lambda']:.3f} | {format_value(r['value_latest'])} | "
               f"{format_value(r['value_soup'])} | {gain:+.4f} |")
        if has_ood:
            ood_gain = sign * (r["ood_soup"] - r["ood_latest"]) + 0.0
            row += (f" {format_value(r['ood_latest'])} | {format_value(r['ood_soup'])} | "
                    f"{ood_gain:+.4f} |")
        lines.append(row)
    if rounds:
        late = rounds[len(rounds) - max(1, len(rounds) // 3):]
        wins = sum(1 for r in rounds if sign * (r["value_soup"] - r["value_latest"]) > 0)
        late_gain = [sign * (r["value_soup"] - r["value_latest"]) for r in late]
        lines += ["", f"The soup beat the latest checkpoint on held-out {metric} in {wins} of "
                      f"{len(rounds)} rounds; over the last {len(late)} rounds (steps "
                      f"{late[0]['step']}–{late[-1]['step']}) the mean gain was "
                      f"{sum(late_gain) / len(late):+.4f}."]
        at_alpha = sum(1 for r in rounds if r["lambda"] <= config.merge_alpha + 1e-9)
        if at_alpha:
            lines.append(f"λ sat at its lower bound merge_alpha = {config.merge_alpha:g} in "
                         f"{at_alpha} of {len(rounds)} rounds: the best weighting may lie below "
                         "it (a lower merge_alpha searches there).")
        if has_ood:
            ood_late = [sign * (r["ood_soup"] - r["ood_latest"]) for r in late]
            ood_wins = sum(1 for r in rounds if sign * (r["ood_soup"] - r["ood_latest"]) > 0)
            lines.append(f"On the out-of-domain shard the soup was better in {ood_wins} of "
                         f"{len(rounds)} rounds; mean gain over the last {len(late)} rounds "
                         f"{sum(ood_late) / len(late):+.4f}.")
    else:
        lines += ["", "No merge round ran."]
    if plots:
        lines += ["", "## Plots", ""]
        captions = {"lambda.png": "λ per round",
                    "heldout.png": "held-out metric of the latest checkpoint and of the soup",
                    "curve.png": "the last round's held-out metric for each evaluated λ"}
        for name in plots:
            lines += [f"![{captions[name]}]({name})", ""]
    lines += ["## Configuration", "", "```yaml", dump_config(config).rstrip(), "```", ""]
    path = run_dir / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode("utf-8"))
    return path


def round_records(history: Sequence[Mapping[str, Any]], ood: Mapping[int, Mapping[str, float]],
                   soup_dir: Path) -> list[dict[str, Any]]:
    """One dict per round: the merge callback's entry, OOD values, observations and seconds."""
    rounds = []
    for h in history:
        r = dict(h)
        if h["step"] in ood:
            r["ood_latest"], r["ood_soup"] = ood[h["step"]]["latest"], ood[h["step"]]["soup"]
        side = soup_dir / f"soup-step={h['step']}.json"
        if side.is_file():
            info = json.loads(side.read_text())
            r["observations"] = info.get("observations", [])
            r["seconds"] = info.get("seconds", 0.0)
        rounds.append(r)
    return rounds
