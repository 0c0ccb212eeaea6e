"""Exact resume of the training stream: a run restarted mid-epoch gets the batches it would have got.

Lightning restarts an ``IterableDataset`` from its beginning when it resumes mid-epoch. The shard
stream is a pure function of (seed, epoch, reader), so instead of saving iterator state we save a
*position*: for each DataLoader worker, how many of its batches training has consumed this epoch,
and which worker gave the last one. On resume every worker regenerates its stream and drops the
batches it had already given; the worker ids are rotated so that the DataLoader, which always asks
worker 0 first, continues the round-robin exactly where the interrupted run was.

Why the position is measured in the main process rather than derived from the step count: the
DataLoader deals batches round-robin over the workers that still have data, so once a worker runs
dry near the end of an epoch, "batch j came from worker j % W" no longer holds. (Exact epochs give
every worker an equal share in whole batches, but a resampled stream or a resume with another
topology does not, and a tag costs nothing.) Every training
batch therefore carries a small tag (epoch, worker) added in the worker and removed in
:meth:`TVCDataModule.on_before_batch_transfer`, where the consumed batches are counted.

Cost: fast-forwarding runs the whole per-sample pipeline (shard reading, image decoding, DVR,
tokenization and image preprocessing) for every skipped sample, because only that pipeline decides
whether a sample is yielded or skipped as bad. A resume at a fraction ``f`` of an epoch makes each
worker redo ``f`` of its share of the epoch before its first batch; the workers do it in parallel.
"""

from __future__ import annotations

import itertools
import logging
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tvc_lightning.data.shards import _SHARED, ShardDataset, SkipCounter
from tvc_lightning.data.tokenize import IGNORE_INDEX

log = logging.getLogger(__name__)

POSITION_KEY = "stream_position"  # batch key of the (epoch, worker) tag; removed before the model
STATE_VERSION = 1

Tag = tuple[int, int]  # (epoch, logical worker)


@dataclass
class StreamPosition:
    """Training batches consumed in the current epoch, per logical DataLoader worker (main process)."""

    epoch: int = -1
    batches: list[int] = field(default_factory=list)
    last: int = -1  # logical worker of the last consumed batch; -1: none this epoch

    def record(self, epoch: int, worker: int, workers: int) -> None:
        """Count one consumed batch of ``worker`` in ``epoch`` (a new epoch starts from zero)."""
        if epoch != self.epoch or len(self.batches) != workers:
            self.epoch, self.batches, self.last = epoch, [0] * workers, -1
        self.batches[worker] += 1
        self.last = worker


class ResumePlan:
    """A one-shot fast-forward for the DataLoader workers of the first (resumed) epoch.

    It lives in shared memory, like the dataset's epoch, so that it reaches workers however they
    are started, and each worker clears its own entry when it takes it: persistent workers start
    later epochs from the beginning, and a plan is never applied twice.
    """

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        # [epoch, shift, skip per logical worker..., pending flag per DataLoader worker...]
        self._data = _SHARED.Array("q", 2 + 2 * self.workers, lock=True)

    def arm(self, epoch: int, shift: int, skips: list[int]) -> None:
        """Make each worker of ``epoch`` read as worker ``(id + shift) % W`` and drop its first
        ``skips[logical]`` samples."""
        if len(skips) != self.workers:
            raise ValueError(f"need {self.workers} skip counts, got {len(skips)}")
        with self._data.get_lock():
            self._data[0], self._data[1] = epoch, shift % self.workers
            self._data[2 : 2 + self.workers] = list(skips)
            self._data[2 + self.workers :] = [1] * self.workers

    def disarm(self) -> None:
        with self._data.get_lock():
            self._data[2 + self.workers :] = [0] * self.workers

    def take(self, worker: int, epoch: int) -> tuple[int, int]:
        """``(shift, samples to skip)`` for DataLoader worker ``worker`` starting ``epoch``, once;
        ``(0, 0)`` when nothing is pending."""
        with self._data.get_lock():
            flag = 2 + self.workers + worker
            pending, self._data[flag] = self._data[flag], 0
            if not pending:
                return 0, 0
            if self._data[0] != epoch:
                log.warning("resume plan for epoch %d dropped: worker started epoch %d",
                            self._data[0], epoch)
                return 0, 0
            shift = self._data[1]
            return shift, self._data[2 + (worker + shift) % self.workers]


