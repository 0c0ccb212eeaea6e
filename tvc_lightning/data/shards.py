"""Streaming WebDataset shards into decoded samples: the layer under :class:`TVCDataModule`.

Shards are untrusted input (see ``docs/design.md``). Only the JSON member and the image members
of a sample are ever read, decoded with :meth:`SampleRecord.from_json` and PIL; every other member
(``.pickle``, ``.pyd``, ``.npy``...) is skipped unread. Whatever is bad -- an unreadable or
truncated tar, malformed JSON, an invalid record, an undecodable image, a sample the encoder
rejects -- is counted in a :class:`SkipCounter` shared with the DataLoader workers; reading goes on.

:class:`ShardDataset` streams training data, split so that no sample is read twice in an epoch
across distributed ranks and DataLoader workers; :func:`load_split` reads a small validation split
eagerly and gives every rank the same number of samples.
"""

from __future__ import annotations

import glob
import io
import logging
import multiprocessing as mp
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import braceexpand
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener

from tvc_lightning.data.schema import InvalidRecord, SampleRecord, image_members
from tvc_lightning.data.skips import SKIP_REASONS, SkipCounter, SkipSample

__all__ = ["SKIP_REASONS", "ShardDataset", "SkipCounter", "SkipSample", "load_split", "resolve_urls"]

log = logging.getLogger(__name__)

# PIL parses many formats; shards only carry .jpg/.png, so refuse every other parser outright.
_IMAGE_FORMATS = ("JPEG", "PNG")
_BLOCK = 512  # tar block size
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
# Shared memory for the epoch; see skips.py for why it is a spawn context.
_SHARED = mp.get_context("spawn")

Urls = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
Encode = Callable[[SampleRecord, list[Image.Image], int], Any]
Decoded = tuple[SampleRecord, list[Image.Image]]


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def resolve_urls(urls: Urls) -> list[str]:
    """Expand shard patterns into a list of shard URLs.

    Each pattern may be a directory (all ``*.tar`` inside, sorted), a brace expansion
    (``synth-{000000..000007}.tar``), a glob, or a remote URL (``s3://``, ``http://``, ``pipe:``),
    which is brace-expanded and otherwise passed unchanged to webdataset's opener. Missing local
    files raise ``FileNotFoundError`` here rather than being counted later, because they are almost
    always a mistyped setting, not bad data.
    """
    patterns = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    resolved: list[str] = []
    for pattern in map(os.fspath, patterns):
        if _is_remote(pattern):
            resolved.extend(braceexpand.braceexpand(pattern))
            continue
        if os.path.isdir(pattern):
            found = sorted(glob.glob(os.path.join(glob.escape(pattern), "*.tar")))
        else:
            found, missing = [], []
            for path in braceexpand.braceexpand(pattern):
                if glob.has_magic(path):
                    found.extend(sorted(glob.glob(path)))
                else:
                    (found if os.path.isfile(path) else missing).append(path)
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} shard(s) of {pattern!r} do not exist: {', '.join(missing[:3])}"
                    + (", ..." if len(missing) > 3 else "")
                )
        if not found:
            raise FileNotFoundError(f"no shards found for {pattern!r}")
        resolved.extend(found)
    if not resolved:
        raise FileNotFoundError(f"no shards found for {urls!r}")
    return resolved


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) from ``torch.distributed`` if initialized, else env RANK/WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _wanted_member(fname: str) -> bool:
    """Select only JSON and image members; everything else is skipped without being read."""
    _, suffix = base_plus_ext(fname)
    if suffix is None:
        return False
    suffix = suffix.lower()  # group_by_keys lower-cases suffixes too
    return suffix == "json" or bool(image_members({suffix: None}))


