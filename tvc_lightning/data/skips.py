"""Counting what the data pipeline skips: named counters shared with DataLoader workers.

Bad input (a truncated tar, undecodable image, malformed or incomplete JSON, an over-long sample)
is skipped and counted, never fatal; the counts live in shared memory so that worker processes
increment the numbers the main process logs.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Sequence

SKIP_REASONS: tuple[str, ...] = ("bad_tar", "bad_json", "bad_record", "bad_image", "too_long")
# Locks made in a spawn context can be sent to spawned/forkserver workers and are inherited by
# forked ones, whereas a fork-context lock refuses to be pickled for a spawned worker.
_SHARED = mp.get_context("spawn")


class SkipCounter:
    """Named counters of skipped input, shared by the main process and its DataLoader workers.

    The counts live in a ``multiprocessing`` shared-memory array created where the counter is
    built (the main process), so forked workers inherit the same memory and spawned workers receive
    it when the DataLoader pickles the dataset to start them. (Like any ``multiprocessing``
    synchronized object it can only be pickled while a process is being started, so a plain
    ``pickle.dumps`` or ``copy.deepcopy`` of it raises ``RuntimeError``.)

    ``paused`` is a plain attribute, so it is local to each process: a DataLoader worker sets it
    while it fast-forwards over input that was already counted before a checkpoint
    (:mod:`tvc_lightning.data.resume`), without muting the other workers.
    """

    def __init__(self, reasons: Sequence[str] = SKIP_REASONS) -> None:
        if len(set(reasons)) != len(reasons) or not reasons:
            raise ValueError(f"reasons must be unique and non-empty, got {list(reasons)}")
        self.reasons: tuple[str, ...] = tuple(reasons)
        self._index = {r: i for i, r in enumerate(self.reasons)}
        self._counts = _SHARED.Array("q", len(self.reasons), lock=True)
        self.paused = False

    def add(self, reason: str, n: int = 1) -> None:
        """Count ``n`` skipped items under ``reason``; an unknown reason is a ``ValueError``."""
        i = self._index.get(reason)
        if i is None:
            raise ValueError(f"unknown skip reason {reason!r}; known: {', '.join(self.reasons)}")
        if self.paused:
            return
        with self._counts.get_lock():
            self._counts[i] += n

    def as_dict(self) -> dict[str, int]:
        """A snapshot of all counters, by reason."""
        with self._counts.get_lock():
            return dict(zip(self.reasons, self._counts[:], strict=True))

    def total(self) -> int:
        """All skipped items, every reason together."""
        return sum(self.as_dict().values())

    def restore(self, counts: dict[str, int]) -> None:
        """Set the counters to ``counts`` (from a checkpoint); reasons this counter lacks are ignored."""
        with self._counts.get_lock():
            for reason, n in counts.items():
                if reason in self._index:
                    self._counts[self._index[reason]] = int(n)

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


class SkipSample(Exception):
    """Raised by an ``encode`` callable to drop one sample; ``reason`` names the counter."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
