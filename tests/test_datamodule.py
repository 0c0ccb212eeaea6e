"""TVCDataModule: bad records are skipped and counted while training goes on."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
from PIL import Image

from tvc_lightning.data.datamodule import TVCDataModule, count_samples
from tvc_lightning.data.dvr import DVRTransform
from tvc_lightning.data.schema import SampleRecord
from tvc_lightning.module import TVCModule


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _good(i: int) -> bytes:
    return SampleRecord(id=f"g{i}", question="How many squares?", answer="3",
                        response=f"I count {i} things. Wait, let me check. It is 3.").to_json()


def _write_shards(root: Path) -> None:
    root.mkdir(parents=True)
    with tarfile.open(root / "a-000000.tar", "w") as tar:
        for i in range(6):
            _add(tar, f"g{i}.json", _good(i))
            _add(tar, f"g{i}.png", _png(i))
        _add(tar, "badjson.json", b"{not json")
        _add(tar, "badjson.png", _png(9))
        _add(tar, "nofield.json", b'{"id": "x", "question": "q"}')
        _add(tar, "nofield.png", _png(9))
        _add(tar, "badimg.json", _good(100).replace(b'"g100"', b'"badimg"'))
        _add(tar, "badimg.png", b"\x89PNG garbage")
        long = SampleRecord(id="long", question="q", answer="1", response="word " * 2000)
        _add(tar, "long.json", long.to_json())
        _add(tar, "long.png", _png(3))
    with tarfile.open(root / "a-000001.tar", "w") as tar:
        for i in range(6, 12):
            _add(tar, f"g{i}.json", _good(i))
            _add(tar, f"g{i}.png", _png(i))
    data = (root / "a-000001.tar").read_bytes()
    (root / "a-000001.tar").write_bytes(data[: len(data) // 2 + 100])  # truncated mid-member


def test_bad_records_are_skipped_counted_and_training_continues(tmp_path, tiny_checkpoint):
    shards = tmp_path / "train"
    _write_shards(shards)
    dm = TVCDataModule(str(tiny_checkpoint), str(shards), batch_size=2, num_workers=1,
                       shuffle_buffer=0, max_length=512, dvr=DVRTransform(p=1.0, pool_kernel=2))
    module = TVCModule(str(tiny_checkpoint), lr=1e-3)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    counts = dm.skip_counter.as_dict()
    assert counts["bad_json"] == 1
    assert counts["bad_record"] == 1
    assert counts["bad_image"] == 1
    assert counts["too_long"] == 1
    assert counts["bad_tar"] == 1
    # 6 good samples in the intact shard + those before the cut in the truncated one.
    assert trainer.global_step >= 3
    assert count_samples(str(shards)) >= 10  # headers of the intact shard at least


def test_the_stream_follows_the_trainers_epoch(tmp_path, tiny_checkpoint):
    shards = tmp_path / "train"
    _write_shards(shards)
    dm = TVCDataModule(str(tiny_checkpoint), str(shards), batch_size=2, num_workers=1,
                       shuffle_buffer=0, max_length=512)
    seen_epochs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen_epochs.append(dm.train_dataset.epoch)

    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[Record()])
    trainer.fit(TVCModule(str(tiny_checkpoint), lr=1e-3), datamodule=dm)
    assert seen_epochs[0] == 0 and seen_epochs[-1] == 1  # DVR and shuffling are reseeded per epoch


def test_label_windows_follow_the_optimizer_steps():
    from types import SimpleNamespace

    import torch

    from tvc_lightning.data.datamodule import TVCDataModule
    from tvc_lightning.data.resume import WINDOW_LABELS_KEY, StepWindows, label_windows

    def batch(labelled: int) -> dict:
        labels = torch.full((1, 10), -100)
        labels[0, : 1 + labelled] = 7  # position 0 never counts: nothing predicts it
        return {"labels": labels}

    def counts(sizes: list[int], windows: StepWindows) -> list[int]:
        return [int(b[WINDOW_LABELS_KEY]) for b in label_windows(iter([batch(n) for n in sizes]), windows)]

    sizes = [3, 4, 1, 2, 5, 6, 1]
    assert counts(sizes, StepWindows(size=2)) == [7, 7, 3, 3, 11, 11, 1]
    # Lightning forces a step after the epoch's last trained batch (limit_train_batches 5).
    assert counts(sizes, StepWindows(size=3, limit=5))[:5] == [8, 8, 8, 7, 7]
    # A resumed epoch, 4 batches done, windows of 3: batches 4-5 finish the window 3-5.
    assert counts(sizes[4:], StepWindows(size=3, done=4)) == [11, 11, 1]
    # DeepSpeed counts steps from its restart: batches 4-6.
    assert counts(sizes[4:], StepWindows(size=3, done=4, start=4)) == [12, 12, 12]

    def windows(strategy_accumulates: bool) -> StepWindows:
        dm = TVCDataModule.__new__(TVCDataModule)
        progress = SimpleNamespace(current=SimpleNamespace(ready=4))
        dm.trainer = SimpleNamespace(
            accumulate_grad_batches=3, num_training_batches=7,
            fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
            strategy=SimpleNamespace(handles_gradient_accumulation=strategy_accumulates))
        return dm._step_windows()

    assert windows(False) == StepWindows(size=3, done=4, limit=7)
    assert windows(True) == StepWindows(size=3, done=4, start=4)
