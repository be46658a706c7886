"""What a round reports: its scalars, and its curves for Weights & Biases (no framework import).

``wandb`` is imported lazily, only when a W&B logger or run is present.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from merge_callback.engine import RoundResult

__all__ = ["round_scalars", "require_wandb", "log_round_to_wandb_run"]


def round_scalars(result: RoundResult) -> dict[str, float]:
    """The scalars logged after each round."""
    return {
        "merge/lambda": float(result.lam),
        "merge/soup": float(result.value_soup),
        "merge/latest": float(result.value_latest),
        "merge/previous": float(result.value_previous),
    }


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
    return {
        "merge/curve_table": curve,
        "merge/curve": wandb.plot.line(curve, "lambda", result.metric,
                                       title=f"held-out {result.metric} vs lambda, "
                                             f"step {result.step}"),
        "merge/lambda_history": wandb.plot.line(hist, "step", "lambda",
                                                title="merge lambda per round"),
    }


def log_round_to_wandb_run(run: Any, result: RoundResult, history: Sequence[tuple[int, float]],
                           step_key: str | None = "trainer/global_step") -> None:
    """Log the round's λ-vs-metric curve (table and line plot) and the λ history to a W&B run."""
    wandb = require_wandb()
    payload = _wandb_curve_payload(wandb, result, history)
    if step_key:
        payload[step_key] = result.step
    run.log(payload)
