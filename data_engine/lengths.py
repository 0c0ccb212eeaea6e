"""What the distill filter measures with the target model: training lengths and control text.

Training skips a sample longer than ``data.max_length`` tokens, counting the system prompt, the
question, the images at the processor's pixel limits, the DVR copies (pooled) and the response. So
that a chain the distiller keeps is never dropped there, :class:`TrainingLength` measures a kept
record exactly as training will: with :meth:`tvc_lightning.data.tokenize.SampleEncoder.longest`
(the training encoder's own layout and tokenizer, every DVR plan any epoch can draw), built from
:class:`TrainingShape`, the training settings a length depends on.
"""

from __future__ import annotations

import io
import re
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from data_engine.filters import GENERIC_CONTROL, TokenCounter, load_token_counter, token_counter
from tvc_lightning.data.dvr import (
    DEFAULT_BRIDGES,
    DEFAULT_POOL_KERNEL,
    DEFAULT_REFLECTION_PHRASES,
    DVRTransform,
)
from tvc_lightning.data.schema import SampleRecord
from tvc_lightning.data.tokenize import ChatFormat, SampleEncoder, special_token_pattern
from tvc_lightning.families import family_of_processor


@dataclass
class TrainingShape:
    """The training settings (``data.*`` of a training config) a sample's length depends on.

    ``max_injections`` 0 stands for training without DVR (``data.dvr.p 0``); any ``p > 0`` is
    measured at its longest, as if every epoch applied DVR.
    """

    max_length: int = 8192
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_injections: int = 1
    pool_kernel: int = DEFAULT_POOL_KERNEL
    question_suffix: str = ""
    bridges: list[str] = field(default_factory=lambda: list(DEFAULT_BRIDGES))
    reflection_phrases: list[str] = field(default_factory=lambda: list(DEFAULT_REFLECTION_PHRASES))

    def __post_init__(self) -> None:
        if self.max_length < 0 or self.max_injections < 0:
            raise ValueError("--max-length and --dvr-max-injections must be >= 0")

    def dvr(self) -> DVRTransform:
        return DVRTransform(
            p=1.0 if self.max_injections else 0.0, max_injections=max(1, self.max_injections),
            pool_kernel=self.pool_kernel, reflection_phrases=list(self.reflection_phrases),
            bridges=list(self.bridges),
        )


def _pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(io.BytesIO(bytes(image))) as im:
        return im.convert("RGB")


class TrainingLength:
    """``measure(record, images) -> tokens``: the longest encoding training can give ``record``.

    ``images`` may be JPEG/PNG bytes (as shards hold them) or PIL images. Thread-safe: one lock
    guards the tokenizer, which ``lock`` lets a token counter of the same tokenizer share.
    """

    def __init__(self, processor: Any, shape: TrainingShape, lock: Any | None = None) -> None:
        self.shape = shape
        self.encoder = SampleEncoder(
            processor, max_length=shape.max_length, dvr=shape.dvr(),
            chat=ChatFormat.for_family(family_of_processor(processor),
                                       question_suffix=shape.question_suffix),
        )
        self.lock = lock if lock is not None else threading.Lock()

    def __call__(self, record: SampleRecord, images: Sequence[Any]) -> int:
        pil = [_pil(im) for im in images]
        with self.lock:
            return self.encoder.longest(record, pil)


@dataclass
class Measures:
    """What the distill filter measures with: response tokens, control text, training length."""

    count_tokens: TokenCounter
    control: re.Pattern[str]
    training_length: TrainingLength | None


def load_measures(spec: str, shape: TrainingShape) -> Measures:
    """Measures from ``--tokenizer`` (``words`` or the target checkpoint) and the training shape.

    A checkpoint directory must hold the image processor too when ``shape.max_length`` is set
    (images are part of the training length); ``words`` cannot measure a training length, so only
    the response bounds apply then.
    """
    if spec == "words":
        if shape.max_length:
            print("distill: --tokenizer words cannot measure training lengths: --max-length is "
                  "not checked", file=sys.stderr)
        return Measures(load_token_counter(spec), GENERIC_CONTROL, None)
    if not shape.max_length:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"--tokenizer {spec!r}: cannot load a tokenizer there: {e}") from None
        return Measures(token_counter(tokenizer, threading.Lock()), special_token_pattern(tokenizer), None)
    from tvc_lightning.hf import load_processor

    try:
        processor = load_processor(spec, shape.min_pixels, shape.max_pixels)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"--tokenizer {spec!r}: cannot load the target model's tokenizer and image processor "
            f"there ({e}); they are needed to measure training lengths (--max-length 0 measures "
            "the response alone)"
        ) from None
    length = TrainingLength(processor, shape)
    return Measures(token_counter(processor.tokenizer, length.lock),
                    special_token_pattern(processor.tokenizer), length)
