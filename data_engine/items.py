"""What every input format shares: skipped items, answers, images and validated records.

A converter turns one raw item into ``(SampleRecord, [image bytes])`` or raises :class:`Skip`
with a counter name; the driver (:mod:`data_engine.convert`) counts and reports skips, so a bad
item never stops a conversion.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from typing import Any

from PIL import Image

from data_engine.shards import encode_image
from tvc_lightning.data.schema import InvalidRecord, SampleRecord
from tvc_lightning.scoring import boxed_contents

Item = tuple[str, Any]  # (label for messages: index, pid or line number; the raw item)
Converted = tuple[SampleRecord, list[bytes]]


class Skip(Exception):
    """An item that cannot be converted; ``reason`` is the counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# --- answer extraction -------------------------------------------------------------------------

_ANSWER_IS = re.compile(r"(?:answer\s+is|answer\s*:)\s*:?\s*([^\n]+)", re.IGNORECASE)


def _clean(answer: str) -> str:
    """Drop the sentence's full stop and Markdown/LaTeX wrapping: ``**$7$**.`` -> ``7``."""
    answer = answer.strip().rstrip(".").strip().strip("*").strip()
    if len(answer) > 1 and answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$").strip()
    return answer.rstrip(".").strip()


def extract_answer(response: str) -> str:
    """The gold answer stated by a response: last ``\\boxed{}``, else after the last "answer is".

    Stricter than :func:`tvc_lightning.scoring.extract_answer` on purpose: no last-number guess,
    since this becomes the gold answer of a training record.
    """
    boxed = boxed_contents(response)
    if boxed:
        return boxed[-1]
    matches = list(_ANSWER_IS.finditer(response))
    return _clean(matches[-1].group(1)) if matches else ""


def answer_only(answer: str) -> str:
    """The response of a benchmark record, which has no reasoning chain."""
    return f"The final answer is \\boxed{{{answer}}}."


# --- images ------------------------------------------------------------------------------------


def checked_image(data: bytes, where: str) -> bytes:
    """Image bytes (JPEG/PNG, others re-encoded to PNG), fully decoded once to catch bad files."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # verify() misses truncated data; a full decode does not
        return encode_image(data)[1]
    except Exception as e:  # PIL raises many exception types on bad files
        raise Skip("bad_image", f"{where}: {e}") from None


def load_image(image_root: Path, rel: Any) -> bytes:
    """The checked bytes of the image file ``rel`` under ``image_root``."""
    if not isinstance(rel, str) or not rel:
        raise Skip("malformed", f"image path must be a non-empty string, got {str(rel)[:80]!r}")
    if rel.startswith(("http://", "https://")):
        raise Skip("remote_image", f"{rel[:80]}: images are not downloaded; fetch them first")
    path = image_root / rel.removeprefix("file://")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Skip("missing_image", f"{path}: {e.strerror or e}") from None
    return checked_image(data, str(path))


def image_from_ref(ref: Any, image_root: Path) -> bytes:
    """Checked bytes of an image reference as data sets hold them: a path (relative to
    ``image_root``), a ``data:`` URL, raw bytes, or Hugging Face's ``{"bytes", "path"}``."""
    if isinstance(ref, dict):
        if ref.get("bytes"):
            return checked_image(bytes(ref["bytes"]), f"embedded image {ref.get('path') or ''}")
        ref = ref.get("path")
    if isinstance(ref, bytes | bytearray | memoryview):
        return checked_image(bytes(ref), "embedded image")
    if isinstance(ref, str) and ref.startswith("data:"):
        try:
            data = base64.b64decode(ref.split(",", 1)[1], validate=True)
        except (IndexError, binascii.Error) as e:
            raise Skip("bad_image", f"data URL: {e}") from None
        return checked_image(data, "data URL")
    return load_image(image_root, ref)


# --- records -----------------------------------------------------------------------------------


def make_record(fields: dict[str, Any]) -> SampleRecord:
    """Validate through the schema's parser so converted records obey the same rules as reads."""
    try:
        return SampleRecord.from_json(fields)
    except InvalidRecord as e:
        raise Skip(e.reason, str(e).removeprefix(f"{e.reason}: ")) from None
