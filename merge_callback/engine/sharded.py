"""Views of each rank's local shards, never gathered: FSDP2 ``DTensor`` parameters, DeepSpeed
ZeRO-3 partitions and FSDP1 flat-parameter shards.

Merging and averaging are elementwise, so a round on a sharded model works on every rank's own
pieces: :class:`ShardLocalView` gives the round a ``state_dict()`` of local tensors that share
storage with the live parameters, and :func:`reshard` drops gathered copies so that the next
forward gathers the edited shards. ZeRO-3 and FSDP1 pieces come from
:mod:`merge_callback.engine.zero` (1-D slices of the flattened parameter with a
``FlatShardLayout``); for FSDP1 the module is the root ``FullyShardedDataParallel`` wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from merge_callback import dist
import merge_callback.engine.zero as zero

__all__ = ["ShardLayout", "is_sharded", "local_state_dict", "ShardLocalView", "reshard"]


@dataclass(frozen=True)
class ShardLayout:
    """Where a rank's local piece sits in the full tensor.

    Attributes:
        shape: shape of the full (global) tensor.
        offset: index of the piece's first element along every dimension.
        owner: this rank writes the piece (replicated pieces are written by one rank only).
    """

    shape: tuple[int, ...]
    offset: tuple[int, ...]
    owner: bool

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "offset": list(self.offset)}


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def is_sharded(module: nn.Module) -> bool:
    """True if ``module``'s weights are sharded across ranks: a ``DTensor`` parameter or buffer
    (FSDP2, tensor parallel), a DeepSpeed ZeRO-3 partitioned parameter, or a FSDP1
    ``FullyShardedDataParallel`` wrapper in ``module`` (then :func:`local_state_dict` needs the
    root wrapper)."""
    return any(_is_dtensor(p) for p in module.parameters()) or \
        any(_is_dtensor(b) for b in module.buffers()) or zero.is_zero3(module) or \
        zero.is_fsdp1(module)


def _local(key: str, t: Tensor) -> tuple[Tensor, ShardLayout]:
    """The local tensor of ``t`` (a view of the live storage) and its layout."""
    if not _is_dtensor(t):
        return t, ShardLayout(tuple(t.shape), (0,) * t.dim(), dist.rank() == 0)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = t.device_mesh, tuple(t.placements)
    if any(p.is_partial() for p in placements):
        raise ValueError(f"tensor {key!r} has a Partial placement {placements}; only Shard and "
                         "Replicate placements can be merged shard-locally")
    local = t.to_local()
    local_shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    if tuple(local_shape) != tuple(local.shape):
        raise ValueError(f"tensor {key!r}: local shard has shape {tuple(local.shape)} but its "
                         f"placements {placements} imply {tuple(local_shape)} (uneven shards are "
                         "not supported)")
    coord = mesh.get_coordinate() or []
    owner = all(coord[d] == 0 for d, p in enumerate(placements) if p.is_replicate())
    return local, ShardLayout(tuple(t.shape), tuple(int(o) for o in offset), owner)


def local_state_dict(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``module.state_dict()`` with every sharded tensor replaced by this rank's piece, plus
    layouts.

    FSDP2 / tensor parallel: each ``DTensor`` becomes its local shard (a :class:`ShardLayout`);
    DeepSpeed ZeRO-3: :func:`~merge_callback.engine.zero.local_state_dict_zero3`; a root FSDP1
    wrapper: :func:`~merge_callback.engine.zero.local_state_dict_fsdp1` (keys without FSDP's
    prefixes). The local tensors share storage with the live parameters: writing into them
    changes the module's weights on this rank (call :func:`reshard` before the next forward).

    Raises:
        ValueError: ``module`` contains FSDP1 wrappers but is not the root one, or its sharding
            cannot be merged in place (Partial placements, uneven DTensor shards, ZeRO-3 NVMe
            offload, ZeRO++ hpZ, MiCS, FSDP1 hybrid sharding); the message names the tensor.
    """
    if zero.is_zero3(module):
        return zero.local_state_dict_zero3(module)
    if zero.is_fsdp1(module):
        return zero.local_state_dict_fsdp1(module)
    tensors: dict[str, Tensor] = {}
    layouts: dict[str, Any] = {}
    for key, t in module.state_dict().items():
        tensors[key], layouts[key] = _local(key, t.detach())
    return tensors, layouts


def reshard(module: nn.Module) -> None:
    """Make the next forward see in-place edits of the local shards (call on every rank).

    FSDP2: drop the unsharded parameter copies; DeepSpeed ZeRO-3: release gathered parameters and
    re-gather the persistent ones (:func:`~merge_callback.engine.zero.refresh_zero3`, a
    collective); FSDP1: free the unsharded flat parameters
    (:func:`~merge_callback.engine.zero.reshard_fsdp1`).
    """
    if zero.is_zero3(module):
        zero.refresh_zero3(module)
        return
    if zero.is_fsdp1(module):
        zero.reshard_fsdp1(module)
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class ShardLocalView(nn.Module):
    """Wraps a sharded module: ``state_dict()`` returns the local shards, calls go to the module.

    A round merges into ``view.state_dict()`` in place, so given a view it merges each rank's
    shards without gathering them; :meth:`refresh` (called before every evaluation and after the
    restore) makes the next forward see the edited shards.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def state_dict(self, *args, **kwargs) -> dict[str, Tensor]:  # type: ignore[override]
        return local_state_dict(self.module)[0]

    def layouts(self) -> dict[str, ShardLayout]:
        return local_state_dict(self.module)[1]

    def refresh(self) -> None:
        reshard(self.module)
