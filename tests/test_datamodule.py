"""TVCDataModule: bad records are skipped and counted while training goes on; exact epochs are
sized from what the shards hold readably."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from PIL import Image

from tests.epoch_split_worker import IdDataModule, cut_before, write_id_shards
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


@pytest.mark.filterwarnings("ignore:1 of 13 training samples are left out:UserWarning")
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
    # What the logs show: the skips, and the bad samples replaced by repeats (equal shares).
    logged = trainer.callback_metrics
    assert float(logged["data/skipped_bad_json"]) == 1
    assert float(logged["data/padded"]) == dm.train_dataset.padded.as_dict()["padded"] > 0
    # 6 good samples in the intact shard + those before the cut in the truncated one.
    assert trainer.global_step >= 3
    assert count_samples(str(shards)) >= 10  # headers of the intact shard at least


@pytest.mark.filterwarnings("ignore:1 of 13 training samples are left out:UserWarning")
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


def _trained_ids(dm: TVCDataModule, epoch: int) -> list[str]:
    dm.set_epoch(epoch)
    return [i for b in dm.train_dataloader() for i in dm.on_before_batch_transfer(b, 0)["ids"]]


def test_a_truncated_shard_sizes_the_epoch_by_what_is_readable(tmp_path):
    # 32 samples cut inside the 19th one's image: 18 readable (the 19th's is incomplete).
    only = tmp_path / "only"
    write_id_shards(only, [32])
    cut_before(only / "shard-000000.tar", "s0-18.png", inside=True)
    readable = sorted(f"s0-{j}" for j in range(18))
    assert count_samples(str(only)) == 18
    dm = IdDataModule("unused", str(only), batch_size=2, num_workers=0, shuffle_buffer=0)
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 9
    assert sorted(_trained_ids(dm, 0)) == readable
    assert dm.skip_counter.as_dict()["bad_tar"] == 1

    # Beside a good shard, both count; cut at a header this time (the 19th cannot be known
    # complete: its image may have been lost with the next member).
    both = tmp_path / "both"
    write_id_shards(both, [32, 6])
    cut_before(both / "shard-000000.tar", "s0-19.json")
    assert count_samples(str(both)) == 24
    dm = IdDataModule("unused", str(both), batch_size=2, num_workers=2, shuffle_buffer=4)
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 12
    assert sorted(_trained_ids(dm, 1)) == sorted(readable + [f"s1-{j}" for j in range(6)])


def test_the_dropped_remainder_and_the_bad_samples_keep_equal_shares_and_are_stated(tmp_path):
    shards = tmp_path / "d"
    ids = write_id_shards(shards, [5, 6], bad=frozenset({"s1-4"}))
    # Seed 1: the bad sample is in epoch 0's share, not in epoch 1's.
    dm = IdDataModule("unused", str(shards), batch_size=2, num_workers=2, shuffle_buffer=0,
                      train_samples=11, seed=1)
    dm.setup("fit")
    with pytest.warns(UserWarning) as warned:
        loader = dm.train_dataloader()
    messages = " | ".join(str(w.message) for w in warned)
    assert "3 of 11 training samples are left out of each epoch" in messages
    assert "data.train_samples=11, but the shards give 8 samples per epoch" in messages
    assert len(loader) == 4  # 2 workers x 4 samples, in batches of 2
    left_out, bad_in_share = [], []
    for epoch in (0, 1):
        with pytest.warns(UserWarning):
            got = _trained_ids(dm, epoch)
        assert len(got) == 8
        split = dm.train_dataset.split(2, epoch)
        share = {ids[i] for r in range(2) for i in split.sample_ids(r)}
        bad_in_share.append("s1-4" in share)
        # The bad sample, when in this epoch's share, is replaced by a repeat of a good one.
        assert set(got) == share - {"s1-4"}
        assert len(set(got)) == 8 - bad_in_share[-1]
        left_out.append(set(ids) - share)
    assert left_out[0] != left_out[1]  # a different remainder each epoch
    assert bad_in_share == [True, False]
    assert dm.skip_counter.as_dict()["bad_image"] == sum(bad_in_share)
    assert dm.train_dataset.padded.as_dict()["padded"] == sum(bad_in_share)


def test_packed_stream_is_the_padded_stream_packed_and_resumes_exactly(tmp_path, tiny_checkpoint):
    """``data.pack`` changes only how each batch's samples are laid out: the same samples per
    batch as padded batches (two workers), and a mid-epoch resume continues with the exact
    remaining packed batches."""
    from tests.test_resume import MAX_LENGTH, _write_train

    shards = _write_train(tmp_path)

    def datamodule(pack: bool) -> TVCDataModule:
        dm = TVCDataModule(str(tiny_checkpoint), str(shards), batch_size=2, num_workers=2,
                           shuffle_buffer=3, max_length=MAX_LENGTH, max_pixels=50176, pack=pack,
                           dvr=DVRTransform(p=1.0, max_injections=2, pool_kernel=4))
        dm.setup("fit")
        dm.set_epoch(1)
        return dm

    def samples(batch) -> list[list[int]]:
        real = batch["input_ids"][batch["attention_mask"].bool()]
        lengths = batch.get("sample_lengths", batch["attention_mask"].sum(-1))
        return sorted(part.tolist() for part in real.split(lengths.tolist()))

    padded = list(datamodule(False).train_dataloader())
    dm = datamodule(True)
    packed, states = [], []
    for batch in dm.train_dataloader():
        packed.append(dm.on_before_batch_transfer(batch, 0))
        states.append(dm.state_dict())
    assert len(packed) == len(padded) == 6
    assert [samples(b) for b in packed] == [samples(b) for b in padded]
    assert all(int(p["window_labels"]) == int(q["window_labels"]) for p, q in zip(packed, padded,
                                                                                  strict=True))
    for k in (1, 4):
        resumed = datamodule(True)
        resumed.load_state_dict(states[k - 1])
        rest = [b["input_ids"].tolist() for b in resumed.train_dataloader()]
        assert rest == [b["input_ids"].tolist() for b in packed[k:]], k
