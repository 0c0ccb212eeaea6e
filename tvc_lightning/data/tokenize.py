"""Turn a sample record and its images into model inputs: chat template, placeholders, labels.

The text is built exactly as Qwen2-VL's chat template and processor build it (system turn, images
as ``<|vision_start|>`` + one ``<|image_pad|>`` per merged token + ``<|vision_end|>`` before the
question, then the assistant turn) and tokenized in one call, so with DVR off the ids equal HF's.
DVR adds ``bridge + <|vision_start|> pooled pads <|vision_end|>`` inside the response; a response
holding stored bridges (offline DVR) gets the pooled image after each of them. Labels come
from character spans through the tokenizer's offsets: the response, the bridging prompts and the
closing ``<|im_end|>`` are learned; image tokens, the system prompt and the question never are.

Conversation records (``turns``) are rendered the way the chat template renders their messages:
the record's system prompt (else the default), each user turn with its images where its
``<image>`` placeholders are, each assistant turn learned with its ``<|im_end|>``. DVR plans only
inside long-CoT turns (``Turn.dvr``; a single-turn record's response is one), re-showing the
images seen so far; the question suffix goes to the user turn each of them answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from tvc_lightning.data.dvr import DEFAULT_POOL_KERNEL, DVRTransform, Injection
from tvc_lightning.data.schema import IMAGE_PLACEHOLDER, SampleRecord, response_turn
from tvc_lightning.data.shards import SkipSample
from tvc_lightning.families import ModelFamily, family_of_processor
from tvc_lightning.vision import merged_grids, pooled_grid

IGNORE_INDEX = -100
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def special_token_pattern(tokenizer: Any) -> re.Pattern[str]:
    """Matches any added/special token string (``<|im_end|>``, ``<|image_pad|>``...) of ``tokenizer``.

    Sample text is untrusted: such a string inside a question or response would be tokenized as
    the real control token (an end of turn mid-answer, an image placeholder without an image).
    """
    tokens = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in tokens) or r"(?!)")


@dataclass
class ChatFormat:
    """Qwen VL chat markers; the defaults are Qwen2-VL-Instruct's (:meth:`for_family`: a family's).

    ``system_prompt`` None writes no system turn (Qwen3-VL's template adds none by default).
    """

    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    question_suffix: str = ""
    image_token: str = "<|image_pad|>"
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"

    @classmethod
    def for_family(cls, family: type[ModelFamily], system_prompt: str | None = None,
                   **kwargs: Any) -> ChatFormat:
        """The format of ``family``'s chat template: ``system_prompt`` None means the family's
        default system turn (Qwen2-VL and Qwen2.5-VL: "You are a helpful assistant."; Qwen3-VL:
        none)."""
        system = family.default_system_prompt if system_prompt is None else system_prompt
        return cls(system_prompt=system, **kwargs)

    def system_turn(self, system: str | None) -> str:
        return "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"

    def image(self, n_tokens: int) -> str:
        return self.vision_start + self.image_token * n_tokens + self.vision_end

    def prompt(self, question: str, image_tokens: list[int]) -> str:
        """Everything before the assistant's first token (``...<|im_start|>assistant\\n``)."""
        images = "".join(self.image(n) for n in image_tokens)
        return (
            self.system_turn(self.system_prompt)
            + f"<|im_start|>user\n{images}{question}{self.question_suffix}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )


class SampleEncoder:
    """Encode one record (+ PIL images) for training; callable as ``encode(record, images, epoch)``.

    Returns a dict of unbatched tensors: ``input_ids``, ``labels``, ``position_ids`` (3, L),
    ``pixel_values``, ``image_grid_thw``, ``visual_segments`` (rows ``(image index, kernel)``) and
    ``num_injections`` (stored bridges included). Raises ``SkipSample("too_long")`` beyond
    ``max_length`` tokens. A record's stored bridges (``bridge_spans``, offline DVR) are followed by
    the images, pooled with the DVR kernel, whether or not this epoch's plan applies DVR;
    :meth:`longest` is the most tokens any epoch can give a sample (what the distill filter checks).
    """

    def __init__(
        self,
        processor: Any,
        max_length: int = 8192,
        dvr: DVRTransform | None = None,
        chat: ChatFormat | None = None,
    ) -> None:
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.merge_size = int(self.image_processor.merge_size)
        self.max_length = max_length
        self.dvr = dvr
        family = family_of_processor(processor)
        self.chat = chat or ChatFormat.for_family(family)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.chat.image_token)
        self.positions = family.positions
        if not self.tokenizer.is_fast:
            raise ValueError("SampleEncoder needs a fast tokenizer (it reads token offsets)")
        self._special = special_token_pattern(self.tokenizer)
        # Stored bridges are shown like DVR's own copies; without a DVR transform, TVC's kernel.
        self.pool_kernel = dvr.pool_kernel if dvr is not None else DEFAULT_POOL_KERNEL

    def __call__(self, record: SampleRecord, images: list[Image.Image], epoch: int = 0) -> dict:
        self._check(record, images)
        vision = self.image_processor(images=images, return_tensors="pt")
        grids = merged_grids(vision["image_grid_thw"], self.merge_size)
        turns = self._turns(record, len(images))
        plans = {
            i: self.dvr.plan(t.plan_id, t.text, epoch, t.stored)
            for i, t in enumerate(turns) if t.dvr and t.shown and self.dvr is not None
        }
        text, targets, segments = self._layout(record, turns, grids, plans)
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        input_ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        if input_ids.numel() > self.max_length:
            raise SkipSample("too_long")
        labels = self._labels(input_ids, enc["offset_mapping"], targets)
        visual_segments = torch.tensor(segments, dtype=torch.long).reshape(-1, 2)
        seg_grids = [pooled_grid(*grids[i], k) for i, k in segments]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": self.positions(input_ids, self.image_token_id, seg_grids),
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
            "visual_segments": visual_segments,
            "num_injections": sum(len(t.stored) for t in turns)
            + sum(len(p) for p in plans.values()),
        }

    def longest(self, record: SampleRecord, images: list[Image.Image]) -> int:
        """The most tokens ``record`` encodes to in any epoch: ``max_length`` is checked against this.

        Every plan DVR can draw is measured with the real layout and tokenizer for one injection
        (each free point with each bridge); for ``max_injections > 1`` the largest per-point
        increases are summed (a cut changes the tokenization only next to itself, and cuts sit at
        different sentence starts), and so are those of each long-CoT turn of a conversation.
        Raises :class:`SkipSample` for what ``__call__`` would skip regardless of length (no
        image, control-token text).
        """
        self._check(record, images)
        vision = self.image_processor(images=images, return_tensors="pt")
        grids = merged_grids(vision["image_grid_thw"], self.merge_size)
        turns = self._turns(record, len(images))

        def length(plans: dict[int, list[Injection]]) -> int:
            text = self._layout(record, turns, grids, plans)[0]
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

        base = length({})
        if self.dvr is None or self.dvr.p <= 0.0:
            return base
        with_dvr = base
        for i, turn in enumerate(turns):
            if not (turn.dvr and turn.shown):
                continue
            gains = sorted(
                (
                    max(length({i: [Injection(point, b)]}) for b in dict.fromkeys(self.dvr.bridges))
                    - base
                    for point in self.dvr.candidates(turn.text, turn.stored)
                ),
                reverse=True,
            )
            with_dvr += sum(gains[: self.dvr.budget(turn.stored)])
        # Below p = 1 some epochs skip DVR: the longer of the two is the bound.
        return with_dvr if self.dvr.p >= 1.0 else max(base, with_dvr)

    def _check(self, record: SampleRecord, images: list[Image.Image]) -> None:
        if not images:
            raise SkipSample("bad_record")
        texts = [record.question, record.response, record.system or ""]
        texts += [t.content for t in record.turns or ()]
        if any(self._special.search(t) for t in texts):
            raise SkipSample("bad_record", f"{record.id}: control-token text in the conversation")
        if record.image_count is not None and record.image_count != len(images):
            raise SkipSample("bad_record", f"{record.id}: {record.image_count} <image> placeholders "
                             f"but {len(images)} images")

    def _turns(self, record: SampleRecord, n_images: int) -> list[_Turn]:
        """The record as turns to render; a single-turn record is its images, question, response."""
        if record.turns is None:
            text, stored = _stripped(record.response, record.bridge_spans)
            question = record.question + self.chat.question_suffix
            return [_Turn("user", [*range(n_images), question]),
                    _Turn("assistant", [text], True, record.id, stored, n_images)]
        turns: list[_Turn] = []
        main = response_turn(record.turns)
        shown = 0
        for i, turn in enumerate(record.turns):
            if turn.role == "user":
                pieces: list[str | int] = []
                for j, text in enumerate(turn.content.split(IMAGE_PLACEHOLDER)):
                    if j:
                        pieces.append(shown)
                        shown += 1
                    pieces.append(text)
                answered_by_cot = i + 1 < len(record.turns) and record.turns[i + 1].dvr
                if answered_by_cot:
                    pieces.append(self.chat.question_suffix)
                turns.append(_Turn("user", pieces))
                continue
            spans = record.bridge_spans if i == main else None
            text, stored = _stripped(turn.content, spans)
            plan_id = record.id if i == main else f"{record.id}#{i}"
            turns.append(_Turn("assistant", [text], turn.dvr, plan_id, stored, shown))
        return turns

    def _layout(
        self,
        record: SampleRecord,
        turns: list[_Turn],
        grids: list[tuple[int, int]],
        plans: dict[int, list[Injection]],
    ) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
        """The full text, its learned character spans, and its visual segments in order.

        Images follow each stored bridge (its text is already in the response) and each planned
        bridge (inserted here); a plan never lands on a stored point (see ``DVRTransform``).
        """
        system = self.chat.system_prompt if record.system is None else record.system
        text = self.chat.system_turn(system)
        segments: list[tuple[int, int]] = []
        targets: list[tuple[int, int]] = []
        k = self.pool_kernel
        for i, turn in enumerate(turns):
            text += f"<|im_start|>{turn.role}\n"
            if turn.role == "user":
                for piece in turn.pieces:
                    if isinstance(piece, str):
                        text += piece
                    else:
                        h, w = grids[piece]
                        text += self.chat.image(h * w)
                        segments.append((piece, 1))
                text += "<|im_end|>\n"
                continue
            response = turn.pieces[0]
            assert isinstance(response, str)
            points = sorted([(end, "") for _, end in turn.stored]
                            + [(p.offset, p.bridge) for p in plans.get(i, [])])
            cursor = 0
            for offset, bridge in points:
                # Response text up to the point, then the bridging prompt (if planned): all learned.
                start = len(text)
                text += response[cursor:offset] + bridge
                targets.append((start, len(text)))
                for j in range(turn.shown):
                    ph, pw = pooled_grid(*grids[j], k)
                    text += self.chat.image(ph * pw)
                    segments.append((j, k))
                cursor = offset
            start = len(text)
            text += response[cursor:] + "<|im_end|>"
            targets.append((start, len(text)))
            text += "\n"
        return text, targets, segments

    def _labels(
        self, input_ids: torch.Tensor, offsets: list[tuple[int, int]], targets: list[tuple[int, int]]
    ) -> torch.Tensor:
        starts = torch.tensor([s for s, _ in offsets], dtype=torch.long)
        learned = torch.zeros_like(input_ids, dtype=torch.bool)
        for a, b in targets:
            learned |= (starts >= a) & (starts < b)
        # Image placeholders are never learned, even if a span were ever to cover one.
        learned &= input_ids != self.image_token_id
        return torch.where(learned, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


@dataclass
class _Turn:
    """A turn ready to render: user ``pieces`` are text and image indices; an assistant turn's
    single piece is its stripped text, with its stored bridges, DVR eligibility and the number of
    images ``shown`` before it (those DVR shows again)."""

    role: str
    pieces: list[str | int]
    dvr: bool = False
    plan_id: str = ""
    stored: list[tuple[int, int]] = field(default_factory=list)
    shown: int = 0

    @property
    def text(self) -> str:
        return str(self.pieces[0])


def _stripped(response: str, spans: Any) -> tuple[str, list[tuple[int, int]]]:
    """A response stripped of surrounding blanks and its stored bridge spans moved onto it."""
    text = response.strip()
    lead = len(response) - len(response.lstrip())
    stored = [(min(max(a - lead, 0), len(text)), min(max(b - lead, 0), len(text)))
              for a, b in spans or ()]
    return text, stored
