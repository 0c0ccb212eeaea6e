"""Write sample records and their images as WebDataset tar shards.

A shard is ``{prefix}-{index:06d}.tar``; sample ``K`` is the member ``K.json``
(:meth:`SampleRecord.to_json`) followed by its images, ``K.jpg``/``K.png`` for one image or
``K.0.jpg``, ``K.1.png``... for several (the layout :func:`tvc_lightning.data.schema.image_members`
reads). Each shard is written under ``NAME.tmp`` and renamed when complete, so a reader listing
``*.tar`` never sees a half-written shard. Member metadata (mtime, owner, mode) is fixed, so the
same samples always give byte-identical shards.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from PIL import Image

from tvc_lightning.data.schema import SampleRecord

ImageInput = bytes | Image.Image

_KEY = re.compile(r"^[A-Za-z0-9_-]{1,80}$")  # 80: member names must fit USTAR's 100 chars
_BLOCK = tarfile.BLOCKSIZE  # 512: header size and data padding unit
_RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the finished archive to a multiple of this
_END = 2 * _BLOCK  # the two zero blocks that end an archive
_MTIME = 1_700_000_000  # fixed (2023-11-14) so shards are reproducible byte for byte


def validate_key(key: str, what: str = "sample key") -> str:
    """Return ``key`` if it is a usable sample key (or shard prefix), else raise ``ValueError``.

    WebDataset splits a member name at the *first* dot into key and extension, so a dot in a key
    would silently split one sample into two; slashes would create directories inside the tar.
    """
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueError(
            f"invalid {what} {key!r}: it must be 1-80 characters of letters, digits, '_' "
            "and '-' (no dots: WebDataset splits member names at the first dot)"
        )
    return key


def sniff_image_format(data: bytes) -> str | None:
    """``"jpg"`` or ``"png"`` from the file signature, else ``None``."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def encode_image(image: ImageInput, fmt: str = "png", quality: int = 90) -> tuple[str, bytes]:
    """Turn an image into ``(extension, bytes)`` for a shard member.

    JPEG/PNG bytes pass through unchanged. Bytes in any other format PIL can read (GIF, BMP,
    WebP...) are decoded and re-encoded as PNG, because readers only accept jpg/jpeg/png. A PIL
    image is encoded as ``fmt`` (``"png"`` or ``"jpg"``); JPEG has no alpha, so it is converted to
    RGB first.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        ext = sniff_image_format(data)
        if ext is not None:
            return ext, data
        try:
            with Image.open(io.BytesIO(data)) as decoded:
                decoded.load()
                return encode_image(decoded.copy(), "png")
        except Exception as e:  # PIL raises many types on bad input; say what it was
            raise ValueError(f"image bytes are not a decodable image: {e}") from e
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        if fmt in ("jpg", "jpeg"):
            image = image if image.mode in ("RGB", "L") else image.convert("RGB")
            image.save(buf, format="JPEG", quality=quality)
            return "jpg", buf.getvalue()
        if fmt == "png":
            image.save(buf, format="PNG")
            return "png", buf.getvalue()
        raise ValueError(f"unsupported image format {fmt!r}; use 'png' or 'jpg'")
    raise TypeError(f"image must be bytes or a PIL image, got {type(image).__name__}")


def _member_bytes(size: int) -> int:
    """Bytes a member of ``size`` data bytes takes in a tar: header plus padded data."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


