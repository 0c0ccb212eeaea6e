"""One normalized conversation, whatever format it came in, and its sample record.

Every chat format (sharegpt, messages, LLaVA, parquet rows) is parsed into a :class:`Conversation`:
turns of ``system``/``user``/``assistant`` whose text holds ``<image>`` where an image is shown,
plus the image references in placeholder order. :func:`to_record` then checks it and builds the
record:

- one leading system turn becomes ``system``; a system turn elsewhere is refused;
- user and assistant must alternate, from a user turn to an assistant turn;
- the ``<image>`` count over the user turns must equal the number of images (none in answers);
- a single question with all its images in front and one long-CoT answer is a plain record
  (``question``/``response``, the layout TVC's own data has); anything else keeps its turns,
  with the long-CoT answers (``dvr_turns``: the longest, the last, all or none) marked for DVR;
- ``tvc`` metadata (written by ``export``) restores what a chat file cannot hold: the gold answer
  and its type, choices, precision, source, bridge spans and which answers are long-CoT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_engine.items import Converted, Skip, extract_answer, image_from_ref, make_record
from tvc_lightning.data.schema import IMAGE_PLACEHOLDER, Turn, response_turn, turns_question

DVR_TURNS = ("longest", "last", "all", "none")
META_KEY = "tvc"
_LEADING_IMAGES = re.compile(rf"^(?:\s*{re.escape(IMAGE_PLACEHOLDER)})*")


@dataclass
class Conversation:
    """Turns ``(role, text)`` with ``<image>`` placeholders, images in placeholder order."""

    turns: list[tuple[str, str]]
    images: list[Any] = field(default_factory=list)
    id: str | None = None
    meta: dict[str, Any] | None = None


def item_id(item: dict[str, Any], fallback: str) -> str:
    """The item's own ``id`` when it has one, else ``fallback`` (built from its position)."""
    value = item.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and value.strip() else fallback


def meta_of(item: dict[str, Any]) -> dict[str, Any] | None:
    meta = item.get(META_KEY)
    if meta is not None and not isinstance(meta, dict):
        raise Skip("malformed", f"{META_KEY!r} must be an object")
    return meta


def _dvr_marks(answers: list[int], texts: list[str], rule: str, meta: dict[str, Any] | None) -> set[int]:
    """Indices (into the user/assistant turns) of the long-CoT answers."""
    if meta is not None and "dvr" in meta:
        marks = meta["dvr"]
        if not isinstance(marks, list) or not set(marks) <= set(answers):
            raise Skip("malformed", f"{META_KEY}.dvr must list assistant turn indices")
        return set(marks)
    if rule == "none":
        return set()
    if rule == "all":
        return set(answers)
    if rule == "last":
        return {answers[-1]}
    return {max(answers, key=lambda i: (len(texts[i]), -i))}  # the longest; first on ties


def to_record(conv: Conversation, source: str, image_root: Path, dvr_turns: str = "longest") -> Converted:
    """Check ``conv`` and build its record and image bytes; raises :class:`Skip` (see module)."""
    turns = list(conv.turns)
    system = None
    if turns and turns[0][0] == "system":
        system = turns.pop(0)[1]
    roles = [r for r, _ in turns]
    if "system" in roles:
        raise Skip("unsupported_conversation", "a system turn after the conversation's start")
    alternating = roles == [("user", "assistant")[i % 2] for i in range(len(turns))]
    if len(turns) < 2 or not alternating or roles[-1] != "assistant":
        raise Skip("unsupported_conversation",
                   f"expected alternating user/assistant turns ending with an answer, got {roles}")
    texts = [t for _, t in turns]
    answers = [i for i, r in enumerate(roles) if r == "assistant"]
    if any(IMAGE_PLACEHOLDER in texts[i] for i in answers):
        raise Skip("image_in_answer", "an assistant turn holds <image>")
    if any(not texts[i].strip() for i in answers):
        raise Skip("empty_answer", "an assistant turn is empty")
    placeholders = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
    if not conv.images:
        raise Skip("no_image", "the item has no image (training needs one)")
    if placeholders != len(conv.images):
        raise Skip("image_count_mismatch",
                   f"{placeholders} <image> placeholders but {len(conv.images)} images")
    meta = conv.meta or {}
    marks = _dvr_marks(answers, texts, dvr_turns, conv.meta)
    user = texts[0]
    rest = user[_LEADING_IMAGES.match(user).end():]
    plain = (len(turns) == 2 and IMAGE_PLACEHOLDER not in rest and marks == {1}
             and not meta.get("conversation", False))
    fields: dict[str, Any] = {"id": conv.id, "system": system, "source": meta.get("source", source)}
    if plain:
        fields.update(question=rest.strip(), response=texts[1])
    else:
        record_turns = [Turn(r, t, i in marks) for i, (r, t) in enumerate(turns)]
        fields.update(question=turns_question(record_turns),
                      response=record_turns[response_turn(record_turns)].content,
                      turns=[t.to_json() for t in record_turns])
        if not fields["question"]:
            raise Skip("no_question", "no user turn holds text")
    fields["answer"] = meta.get("answer", extract_answer(fields["response"]))
    for name in ("answer_type", "choices", "precision", "bridge_spans"):
        if name in meta:
            fields[name] = meta[name]
    record = make_record(fields)  # checked before the images are read
    return record, [image_from_ref(ref, image_root) for ref in conv.images]

