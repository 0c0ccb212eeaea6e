"""What ``evaluate`` has decoded so far: append-only JSONL per rank, and the run's settings.

Every rank appends one line per decoded batch and mode (``{"mode", "rows": [one per item]}``) to
``OUT/progress/rank{R}.jsonl``, flushed and fsynced before the next batch starts: a run killed at
any moment loses at most the batch in flight, whole (a batch is never half recorded, so a restart
decodes it with the same items, and the answers equal an uninterrupted run's), and a restart
reads every rank file (whatever the earlier world size was) and skips what is there, so no item
is decoded twice. A line cut short by the kill is dropped when read, and cut off the file before
the rank appends again.

``OUT/run.json`` holds the settings that shape the answers (checkpoint, benchmark, prompt,
decoding); a restart that changes one of them is refused, naming each change, since its answers
would not belong with the ones already written. It also holds the scoring settings (the LLM
judge, ``--judge``/``--judge_model``): those only change how the stored answers are read, and
every run scores all of them afresh at its end, so a change there is accepted, announced as a
re-scoring, and recorded. Batch size, world size, ``--limit`` and the progress bar may change
between restarts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

Key = tuple[str, str]  # (mode, item id)


def progress_dir(out: Path) -> Path:
    return out / "progress"


def _parse(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The rows (with their ``mode``) of one progress file's complete lines, and how many lines
    were unreadable."""
    rows, bad = [], 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    torn = bool(data) and not data.endswith(b"\n")
    for i, line in enumerate(lines):
        if torn and i == len(lines) - 1:
            continue  # cut short by a kill (even if it parses): ProgressWriter removes it
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            # Only the last line of a file can be cut short by a kill; anything else is damage.
            if i != len(lines) - 1 or data.endswith(b"\n"):
                bad += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("rows"), list) and "mode" in row:
            rows.extend({**r, "mode": row["mode"]} for r in row["rows"])
        else:
            bad += 1
    return rows, bad


def read_done(out: Path) -> dict[Key, dict[str, Any]]:
    """Every row written so far, by ``(mode, id)``, from all rank files; the first row of a key
    wins (a key is only ever written once, unless rank files of two unrelated runs were mixed).
    Raises ``ValueError`` naming the file if a line other than a file's last is unreadable."""
    done: dict[Key, dict[str, Any]] = {}
    folder = progress_dir(out)
    for path in sorted(folder.glob("rank*.jsonl")) if folder.is_dir() else []:
        rows, bad = _parse(path)
        if bad:
            raise ValueError(f"{path}: {bad} unreadable line(s) before its end: the progress "
                             "file is damaged; remove it to decode its items again")
        for row in rows:
            done.setdefault((str(row["mode"]), str(row["id"])), row)
    return done


class ProgressWriter:
    """Appends rows to this rank's progress file, durably (flush + fsync per batch)."""

    def __init__(self, out: Path, rank: int) -> None:
        folder = progress_dir(out)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank{rank}.jsonl"
        self._repair_tail()
        self._file = self.path.open("ab")

    def _repair_tail(self) -> None:
        # A kill mid-write leaves a partial last line; appending after it would glue the next
        # row onto it. Only this rank ever writes this file, so cutting it here is safe.
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    @staticmethod
    def encode(mode: str, rows: Iterable[dict[str, Any]]) -> bytes:
        """One batch's line: its rows (each with ``id``) under ``mode``."""
        line = {"mode": mode, "rows": [{k: v for k, v in r.items() if k != "mode"} for r in rows]}
        return (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")

    def write(self, mode: str, rows: Iterable[dict[str, Any]]) -> None:
        """Record one decoded batch of ``mode``, durably, as one line."""
        self._file.write(self.encode(mode, rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def check_run_settings(out: Path, settings: dict[str, Any], write: bool,
                       rescoring: Collection[str] = ()) -> list[str]:
    """Compare ``settings`` with ``OUT/run.json`` from an earlier run; raise ``ValueError``
    listing what changed, except for the keys in ``rescoring`` (scoring settings), whose changes
    are returned (``"key: old -> new"``) and, with ``write`` (rank 0), recorded. Without a file,
    ``write`` creates it."""
    path = out / "run.json"
    normalized = json.loads(json.dumps(settings))  # tuples as lists, as read back
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        keys = sorted(set(before) | set(normalized))
        changed = [k for k in keys if before.get(k) != normalized.get(k)]
        refused = [f"{k}: {before.get(k)!r} -> {normalized.get(k)!r}"
                   for k in changed if k not in rescoring]
        if refused:
            raise ValueError(
                f"--out {out} holds an evaluation run with other settings ({path}); its answers "
                "would be mixed with this run's. Changed: " + "; ".join(refused)
                + ". Use another --out, or remove that folder to start afresh.")
        if not changed:
            return []
        if write:
            _write_settings(path, normalized)
        return [f"{k}: {before.get(k)!r} -> {normalized.get(k)!r}" for k in changed]
    if write:
        out.mkdir(parents=True, exist_ok=True)
        _write_settings(path, normalized)
    return []


def _write_settings(path: Path, settings: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
