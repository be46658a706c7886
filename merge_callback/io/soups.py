"""Soup writers, one per output format, and the reader of sharded soups.

- :func:`write_soup_files`: ``<stem>.safetensors`` (header metadata) + ``<stem>.json`` sidecar;
- :func:`write_hf_soup_folder`: a Hugging Face model folder (``save_pretrained``) + ``merge.json``;
- :func:`write_sharded_soup`: every rank writes its own pieces of the soup (collective)::

    soup-step=100.sharded/
        shard-00000-of-00002.safetensors   # rank 0's pieces, header metadata "layout"
        shard-00001-of-00002.safetensors
        index.json                         # format, world size, files, keys, lambda, step, ...
    soup-step=100.json                     # sidecar, written last: marks a complete soup

  :func:`consolidate_sharded_soup` (or ``python -m merge_callback.fsdp SRC OUT``) turns the folder
  into one safetensors file or a Hugging Face model folder.

Every writer publishes atomically; the sidecar (or ``merge.json`` inside the folder) goes last.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from merge_callback import dist
from merge_callback.console import quiet_third_party
from merge_callback.io.atomic import atomic_directory, atomic_write_json, save_safetensors_atomic
from merge_callback.io.readers import detect_key_prefix

__all__ = ["SHARDED_FORMAT", "write_soup_files", "write_hf_soup_folder", "shard_file_name",
           "write_sharded_soup", "place_piece", "read_pieces", "read_sharded_soup",
           "consolidate_sharded_soup",
           "write_tensor_state", "read_tensor_state"]

SHARDED_FORMAT = "merge_callback.sharded_soup"
_SHARDED_VERSION = 1


def _soup_info(result: Any, extra_metadata: Mapping[str, object] | None) -> dict:
    info = result.to_json()
    if extra_metadata:
        info.update(extra_metadata)
    return info


def write_soup_files(soup_dir, stem: str, tensors: Mapping[str, Tensor], result: Any,
                     extra_metadata: Mapping[str, object] | None = None) -> tuple:
    """Write ``<stem>.safetensors`` (header metadata: lambda, step, ...) and ``<stem>.json``.

    Both are written atomically; the JSON sidecar goes last, so its presence marks a complete soup.
    """
    soup_dir = Path(soup_dir)
    info = _soup_info(result, extra_metadata)
    meta = {"format": "pt", "lambda": repr(result.lam), "step": str(result.step),
            "previous_step": str(result.previous_step), "alpha": repr(result.alpha),
            "metric": result.metric, "value_soup": repr(result.value_soup),
            "value_latest": repr(result.value_latest)}
    st = save_safetensors_atomic(soup_dir / f"{stem}.safetensors", tensors, meta)
    js = atomic_write_json(soup_dir / f"{stem}.json", info)
    return st, js


def write_hf_soup_folder(folder: str | os.PathLike, save: Callable[[Path], None], info: Mapping,
                         processing_class: Any = None) -> Path:
    """Write a Hugging Face model folder atomically: ``save(tmp)`` writes the weights and config
    (``save_pretrained``), then the tokenizer or processor if given, then ``merge.json`` (last)."""
    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        with quiet_third_party():  # DeepSpeed's import notice, transformers' shard-writing bar
            save(Path(tmp))
            if processing_class is not None and hasattr(processing_class, "save_pretrained"):
                processing_class.save_pretrained(str(tmp))
        atomic_write_json(Path(tmp) / "merge.json", dict(info))
    return folder


def shard_file_name(rank: int, world_size: int) -> str:
    """``shard-<rank>-of-<world_size>.safetensors``, zero-padded to five digits."""
    return f"shard-{rank:05d}-of-{world_size:05d}.safetensors"


def write_sharded_soup(soup_dir: str | os.PathLike, stem: str,
                       pieces: Callable[[], Mapping[str, Tensor]], layouts: Mapping[str, Any],
                       result: Any, extra_metadata: Mapping[str, object] | None = None) -> Path:
    """Write this rank's pieces of a soup (collective: call on every rank).

    Args:
        pieces: computes this rank's soup tensors (key -> local piece); called inside the
            writer so that a failure on any rank is agreed on before anything is published.
        layouts: key -> layout of the piece (``.owner``: this rank writes it; ``.to_json()``:
            its shape and offset in the full tensor); every key of the soup, in order.
        result: the round's result (``to_json()``, ``lam``, ``step``).

    Every rank writes ``shard-<rank>-of-<world>.safetensors`` into a temporary folder; rank 0 then
    writes ``index.json``, moves the folder to ``soup_dir/<stem>.sharded`` and writes the sidecar
    ``soup_dir/<stem>.json`` last. Host memory used: this rank's shards only.

    Returns:
        the ``<stem>.sharded`` folder.

    Raises:
        RuntimeError: writing failed on some rank (nothing is left in place on any rank).
    """
    soup_dir = Path(soup_dir)
    rank, world = dist.rank(), dist.world_size()
    final = soup_dir / f"{stem}.sharded"
    tmp_name = None
    if rank == 0:
        soup_dir.mkdir(parents=True, exist_ok=True)
        tmp_name = f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(soup_dir / tmp_name, ignore_errors=True)
        (soup_dir / tmp_name).mkdir()
    tmp = soup_dir / dist.broadcast_object(tmp_name)
    error: BaseException | None = None
    try:
        mine = {k: t for k, t in pieces().items() if layouts[k].owner}
        layout = {k: layouts[k].to_json() for k in mine}
        save_safetensors_atomic(tmp / shard_file_name(rank, world), mine,
                                {"layout": layout, "rank": rank, "world_size": world,
                                 "lambda": repr(result.lam), "step": str(result.step)})
    except Exception as e:  # noqa: BLE001 - reported on every rank below
        error = e
    ok = dist.all_ok(error is None)
    if ok and rank == 0:
        try:
            info = _soup_info(result, extra_metadata)
            atomic_write_json(tmp / "index.json", {
                "format": SHARDED_FORMAT, "version": _SHARDED_VERSION, "world_size": world,
                "files": [shard_file_name(r, world) for r in range(world)],
                "keys": list(layouts), "metadata": info})
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
    ok = dist.all_ok(error is None) and ok
    if not ok:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"writing the sharded soup {final} failed"
                           + (f" on rank {rank}: {type(error).__name__}: {error}" if error
                              else " on another rank")) from error
    return final


# --------------------------------------------------------------------------- reading


def place_piece(full: Tensor, piece: Tensor, spec: Mapping[str, Any], key: str = "?") -> int:
    """Copy ``piece`` into ``full`` where the layout JSON ``spec`` says; return its numel.

    Args:
        full: the full tensor being assembled (contiguous).
        piece: one rank's piece.
        spec: ``{"shape", "offset"}`` (an n-dimensional block, as written for FSDP2 DTensors and
            replicated tensors) or ``{"shape", "flat_offset"}`` (a 1-D slice of the flattened
            tensor, as written for ZeRO-3 partitions and FSDP1 flat shards).
        key: the tensor's name, for error messages.

    Raises:
        ValueError: the spec has neither ``offset`` nor ``flat_offset``, or the piece does not fit.
    """
    if "flat_offset" in spec:
        start = int(spec["flat_offset"])
        n = piece.numel()
        if piece.dim() != 1 or start < 0 or start + n > full.numel():
            raise ValueError(f"piece of {key!r}: shape {tuple(piece.shape)} at flat offset "
                             f"{start} does not fit a tensor of {full.numel()} elements "
                             f"(flat pieces must be 1-D)")
        full.view(-1)[start:start + n] = piece
        return n
    if "offset" in spec:
        offset = list(spec["offset"])
        if len(offset) != piece.dim() or any(o + s > f for o, s, f in
                                             zip(offset, piece.shape, full.shape)):
            raise ValueError(f"piece of {key!r}: shape {tuple(piece.shape)} at offset {offset} "
                             f"does not fit shape {tuple(full.shape)}")
        full[tuple(slice(o, o + s) for o, s in zip(offset, piece.shape))] = piece
        return piece.numel()
    raise ValueError(f"layout of {key!r} has neither 'offset' nor 'flat_offset': {dict(spec)}")


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


def read_pieces(files: Iterable[str | os.PathLike], keys: Iterable[str] | None = None, *,
                where: str = "") -> dict[str, Tensor]:
    """Assemble full tensors from shard files written by :func:`write_sharded_soup`.

    Each file is a safetensors file whose header metadata ``"layout"`` maps every key to a layout
    JSON (an ``offset`` per dimension, or a ``flat_offset`` into the flattened tensor; see
    :func:`place_piece`).

    Args:
        files: the shard files (every rank's).
        keys: the keys expected (default: every key found), in the order returned.
        where: prefix of error messages (e.g. ``"sharded soup <folder>: "``).

    Raises:
        ValueError: a key has no piece, or the pieces do not cover a tensor exactly.
    """
    from safetensors import safe_open

    full: dict[str, Tensor] = {}
    covered: dict[str, int] = {}
    for name in files:
        with safe_open(str(name), framework="pt") as f:
            layout = json.loads(f.metadata()["layout"])
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                piece = f.get_tensor(key)
                spec = layout[key]
                if key not in full:
                    full[key] = torch.empty(spec["shape"], dtype=piece.dtype)
                    covered[key] = 0
                covered[key] += place_piece(full[key], piece, spec, key)
    order = list(full) if keys is None else list(keys)
    for key in order:
        if key not in full:
            raise ValueError(f"{where}no piece of tensor {key!r} in {len(covered)} tensors read")
        if covered[key] != full[key].numel():
            raise ValueError(f"{where}the pieces of {key!r} cover {covered[key]} of "
                             f"{full[key].numel()} elements")
    return {k: full[k] for k in order}


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
    full = read_pieces([folder / name for name in index["files"]], index["keys"],
                       where=f"sharded soup {folder}: ")
    return full, dict(index["metadata"])


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
        prefix = detect_key_prefix(tensors, own)
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




# --------------------------------------------------------------------------- resume tensors
def write_tensor_state(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write a schedule's tensor state (``MergeSchedule.tensor_state()``: older snapshots and EMA
    tracks) as one safetensors file, atomically; :func:`read_tensor_state` reads it back."""
    tensors: dict[str, Tensor] = {}
    ring_steps = []
    for i, (step, sd) in enumerate(state.get("ring", [])):
        ring_steps.append(int(step))
        tensors.update({f"ring/{i}/{k}": v for k, v in sd.items()})
    ema_steps = {}
    for name, entry in state.get("ema", {}).items():
        ema_steps[name] = int(entry["step"])
        tensors.update({f"ema/{name}/{k}": v for k, v in entry["tensors"].items()})
    meta = {"format": "pt", "merge_callback_state": json.dumps({"ring": ring_steps,
                                                                  "ema": ema_steps})}
    return save_safetensors_atomic(path, tensors, meta)


def read_tensor_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read what :func:`write_tensor_state` wrote (tensor keys in their saved order)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        index = json.loads(f.metadata()["merge_callback_state"])
        ring: list[dict[str, Tensor]] = [{} for _ in index["ring"]]
        emas: dict[str, dict[str, Tensor]] = {name: {} for name in index["ema"]}
        for key in f.keys():
            kind, name, rest = key.split("/", 2)
            (ring[int(name)] if kind == "ring" else emas[name])[rest] = f.get_tensor(key)
    return {"ring": list(zip(index["ring"], ring)),
            "ema": {n: {"step": index["ema"][n], "tensors": t} for n, t in emas.items()}}
