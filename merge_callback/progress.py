"""A progress bar for one merge round: evaluations done out of the budget, and the best value.

:class:`RoundProgress` draws with ``tqdm`` by default, or as a task of a running ``rich``
``Progress`` display; the Lightning adapter picks the one that fits the trainer's own bar.

Example::

    progress = RoundProgress()
    progress.start(total=10, desc="merge step=500", metric="loss", lam_range=(0.5, 1.0))
    run_round(..., on_evaluation=progress)      # progress(lam, value) after each evaluation
    progress.close()
"""

from __future__ import annotations

import math
import sys
from typing import IO, Any

__all__ = ["RoundProgress"]


class RoundProgress:
    """Evaluations done / total, the λ and value just evaluated, and the best value so far.

    Args:
        disable: draw nothing (every method is then a no-op).
        file: stream for the ``tqdm`` bar (default ``sys.stderr``).
        position: ``tqdm`` line offset; ``None`` takes the first line no other bar uses.
        leave: keep the finished bar on screen (default: cleared at :meth:`close`).
        rich_progress: a running ``rich.progress.Progress`` to add the round as a task to, instead
            of a ``tqdm`` bar.

    Calling the object, ``progress(lam, value)``, is :meth:`update` with the best value tracked
    internally, so it can be passed as ``run_round(on_evaluation=...)``.
    """

    def __init__(self, *, disable: bool = False, file: IO[str] | None = None,
                 position: int | None = None, leave: bool = False, rich_progress: Any = None):
        self.disable = bool(disable)
        self.file = file
        self.position = position
        self.leave = leave
        self.rich_progress = rich_progress
        self._bar: Any = None
        self._task: Any = None
        self._desc = ""
        self._metric = "value"
        self._higher = False
        self._best: float | None = None
        self._range: tuple[float, float] | None = None
        self.done = 0
        self.total = 0

    @property
    def best(self) -> float | None:
        """Best value reported so far in the current round."""
        return self._best

    def start(self, total: int, desc: str = "merge round", *, metric: str = "value",
              higher_is_better: bool = False,
              lam_range: tuple[float, float] | None = None) -> None:
        """Open the bar for a round of ``total`` evaluations.

        Args:
            total: evaluations expected (the bar may close earlier, e.g. when a search stops).
            desc: text in front of the bar.
            metric, higher_is_better: name and direction of the reported values.
            lam_range: only λ in ``[lo, hi]`` count towards the best value (e.g. ``(alpha, 1)``,
                so that the previous checkpoint's own score at λ = 0 is not shown as the best).

        Raises:
            ValueError: ``total`` is not a positive integer.
        """
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"total must be a positive integer, got {total!r}")
        self.close()
        self.done, self.total = 0, total
        self._desc, self._metric, self._higher = desc, metric, bool(higher_is_better)
        self._range = lam_range
        self._best = None
        if self.disable:
            return
        if self.rich_progress is not None:
            self._task = self.rich_progress.add_task(desc, total=total)
            return
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, file=self.file or sys.stderr,
                         position=self.position, leave=self.leave, dynamic_ncols=True,
                         mininterval=0, miniters=1, unit="eval")

    def update(self, lam: float, value: float, best: float | None = None) -> None:
        """Count one evaluation of ``λ = lam`` with metric ``value``.

        Args:
            best: the best value so far; ``None`` keeps the best of the values reported (lower is
                better unless ``start(higher_is_better=True)``).
        """
        if best is None:
            counts = self._range is None or self._range[0] <= lam <= self._range[1]
            best = value if counts and (self._best is None
                                        or _better(value, self._best, self._higher)) \
                else self._best
        self._best = best
        self.done += 1
        if self.disable:
            return
        shown = "-" if best is None else f"{best:.5g}"
        text = f"λ={lam:.4f} {self._metric}={value:.5g} best={shown}"
        if self._task is not None:
            self.rich_progress.update(self._task, completed=self.done,
                                      description=f"{self._desc} {text}")
        elif self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(1)

    def __call__(self, lam: float, value: float) -> None:
        self.update(lam, value)

    def close(self) -> None:
        """Finish the round's bar (cleared unless ``leave=True``); safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._task is not None:
            self.rich_progress.remove_task(self._task)
            self._task = None

    def __enter__(self) -> RoundProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _better(a: float, b: float, higher: bool) -> bool:
    if math.isnan(b):
        return not math.isnan(a)
    return a > b if higher else a < b
