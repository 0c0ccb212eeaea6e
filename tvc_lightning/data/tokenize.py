"""Turn a sample record and its images into model inputs: chat template, placeholders, labels.

The text is built exactly as Qwen2-VL's chat template and processor build it (system turn, images
as ``<|vision_start|>`` + one ``<|image_pad|>`` per merged token + ``<|vision_end|>`` before the
question, then the assistant turn) and tokenized in one call, so with DVR off the ids equal HF's.
DVR adds ``bridge + <|vision_start|> pooled pads <|vision_end|>`` inside the response; a response
holding stored bridges (offline DVR) gets the pooled image after each of them. Labels come
from character spans through the tokenizer's offsets: the response, the bridging prompts and the
closing ``<|im_end|>`` are learned; image tokens, the system prompt and the question never are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from tvc_lightning.data.dvr import DEFAULT_POOL_KERNEL, DVRTransform, Injection
from tvc_lightning.data.schema import SampleRecord
from tvc_lightning.data.shards import SkipSample
from tvc_lightning.vision import merged_grids, mrope_positions, pooled_grid

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
    """Qwen2-VL chat markers; the defaults are Qwen2-VL-Instruct's."""

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    question_suffix: str = ""
    image_token: str = "<|image_pad|>"
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"

    def image(self, n_tokens: int) -> str:
        return self.vision_start + self.image_token * n_tokens + self.vision_end

    def prompt(self, question: str, image_tokens: list[int]) -> str:
        """Everything before the assistant's first token (``...<|im_start|>assistant\\n``)."""
        images = "".join(self.image(n) for n in image_tokens)
        return (
            f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n"
            f"<|im_start|>user\n{images}{question}{self.question_suffix}<|im_end|>\n"
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
        self.chat = chat or ChatFormat()
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.chat.image_token)
        if not self.tokenizer.is_fast:
            raise ValueError("SampleEncoder needs a fast tokenizer (it reads token offsets)")
        self._special = special_token_pattern(self.tokenizer)
        # Stored bridges are shown like DVR's own copies; without a DVR transform, TVC's kernel.
        self.pool_kernel = dvr.pool_kernel if dvr is not None else DEFAULT_POOL_KERNEL

    def __call__(self, record: SampleRecord, images: list[Image.Image], epoch: int = 0) -> dict:
        self._check(record, images)
        vision = self.image_processor(images=images, return_tensors="pt")
        grids = merged_grids(vision["image_grid_thw"], self.merge_size)
        response, stored = self._response(record)
        plan = self.dvr.plan(record.id, response, epoch, stored) if self.dvr is not None else []
        text, targets, segments = self._layout(record.question, response, grids, stored, plan)
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
            "position_ids": mrope_positions(input_ids, self.image_token_id, seg_grids),
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
            "visual_segments": visual_segments,
            "num_injections": len(stored) + len(plan),
        }

    def longest(self, record: SampleRecord, images: list[Image.Image]) -> int:
        """The most tokens ``record`` encodes to in any epoch: ``max_length`` is checked against this.

        Every plan DVR can draw is measured with the real layout and tokenizer for one injection
        (each free point with each bridge); for ``max_injections > 1`` the largest per-point
        increases are summed (a cut changes the tokenization only next to itself, and cuts sit at
        different sentence starts). Raises :class:`SkipSample` for what ``__call__`` would skip
        regardless of length (no image, control-token text).
        """
        self._check(record, images)
        vision = self.image_processor(images=images, return_tensors="pt")
        grids = merged_grids(vision["image_grid_thw"], self.merge_size)
        response, stored = self._response(record)

        def length(plan: list[Injection]) -> int:
            text = self._layout(record.question, response, grids, stored, plan)[0]
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

        base = length([])
        if self.dvr is None or self.dvr.p <= 0.0:
            return base
        gains = sorted(
            (
                max(length([Injection(point, bridge)]) for bridge in dict.fromkeys(self.dvr.bridges))
                - base
                for point in self.dvr.candidates(response, stored)
            ),
            reverse=True,
        )
        with_dvr = base + sum(gains[: self.dvr.budget(stored)])
        # Below p = 1 some epochs skip DVR: the longer of the two is the bound.
        return with_dvr if self.dvr.p >= 1.0 else max(base, with_dvr)

    def _check(self, record: SampleRecord, images: list[Image.Image]) -> None:
        if not images:
            raise SkipSample("bad_record")
        if self._special.search(record.question) or self._special.search(record.response):
            raise SkipSample("bad_record", f"{record.id}: control-token text in question/response")

    @staticmethod
    def _response(record: SampleRecord) -> tuple[str, list[tuple[int, int]]]:
        """The stripped response and its stored bridge spans moved onto it."""
        response = record.response.strip()
        lead = len(record.response) - len(record.response.lstrip())
        stored = [
            (min(max(a - lead, 0), len(response)), min(max(b - lead, 0), len(response)))
            for a, b in record.bridge_spans or ()
        ]
        return response, stored

    def _layout(
        self,
        question: str,
        response: str,
        grids: list[tuple[int, int]],
        stored: list[tuple[int, int]],
        plan: list[Injection],
    ) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
        """The full text, its learned character spans, and its visual segments in order.

        Images follow each stored bridge (its text is already in the response) and each planned
        bridge (inserted here); a plan never lands on a stored point (see ``DVRTransform``).
        """
        text = self.chat.prompt(question, [h * w for h, w in grids])
        segments = [(i, 1) for i in range(len(grids))]
        targets: list[tuple[int, int]] = []
        k = self.pool_kernel
        points = sorted([(end, "") for _, end in stored] + [(i.offset, i.bridge) for i in plan])
        cursor = 0
        for offset, bridge in points:
            # Response text up to the point, then the bridging prompt (if planned): all learned.
            start = len(text)
            text += response[cursor:offset] + bridge
            targets.append((start, len(text)))
            for i, (h, w) in enumerate(grids):
                ph, pw = pooled_grid(h, w, k)
                text += self.chat.image(ph * pw)
                segments.append((i, k))
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
