"""Lightning's DeepSpeedStrategy end to end on CPU (ZeRO-2, the 7B recipe's, on one process; ZeRO-3,
the 72B recipe's, on two): the checkpoint loads under Lightning's and HF's nested ``zero.Init``;
with gradient accumulation and clipping the per-batch losses equal a plain run (single device,
or DDP), which shows the step's gradient is scaled right (DeepSpeed's engine divides by the
accumulation on top of Lightning) and the token windows follow DeepSpeed's steps; validation
with PVC decoding completes with the ranks in step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_engine.synth import write_split
from tests.deepspeed_worker import ACCUMULATE, STEPS

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e .[dev])")

ROOT = Path(__file__).resolve().parents[1]


def test_zero2_and_zero3_train_like_plain_runs_and_validate_with_pvc(tmp_path, tiny_checkpoint):
    write_split(tmp_path, "train", 2 * ACCUMULATE * STEPS, seed=0, per_shard=6, image_size=160)
    write_split(tmp_path, "val", 4, seed=0, per_shard=4, image_size=160)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = {}
    for stage, devices in ((0, 1), (2, 1), (0, 2), (3, 2)):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "deepspeed_worker.py"), str(tiny_checkpoint),
             str(tmp_path), str(stage), str(devices), str(tmp_path)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        runs[stage, devices] = json.loads((tmp_path / f"{stage}-{devices}.json").read_text())
    for plain, deepspeed in (((0, 1), (2, 1)), ((0, 2), (3, 2))):
        expected = runs[plain]["losses"]
        assert len(expected) >= ACCUMULATE * STEPS and expected[-1] < expected[0]
        # Equal to float rounding; without undoing DeepSpeed's extra division they differ ~1e-4.
        assert runs[deepspeed]["losses"] == pytest.approx(expected, rel=2e-6), deepspeed
        assert "val/pvc_accuracy" in runs[deepspeed]["val"] and "val/loss" in runs[deepspeed]["val"]
        assert runs[deepspeed]["val"]["val/pvc_calibrations_per_sample"] == 1.0  # PVC re-injected
    assert runs[3, 2]["partitioned"] and not runs[2, 1]["partitioned"]
