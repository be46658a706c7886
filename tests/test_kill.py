"""A writer killed with SIGKILL half-way leaves no partial output, and its temporaries are removed
at the next start in that folder (and only they: a running writer's are kept).

Real processes: the ``merge-callback`` command and small scripts calling
``save_safetensors_atomic`` / ``atomic_directory`` are started with ``subprocess`` and killed while
they write.
"""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_callback.io import TEMPORARY_NAME, remove_stale_temporaries, temporary_owner

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(p.name.encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def _debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMPORARY_NAME.match(p.name))


def _wait_for(predicate, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _dead_pid() -> int:
    """The id of a process that has exited (and was reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def big_checkpoints(tmp_path_factory):
    """Two safetensors checkpoints of 96 MiB each (24 tensors of 4 MiB)."""
    root = tmp_path_factory.mktemp("kill-inputs")
    paths = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        tensors = {f"layer{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(24)}
        paths.append(root / f"ckpt-{seed}.safetensors")
        save_file(tensors, str(paths[-1]))
    return paths


def _cli(inputs, out, *extra):
    return [sys.executable, "-m", "merge_callback.cli", "merge", *map(str, inputs),
            "--weights", "0.5,0.5", "--max_shard_size", "8MB", "--out", str(out), *extra]


def _default_sigint() -> None:
    # as in a terminal: a job started in the background by a non-interactive shell inherits
    # SIGINT ignored, and Python then keeps ignoring it (no KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_cli(inputs, out, *extra):
    return subprocess.Popen(_cli(inputs, out, *extra), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def test_killed_cli_merge_leaves_no_partial_output_and_no_debris(tmp_path, big_checkpoints):
    before = {p: _sha(p) for p in big_checkpoints}
    out = tmp_path / "soup"

    def writing():  # the temporary folder exists and holds bytes of at least one shard
        return any(p.is_dir() and any(f.is_file() and f.stat().st_size > 0 for f in p.rglob("*"))
                   for p in tmp_path.glob(".soup.tmp-*"))

    proc = _start_cli(big_checkpoints, out)
    assert _wait_for(writing, proc), proc.communicate()
    _kill(proc)
    assert not out.exists()                       # no partial output
    left = _debris(tmp_path)
    assert left and all(temporary_owner(n) == proc.pid for n in left)
    assert sum(f.stat().st_size for d in tmp_path.glob(".soup.tmp-*")
               for f in d.rglob("*")) > 0      # killed mid-write: something was written

    # the next start in that folder removes the debris and writes the soup
    done = subprocess.run(_cli(big_checkpoints, out), env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"removed {tmp_path / left[0]}, left by an interrupted write" in done.stderr
    assert _debris(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup"]
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == 24  # 4 MiB tensors, shards of at most 8 MB
    a, b = (load_file(str(p)) for p in big_checkpoints)
    got = {}
    for s in shards:
        got.update(load_file(str(s)))
    assert torch.equal(got["layer5.weight"], 0.5 * a["layer5.weight"] + 0.5 * b["layer5.weight"])
    assert {p: _sha(p) for p in big_checkpoints} == before  # inputs byte-identical


def test_interrupted_cli_merge_cleans_up_itself(tmp_path, big_checkpoints):
    """Ctrl-C (SIGINT) mid-write: exit code 130, one line, no output and no temporaries."""
    out = tmp_path / "soup"
    proc = _start_cli(big_checkpoints, out)
    assert _wait_for(lambda: any(tmp_path.glob(".soup.tmp-*/*")), proc), proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "merge-callback: interrupted; no output was written"
    assert list(tmp_path.iterdir()) == []


def test_killed_overwrite_keeps_the_previous_soup(tmp_path, big_checkpoints):
    out = tmp_path / "soup"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous soup")
    old = _sha(out)
    proc = _start_cli(big_checkpoints, out, "--overwrite")
    assert _wait_for(lambda: any(tmp_path.glob(".soup.tmp-*/*")), proc), proc.communicate()
    _kill(proc)
    assert _sha(out) == old
    assert remove_stale_temporaries(tmp_path) and _debris(tmp_path) == []
    assert _sha(out) == old


_SAFETENSORS_WRITER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from merge_callback.io import save_safetensors_atomic
    tensors = {f"w{i}": torch.full((1024, 1024), float(i)) for i in range(64)}
    print("ready", flush=True)
    while True:
        save_safetensors_atomic(sys.argv[1], tensors, {"note": "loop"})
""")


def test_killed_save_safetensors_atomic(tmp_path):
    target = tmp_path / "soup-step=100.safetensors"
    save_file({"w": torch.ones(3)}, str(target))
    old = _sha(target)
    proc = subprocess.Popen([sys.executable, "-c", _SAFETENSORS_WRITER, str(target)], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    tmp = tmp_path / f".{target.name}.tmp-{proc.pid}"
    assert proc.stdout.readline().strip() == "ready"
    # kill while the temporary file exists and the target is either the old or a complete file
    assert _wait_for(lambda: tmp.exists() and tmp.stat().st_size > 0, proc)
    _kill(proc)
    assert tmp.exists()                                   # the killed write's debris
    ok = _sha(target) == old or set(load_file(str(target))) == {f"w{i}" for i in range(64)}
    assert ok                                             # never a partial target
    assert remove_stale_temporaries(tmp_path) == [tmp]
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


_DIRECTORY_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from merge_callback.io import atomic_directory
    with atomic_directory(sys.argv[1]) as tmp:
        (Path(tmp) / "model.safetensors").write_bytes(b"x" * (8 << 20))
        print(tmp, flush=True)
        time.sleep(600)
""")


def test_killed_atomic_directory_and_live_writers_are_kept(tmp_path):
    folder = tmp_path / "soup-200"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"old")
    old = _sha(folder)
    procs = [subprocess.Popen([sys.executable, "-c", _DIRECTORY_WRITER, str(folder)], env=ENV,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    tmps = [Path(p.stdout.readline().strip()) for p in procs]
    assert all(t.is_dir() and temporary_owner(t.name) == p.pid for t, p in zip(tmps, procs))
    _kill(procs[0])
    try:
        # the dead writer's folder goes; the live writer's folder stays
        assert remove_stale_temporaries(tmp_path) == [tmps[0]]
        assert not tmps[0].exists() and tmps[1].is_dir()
        assert _sha(folder) == old
    finally:
        _kill(procs[1])
    assert remove_stale_temporaries(tmp_path) == [tmps[1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup-200"]


def test_replaced_folder_is_put_back_when_its_replacement_never_arrived(tmp_path):
    """A kill between 'move the old folder aside' and 'move the new one in' (atomic_directory's
    two renames) leaves ``.X.old-PID`` and no ``X``: the old folder is moved back."""
    pid = _dead_pid()
    aside = tmp_path / f".soup.old-{pid}"
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"the previous soup")
    half = tmp_path / f".soup.tmp-{pid}-abc123"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"complete new soup, never published")
    other = tmp_path / f".other.old-{pid}"          # replaced and replacement present: dropped
    other.mkdir()
    (tmp_path / "other").mkdir()
    unrelated = [tmp_path / ".soup.tmp-notapid", tmp_path / "soup.tmp-1", tmp_path / ".cache"]
    for p in unrelated:
        p.write_text("not ours")
    assert remove_stale_temporaries(tmp_path) == sorted([aside, half, other])
    assert (tmp_path / "soup" / "model.safetensors").read_bytes() == b"the previous soup"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["soup", "other"] + [p.name for p in unrelated])
    assert remove_stale_temporaries(tmp_path / "missing") == []
