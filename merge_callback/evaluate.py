"""Held-out evaluation of a module on language-model batches.

Batches are Hugging Face style: a dict with ``input_ids`` and optionally ``attention_mask`` and
``labels`` (``-100`` marks ignored positions), or a bare ``LongTensor`` of token ids. The module is
called as ``module(input_ids=..., attention_mask=...)`` (``attention_mask`` only when the batch
has one) and returns logits or an object with ``.logits``. Metrics return ``(total, count)`` so that
data-parallel ranks can add their totals before dividing.

With the built-in ``"loss"``, ``"perplexity"`` and ``"accuracy"`` metrics every forward pass also
gives the other two: :attr:`HeldoutEvaluator.last_extras` holds the loss, perplexity and next-token
accuracy of the last evaluated module at no extra forward pass. A module metric (an object with
``scores_module = True`` and ``score_module(module, ...)``, such as
:class:`merge_callback.lmeval.LmEvalMetric`) scores the whole module itself instead of the batch
loop.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Union, runtime_checkable

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
    "lm_totals",
    "ModuleMetric",
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


def lm_totals(module: nn.Module, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    """One forward pass: summed next-token cross-entropy, correct top-1 predictions, target tokens.

    The first two equal :func:`loss_metric`'s and :func:`accuracy_metric`'s totals bitwise.
    """
    logits = forward_logits(module, batch)[:, :-1]
    targets = next_token_targets(batch)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    valid = targets != -100
    correct = (logits.argmax(-1) == targets) & valid
    return loss.double(), correct.sum().double(), valid.sum().double()


#: per-batch metric functions whose forward pass also gives loss and accuracy (see lm_totals)
_LM_FNS = {loss_metric: 0, accuracy_metric: 1}


@runtime_checkable
class ModuleMetric(Protocol):
    """A metric that scores a whole module itself (e.g. by running a benchmark on it).

    ``score_module`` returns ``(value, extras)`` and is the same on every rank: with
    ``world_size > 1`` each rank scores its share and sums totals with ``reduce_sum``; with
    ``balanced`` every rank must run the same forward passes.
    """

    scores_module: bool
    name: str
    higher_is_better: bool

    def score_module(self, module: nn.Module, *, rank: int = 0, world_size: int = 1,
                     balanced: bool = False,
                     reduce_sum: Callable[[Tensor], Tensor] | None = None
                     ) -> tuple[float, dict[str, float]]: ...


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


def resolve_metric(metric: str | MetricFn | Metric | ModuleMetric,
                   higher_is_better: bool | None = None) -> Metric | ModuleMetric:
    """Turn ``"loss"``, ``"perplexity"``, ``"accuracy"`` or a callable into a :class:`Metric`.

    A :class:`Metric` or a module metric (e.g. :class:`merge_callback.lmeval.LmEvalMetric`) is
    returned as it is.

    Raises:
        ValueError: unknown name, a direction that contradicts a built-in metric or a given
            metric object, or a callable without ``higher_is_better``.
    """
    if isinstance(metric, Metric) or getattr(metric, "scores_module", False):
        if higher_is_better is not None and bool(higher_is_better) != metric.higher_is_better:
            raise ValueError(f"higher_is_better={higher_is_better} contradicts metric "
                             f"{metric.name!r} (higher_is_better={metric.higher_is_better}); "
                             "leave it as None")
        return metric
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
        metric: a :class:`Metric` or a module metric (see :func:`resolve_metric`); a module
            metric scores the module itself and ``data`` is not read.
        max_batches: evaluate only the first ``max_batches`` batches (of the whole shard).
        rank, world_size: with ``world_size > 1`` and ``shard=True`` rank ``r`` evaluates batches
            ``r, r + world_size, ...``; the totals are summed with ``reduce_sum``.
        shard: set False when ``data`` is already split per rank (e.g. a ``DistributedSampler``).
        reduce_sum: sums a float64 tensor across ranks (identity on one process).
        context: a factory for a context entered around the forward passes (e.g. autocast).
        seed: torch seed used while iterating (the caller's RNG state is restored afterwards).

    Calling the evaluator returns the metric value and sets :attr:`last_extras`; it runs in
    ``inference_mode`` and eval mode and
    restores every submodule's training flag and all global random states.
    """

    def __init__(self, data: Iterable, metric: Metric | ModuleMetric, *,
                 max_batches: int | None = None,
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
        #: side values of the last evaluation: ``loss``, ``perplexity`` and ``accuracy`` (next
        #: token, from the same forward passes) with a built-in metric; a module metric's own
        #: values (e.g. one per lm-eval task); empty for other callables
        self.last_extras: dict[str, float] = {}

    #: every rank runs the same number of forward passes (see ``fsdp.BalancedHeldoutEvaluator``)
    balanced = False

    def totals(self, module: nn.Module) -> tuple[float, float, int]:
        """Return ``(total, count, batches)`` summed over all ranks (and set :attr:`last_extras`).

        Raises:
            TypeError: the metric scores whole modules (call the evaluator instead).
            EmptyHeldoutError: no rank evaluated a batch.
        """
        if getattr(self.metric, "scores_module", False):
            raise TypeError(f"{self.metric.name} scores the whole module; call the evaluator "
                            "(evaluator(module)) instead of totals()")
        device = _module_device(module)
        # total, count, batches, then (with a built-in LM metric) loss sum, correct, tokens
        lm_index = _LM_FNS.get(self.metric.fn)
        sums = torch.zeros(6 if lm_index is not None else 3, dtype=torch.float64, device=device)
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
                batch = move_to_device(batch, device)
                if lm_index is None:
                    t, c = self.metric.fn(module, batch)
                    sums[0] += torch.as_tensor(t, dtype=torch.float64, device=device)
                    sums[1] += torch.as_tensor(c, dtype=torch.float64, device=device)
                else:  # one forward gives the metric, the loss and the accuracy
                    loss, correct, tokens = lm_totals(module, batch)
                    sums[0] += loss if lm_index == 0 else correct
                    sums[1] += tokens
                    sums[3] += loss
                    sums[4] += correct
                    sums[5] += tokens
                batches += 1
            if self.balanced:
                target = math.ceil(seen / self.world_size) if self.shard else batches
                for _ in range(target - batches):  # padding forwards: results discarded
                    self.metric.fn(module, move_to_device(first, device))
        sums[2] = float(batches)
        if self.reduce_sum is not None:
            sums = self.reduce_sum(sums)
        values = [float(x) for x in sums.cpu().tolist()]
        total_f, count_f, batches_f = values[:3]
        if batches_f == 0:
            raise EmptyHeldoutError("the held-out data yielded no batches; pass a non-empty "
                                    "heldout loader (or check max_batches)")
        self.last_extras = {}
        if lm_index is not None and values[5] > 0:
            loss = values[3] / values[5]
            self.last_extras = {"loss": loss, "perplexity": _exp(loss),
                                "accuracy": values[4] / values[5]}
        return total_f, count_f, int(batches_f)

    def __call__(self, module: nn.Module) -> float:
        """The metric of ``module`` on the held-out data (the same on every rank)."""
        if getattr(self.metric, "scores_module", False):
            with preserved_rng(self.seed), _eval_mode(module), torch.inference_mode(), \
                    self.context():
                value, extras = self.metric.score_module(
                    module, rank=self.rank, world_size=self.world_size, balanced=self.balanced,
                    reduce_sum=self.reduce_sum)
            self.last_extras = dict(extras)
            return float(value)
        total, count, _ = self.totals(module)
        return self.metric.value(total, count)
