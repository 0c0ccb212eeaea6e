"""Read the logged history of an offline W&B run (its ``run-*.wandb`` transaction log).

The log is a LevelDB-style record log: a 7-byte file header, then 32 KiB blocks of records, each
``<crc32:u32><length:u16><type:u8>`` + payload, where a protobuf ``Record`` may be split across
blocks (types FULL=1, FIRST=2, MIDDLE=3, LAST=4). Tests use it to check what a run logged.
"""

from __future__ import annotations

import json
import struct
import time
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


def records(run_dir: str | Path, timeout: float = 120.0) -> list:
    """The run's parsed ``Record`` protobufs, once its log is complete.

    W&B writes the log from its service process, which can still be flushing (the config, the
    last history rows) when ``wandb.finish()`` has returned, the more so on a loaded machine: read
    until the log holds its ``exit`` record, or ``timeout`` seconds have passed.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        (log,) = Path(run_dir).glob("run-*.wandb")
        parsed = []
        for payload in _payloads(log.read_bytes()):
            record = pb.Record()
            record.ParseFromString(payload)
            parsed.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in parsed) or time.monotonic() > deadline:
            return parsed
        time.sleep(0.2)


def history(run_dir: str | Path) -> list[dict]:
    """Every ``history`` row logged to the offline run in ``run_dir`` (key -> decoded value)."""
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records(run_dir) if r.WhichOneof("record_type") == "history"
    ]


def config(run_dir: str | Path) -> dict:
    """The run config the offline run recorded (its ``run`` and ``config`` records, merged)."""
    merged: dict = {}
    for r in records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind in ("config", "run"):
            updates = r.config.update if kind == "config" else r.run.config.update
            for item in updates:
                merged[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return merged
