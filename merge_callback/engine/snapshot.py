"""Host copies of a module's weights (snapshots) and their memory.

A :class:`Snapshot` is one host copy of ``state_dict()`` in one flat, 64-byte-aligned buffer per
dtype, page-locked in place on CUDA with asynchronous copies; :class:`ShardedSnapshot` holds only
this rank's local shards of a sharded module. :func:`capture_snapshot` picks the right one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from merge_callback.engine.sharded import ShardLayout, is_sharded, local_state_dict
from merge_callback.merge import storage_ident

__all__ = ["Snapshot", "ShardedSnapshot", "capture_snapshot", "capture_nbytes"]


class Snapshot:
    """A host copy of a module's ``state_dict()`` at a training step.

    Tensors that share memory in the module (tied weights) share one host copy. The copies are
    views into one flat host buffer per dtype (each tensor 64-byte aligned). On CUDA that buffer is
    page-locked in place (``cudaHostRegister``: exactly the bytes needed, where pinned tensors from
    the caching host allocator are rounded up to a power of two) and the copies are issued
    asynchronously on the current stream: :meth:`capture` returns while they run, training's
    next kernels on that stream come after them, and reading :attr:`tensors` waits for them.

    Args:
        tensors: key -> host tensor, in ``state_dict()`` order.
        step: the global step the weights belong to.
    """

    def __init__(self, tensors: dict[str, Tensor], step: int):
        self._tensors = tensors
        self.step = int(step)
        self._ready: list = []  # CUDA events recorded after the asynchronous copies
        self._buffers: _HostBuffers | None = None  # set by capture; what reuse= takes over

    @property
    def tensors(self) -> dict[str, Tensor]:
        """key -> host tensor; waits for pending device-to-host copies first."""
        self.wait()
        return self._tensors

    def wait(self) -> None:
        """Block until the copies issued by :meth:`capture` have landed in host memory."""
        ready, self._ready = self._ready, []
        for event in ready:
            event.synchronize()

    @classmethod
    def capture(cls, module: nn.Module, step: int, pin_memory: bool | None = None,
                reuse: Snapshot | None = None) -> Snapshot:
        """Copy ``module.state_dict()`` to host memory.

        Args:
            module: the live module.
            step: the training step recorded with the copy.
            pin_memory: page-lock the host buffer (default: when any tensor is on CUDA).
            reuse: a snapshot nobody uses any more; when its tensors have the same keys, shapes
                and dtypes, the copy goes into its buffers (no new allocation, no page faults,
                no new page-locking) and ``reuse`` must not be used afterwards.
        """
        sd = module.state_dict()
        index: dict[tuple, int] = {}
        sources: list[Tensor] = []
        entries: list[tuple[str, int]] = []
        for key, t in sd.items():
            t = t.detach()
            ident = storage_ident(t)
            if ident not in index:
                index[ident] = len(sources)
                sources.append(t)
            entries.append((key, index[ident]))
        layout = (tuple(entries), tuple((tuple(t.shape), t.dtype) for t in sources))
        if reuse is not None and reuse._buffers is not None and reuse._buffers.layout == layout:
            reuse.wait()
            buffers, reuse._buffers, reuse._tensors = reuse._buffers, None, {}
        else:
            any_cuda = any(t.is_cuda for t in sources)
            pin = (any_cuda if pin_memory is None else bool(pin_memory)) and any_cuda
            buffers = _flat_host_buffers(sources, pin, layout)
        devices = set()
        with torch.no_grad():
            for host, t in zip(buffers.hosts, sources):
                host.copy_(t, non_blocking=t.is_cuda and buffers.locked)
                if t.is_cuda:
                    devices.add(t.device)
        snap = cls({key: buffers.hosts[i] for key, i in entries}, step)
        snap._buffers = buffers
        for device in devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            snap._ready.append(event)
        return snap

    @property
    def page_locked(self) -> bool:
        """Whether the host buffers are page-locked (CUDA training): worth keeping for reuse."""
        return self._buffers is not None and self._buffers.locked

    def _take_buffers(self, other: Snapshot) -> None:
        """Adopt ``other``'s tensors, buffers and pending copies (``other`` is left empty)."""
        self._tensors, self._ready, self._buffers = other._tensors, other._ready, other._buffers
        other._tensors, other._ready, other._buffers = {}, [], None

    @property
    def nbytes(self) -> int:
        """Bytes held (shared tensors counted once)."""
        seen: set[int] = set()
        total = 0
        for t in self.tensors.values():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


_ALIGN_BYTES = 64


