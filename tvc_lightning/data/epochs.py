"""Exact epochs over WebDataset shards: an index of each shard's readable samples, and each epoch
cut into equal shares, one per reader (ranks x DataLoader workers).

An epoch is a permutation of the whole index: the shard order is shuffled with the epoch's seed,
and each shard's positions are permuted (also per epoch) before the shards are concatenated. The
global sequence is cut into ``readers`` equal contiguous ranges, so a reader holds whole shards
plus at most two partial ones, and every sample appears in exactly one range. Each range is
rounded down to a multiple of the batch size, so that every DataLoader worker ends on a full batch
and every rank takes the same number of steps; the remainder (at the end of the epoch's order, so
a different one each epoch) is dropped and reported as :attr:`EpochSplit.dropped`.

Everything here is arithmetic on shard sizes (``O(shards)``), plus one permutation per partially
held shard: splitting a 345k-sample epoch for 256 readers takes milliseconds.

The index is read from tar headers only (no member data is read, no image decoded) and mirrors
what :func:`tvc_lightning.data.shards.iter_shard` yields: samples are the groups of consecutive
JSON/image members with one key, and in a damaged shard (truncated, a bad header, a duplicate
member) the samples before the damage count, less the last one, whose members may be incomplete.
"""

from __future__ import annotations

import lzma
import os
import random
import re
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tvc_lightning.data.schema import image_members

__all__ = ["EpochSplit", "ShardIndex", "index_shards", "scan_shard"]

_BLOCK = 512
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
# Members webdataset's tar reader never hands on (see webdataset.tariterators.tar_file_iterator).
_META = re.compile(r"__[^/]*__($|/)")
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def _key_and_suffix(name: str) -> tuple[str, str] | None:
    """(key, lower-case suffix) of a member the shard reader keeps (JSON and images), else None."""
    if _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None
    match = _KEY_SUFFIX.match(name)
    if match is None:
        return None
    key, suffix = match.group(1), match.group(2).lower()
    return (key, suffix) if suffix == "json" or image_members({suffix: None}) else None


def scan_shard(path: str) -> tuple[int, bool]:
    """``(readable samples, damaged)`` of a local tar shard, from its headers alone.

    Uncompressed tars are checked for member data past the end of the file and for the closing
    zero block (a tar cut at a block boundary otherwise looks complete); compressed ones report a
    cut as a decompression error.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        compressed = f.read(_BLOCK).startswith(COMPRESSED_MAGIC)
        f.seek(max(0, size - _BLOCK))
        closed = compressed or (size >= _BLOCK and f.read(_BLOCK) == bytes(_BLOCK))
    samples, damaged = 0, not closed
    key: str | None = None
    suffixes: set[str] = set()
    try:
        with tarfile.open(path, "r:*") as tar:
            while (info := tar.next()) is not None:
                if not info.isreg():
                    continue
                parsed = _key_and_suffix(info.name)
                if parsed is None:
                    continue
                if not compressed and info.offset_data + info.size > size:
                    damaged = True  # its data is cut: the reader stops before this member
                    break
                if parsed[0] != key:
                    key, suffixes = parsed[0], set()
                    samples += 1
                if parsed[1] in suffixes:  # webdataset stops the shard at a duplicate member
                    damaged = True
                    break
                suffixes.add(parsed[1])
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError):
        damaged = True
    # The reader cannot know the last sample before the damage complete, so it drops it.
    return max(0, samples - 1) if damaged else samples, damaged


@dataclass(frozen=True)
class ShardIndex:
    """Readable samples per shard (``sizes[i]`` for ``urls[i]``) and the damaged shards."""

    urls: tuple[str, ...]
    sizes: tuple[int, ...]
    damaged: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        """Readable samples in all shards."""
        return sum(self.sizes)


def index_shards(urls: Sequence[str]) -> ShardIndex:
    """Scan local shards' tar headers (:func:`scan_shard`); remote URLs raise ``ValueError``."""
    remote = [u for u in urls if "://" in u or u.startswith("pipe:")]
    if remote:
        raise ValueError(
            f"{len(remote)} remote shard(s) ({remote[0]}, ...): exact epochs need each shard's sample "
            "count, read from local tar headers; for remote shards set data.resampled: true and "
            "data.train_samples"
        )
    scanned = [scan_shard(u) for u in urls]
    return ShardIndex(tuple(urls), tuple(n for n, _ in scanned),
                      tuple(u for u, (_, bad) in zip(urls, scanned, strict=True) if bad))


