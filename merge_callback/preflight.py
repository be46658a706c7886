"""Checks run once, before any merge search, so that bad input fails early with one clear message.

Every function here is pure: it reads, never writes, and raises :class:`PreflightError` (a
``ValueError``) naming the thing that is wrong and what is allowed.

- :func:`check_heldout`: the held-out data can be iterated more than once, yields batches the
  evaluator understands (a ``LongTensor [batch, time]``, a dict with ``input_ids``, or a tuple whose
  first item is that tensor), with integer token ids inside the vocabulary and rows no longer
  than the model's positions, and is not empty.
- :func:`check_output_dir`: a soup folder can be created or written, and its file system has room
  for one soup.
- :func:`model_limits`: ``(vocab_size, max_positions)`` of a model, read from a Hugging Face
  config or from its embedding sizes.

Example:
    >>> vocab, positions = model_limits(model)                    # doctest: +SKIP
    >>> n = check_heldout(loader, vocab_size=vocab, max_positions=positions, max_batches=20)
    >>> check_output_dir("soups/", soup_nbytes, name="soup_dir")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PreflightError", "check_heldout", "check_output_dir", "model_limits",
           "format_bytes", "POSITION_KEYS"]

#: config fields that hold a model's maximum sequence length, in order of preference
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


class PreflightError(ValueError):
    """Input that would fail (or silently mislead) every merge round, found before the first."""


def format_bytes(n: int | float) -> str:
    """``1536 -> '1.5 KiB'``; exact bytes below 1 KiB."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


# --------------------------------------------------------------------------- held-out data

def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a dict with keys {sorted(map(str, batch))}"
    if isinstance(batch, Tensor):
        return f"a {batch.dtype} tensor of shape {tuple(batch.shape)}"
    return f"a {type(batch).__name__}"


_BATCH_FORMS = ("a LongTensor [batch, time] of token ids, a dict with 'input_ids' (optional "
                "'attention_mask', 'labels'), or a tuple/list whose first item is that tensor")


def _batch_ids(batch: Any, where: str) -> tuple[Tensor, Tensor | None, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None, None
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise PreflightError(f"{where} is {_describe(batch)} without 'input_ids'; each batch "
                                 f"must be {_BATCH_FORMS}")
        ids = batch["input_ids"]
        if not isinstance(ids, Tensor):
            raise PreflightError(f"{where}: 'input_ids' is a {type(ids).__name__}, not a tensor; "
                                 f"each batch must be {_BATCH_FORMS} (use a DataLoader, whose "
                                 "collate turns lists into tensors)")
        mask, labels = batch.get("attention_mask"), batch.get("labels")
        return ids, mask if isinstance(mask, Tensor) else None, \
            labels if isinstance(labels, Tensor) else None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0], None, None
    raise PreflightError(f"{where} is {_describe(batch)}; each batch must be {_BATCH_FORMS}")


def _check_batch(batch: Any, i: int, *, name: str, vocab_size: int | None,
                 max_positions: int | None, min_length: int) -> None:
    where = f"{name} batch {i}"
    ids, mask, labels = _batch_ids(batch, where)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise PreflightError(f"{where}: input_ids have dtype {ids.dtype}; token ids must be an "
                             "integer dtype (torch.long), e.g. tensor.long()")
    if ids.dim() != 2:
        raise PreflightError(f"{where}: input_ids have shape {tuple(ids.shape)}; expected "
                             "[batch, time] (2 dimensions)")
    rows, length = ids.shape
    if rows == 0:
        raise PreflightError(f"{where} has 0 rows")
    if length < min_length:
        raise PreflightError(f"{where} has rows of {length} token(s); next-token metrics need at "
                             f"least {min_length}")
    if max_positions is not None and length > max_positions:
        raise PreflightError(f"{where} has rows of {length} tokens, more than the model's "
                             f"maximum of {max_positions} positions; cut the held-out blocks to "
                             f"at most {max_positions} tokens")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0:
        raise PreflightError(f"{where} holds token id {lo}; token ids must be >= 0 (mark ignored "
                             "targets with -100 in 'labels', not in 'input_ids')")
    if vocab_size is not None and hi >= vocab_size:
        raise PreflightError(f"{where} holds token id {hi}, outside the model's vocabulary of "
                             f"{vocab_size} (ids 0..{vocab_size - 1}); was the data tokenised "
                             "with another tokenizer?")
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        raise PreflightError(f"{where}: attention_mask has shape {tuple(mask.shape)}, "
                             f"input_ids {tuple(ids.shape)}; they must match")
    if labels is not None:
        if tuple(labels.shape) != tuple(ids.shape):
            raise PreflightError(f"{where}: labels have shape {tuple(labels.shape)}, input_ids "
                                 f"{tuple(ids.shape)}; they must match")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise PreflightError(f"{where}: labels have dtype {labels.dtype}; expected integer "
                                 "token ids (-100 = ignored)")
        valid = labels[labels != -100]
        if valid.numel() and (int(valid.min()) < 0
                              or (vocab_size is not None and int(valid.max()) >= vocab_size)):
            bad = int(valid.min()) if int(valid.min()) < 0 else int(valid.max())
            top = vocab_size - 1 if vocab_size is not None else "vocab_size - 1"
            raise PreflightError(f"{where}: labels hold {bad}; allowed are -100 (ignored) and "
                                 f"0..{top}")


