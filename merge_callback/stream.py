"""Streaming merges of checkpoints on disk, one tensor at a time.

Checkpoints are opened with :class:`merge_callback.io.TensorReader` (no tensor is loaded until
asked for). :func:`iter_merged` yields ``Σ_i w_i·θ_i`` key by key with
float32 accumulation, so at any time it holds the tensor being accumulated plus one input tensor;
:func:`write_merged` writes the result as one ``model.safetensors`` or as Hugging Face style shards
(``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``);
:class:`ModuleBinding` streams merged tensors straight into a live module's parameters for
evaluation.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from merge_callback.io import (CHECKPOINT_FORMATS, INDEX_NAME, SINGLE_NAME, TensorReader,
                               TensorSpec, atomic_write_json, checkpoint_format,
                               save_safetensors_atomic)

__all__ = [
    "CHECKPOINT_FORMATS",
    "TensorSpec",
    "TensorReader",
    "checkpoint_format",
    "check_readers_compatible",
    "validate_weights",
    "iter_merged",
    "parse_size",
    "plan_shards",
    "write_merged",
    "ModuleBinding",
    "INDEX_NAME",
    "SINGLE_NAME",
]

def check_readers_compatible(readers: Sequence[TensorReader],
                             names: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` naming the first tensor whose name, shape or dtype differs.

    Only headers are read. ``names`` label the checkpoints in the message (default: their paths).
    """
    if len(readers) < 1:
        raise ValueError("need at least one checkpoint")
    names = list(names) if names is not None else [str(r.path) for r in readers]
    ref, ref_name = readers[0], names[0]
    ref_keys = set(ref.keys)
    for r, name in zip(readers[1:], names[1:]):
        keys = set(r.keys)
        missing = sorted(ref_keys - keys)
        extra = sorted(keys - ref_keys)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} tensor(s) of {ref_name} are missing "
                             f"(e.g. {missing[0]!r})")
            if extra:
                parts.append(f"{len(extra)} tensor(s) are not in {ref_name} (e.g. {extra[0]!r})")
            raise ValueError(f"checkpoints have different architectures: {name}: "
                             + "; ".join(parts))
        for key in ref.keys:
            a, b = ref.spec(key), r.spec(key)
            if a.shape != b.shape:
                raise ValueError(f"checkpoints have different architectures: tensor {key!r} has "
                                 f"shape {a.shape} in {ref_name} but {b.shape} in {name}")
            if a.dtype != b.dtype:
                raise ValueError(f"tensor {key!r} has dtype {a.dtype} in {ref_name} but "
                                 f"{b.dtype} in {name}; convert the checkpoints to one dtype "
                                 "first")


