""":func:`quiet_third_party`: silence known third-party messages around calls this package's own
programs make (the recipe, the examples), never globally for a user's code."""

from __future__ import annotations

import contextlib
import logging
import warnings

__all__ = ["quiet_third_party"]


# known, harmless third-party warnings that our programs trigger
_THIRD_PARTY_WARNINGS = (
    r".*defined a `validation_step` but have no `val_dataloader`",
    r".*LeafSpec.*deprecated",  # lightning's _pytree under torch >= 2.10
    r"Checkpoint directory .* exists and is not empty",
    r".*The number of training batches \(\d+\) is smaller than the logging interval",
    r".*does not have many workers which may be a bottleneck",
)
_QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


class _DropDeepSpeedAcceleratorNotice(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU" notice, printed when DeepSpeed is first
    imported (``accelerate`` imports it when a ``Trainer`` is built or a model is saved)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Setting accelerator to" not in record.getMessage()


@contextlib.contextmanager
def quiet_third_party():
    """Silence Lightning's info lines (hardware summary, litlogger tip, "fit stopped"), its known
    harmless warnings, transformers' progress bars, and the one-time DeepSpeed accelerator notice;
    everything is restored on exit. Warnings from the merge callbacks and any other warning stay
    visible."""
    saved = {}
    for name in _QUIET_LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = lg.level
        lg.setLevel(logging.WARNING)
    hf_logging = None
    bars_were_on = False
    try:
        from transformers.utils import logging as hf_logging

        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    ds = logging.getLogger("DeepSpeed")
    ds_filter = _DropDeepSpeedAcceleratorNotice()
    ds.addFilter(ds_filter)
    try:
        with warnings.catch_warnings():
            for pattern in _THIRD_PARTY_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        if hf_logging is not None and bars_were_on:
            hf_logging.enable_progress_bar()
        ds.removeFilter(ds_filter)
