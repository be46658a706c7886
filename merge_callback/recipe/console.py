"""What the recipe prints: its own lines (:func:`say`, rank zero only, above any progress bar);
:func:`quiet_third_party` (from :mod:`merge_callback.console`) silences known third-party messages
around the recipe's own calls."""

from __future__ import annotations

import sys

from merge_callback.console import quiet_third_party

__all__ = ["quiet_third_party", "say"]


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
