"""Loaders of the shipped Macbeth lm-eval tasks (their data lie next to this file)."""

import json
from pathlib import Path

HERE = Path(__file__).parent


def _read(name: str):
    import datasets

    text = (HERE / name).read_text(encoding="utf-8")
    return {"test": datasets.Dataset.from_list([json.loads(x) for x in text.splitlines() if x])}


def load_next_line(**kwargs):
    """``merge_callback_next_line``: ``{"test": Dataset}`` of context, choices, label."""
    return _read("next_line.jsonl")


def load_speeches(**kwargs):
    """``merge_callback_macbeth_ppl``: ``{"test": Dataset}`` of speeches (``text``)."""
    return _read("speeches.jsonl")
