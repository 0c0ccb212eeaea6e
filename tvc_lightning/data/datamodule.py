"""TVCDataModule: long-CoT samples from WebDataset shards, DVR-transformed and tokenized on the fly."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from tvc_lightning.data.collate import Collator
from tvc_lightning.data.dvr import DVRTransform
from tvc_lightning.data.epochs import ShardIndex, index_shards
from tvc_lightning.data.packing import PackingCollator
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

log = logging.getLogger(__name__)


class TVCDataModule(L.LightningDataModule):
    """WebDataset shards -> DVR transform -> tokenize -> padded (or packed) batches.

    Training streams shards in exact epochs: each epoch is a new permutation of every readable
    sample, cut into equal shares for the ranks and their DataLoader workers, so every rank takes
    the same number of steps and sees each sample once (see :mod:`tvc_lightning.data.epochs`).
    Samples are decoded safely; bad records are skipped and counted in ``skip_counter``, and
    replaced by repeats of the reader's good samples (counted as ``padded``) so the shares stay
    equal. Validation is a finite split read once and divided equally across ranks.

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
        shuffle_buffer: Sample shuffle buffer per worker (0: the epoch's shard order and tar
            order within shards).
        resampled: Instead of exact epochs, draw shards with replacement forever, each reader
            independently (epochs are ``train_samples`` long and see only part of the data); for
            remote shards, whose sample counts cannot be read from local tar headers.
        train_samples: Exact epochs: the samples per epoch the run is planned for, checked against
            the shards' index (a warning if it differs; the index wins). Resampled: the epoch
            length (default: counted from local shards).
        max_length: Samples longer than this many tokens (after DVR) are skipped and counted.
        min_pixels: Override of the image processor's minimum pixels per image.
        max_pixels: Override of the image processor's maximum pixels per image (TVC: 512*512).
        question_suffix: Text appended to every question (e.g. TVC's long-reasoning instruction).
        dvr: The DVR transform; ``dvr.p: 0`` trains plain SFT on the same data.
        seed: Seed of the epochs' shard order and sample permutation, of the shuffle buffer
            and of the DataLoader's generator. DVR choices have their own seed, ``dvr.seed``.
        pad_to_multiple_of: Round padded batch length up to a multiple of this.
        pack: Padding-free batches: each batch's ``batch_size`` samples are packed into rows of
            at most ``max_length`` tokens (the layout with the fewest token slots), each sample
            attending only to itself (see :mod:`tvc_lightning.data.packing`). A step still
            takes ``batch_size`` samples, so step counts, resume and the token-normalized loss
            are those of padded batches; raise ``batch_size`` (and lower
            ``trainer.accumulate_grad_batches`` to match) for fuller forward passes. Training
            and validation batches are packed.
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
        pack: bool = False,
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
        self.pack = pack
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
                chat=ChatFormat.for_family(processor.family, question_suffix=self.question_suffix),
            )
            pad = processor.tokenizer.pad_token_id
            self.collator = (PackingCollator(pad, self.max_length, self.pad_to_multiple_of)
                             if self.pack else Collator(pad, self.pad_to_multiple_of))
        if stage in (None, "fit") and self.train_dataset is None:
            index = None
            if not self.resampled or self.train_samples is None:
                index = shared_index(self.train_shards)
            self.train_dataset = ShardDataset(
                self.train_shards, self.encoder, self.skip_counter,
                shuffle_buffer=self.shuffle_buffer, seed=self.seed, resampled=self.resampled,
                batch_size=self.batch_size, index=None if self.resampled else index,
            )
            if index is not None:
                _nonempty(index, self.train_shards)
            if self.resampled and self.train_samples is None:
                assert index is not None
                self.train_samples = index.total
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
            except Exception as error:  # as in training (shards.py): a bad sample, counted
                val_counter.add("bad_record")
                log.warning("validation sample %s skipped: encoding failed: %r", record.id, error)
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
        if self.resampled:
            length = max(1, (self.train_samples or 0) // world)
        else:
            length = self._exact_epoch_length(world)
        return ResumableLoader(
            ResumableStream(self.train_dataset, length, self.resume_plan),
            on_start=self._start_train_epoch, collate_fn=TaggedCollate(self.collator),
            **self._loader_args(self.num_workers),
        )

    def _exact_epoch_length(self, world: int) -> int:
        """Samples per epoch on this rank (what its workers yield), with the split reported."""
        assert self.train_dataset is not None
        workers = max(1, self.num_workers)
        split = self.train_dataset.split(world * workers)
        rank_zero_info(
            f"exact epochs: {split.total} readable samples in {len(split.sizes)} shards, "
            f"{split.kept} per epoch = {world} ranks x {workers} workers x {split.per_reader}"
        )
        if split.dropped:
            rank_zero_warn(
                f"{split.dropped} of {split.total} training samples are left out of each epoch (a "
                f"different remainder each epoch) so that each of {world} ranks x {workers} "
                f"workers gets {split.per_reader} samples, a multiple of batch_size {self.batch_size}"
            )
        if self.train_samples is not None and self.train_samples != split.kept:
            rank_zero_warn(
                f"data.train_samples={self.train_samples}, but the shards give {split.kept} "
                f"samples per epoch: training {split.kept}"
            )
        return split.per_reader * workers

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
            self.train_dataset.padded.restore(resume.skipped)
            if resume.skips:
                self.resume_plan.arm(epoch, resume.shift, resume.skips)
            rank_zero_info(f"resuming the training stream in epoch {epoch}: rank 0 skips "
                           f"{sum(resume.skips)} samples already trained on")
        padded = self.train_dataset.padded.as_dict()["padded"]
        if padded:
            rank_zero_info(f"rank 0 has replaced {padded} bad training samples with repeats so far")
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
        """Stream position and skip (and padding) counts of every rank (collective: all ranks
        call it)."""
        counts = self.skip_counter.as_dict()
        if self.train_dataset is not None:
            counts.update(self.train_dataset.padded.as_dict())
        return checkpoint_state(self.trainer, self._position, counts, self.batch_size,
                                self.num_workers)

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


def shared_index(urls: str) -> ShardIndex:
    """The shards' :class:`ShardIndex`, scanned by rank 0 and sent to the others: every rank must
    split epochs from the same sizes, or their shares would overlap."""
    paths = resolve_urls(urls)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return index_shards(paths)
    found: list[ShardIndex | str | None] = [None]
    if torch.distributed.get_rank() == 0:
        try:
            found[0] = index_shards(paths)
        except (OSError, ValueError) as e:  # raised on every rank below, not just this one
            found[0] = f"{type(e).__name__}: {e}"
    torch.distributed.broadcast_object_list(found, src=0)
    if not isinstance(found[0], ShardIndex):
        raise ValueError(f"data.train_shards={urls!r}: {found[0]}")
    return found[0]


def _nonempty(index: ShardIndex, urls: str) -> ShardIndex:
    if not index.total:
        raise FileNotFoundError(f"data.train_shards={urls!r}: no readable samples found "
                                f"({len(index.damaged)} damaged shard(s))")
    return index


def count_samples(urls: str) -> int:
    """Readable samples in local shards, from tar headers only; a damaged shard counts the
    samples before its damage (less the last one, which may be incomplete)."""
    try:
        index = index_shards(resolve_urls(urls))
    except ValueError as e:
        raise ValueError(f"data.train_shards={urls!r}: {e}") from None
    return _nonempty(index, urls).total
