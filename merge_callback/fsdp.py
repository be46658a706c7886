"""Merge rounds for sharded models (FSDP2 ``fully_shard``) and which strategies are supported.

Under FSDP2 every parameter is a ``DTensor`` whose local shard lives on one rank. A round here
never gathers a full state dict: each rank snapshots its own shards to host memory, merges them in
place, and writes its own piece of the soup. Peak host memory per rank is therefore proportional
to ``1 / world_size``. The pieces form a *sharded soup* folder::

    soup-step=100.sharded/
        shard-00000-of-00002.safetensors   # rank 0's pieces, header metadata "layout"
        shard-00001-of-00002.safetensors
        index.json                         # format, world size, files, keys, lambda, step, ...
    soup-step=100.json                     # sidecar, written last: marks a complete soup

:func:`consolidate_sharded_soup` (or ``python -m merge_callback.fsdp SRC OUT``) turns the folder
into one safetensors file or a Hugging Face model folder.

Collective functions (:func:`capture_snapshot`, :func:`run_any_round`, :func:`write_any_soup` on a
sharded module) must be called on every rank, in the same order.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from merge_callback.engine import RoundConfig, RoundResult, Snapshot, run_round, \
    soup_state_dict, write_soup_files
from merge_callback.evaluate import HeldoutEvaluator
from merge_callback.io import atomic_directory, atomic_write_json, save_safetensors_atomic

__all__ = [
    "SHARDED_FORMAT",
    "UnsupportedStrategyError",
    "check_strategy_supported",
    "is_sharded",
    "ShardLayout",
    "ShardedSnapshot",
    "local_state_dict",
    "capture_snapshot",
    "ShardLocalView",
    "BalancedHeldoutEvaluator",
    "run_shard_local_round",
    "run_any_round",
    "shard_file_name",
    "write_sharded_soup",
    "write_any_soup",
    "read_sharded_soup",
    "consolidate_sharded_soup",
    "main",
]

SHARDED_FORMAT = "merge_callback.sharded_soup"
_SHARDED_VERSION = 1
_SUPPORTED = ("single-device strategies, DDPStrategy, and "
              "ModelParallelStrategy with tensor_parallel_size=1 and fully_shard (FSDP2) applied "
              "in LightningModule.configure_model")
_FSDP2_HINT = ("HINT: use Trainer(strategy=ModelParallelStrategy(data_parallel_size=N, "
               "tensor_parallel_size=1)) and call torch.distributed.fsdp.fully_shard(module, "
               "mesh=self.device_mesh['data_parallel']) in LightningModule.configure_model")


class UnsupportedStrategyError(NotImplementedError):
    """The trainer's strategy is one the merge callback cannot run under."""


# --------------------------------------------------------------------------- strategy check


def _tensor_parallel_size(strategy: Any) -> int:
    try:
        return int(strategy.device_mesh["tensor_parallel"].size())
    except (RuntimeError, KeyError, AttributeError):
        pass
    tp = getattr(strategy, "_tensor_parallel_size", 1)
    if tp == "auto":  # Lightning resolves "auto" to the number of processes per node
        return int(getattr(strategy, "num_processes", 1) or 1)
    return int(tp)


