"""Held-out evaluation of a module on language-model batches.

Batches are Hugging Face style: a dict with ``input_ids`` and optionally ``attention_mask`` and
``labels`` (``-100`` marks ignored positions), or a bare ``LongTensor`` of token ids. The module is
called as ``module(input_ids=..., attention_mask=...)`` (``attention_mask`` only when the batch
has one) and returns logits or an object with ``.logits``. Metrics return ``(total, count)`` so that
data-parallel ranks can add their totals before dividing.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BUILTIN_METRICS",
    "MetricFn",
    "Metric",
    "resolve_metric",
    "forward_logits",
    "next_token_targets",
    "loss_metric",
    "accuracy_metric",
    "move_to_device",
    "HeldoutEvaluator",
    "EmptyHeldoutError",
]

MetricFn = Callable[[nn.Module, Any], tuple[Union[float, Tensor], Union[float, Tensor]]]
BUILTIN_METRICS = ("loss", "perplexity", "accuracy")


class EmptyHeldoutError(ValueError):
    """The held-out data produced no batch or no target token."""


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def _input_ids(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return batch["input_ids"]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    keys = list(batch.keys()) if isinstance(batch, Mapping) else type(batch).__name__
    raise TypeError("held-out batches must be a dict with 'input_ids' (optional 'attention_mask', "
                    f"'labels'), or a LongTensor of token ids; got {keys}. "
                    "HINT: pass metric=callable(module, batch) -> (total, count) for other batches")


def forward_logits(module: nn.Module, batch: Any) -> Tensor:
    """Run ``module`` on a batch and return logits ``[batch, time, vocab]``."""
    input_ids = _input_ids(batch)
    kwargs = {"input_ids": input_ids}
    if isinstance(batch, Mapping) and batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]
    out = module(**kwargs)
    logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        logits = out[0]
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise TypeError("the module must return logits [batch, time, vocab] or an object with "
                        f".logits; got {type(out).__name__}")
    return logits


def next_token_targets(batch: Any) -> Tensor:
    """Targets aligned with ``logits[:, :-1]``: ``labels[:, 1:]`` (or ``input_ids``), -100 ignored."""
    input_ids = _input_ids(batch)
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    targets = (labels if labels is not None else input_ids).clone()
    if isinstance(batch, Mapping) and batch.get("attention_mask") is not None:
        targets = targets.masked_fill(batch["attention_mask"] == 0, -100)
    return targets[:, 1:]


def loss_metric(module: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy (nats) and the number of target tokens."""
    logits = forward_logits(module, batch)[:, :-1]
    targets = next_token_targets(batch)
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                            ignore_index=-100, reduction="sum")
    return total.double(), (targets != -100).sum().double()