class _TailTracker:
    """Read-through wrapper that remembers the head and tail of a shard's bytes.

    ``tarfile`` in stream mode silently ends an archive that was cut at a block boundary (a common
    shape for interrupted copies), so a truncated shard would pass unnoticed. A complete tar ends
    with zero blocks; if the stream reached EOF and its last block is not zeros, it was cut.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.head = b""
        self.tail = b""
        self.eof = False

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if not data:
            self.eof = True
        if len(self.head) < _BLOCK:
            self.head += data[: _BLOCK - len(self.head)]
        self.tail = (self.tail + data)[-_BLOCK:]
        return data

    def truncated(self) -> bool:
        # Compressed tars signal truncation themselves (the decompressor raises EOFError).
        if not self.eof or self.head.startswith(_COMPRESSED_MAGIC):
            return False
        return len(self.tail) < _BLOCK or self.tail != bytes(_BLOCK)

    def close(self) -> None:
        self.stream.close()


def iter_shard(url: str, counter: SkipCounter, count_bad_tar: bool = True) -> Iterator[dict]:
    """Raw samples (``{"__key__", "json", "png"...}``) of one shard, built by webdataset.

    Any error opening or reading the tar stops this shard and counts one ``bad_tar`` (a tar stream
    cannot be resynchronized after corruption). Samples completed before the error are kept; the
    last one is dropped, because it may be missing members that were lost. Opening the shard in
    this function (one shard per pipeline) also keeps equal keys in two shards from merging.
    """
    errors: list[BaseException] = []

    def handler(exn: BaseException) -> bool:
        errors.append(exn)
        return False  # stop reading this shard

    trackers: list[_TailTracker] = []

    def tracked(sources: Iterator[dict]) -> Iterator[dict]:
        for source in sources:
            source["stream"] = _TailTracker(source["stream"])
            trackers.append(source["stream"])
            yield source

    opened = tracked(url_opener([{"url": url}], handler=handler))
    files = tar_file_expander(opened, handler=handler, select_files=_wanted_member)
    samples = group_by_keys(files, handler=handler)
    pending: dict | None = None
    try:
        for sample in samples:
            # A sample is complete once the next one has started; hold it back until then.
            if pending is not None:
                yield pending
            pending = sample
        if errors or any(t.truncated() for t in trackers):
            if count_bad_tar:
                counter.add("bad_tar")
                why = repr(errors[0]) if errors else "truncated (no end-of-archive block)"
                log.warning("skipping the rest of shard %s: %s", url, why)
        elif pending is not None:
            yield pending
    finally:
        samples.close()
        for tracker in trackers:
            try:
                tracker.close()
            except Exception as e:  # e.g. a pipe: URL's command exiting non-zero after we stopped
                log.warning("closing shard %s: %r", url, e)


def _open_image(data: bytes, max_image_pixels: int) -> Image.Image:
    with Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS) as img:
        # Check the header's size before decoding: a small file can declare a huge canvas.
        width, height = img.size
        if width * height > max_image_pixels:
            raise ValueError(f"image of {width}x{height} exceeds {max_image_pixels} pixels")
        img.load()
        return img.convert("RGB")


def decode_sample(
    sample: dict[str, Any], counter: SkipCounter, max_image_pixels: int = 1 << 26
) -> Decoded | None:
    """Validate and decode one raw sample; ``None`` (and a counted reason) if it is unusable."""
    key = f"{sample.get('__url__')}:{sample.get('__key__')}"
    if "json" not in sample:
        counter.add("bad_record")
        log.debug("skip %s: no json member", key)
        return None
    try:
        record = SampleRecord.from_json(sample["json"])
    except InvalidRecord as e:
        counter.add(e.reason if e.reason in counter.reasons else "bad_record")
        log.debug("skip %s: %s", key, e)
        return None
    names = image_members(sample)
    if not names:
        counter.add("bad_record")
        log.debug("skip %s: no image member", key)
        return None
    images = []
    for name in names:
        try:
            images.append(_open_image(sample[name], max_image_pixels))
        except Exception as e:  # untrusted bytes: PIL raises many types (OSError, SyntaxError...)
            counter.add("bad_image")
            log.debug("skip %s: image %s: %r", key, name, e)
            return None
    return record, images


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
    """Stream WebDataset shards as ``encode(record, images, epoch)`` results.

    Per epoch, the shard order is shuffled with ``random.Random(seed + epoch)`` (identical on every
    rank), then split over all readers (ranks x DataLoader workers): by shard when there are at
    least as many shards as readers, else by sample index, so each sample is read once per epoch.
    ``shuffle_buffer > 0`` further shuffles samples within each reader. ``resampled=True`` makes an
    infinite stream of shards drawn with replacement, independently per reader. Call
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
        self._epoch = _SHARED.Value("q", 0)
        self._rank_world: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used for shuffling and passed to ``encode``."""
        self._epoch.value = epoch

    @property
    def epoch(self) -> int:
        return self._epoch.value

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

    def _raw_samples(self, epoch: int, reader: int, readers: int) -> Iterator[dict]:
        if self.resampled:
            yield from self._resampled(random.Random(f"resample:{self.seed}:{epoch}:{reader}"))
            return
        order = list(self.urls)
        if self.shuffle_shards:
            random.Random(self.seed + epoch).shuffle(order)
        if len(order) >= readers:
            for url in order[reader::readers]:
                yield from iter_shard(url, self.counter)
            return
        if reader == 0:
            warnings.warn(
                f"{len(order)} shards for {readers} readers (ranks x workers): every reader reads "
                f"all shards and keeps 1 sample in {readers}; write more shards to avoid the waste",
                stacklevel=2,
            )
        index = 0
        for i, url in enumerate(order):
            # Every reader sees a bad shard; only one counts it.
            for sample in iter_shard(url, self.counter, count_bad_tar=i % readers == reader):
                if index % readers == reader:
                    yield sample
                index += 1

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
        raw = self._raw_samples(epoch, reader, readers)
        if self.shuffle_buffer > 0:
            rng = random.Random(f"{self.seed}:{epoch}:{reader}")
            raw = _buffer_shuffle(raw, self.shuffle_buffer, rng)
        for sample in raw:
            decoded = decode_sample(sample, self.counter, self.max_image_pixels)
            if decoded is None:
                continue
            try:
                out = self.encode(decoded[0], decoded[1], epoch)
            except SkipSample as e:
                self.counter.add(e.reason)
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
