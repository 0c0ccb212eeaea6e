"""Read the logged history of an offline W&B run (its ``run-*.wandb`` transaction log).

The log is a LevelDB-style record log: a 7-byte file header, then 32 KiB blocks of records, each
``<crc32:u32><length:u16><type:u8>`` + payload, where a protobuf ``Record`` may be split across
blocks (types FULL=1, FIRST=2, MIDDLE=3, LAST=4). Tests use it to check what a run logged.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32768
_HEADER = 7


def _payloads(data: bytes):
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - (pos % _BLOCK)
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def history(run_dir: str | Path) -> list[dict]:
    """Every ``history`` row logged to the offline run in ``run_dir`` (key -> decoded value)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = Path(run_dir).glob("run-*.wandb")
    rows = []
    for payload in _payloads(log.read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            })
    return rows