def fast_forward(stream: Iterator[Any], n: int, *counters: SkipCounter) -> int:
    """Drop the first ``n`` items of ``stream``; returns how many there were.

    Input skipped as bad (or padded) on the way was counted before the checkpoint and the
    ``counters`` were restored from it, so this worker's counting pauses meanwhile.
    """
    for counter in counters:
        counter.paused = True
    try:
        return sum(1 for _ in itertools.islice(stream, n))
    finally:
        for counter in counters:
            counter.paused = False


class ResumableStream(IterableDataset):
    """The training stream: ``((epoch, worker), sample)`` pairs, fast-forwarded on resume.

    Args:
        dataset: The shard stream.
        length: This rank's samples per epoch: the epoch length Lightning plans with. In exact
            epochs it is what the workers yield (equal shares, bad samples replaced by repeats).
        plan: Shared resume plan (armed by the data module on resume).
    """

    def __init__(self, dataset: ShardDataset, length: int, plan: ResumePlan) -> None:
        self.dataset, self.length, self.plan = dataset, length, plan

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[Tag, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.dataset.epoch
        shift, skip = self.plan.take(worker, epoch)
        logical = (worker + shift) % workers
        stream = self.dataset.iterate(epoch, logical)
        if skip:
            skipped = fast_forward(stream, skip, self.dataset.counter, self.dataset.padded)
            log.info("worker %d (stream %d) resumed epoch %d after %d samples", worker, logical,
                     epoch, skipped)
        tag = (epoch, logical)
        for sample in stream:
            yield tag, sample


WINDOW_LABELS_KEY = "window_labels"


@dataclass(frozen=True)
class StepWindows:
    """How the epoch's batches fall into optimizer steps: ``size`` batches per step counted from
    batch ``start`` (the epoch's start, or for DeepSpeed the resume point), the first ``done``
    batches already trained (a resumed epoch), and a step forced after batch ``limit`` (the
    epoch's last trained batch; None: no forced step)."""

    size: int = 1
    done: int = 0
    start: int = 0
    limit: int | None = None

    def window_end(self, position: int) -> int:
        """Batch index (exclusive) where the step holding batch ``position`` ends."""
        end = self.start + ((position - self.start) // self.size + 1) * self.size
        return min(end, self.limit) if self.limit is not None and position < self.limit else end


def label_windows(batches: Iterator[dict[str, Any]], windows: StepWindows) -> Iterator[dict[str, Any]]:
    """Add to each batch the number of labelled (loss) positions in its optimizer step's window of
    batches (the first batch here is the epoch's batch ``windows.done``). Reads up to
    ``windows.size - 1`` batches ahead."""
    position = windows.done
    while True:
        window = list(itertools.islice(batches, windows.window_end(position) - position))
        if not window:
            return
        position += len(window)
        total = torch.tensor(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window))
        for batch in window:
            batch[WINDOW_LABELS_KEY] = total
            yield batch


class ResumableLoader(DataLoader):
    """A DataLoader that calls ``on_start`` just before each epoch's workers start reading, and
    labels each batch with its optimizer step's label count (``on_start`` says how steps fall).

    Its iterator starts the real one at the first ``next()``, not at ``iter()``: Lightning creates
    the first iterator while it sets up (for DeepSpeed and FSDP even before it restores the
    checkpoint), but asks for the first batch only once the loops are restored and
    ``on_train_start``/``on_train_epoch_start`` have run, so ``on_start`` sees the trainer's real
    epoch and any resume state. Lightning does not prefetch from a sized loader at ``iter()``.
    """

    def __init__(self, *args: Any, on_start: Callable[[], StepWindows], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_start = on_start

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return _LazyIterator(self._start)

    def _start(self) -> Iterator[Any]:
        windows = self.on_start()  # first: it sets the epoch and fast-forward the workers read
        return label_windows(super().__iter__(), windows)


class _LazyIterator:
    def __init__(self, start: Callable[[], Iterator[Any]]) -> None:
        self._start: Callable[[], Iterator[Any]] | None = start
        self._it: Iterator[Any] | None = None

    def __iter__(self) -> _LazyIterator:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            assert self._start is not None
            self._it, self._start = self._start(), None
        return next(self._it)


class TaggedCollate:
    """Collate ``(tag, sample)`` pairs with ``collate`` and add the tag as ``batch[POSITION_KEY]``."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[Tag, Any]]) -> dict[str, Any]:
        tags = {tag for tag, _ in items}
        if len(tags) != 1:  # a batch is made by one worker from one epoch's iterator
            raise ValueError(f"a batch mixes stream positions {sorted(tags)}")
        batch = self.collate([sample for _, sample in items])
        batch[POSITION_KEY] = torch.tensor(tags.pop())
        return batch


def checkpoint_state(
    trainer: Any, position: StreamPosition, skipped: dict[str, int], batch_size: int, workers: int
) -> dict[str, Any]:
    """The data module's checkpoint state: every rank's position and skip counts.

    Lightning calls ``state_dict`` on every rank when it saves (saving is collective) but writes
    rank 0's result only, so the ranks' parts are gathered here. ``epoch_done``: the checkpoint
    came after the epoch's last batch, so Lightning resumes at the next epoch.
    """
    workers = max(1, workers)
    if trainer is not None:
        epoch = trainer.current_epoch
        progress = trainer.fit_loop.epoch_loop.batch_progress
        done = progress.is_last_batch or progress.current.ready >= trainer.num_training_batches
    else:
        epoch, done = max(position.epoch, 0), False
    current = position.epoch == epoch and len(position.batches) == workers
    local = {
        "batches": list(position.batches) if current else [0] * workers,
        "last": position.last if current else -1,
        "skipped": dict(skipped),
    }
    ranks = [local]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ranks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(ranks, local)
    return {"version": STATE_VERSION, "epoch": int(epoch), "epoch_done": bool(done),
            "batch_size": batch_size, "num_workers": workers, "ranks": ranks}


@dataclass(frozen=True)
class Resume:
    """How this rank's workers continue the resumed epoch, and the skip counts to restore."""

    shift: int = 0
    skips: list[int] = field(default_factory=list)  # samples per logical worker; empty: none
    skipped: dict[str, int] = field(default_factory=dict)  # this rank's skip counts to restore


def plan_resume(
    state: dict[str, Any], rank: int, world: int, workers: int, batch_size: int, current_epoch: int
) -> Resume:
    """Turn a checkpoint's :func:`checkpoint_state` into this rank's :class:`Resume`.

    ``current_epoch`` is the epoch the restored trainer is about to train. The workers skip only
    when that is the saved epoch, unfinished: otherwise Lightning has moved on (after an epoch's
    last batch, or from a checkpoint written by ``on_train_epoch_end`` after ``max_steps`` cut an
    epoch short, which Lightning resumes as the next epoch). With the same world size, workers and
    batch size the resume is exact; otherwise every reader skips an equal share of the samples the
    whole job had consumed, which approximately continues the epoch (with a warning).
    """
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"unknown data module state version {state.get('version')!r}")
    workers = max(1, workers)
    ranks: list[dict[str, Any]] = state["ranks"]
    same_world = len(ranks) == world
    if same_world:
        skipped = dict(ranks[rank]["skipped"])
    else:  # keep the job-wide sums on rank 0 (the logged counts are summed over ranks)
        reasons = ranks[0]["skipped"]
        skipped = {k: sum(p["skipped"].get(k, 0) for p in ranks) if rank == 0 else 0 for k in reasons}
    epoch = state["epoch"]
    consumed = sum(sum(p["batches"]) for p in ranks)
    if current_epoch != epoch or state["epoch_done"] or not consumed:
        return Resume(skipped=skipped)
    if same_world and state["num_workers"] == workers and state["batch_size"] == batch_size:
        mine = ranks[rank]
        # The DataLoader asks worker 0 first: rotate so that it serves the stream that was next.
        shift = (mine["last"] + 1) % workers
        return Resume(shift, [n * batch_size for n in mine["batches"]], skipped)
    share = consumed * state["batch_size"] // (world * workers)
    warnings.warn(
        f"resuming epoch {epoch} with world size x workers x batch size {world}x{workers}x"
        f"{batch_size} instead of {len(ranks)}x{state['num_workers']}x{state['batch_size']}: the "
        f"epoch's split changes, so every reader skips {share} samples (approximate resume)",
        stacklevel=2,
    )
    return Resume(0, [share] * workers, skipped)


# -- global RNG states (for TVCModule's checkpoint hooks) ---------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and current-device CUDA RNG states, as tensors and plain numbers so that
    a checkpoint loaded with ``torch.load(weights_only=True)`` still reads them."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "python": [version, list(internal), py_gauss],
        "numpy": [keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA: on the current device, if there is one)."""
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