def validate_weights(weights: Sequence[float], n: int, name: str = "weights") -> tuple[float, ...]:
    """Check merge weights: ``n`` finite numbers ≥ 0 summing to 1 (tolerance 1e-6).

    Raises:
        ValueError: naming ``name`` and what is allowed.
    """
    try:
        ws = tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, got {weights!r}") from None
    if len(ws) != n:
        raise ValueError(f"{name} needs one weight per checkpoint: got {len(ws)} for {n} "
                         "checkpoints")
    if any(not (w >= 0.0) or w == float("inf") for w in ws):
        raise ValueError(f"{name} must be finite and >= 0, got {list(ws)}")
    if abs(sum(ws) - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1, got sum {sum(ws):.8g} for {list(ws)}")
    return ws


def _accumulate_dtype(dtype: torch.dtype, accumulate: torch.dtype) -> torch.dtype:
    return dtype if torch.finfo(dtype).bits > torch.finfo(accumulate).bits else accumulate


def merge_tensor(readers: Sequence[TensorReader], weights: Sequence[float], key: str,
                 accumulate_dtype: torch.dtype = torch.float32) -> Tensor:
    """``Σ_i w_i·readers[i][key]`` for one tensor, reading one input tensor at a time.

    Floating tensors are accumulated in ``accumulate_dtype`` (or their own dtype if wider) and cast
    back to the stored dtype, bitwise like :func:`merge_callback.merge.weighted_average`; other
    tensors come from the last reader.
    """
    spec = readers[-1].spec(key)
    if not spec.dtype.is_floating_point:
        return readers[-1].get(key).clone()
    acc = torch.zeros(spec.shape, dtype=_accumulate_dtype(spec.dtype, accumulate_dtype))
    for reader, w in zip(readers, weights):
        if w != 0.0:
            t = reader.get(key)
            acc.add_(t.to(acc.dtype), alpha=float(w))
            del t
    return acc.to(spec.dtype)


def iter_merged(readers: Sequence[TensorReader], weights: Sequence[float], *,
                keys: Sequence[str] | None = None,
                accumulate_dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(key, Σ_i w_i·θ_i[key])`` one tensor at a time (keys in the last reader's order).

    Args:
        readers: checkpoints with the same tensors (see :func:`check_readers_compatible`).
        weights: one weight per reader, ≥ 0, summing to 1.
        keys: a subset / order of keys (default: all, in the last reader's order).
        accumulate_dtype: accumulation dtype for floating tensors (float32).

    Raises:
        ValueError: invalid weights.
    """
    ws = validate_weights(weights, len(readers))
    for key in (keys if keys is not None else readers[-1].keys):
        yield key, merge_tensor(readers, ws, key, accumulate_dtype)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20,
          "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"``.

    Raises:
        ValueError: not a positive size.
    """
    if isinstance(size, bool):
        raise ValueError(f"size must be bytes (int) or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = _SIZE_RE.match(str(size))
        if not m:
            raise ValueError(f"size must be bytes or a string like '5GB', '500MB', '2GiB'; "
                             f"got {size!r}")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if n <= 0:
        raise ValueError(f"size must be > 0 bytes, got {size!r}")
    return n


def plan_shards(specs: Mapping[str, TensorSpec], max_shard_size: int | str) -> list[list[str]]:
    """Split keys (in order) into shards of at most ``max_shard_size`` bytes each.

    A tensor larger than the limit gets a shard of its own.
    """
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for key, spec in specs.items():
        if shards[-1] and size + spec.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += spec.nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    """Hugging Face shard file name: ``model-00001-of-00003.safetensors``."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_merged(readers: Sequence[TensorReader], weights: Sequence[float],
                 out_dir: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                 metadata: Mapping[str, Any] | None = None,
                 accumulate_dtype: torch.dtype = torch.float32) -> list[str]:
    """Write ``Σ_i w_i·θ_i`` into ``out_dir`` as safetensors, streaming tensor by tensor.

    Writes ``model.safetensors`` when the soup fits in ``max_shard_size``, otherwise
    ``model-0000k-of-0000n.safetensors`` shards and ``model.safetensors.index.json``
    (``{"metadata": {"total_size": ...}, "weight_map": {...}}``). At most one shard of merged
    tensors plus one input tensor is held in memory. Each file is written atomically; use
    :class:`merge_callback.io.atomic_directory` to publish the folder as a whole.

    Args:
        readers: compatible checkpoints (see :func:`check_readers_compatible`).
        weights: one weight per reader on the simplex.
        out_dir: destination folder (created if missing).
        max_shard_size: bytes per shard (int or ``"5GB"``-style string).
        metadata: stored in every file's safetensors header (with ``format: pt``).
        accumulate_dtype: accumulation dtype for floating tensors.

    Returns:
        The file names written, index last.

    Raises:
        ValueError: invalid weights or shard size.
    """
    ws = validate_weights(weights, len(readers))
    ref = readers[-1]
    specs = {k: ref.spec(k) for k in ref.keys}
    shards = plan_shards(specs, max_shard_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    names = [SINGLE_NAME] if len(shards) == 1 else [shard_name(i, len(shards))
                                                   for i in range(len(shards))]
    for name, keys in zip(names, shards):
        tensors = dict(iter_merged(readers, ws, keys=keys, accumulate_dtype=accumulate_dtype))
        save_safetensors_atomic(out / name, tensors, meta)
        del tensors
    if len(shards) > 1:
        weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
        atomic_write_json(out / INDEX_NAME, {
            "metadata": {"total_size": sum(s.nbytes for s in specs.values())},
            "weight_map": weight_map,
        })
        names.append(INDEX_NAME)
    return names


# --------------------------------------------------------------------------- live modules


def _tensor_digest(t: Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(str((tuple(t.shape), t.dtype)).encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _ignored(key: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, key) for p in patterns)


class ModuleBinding:
    """Which checkpoint tensor goes into which tensor of a live module.

    Built once with :meth:`build`; then :meth:`load` streams a merge of the checkpoints into the
    module's parameters (``copy_`` under ``no_grad``), one tensor at a time, so evaluating a
    candidate costs no memory beyond the module and one input tensor.

    Two ways to match a file's tensor names to the module's:

    * by name, after removing ``prefix`` (Lightning ``.ckpt`` keys are ``model.`` + the wrapped
      module's ``state_dict()`` keys);
    * by content, when the module was loaded from the first checkpoint (``loaded_from=0``), e.g.
      by ``from_pretrained``: a file tensor is bound to the one module tensor holding exactly the
      same values. This follows whatever renaming the loader applied (GPT-NeoX's ``embed_out`` in
      the file is ``lm_head`` in the module) without relying on the loader's internals.

    Attributes:
        pairs: ``((file_key, module_key), ...)`` in file order.
        skipped: file keys not loaded into the module (ignored by the model's loader, or
            non-floating buffers the module does not have).
    """

    def __init__(self, module: nn.Module, pairs: Sequence[tuple[str, str]],
                 skipped: Sequence[str] = ()):
        self.module = module
        self.pairs = tuple(pairs)
        self.skipped = tuple(skipped)
        live = module.state_dict(keep_vars=True)
        self._targets = [(fk, live[mk]) for fk, mk in self.pairs]

    @classmethod
    def build(cls, module: nn.Module, reader: TensorReader, *, prefix: str = "",
              by_content: bool = False, ignore: Sequence[str] = ()) -> ModuleBinding:
        """Bind ``reader``'s tensors to ``module``'s.

        Args:
            module: the evaluation module.
            reader: a checkpoint in the file key space (any input; all share keys).
            prefix: removed from file keys before matching by name.
            by_content: the module holds exactly ``reader``'s values (loaded from it); names that
                don't match are resolved by content and name matches are verified by content.
            ignore: regular expressions of file keys the module's loader ignores (e.g.
                ``_keys_to_ignore_on_load_unexpected`` of a transformers model).

        Raises:
            ValueError: a file tensor that cannot be bound (naming it), a module parameter that no
                file tensor fills, or shapes that disagree.
        """
        live = module.state_dict(keep_vars=True)
        live_keys = list(live)
        param_ids = {id(p) for p in module.parameters()}
        pairs: list[tuple[str, str]] = []
        skipped: list[str] = []
        unbound: list[str] = []
        used: set[str] = set()

        def same(fk: str, mk: str) -> bool:
            t = live[mk]
            v = reader.get(fk)
            return tuple(v.shape) == tuple(t.shape) and torch.equal(v.to(t.dtype), t.detach())

        for fk in reader.keys:
            spec = reader.spec(fk)
            name = fk[len(prefix):] if prefix and fk.startswith(prefix) else fk
            mk = name if name in live else None
            if mk is not None and tuple(live[mk].shape) != spec.shape:
                raise ValueError(f"checkpoint tensor {fk!r} has shape {spec.shape} but the model's "
                                 f"{mk!r} has {tuple(live[mk].shape)}: the model does not match "
                                 "the checkpoints' architecture")
            if mk is not None and (not by_content or same(fk, mk)):
                pairs.append((fk, mk))
                used.add(mk)
            elif _ignored(fk, ignore) or not spec.dtype.is_floating_point:
                skipped.append(fk)
            else:
                unbound.append(fk)

        if unbound and by_content:
            # digests of the module tensors not bound by name, one per storage
            index: dict[tuple, dict[str, list[str]]] = {}
            seen_storage: set[tuple] = set()
            for mk in live_keys:
                t = live[mk]
                ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
                if mk in used or ident in seen_storage:
                    continue
                seen_storage.add(ident)
                index.setdefault((tuple(t.shape), t.dtype), {}).setdefault(
                    _tensor_digest(t), []).append(mk)
            still: list[str] = []
            for fk in unbound:
                v = reader.get(fk)
                candidates = []
                for (shape, dtype), digests in index.items():
                    if shape == tuple(v.shape):
                        candidates += [mk for mk in digests.get(_tensor_digest(v.to(dtype)), [])
                                       if mk not in used]
                if len(candidates) == 1:
                    pairs.append((fk, candidates[0]))
                    used.add(candidates[0])
                else:
                    still.append(fk)
            unbound = still
        if unbound:
            how = ("its name (after removing prefix " + repr(prefix) + ")" if prefix
                   else "its name") + (" or its values" if by_content else "")
            raise ValueError(f"{len(unbound)} checkpoint tensor(s) match no tensor of the "
                             f"evaluation model by {how}, e.g. {unbound[0]!r}. The model does not "
                             "match the checkpoints (check --model / --key_prefix), or its loader "
                             "transforms weights (fused or split tensors), which is not supported "
                             "for evaluation")
        filled = {id(live[mk]) for _, mk in pairs}
        filled_storage = {live[mk].untyped_storage().data_ptr() for _, mk in pairs}
        missing = [mk for mk in live_keys if id(live[mk]) in param_ids
                   and id(live[mk]) not in filled
                   and live[mk].untyped_storage().data_ptr() not in filled_storage]
        if missing:
            raise ValueError(f"{len(missing)} parameter(s) of the evaluation model get no tensor "
                             f"from the checkpoints, e.g. {missing[0]!r} (prefix {prefix!r}); "
                             "the model does not match the checkpoints (check --model / "
                             "--key_prefix)")
        return cls(module, pairs, skipped)

    def load(self, readers: Sequence[TensorReader], weights: Sequence[float],
             accumulate_dtype: torch.dtype = torch.float32) -> None:
        """Write ``Σ_i w_i·θ_i`` into the module, tensor by tensor (values cast to its dtypes).

        Raises:
            ValueError: invalid weights.
        """
        ws = validate_weights(weights, len(readers))
        with torch.no_grad():
            for fk, target in self._targets:
                merged = merge_tensor(readers, ws, fk, accumulate_dtype)
                target.copy_(merged)
                del merged

