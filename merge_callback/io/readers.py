"""One reader for every checkpoint format.

:class:`TensorReader` opens a checkpoint without loading it — a Hugging Face folder
(``model.safetensors``, a sharded safetensors index, ``pytorch_model.bin`` or its sharded index),
a ``.safetensors`` file, or a ``torch.save`` file (Lightning ``.ckpt``: its ``state_dict``;
``.pt``/``.pth``/``.bin``: a state dict, always with ``weights_only=True``): names, shapes and
dtypes come from the headers (or a memory map) and each tensor is read when asked for.
:func:`load_state_dict` reads all of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["CHECKPOINT_FORMATS", "SINGLE_NAME", "INDEX_NAME", "TensorSpec", "TensorReader",
           "checkpoint_format", "load_state_dict", "lightning_state_dict", "detect_key_prefix"]


CHECKPOINT_FORMATS = ("hf", "safetensors", "torch")
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def checkpoint_format(path: str | os.PathLike) -> str:
    """Return ``"hf"``, ``"safetensors"`` or ``"torch"`` for a checkpoint path.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the path is none of the supported formats.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        for name in (SINGLE_NAME, INDEX_NAME, "pytorch_model.bin", "pytorch_model.bin.index.json"):
            if (p / name).is_file():
                return "hf"
        raise ValueError(f"folder {p} is not a Hugging Face checkpoint: it holds none of "
                         f"{SINGLE_NAME}, {INDEX_NAME}, pytorch_model.bin, "
                         "pytorch_model.bin.index.json")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in _TORCH_SUFFIXES:
        return "torch"
    raise ValueError(f"unsupported checkpoint {p}: expected a Hugging Face folder, a .safetensors "
                     "file, a Lightning .ckpt or a .pt/.pth/.bin state dict")


class _SafetensorsFile:
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self.handle = safe_open(str(path), framework="pt", device="cpu")
        self.keys = list(self.handle.keys())

    def spec(self, key: str) -> TensorSpec:
        sl = self.handle.get_slice(key)
        name = sl.get_dtype()
        if name not in _ST_DTYPES:
            raise ValueError(f"tensor {key!r} in {self.path} has unsupported dtype {name}")
        return TensorSpec(tuple(int(s) for s in sl.get_shape()), _ST_DTYPES[name])

    def get(self, key: str) -> Tensor:
        return self.handle.get_tensor(key)

    def metadata(self) -> dict[str, str]:
        return dict(self.handle.metadata() or {})


class _TorchFile:
    def __init__(self, path: Path):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # legacy (non-zip) serialisation cannot be memory-mapped
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"],
                                                                          Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not obj:
            raise ValueError(f"{path} holds no state dict (expected a Lightning checkpoint with a "
                             "'state_dict' entry or a mapping of tensors)")
        bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
        if bad:
            raise ValueError(f"{path}: state dict entry {bad[0]!r} is not a tensor "
                             f"({type(obj[bad[0]]).__name__})")
        self.path = path
        self.tensors = dict(obj)
        self.keys = list(self.tensors)

    def spec(self, key: str) -> TensorSpec:
        t = self.tensors[key]
        return TensorSpec(tuple(t.shape), t.dtype)

    def get(self, key: str) -> Tensor:
        return self.tensors[key]

    def metadata(self) -> dict[str, str]:
        return {}


