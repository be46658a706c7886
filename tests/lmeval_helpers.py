"""A tiny GPT-NeoX, its tokenizer and training data for the lm-eval tests (offline task text)."""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from merge_callback.data import BlockDataset, tiny_gpt_neox, tokenize_and_pack, train_tokenizer
from merge_callback.lmeval import TASKS_DIR

TASK_DATA = TASKS_DIR / "macbeth" / "next_line.jsonl"


def task_rows() -> list[dict]:
    return [json.loads(line) for line in TASK_DATA.read_text(encoding="utf-8").splitlines()]


def task_text() -> str:
    """The task's lines as one text (contexts and every choice), one block per example."""
    return "\n\n".join(r["context"] + "\n" + "\n".join(r["choices"]) for r in task_rows())


@lru_cache(maxsize=1)
def tokenizer():
    return train_tokenizer([task_text()], vocab_size=300)


def model(seed: int = 0):
    """GPT-NeoX, vocab 300, hidden 32, 2 layers, context 160 (the task's prompts fit)."""
    return tiny_gpt_neox(len(tokenizer()), seed=seed, hidden_size=32, num_layers=2, num_heads=4,
                         max_len=160)


def answer_text() -> str:
    """Each example's context followed by its right line: training on it moves the task's score."""
    return "\n\n".join(r["context"] + "\n" + r["choices"][r["label"]] for r in task_rows())


def blocks(n: int | None = None, offset: int = 0) -> torch.Tensor:
    """Blocks of 32 tokens of :func:`answer_text` (718 tokens per pass over the 128 examples)."""
    b = tokenize_and_pack(answer_text(), tokenizer(), 32)
    return b[offset:] if n is None else b[offset:offset + n]


def dataset(n: int, offset: int = 0) -> BlockDataset:
    return BlockDataset(blocks(n, offset))
