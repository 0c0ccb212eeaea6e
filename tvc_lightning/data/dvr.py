"""DVR (Dynamic Visual Reaffirmation): where and how to re-show the image inside a response.

The transform works on the response text only: it chooses injection points (reflection sentences,
else the reasoning midpoint) and a bridging prompt for each, deterministically for
``(seed, epoch, sample id)``. The tokenizer (:mod:`tvc_lightning.data.tokenize`) then writes
``bridge + <|vision_start|> pooled image <|vision_end|>`` at each point.

A response may already hold bridges (offline DVR, ``SampleRecord.bridge_spans``): the image is
shown after each of them whatever ``p`` is (that is the tokenizer's job), they count towards
``max_injections``, and no new injection is planned inside such a bridge or right after it (the
bridge opens with a reflection phrase, and one look at the image per point is the method).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_REFLECTION_PHRASES = [
    "Wait",
    "Hmm",
    "But wait",
    "Let me double-check",
    "Let me verify",
    "Let me re-examine",
    "Let me check",
    "Alternatively",
]

DEFAULT_BRIDGES = [
    "Wait, let me double-check the image.",
    "Let me check the image again.",
    "Let me look at the figure once more.",
]

# The pooling kernel of a re-injected copy unless configured otherwise (TVC's 4x4 pooling).
DEFAULT_POOL_KERNEL = 4

# A sentence starts at the beginning of the text, after a newline, or after ., ! or ? + spaces.
_SENTENCE_START = r"(?:^|(?<=\n)|(?<=[.!?])[ \t]+)"


@dataclass(frozen=True)
class Injection:
    """Insert ``bridge`` and the re-injected image(s) before character ``offset`` of the response."""

    offset: int
    bridge: str


@dataclass
class DVRTransform:
    """Dynamic Visual Reaffirmation, applied on the fly to each training sample.

    Args:
        p: Probability of applying DVR to a sample (0 disables it: the plain-SFT ablation).
        max_injections: At most this many injection points per sample.
        pool_kernel: Average-pooling kernel on the merged visual-token grid of the re-injected copy
            (4 turns 16x16 merged tokens into 4x4; 1 re-injects the image unpooled).
        reflection_phrases: Sentence openings that mark a self-reflection point.
        bridges: Bridging prompts; one is drawn per injection.
        seed: Base seed; the choice is a pure function of (seed, epoch, sample id).
    """

    p: float = 1.0
    max_injections: int = 1
    pool_kernel: int = DEFAULT_POOL_KERNEL
    reflection_phrases: list[str] = field(default_factory=lambda: list(DEFAULT_REFLECTION_PHRASES))
    bridges: list[str] = field(default_factory=lambda: list(DEFAULT_BRIDGES))
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"dvr.p must be in [0, 1], got {self.p}")
        if self.max_injections < 1:
            raise ValueError(f"dvr.max_injections must be >= 1, got {self.max_injections}")
        if self.pool_kernel < 1:
            raise ValueError(f"dvr.pool_kernel must be >= 1, got {self.pool_kernel}")
        if not self.bridges:
            raise ValueError("dvr.bridges must hold at least one bridging prompt")
        phrases = sorted((re.escape(p) for p in self.reflection_phrases), key=len, reverse=True)
        # Whole-word match so "Waiting" or "Hmmm" do not count as "Wait"/"Hmm".
        self._pattern = (
            re.compile(_SENTENCE_START + r"(?=(?:" + "|".join(phrases) + r")\b)")
            if phrases
            else None
        )

    def reflection_points(self, response: str) -> list[int]:
        """Character offsets where a reflection sentence starts (never 0: nothing seen yet)."""
        if self._pattern is None:
            return []
        return sorted({m.end() for m in self._pattern.finditer(response) if m.end() > 0})

    @staticmethod
    def midpoint(response: str) -> int:
        """The sentence start nearest the middle of the response (else its middle word break)."""
        middle = len(response) / 2
        starts = [m.end() for m in re.finditer(r"(?<=[.!?\n])\s+", response) if m.end() < len(response)]
        if not starts:
            starts = [m.end() for m in re.finditer(r"\s+", response) if m.end() < len(response)]
        if not starts:
            return len(response)
        return min(starts, key=lambda s: (abs(s - middle), s))

    def budget(self, stored: Sequence[tuple[int, int]] = ()) -> int:
        """How many injections a plan may add to a response already holding ``stored`` bridges."""
        return max(0, self.max_injections - len(stored))

    def candidates(self, response: str, stored: Sequence[tuple[int, int]] = ()) -> list[int]:
        """Offsets a plan draws from: free reflection points, else the midpoint (none if taken).

        A point inside a stored bridge span, or after it with only whitespace between, is taken:
        the image is already shown there. The midpoint fallback exists so that every sample sees
        the image once more; a response with stored bridges already does.
        """

        def taken(point: int) -> bool:
            return any(start <= point and not response[end:point].strip() for start, end in stored)

        points = [p for p in self.reflection_points(response) if not taken(p)]
        if points or stored:
            return points
        return [self.midpoint(response)]

    def _rng(self, sample_id: str, epoch: int) -> random.Random:
        # hashlib, not hash(): Python's str hash is salted per process (and per DataLoader worker).
        digest = hashlib.sha256(f"{self.seed}:{epoch}:{sample_id}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "little"))

    def plan(
        self, sample_id: str, response: str, epoch: int, stored: Sequence[tuple[int, int]] = ()
    ) -> list[Injection]:
        """The injections for one sample at one epoch, sorted by offset (empty when skipped).

        ``stored``: the response's bridge spans (offline DVR), never planned over (see the module
        docstring). Without them the draws are those of a response that has none.
        """
        rng = self._rng(sample_id, epoch)
        if self.p <= 0.0 or rng.random() >= self.p:
            return []
        points = self.candidates(response, stored)
        budget = self.budget(stored)
        if not points or not budget:
            return []
        chosen = sorted(rng.sample(points, min(budget, len(points))))
        return [Injection(offset, rng.choice(self.bridges)) for offset in chosen]
