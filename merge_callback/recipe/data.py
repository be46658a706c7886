"""The recipe's data: documents from files, ``datasets`` or the built-in texts
(:func:`load_texts`), tokenised and packed into training, held-out and out-of-domain blocks
(:func:`prepare_data`), and the data loaders over those blocks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_callback.recipe.config import RecipeConfig, check_data_spec

__all__ = ["load_texts", "RecipeData", "prepare_data", "train_loader", "eval_loader"]


def load_texts(spec: str, max_chars: int | None = None, text_field: str = "text") -> list[str]:
    """Read documents from a data spec (see ``RecipeConfig.train_data``).

    Args:
        spec: a ``.txt``/``.jsonl`` file or folder, ``hf:NAME[:CONFIG][@SPLIT]``, or a built-in.
        max_chars: keep at most this many characters in total (the last document is cut).
        text_field: the text field of ``.jsonl`` records and datasets.

    Raises:
        ValueError: an unknown spec or an empty result; ImportError: ``hf:`` without ``datasets``.
    """
    from merge_callback import data

    if spec == "builtin:shakespeare-train":
        docs = [data.shakespeare_split()[0]]
    elif spec == "builtin:shakespeare-heldout":
        docs = [data.shakespeare_split()[1]]
    elif spec == "builtin:python-stdlib":
        docs = [data.stdlib_text(max_chars)]
    elif spec.startswith("hf:"):
        docs = _hf_dataset_texts(spec, max_chars, text_field)
    else:
        check_data_spec("data", spec)
        p = Path(spec).expanduser()
        docs = data.read_texts(p) if text_field == "text" else _read_local(p, text_field)
    docs = _cap_chars(docs, max_chars)
    if not any(d.strip() for d in docs):
        raise ValueError(f"{spec} holds no text")
    return docs


def _read_local(path: Path, text_field: str) -> list[str]:
    """Like ``data.read_texts`` with another field name for ``.jsonl`` records."""
    files = (sorted(f for f in path.iterdir() if f.suffix.lower() in (".txt", ".jsonl"))
             if path.is_dir() else [path])
    if not files or any(f.suffix.lower() not in (".txt", ".jsonl") for f in files):
        raise ValueError(f"{path}: expected a .txt/.jsonl file or a folder of them")
    docs: list[str] = []
    for f in files:
        if f.suffix.lower() == ".txt":
            docs.append(f.read_text(encoding="utf-8"))
            continue
        for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{f}:{lineno} has no string field {text_field!r} (set "
                                 "text_field)")
            docs.append(record[text_field])
    return docs


def _cap_chars(docs: Sequence[str], max_chars: int | None) -> list[str]:
    if max_chars is None:
        return list(docs)
    out, total = [], 0
    for d in docs:
        if total >= max_chars:
            break
        out.append(d[: max_chars - total])
        total += len(out[-1])
    return out


def _hf_dataset_texts(spec: str, max_chars: int | None, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{spec} needs the `datasets` package: pip install datasets") from e
    body, _, split = spec[3:].partition("@")
    name, _, config = body.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    docs, total = [], 0
    for record in ds:
        if text_field not in record:
            raise ValueError(f"{spec}: records have no field {text_field!r} (fields: "
                             f"{', '.join(record)}); set text_field")
        docs.append(record[text_field])
        total += len(docs[-1])
        if max_chars is not None and total >= max_chars:
            break
    return docs


@dataclass
class RecipeData:
    """Packed token blocks ``[n, block_size]`` for training, held-out (λ choice) and OOD."""

    train: torch.Tensor
    heldout: torch.Tensor
    ood: torch.Tensor | None

    def summary(self) -> dict[str, int]:
        out = {"train_blocks": int(self.train.shape[0]), "heldout_blocks":
               int(self.heldout.shape[0])}
        out["ood_blocks"] = int(self.ood.shape[0]) if self.ood is not None else 0
        out["block_size"] = int(self.train.shape[1])
        return out


def prepare_data(config: RecipeConfig, tokenizer: Any,
                 train_texts: Sequence[str] | None = None) -> RecipeData:
    """Tokenise, pack and split the configured texts (deterministic for a config and tokenizer).

    Args:
        config: the recipe config.
        tokenizer: a Hugging Face tokenizer with an eos token.
        train_texts: the training documents if already read.

    Raises:
        ValueError: too little text for one training batch or one held-out block.
    """
    from merge_callback.data import split_blocks, tokenize_and_pack

    if train_texts is None:
        train_texts = load_texts(config.train_data, config.max_train_chars, config.text_field)
    blocks = tokenize_and_pack(list(train_texts), tokenizer, config.block_size)
    if config.heldout_data is None:
        train, heldout = split_blocks(blocks, config.heldout_fraction, seed=config.split_seed)
    else:
        train = blocks
        held_texts = load_texts(config.heldout_data, config.max_heldout_chars, config.text_field)
        heldout = tokenize_and_pack(held_texts, tokenizer, config.block_size)
    ood = None
    if config.ood_data is not None:
        ood_texts = load_texts(config.ood_data, config.max_ood_chars, config.text_field)
        ood = tokenize_and_pack(ood_texts, tokenizer, config.block_size)
        if ood.shape[0] == 0:
            raise ValueError(f"ood_data gives no block of block_size={config.block_size} tokens")
    if train.shape[0] < config.batch_size:
        raise ValueError(f"train_data gives {train.shape[0]} blocks of {config.block_size} "
                         f"tokens, fewer than batch_size={config.batch_size}; add text or lower "
                         "block_size / batch_size")
    if heldout.shape[0] == 0:
        raise ValueError(f"the held-out text gives no block of block_size={config.block_size} "
                         "tokens; add held-out text or lower block_size")
    return RecipeData(train, heldout, ood)


def train_loader(blocks: torch.Tensor, config: RecipeConfig, seed: int):
    """Shuffled training batches of ``config.batch_size`` blocks (the last partial one dropped)."""
    from torch.utils.data import DataLoader

    from merge_callback.data import BlockDataset

    gen = torch.Generator().manual_seed(seed)
    return DataLoader(BlockDataset(blocks), batch_size=config.batch_size, shuffle=True,
                      drop_last=True, generator=gen, num_workers=config.num_workers,
                      persistent_workers=config.num_workers > 0)


def eval_loader(blocks: torch.Tensor, config: RecipeConfig):
    """Evaluation batches of ``config.eval_batch_size`` blocks, in order."""
    from torch.utils.data import DataLoader

    from merge_callback.data import BlockDataset

    return DataLoader(BlockDataset(blocks), batch_size=config.eval_batch_size, shuffle=False)
