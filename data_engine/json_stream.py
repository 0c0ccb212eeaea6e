"""Read the items of a JSON or JSON-lines file one at a time, in memory bounded by one item.

Data sets come as a top-level JSON array (LLaMA-Factory, TVC's 1.5 GB release), a top-level object
of ``key -> item`` (MathVista) or JSON lines (ms-swift). :class:`JsonItems` tells them apart
without loading the file: ``.jsonl``/``.ndjson`` files are lines; otherwise ``[`` opens an array,
and ``{`` opens either one object (its members are the items) or the first of several lines. An
array or object is decoded a window at a time with :meth:`json.JSONDecoder.raw_decode`; the window
only grows while one item is incomplete, up to ``max_item_bytes``.

Labels: the index for an array (``"0"``...), the key for an object, ``"line N"`` for lines. A line
that is not JSON is yielded as a :class:`~data_engine.items.Skip` (the rest is read on); broken
JSON inside an array or object cannot be resynchronized and raises ``ValueError`` naming the file
and the character offset.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from data_engine.items import Item, Skip

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_NUMBER_CHARS = frozenset("0123456789.eE+-")
LINE_SUFFIXES = (".jsonl", ".ndjson")


class JsonItems:
    """Iterate ``(label, item)`` over a JSON/JSON-lines file; :attr:`bytes_read` of :attr:`size`."""

    def __init__(self, path: Path, chunk_bytes: int = 1 << 20, max_item_bytes: int = 1 << 28) -> None:
        self.path = Path(path)
        self.size = self.path.stat().st_size
        self.chunk_bytes = chunk_bytes
        self.max_item_bytes = max_item_bytes
        self.bytes_read = 0
        self.layout = ""  # "array", "object" or "lines" once iteration has started

    def __iter__(self) -> Iterator[Item]:
        with self.path.open("rb") as raw:
            if self.path.suffix.lower() in LINE_SUFFIXES:
                yield from self._lines(raw)
                return
            window = _Window(raw, self)
            first = window.peek()
            if first == "[":
                self.layout = "array"
                yield from window.array()
            elif first == "{":
                kind, whole = window.probe_object()
                if kind == "lines":
                    raw.seek(0)
                    self.bytes_read = 0
                    yield from self._lines(raw)
                elif kind == "whole":
                    self.layout = "object"
                    if not isinstance(whole, dict):
                        raise ValueError(f"{self.path}: expected a JSON object")
                    yield from ((str(k), v) for k, v in whole.items())
                else:
                    self.layout = "object"
                    yield from window.members()
            elif first:
                raise ValueError(f"{self.path}: expected a JSON array, object or JSON lines, "
                                 f"found {first!r} first")

    def _lines(self, raw: BinaryIO) -> Iterator[Item]:
        self.layout = "lines"
        for n, line in enumerate(raw, start=1):
            self.bytes_read += len(line)
            if n == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if not line.strip():
                continue
            try:
                yield f"line {n}", json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield f"line {n}", Skip("malformed", f"not JSON: {e}")


class _Window:
    """A growing text window over the undecoded rest of the file."""

    probe_chars = 1 << 26  # a first object longer than this is taken for the whole file's

    def __init__(self, raw: BinaryIO, owner: JsonItems) -> None:
        self.raw = raw
        self.owner = owner
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf = ""
        self.pos = 0
        self.dropped = 0  # characters before buf[0], for error offsets
        self.eof = False

    def _more(self, at_least: int = 0) -> None:
        size = max(self.owner.chunk_bytes, at_least)
        data = self.raw.read(size)
        self.owner.bytes_read += len(data)
        self.eof = not data
        self.dropped += self.pos
        self.buf = self.buf[self.pos:] + self.decoder.decode(data, final=self.eof)
        self.pos = 0

    def _error(self, what: str, at: int | None = None) -> ValueError:
        offset = self.dropped + (self.pos if at is None else at)
        return ValueError(f"{self.owner.path}: invalid JSON at character {offset}: {what}")

    def peek(self) -> str:
        """The next non-blank character ('' at the end of the file), not consumed."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos:self.pos + 1]
            self._more()

    def value(self, limit: int | None = None) -> Any:
        """Decode the next value; ``None`` if ``limit`` characters did not complete it."""
        limit = self.owner.max_item_bytes if limit is None else limit
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if self.eof:
                    raise self._error(e.msg, e.pos) from None
                if len(self.buf) - self.pos > limit:
                    if limit < self.owner.max_item_bytes:
                        return None
                    raise self._error(f"an item longer than {limit} characters, or broken JSON "
                                      "(raise max_item_bytes if items really are that long)") from None
                # Doubling keeps re-decoding a long item linear overall.
                self._more(len(self.buf) - self.pos)
                continue
            cut = end == len(self.buf) or (
                isinstance(value, int | float) and self.buf[end] in _NUMBER_CHARS
            )
            if cut and not self.eof:
                self._more()  # a number at the window's end ("1" of "1.5") may go on
                continue
            self.pos = end
            return value

    def _expect(self, allowed: str) -> str:
        char = self.peek()
        if not char or char not in allowed:
            raise self._error(f"expected one of {allowed!r}, found {char or 'the end of the file'!r}")
        self.pos += 1
        return char

    def array(self) -> Iterator[Item]:
        self._expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        for index in _count():
            yield str(index), self.value()
            if self._expect(",]") == "]":
                return

    def probe_object(self) -> tuple[str, Any]:
        """Classify a file opening with ``{``: ``("lines", None)`` when more values follow the
        first object, ``("whole", obj)`` when it is the whole file, ``("stream", None)`` when it
        is too long to hold (the position is then back at its ``{`` for :meth:`members`)."""
        start, dropped = self.pos, self.dropped
        first = self.value(limit=self.probe_chars)
        if first is None:
            # Only the text before the '{' (none: peek() stopped on it) was dropped meanwhile.
            self.pos = start - (self.dropped - dropped)
            return "stream", None
        return ("lines", None) if self.peek() else ("whole", first)

    def members(self) -> Iterator[Item]:
        self._expect("{")
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            key = self.value()
            if not isinstance(key, str):
                raise self._error("an object key must be a string")
            self._expect(":")
            yield key, self.value()
            if self._expect(",}") == "}":
                return


def _count() -> Iterator[int]:
    n = 0
    while True:
        yield n
        n += 1