class ShardWriter:
    """Write samples into size- and count-bounded tar shards, each renamed into place when done.

    Use as a context manager (or call :meth:`close`); the paths of the finished shards are in
    :attr:`shards` and returned by :meth:`close`. If the block raises, the shard being written is
    deleted and shards already finished are kept (the output is then a prefix of the samples).

    Args:
        out_dir: directory for the shards (created if missing).
        prefix: shard name prefix; must be a valid key (no dots).
        maxcount: at most this many samples per shard.
        maxsize: at most this many bytes per shard file; a single sample larger than this still
            gets a shard of its own rather than being dropped.
        overwrite: if false, refuse to start when ``{prefix}-*.tar`` shards already exist in
            ``out_dir`` (mixing runs would silently duplicate samples); if true, an older run's
            shards with indices beyond those written now are deleted when the writer closes or
            aborts.
        image_format: encoding for PIL images (``"png"`` or ``"jpg"``).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        prefix: str,
        maxcount: int = 1000,
        maxsize: int = 1 << 30,
        overwrite: bool = False,
        image_format: str = "png",
    ) -> None:
        if maxcount < 1:
            raise ValueError(f"maxcount must be >= 1, got {maxcount}")
        if maxsize < _RECORD:
            raise ValueError(f"maxsize must be >= {_RECORD} bytes (one tar record), got {maxsize}")
        self.out_dir = Path(out_dir)
        self.prefix = validate_key(prefix, "shard prefix")
        self.maxcount = maxcount
        self.maxsize = maxsize
        self.overwrite = overwrite
        self.image_format = image_format
        self.shards: list[Path] = []
        self.num_samples = 0
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0  # samples in the open shard
        self._size = 0  # bytes of members in the open shard (end blocks and padding excluded)
        self._closed = False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = self._existing_shards()
        if existing and not overwrite:
            raise FileExistsError(
                f"{self.out_dir} already has {len(existing)} shard(s) named {prefix}-*.tar; "
                "use another directory or prefix, or pass overwrite=True (--overwrite)"
            )

    def _existing_shards(self) -> list[Path]:
        pattern = re.compile(rf"^{re.escape(self.prefix)}-\d{{6}}\.tar$")
        return sorted(p for p in self.out_dir.iterdir() if pattern.match(p.name))

    def _final_size(self, members: int) -> int:
        """Size of the shard file if it were closed after adding ``members`` more bytes."""
        return -(-(self._size + members + _END) // _RECORD) * _RECORD

    def write(
        self, key: str, record: SampleRecord, images: Sequence[ImageInput] = ()
    ) -> None:
        """Add one sample: ``record`` as ``key.json`` and ``images`` in order."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        validate_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        members: list[tuple[str, bytes]] = [(f"{key}.json", record.to_json())]
        encoded = [encode_image(img, self.image_format) for img in images]
        if len(encoded) == 1:
            members.append((f"{key}.{encoded[0][0]}", encoded[0][1]))
        else:
            members.extend((f"{key}.{i}.{ext}", data) for i, (ext, data) in enumerate(encoded))
        size = sum(_member_bytes(len(data)) for _, data in members)
        # Roll over before the sample would break a bound; a fresh shard takes any one sample.
        if self._tar is not None and (
            self._count >= self.maxcount or self._final_size(size) > self.maxsize
        ):
            self._finish_shard()
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = _MTIME
            info.mode = 0o444
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(key)
        self._count += 1
        self._size += size
        self.num_samples += 1

    def _shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def _open_shard(self) -> None:
        self._tmp = self._shard_path(len(self.shards)).with_suffix(".tar.tmp")
        # USTAR keeps headers one block each (no PAX extras) so size accounting stays exact;
        # keys are short ASCII, well within its 100-character name limit.
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0
        self._size = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())  # the rename must not land before the data does
        final = self._shard_path(len(self.shards))
        os.replace(self._tmp, final)
        self.shards.append(final)
        self._tar = None
        self._tmp = None

    def _abort_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def close(self) -> list[Path]:
        """Finish the open shard and return the paths of all shards written."""
        if not self._closed:
            if self._tar is not None:
                self._finish_shard()
            self._closed = True
            self._remove_stale()
        return list(self.shards)

    def _remove_stale(self) -> None:
        """Delete leftovers: ``.tmp`` partial shards of a killed run (only a writer makes those
        names), and with ``overwrite`` the older run's shards that this run did not replace."""
        pattern = re.compile(rf"^{re.escape(self.prefix)}-\d{{6}}\.tar\.tmp$")
        for tmp in self.out_dir.iterdir():
            if pattern.match(tmp.name):
                tmp.unlink(missing_ok=True)
        if self.overwrite:
            written = set(self.shards)
            for stale in self._existing_shards():
                if stale not in written:
                    stale.unlink()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._abort_shard()
            self._closed = True
            self._remove_stale()
        else:
            self.close()
