"""Every option constant and every argument check of the callbacks, in one place.

Both adapters, the CLI and the recipe validate through these functions, so a bad value gets the
same message wherever it is given: the argument's name, what is allowed, and what was given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from merge_callback.evaluate import BUILTIN_METRICS as METRICS
from merge_callback.search import ACQ_FUNCS, STRATEGIES

__all__ = ["STRATEGIES", "ACQ_FUNCS", "METRICS", "ON_ERROR", "check_positive_int", "check_bool",
           "check_path", "check_number", "check_decays", "validate_callback_args",
           "validate_averaging_args", "AVERAGING", "AutoMode", "AUTO"]

#: what a failed round does: report it and go on, or re-raise it
ON_ERROR = ("warn", "raise")

#: the averaging modes: ``"pairwise"`` (the paper's soup, extended by ``history``,
#: ``snapshot_every`` and ``ema_decays`` as given) or ``"auto"`` (:data:`AUTO`)
AVERAGING = ("pairwise", "auto")


@dataclass(frozen=True)
class AutoMode:
    """The settings of ``averaging="auto"`` (fixed by ``benchmarks/anytime.py``'s ``MODE``).

    Attributes:
        track_sigmas: σ_rel of the two host power-function EMA tracks.
        snapshot_every: track update interval in steps when ``snapshot_every`` is ``None``.
        keep: newest snapshots kept per kind on disk (besides one per octave of steps).
        sigma_range: the post-hoc EMA's σ_rel interval (searched on a log scale).
        window_kind, window_range: the decay-shaped window over the last W saves, W's interval.
        budget_phema, budget_window, budget_pairwise, budget_blend: evaluations of each family's
            search (shared endpoints are evaluated once: 1 + 5 + 3 + 2 + 1 = 12 per round).
    """

    track_sigmas: tuple[float, ...] = (0.05, 0.15)
    snapshot_every: int = 10
    keep: int = 16
    sigma_range: tuple[float, float] = (0.02, 0.28)
    window_kind: str = "one_minus_sqrt"
    window_range: tuple[int, int] = (2, 16)
    budget_phema: int = 5
    budget_window: int = 3
    budget_pairwise: int = 3
    budget_blend: int = 3

    @property
    def budget(self) -> int:
        """Held-out evaluations per round (the latest weights included)."""
        return 1 + self.budget_phema + self.budget_window + self.budget_pairwise - 1 + \
            self.budget_blend - 2


#: the recommended mode
AUTO = AutoMode()


def check_positive_int(name: str, value: Any, allow_none: bool = False,
                       none_means: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is an integer >= 1 (or None, if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = f" or None{none_means}" if allow_none else ""
        raise ValueError(f"{name} must be a positive integer{extra}, got {value!r}")


def check_bool(name: str, value: Any, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True`` or ``False`` (no truthy strings)."""
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        extra = ", or None" if allow_none else ""
        raise ValueError(f"{name} must be True or False{extra}, got {value!r}")


def check_path(name: str, value: Any, allow_none: bool = True) -> None:
    """Raise ``ValueError`` unless ``value`` is a non-empty ``str`` or ``os.PathLike``."""
    if value is None and allow_none:
        return
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a non-empty path (str or os.PathLike){extra}, "
                         f"got {value!r}")


def check_number(name: str, value: Any, lo: float, hi: float, *, inclusive: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number in ``(lo, hi)`` (``[lo, hi]``)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        ok = lo <= value <= hi if inclusive else lo < value < hi
    if not ok:
        bounds = f"[{lo:g}, {hi:g}]" if inclusive else f"({lo:g}, {hi:g})"
        raise ValueError(f"{name} must be a number in {bounds}, got {value!r}")


def check_decays(name: str, values: Any) -> tuple[float, ...]:
    """``values`` as a tuple of distinct numbers in (0, 1); a clear error otherwise."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of distinct numbers in (0, 1) (e.g. "
                         f"(0.99, 0.999)), got {values!r}")
    decays = tuple(values)
    if any(isinstance(d, bool) or not isinstance(d, (int, float)) or not (0.0 < d < 1.0)
           for d in decays) or len(set(decays)) != len(decays):
        raise ValueError(f"{name} must be distinct numbers in (0, 1), got {list(decays)}")
    return tuple(float(d) for d in decays)


def validate_callback_args(*, max_batches: Any, every_n_saves: Any, on_error: Any,
                           save_soups: Any = True, soup_dir: Any = None,
                           keep_last_soups: Any = None) -> None:
    """Check the adapter arguments that are not search settings, the metric or the averaging.

    Raises:
        ValueError: naming the argument and what is allowed.
    """
    check_positive_int("max_batches", max_batches, allow_none=True)
    check_positive_int("every_n_saves", every_n_saves)
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
    check_bool("save_soups", save_soups)
    check_path("soup_dir", soup_dir)
    check_positive_int("keep_last_soups", keep_last_soups, allow_none=True,
                       none_means=" (keep all)")


def validate_averaging_args(*, history: Any, snapshot_every: Any, ema_decays: Any,
                            averaging: Any = "pairwise") -> tuple[float, ...]:
    """Check ``averaging``, ``history``, ``snapshot_every`` and ``ema_decays``; returns the decays.

    ``averaging="auto"`` brings its own families (post-hoc EMA, a decay-shaped window, the
    pairwise soup and a blend), so it cannot be combined with ``history > 2`` or ``ema_decays``;
    ``snapshot_every`` is its tracks' update interval there.

    Raises:
        ValueError: naming the argument and what is allowed.
    """
    if not isinstance(averaging, str) or averaging not in AVERAGING:
        raise ValueError(f"averaging must be one of {', '.join(map(repr, AVERAGING))}, "
                         f"got {averaging!r}")
    if isinstance(history, bool) or not isinstance(history, int) or history < 2:
        raise ValueError(f"history must be an integer >= 2 (weights kept, the latest included), "
                         f"got {history!r}")
    check_positive_int("snapshot_every", snapshot_every, allow_none=True)
    decays = check_decays("ema_decays", ema_decays)
    if averaging == "auto":
        if history != 2 or decays:
            given = ", ".join(x for x, on in ((f"history={history!r}", history != 2),
                                              (f"ema_decays={list(decays)!r}", bool(decays)))
                              if on)
            raise ValueError(f"averaging='auto' chooses its own averages and cannot be combined "
                             f"with {given}; use averaging='auto' alone (snapshot_every may be "
                             f"set), or averaging='pairwise' with history/ema_decays")
        return decays
    if decays and snapshot_every is None:
        raise ValueError("ema_decays need snapshot_every (the EMA tracks are updated every "
                         "snapshot_every steps)")
    return decays