@dataclass
class _HostBuffers:
    """A snapshot's memory: ``hosts`` (one per distinct tensor, in capture order) are views into
    the ``flats`` (one per dtype; page-locked if ``locked``); ``layout`` is what a capture
    with ``reuse=`` must match."""

    layout: tuple
    hosts: list[Tensor]
    flats: list[Tensor]
    locked: bool


def _flat_host_buffers(sources: list[Tensor], pin: bool, layout: tuple) -> _HostBuffers:
    """Contiguous host tensors shaped like ``sources``: views into one flat buffer per dtype."""
    offsets: list[int] = []
    sizes: dict[torch.dtype, int] = {}
    gaps: list[tuple[torch.dtype, int, int]] = []
    for t in sources:
        align = max(1, _ALIGN_BYTES // t.element_size())
        end = sizes.get(t.dtype, 0)
        start = -(-end // align) * align
        if start > end:
            gaps.append((t.dtype, end, start))
        offsets.append(start)
        sizes[t.dtype] = start + t.numel()
    flats = {dtype: torch.empty(n, dtype=dtype, device="cpu") for dtype, n in sizes.items()}
    for dtype, a, b in gaps:  # the alignment padding: no stale process memory in saved buffers
        flats[dtype][a:b].zero_()
    devices = tuple(sorted({t.device.index or 0 for t in sources if t.is_cuda}))
    locked = pin and all([_page_lock(flat, devices) for flat in flats.values()])
    hosts = [flats[t.dtype][o:o + t.numel()].view(t.shape) for t, o in zip(sources, offsets)]
    return _HostBuffers(layout, hosts, list(flats.values()), locked)


_PAGE_LOCK_REFUSED = False  # after one refusal, later snapshots stay pageable


def _page_lock(flat: Tensor, devices: tuple[int, ...] = ()) -> bool:
    """Page-lock ``flat``'s memory for asynchronous copies; unlocked when ``flat`` is freed.

    Returns False (the memory stays pageable and copies into it are synchronous) if CUDA refuses;
    then it is not tried again in this process. ``devices``: the CUDA devices that copy into it
    (synchronised before it is unlocked).
    """
    import weakref

    global _PAGE_LOCK_REFUSED
    nbytes = flat.numel() * flat.element_size()
    if nbytes == 0 or _PAGE_LOCK_REFUSED:
        return False
    ptr = flat.data_ptr()
    try:
        cudart = torch.cuda.cudart()
        status = int(cudart.cudaHostRegister(ptr, nbytes, 0))
    except (AttributeError, RuntimeError):  # a torch build without the runtime binding
        _PAGE_LOCK_REFUSED = True
        return False
    if status != 0:
        _PAGE_LOCK_REFUSED = True
        # the runtime keeps the error as its "last error", which torch's binding cannot clear;
        # the next checked kernel launch would raise it somewhere unrelated: consume it here
        try:
            torch.empty(1, device="cuda").zero_()
        except RuntimeError:
            pass
        import warnings
        warnings.warn(f"merge_callback: CUDA refused to page-lock {nbytes} bytes of host memory; "
                      "weight snapshots use pageable memory and synchronous copies from now on",
                      RuntimeWarning, stacklevel=3)
        return False
    weakref.finalize(flat, _page_unlock, ptr, devices)
    return True


def _page_unlock(ptr: int, devices: tuple[int, ...]) -> None:
    # a copy into the buffer may still be in flight (a snapshot dropped right after its capture):
    # let those devices finish before the memory becomes pageable and is freed
    try:
        for device in devices:
            torch.cuda.synchronize(device)
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001 - at interpreter exit CUDA may already be shut down
        pass


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


def capture_nbytes(module: nn.Module) -> int:
    """Bytes a snapshot of ``module`` takes (this rank's shards of a sharded module; tied
    tensors once): the size of one soup on disk."""
    sd = local_state_dict(module)[0] if is_sharded(module) else module.state_dict()
    seen: set[tuple] = set()
    total = 0
    for t in sd.values():
        ident = storage_ident(t)
        if ident not in seen:
            seen.add(ident)
            total += t.numel() * t.element_size()
    return total


def capture_snapshot(module: nn.Module, step: int, pin_memory: bool | None = None,
                     reuse: Snapshot | None = None) -> Snapshot:
    """A :class:`ShardedSnapshot` of the local shards if ``module`` is sharded, else
    ``Snapshot.capture`` (``reuse``: a snapshot whose buffers may be overwritten)."""
    if is_sharded(module):
        return ShardedSnapshot.capture(module, step, pin_memory=pin_memory, reuse=reuse)
    return Snapshot.capture(module, step, pin_memory=pin_memory, reuse=reuse)