def check_strategy_supported(trainer_or_strategy: Any, *, pairwise_only: bool = True) -> str:
    """Return ``"single"``, ``"ddp"`` or ``"fsdp2"``; raise for a strategy the callback can't use.

    Args:
        trainer_or_strategy: a Lightning ``Trainer`` (its ``strategy`` is checked) or a strategy.
        pairwise_only: the callback merges only the last two saves (no ``history > 2``,
            ``ema_decays`` or ``snapshot_every``); sharded models support nothing else.

    Raises:
        UnsupportedStrategyError: ``FSDPStrategy`` (FSDP1), ``DeepSpeedStrategy``, XLA strategies,
            ``ModelParallelStrategy`` with tensor parallelism or with ``pairwise_only=False``, or
            an unknown strategy; the message names the strategy, what is supported and how to
            switch.
    """
    from lightning.pytorch.strategies import (DDPStrategy, DeepSpeedStrategy, FSDPStrategy,
                                              ModelParallelStrategy, SingleDeviceStrategy,
                                              SingleDeviceXLAStrategy, XLAStrategy)

    strategy = getattr(trainer_or_strategy, "strategy", trainer_or_strategy)
    name = type(strategy).__name__
    prefix = f"BayesMergeCallback does not support {name}"
    if isinstance(strategy, FSDPStrategy):
        raise UnsupportedStrategyError(
            f"{prefix} (FSDP1 keeps each rank's parameters inside flattened FlatParameters; "
            f"merging them shard-locally is not implemented). Supported: {_SUPPORTED}. "
            f"{_FSDP2_HINT}")
    if isinstance(strategy, DeepSpeedStrategy):
        raise UnsupportedStrategyError(
            f"{prefix} (ZeRO partitions parameters and keeps fp32 master weights inside the "
            "optimizer, outside the module's state_dict; merging them is not implemented). "
            f"Supported: {_SUPPORTED}. {_FSDP2_HINT}")
    if isinstance(strategy, (XLAStrategy, SingleDeviceXLAStrategy)):
        raise UnsupportedStrategyError(f"{prefix} (XLA devices). Supported: {_SUPPORTED}")
    if isinstance(strategy, ModelParallelStrategy):
        tp = _tensor_parallel_size(strategy)
        if tp != 1:
            raise UnsupportedStrategyError(
                f"{prefix} with tensor_parallel_size={tp}: held-out batches are split across "
                "data-parallel ranks only. Supported: " + _SUPPORTED + ". " + _FSDP2_HINT)
        if not pairwise_only:
            raise UnsupportedStrategyError(
                f"BayesMergeCallback(history > 2, ema_decays or snapshot_every) does not support "
                f"{name}: with sharded (FSDP2) weights only the pairwise merge of the last two "
                "checkpoint saves is built shard-locally. HINT: use the defaults history=2, "
                "ema_decays=(), snapshot_every=None")
        return "fsdp2"
    if isinstance(strategy, DDPStrategy):
        return "ddp"
    if isinstance(strategy, SingleDeviceStrategy):
        return "single"
    raise UnsupportedStrategyError(f"{prefix}. Supported: {_SUPPORTED}")


# --------------------------------------------------------------------------- shard-local state


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


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _local(key: str, t: Tensor) -> tuple[Tensor, ShardLayout]:
    """The local tensor of ``t`` (a view of the live storage) and its layout."""
    if not _is_dtensor(t):
        return t, ShardLayout(tuple(t.shape), (0,) * t.dim(), _rank() == 0)
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


class ShardedSnapshot(Snapshot):
    """A host copy of this rank's shards of a module's weights.

    Args:
        tensors: key -> host copy of the local shard.
        step: the global step the weights belong to.
        layouts: key -> :class:`ShardLayout` of the piece.
    """

    def __init__(self, tensors: dict[str, Tensor], step: int, layouts: dict[str, ShardLayout]):
        super().__init__(tensors, step)
        self.layouts = layouts

    @classmethod
    def capture(cls, module: nn.Module, step: int, pin_memory: bool | None = None,
                reuse: Snapshot | None = None) -> ShardedSnapshot:
        """Copy the local shards of ``module``'s state dict to host memory (pinned on CUDA;
        ``reuse`` as in :meth:`Snapshot.capture`)."""
        local, layouts = local_state_dict(module)
        view = _TensorsModule(local)
        snap = Snapshot.capture(view, step, pin_memory=pin_memory, reuse=reuse)
        out = cls({}, step, layouts)
        out._take_buffers(snap)
        return out


class _TensorsModule(nn.Module):
    """A module whose ``state_dict()`` is a given mapping (used to reuse ``Snapshot.capture``)."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        super().__init__()
        self._tensors = dict(tensors)

    def state_dict(self, *args, **kwargs) -> dict[str, Tensor]:  # type: ignore[override]
        return dict(self._tensors)


def capture_snapshot(module: nn.Module, step: int, pin_memory: bool | None = None,
                     reuse: Snapshot | None = None) -> Snapshot:
    """A :class:`ShardedSnapshot` of the local shards if ``module`` is sharded, else
    ``Snapshot.capture`` (``reuse``: a snapshot whose buffers may be overwritten)."""
    if is_sharded(module):
        return ShardedSnapshot.capture(module, step, pin_memory=pin_memory, reuse=reuse)
    return Snapshot.capture(module, step, pin_memory=pin_memory, reuse=reuse)


class ShardLocalView(nn.Module):
    """Wraps a sharded module: ``state_dict()`` returns the local shards, calls go to the module.

    :func:`merge_callback.engine.run_round` merges into ``view.state_dict()`` in place, so given a
    view it merges each rank's shards without gathering them.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def state_dict(self, *args, **kwargs) -> dict[str, Tensor]:  # type: ignore[override]
        return local_state_dict(self.module)[0]


