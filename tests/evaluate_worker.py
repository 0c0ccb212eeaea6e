"""Runs ``python -m tvc_lightning evaluate ARGS`` and SIGKILLs itself after N progress writes.

``python tests/evaluate_worker.py N [--torn] -- ARGS...``: the first N batches are written as
usual; at the next one the process kills itself with SIGKILL (no cleanup, no flush, as a node
failure or the OOM killer would), after writing the first half of that batch's bytes when
``--torn`` is given (a line cut mid-way, as a kill during the write leaves it).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tvc_lightning.cli import main  # noqa: E402
from tvc_lightning.evaluate import progress  # noqa: E402


def arm(kill_after: int, torn: bool) -> None:
    original = progress.ProgressWriter.write
    calls = {"n": 0}

    def write(self: progress.ProgressWriter, mode: str, rows: list) -> None:
        if calls["n"] >= kill_after:
            if torn:
                data = self.encode(mode, rows)
                self._file.write(data[: len(data) // 2])
                self._file.flush()
                os.fsync(self._file.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        calls["n"] += 1
        original(self, mode, rows)

    progress.ProgressWriter.write = write  # type: ignore[method-assign]


if __name__ == "__main__":
    split = sys.argv.index("--")
    options, args = sys.argv[1:split], sys.argv[split + 1:]
    arm(int(options[0]), "--torn" in options)
    main(["evaluate", *args])
