"""Read the history rows of an offline W&B run (``wandb/offline-run-*/run-*.wandb``).

wandb 0.31 writes no summary file for offline runs and has no public reader, so this decodes the
record log (LevelDB-style 32 KiB blocks of protobuf ``Record``s) the way ``wandb sync`` does.
"""

from __future__ import annotations

import glob
import json
import struct
import time


def read_records(path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B record log"
    off, buf = 7, b""
    while off + 7 <= len(data):
        left = 32768 - off % 32768
        if left < 7:
            off += left
            continue
        _crc, n, typ = struct.unpack("<IHB", data[off:off + 7])
        if typ == 0:
            off += left
            continue
        chunk, off = data[off + 7:off + 7 + n], off + 7 + n
        buf = chunk if typ in (1, 2) else buf + chunk  # FULL/FIRST start, MIDDLE/LAST append
        if typ in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def history_rows(root, timeout: float = 60.0) -> list[dict]:
    """All history rows of the single offline run under ``root``.

    The record log is written by W&B's service process; on a loaded machine it can lag behind
    ``finish()``, so this waits (up to ``timeout`` seconds) for the run's exit record.
    """
    (path,) = glob.glob(f"{root}/**/offline-run-*/run-*.wandb", recursive=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(read_records(path))
        except Exception:  # noqa: BLE001 - a block being written; read again
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or \
                time.monotonic() > deadline:
            break
        time.sleep(0.5)
    rows = []
    for rec in records:
        if rec.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in rec.history.item:
            keys = [item.key] if item.key else list(item.nested_key)
            d = row
            for k in keys[:-1]:
                d = d.setdefault(k, {})
            d[keys[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows
