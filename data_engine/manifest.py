"""Shards plus a manifest that make a killed and restarted run produce every record exactly once.

The manifest (JSON lines) has one entry per finished question: ``{"key", "outcome", ...,
"shard"}`` where ``shard`` names the shard holding its record (``null`` when nothing was kept).
The invariant is *an entry counts only if its shard exists*:

- a kept record's entry is appended, flushed and fsynced **before** its shard is renamed from
  ``NAME.tar.tmp`` to ``NAME.tar``; a crash between the two leaves an entry naming a shard that
  never appeared, so the entry is ignored and the question is done again;
- a crash before the entry leaves only a ``.tmp`` shard, deleted at the next start;
- every run writes shards under a fresh run number (``PREFIX-rNNN-000000.tar``), so a shard name
  that a dead run's entries point to is never created later by another run;
- a rejected question has no shard: its entry is written at once.

A torn last line (a kill during the write) is ignored and newline-terminated before appending.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from data_engine.shards import ImageInput, ShardWriter
from tvc_lightning.data.schema import SampleRecord


class _PublishingWriter(ShardWriter):
    """A :class:`ShardWriter` that calls ``before_publish(final_path)`` before each rename."""

    def __init__(self, *args: Any, before_publish: Callable[[Path], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._before_publish = before_publish

    def _finish_shard(self) -> None:
        self._before_publish(self._shard_path(len(self.shards)))
        super()._finish_shard()


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """All complete entries of a manifest file (none if it does not exist)."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill: its question is simply not done
        if isinstance(entry, dict) and isinstance(entry.get("key"), str):
            entries.append(entry)
    return entries


class ResumableOutput:
    """Shards ``{prefix}-rNNN-XXXXXX.tar`` in ``out_dir`` and the manifest ``manifest_path``.

    :attr:`done` maps the keys finished by earlier runs to their (valid) manifest entries; call
    :meth:`add_kept` / :meth:`add_rejected` for each newly finished key, then :meth:`close`.
    """

    def __init__(self, out_dir: Path, prefix: str, manifest_path: Path, maxcount: int = 1000,
                 maxsize: int = 1 << 30) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.manifest_path = Path(manifest_path)
        shard_re = re.compile(rf"^{re.escape(prefix)}-r(\d{{3,}})-\d{{6}}\.tar(\.tmp)?$")
        runs = [-1]
        for p in self.out_dir.iterdir():
            m = shard_re.match(p.name)
            if m:
                runs.append(int(m.group(1)))
                if m.group(2):
                    p.unlink()  # a killed run's unfinished shard: its questions are redone
        self.done: dict[str, dict[str, Any]] = {}
        for entry in read_manifest(self.manifest_path):
            shard = entry.get("shard")
            m = shard_re.match(shard) if isinstance(shard, str) else None
            if m:
                runs.append(int(m.group(1)))
            if shard is None or (isinstance(shard, str) and (self.out_dir / shard).is_file()):
                self.done[entry["key"]] = entry
        self.run = max(runs) + 1
        self._pending: list[dict[str, Any]] = []
        self._manifest = self.manifest_path.open("a+", encoding="utf-8")
        self._manifest.seek(0, os.SEEK_END)
        if self._manifest.tell():
            self._manifest.seek(self._manifest.tell() - 1)
            if self._manifest.read(1) != "\n":
                self._manifest.write("\n")  # end the torn line so the next entry parses
        self._writer = _PublishingWriter(
            self.out_dir, f"{prefix}-r{self.run:03d}", maxcount=maxcount, maxsize=maxsize,
            before_publish=self._commit,
        )

    @property
    def shards(self) -> list[Path]:
        """Every shard of this prefix in ``out_dir``, earlier runs' included, in name order."""
        pattern = re.compile(rf"^{re.escape(self.prefix)}-r\d{{3,}}-\d{{6}}\.tar$")
        return sorted(p for p in self.out_dir.iterdir() if pattern.match(p.name))

    def add_kept(self, entry: dict[str, Any], sample_key: str, record: SampleRecord,
                 images: Sequence[ImageInput]) -> None:
        """Write ``record``; its entry goes to the manifest when its shard is complete."""
        # write() may first finish the previous shard, committing the entries pending so far:
        # so the entry is added only after, and belongs to the shard this record is in.
        self._writer.write(sample_key, record, images)
        self._pending.append(dict(entry))

    def add_rejected(self, entry: dict[str, Any]) -> None:
        self._append([{**entry, "shard": None}])

    def _commit(self, shard: Path) -> None:
        self._append([{**e, "shard": shard.name} for e in self._pending])
        self._pending.clear()

    def _append(self, entries: list[dict[str, Any]]) -> None:
        if not entries:
            return
        self._manifest.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
        self._manifest.flush()
        os.fsync(self._manifest.fileno())
        for e in entries:
            self.done[e["key"]] = e

    def close(self) -> None:
        """Publish the open shard (and its entries) and close the manifest."""
        try:
            self._writer.close()
        finally:
            self._manifest.close()

    def abort(self) -> None:
        """Drop the open shard: its questions were never committed and will be redone."""
        try:
            self._writer.__exit__(RuntimeError, RuntimeError("aborted"), None)
        finally:
            self._pending.clear()
            self._manifest.close()

    def __enter__(self) -> ResumableOutput:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
