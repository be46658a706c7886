"""Loader of the shipped ``merge_callback_next_line`` lm-eval task (data next to this file)."""

import json
from pathlib import Path

DATA = Path(__file__).with_name("macbeth_next_line.jsonl")


def load(**kwargs):
    """The task's splits: ``{"test": datasets.Dataset}`` read from the JSONL beside this file."""
    import datasets

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line]
    return {"test": datasets.Dataset.from_list(rows)}
