"""Streaming WebDataset shards into decoded samples: the layer under :class:`TVCDataModule`.

Shards are untrusted input (see ``docs/design.md``); :mod:`tvc_lightning.data.tarread` reads them
safely. Whatever is bad -- an unreadable or truncated tar, malformed JSON, an invalid record, an
undecodable image, a sample the encoder rejects -- is counted in a :class:`SkipCounter` shared
with the DataLoader workers; reading goes on.

:class:`ShardDataset` streams training data in exact epochs (:mod:`tvc_lightning.data.epochs`):
every readable sample once per epoch across distributed ranks and DataLoader workers, the same
number on each; :func:`load_split` reads a small validation split eagerly and gives every rank the
same number of samples.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing as mp
import random
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from tvc_lightning.data.epochs import EpochSplit, ShardIndex, index_shards
from tvc_lightning.data.skips import SKIP_REASONS, SkipCounter, SkipSample
from tvc_lightning.data.tarread import (
    Decoded,
    Encode,
    Urls,
    decode_sample,
    dist_rank_world,
    iter_shard,
    resolve_urls,
)

__all__ = ["SKIP_REASONS", "ShardDataset", "SkipCounter", "SkipSample", "decode_sample",
           "dist_rank_world", "iter_shard", "load_split", "resolve_urls"]

log = logging.getLogger(__name__)

# Shared memory for the epoch; see skips.py for why it is a spawn context.
_SHARED = mp.get_context("spawn")


def _buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items (reservoir-style)."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


class ShardDataset(IterableDataset):
    """Stream WebDataset shards as ``encode(record, images, epoch)`` results, in exact epochs.

    An epoch is a permutation of every readable sample (see :mod:`tvc_lightning.data.epochs`):
    the shard order and the positions within shards are shuffled with ``(seed, epoch)``, and the
    sequence is cut into equal shares, one per reader (ranks x DataLoader workers), each a multiple
    of ``batch_size``; the remainder is dropped (a different one each epoch). ``shuffle_buffer > 0``
    further shuffles each reader's samples, seeded by ``(seed, epoch, reader)``.

    Every reader yields exactly :meth:`split`'s ``per_reader`` samples, so all ranks take the same
    number of steps. A sample that turns out bad only when decoded or encoded (bad JSON or image,
    too long...) is counted in ``counter`` and replaced by a repeat of one of the reader's own good
    samples of the epoch (the first ones, again), counted in :attr:`padded`. The shards' readable
    samples are indexed once, from tar headers; damaged shards are counted as ``bad_tar`` then (by
    rank 0), and read up to the damage.

    ``resampled=True`` instead makes an infinite stream of shards drawn with replacement,
    independently per reader (its epochs are whatever length the caller stops at). Call
    :meth:`set_epoch` before each epoch's iterator is created; the value lives in shared memory so
    persistent workers see it.
    """

    def __init__(
        self,
        urls: Urls,
        encode: Encode,
        counter: SkipCounter,
        shuffle_buffer: int = 0,
        seed: int = 0,
        resampled: bool = False,
        max_image_pixels: int = 1 << 26,
        shuffle_shards: bool = True,
        batch_size: int = 1,
        index: ShardIndex | None = None,
    ) -> None:
        super().__init__()
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.urls = resolve_urls(urls)
        self.encode = encode
        self.counter = counter
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.resampled = resampled
        self.max_image_pixels = max_image_pixels
        self.shuffle_shards = shuffle_shards
        self.batch_size = batch_size
        self.padded = SkipCounter(("padded",))
        self._epoch = _SHARED.Value("q", 0)
        self._rank_world: tuple[int, int] | None = None
        self.index: ShardIndex | None = None
        if not resampled:
            self.index = index if index is not None else index_shards(self.urls)
            if list(self.index.urls) != self.urls:
                raise ValueError("the shard index was built for other shards")
            for url in self.index.damaged:
                log.warning("shard %s is damaged: reading its first %d samples", url,
                            self.index.sizes[self.urls.index(url)])
            if dist_rank_world()[0] == 0:  # once per job: the logged counts are summed over ranks
                self.counter.add("bad_tar", len(self.index.damaged))

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used for shuffling and passed to ``encode``."""
        self._epoch.value = epoch

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def split(self, readers: int, epoch: int = 0) -> EpochSplit:
        """``epoch`` cut into ``readers`` equal shares (its sizes do not depend on ``epoch``)."""
        if self.index is None:
            raise ValueError("a resampled stream has no exact epochs to split")
        return EpochSplit(self.index.sizes, readers, self.seed, epoch, self.batch_size,
                          self.shuffle_shards)

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers have no process group; record rank/world in the parent while pickling.
        state = self.__dict__.copy()
        state["_rank_world"] = dist_rank_world()
        return state

    def _reader(self, worker: int | None = None) -> tuple[int, int]:
        """(global reader id, number of readers) over ranks x DataLoader workers.

        ``worker`` overrides this DataLoader worker's id: a resumed epoch lets worker ``i`` read
        the stream of another worker (see :mod:`tvc_lightning.data.resume`).
        """
        rank, world = self._rank_world or dist_rank_world()
        info = get_worker_info()
        own, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = own if worker is None else worker
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} out of range for {workers} DataLoader worker(s)")
        return rank * workers + worker, world * workers

    def _share(self, split: EpochSplit, reader: int, counter: SkipCounter) -> Iterator[dict]:
        """Raw samples of ``reader``'s share, shard by shard in tar order."""
        for shard, keep in split.share(reader):
            last = int(split.sizes[shard]) - 1 if keep is None else int(keep[-1])
            wanted = None
            if keep is not None:
                wanted = np.zeros(last + 1, dtype=bool)
                wanted[keep] = True
            # Stop at the last wanted sample: reading on would reach a damaged shard's damage,
            # which the index already counted.
            with contextlib.closing(iter_shard(self.urls[shard], counter)) as samples:
                for i, sample in enumerate(samples):
                    if wanted is None or wanted[i]:
                        yield sample
                    if i >= last:
                        break

    def _resampled(self, rng: random.Random) -> Iterator[dict]:
        empty_in_a_row = 0
        while True:
            read = 0
            for sample in iter_shard(rng.choice(self.urls), self.counter):
                read += 1
                yield sample
            empty_in_a_row = 0 if read else empty_in_a_row + 1
            # Without this, a set of only-bad shards would spin forever without yielding.
            if empty_in_a_row >= 10 * len(self.urls) + 10:
                raise RuntimeError(f"{empty_in_a_row} shards in a row had no samples: {self.urls}")

    def __iter__(self) -> Iterator[Any]:
        return self.iterate()

    def iterate(self, epoch: int | None = None, worker: int | None = None) -> Iterator[Any]:
        """This reader's samples of ``epoch`` (default: :attr:`epoch`), read as DataLoader
        worker ``worker`` (default: this one); the stream is a pure function of both."""
        epoch = self._epoch.value if epoch is None else epoch
        reader, readers = self._reader(worker)
        if self.resampled:
            raw = self._resampled(random.Random(f"resample:{self.seed}:{epoch}:{reader}"))
            yield from self._encoded(raw, epoch, reader, self.counter)
            return
        split = self.split(readers, epoch)
        if reader == 0 and len(self.urls) < readers:
            warnings.warn(
                f"{len(self.urls)} shards for {readers} readers (ranks x workers): readers share "
                "shards, and each reads a shard up to its last sample there; write more shards to "
                "avoid the waste",
                stacklevel=2,
            )
        got = 0
        for out in self._encoded(self._share(split, reader, self.counter), epoch, reader,
                                 self.counter):
            yield out
            got += 1
        if got < split.per_reader:
            yield from self._pad(split, reader, split.per_reader - got)

    def _pad(self, split: EpochSplit, reader: int, missing: int) -> Iterator[Any]:
        """``missing`` repeats of the reader's first good samples, so that it still yields its
        whole share (equal step counts on every rank)."""
        self.padded.add("padded", missing)
        log.info("reader %d: %d bad samples in epoch %d replaced by repeats", reader, missing,
                 split.epoch)
        quiet = SkipCounter(self.counter.reasons)  # this pass meets the same bad samples again
        quiet.paused = True
        while missing:
            raw = self._share(split, reader, quiet)
            got = 0
            for out in itertools.islice(self._encoded(raw, split.epoch, reader, quiet), missing):
                yield out
                got += 1
            if not got:
                raise RuntimeError(
                    f"reader {reader} has no usable sample among its {split.per_reader} of epoch "
                    f"{split.epoch} (see the skip counts), so it cannot keep step with the others"
                )
            missing -= got

    def _encoded(self, raw: Iterator[dict], epoch: int, reader: int,
                 counter: SkipCounter) -> Iterator[Any]:
        if self.shuffle_buffer > 0:
            rng = random.Random(f"{self.seed}:{epoch}:{reader}")
            raw = _buffer_shuffle(raw, self.shuffle_buffer, rng)
        for sample in raw:
            decoded = decode_sample(sample, counter, self.max_image_pixels)
            if decoded is None:
                continue
            try:
                out = self.encode(decoded[0], decoded[1], epoch)
            except SkipSample as e:
                counter.add(e.reason)
                continue
            except Exception as e:  # untrusted input the encoder still chokes on: one bad sample,
                # not a dead worker (and a resumed run dying on it again); loud, not silent
                counter.add("bad_record")
                log.warning("skip %s: encoding failed: %r", decoded[0].id, e)
                continue
            yield out