def _seed(*parts: object) -> int:
    # String seeding is stable across processes (unlike hash()) and takes any int, negative too.
    return random.Random(":".join(map(str, parts))).getrandbits(63)


class EpochSplit:
    """One epoch of a sharded dataset cut into ``readers`` equal shares.

    Args:
        sizes: Samples per shard.
        readers: Ranks x DataLoader workers; reader ``r`` is rank ``r // workers``.
        seed: Seed of the shard order and of the permutations within shards.
        epoch: The epoch; with ``seed`` it fixes the whole split.
        multiple: Each share is a multiple of this (the batch size).
        shuffle: Shuffle shards and samples within shards (else both keep their order).
    """

    def __init__(self, sizes: Sequence[int], readers: int, seed: int = 0, epoch: int = 0,
                 multiple: int = 1, shuffle: bool = True) -> None:
        if readers < 1 or multiple < 1:
            raise ValueError(f"need readers >= 1 and multiple >= 1, got {readers}, {multiple}")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.readers, self.seed, self.epoch, self.shuffle = readers, seed, epoch, shuffle
        self.total = int(self.sizes.sum())
        self.per_reader = self.total // readers // multiple * multiple
        self.kept = self.per_reader * readers
        self.dropped = self.total - self.kept
        if self.per_reader == 0:
            raise ValueError(
                f"{self.total} samples cannot give each of {readers} readers (ranks x DataLoader "
                f"workers) {multiple} sample(s) (a batch): use fewer ranks or workers, or more data"
            )
        order = np.arange(len(self.sizes))
        if shuffle:
            order = np.random.default_rng(_seed("shards", seed, epoch)).permutation(order)
        self.order = order
        self._ends = np.cumsum(self.sizes[order])  # end of each shard in the epoch's sequence
        self._offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])  # global id of position 0

    def _positions(self, shard: int, lo: int, hi: int) -> np.ndarray:
        """Sorted positions (in tar order) of the ``lo:hi`` part of ``shard``'s epoch permutation."""
        n = int(self.sizes[shard])
        if not self.shuffle:
            return np.arange(lo, hi)
        perm = np.random.default_rng(_seed("samples", self.seed, self.epoch, shard)).permutation(n)
        return np.sort(perm[lo:hi])

    def share(self, reader: int) -> list[tuple[int, np.ndarray | None]]:
        """Reader ``reader``'s part: ``(shard, sorted positions kept, or None for all)`` in the
        epoch's shard order."""
        if not 0 <= reader < self.readers:
            raise ValueError(f"reader {reader} out of range for {self.readers} readers")
        start, stop = reader * self.per_reader, (reader + 1) * self.per_reader
        first = int(np.searchsorted(self._ends, start, side="right"))
        out: list[tuple[int, np.ndarray | None]] = []
        for k in range(first, len(self.order)):
            shard = int(self.order[k])
            end = int(self._ends[k])
            begin = end - int(self.sizes[shard])
            if begin >= stop:
                break
            lo, hi = max(start, begin) - begin, min(stop, end) - begin
            if hi <= lo:
                continue  # an empty shard
            whole = lo == 0 and hi == end - begin
            out.append((shard, None if whole else self._positions(shard, lo, hi)))
        return out

    def sample_ids(self, reader: int) -> np.ndarray:
        """Global ids (shard offset + position in the shard) of ``reader``'s samples."""
        parts = [self._offsets[shard] + (np.arange(self.sizes[shard]) if keep is None else keep)
                 for shard, keep in self.share(reader)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
