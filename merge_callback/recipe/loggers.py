"""The recipe's training loggers: CSV, and W&B when configured or installed (a resumed run
continues its W&B run)."""

from __future__ import annotations

import os
from pathlib import Path

from merge_callback.recipe.config import RecipeConfig

__all__ = ["build_loggers", "wandb_run_id"]


def _wants_wandb(config: RecipeConfig) -> bool:
    if config.logger == "wandb":
        return True
    if config.logger != "auto":
        return False
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the newest W&B run under ``run_dir/wandb`` (offline-run-DATE-ID or run-DATE-ID)."""
    found = sorted((p.name for p in (run_dir / "wandb").glob("*run-*-*") if p.is_dir()),
                   key=lambda n: n.split("-")[-2])  # by date-time
    return found[-1].rsplit("-", 1)[1] if found else None


def build_loggers(config: RecipeConfig, run_dir: Path, wandb_id: str | None = None) -> list:
    """The Lightning loggers of ``config.logger``: CSV under ``run_dir/logs``, W&B under
    ``run_dir/wandb`` (continuing the run ``wandb_id`` when given).

    Raises:
        ImportError: ``logger: wandb`` without the ``wandb`` package.
    """
    from lightning.pytorch.loggers import CSVLogger

    if config.logger == "none":
        return []
    out = []
    if config.logger in ("auto", "csv"):
        out.append(CSVLogger(str(run_dir), name="logs"))  # logs/version_N: resumes add one
    if _wants_wandb(config):
        from lightning.pytorch.loggers import WandbLogger

        from merge_callback.tracking import require_wandb

        wandb = require_wandb()
        if config.wandb_mode == "auto":
            online = bool(os.environ.get("WANDB_API_KEY")) and \
                os.environ.get("WANDB_MODE", "") not in ("offline", "disabled")
        else:
            online = config.wandb_mode == "online"
        # the run is started here rather than by WandbLogger, which passes W&B a deprecated
        # `anonymous` setting (a warning on every run); a resumed recipe run continues its W&B run
        wb_run = wandb.init(project=config.wandb_project, dir=str(run_dir),
                            mode="online" if online else "offline", id=wandb_id,
                            resume="allow" if wandb_id else None, config=config.to_dict(),
                            settings=wandb.Settings(quiet=True))
        out.append(WandbLogger(experiment=wb_run))
    return out