def _reshard(module: nn.Module) -> None:
    """Drop FSDP2's unsharded parameter copies so the next forward gathers the current shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class BalancedHeldoutEvaluator(HeldoutEvaluator):
    """A :class:`HeldoutEvaluator` whose ranks all run the same number of forward passes.

    FSDP gathers parameters inside every forward, a collective every rank must join. When the
    held-out batches do not divide evenly across ranks, a rank with fewer batches runs extra
    forwards on its first batch and discards them; the metric is the same as
    :class:`HeldoutEvaluator`'s. Arguments as for :class:`HeldoutEvaluator`; with ``shard=False``
    the data must give every rank the same number of batches (a ``DistributedSampler`` does).
    """

    balanced = True


def run_shard_local_round(module: nn.Module, previous: ShardedSnapshot, latest: ShardedSnapshot,
                          evaluate: Callable[[nn.Module], float], config: RoundConfig,
                          **kwargs: Any) -> RoundResult:
    """:func:`~merge_callback.engine.run_round` on the local shards of a sharded module.

    Every candidate soup is merged into this rank's shards in place; ``evaluate`` is called with
    ``module`` itself (all ranks evaluate together). Unsharded parameter copies are dropped before
    each evaluation and after the restore, so no forward sees stale weights. Keyword arguments go
    to ``run_round``. Collective: call on every rank.
    """
    view = ShardLocalView(module)

    def evaluate_module(_: nn.Module) -> float:
        _reshard(module)
        return evaluate(module)

    try:
        return run_round(view, previous, latest, evaluate_module, config, **kwargs)
    finally:
        _reshard(module)


def run_any_round(module: nn.Module, previous: Snapshot, latest: Snapshot,
                  evaluate: Callable[[nn.Module], float], config: RoundConfig,
                  **kwargs: Any) -> RoundResult:
    """:func:`run_shard_local_round` for sharded snapshots, ``run_round`` otherwise."""
    if isinstance(latest, ShardedSnapshot):
        return run_shard_local_round(module, previous, latest, evaluate, config, **kwargs)
    return run_round(module, previous, latest, evaluate, config, **kwargs)


# --------------------------------------------------------------------------- writing


def shard_file_name(rank: int, world_size: int) -> str:
    """``shard-<rank>-of-<world_size>.safetensors``, zero-padded to five digits."""
    return f"shard-{rank:05d}-of-{world_size:05d}.safetensors"


def _all_ok(ok: bool) -> bool:
    """True if ``ok`` on every rank (a barrier that carries a failure flag)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def _broadcast_object(obj: Any) -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def write_sharded_soup(soup_dir: str | os.PathLike, stem: str, previous: ShardedSnapshot,
                       latest: ShardedSnapshot, result: RoundResult,
                       extra_metadata: Mapping[str, object] | None = None,
                       module: nn.Module | None = None) -> Path:
    """Write this rank's pieces of ``lerp(previous, latest, result.lam)`` (collective).

    ``module``: the sharded live module the round scored in; on a GPU the pieces are then
    computed there, bitwise as scored (see :func:`merge_callback.engine.soup_state_dict`).

    Every rank writes ``shard-<rank>-of-<world>.safetensors`` into a temporary folder; rank 0 then
    writes ``index.json``, moves the folder to ``soup_dir/<stem>.sharded`` and writes the sidecar
    ``soup_dir/<stem>.json`` last. Host memory used: this rank's shards only.

    Returns:
        the ``<stem>.sharded`` folder.

    Raises:
        RuntimeError: writing failed on some rank (nothing is left in place on any rank).
    """
    soup_dir = Path(soup_dir)
    rank, world = _rank(), _world()
    final = soup_dir / f"{stem}.sharded"
    tmp_name = None
    if rank == 0:
        soup_dir.mkdir(parents=True, exist_ok=True)
        tmp_name = f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(soup_dir / tmp_name, ignore_errors=True)
        (soup_dir / tmp_name).mkdir()
    tmp = soup_dir / _broadcast_object(tmp_name)
    error: BaseException | None = None
    try:
        view = ShardLocalView(module) if module is not None else None
        pieces = {k: t for k, t in soup_state_dict(previous, latest, result.lam,
                                                   module=view).items()
                  if latest.layouts[k].owner}
        layout = {k: latest.layouts[k].to_json() for k in pieces}
        save_safetensors_atomic(tmp / shard_file_name(rank, world), pieces,
                                {"layout": layout, "rank": rank, "world_size": world,
                                 "lambda": repr(result.lam), "step": str(result.step)})
    except Exception as e:  # noqa: BLE001 - reported on every rank below
        error = e
    ok = _all_ok(error is None)
    if ok and rank == 0:
        try:
            info = result.to_json()
            if extra_metadata:
                info.update(extra_metadata)
            atomic_write_json(tmp / "index.json", {
                "format": SHARDED_FORMAT, "version": _SHARDED_VERSION, "world_size": world,
                "files": [shard_file_name(r, world) for r in range(world)],
                "keys": list(latest.tensors), "metadata": info})
            old = None
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            atomic_write_json(soup_dir / f"{stem}.json", {**info, "sharded": final.name,
                                                          "world_size": world})
        except Exception as e:  # noqa: BLE001
            error = e
    ok = _all_ok(error is None) and ok
    if not ok:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"writing the sharded soup {final} failed"
                           + (f" on rank {rank}: {type(error).__name__}: {error}" if error
                              else " on another rank")) from error
    return final


