"""Views of each rank's local shards (FSDP2 ``DTensor`` parameters), never gathered.

Merging and averaging are elementwise, so a round on a sharded model works on every rank's own
pieces: :class:`ShardLocalView` gives the round a ``state_dict()`` of local tensors that share
storage with the live parameters, and :func:`reshard` drops unsharded copies so that the next
forward gathers the edited shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from merge_callback import dist

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
    """True if any parameter or buffer of ``module`` is a ``DTensor`` (FSDP2, tensor parallel)."""
    return any(_is_dtensor(p) for p in module.parameters()) or \
        any(_is_dtensor(b) for b in module.buffers())


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


def local_state_dict(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, ShardLayout]]:
    """``module.state_dict()`` with every ``DTensor`` replaced by its local shard, plus layouts.

    The local tensors share storage with the live parameters: writing into them changes the
    module's weights on this rank.
    """
    tensors: dict[str, Tensor] = {}
    layouts: dict[str, ShardLayout] = {}
    for key, t in module.state_dict().items():
        tensors[key], layouts[key] = _local(key, t.detach())
    return tensors, layouts


def reshard(module: nn.Module) -> None:
    """Drop FSDP2's unsharded parameter copies so the next forward gathers the current shards."""
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
