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

``system`` and ``turns`` (optional) hold conversations as they come (see :class:`Turn`): a system
prompt (``None``: the trainer's default) and, for anything but one question with its images in
front followed by one answer, the whole conversation, user turns holding ``<image>`` where their
images go. ``question`` and ``response`` stay the record's summary for evaluation and distillation
(the first user text, the long-CoT turn) and must agree with ``turns``. Both fields are written
only when set, so single-turn records keep their JSON and older shards read as before.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

ANSWER_TYPES = ("text", "integer", "float", "list")
ROLES = ("user", "assistant")
IMAGE_PLACEHOLDER = "<image>"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
_IMAGE_MEMBER = re.compile(r"^(?:(\d+)\.)?(jpg|jpeg|png)$")


class InvalidRecord(ValueError):
    """A shard sample that cannot be used; ``reason`` is a short counter name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation record.

    ``content`` of a user turn holds one ``<image>`` per image shown there, in image order;
    assistant turns hold none. ``dvr`` marks an assistant turn as long chain-of-thought: DVR
    re-shows the images seen so far only inside such turns (all assistant turns are learned).
    """

    role: str
    content: str
    dvr: bool = False

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.dvr:
            data["dvr"] = True
        return data


def turns_question(turns: Sequence[Turn]) -> str:
    """A conversation's question: its first user text, without image placeholders, stripped."""
    for turn in turns:
        text = turn.content.replace(IMAGE_PLACEHOLDER, "").strip()
        if turn.role == "user" and text:
            return text
    return ""


def response_turn(turns: Sequence[Turn]) -> int:
    """Index of the turn ``response`` mirrors: the first long-CoT turn, else the last answer."""
    marked = [i for i, t in enumerate(turns) if t.dvr]
    return marked[0] if marked else len(turns) - 1


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
    system: str | None = None
    turns: tuple[Turn, ...] | None = None

    def __post_init__(self) -> None:
        # Checked on construction too, so that replacing the response of a conversation record
        # (dataclasses.replace) without its turn fails here rather than training on stale text.
        if self.turns is not None:
            check_turns(self.turns, self.question, self.response)

    @property
    def image_count(self) -> int | None:
        """Images a conversation record places (``None`` for a single-turn record: any number)."""
        if self.turns is None:
            return None
        return sum(t.content.count(IMAGE_PLACEHOLDER) for t in self.turns)

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
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise InvalidRecord("bad_record", "system must be a string or null")
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
            system=system,
            turns=parse_turns(data.get("turns")),
        )

    def to_json(self) -> bytes:
        data = asdict(self)
        # Unset optional fields are left out: older readers and byte-identical plain records.
        for name in ("bridge_spans", "system", "turns"):
            if data[name] is None:
                del data[name]
        if self.turns is not None:
            data["turns"] = [t.to_json() for t in self.turns]
        return json.dumps(data, ensure_ascii=False).encode("utf-8")


def parse_turns(value: Any) -> tuple[Turn, ...] | None:
    """Turns from a record's JSON ``turns`` (shape only; :func:`check_turns` does the rest)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidRecord("bad_record", "turns must be a list of {role, content} objects or null")
    turns = []
    for item in value:
        if not isinstance(item, dict) or set(item) - {"role", "content", "dvr"}:
            raise InvalidRecord("bad_record", f"turn {str(item)[:60]!r} is not a {{role, content}} object")
        role, content, dvr = item.get("role"), item.get("content"), item.get("dvr", False)
        if role not in ROLES or not isinstance(content, str) or not isinstance(dvr, bool):
            raise InvalidRecord("bad_record", f"turn {str(item)[:60]!r}: role must be one of "
                                f"{ROLES}, content a string, dvr a boolean")
        turns.append(Turn(role, content, dvr))
    return tuple(turns)


def check_turns(turns: Sequence[Turn], question: str, response: str) -> None:
    """Raise :class:`InvalidRecord` unless ``turns`` is a usable conversation agreeing with the
    record's ``question`` and ``response``: user and assistant alternate from a user turn to an
    assistant turn, answers are non-empty and show no image, only answers are marked ``dvr``."""
    if len(turns) < 2 or not all(isinstance(t, Turn) for t in turns):
        raise InvalidRecord("bad_record", "turns must hold at least one user and one assistant turn")
    for i, turn in enumerate(turns):
        if turn.role != ROLES[i % 2] or (turn.role == "user" and turn.dvr):
            raise InvalidRecord("bad_record", f"turn {i}: expected alternating user/assistant "
                                "turns, from a user turn to an assistant turn (dvr only on answers)")
        if turn.role == "assistant" and (not turn.content.strip() or IMAGE_PLACEHOLDER in turn.content):
            raise InvalidRecord("bad_record", f"turn {i}: an answer must be non-empty text without images")
    if turns[-1].role != "assistant":
        raise InvalidRecord("bad_record", "the last turn must be an assistant turn")
    if question != turns_question(turns):
        raise InvalidRecord("bad_record", "question differs from the first user text of turns")
    if response != turns[response_turn(turns)].content:
        raise InvalidRecord("bad_record", "response differs from the long-CoT (else last) answer")


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
