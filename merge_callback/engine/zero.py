"""Local views of DeepSpeed ZeRO-3 and FSDP1 (``FullyShardedDataParallel``) weights.

A *local view* is what :func:`merge_callback.engine.sharded.local_state_dict` gives (it
dispatches here for ZeRO-3 and FSDP1 and handles FSDP2 ``DTensor`` itself): a mapping
``key -> tensor`` whose tensors share storage with the weights this rank holds, plus a layout per
key saying where the piece sits in the full tensor. Writing into the view's tensors changes the
live weights on this rank; after such a write, call :func:`sync_after_edit` before the next
forward so that no stale gathered copy is used.

Where the pieces come from:

* **ZeRO-3** (``zero_optimization.stage == 3``): each parameter's partition ``param.ds_tensor``
  holds elements ``[r * P, (r + 1) * P)`` of the flattened parameter on partition rank ``r``
  (``P = ceil(numel / world)``; the last partition is padded). Parameters DeepSpeed keeps
  gathered (``param.ds_persist``: below ``stage3_param_persistence_threshold``) are viewed
  through their partition too; :func:`refresh_zero3` gathers them again after an edit. ZeRO-1
  and ZeRO-2 keep full parameters on every rank: use ``state_dict()`` as under DDP.
* **FSDP1**: every ``FlatParameter``'s local shard (``flat_param._local_shard``, the tensor the
  optimizer updates and the forward all-gathers) is cut into the original parameters' pieces with
  FSDP's own ``_shard_param_infos``; each piece is a 1-D slice of the flattened original
  parameter (possibly empty on a rank). Works for ``use_orig_params`` True and False.

Flat pieces carry a :class:`FlatShardLayout` (``{"shape": [...], "flat_offset": k}`` in a
sharded soup's header) instead of the n-dimensional ``offset`` of
:class:`merge_callback.engine.sharded.ShardLayout`; :func:`merge_callback.io.soups.place_piece`
puts either kind into a full tensor,
and :func:`merge_callback.io.soups.read_pieces` assembles pieces of both kinds.

Only ``torch`` (and this package's ``dist`` and ``io.soups``) is imported at module level; DeepSpeed is never imported here (its parameters are
recognised by their ``ds_*`` attributes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from merge_callback import dist
from merge_callback.io.soups import place_piece

__all__ = [
    "FlatShardLayout",
    "ReplicatedLayout",
    "is_zero3",
    "is_fsdp1",
    "local_state_dict_zero3",
    "local_state_dict_fsdp1",
    "local_state_dict_any",
    "sync_after_edit",
    "zero_config_problem",
    "grad_free_context",
    "evaluation_context",
    "without_inference_mode",
    "reshard_fsdp1",
    "refresh_zero3",
    "gather_pieces_to_rank_zero",
]


def _group_rank(group: Any) -> int:
    """This process's rank in ``group`` (0 without a process group)."""
    return torch.distributed.get_rank(group=group) if dist.initialized() else 0


def _group_size(group: Any) -> int:
    """The number of ranks in ``group`` (1 without a process group)."""
    return torch.distributed.get_world_size(group=group) if dist.initialized() else 1


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class FlatShardLayout:
    """A 1-D piece of a tensor's flattened (row-major) elements.

    The piece holds elements ``[flat_offset, flat_offset + piece.numel())`` of
    ``full.reshape(-1)``.

    Attributes:
        shape: shape of the full (global) tensor.
        flat_offset: index of the piece's first element in the flattened full tensor.
        owner: this rank writes the piece (False for empty pieces).
    """

    shape: tuple[int, ...]
    flat_offset: int
    owner: bool

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "flat_offset": int(self.flat_offset)}


@dataclass(frozen=True)
class ReplicatedLayout:
    """A tensor held whole on every rank (the same JSON as a full-size ``ShardLayout``).

    Attributes:
        shape: shape of the tensor.
        owner: this rank writes it (global rank zero only).
    """

    shape: tuple[int, ...]
    owner: bool

    @property
    def offset(self) -> tuple[int, ...]:
        return (0,) * len(self.shape)

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "offset": [0] * len(self.shape)}


