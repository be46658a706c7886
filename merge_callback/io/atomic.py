"""Atomic writes, and the removal of what a killed write left behind.

Soups are written to a temporary name in the destination folder, flushed to disk and moved into
place with ``os.replace``, so a reader sees either the previous file or the complete new one, never a
partial file. Training checkpoints are only ever opened for reading.

Temporary names carry the writer's process id: ``.<name>.tmp-<pid>`` (files),
``.<name>.tmp-<pid>-<random>`` (folders) and ``.<name>.old-<pid>`` (a folder being replaced). A
write killed half-way (``SIGKILL``, power loss) leaves such a name behind;
:func:`remove_stale_temporaries` removes those whose process is no longer alive, and puts a
replaced folder back when its replacement never arrived.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "save_safetensors_atomic",
    "atomic_directory",
    "json_safe",
    "TEMPORARY_NAME",
    "temporary_owner",
    "remove_stale_temporaries",
    "publish_modes",
]

#: temporaries this package creates: ``.<name>.tmp-<pid>[-<random>]`` and ``.<name>.old-<pid>``
TEMPORARY_NAME = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>[0-9]+)(?:-[A-Za-z0-9_]+)?$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def temporary_owner(name: str) -> int | None:
    """The process id in a temporary name this package creates, or ``None`` for any other name.

    Example:
        >>> temporary_owner(".soup-step=100.safetensors.tmp-4242")
        4242
        >>> temporary_owner("soup-step=100.safetensors") is None
        True
    """
    m = TEMPORARY_NAME.match(name)
    return int(m.group("pid")) if m else None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove what killed writes left in ``directory``; return the paths removed (or restored).

    Only names this package creates are touched (:data:`TEMPORARY_NAME`), and only when the process
    id in the name is not a running process on this machine, so a write in progress (this process
    or another) is left alone. A folder moved aside for replacement (``.<name>.old-<pid>``) whose
    replacement never arrived (``<name>`` is missing) is moved back to ``<name>``, not removed.
    A missing ``directory`` is not an error (nothing to clean).

    Args:
        directory: the folder soups (or other outputs) are written to.

    Returns:
        the temporary paths that were removed or moved back, sorted.

    Raises:
        OSError: a stale temporary exists but cannot be removed (e.g. no permission).
    """
    d = Path(directory)
    try:
        entries = list(os.scandir(d))
    except (FileNotFoundError, NotADirectoryError):
        return []
    done: list[Path] = []
    # restore replaced folders first, then drop the rest
    for e in sorted(entries, key=lambda e: TEMPORARY_NAME.match(e.name) is None
                    or TEMPORARY_NAME.match(e.name).group("kind") != "old"):
        m = TEMPORARY_NAME.match(e.name)
        if m is None or _pid_alive(int(m.group("pid"))):
            continue
        path = d / e.name
        final = d / m.group("name")
        if m.group("kind") == "old" and not os.path.lexists(final):
            os.replace(path, final)
        elif e.is_dir(follow_symlinks=False):
            shutil.rmtree(path)
        else:
            path.unlink()
        done.append(path)
    if done:
        _fsync_dir(d)
    return sorted(done)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return _publish(path, write)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_modes(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes a plain ``mkdir`` or
    ``open`` would give it, the umask applied: temporary folders and safetensors files are created
    private (0700 / 0600), which would hide a soup from the other accounts that can read the run's
    checkpoints."""
    path = Path(path)
    mask = _umask()
    path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    if path.is_dir():
        for p in path.rglob("*"):
            if not p.is_symlink():
                p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _publish(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a temporary name beside ``path``, give it the modes ``open`` would,
    flush it to disk, move it into place with ``os.replace`` and flush the folder; the temporary
    is gone whatever happens."""
    tmp = _tmp_path(path)
    try:
        write(tmp)
        publish_modes(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def json_safe(obj: Any) -> Any:
    """Convert floats that JSON cannot hold (nan, inf) to strings, recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write_bytes(path, (json.dumps(json_safe(obj), indent=2) + "\n").encode())


def save_safetensors_atomic(path: str | os.PathLike, tensors: Mapping[str, Tensor],
                            metadata: Mapping[str, Any] | None = None) -> Path:
    """Save ``tensors`` as a safetensors file atomically.

    ``metadata`` values are stored as strings in the file header (non-strings JSON-encoded).
    Tensors are made contiguous and moved to the CPU; tensors whose bytes overlap (tied weights)
    are written as separate copies, while disjoint views of one buffer (host snapshots) are
    written as they are, without a copy.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {str(k): v if isinstance(v, str) else json.dumps(json_safe(v))
            for k, v in (metadata or {}).items()}
    out = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    keys = list(out)
    reach = -1  # end of the bytes covered so far, scanning by start address
    for i in sorted(range(len(keys)), key=lambda i: (out[keys[i]].data_ptr(), i)):
        t = out[keys[i]]
        nbytes = t.numel() * t.element_size()
        if nbytes == 0:
            continue
        if t.data_ptr() < reach:  # overlaps a tensor kept as it is: write a copy
            out[keys[i]] = t.clone()
        else:
            reach = t.data_ptr() + nbytes
    return _publish(path, lambda tmp: save_file(out, str(tmp), metadata=meta))


class atomic_directory:
    """Context manager yielding a temporary folder that replaces ``path`` on success.

    On an exception the temporary folder is removed and ``path`` is left as it was. An existing
    ``path`` is replaced (moved aside first, then removed).

    Example:
        >>> with atomic_directory(out_dir) as tmp:   # doctest: +SKIP
        ...     model.save_pretrained(tmp)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-{os.getpid()}-",
                                         dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        publish_modes(self.tmp)  # mkdtemp's folder and safetensors' files are private
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False
