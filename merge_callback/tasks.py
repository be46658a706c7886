"""Multiple-choice accuracy from a local JSONL task (PIQA / ARC style).

Each line of the task file is ``{"context": str, "choices": [str, ...], "label": int}``. Every
choice is scored by the summed log-likelihood of its tokens given the context,
``Σ_t log p(choice_t | context, choice_<t)``; the prediction is the highest-scoring choice and the
metric is the fraction of questions answered correctly (higher is better).

Tokenisation: the context and the choice are encoded separately without special tokens and
concatenated; trailing whitespace of the context is moved to the front of the choice (so
``"Answer: "`` + ``"yes"`` is scored as ``"Answer:"`` + ``" yes"``), and an empty context is
replaced by the tokenizer's bos (or eos) token. When a question is longer than ``max_length`` its
context is cut from the left.

Use it with a callback or :class:`merge_callback.evaluate.HeldoutEvaluator`::

    loader = multiple_choice_loader("piqa_dev.jsonl", tokenizer, batch_size=8)
    BayesMergeCallback(heldout=loader, metric=multiple_choice_metric, higher_is_better=True)
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from merge_callback.data import iter_jsonl
from merge_callback.evaluate import Metric, forward_logits

__all__ = [
    "MultipleChoiceExample",
    "read_multiple_choice",
    "is_multiple_choice_file",
    "encode_multiple_choice",
    "MultipleChoiceDataset",
    "collate_multiple_choice",
    "multiple_choice_loader",
    "choice_scores",
    "multiple_choice_metric",
    "MULTIPLE_CHOICE",
]

_FIELDS = '{"context": str, "choices": [str, ...], "label": int}'


@dataclass(frozen=True)
class MultipleChoiceExample:
    """One question: a context, two or more choices, and the index of the correct choice."""

    context: str
    choices: tuple[str, ...]
    label: int


def _parse_example(record: Any, where: str) -> MultipleChoiceExample:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected an object {_FIELDS}, got {type(record).__name__}")
    missing = [k for k in ("context", "choices", "label") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}; each line must be "
                         f"{_FIELDS}")
    context, choices, label = record["context"], record["choices"], record["label"]
    if not isinstance(context, str):
        raise ValueError(f"{where}: 'context' must be a string, got {type(context).__name__}")
    if (not isinstance(choices, (list, tuple)) or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)):
        raise ValueError(f"{where}: 'choices' must be a list of at least 2 non-empty strings, "
                         f"got {choices!r}")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ValueError(f"{where}: 'label' must be an integer index into choices "
                         f"(0..{len(choices) - 1}), got {label!r}")
    return MultipleChoiceExample(context, tuple(choices), label)


def read_multiple_choice(path: str | os.PathLike) -> list[MultipleChoiceExample]:
    """Read a multiple-choice JSONL task (blank lines are skipped).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line that is not valid JSON or not ``{"context", "choices", "label"}``
            (naming the file and line), or a file without questions.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"multiple-choice task not found: {p}")
    examples = [_parse_example(record, where) for where, record in iter_jsonl(p)]
    if not examples:
        raise ValueError(f"{p} holds no questions; each line must be {_FIELDS}")
    return examples


def is_multiple_choice_file(path: str | os.PathLike) -> bool:
    """True for a ``.jsonl`` file whose first record has ``context``, ``choices`` and ``label``."""
    p = Path(path)
    if p.suffix.lower() != ".jsonl" or not p.is_file():
        return False
    with p.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, Mapping) and all(
                    k in record for k in ("context", "choices", "label"))
    return False


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_multiple_choice(example: MultipleChoiceExample, tokenizer: Any,
                           max_length: int | None = None) -> dict[str, Any]:
    """Token ids of each ``context + choice`` and where the choice starts.

    Returns:
        ``{"input_ids": [[int, ...] per choice], "n_context": [int per choice], "label": int}``.

    Raises:
        ValueError: a choice alone does not fit in ``max_length`` tokens, or the tokenizer has no
            bos/eos token for an empty context.
    """
    context = example.context
    stripped = context.rstrip()
    moved = context[len(stripped):]
    ctx = _encode(tokenizer, stripped) if stripped else []
    if not ctx:
        start = getattr(tokenizer, "bos_token_id", None)
        if start is None:
            start = getattr(tokenizer, "eos_token_id", None)
        if start is None:
            raise ValueError("an empty context needs a tokenizer with a bos or eos token")
        ctx = [int(start)]
    rows, n_context = [], []
    for choice in example.choices:
        cont = _encode(tokenizer, moved + choice)
        if not cont:
            raise ValueError(f"choice {choice!r} encodes to no tokens")
        c = ctx
        if max_length is not None and len(c) + len(cont) > max_length:
            keep = max_length - len(cont)
            if keep < 1:
                raise ValueError(f"choice {choice[:40]!r} has {len(cont)} tokens, which leaves "
                                 f"no room for context in max_length={max_length}")
            c = c[-keep:]
        rows.append(c + cont)
        n_context.append(len(c))
    return {"input_ids": rows, "n_context": n_context, "label": example.label}


