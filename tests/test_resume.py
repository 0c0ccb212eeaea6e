"""Exact resume: a run restarted from a mid-epoch checkpoint trains on the batches, with the
optimizer, LR schedule and RNG states, that the uninterrupted run had after that step."""

from __future__ import annotations

import csv
import io
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from PIL import Image

from data_engine.synth import write_split
from tvc_lightning.cli import main
from tvc_lightning.data import resume
from tvc_lightning.data.datamodule import TVCDataModule
from tvc_lightning.data.dvr import DVRTransform
from tvc_lightning.data.resume import checkpoint_state, plan_resume, rng_state, set_rng_state
from tvc_lightning.data.schema import SampleRecord

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
# 12 samples in 3 shards of 4: each of 2 DataLoader workers gets 6 (one shard and half of another,
# a different half each epoch); max_length 560 drops one sample as too long, which its worker
# replaces by a repeat. An epoch is then 6 batches of 2, 3 from each worker.
MAX_LENGTH = 560


def _write_train(root: Path) -> Path:
    write_split(root, "train", 12, seed=0, per_shard=4, image_size=160)
    return root / "train"


# -- the stream: every resume point of an epoch, no model ----------------------------------------


def _datamodule(checkpoint: Path, shards: Path, workers: int) -> TVCDataModule:
    dm = TVCDataModule(str(checkpoint), str(shards), batch_size=2, num_workers=workers,
                       shuffle_buffer=3, max_length=MAX_LENGTH, max_pixels=50176,
                       dvr=DVRTransform(p=1.0, max_injections=2, pool_kernel=4))
    dm.setup("fit")
    return dm


def _consume(dm: TVCDataModule, epoch: int, limit: int | None = None):
    """Batches (as token id lists) of ``epoch`` taken the way the training loop takes them, and
    the data module's checkpoint state after each one."""
    dm.set_epoch(epoch)
    batches, states = [], []
    for batch in dm.train_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)
        batches.append(batch["input_ids"].tolist())
        states.append(dm.state_dict())
        if len(batches) == limit:
            break
    return batches, states


def test_every_mid_epoch_state_resumes_the_exact_remaining_batches(tmp_path, tiny_checkpoint):
    shards = _write_train(tmp_path)
    dm = _datamodule(tiny_checkpoint, shards, workers=2)
    for epoch in (0, 1):
        full, states = _consume(dm, epoch)
        assert len(full) == 6
        for k in range(1, len(full)):
            resumed = _datamodule(tiny_checkpoint, shards, workers=2)
            resumed.load_state_dict(states[k - 1])
            resumed.set_epoch(epoch)
            loader = resumed.train_dataloader()
            assert [b["input_ids"].tolist() for b in loader] == full[k:], f"epoch {epoch}, k={k}"
            if k == 1:  # the fast-forward happens once: the next epoch is whole (same workers)
                resumed.set_epoch(epoch + 1)
                again = [b["input_ids"].tolist() for b in loader]
                assert again == _consume(_datamodule(tiny_checkpoint, shards, 2), epoch + 1)[0]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (56, 84, 3), dtype=np.uint8)
                    ).save(buf, format="PNG")
    return buf.getvalue()


def _write_bad_shard(path: Path) -> None:
    good = SampleRecord(id="ok", question="How many?", answer="3",
                        response="I count 3. Wait, let me check. It is 3.").to_json()
    members = [("a.json", b"{not json"), ("a.png", _png(0)), ("b.json", good), ("b.png", _png(1)),
               ("c.json", good.replace(b'"ok"', b'"c"')), ("c.png", b"\x89PNG garbage"),
               ("d.json", good.replace(b'"ok"', b'"d"')), ("d.png", _png(2))]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_skip_counts_are_restored_and_the_fast_forward_does_not_count_again(tmp_path, tiny_checkpoint):
    shards = _write_train(tmp_path)
    _write_bad_shard(shards / "synth-bad.tar")
    dm = _datamodule(tiny_checkpoint, shards, workers=0)  # no read-ahead: counts are exact
    full, states = _consume(dm, 0)
    expected = dm.skip_counter.as_dict()
    assert expected["bad_json"] == expected["bad_image"] == expected["too_long"] == 1
    for k in (1, 3):
        resumed = _datamodule(tiny_checkpoint, shards, workers=0)
        resumed.load_state_dict(states[k - 1])
        assert [b["input_ids"].tolist() for b in resumed.train_dataloader()] == full[k:]
        assert resumed.skip_counter.as_dict() == expected
        assert resumed.train_dataset.padded.as_dict() == {"padded": 3}  # a, c and the too long one


