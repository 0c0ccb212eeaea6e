"""Reading shard tars safely: shard URLs, raw samples (JSON and image members only), decoding.

Shards are untrusted input (see ``docs/design.md``). Only the JSON member and the image members
of a sample are ever read, decoded with :meth:`SampleRecord.from_json` and PIL; every other member
(``.pickle``, ``.pyd``, ``.npy``...) is skipped unread. Whatever is bad is counted in a
:class:`SkipCounter`; reading goes on. :mod:`tvc_lightning.data.shards` builds the streams on this.
"""

from __future__ import annotations

import glob
import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import braceexpand
import torch
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener

from tvc_lightning.data.epochs import COMPRESSED_MAGIC
from tvc_lightning.data.schema import InvalidRecord, SampleRecord, image_members
from tvc_lightning.data.skips import SkipCounter

__all__ = ["Decoded", "Encode", "Urls", "decode_sample", "dist_rank_world", "iter_shard",
           "resolve_urls"]

log = logging.getLogger(__name__)

# PIL parses many formats; shards only carry .jpg/.png, so refuse every other parser outright.
_IMAGE_FORMATS = ("JPEG", "PNG")
_BLOCK = 512  # tar block size

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
        if not self.eof or self.head.startswith(COMPRESSED_MAGIC):
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
        # Qwen2-VL's image processor refuses aspect ratios beyond 200 (smart_resize raises): such
        # an image is a bad sample here, not an error that kills a DataLoader worker later.
        if max(width, height) > 200 * min(width, height):
            raise ValueError(f"image of {width}x{height}: aspect ratio beyond 200")
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
    except (ValueError, RecursionError) as e:  # json's own limits: huge integers, deep nesting
        counter.add("bad_json")
        log.debug("skip %s: %r", key, e)
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