def gather_pieces_to_rank_zero(tensors: Mapping[str, Tensor], layouts: Mapping[str, Any],
                               keys: Iterable[str] | None = None) -> dict[str, Tensor] | None:
    """Assemble full tensors on global rank zero from every rank's pieces (collective).

    Each rank sends the pieces it owns (``layouts[key].owner``) as host tensors; rank zero places
    them with :func:`place_piece`. Rank zero holds the whole model once (plus the pieces in
    transit); the other ranks hold nothing extra. Use it for a rank-zero soup file instead of a
    sharded soup folder.

    Args:
        tensors: this rank's pieces (e.g. a soup built from two local views).
        layouts: key -> layout with ``owner`` and ``to_json()`` (:class:`FlatShardLayout`,
            :class:`ReplicatedLayout`, or FSDP2's ``ShardLayout``).
        keys: the keys to return, in order (default: ``tensors``' keys).

    Returns:
        key -> full tensor on rank zero; ``None`` on every other rank.

    Raises:
        ValueError: on rank zero, a key whose pieces do not cover it exactly once.
    """
    mine = {k: (t.detach().cpu(), layouts[k].to_json()) for k, t in tensors.items()
            if layouts[k].owner}
    order = list(tensors) if keys is None else list(keys)
    if dist.world_size() == 1:
        parts = [mine]
    else:
        parts = [None] * dist.world_size() if dist.rank() == 0 else None
        torch.distributed.gather_object(mine, parts, dst=0)
        if dist.rank() != 0:
            return None
    full: dict[str, Tensor] = {}
    covered: dict[str, int] = {}
    for part in parts:
        for key, (piece, spec) in part.items():
            if key not in full:
                full[key] = torch.empty(spec["shape"], dtype=piece.dtype)
                covered[key] = 0
            covered[key] += place_piece(full[key], piece, spec, key)
    for key in order:
        if covered.get(key) != (full[key].numel() if key in full else -1):
            raise ValueError(f"the pieces of {key!r} cover {covered.get(key, 0)} of "
                             f"{full[key].numel() if key in full else '?'} elements")
    return {k: full[k] for k in order}


# --------------------------------------------------------------------------- detection


def _is_zero3_param(p: Tensor) -> bool:
    return getattr(p, "ds_tensor", None) is not None and hasattr(p, "ds_status")


def is_zero3(module: nn.Module) -> bool:
    """True if ``module``'s parameters are partitioned by DeepSpeed ZeRO stage 3."""
    return any(_is_zero3_param(p) for p in module.parameters())


def _fsdp1_class() -> type | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return FullyShardedDataParallel


def is_fsdp1(module: nn.Module) -> bool:
    """True if ``module`` is or contains a FSDP1 ``FullyShardedDataParallel`` wrapper."""
    cls = _fsdp1_class()
    return cls is not None and any(isinstance(m, cls) for m in module.modules())


def _persistent_buffers(module: nn.Module, clean=lambda k: k) -> Iterable[tuple[str, Tensor]]:
    for prefix, m in module.named_modules():
        for name, b in m._buffers.items():
            if b is None or name in m._non_persistent_buffers_set:
                continue
            yield clean(f"{prefix}.{name}" if prefix else name), b


# --------------------------------------------------------------------------- ZeRO-3