def load_split(
    urls: Urls,
    counter: SkipCounter,
    world_size: int | None = None,
    rank: int | None = None,
    max_image_pixels: int = 1 << 26,
) -> list[Decoded]:
    """Read a finite (validation) split eagerly: this rank's ``(record, images)``, in shard order.

    Bad samples are skipped and counted; the valid ones are dealt round-robin by index, and the
    remainder that does not divide by ``world_size`` is dropped (with a warning), so every rank
    runs the same number of validation steps -- unequal counts hang collectives under DDP/ZeRO-3.
    ``world_size``/``rank`` default to ``torch.distributed`` or env RANK/WORLD_SIZE.
    """
    detected_rank, detected_world = dist_rank_world()
    world = detected_world if world_size is None else world_size
    rank = detected_rank if rank is None else rank
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world}")
    mine: list[Decoded] = []
    valid = 0
    for url in resolve_urls(urls):
        for sample in iter_shard(url, counter):
            decoded = decode_sample(sample, counter, max_image_pixels)
            if decoded is None:
                continue
            # Every rank decodes every sample (validity decides the index) but keeps only its own.
            if valid % world == rank:
                mine.append(decoded)
            valid += 1
    per_rank = valid // world
    if valid % world:
        warnings.warn(
            f"dropping {valid % world} of {valid} samples of {urls!r} so that each of {world} "
            f"ranks gets {per_rank}",
            stacklevel=2,
        )
    if per_rank == 0:
        warnings.warn(f"no usable samples for rank {rank} in {urls!r}", stacklevel=2)
    return mine[:per_rank]
