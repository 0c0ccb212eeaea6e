"""Response filters of the distillation pipeline (method.md §2.5): answer, length, reflections.

A teacher's chain is kept only if, in this order,

0. it holds no control-token text (``<|im_end|>``, ``<|image_pad|>``...: training skips such
   samples) -- else ``control_token``;
1. it states a final answer (``\\boxed{...}``, "the answer is ...", "Answer: ...") -- else
   ``no_final_answer``. The project's scorer alone would fall back to the last number in the
   text, which is no statement of an answer, so presence is checked with the strict extractor
   that ``convert`` uses for gold answers;
2. that answer equals the gold one per :func:`tvc_lightning.scoring.score_record` -- else
   ``wrong_answer``;
3. its response is ``min_tokens``..``max_tokens`` tokens long, both ends included, measured with
   the target model's tokenizer (200 and no upper bound by default) -- else ``too_short`` /
   ``too_long``; and the training sample it makes is at most ``max_length`` tokens (8192, training's
   ``data.max_length``) as training counts it -- system prompt, question, images at the training
   pixel limits, every DVR copy it can get and the response (:class:`data_engine.lengths.TrainingLength`)
   -- else ``too_long``. The paper's 8000-token response cap was a stand-in for that limit: a chain
   kept here is never dropped for length by training with the same settings;
4. it holds at most ``max_reflections`` reflection words (25 by default) -- else
   ``too_many_reflections``. Reflection words are the DVR phrase list, matched case-insensitively
   as whole words anywhere in the text ("But wait" counts once, "Waiting" not at all).

Each bound can be switched off: ``min_tokens 0``, ``max_tokens 0``, ``max_length 0``,
``max_reflections -1``, ``require_final_answer false``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from data_engine.convert import extract_answer as strict_answer
from tvc_lightning.data.dvr import DEFAULT_REFLECTION_PHRASES
from tvc_lightning.data.schema import SampleRecord
from tvc_lightning.scoring import score_record

TokenCounter = Callable[[str], int]

# Control tokens of Qwen2-VL's family all look like this; the check when no tokenizer is loaded.
GENERIC_CONTROL = re.compile(r"<\|[A-Za-z0-9_]+\|>")


class SampleLength(Protocol):
    """The training length of a candidate record with its images (see :mod:`data_engine.lengths`)."""

    def __call__(self, record: SampleRecord, images: Sequence[Any]) -> int: ...

# Chain rejection reasons, in the order the checks run. A question none of whose chains passed is
# rejected for the reason of the chain that got furthest (see :func:`furthest`).
REASONS: tuple[str, ...] = (
    "control_token", "no_final_answer", "wrong_answer", "too_short", "too_long", "too_many_reflections",
)


@dataclass
class FilterConfig:
    """Bounds of the response filters (see the module docstring); 0 / -1 / False switch one off."""

    min_tokens: int = 200
    max_tokens: int = 0
    max_reflections: int = 25
    require_final_answer: bool = True
    reflection_phrases: list[str] = field(default_factory=lambda: list(DEFAULT_REFLECTION_PHRASES))
    max_length: int = 8192

    def __post_init__(self) -> None:
        if self.min_tokens < 0 or self.max_tokens < 0 or self.max_length < 0:
            raise ValueError("token bounds must be >= 0 (0 switches a bound off)")
        if self.max_tokens and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} > max_tokens {self.max_tokens}")


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one chain: ``reason`` is None when it passed every filter."""

    reason: str | None
    extracted: str = ""
    tokens: int | None = None  # measured only once the answer checks passed (tokenizing is not free)
    reflections: int | None = None
    length: int | None = None  # the training sample's tokens, when measured

    @property
    def ok(self) -> bool:
        return self.reason is None


def reflection_pattern(phrases: Sequence[str]) -> re.Pattern[str] | None:
    """One case-insensitive whole-word pattern; longest phrase first so "But wait" beats "Wait"."""
    if not phrases:
        return None
    alternatives = sorted((re.escape(p) for p in phrases), key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def count_reflections(text: str, pattern: re.Pattern[str] | None) -> int:
    return 0 if pattern is None else sum(1 for _ in pattern.finditer(text))


class ChainChecker:
    """Apply the filters of ``config`` to teacher chains.

    ``count_tokens`` measures the response; ``training_length`` (optional) the training sample
    that the chain makes, checked against ``config.max_length`` (without it that bound is not
    checked: a rough ``--tokenizer words`` run). ``control`` matches control-token text (default:
    anything shaped like Qwen2-VL's ``<|...|>`` tokens).
    """

    def __init__(self, config: FilterConfig, count_tokens: TokenCounter,
                 training_length: SampleLength | None = None,
                 control: re.Pattern[str] | None = None) -> None:
        self.config = config
        self.count_tokens = count_tokens
        self.training_length = training_length
        self.control = control if control is not None else GENERIC_CONTROL
        self._pattern = reflection_pattern(config.reflection_phrases)

    def check(self, response: str, record: SampleRecord, images: Sequence[Any] = (),
              bridge_spans: tuple[tuple[int, int], ...] | None = None) -> Verdict:
        """Check ``response`` to ``record``'s question; ``images`` and ``bridge_spans`` (offline
        DVR) are what the kept record would carry, for the training length."""
        cfg = self.config
        if self.control.search(response):
            return Verdict("control_token")
        if cfg.require_final_answer and not strict_answer(response):
            return Verdict("no_final_answer")
        extracted, correct = score_record(response, record)
        if not extracted:
            return Verdict("no_final_answer")
        if not correct:
            return Verdict("wrong_answer", extracted)
        tokens = self.count_tokens(response)
        if cfg.min_tokens and tokens < cfg.min_tokens:
            return Verdict("too_short", extracted, tokens)
        if cfg.max_tokens and tokens > cfg.max_tokens:
            return Verdict("too_long", extracted, tokens)
        length = None
        if cfg.max_length and self.training_length is not None:
            kept = dataclasses.replace(record, response=response, bridge_spans=bridge_spans)
            length = self.training_length(kept, images)
            if length > cfg.max_length:
                return Verdict("too_long", extracted, tokens, length=length)
        reflections = count_reflections(response, self._pattern)
        if cfg.max_reflections >= 0 and reflections > cfg.max_reflections:
            return Verdict("too_many_reflections", extracted, tokens, reflections, length)
        return Verdict(None, extracted, tokens, reflections, length)


def furthest(a: str | None, b: str) -> str:
    """The rejection reason of the chain that passed more checks (``a`` wins ties: seen first)."""
    if a is None:
        return b
    rank = {r: i for i, r in enumerate(REASONS)}
    # too_short and too_long are the same check: equal rank.
    rank["too_long"] = rank["too_short"]
    return b if rank.get(b, -1) > rank.get(a, -1) else a


def words(text: str) -> int:
    """Whitespace-separated words: a rough token count for dry runs (``--tokenizer words``)."""
    return len(text.split())


def load_token_counter(spec: str) -> TokenCounter:
    """``words`` or a tokenizer directory / hub id (the target model's) -> a token counter."""
    if spec == "words":
        print("distill: measuring lengths in whitespace words, not tokens (--tokenizer words)",
              file=sys.stderr)
        return words
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"--tokenizer {spec!r}: cannot load a tokenizer there: {e}") from None
    return token_counter(tokenizer, threading.Lock())


def token_counter(tokenizer: Any, lock: Any) -> TokenCounter:
    """Count ``tokenizer``'s tokens of a text under ``lock`` (shared by all users of the tokenizer:
    a fast tokenizer called from several threads can fail "Already borrowed")."""

    def count(text: str) -> int:
        with lock:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count