class MultipleChoiceDataset(Dataset):
    """Encoded questions; batch them with :func:`collate_multiple_choice`.

    Args:
        examples: a JSONL path or a sequence of :class:`MultipleChoiceExample`.
        tokenizer: a Hugging Face tokenizer.
        max_length: tokens per ``context + choice`` (context cut from the left), or None.

    Raises:
        FileNotFoundError, ValueError: see :func:`read_multiple_choice`.
    """

    def __init__(self, examples: str | os.PathLike | Sequence[MultipleChoiceExample],
                 tokenizer: Any, max_length: int | None = None):
        if isinstance(examples, (str, os.PathLike)):
            examples = read_multiple_choice(examples)
        if max_length is not None and (isinstance(max_length, bool)
                                       or not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length must be None or an integer >= 2, got {max_length!r}")
        self.examples = list(examples)
        if not self.examples:
            raise ValueError("a multiple-choice task needs at least one question")
        self.items = [encode_multiple_choice(e, tokenizer, max_length) for e in self.examples]
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def collate_multiple_choice(items: Sequence[Mapping[str, Any]], pad_id: int = 0) -> dict[str, Tensor]:
    """Flatten the choices of several questions into one right-padded batch.

    Returns:
        ``input_ids`` and ``attention_mask`` ``[rows, T]``; ``continuation_mask`` ``[rows, T]``
        (True on the choice's tokens); ``question`` and ``choice`` ``[rows]`` (which question of the
        batch and which of its choices a row is); ``label`` ``[questions]``.
    """
    rows = [(q, c, ids, n) for q, item in enumerate(items)
            for c, (ids, n) in enumerate(zip(item["input_ids"], item["n_context"]))]
    width = max(len(ids) for _, _, ids, _ in rows)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    cont = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (_, _, ids, n) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[r, :len(ids)] = 1
        cont[r, n:len(ids)] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "continuation_mask": cont,
        "question": torch.tensor([q for q, _, _, _ in rows], dtype=torch.long),
        "choice": torch.tensor([c for _, c, _, _ in rows], dtype=torch.long),
        "label": torch.tensor([int(item["label"]) for item in items], dtype=torch.long),
    }


def multiple_choice_loader(examples: str | os.PathLike | Sequence[MultipleChoiceExample],
                           tokenizer: Any, *, batch_size: int = 8,
                           max_length: int | None = None) -> DataLoader:
    """A ``DataLoader`` of multiple-choice batches (``batch_size`` questions each, in order).

    Raises:
        ValueError: invalid ``batch_size`` or task content.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    ds = MultipleChoiceDataset(examples, tokenizer, max_length)
    return DataLoader(ds, batch_size=batch_size, shuffle=False,
                      collate_fn=functools.partial(collate_multiple_choice, pad_id=ds.pad_id))


def choice_scores(module: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Summed log-likelihood of each row's choice tokens given its context, ``[rows]`` (float64)."""
    for key in ("input_ids", "attention_mask", "continuation_mask"):
        if key not in batch:
            raise TypeError(f"a multiple-choice batch needs {key!r}; build it with "
                            "collate_multiple_choice / multiple_choice_loader")
    logits = forward_logits(module, {"input_ids": batch["input_ids"],
                                     "attention_mask": batch["attention_mask"]})
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = batch["input_ids"][:, 1:]
    token_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()
    mask = batch["continuation_mask"][:, 1:]
    return torch.where(mask, token_lp, torch.zeros_like(token_lp)).sum(-1)


def multiple_choice_metric(module: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(correct, questions)`` for a batch from :func:`multiple_choice_loader`.

    A question counts as correct when its labelled choice has the highest summed log-likelihood
    (ties go to the first choice). Higher is better (``multiple_choice_metric.higher_is_better``).
    """
    scores = choice_scores(module, batch)
    question, choice, label = batch["question"], batch["choice"], batch["label"]
    n_q = label.shape[0]
    n_c = int(choice.max().item()) + 1
    table = torch.full((n_q, n_c), float("-inf"), dtype=scores.dtype, device=scores.device)
    table[question, choice] = scores
    correct = (table.argmax(-1) == label).sum()
    return correct.double(), torch.tensor(float(n_q), dtype=torch.float64, device=scores.device)


multiple_choice_metric.higher_is_better = True  # type: ignore[attr-defined]

MULTIPLE_CHOICE = Metric("multiple_choice_accuracy", multiple_choice_metric, True)
"""The metric as a :class:`merge_callback.evaluate.Metric` (for ``HeldoutEvaluator``)."""
