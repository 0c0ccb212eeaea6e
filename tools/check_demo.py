"""Check that the demo's W&B run holds a validation with PVC decoding and attention curves.

    python tools/check_demo.py outputs/tiny

Reads the newest offline W&B run under the folder (no W&B server needed) and exits 1, saying
what is missing, unless it logged PVC and plain accuracies, calibrations, and a visual-attention
curve with at least one measured (finite) bin whose original-image share is positive. `make demo`
and CI run it after the tiny fit.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/

from tests.wandb_history import history  # noqa: E402

REQUIRED = ("val/pvc_accuracy", "val/plain_accuracy", "val/pvc_calibrations_per_sample")
CURVE = "val/visual_attention/pvc_original_bin"


def main(root: str) -> int:
    runs = sorted(Path(root).rglob("offline-run-*"), key=lambda p: p.stat().st_mtime)
    if not runs:
        print(f"no offline W&B run under {root}: did the fit run with its W&B logger?", file=sys.stderr)
        return 1
    run = runs[-1]
    logged: dict[str, list[float]] = {}
    for row in history(run):
        for key, value in row.items():
            if isinstance(value, (int, float)):
                logged.setdefault(key, []).append(float(value))
    missing = [key for key in REQUIRED if key not in logged]
    bins = {k: v for k, v in logged.items() if k.startswith(CURVE)}
    measured = [x for values in bins.values() for x in values if math.isfinite(x)]
    if missing or not measured or max(measured) <= 0:
        print(f"{run}: no complete PVC validation logged; missing {missing}, "
              f"{len(bins)} attention-curve bins, {len(measured)} finite values", file=sys.stderr)
        return 1
    print(f"{run.name}: validation logged (pvc accuracy {logged['val/pvc_accuracy'][-1]:.3f}, "
          f"{logged['val/pvc_calibrations_per_sample'][-1]:.2f} calibrations per sample, "
          f"attention curve with {len(bins)} bins, original-image share up to {max(measured):.3f})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[1]))
