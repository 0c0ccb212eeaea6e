"""TVCDataModule: long-CoT samples from WebDataset shards, DVR-transformed and tokenized on the fly."""

from __future__ import annotations

import math
import tarfile
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from tvc_lightning.data.collate import Collator
from tvc_lightning.data.dvr import DVRTransform
from tvc_lightning.data.resume import (
    POSITION_KEY,
    ResumableLoader,
    ResumableStream,
    ResumePlan,
    StepWindows,
    StreamPosition,
    TaggedCollate,
    checkpoint_state,
    plan_resume,
)
from tvc_lightning.data.schema import SampleRecord
from tvc_lightning.data.shards import (
    ShardDataset,
    SkipCounter,
    SkipSample,
    dist_rank_world,
    load_split,
    resolve_urls,
)
from tvc_lightning.data.tokenize import ChatFormat, SampleEncoder
from tvc_lightning.hf import load_processor


class TVCDataModule(L.LightningDataModule):
    """WebDataset shards -> DVR transform -> tokenize -> padded batches.

    Training streams shards (split across ranks and DataLoader workers, shuffled, decoded safely,
    bad records skipped and counted in ``skip_counter``). Validation is a finite split read once
    and divided equally across ranks, so every rank runs the same number of steps.

    Resuming from a checkpoint continues the training stream exactly where it stopped, mid-epoch
    included: the checkpoint holds each worker's position in the epoch and the skip counts, and the
    workers fast-forward through their regenerated streams (see :mod:`tvc_lightning.data.resume`).

    Args:
        model_name_or_path: Checkpoint whose tokenizer and image processor encode the samples
            (linked to ``model.model_name_or_path`` by the CLI).
        train_shards: Training shards: a directory of ``.tar`` files, a brace pattern
            (``data/train-{000000..000127}.tar``), a glob, or URLs (``s3://``, ``pipe:``).
        val_shards: Validation shards (same forms); none disables validation.
        predict_shards: Shards to answer with ``predict`` (default: ``val_shards``).
        batch_size: Samples per device per step.
        num_workers: DataLoader worker processes per device.
        shuffle_buffer: Sample shuffle buffer per worker (0: shard order shuffle only).
        resampled: Draw shards with replacement forever (epochs are ``train_samples`` long); use
            it on many GPUs, where equal step counts per rank matter more than exact coverage.
        train_samples: Samples per epoch; counted from the shards when they are local files.
        max_length: Samples longer than this many tokens (after DVR) are skipped and counted.
        min_pixels: Override of the image processor's minimum pixels per image.
        max_pixels: Override of the image processor's maximum pixels per image (TVC: 512*512).
        question_suffix: Text appended to every question (e.g. TVC's long-reasoning instruction).
        dvr: The DVR transform; ``dvr.p: 0`` trains plain SFT on the same data.
        seed: Seed of shard order, shuffle buffer and DVR choices.
        pad_to_multiple_of: Round padded batch length up to a multiple of this.
    """

    def __init__(
        self,
        model_name_or_path: str,
        train_shards: str,
        val_shards: str | None = None,
        predict_shards: str | None = None,
        batch_size: int = 1,
        num_workers: int = 2,
        shuffle_buffer: int = 256,
        resampled: bool = False,
        train_samples: int | None = None,
        max_length: int = 8192,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        question_suffix: str = "",
        dvr: DVRTransform | None = None,
        seed: int = 0,
        pad_to_multiple_of: int = 1,
    ) -> None:
        super().__init__()
        self.model_name_or_path = model_name_or_path
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.predict_shards = predict_shards
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.train_samples = train_samples
        self.max_length = max_length
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.question_suffix = question_suffix
        self.dvr = dvr if dvr is not None else DVRTransform()
        self.seed = seed
        self.pad_to_multiple_of = pad_to_multiple_of
        self.skip_counter = SkipCounter()
        self.encoder: SampleEncoder | None = None
        self.train_dataset: ShardDataset | None = None
        self.val_records: list[tuple[SampleRecord, list[Any]]] = []
        self.val_dataset: Dataset | None = None
        self.predict_items: list[dict[str, Any]] | None = None
        self.resume_plan = ResumePlan(num_workers)
        self._position = StreamPosition()
        self._resume_state: dict[str, Any] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.encoder is None:
            processor = load_processor(self.model_name_or_path, self.min_pixels, self.max_pixels)
            self.processor = processor
            self.encoder = SampleEncoder(
                processor, max_length=self.max_length, dvr=self.dvr,
                chat=ChatFormat(question_suffix=self.question_suffix),
            )
            self.collator = Collator(processor.tokenizer.pad_token_id, self.pad_to_multiple_of)
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = ShardDataset(
                self.train_shards, self.encoder, self.skip_counter,
                shuffle_buffer=self.shuffle_buffer, seed=self.seed, resampled=self.resampled,
            )
            if self.train_samples is None:
                self.train_samples = count_samples(self.train_shards)
        if stage in (None, "fit", "validate") and self.val_shards and self.val_dataset is None:
            self._setup_val()
        if stage == "predict" and self.predict_items is None:
            self._setup_predict()

    def _setup_predict(self) -> None:
        urls = self.predict_shards or self.val_shards
        if not urls:
            raise ValueError("predict needs data.predict_shards (or data.val_shards)")
        rank, world = dist_rank_world()
        records = load_split(urls, SkipCounter(), world_size=1, rank=0)
        if not records:
            raise ValueError(f"data.predict_shards={urls!r}: no usable samples")
        mine = records[rank::world]
        filler = (mine or records)[0]
        # Every rank decodes the same number of batches (ZeRO-3 forwards are collective):
        # short ranks repeat a sample, flagged so that it is not written.
        per_rank = -(-len(records) // world)
        items = [{"record": r, "images": im, "pad": False} for r, im in mine]
        items += [{"record": filler[0], "images": filler[1], "pad": True}] * (per_rank - len(mine))
        self.predict_items = items

    def _setup_val(self) -> None:
        rank, world = dist_rank_world()
        val_counter = SkipCounter()
        # Read the whole split on every rank (it is small), encode it, then divide it equally:
        # skipping happens before the division so the ranks' step counts stay equal.
        records = load_split(self.val_shards, val_counter, world_size=1, rank=0)
        encoded, kept = [], []
        for record, images in records:
            try:
                encoded.append(self.encoder(record, images, 0))  # type: ignore[misc]
                kept.append((record, images))
            except SkipSample as skip:
                val_counter.add(skip.reason)
        per_rank = len(encoded) // world
        if per_rank == 0:
            raise ValueError(
                f"data.val_shards={self.val_shards!r}: {len(encoded)} usable samples for "
                f"{world} ranks (skipped: {val_counter.as_dict()})"
            )
        picks = range(rank, per_rank * world, world)
        self.val_records = [kept[i] for i in picks]
        self.val_dataset = _ListDataset([encoded[i] for i in picks])
        rank_zero_info(
            f"validation: {per_rank} samples per rank x {world}; skipped {val_counter.as_dict()}"
        )

    def set_epoch(self, epoch: int) -> None:
        """Reseed shard order, shuffle and DVR for ``epoch``, for use without a Trainer (under one,
        the train loader reads the trainer's epoch as each epoch starts)."""
        if self.train_dataset is not None:
            self.train_dataset.set_epoch(epoch)

    def train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None, "setup('fit') first"
        _, world = dist_rank_world()
        length = max(1, (self.train_samples or 0) // world)
        return ResumableLoader(
            ResumableStream(self.train_dataset, length, self.resume_plan),
            on_start=self._start_train_epoch, collate_fn=TaggedCollate(self.collator),
            **self._loader_args(self.num_workers),
        )

    def _start_train_epoch(self) -> StepWindows:
        """Set the epoch (and on resume, the fast-forward) just before the workers start reading;
        returns how the epoch's batches fall into optimizer steps.

        The trainer's epoch is the one to read: Lightning calls no ``on_train_epoch_start`` for an
        epoch it resumes, and sets its epoch only after it created the first iterator.
        """
        assert self.train_dataset is not None
        epoch = self.trainer.current_epoch if self.trainer is not None else self.train_dataset.epoch
        self.resume_plan.disarm()
        if self._resume_state is not None:
            rank, world = dist_rank_world()
            resume = plan_resume(self._resume_state, rank, world, self.num_workers,
                                 self.batch_size, epoch)
            self._resume_state = None
            self.skip_counter.restore(resume.skipped)
            if resume.skips:
                self.resume_plan.arm(epoch, resume.shift, resume.skips)
            rank_zero_info(f"resuming the training stream in epoch {epoch}: rank 0 skips "
                           f"{sum(resume.skips)} samples already trained on")
        self.train_dataset.set_epoch(epoch)
        return self._step_windows()

    def _step_windows(self) -> StepWindows:
        trainer = self.trainer
        if trainer is None:
            return StepWindows()
        size = trainer.accumulate_grad_batches
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # > 0 in a resumed epoch
        if trainer.strategy.handles_gradient_accumulation:
            # DeepSpeed's engine steps every `size` micro-batches counted from its (re)start,
            # across epochs, and forces no step at an epoch's end.
            return StepWindows(size, done, start=done)
        limit = trainer.num_training_batches  # Lightning steps after the epoch's last batch
        return StepWindows(size, done, limit=int(limit) if math.isfinite(limit) else None)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, 0)

    def predict_dataloader(self) -> DataLoader:
        assert self.predict_items is not None, "setup('predict') first"
        return DataLoader(_ListDataset(self.predict_items), batch_size=self.batch_size,
                          collate_fn=list)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called as the training loop takes each batch (not when the DataLoader prefetches it):
        # the consumed batches are the stream position a checkpoint must record.
        if isinstance(batch, dict) and POSITION_KEY in batch:
            epoch, worker = batch.pop(POSITION_KEY).tolist()
            self._position.record(epoch, worker, self.resume_plan.workers)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Stream position and skip counts of every rank (collective: all ranks call it)."""
        return checkpoint_state(self.trainer, self._position, self.skip_counter.as_dict(),
                                self.batch_size, self.num_workers)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's stream state until the first training batch is requested
        (Lightning may call this before or after :meth:`train_dataloader`, by strategy)."""
        self._resume_state = state_dict

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, list):
            return batch  # predict's raw samples (records, PIL images): the decoder moves tensors
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _loader(self, dataset: Dataset, workers: int) -> DataLoader:
        return DataLoader(dataset, collate_fn=self.collator, **self._loader_args(workers))

    def _loader_args(self, workers: int) -> dict[str, Any]:
        return dict(
            batch_size=self.batch_size, num_workers=workers, persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            # Without a generator, creating an iterator draws from the global torch RNG: a resumed
            # run would create its first one at another point of the RNG stream than the original.
            generator=torch.Generator().manual_seed(self.seed),
        )


class _ListDataset(Dataset):
    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def count_samples(urls: str) -> int:
    """Samples (distinct keys with a ``.json`` member) in local shards; reads tar headers only."""
    paths = resolve_urls(urls)
    keys: set[tuple[str, str]] = set()
    for path in paths:
        if "://" in path or path.startswith("pipe:"):
            raise ValueError(
                f"data.train_shards={urls!r} is remote: set data.train_samples to the epoch length"
            )
        try:
            with tarfile.open(path) as tar:
                for name in tar.getnames():
                    if name.endswith(".json"):
                        keys.add((path, name[: -len(".json")]))
        except (tarfile.TarError, OSError):
            continue  # unreadable shards are counted as bad_tar when the stream reaches them
    if not keys:
        raise FileNotFoundError(f"data.train_shards={urls!r}: no samples found")
    return len(keys)