def write_any_soup(soup_dir: str | os.PathLike, stem: str, previous: Snapshot, latest: Snapshot,
                   result: RoundResult, *, is_global_zero: bool,
                   extra_metadata: Mapping[str, object] | None = None,
                   module: nn.Module | None = None) -> Path | None:
    """Write the soup the way the snapshots call for; call on every rank.

    ``module``: the live module the round scored in (the soup is then computed where it was
    scored; see :func:`merge_callback.engine.soup_state_dict`).

    Sharded snapshots: :func:`write_sharded_soup` (collective). Otherwise rank zero writes
    ``<stem>.safetensors`` and ``<stem>.json`` with
    :func:`~merge_callback.engine.write_soup_files`; other ranks return ``None``.
    """
    if isinstance(latest, ShardedSnapshot):
        if not isinstance(previous, ShardedSnapshot):
            raise ValueError("previous and latest snapshots must both be sharded or both not")
        return write_sharded_soup(soup_dir, stem, previous, latest, result, extra_metadata,
                                  module=module)
    if not is_global_zero:
        return None
    st, _ = write_soup_files(soup_dir, stem,
                             soup_state_dict(previous, latest, result.lam, module=module),
                             result, extra_metadata)
    return st


# --------------------------------------------------------------------------- reading


def _index_path(path: Path) -> Path:
    if path.is_dir():
        return path / "index.json"
    if path.suffix == ".json" and path.name != "index.json":  # the sidecar
        info = json.loads(path.read_text())
        if "sharded" not in info:
            raise ValueError(f"{path} describes an unsharded soup (no 'sharded' entry); load the "
                             ".safetensors file next to it directly")
        return path.parent / info["sharded"] / "index.json"
    return path


def read_sharded_soup(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Assemble a sharded soup into full tensors (in the live module's key order).

    Args:
        path: the ``<stem>.sharded`` folder, its ``index.json``, or the ``<stem>.json`` sidecar.

    Returns:
        ``(tensors, metadata)``; metadata holds lambda, step and the other round results.

    Raises:
        FileNotFoundError: the folder, its index or a shard file is missing.
        ValueError: not a sharded soup, or the pieces do not cover every tensor exactly.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sharded soup not found: {path}")
    index_path = _index_path(path)
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path} not found: not a complete sharded soup folder "
                                f"(expected {SHARDED_FORMAT!r} written by write_sharded_soup)")
    index = json.loads(index_path.read_text())
    if index.get("format") != SHARDED_FORMAT:
        raise ValueError(f"{index_path} is not a sharded soup index: format is "
                         f"{index.get('format')!r}, expected {SHARDED_FORMAT!r}")
    folder = index_path.parent
    missing = [f for f in index["files"] if not (folder / f).exists()]
    if missing:
        raise FileNotFoundError(f"sharded soup {folder} is missing {len(missing)} of "
                                f"{len(index['files'])} shard files (e.g. {missing[0]})")
    full: dict[str, Tensor] = {}
    covered: dict[str, int] = {}
    for name in index["files"]:
        with safe_open(str(folder / name), framework="pt") as f:
            layout = json.loads(f.metadata()["layout"])
            for key in f.keys():
                piece = f.get_tensor(key)
                spec = layout[key]
                if key not in full:
                    full[key] = torch.empty(spec["shape"], dtype=piece.dtype)
                    covered[key] = 0
                region = tuple(slice(o, o + s) for o, s in zip(spec["offset"], piece.shape))
                full[key][region] = piece
                covered[key] += piece.numel()
    for key in index["keys"]:
        if key not in full:
            raise ValueError(f"sharded soup {folder} has no piece of tensor {key!r}")
        if covered[key] != full[key].numel():
            raise ValueError(f"sharded soup {folder}: the pieces of {key!r} cover "
                             f"{covered[key]} of {full[key].numel()} elements")
    return {k: full[k] for k in index["keys"]}, dict(index["metadata"])