def test_a_changed_topology_resumes_approximately_with_a_warning():
    position = resume.StreamPosition()
    for worker in (0, 1, 0):
        position.record(3, worker, 2)
    state = checkpoint_state(None, position, {"too_long": 5}, batch_size=4, workers=2)
    exact = plan_resume(state, rank=0, world=1, workers=2, batch_size=4, current_epoch=3)
    assert (exact.shift, exact.skips, exact.skipped) == (1, [8, 4], {"too_long": 5})
    assert plan_resume(state, 0, 1, 2, 4, current_epoch=4).skips == []  # Lightning moved on
    with pytest.warns(UserWarning, match="approximate resume"):
        other = plan_resume(state, rank=1, world=2, workers=3, batch_size=4, current_epoch=3)
    assert other.skips == [2, 2, 2] and other.skipped == {"too_long": 0}  # 12 samples / 6 readers


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.save({"rng": rng_state()}, tmp_path / "rng.pt")
    draws = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert draws[:2] == again[:2]
    torch.testing.assert_close(draws[2], again[2], rtol=0, atol=0)


# -- end to end: `fit` resumed from its checkpoints ----------------------------------------------


@pytest.fixture
def workdir(tmp_path, tiny_checkpoint, monkeypatch):
    """A working directory laid out as the tiny recipe expects (``outputs/tiny/...``)."""
    root = tmp_path / "outputs" / "tiny"
    shutil.copytree(tiny_checkpoint, root / "model")
    _write_train(root / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return tmp_path


def _fit(workdir: Path, name: str, max_steps: int, ckpt_path: str | None = None, accumulate: int = 1):
    """`fit` the tiny recipe (2 workers, batch 2, no validation) for ``max_steps``; the first run
    saves a checkpoint after every step. Returns ``{step: (loss, lr)}`` from a CSV log."""
    if ckpt_path is None:
        callbacks = ("  callbacks:\n"
                     "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                     "      init_args: {dirpath: ckpts, every_n_train_steps: 1, save_top_k: -1,"
                     " filename: '{step}'}\n")
    else:
        callbacks = "  callbacks: []\n  enable_checkpointing: false\n"
    config = workdir / f"{name}.yaml"
    config.write_text(
        f"trainer:\n  max_steps: {max_steps}\n  log_every_n_steps: 1\n"
        f"  accumulate_grad_batches: {accumulate}\n"
        "  enable_progress_bar: false\n  enable_model_summary: false\n"
        "  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n"
        f"    init_args: {{save_dir: logs, name: {name}, version: ''}}\n{callbacks}"
        f"data:\n  val_shards: null\n  batch_size: 2\n  num_workers: 2\n  max_length: {MAX_LENGTH}\n"
    )
    main(["fit", "--config", str(RECIPE), "--config", str(config)]
         + (["--ckpt_path", ckpt_path] if ckpt_path else []))
    with open(workdir / "logs" / name / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {int(r["step"]): (float(r["train/loss"]), float(r["train/lr"])) for r in rows}


def _assert_continues(full: dict, resumed: dict, k: int) -> None:
    assert sorted(resumed) == [s for s in sorted(full) if s >= k]
    torch.testing.assert_close(torch.tensor([resumed[s] for s in sorted(resumed)]),
                               torch.tensor([full[s] for s in sorted(resumed)]),
                               rtol=1e-6, atol=1e-7)


def test_fit_resumed_from_a_checkpoint_matches_the_uninterrupted_run(workdir, monkeypatch):
    full = _fit(workdir, "full", max_steps=9)  # epoch 0: steps 0-5, epoch 1: steps 6-8
    assert len(full) == 9
    # Mid-epoch (workers rotated), near the end of an epoch, at an epoch boundary, in the second
    # epoch.
    for k in (1, 4, 6, 7):
        _assert_continues(full, _fit(workdir, f"from{k}", 9, f"ckpts/step={k}.ckpt"), k)

    # DeepSpeed and FSDP restore the checkpoint only after the strategy's setup, where
    # configure_optimizers has already built the train DataLoader.
    with monkeypatch.context() as m:
        m.setattr(SingleDeviceStrategy, "restore_checkpoint_after_setup", property(lambda _: True))
        _assert_continues(full, _fit(workdir, "late", 9, "ckpts/step=4.ckpt"), 4)

    # The test can fail: without the fast-forward the resumed run trains on other batches.
    with monkeypatch.context() as m:
        m.setattr(resume.ResumePlan, "arm", lambda *args: None)
        with pytest.raises(AssertionError):
            _assert_continues(full, _fit(workdir, "noskip", 9, "ckpts/step=1.ckpt"), 1)


def test_resume_with_gradient_accumulation_keeps_the_token_windows(workdir):
    # 6 batches per epoch in windows of 4: steps 0-1 (the last one 2 batches), then epoch 1.
    full = _fit(workdir, "acc", max_steps=4, accumulate=4)
    assert sorted(full) == [0, 1, 2, 3]
    for k in (1, 2):  # before the epoch's short window; at the epoch boundary
        _assert_continues(full, _fit(workdir, f"acc{k}", 4, f"ckpts/step={k}.ckpt", accumulate=4), k)