def _one_shot(data: Any) -> bool:
    try:
        return iter(data) is data
    except TypeError:
        return False


def check_heldout(data: Any, *, vocab_size: int | None = None, max_positions: int | None = None,
                  max_batches: int | None = None, name: str = "heldout",
                  min_length: int = 2) -> int:
    """Check held-out data before the first merge round.

    Reads at most ``max_batches`` batches (all when ``None``) once. A re-iterable that is not a
    plain sequence (``list``/``tuple``/``DataLoader``) is iterated a second time up to its first
    batch, to prove that it yields again.

    Args:
        data: the held-out iterable of batches (re-iterated at every round).
        vocab_size: token ids must be below this (``None``: unchecked).
        max_positions: rows may have at most this many tokens (``None``: unchecked).
        max_batches: the number of batches a round evaluates; only these are checked.
        name: how the data is called in messages (e.g. ``"heldout"``, ``"--heldout val.npy"``).
        min_length: fewest tokens per row (2: one next-token target).

    Returns:
        the number of batches checked (>= 1).

    Raises:
        PreflightError: ``data`` is ``None``, a string, a dict or tensor instead of an iterable of
            batches, a one-shot iterator/generator, empty, or a batch breaks the rules above.
    """
    if data is None:
        raise PreflightError(f"{name} is None; pass an iterable of batches (a DataLoader or a "
                             "list of batches)")
    if isinstance(data, (str, bytes, os.PathLike)):
        raise PreflightError(f"{name} is a {type(data).__name__} ({str(data)[:60]!r}); pass an "
                             "iterable of batches (a DataLoader or a list of batches), not a path")
    if isinstance(data, Mapping):
        raise PreflightError(f"{name} is {_describe(data)}: a single batch, not an iterable of "
                             "batches; wrap it in a list ([batch]) or use a DataLoader")
    if isinstance(data, Tensor):
        raise PreflightError(f"{name} is {_describe(data)}; pass an iterable of batches, e.g. "
                             "DataLoader(BlockDataset(tokens), batch_size=8) or [tokens]")
    if _one_shot(data):
        raise PreflightError(f"{name} is a one-shot {type(data).__name__} (iter(x) is x): it "
                             "would be empty from the second round on; pass a re-iterable such as "
                             "a list or a DataLoader")
    if not isinstance(data, Iterable) and not hasattr(data, "__getitem__"):
        raise PreflightError(f"{name} is a {type(data).__name__}, which is not iterable; pass a "
                             "DataLoader or a list of batches")
    if max_batches is not None and (isinstance(max_batches, bool) or int(max_batches) < 1):
        raise PreflightError(f"max_batches must be an integer >= 1 or None, got {max_batches!r}")
    checked = 0
    iterator: Iterator = iter(data)
    try:
        for batch in iterator:
            if max_batches is not None and checked >= max_batches:
                break
            _check_batch(batch, checked, name=name, vocab_size=vocab_size,
                         max_positions=max_positions, min_length=min_length)
            checked += 1
    finally:
        close = getattr(iterator, "close", None)
        if callable(close):
            close()
        del iterator
    if checked == 0:
        raise PreflightError(f"{name} yields no batches; pass non-empty held-out data")
    from torch.utils.data import DataLoader, IterableDataset

    plain = isinstance(data, (list, tuple)) or (
        isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset))
    if not plain:
        again = iter(data)
        try:
            next(again)
        except StopIteration:
            raise PreflightError(f"{name} ({type(data).__name__}) yields batches only once: a "
                                 "second iteration is empty; pass a re-iterable such as a list "
                                 "or a DataLoader") from None
        finally:
            close = getattr(again, "close", None)
            if callable(close):
                close()
    return checked


