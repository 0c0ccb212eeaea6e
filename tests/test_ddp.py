"""Two CPU processes (DDP over gloo): fit + validation with PVC decoding completes in step, and
exact training epochs give both ranks equal shares of uneven shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from data_engine.synth import write_split
from tests.conftest import CALIBRATING, assert_pvc_calibrated
from tests.epoch_split_worker import cut_before, write_id_shards
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
         *CALIBRATING],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 7 validation samples over 2 ranks: 3 each, the odd one dropped so steps stay equal.
    assert "validation: 3 samples per rank x 2" in proc.stdout + proc.stderr
    (run_dir,) = (root / "wandb").glob("offline-run-*")  # rank 0 alone logs
    rows = history(run_dir)
    assert_pvc_calibrated(rows)
    keys = {k for row in rows for k in row}
    for key in ("train/loss", "val/loss", "val/pvc_accuracy", "val/plain_accuracy",
                "val/pvc_calibrations_per_sample", "data/skipped_bad_tar"):
        assert key in keys, key


def test_two_process_exact_epochs_on_uneven_shards(tmp_path):
    """Shards of 13, 2, 7 and a truncated 32 (18 readable) on 2 ranks x 2 workers: no hang, and
    every readable sample trained exactly once per epoch, half on each rank."""
    shards = tmp_path / "shards"
    ids = write_id_shards(shards, [13, 2, 7, 32])
    cut_before(shards / "shard-000003.tar", "s3-19.json")  # s3-18 cannot be known complete
    readable = [i for i in ids if not i.startswith("s3-") or int(i[3:]) < 18]
    assert len(readable) == 40  # 4 readers x 10: nothing dropped
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # A new session, so that a hung run's rank processes can all be killed.
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "epoch_split_worker.py"),
                             str(shards), str(out)], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        raise AssertionError(f"the 2-rank run hung:\n{log[-3000:]}") from None
    assert proc.returncode == 0, log[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    orders = []
    for epoch in ("0", "1"):
        per_rank = [ranks[r][epoch] for r in (0, 1)]
        assert [len(p) for p in per_rank] == [20, 20]  # equal steps: 10 batches of 2 per rank
        trained = per_rank[0] + per_rank[1]
        assert sorted(trained) == sorted(readable)  # each readable sample exactly once
        orders.append(trained)
    assert orders[0] != orders[1]  # a new permutation each epoch
