"""Lightning's DeepSpeedStrategy end to end on CPU (ZeRO-2, the 7B recipe's, and ZeRO-3, the
72B recipe's): the checkpoint loads under Lightning's and HF's nested ``zero.Init``, and with
gradient accumulation and clipping the per-batch losses equal a plain single-device run, which
shows the step's gradient is scaled right (DeepSpeed's engine divides by the accumulation on
top of Lightning) and the token windows follow DeepSpeed's steps."""

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


def test_zero2_and_zero3_train_like_a_single_device(tmp_path, tiny_checkpoint):
    write_split(tmp_path, "train", ACCUMULATE * STEPS, seed=0, per_shard=6, image_size=160)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = {}
    for stage in (0, 2, 3):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "deepspeed_worker.py"), str(tiny_checkpoint),
             str(tmp_path / "train"), str(stage), str(tmp_path)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        runs[stage] = json.loads((tmp_path / f"losses-{stage}.json").read_text())
    plain = runs[0]["losses"]
    assert len(plain) == ACCUMULATE * STEPS and plain[-1] < plain[0]
    assert not runs[0]["partitioned"] and not runs[2]["partitioned"] and runs[3]["partitioned"]
    for stage in (2, 3):
        # Equal to float rounding; without undoing DeepSpeed's extra division they differ ~1e-4.
        assert runs[stage]["losses"] == pytest.approx(plain, rel=2e-6), stage
