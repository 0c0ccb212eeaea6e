"""Two CPU processes (DDP over gloo): fit + validation with PVC decoding completes in step."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from data_engine.synth import write_split
from tests.wandb_history import history

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_fit_and_pvc_validation(tmp_path, tiny_checkpoint):
    root = tmp_path / "outputs" / "tiny"
    shutil.copytree(tiny_checkpoint, root / "model")
    write_split(root / "data", "train", 32, seed=0, per_shard=8, image_size=160)
    write_split(root / "data", "val", 7, seed=0, per_shard=7, image_size=160)  # 7: uneven
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tvc_lightning", "fit", "--config", str(ROOT / "recipes" / "tiny.yaml"),
         "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
         "--trainer.enable_progress_bar", "false", "--data.num_workers", "1",
         "--model.generation.max_new_tokens", "24"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 7 validation samples over 2 ranks: 3 each, the odd one dropped so steps stay equal.
    assert "validation: 3 samples per rank x 2" in proc.stdout + proc.stderr
    (run_dir,) = (root / "wandb").glob("offline-run-*")  # rank 0 alone logs
    keys = {k for row in history(run_dir) for k in row}
    for key in ("train/loss", "val/loss", "val/pvc_accuracy", "val/plain_accuracy",
                "val/pvc_calibrations_per_sample", "data/skipped_bad_tar"):
        assert key in keys, key