# --------------------------------------------------------------------------- output folder

def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p):
        if p.parent == p:
            break
        p = p.parent
    return p


def check_output_dir(path: str | os.PathLike, need_bytes: int | None = None, *,
                     name: str = "soup_dir") -> int:
    """Check that folder ``path`` can be created (or written) and has room for ``need_bytes``.

    Nothing is created: permissions come from ``os.access`` on the folder, or on its nearest
    existing ancestor when it does not exist yet; free space from ``shutil.disk_usage`` there.

    Args:
        path: the folder results will be written to.
        need_bytes: bytes one write needs (e.g. one soup); ``None`` or 0 skips the space check.
        name: how the folder is called in messages (e.g. ``"soup_dir"``, ``"--out"``).

    Returns:
        the free bytes on the folder's file system.

    Raises:
        PreflightError: ``path`` (or an ancestor) is a file, is not writable, or its file system
            has less free space than ``need_bytes``.
    """
    p = Path(path)
    target = p.absolute()
    existing = _nearest_existing(target)
    if existing != target:
        if not existing.is_dir():
            raise PreflightError(f"{name} {p} cannot be created: {existing} is a file, not a "
                                 "folder; choose a folder path")
        where = f"its parent {existing}"
    else:
        if not target.is_dir():
            raise PreflightError(f"{name} {p} exists and is not a folder; choose a folder path")
        where = str(p)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError(f"{name} {p} is not writable: no permission to create files in "
                             f"{where}; choose a folder you can write to")
    free = shutil.disk_usage(existing).free
    if need_bytes and need_bytes > free:
        raise PreflightError(f"{name} {p}: not enough free space for one soup: "
                             f"{format_bytes(need_bytes)} ({need_bytes} bytes) needed, "
                             f"{format_bytes(free)} ({free} bytes) free on the file system of "
                             f"{existing}")
    return free


# --------------------------------------------------------------------------- model limits

def _config_of(module: nn.Module) -> Any:
    cfg = getattr(module, "config", None)
    if cfg is not None and getattr(cfg, "vocab_size", None) is not None:
        return cfg
    for sub in module.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and getattr(cfg, "vocab_size", None) is not None:
            return cfg
    return None


def _int_field(cfg: Any, key: str) -> int | None:
    v = cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def model_limits(module: nn.Module) -> tuple[int | None, int | None]:
    """``(vocab_size, max_positions)`` of a model; ``None`` where it cannot be told.

    The vocabulary is the row count of the input embedding (``get_input_embeddings()``, else the
    first ``nn.Embedding``), else ``config.vocab_size``; the positions come from the config
    (:data:`POSITION_KEYS`, e.g. ``max_position_embeddings``), else from a learned position
    embedding (an ``nn.Embedding`` whose name contains ``pos`` or is ``wpe``). A Lightning module
    holding a Hugging Face model is searched through.

    Args:
        module: the model (or a module that contains it).

    Returns:
        ``(vocab_size, max_positions)``.
    """
    cfg = _config_of(module)
    vocab = None
    emb = None
    getter = getattr(module, "get_input_embeddings", None)
    if callable(getter):
        try:
            emb = getter()
        except (NotImplementedError, AttributeError):
            emb = None
    if not isinstance(emb, nn.Embedding):
        for sub in module.modules():
            get = getattr(sub, "get_input_embeddings", None)
            if sub is not module and callable(get):
                try:
                    emb = get()
                except (NotImplementedError, AttributeError):
                    emb = None
                if isinstance(emb, nn.Embedding):
                    break
    if not isinstance(emb, nn.Embedding):
        emb = next((m for n, m in module.named_modules() if isinstance(m, nn.Embedding)
                    and "pos" not in n.lower() and not n.endswith("wpe")), None)
    if isinstance(emb, nn.Embedding):
        vocab = int(emb.num_embeddings)
    elif cfg is not None:
        vocab = _int_field(cfg, "vocab_size")
    positions = None
    if cfg is not None:
        for key in POSITION_KEYS:
            positions = _int_field(cfg, key)
            if positions is not None:
                break
    if positions is None:
        pos = next((m for n, m in module.named_modules() if isinstance(m, nn.Embedding)
                    and ("pos" in n.lower() or n.endswith("wpe"))), None)
        if pos is not None:
            positions = int(pos.num_embeddings)
    return vocab, positions
