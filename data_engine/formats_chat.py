"""Chat-format items as :class:`~data_engine.conversation.Conversation`: sharegpt, messages, LLaVA.

- ``sharegpt`` (LLaMA-Factory; TVC's release): ``{"conversations": [{"from": "human", "value":
  "<image>..."}, {"from": "gpt", "value": ...}], "system": ..., "images": [...]}``. Other key and
  role names come from ``--tags``, a JSON object shaped like a LLaMA-Factory ``dataset_info.json``
  entry's ``columns`` and ``tags`` (``{"columns": {"messages": "conversations", "images":
  "images", "system": "system"}, "tags": {"role_tag": "from", "content_tag": "value",
  "user_tag": "human", "assistant_tag": "gpt", "system_tag": "system"}}``, or those keys flat).
  Without ``--tags``, ``role``/``content`` and ``user``/``assistant`` are accepted too.
- ``messages`` (OpenAI style; ms-swift's and LLaMA-Factory's default): ``{"messages": [{"role":
  "system"|"user"|"assistant", "content": ...}], "images": [...]}`` where ``content`` is a string
  with ``<image>`` placeholders or a list of ``{"type": "text", "text"}`` and ``{"type": "image"}``
  parts (an image part may carry its own ``image``/``image_url``, used when there is no
  ``images`` list).
- ``llava`` (LLaVA-Instruct): ``{"id", "image": "path", "conversations": [from/value turns]}``.

Images are paths (relative to ``--image-root``), ``data:`` URLs, bytes or ``{"bytes", "path"}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from data_engine.conversation import Conversation, item_id, meta_of
from data_engine.items import Skip
from tvc_lightning.data.schema import IMAGE_PLACEHOLDER


@dataclass(frozen=True)
class ShareGPTTags:
    """Where a sharegpt item keeps its parts (LLaMA-Factory's ``columns`` and ``tags``)."""

    messages: str = "conversations"
    images: str = "images"
    system: str = "system"
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    system_tag: str = "system"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    lenient: bool = True  # also role/content keys and user/assistant names (no --tags given)

    @classmethod
    def parse(cls, text: str | None) -> ShareGPTTags:
        """Tags from ``--tags``: inline JSON or a path to a JSON file; errors name the flag."""
        if text is None:
            return cls()
        path = Path(text)
        try:
            raw = json.loads(path.read_text(encoding="utf-8") if path.is_file() else text)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--tags: neither a JSON object nor a JSON file: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError("--tags: expected a JSON object")
        flat = {k: v for k, v in raw.items() if k not in ("columns", "tags", "formatting")}
        for part in ("columns", "tags"):
            flat.update(raw.get(part) or {})
        known = {f.name for f in fields(cls)} - {"lenient"}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"--tags: unknown key(s) {unknown}; known: {sorted(known)}")
        if not all(isinstance(v, str) and v for v in flat.values()):
            raise ValueError("--tags: every value must be a non-empty string")
        return cls(**flat, lenient=False)

    def role(self, turn: dict[str, Any]) -> tuple[str, Any]:
        """``(our role, content)`` of one turn; raises :class:`Skip` for other roles."""
        name = turn.get(self.role_tag)
        content = turn.get(self.content_tag)
        if self.lenient and name is None:
            name, content = turn.get("role"), turn.get("content")
        roles = {self.user_tag: "user", self.assistant_tag: "assistant", self.system_tag: "system"}
        if self.lenient:
            roles = {"user": "user", "assistant": "assistant", **roles}
        if name in (self.observation_tag, self.function_tag, "tool", "function"):
            raise Skip("unsupported_conversation", f"tool turn {name!r}")
        if name not in roles:
            raise Skip("malformed", f"unsupported turn role {str(name)[:40]!r}")
        return roles[name], content


def _image_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    return [value]  # LLaVA's single "image" path, or one embedded image


def sharegpt(label: str, item: Any, tags: ShareGPTTags, fallback_id: str) -> Conversation:
    """A sharegpt (or LLaVA, ``tags.images == "image"``) item as a conversation."""
    if not isinstance(item, dict) or not isinstance(item.get(tags.messages), list):
        raise Skip("malformed", f"expected an object with a {tags.messages!r} list")
    turns: list[tuple[str, str]] = []
    system = item.get(tags.system)
    if isinstance(system, str) and system.strip():
        turns.append(("system", system))
    for turn in item[tags.messages]:
        if not isinstance(turn, dict):
            raise Skip("malformed", "a conversation turn is not an object")
        role, content = tags.role(turn)
        if not isinstance(content, str):
            raise Skip("malformed", f"turn content is not a string: {str(turn)[:80]!r}")
        turns.append((role, content))
    images = item.get(tags.images)
    if images is None and tags.lenient:
        images = item.get("image")  # LLaVA's key
    return Conversation(turns, _image_list(images), item_id(item, fallback_id), meta_of(item))


def llava(label: str, item: Any, fallback_id: str) -> Conversation:
    """A LLaVA-Instruct item: sharegpt turns with one ``image`` path."""
    return sharegpt(label, item, ShareGPTTags(images="image"), fallback_id)


def _parts(content: Any, inline: list[Any]) -> str:
    """Message content as text with ``<image>`` placeholders; inline image references collected."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Skip("malformed", "message content must be a string or a list of parts")
    text = ""
    for part in content:
        if isinstance(part, str):
            text += part
            continue
        if not isinstance(part, dict):
            raise Skip("malformed", "a content part is not an object")
        kind = part.get("type")
        if kind == "text" or (kind is None and "text" in part):
            if not isinstance(part.get("text"), str):
                raise Skip("malformed", "a text part without 'text'")
            text += part["text"]
        elif kind in ("image", "image_url") or "image" in part or "image_url" in part:
            ref = part.get("image", part.get("image_url"))
            if isinstance(ref, dict) and "url" in ref:
                ref = ref["url"]
            inline.append(ref)
            text += IMAGE_PLACEHOLDER
        else:
            raise Skip("unsupported_content", f"content part of type {kind!r}")
    return text


def messages(label: str, item: Any, fallback_id: str) -> Conversation:
    """An OpenAI-style ``messages`` item as a conversation."""
    if not isinstance(item, dict) or not isinstance(item.get("messages"), list):
        raise Skip("malformed", "expected an object with a 'messages' list")
    turns: list[tuple[str, str]] = []
    inline: list[Any] = []
    for message in item["messages"]:
        if not isinstance(message, dict):
            raise Skip("malformed", "a message is not an object")
        role = message.get("role")
        if role in ("tool", "function") or message.get("tool_calls"):
            raise Skip("unsupported_conversation", f"tool message {role!r}")
        if role not in ("system", "user", "assistant"):
            raise Skip("malformed", f"unsupported message role {str(role)[:40]!r}")
        turns.append((role, _parts(message.get("content"), inline)))
    images = item.get("images")
    if images is None:
        images = item.get("image")
    images = _image_list(images)
    if not images and any(ref is not None for ref in inline):
        images = inline
    return Conversation(turns, images, item_id(item, fallback_id), meta_of(item))