class TensorReader:
    """Lazy, read-only access to the tensors of one checkpoint.

    Args:
        path: a Hugging Face folder, a ``.safetensors`` file, or a ``torch.save`` file (Lightning
            ``.ckpt``: its ``state_dict``; ``.pt``/``.pth``/``.bin``: a state dict).

    Attributes:
        path: the checkpoint path.
        format: ``"hf"``, ``"safetensors"`` or ``"torch"``.
        keys: tensor names in file order.

    Raises:
        FileNotFoundError: the path or a shard named by an index is missing.
        ValueError: unsupported format or unreadable content.

    Example:
        >>> with TensorReader("run/checkpoint-200") as r:   # doctest: +SKIP
        ...     r.spec("embed_out.weight").shape
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.format = checkpoint_format(self.path)
        self._files: list[Any] = []
        self._where: dict[str, Any] = {}
        if self.format == "hf":
            self._open_hf()
        elif self.format == "safetensors":
            self._add(_SafetensorsFile(self.path))
        else:
            self._add(_TorchFile(self.path))
        self.keys = list(self._where)
        if not self.keys:
            raise ValueError(f"checkpoint {self.path} holds no tensors")

    def _add(self, f: Any, only: set[str] | None = None) -> None:
        self._files.append(f)
        for k in f.keys:
            if only is None or k in only:
                self._where[k] = f

    def _open_hf(self) -> None:
        for single, index, opener in ((SINGLE_NAME, INDEX_NAME, _SafetensorsFile),
                                      ("pytorch_model.bin", "pytorch_model.bin.index.json",
                                       _TorchFile)):
            if (self.path / single).is_file():
                self._add(opener(self.path / single))
                return
            if (self.path / index).is_file():
                try:
                    weight_map = json.loads((self.path / index).read_text())["weight_map"]
                except (ValueError, KeyError) as exc:
                    raise ValueError(f"{self.path / index} is not a valid index file "
                                     f"(needs a 'weight_map'): {exc}") from None
                files = {}
                for shard in dict.fromkeys(weight_map.values()):
                    shard_path = self.path / shard
                    if not shard_path.is_file():
                        raise FileNotFoundError(f"{self.path / index} names shard {shard}, "
                                                f"which is missing from {self.path}")
                    files[shard] = opener(shard_path)
                for f in files.values():
                    self._files.append(f)
                for key, shard in weight_map.items():
                    if key not in files[shard].keys:
                        raise ValueError(f"{self.path / index} maps {key!r} to {shard}, "
                                         "which does not hold it")
                    self._where[key] = files[shard]
                return

    def spec(self, key: str) -> TensorSpec:
        """Shape and dtype of ``key`` (read from the header; no data is loaded)."""
        return self._where[key].spec(key)

    def get(self, key: str) -> Tensor:
        """Read one tensor."""
        return self._where[key].get(key)

    def specs(self) -> dict[str, TensorSpec]:
        return {k: self.spec(k) for k in self.keys}

    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata of the first file (empty for torch files)."""
        return self._files[0].metadata() if self._files else {}

    @property
    def nbytes(self) -> int:
        return sum(self.spec(k).nbytes for k in self.keys)

    def close(self) -> None:
        self._files.clear()
        self._where.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorReader({str(self.path)!r}, format={self.format!r}, {len(self.keys)} tensors)"


def detect_key_prefix(keys, module_keys) -> str:
    """The prefix to remove from checkpoint tensor names to reach a module's names.

    A LightningModule saves its network's tensors as ``"<attribute>." + name`` (e.g. ``model.``).
    The prefix is the first name's first component plus ``"."`` when every checkpoint name starts
    with it and no module name does; otherwise ``""``.

    Args:
        keys: the checkpoint's tensor names.
        module_keys: the target module's ``state_dict()`` names.

    Example:
        >>> detect_key_prefix(["model.lm_head.weight", "model.embed.weight"], ["lm_head.weight"])
        'model.'
        >>> detect_key_prefix(["lm_head.weight"], ["lm_head.weight"])
        ''
    """
    keys = list(keys)
    first = keys[0] if keys else ""
    if "." not in first:
        return ""
    cand = first.split(".", 1)[0] + "."
    if all(k.startswith(cand) for k in keys) and not any(k.startswith(cand) for k in module_keys):
        return cand
    return ""


def lightning_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The model ``state_dict`` stored in a loaded Lightning checkpoint dict."""
    if "state_dict" not in checkpoint:
        raise ValueError("not a Lightning checkpoint: no 'state_dict' entry (keys: "
                         f"{', '.join(list(checkpoint)[:8])})")
    return dict(checkpoint["state_dict"])


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read every model tensor of a checkpoint in any supported format (see
    :class:`TensorReader`), in file order.

    Raises:
        FileNotFoundError: the path (or a shard an index names) does not exist.
        ValueError: the format is not a supported one, or the file holds no state dict.
    """
    with TensorReader(path) as reader:
        return {k: reader.get(k) for k in reader.keys}
