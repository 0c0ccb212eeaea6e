"""The sample record: one JSON member per shard sample, plus one or more image members.

A shard sample with key ``K`` holds ``K.json`` (this record) and its images as ``K.jpg``/``K.png``
(one image) or ``K.0.jpg``, ``K.1.png``... (several, in index order). Shards are untrusted input:
:meth:`SampleRecord.from_json` validates every field and raises :class:`InvalidRecord` with the
reason, so a reader can skip and count instead of crashing.

``bridge_spans`` (optional) marks a response that already holds DVR bridging prompts, as offline
DVR writes them: each ``[start, end]`` is a character span of ``response`` holding a bridge, and
the image is shown again right after it (at ``end``). Records without the field (all shards
written before it existed) read as ``None`` and behave as before; records with ``None`` are
written without the key, so their JSON is unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

ANSWER_TYPES = ("text", "integer", "float", "list")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
_IMAGE_MEMBER = re.compile(r"^(?:(\d+)\.)?(jpg|jpeg|png)$")


class InvalidRecord(ValueError):
    """A shard sample that cannot be used; ``reason`` is a short counter name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class SampleRecord:
    """One long-CoT training or evaluation sample (the JSON member of a shard sample)."""

    id: str
    question: str
    response: str
    answer: str
    answer_type: str = "text"
    choices: list[str] | None = None
    precision: int | None = None
    source: str = ""
    bridge_spans: tuple[tuple[int, int], ...] | None = None

    @classmethod
    def from_json(cls, data: bytes | str | dict[str, Any]) -> SampleRecord:
        """Parse and validate; raises :class:`InvalidRecord` (reason ``bad_json``/``bad_record``)."""
        if not isinstance(data, dict):
            try:
                data = json.loads(data)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InvalidRecord("bad_json", str(e)) from None
        if not isinstance(data, dict):
            raise InvalidRecord("bad_json", f"expected a JSON object, got {type(data).__name__}")
        for name in ("id", "question", "response", "answer"):
            value = data.get(name)
            if not isinstance(value, str) or (name != "answer" and not value.strip()):
                raise InvalidRecord("bad_record", f"field {name!r} must be a non-empty string")
        answer_type = data.get("answer_type") or "text"
        if answer_type not in ANSWER_TYPES:
            raise InvalidRecord("bad_record", f"answer_type {answer_type!r} not in {ANSWER_TYPES}")
        choices = data.get("choices")
        if choices is not None and (
            not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)
        ):
            raise InvalidRecord("bad_record", "choices must be a list of strings or null")
        precision = data.get("precision")
        if precision is not None and (not isinstance(precision, int) or isinstance(precision, bool)):
            raise InvalidRecord("bad_record", "precision must be an integer or null")
        source = data.get("source") or ""
        if not isinstance(source, str):
            raise InvalidRecord("bad_record", "source must be a string")
        return cls(
            id=data["id"],
            question=data["question"],
            response=data["response"],
            answer=data["answer"],
            answer_type=answer_type,
            choices=list(choices) if choices else None,
            precision=precision,
            source=source,
            bridge_spans=parse_bridge_spans(data.get("bridge_spans"), data["response"]),
        )

    def to_json(self) -> bytes:
        data = asdict(self)
        if data["bridge_spans"] is None:
            del data["bridge_spans"]  # older readers and byte-identical shards for plain records
        return json.dumps(data, ensure_ascii=False).encode("utf-8")


def parse_bridge_spans(value: Any, response: str) -> tuple[tuple[int, int], ...] | None:
    """Validate a record's ``bridge_spans`` against its response; raises :class:`InvalidRecord`.

    Spans must be ``[start, end]`` integer pairs with ``0 <= start < end <= len(response)``, in
    order and not overlapping, each covering some non-blank text (a bridge the model learns to say).
    """
    if value is None:
        return None
    if not isinstance(value, list | tuple):
        raise InvalidRecord("bad_record", "bridge_spans must be a list of [start, end] pairs or null")
    spans: list[tuple[int, int]] = []
    for item in value:
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)
        ):
            raise InvalidRecord("bad_record", f"bridge_spans entry {item!r} is not a [start, end] pair")
        start, end = item
        if not 0 <= start < end <= len(response):
            raise InvalidRecord(
                "bad_record", f"bridge span {[start, end]} outside the response (0..{len(response)})"
            )
        if spans and start < spans[-1][1]:
            raise InvalidRecord("bad_record", "bridge_spans must be sorted and not overlap")
        if not response[start:end].strip():
            raise InvalidRecord("bad_record", f"bridge span {[start, end]} holds no text")
        spans.append((start, end))
    return tuple(spans) or None


def image_members(sample: dict[str, Any]) -> list[str]:
    """The image member names of a WebDataset sample dict, in image order (``jpg`` or ``0.jpg``...)."""
    found: list[tuple[int, str]] = []
    for key in sample:
        m = _IMAGE_MEMBER.match(key)
        if m:
            found.append((int(m.group(1)) if m.group(1) else 0, key))
    return [key for _, key in sorted(found)]
