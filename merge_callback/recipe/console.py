"""What the recipe prints: its own lines (:func:`say`, rank zero only, above any progress bar),
and :func:`quiet_third_party`, which silences known third-party messages around the recipe's own
calls."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings

__all__ = ["say", "quiet_third_party"]


_NO_VAL_WARNING = r".*defined a `validation_step` but have no `val_dataloader`"


# known third-party messages the recipe triggers; silenced only around the recipe's own calls
_THIRD_PARTY_WARNINGS = (
    _NO_VAL_WARNING,
    r".*LeafSpec.*deprecated",  # lightning's _pytree under torch >= 2.10
    r"Checkpoint directory .* exists and is not empty",
    r".*The number of training batches \(\d+\) is smaller than the logging interval",
)
_QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


@contextlib.contextmanager
def quiet_third_party():
    """Silence Lightning's info lines (hardware summary, litlogger tip, "fit stopped"), its known
    harmless warnings, transformers' progress bars, and the one-time DeepSpeed accelerator notice
    that ``save_pretrained`` triggers when DeepSpeed is installed; everything is restored on exit.
    Warnings from the merge callback and any other warning stay visible."""
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


class _DropDeepSpeedAcceleratorNotice(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU" notice (printed when it is first imported)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Setting accelerator to" not in record.getMessage()


def say(message: str) -> None:
    """Print one line of the recipe's own output (rank zero only; above any progress bar)."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stdout)
    except ImportError:  # pragma: no cover - tqdm comes with lightning
        print(message, flush=True)
    sys.stdout.flush()