def accuracy_metric(module: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    """Number of correct top-1 next-token predictions and the number of target tokens."""
    logits = forward_logits(module, batch)[:, :-1]
    targets = next_token_targets(batch)
    valid = targets != -100
    correct = (logits.argmax(-1) == targets) & valid
    return correct.sum().double(), valid.sum().double()


@dataclass(frozen=True)
class Metric:
    """A named metric: ``fn(module, batch) -> (total, count)``; ``value = finalize(Σtotal/Σcount)``."""

    name: str
    fn: MetricFn
    higher_is_better: bool
    finalize: Callable[[float], float] = lambda x: x

    def value(self, total: float, count: float) -> float:
        if count <= 0:
            raise EmptyHeldoutError(f"metric {self.name!r} counted no held-out targets "
                                    "(empty loader, or every label is -100 / masked)")
        return float(self.finalize(total / count))


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def resolve_metric(metric: str | MetricFn, higher_is_better: bool | None = None) -> Metric:
    """Turn ``"loss"``, ``"perplexity"``, ``"accuracy"`` or a callable into a :class:`Metric`.

    Raises:
        ValueError: unknown name, a direction that contradicts a built-in metric, or a callable
            without ``higher_is_better``.
    """
    if isinstance(metric, str):
        builtins = {
            "loss": Metric("loss", loss_metric, False),
            "perplexity": Metric("perplexity", loss_metric, False, _exp),
            "accuracy": Metric("accuracy", accuracy_metric, True),
        }
        if metric not in builtins:
            raise ValueError(f"metric must be one of {', '.join(map(repr, BUILTIN_METRICS))} or a "
                             f"callable(module, batch) -> (total, count), got {metric!r}")
        m = builtins[metric]
        if higher_is_better is not None and bool(higher_is_better) != m.higher_is_better:
            raise ValueError(f"higher_is_better={higher_is_better} contradicts metric {metric!r} "
                             f"(higher_is_better={m.higher_is_better}); leave it as None")
        return m
    if callable(metric):
        if higher_is_better is None:
            higher_is_better = getattr(metric, "higher_is_better", None)
        if higher_is_better is None:
            raise ValueError("a callable metric needs higher_is_better=True or False (as an "
                             "argument or as the callable's `higher_is_better` attribute)")
        name = getattr(metric, "__name__", type(metric).__name__)
        return Metric(name, metric, bool(higher_is_better))
    raise ValueError(f"metric must be one of {', '.join(map(repr, BUILTIN_METRICS))} or a "
                     f"callable(module, batch) -> (total, count), got {type(metric).__name__}")


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def preserved_rng(seed: int | None = None):
    """Save and restore the Python, NumPy and torch (CPU and CUDA) random states.

    With ``seed``, torch is seeded inside the block, so that iterating a shuffling loader gives the
    same order every time.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class HeldoutEvaluator:
    """Evaluate a metric over a held-out iterable, shared across data-parallel ranks.

    Args:
        data: an iterable of batches (a ``DataLoader``); re-iterated at every evaluation.
        metric: a :class:`Metric` (see :func:`resolve_metric`).
        max_batches: evaluate only the first ``max_batches`` batches (of the whole shard).
        rank, world_size: with ``world_size > 1`` and ``shard=True`` rank ``r`` evaluates batches
            ``r, r + world_size, ...``; the totals are summed with ``reduce_sum``.
        shard: set False when ``data`` is already split per rank (e.g. a ``DistributedSampler``).
        reduce_sum: sums a float64 tensor across ranks (identity on one process).
        context: a factory for a context entered around the forward passes (e.g. autocast).
        seed: torch seed used while iterating (the caller's RNG state is restored afterwards).

    Calling the evaluator returns the metric value; it runs in ``inference_mode`` and eval mode and
    restores every submodule's training flag and all global random states.
    """

    def __init__(self, data: Iterable, metric: Metric, *, max_batches: int | None = None,
                 rank: int = 0, world_size: int = 1, shard: bool = True,
                 reduce_sum: Callable[[Tensor], Tensor] | None = None,
                 context: Callable[[], contextlib.AbstractContextManager] | None = None,
                 seed: int = 0):
        self.data = data
        self.metric = metric
        self.max_batches = max_batches
        self.rank = rank
        self.world_size = world_size
        self.shard = shard and world_size > 1
        self.reduce_sum = reduce_sum
        self.context = context or contextlib.nullcontext
        self.seed = seed

    #: every rank runs the same number of forward passes (see ``fsdp.BalancedHeldoutEvaluator``)
    balanced = False

    def totals(self, module: nn.Module) -> tuple[float, float, int]:
        """Return ``(total, count, batches)`` summed over all ranks."""
        device = _module_device(module)
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        batches = seen = 0
        first = None
        with preserved_rng(self.seed), _eval_mode(module), torch.inference_mode(), self.context():
            for i, batch in enumerate(self.data):
                if self.max_batches is not None and i >= self.max_batches:
                    break
                seen += 1
                if first is None and self.balanced:
                    first = batch
                if self.shard and i % self.world_size != self.rank:
                    continue
                t, c = self.metric.fn(module, move_to_device(batch, device))
                total += torch.as_tensor(t, dtype=torch.float64, device=device)
                count += torch.as_tensor(c, dtype=torch.float64, device=device)
                batches += 1
            if self.balanced:
                target = math.ceil(seen / self.world_size) if self.shard else batches
                for _ in range(target - batches):  # padding forwards: results discarded
                    self.metric.fn(module, move_to_device(first, device))
        stats = torch.stack([total, count, torch.tensor(float(batches), dtype=torch.float64,
                                                        device=device)])
        if self.reduce_sum is not None:
            stats = self.reduce_sum(stats)
        total_f, count_f, batches_f = (float(x) for x in stats.cpu().tolist())
        if batches_f == 0:
            raise EmptyHeldoutError("the held-out data yielded no batches; pass a non-empty "
                                    "heldout loader (or check max_batches)")
        return total_f, count_f, int(batches_f)

    def __call__(self, module: nn.Module) -> float:
        total, count, _ = self.totals(module)
        return self.metric.value(total, count)
