"""What a round reports: its scalars, and its curves for Weights & Biases (no framework import).

``wandb`` is imported lazily, only when a W&B logger or run is present.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from merge_callback.engine import RoundResult

__all__ = ["round_scalars", "require_wandb", "log_round_to_wandb_run"]


def round_scalars(result: RoundResult) -> dict[str, float]:
    """The scalars logged after each round: λ and the chosen metric of the soup, the latest and
    the previous weights, and — whatever metric chose λ — the side values the same forward
    passes gave (``merge/soup_accuracy``, ``merge/latest_loss``, ...)."""
    out = {
        "merge/lambda": float(result.lam),
        "merge/soup": float(result.value_soup),
        "merge/latest": float(result.value_latest),
        "merge/previous": float(result.value_previous),
    }
    for which, values in result.extras.get("side", {}).items():
        out.update({f"merge/{which}_{name}": float(v) for name, v in values.items()})
    return out


def require_wandb() -> Any:
    """Import and return ``wandb``, or raise an ImportError that says how to install it."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError("logging merge curves to Weights & Biases needs wandb; install it with "
                          "`pip install wandb` or `pip install 'merge_callback[wandb]'`") from e
    return wandb


def _wandb_curve_payload(wandb: Any, result: RoundResult,
                         history: Sequence[tuple[int, float]]) -> dict[str, Any]:
    curve = wandb.Table(columns=["lambda", result.metric, "order"],
                        data=[[lam, val, i] for i, (lam, val) in
                              enumerate(sorted(result.observations))])
    hist = wandb.Table(columns=["step", "lambda"], data=[[s, lam] for s, lam in history])
    payload = {
        "merge/curve_table": curve,
        "merge/curve": wandb.plot.line(curve, "lambda", result.metric,
                                       title=f"held-out {result.metric} vs lambda, "
                                             f"step {result.step}"),
        "merge/lambda_history": wandb.plot.line(hist, "step", "lambda",
                                                title="merge lambda per round"),
    }
    # the λ-vs-accuracy curve (and loss) of the same evaluations, whatever metric chose λ
    side = [v for v in result.extras.get("side_values", []) if v["family"] == result.family]
    names = [n for n in ("accuracy", "loss") if side and n in side[0] and n != result.metric]
    for name in names:
        table = wandb.Table(columns=["lambda", name], data=sorted(
            [[v["param"], v[name]] for v in side]))
        payload[f"merge/{name}_curve_table"] = table
        payload[f"merge/{name}_curve"] = wandb.plot.line(
            table, "lambda", name, title=f"held-out {name} vs lambda, step {result.step}")
    return payload


def log_round_to_wandb_run(run: Any, result: RoundResult, history: Sequence[tuple[int, float]],
                           step_key: str | None = "trainer/global_step") -> None:
    """Log the round's λ-vs-metric curve (table and line plot) and the λ history to a W&B run."""
    wandb = require_wandb()
    payload = _wandb_curve_payload(wandb, result, history)
    if step_key:
        payload[step_key] = result.step
    run.log(payload)