def local_state_dict_zero3(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """This rank's pieces of a ZeRO-3 module's parameters and its persistent buffers.

    Args:
        module: the module whose parameters ZeRO-3 partitioned (Lightning: the LightningModule;
            Hugging Face Trainer: ``trainer.model``; or ``engine.module``). Keys are its
            ``state_dict()`` keys (tied parameters appear under each name, as one tensor).

    Returns:
        ``(tensors, layouts)``: every parameter gives the valid part of its partition
        ``param.ds_tensor`` (a view: writing into it changes the partition) with a
        :class:`FlatShardLayout`, also the parameters DeepSpeed keeps gathered (``ds_persist``;
        :func:`refresh_zero3` re-gathers them after an edit); a buffer gives the full live tensor
        with a :class:`ReplicatedLayout` owned by rank zero.

    Raises:
        ValueError: ``module`` has a parameter ZeRO-3 does not manage, a partition kept on NVMe,
            a secondary partition (ZeRO++ ``zero_hpz_partition_size``) or a partition group other
            than all ranks (MiCS).
    """
    rank0 = dist.rank() == 0
    world = dist.world_size()
    tensors: dict[str, Tensor] = {}
    layouts: dict[str, Any] = {}
    seen: dict[int, tuple[Tensor, Any]] = {}
    for key, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tensors[key], layouts[key] = seen[id(p)]
            continue
        if not _is_zero3_param(p):
            raise ValueError(f"parameter {key!r} is not partitioned by DeepSpeed ZeRO-3 (no "
                             "ds_tensor); local_state_dict_zero3 needs a module whose every "
                             "parameter ZeRO-3 manages")
        part = p.ds_tensor
        location = getattr(part, "final_location", None)
        if location is not None and "nvme" in str(location).lower():
            raise ValueError(f"parameter {key!r} keeps its partition on NVMe "
                             "(offload_param.device='nvme'); it cannot be merged in place")
        if getattr(p, "ds_secondary_tensor", None) is not None:
            raise ValueError(f"parameter {key!r} has a secondary partition (ZeRO++ "
                             "zero_hpz_partition_size > 1), which an in-place edit of the "
                             "primary partition would leave stale; use zero_hpz_partition_size=1")
        group = getattr(p, "ds_process_group", None)
        if _group_size(group) != world:
            raise ValueError(f"parameter {key!r} is partitioned over {_group_size(group)} of "
                             f"{world} ranks (MiCS); only partitioning over all ranks is "
                             "supported")
        shape = tuple(int(s) for s in p.ds_shape)
        size = int(part.ds_numel)
        start = size * _group_rank(group)
        n = max(0, min(size, int(p.ds_numel) - start))
        entry = (part.view(-1).narrow(0, 0, n), FlatShardLayout(shape, start, n > 0))
        seen[id(p)] = entry
        tensors[key], layouts[key] = entry
    for key, b in _persistent_buffers(module):
        tensors[key], layouts[key] = b.detach(), ReplicatedLayout(tuple(b.shape), rank0)
    return tensors, layouts


def refresh_zero3(module: nn.Module) -> tuple[int, int]:
    """Make ZeRO-3's gathered copies agree with the partitions (collective: every rank).

    Call after editing the views of :func:`local_state_dict_zero3`, outside forward and
    backward. A partitioned parameter still held gathered is freed (the next forward gathers
    the edited partition). Persistent parameters (``ds_persist``), which the forward uses
    without gathering, are freed and gathered again from their partitions, as DeepSpeed does
    after every optimizer step; this also replaces copies gathered under
    ``torch.inference_mode`` (which a training forward cannot use) with normal tensors.

    Returns:
        ``(freed, regathered)``: how many partitioned parameters were freed and how many
        persistent ones gathered again.
    """
    freed = 0
    persistent = []
    for p in module.parameters():
        if not _is_zero3_param(p):
            continue
        if getattr(p, "ds_persist", False):
            persistent.append(p)
        elif p.data.numel() > 0 and not p.ds_active_sub_modules:
            p.partition(has_been_updated=False)
            freed += 1
    persistent = list({id(p): p for p in persistent}.values())
    if persistent:
        available = [p for p in persistent if p.data.numel() > 0]
        if available:
            available[0].partition(param_list=available, has_been_updated=False)
        persistent[0].all_gather(param_list=persistent)
    return freed, len(persistent)


def zero_config_problem(zero_optimization: Mapping[str, Any] | None) -> str | None:
    """Why a DeepSpeed ``zero_optimization`` config cannot be merged shard-locally, or ``None``.

    ZeRO stages 0-2 keep full parameters on every rank (merged as under DDP) and ZeRO-3 keeps a
    partition per rank (merged in place); refused are ZeRO-3 parameters kept on NVMe
    (``offload_param.device="nvme"``), ZeRO++ secondary partitions
    (``zero_hpz_partition_size > 1``) and MiCS (``mics_shard_size > 0``), which
    :func:`local_state_dict_zero3` cannot view. The answer names the setting and the fix.
    """
    zero = dict(zero_optimization or {})
    if int(zero.get("stage", 0) or 0) < 3:
        return None
    device = (zero.get("offload_param") or {}).get("device", "none")
    if str(device).lower() == "nvme":
        return ("ZeRO-3 with offload_param.device='nvme' keeps the parameter partitions on NVMe, "
                "where they cannot be merged in place; HINT: offload_param.device 'cpu' or "
                "'none'")
    hpz = zero.get("zero_hpz_partition_size", 1)
    if int(hpz or 1) > 1:
        return (f"ZeRO++ zero_hpz_partition_size={hpz} keeps secondary partitions that an "
                "in-place merge would leave stale; HINT: zero_hpz_partition_size=1")
    mics = zero.get("mics_shard_size", -1)
    if int(mics if mics is not None else -1) > 0:
        return (f"MiCS (mics_shard_size={mics}) partitions parameters over groups smaller than "
                "all ranks; HINT: leave mics_shard_size unset")
    return None


# --------------------------------------------------------------------------- FSDP1


def _fsdp1_root(module: nn.Module):
    cls = _fsdp1_class()
    if cls is None or not isinstance(module, cls):
        raise ValueError(
            f"local_state_dict_fsdp1 needs the root FullyShardedDataParallel module, got "
            f"{type(module).__name__}; HINT: Lightning FSDPStrategy: trainer.strategy.model; "
            "Hugging Face Trainer with FSDP: trainer.model_wrapped")
    return cls


def local_state_dict_fsdp1(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """This rank's pieces of a FSDP1 module's parameters and its persistent buffers.

    Args:
        module: the root ``FullyShardedDataParallel`` (it and every nested FSDP instance are
            read). Keys are the unwrapped module's ``state_dict()`` keys (FSDP's
            ``_fsdp_wrapped_module.`` and checkpoint-wrapper prefixes removed).

    Returns:
        ``(tensors, layouts)``: each original parameter gives the part of its flat parameter's
        local shard (``flat_param._local_shard``) that belongs to it, a 1-D view with a
        :class:`FlatShardLayout` (empty and not owned where the rank holds none of it); under
        ``NO_SHARD`` the full parameter with a :class:`ReplicatedLayout`. Buffers: the full
        tensor, owned by rank zero.

    Raises:
        ValueError: ``module`` is not a ``FullyShardedDataParallel``, or a flat parameter is
            sharded over fewer ranks than the world (hybrid sharding).
    """
    cls = _fsdp1_root(module)
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    rank0 = dist.rank() == 0
    world = dist.world_size()
    tensors: dict[str, Tensor] = {}
    layouts: dict[str, Any] = {}
    for prefix, m in module.named_modules():
        if not isinstance(m, cls) or m._handle is None:
            continue
        handle = m._handle
        flat = handle.flat_param
        base = clean_tensor_name(prefix)
        base = f"{base}." if base else ""
        # FSDP sets _local_shard at its lazy initialisation (the first forward); before that the
        # flat parameter's data is the local shard itself
        local = getattr(flat, "_local_shard", None)
        if local is None:
            local = flat.data
        sharded = handle.uses_sharded_strategy
        if sharded and _group_size(handle.process_group) != world:
            raise ValueError(f"FSDP module {prefix or '<root>'!r} shards over "
                             f"{_group_size(handle.process_group)} of {world} ranks (hybrid "
                             "sharding); only sharding over all ranks is supported")
        pieces: dict[str, tuple[Tensor, Any]] = {}
        for fqn, shape, info in zip(flat._fqns, flat._shapes, flat._shard_param_infos):
            key = base + clean_tensor_name(fqn)
            shape = tuple(int(s) for s in shape)
            if info.in_shard:
                piece = local.narrow(0, info.offset_in_shard, info.numel_in_shard)
                start = int(info.intra_param_start_idx)
            else:
                piece, start = local.narrow(0, 0, 0), 0
            if sharded:
                entry = (piece, FlatShardLayout(shape, start, piece.numel() > 0))
            else:
                entry = (piece.view(shape), ReplicatedLayout(shape, rank0))
            pieces[clean_tensor_name(fqn)] = entry
            tensors[key], layouts[key] = entry
        for info in flat._shared_param_infos:
            prim = clean_tensor_name(f"{info.prim_module_name}.{info.prim_param_name}"
                                     if info.prim_module_name else info.prim_param_name)
            name = clean_tensor_name(f"{info.module_name}.{info.param_name}"
                                     if info.module_name else info.param_name)
            tensors[base + name], layouts[base + name] = pieces[prim]
    for key, b in _persistent_buffers(module, clean_tensor_name):
        tensors[key], layouts[key] = b.detach(), ReplicatedLayout(tuple(b.shape), rank0)
    return tensors, layouts


def reshard_fsdp1(module: nn.Module) -> int:
    """Free FSDP1's unsharded flat parameters; return how many handles were resharded.

    FSDP1 keeps the root's parameters unsharded after a forward (for the backward), and a forward
    skips the all-gather when the unsharded copy is still allocated; after an edit of the local
    shards that copy is stale. Call this (outside forward and backward) after editing the views
    of :func:`local_state_dict_fsdp1`, and once more after restoring them.
    """
    cls = _fsdp1_class()
    count = 0
    if cls is None:
        return count
    for m in module.modules():
        handle = getattr(m, "_handle", None) if isinstance(m, cls) else None
        if handle is None or not handle.uses_sharded_strategy or handle.needs_unshard():
            continue
        handle.reshard(True)
        handle.post_reshard()
        handle._prefetched = False
        count += 1
    return count


# --------------------------------------------------------------------------- dispatch


def local_state_dict_any(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """The local view for whatever holds ``module``'s weights.

    ZeRO-3: :func:`local_state_dict_zero3`; a root FSDP1 wrapper: :func:`local_state_dict_fsdp1`;
    otherwise ``(module.state_dict(), None)`` (full tensors: single device, DDP, ZeRO-1/2; FSDP2
    DTensors are handled by :func:`merge_callback.engine.sharded.local_state_dict`).
    """
    if is_zero3(module):
        return local_state_dict_zero3(module)
    cls = _fsdp1_class()
    if cls is not None and isinstance(module, cls):
        return local_state_dict_fsdp1(module)
    if is_fsdp1(module):
        raise ValueError(f"{type(module).__name__} contains FullyShardedDataParallel modules; "
                         "pass the root FullyShardedDataParallel wrapper")
    return {k: v.detach() for k, v in module.state_dict().items()}, None


def sync_after_edit(module: nn.Module) -> None:
    """Make the next forward see in-place edits of a local view (call on every rank).

    FSDP1: :func:`reshard_fsdp1`; ZeRO-3: :func:`refresh_zero3` (collective); otherwise
    nothing.
    """
    if is_zero3(module):
        refresh_zero3(module)
    elif is_fsdp1(module):
        reshard_fsdp1(module)


@contextlib.contextmanager
def grad_free_context():
    """Leave ``torch.inference_mode`` (if active) and disable autograd instead.

    Entered inside :class:`merge_callback.evaluate.HeldoutEvaluator`'s ``inference_mode`` (its
    ``context`` argument), the forwards run as under ``torch.no_grad()``.
    """
    with torch.inference_mode(False), torch.no_grad():
        yield


def without_inference_mode(context: Callable[[], Any] | None = None) -> Callable[[], Any]:
    """A context factory: :func:`grad_free_context` with ``context()`` (e.g. a framework's
    autocast) inside it; give it to a held-out evaluator of a ZeRO-3 model (see
    :func:`evaluation_context`)."""

    @contextlib.contextmanager
    def both():
        with grad_free_context(), (context or contextlib.nullcontext)():
            yield

    return both


def evaluation_context(module: nn.Module):
    """The ``context`` factory a held-out evaluator of ``module`` needs, or ``None``.

    ZeRO-3 needs :func:`grad_free_context`: a forward under ``torch.inference_mode`` gathers the
    persistent parameters (``stage3_param_persistence_threshold``) into inference tensors that
    DeepSpeed keeps as their data, and the next training forward then fails with "Inference
    tensors cannot be saved for backward".
    """
    return grad_free_context if is_zero3(module) else None