def consolidate_sharded_soup(path: str | os.PathLike, out: str | os.PathLike, *,
                             model: nn.Module | None = None, prefix: str | None = None) -> Path:
    """Turn a sharded soup into one safetensors file, or a Hugging Face model folder.

    Runs in one process and holds the full soup in memory once (plus ``model`` if given).

    Args:
        path: the ``<stem>.sharded`` folder, its ``index.json``, or the ``<stem>.json`` sidecar.
        out: a ``.safetensors`` file (without ``model``) or a folder (with ``model``).
        model: a Hugging Face ``PreTrainedModel`` of the trained architecture; its weights are
            replaced by the soup (strictly: every key must match) and saved with
            ``save_pretrained``.
        prefix: removed from every key before loading into ``model`` (default: the
            LightningModule attribute path, detected as the common ``"<name>."`` prefix that
            ``model``'s own keys lack, e.g. ``"model."``).

    Returns:
        the written file or folder (written atomically).

    Raises:
        ValueError: ``out`` does not end in ``.safetensors`` without ``model``; keys that do not
            match ``model``.
    """
    out = Path(out)
    if model is None and out.suffix != ".safetensors":
        raise ValueError(f"out must be a .safetensors file when no model is given, got {out}; "
                         "pass model=<PreTrainedModel> to write a Hugging Face folder")
    tensors, meta = read_sharded_soup(path)
    header = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()
              if k in ("lambda", "step", "previous_step", "alpha", "metric", "value_soup",
                       "value_latest")}
    header["format"] = "pt"
    if model is None:
        return save_safetensors_atomic(out, tensors, header)
    own = set(model.state_dict())
    if prefix is None:
        prefix = ""
        first = next(iter(tensors), "")
        if "." in first:
            cand = first.split(".", 1)[0] + "."
            if all(k.startswith(cand) for k in tensors) and not any(k.startswith(cand)
                                                                     for k in own):
                prefix = cand
    stripped = {(k[len(prefix):] if prefix and k.startswith(prefix) else k): v
                for k, v in tensors.items()}
    extra = sorted(set(stripped) - own)
    missing = sorted(own - set(stripped))
    if extra or missing:
        raise ValueError(f"the soup's keys do not match the model: {len(missing)} missing "
                         f"(e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]}); "
                         f"prefix removed: {prefix!r}")
    model.load_state_dict(stripped, strict=True)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m merge_callback.fsdp SRC OUT [--hf-config DIR] [--prefix P]``."""
    p = argparse.ArgumentParser(prog="python -m merge_callback.fsdp",
                                description="Consolidate a sharded soup into one safetensors "
                                            "file or (with --hf-config) a Hugging Face folder.")
    p.add_argument("src", help="the <stem>.sharded folder or its <stem>.json sidecar")
    p.add_argument("out", help="output .safetensors file, or folder with --hf-config")
    p.add_argument("--hf-config", help="folder or file with the model's config.json")
    p.add_argument("--prefix", default=None, help="key prefix to strip (default: detected)")
    args = p.parse_args(argv)
    model = None
    if args.hf_config:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(args.hf_config)
        model = AutoModelForCausalLM.from_config(config)
    out = consolidate_sharded_soup(args.src, args.out, model=model, prefix=args.prefix)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
