"""The input formats of ``convert`` (and ``distill``): reading, detection and per-item conversion.

:class:`Source` opens an input (JSON, JSON lines or Parquet, streamed), resolves ``auto`` from its
first items and yields ``(label, raw item)``; :func:`convert_item` turns one raw item into
``(record, image bytes)`` or raises :class:`~data_engine.items.Skip`.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_engine import formats_chat
from data_engine.conversation import DVR_TURNS, to_record
from data_engine.formats_bench import convert_mathvision, convert_mathvista
from data_engine.formats_chat import ShareGPTTags
from data_engine.formats_parquet import ParquetRows
from data_engine.items import Converted, Item, Skip
from data_engine.json_stream import JsonItems

CHAT_FORMATS = ("sharegpt", "messages", "llava")
FORMATS = ("auto", *CHAT_FORMATS, "parquet", "mathvista", "mathvision")
_ID_PREFIX = {"sharegpt": "sg", "messages": "msg", "llava": "llava"}
_PROBE = 16  # items looked at to detect a format


@dataclass(frozen=True)
class Options:
    """How items are read: the image folder, sharegpt tags and which answers get DVR."""

    image_root: Path
    tags: ShareGPTTags = field(default_factory=ShareGPTTags)
    dvr_turns: str = "longest"

    def __post_init__(self) -> None:
        if self.dvr_turns not in DVR_TURNS:
            raise ValueError(f"--dvr-turns must be one of {DVR_TURNS}, got {self.dvr_turns!r}")


def item_layout(item: Any, tags: ShareGPTTags, container: str) -> str | None:
    """The format one raw item looks like (``None``: none known)."""
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("messages"), list) and tags.messages != "messages":
        return "messages"
    if isinstance(item.get(tags.messages), list):
        lone_image = tags.images not in item and isinstance(item.get("image"), str)
        return "llava" if lone_image and tags.lenient else "sharegpt"
    if "question" in item and "answer" in item:
        if container == "object" or "pid" in item or "query" in item:
            return "mathvista"
        return "mathvision"
    return None


class Source:
    """An input file's items; ``fmt`` is the format asked for (``auto`` is resolved on open).

    After construction :attr:`format` is the item format (for Parquet, its rows' chat format) and
    :attr:`detected` says how it was found, for the user; :attr:`progress` is ``(done, total,
    unit)`` while iterating.
    """

    def __init__(self, fmt: str, path: Path, tags: ShareGPTTags | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown --format {fmt!r}; one of {FORMATS}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"--input {self.path}: no such file")
        self.tags = tags or ShareGPTTags()
        parquet = fmt == "parquet" or (fmt == "auto" and self.path.suffix.lower() == ".parquet")
        self.reader: JsonItems | ParquetRows = ParquetRows(self.path) if parquet else JsonItems(self.path)
        self.container = "parquet" if parquet else ""
        self._items = iter(self.reader)
        self.format = fmt
        self.detected = ""
        if fmt in ("auto", "parquet"):
            head = list(itertools.islice(self._items, _PROBE))
            self._items = itertools.chain(head, self._items)
            self.format = self._detect([item for _, item in head], fmt)

    def _detect(self, items: list[Any], asked: str) -> str:
        container = self.container or getattr(self.reader, "layout", "")
        votes = Counter(item_layout(i, self.tags, container) for i in items)
        votes.pop(None, None)
        if not votes:
            keys = sorted({k for i in items if isinstance(i, dict) for k in i})[:12]
            raise ValueError(f"{self.path}: cannot tell the format from its first {len(items)} "
                             f"item(s) (keys {keys}); pass --format (and --tags for sharegpt)")
        found, n = votes.most_common(1)[0]
        if self.container == "parquet" and found not in CHAT_FORMATS:
            raise ValueError(f"{self.path}: Parquet rows must be chat items (messages or "
                             f"conversations columns); columns are {self.reader.columns}")
        where = "Parquet rows" if self.container else f"{container or 'JSON'} items"
        self.detected = (f"format {found!r} ({n} of the first {len(items)} {where} of "
                         f"{self.path.name}{' as --format parquet' if asked == 'parquet' else ''})")
        return found

    @property
    def progress(self) -> tuple[int, int, str]:
        if isinstance(self.reader, ParquetRows):
            return self.reader.rows_read, self.reader.num_rows, "rows"
        return self.reader.bytes_read, self.reader.size, "B"

    def __iter__(self) -> Iterator[Item]:
        return self._items


def convert_item(fmt: str, label: str, item: Any, options: Options) -> Converted:
    """One raw item of format ``fmt`` (a resolved one) as ``(record, image bytes)``."""
    if isinstance(item, Skip):
        raise item
    if fmt == "mathvista":
        return convert_mathvista(label, item, options.image_root)
    if fmt == "mathvision":
        return convert_mathvision(label, item, options.image_root)
    fallback = _ID_PREFIX[fmt] + (re.sub(r"\D", "", label) or label)
    if fmt == "sharegpt":
        conv = formats_chat.sharegpt(label, item, options.tags, fallback)
    elif fmt == "llava":
        conv = formats_chat.llava(label, item, fallback)
    else:
        conv = formats_chat.messages(label, item, fallback)
    return to_record(conv, fmt, options.image_root, options.dvr_turns)


def iter_converted(
    fmt: str,
    input_path: Path,
    image_root: Path,
    select: Callable[[str], bool] | None = None,
    options: Options | None = None,
) -> Iterator[tuple[str, Converted | Skip]]:
    """``(label, (record, images))`` per item of ``input_path``, or ``(label, Skip)`` for a bad
    one; items whose label ``select`` refuses are passed over before their images are read.

    These are questions for ``distill``, which asks a teacher one question and replaces the
    response: a one-question conversation becomes a single-turn record (its images in front, as
    the teacher is shown them), longer conversations are skipped (``unsupported_conversation``).

    A whole-input error (unreadable, undetectable format) raises when this is called; broken
    JSON inside an array raises ``ValueError`` when reached.
    """
    options = options or Options(image_root)
    source = Source(fmt, input_path, options.tags)

    def converted() -> Iterator[tuple[str, Converted | Skip]]:
        for label, item in source:
            if select is not None and not select(label):
                continue
            try:
                result: Converted | Skip = _single_question(
                    convert_item(source.format, label, item, options))
            except Skip as e:
                result = e
            yield label, result

    return converted()


def _single_question(converted: Converted) -> Converted:
    record, images = converted
    if record.turns is None:
        return converted
    if len(record.turns) > 2:
        raise Skip("unsupported_conversation", "distill asks one question; this item has more")
    return dataclasses.replace(record, turns=None), images
