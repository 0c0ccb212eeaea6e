"""Response filters of the distillation pipeline (method.md §2.5): answer, length, reflections.

A teacher's chain is kept only if, in this order,

1. it states a final answer (``\\boxed{...}``, "the answer is ...", "Answer: ...") -- else
   ``no_final_answer``. The project's scorer alone would fall back to the last number in the
   text, which is no statement of an answer, so presence is checked with the strict extractor
   that ``convert`` uses for gold answers;
2. that answer equals the gold one per :func:`tvc_lightning.scoring.score_record` -- else
   ``wrong_answer``;
3. it is ``min_tokens``..``max_tokens`` tokens long, both ends included, measured with the target
   model's tokenizer (dynamic token truncation, 200-8000 by default) -- else ``too_short`` /
   ``too_long``;
4. it holds at most ``max_reflections`` reflection words (25 by default) -- else
   ``too_many_reflections``. Reflection words are the DVR phrase list, matched case-insensitively
   as whole words anywhere in the text ("But wait" counts once, "Waiting" not at all).

Each bound can be switched off: ``min_tokens 0``, ``max_tokens 0``, ``max_reflections -1``,
``require_final_answer false``.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from data_engine.convert import extract_answer as strict_answer
from tvc_lightning.data.dvr import DEFAULT_REFLECTION_PHRASES
from tvc_lightning.data.schema import SampleRecord
from tvc_lightning.scoring import score_record

TokenCounter = Callable[[str], int]

# Chain rejection reasons, in the order the checks run. A question none of whose chains passed is
# rejected for the reason of the chain that got furthest (see :func:`furthest`).
REASONS: tuple[str, ...] = (
    "no_final_answer", "wrong_answer", "too_short", "too_long", "too_many_reflections",
)


@dataclass
class FilterConfig:
    """Bounds of the response filters (see the module docstring); 0 / -1 / False switch one off."""

    min_tokens: int = 200
    max_tokens: int = 8000
    max_reflections: int = 25
    require_final_answer: bool = True
    reflection_phrases: list[str] = field(default_factory=lambda: list(DEFAULT_REFLECTION_PHRASES))

    def __post_init__(self) -> None:
        if self.min_tokens < 0 or self.max_tokens < 0:
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
    """Apply the filters of ``config`` to teacher chains; ``count_tokens`` measures length."""

    def __init__(self, config: FilterConfig, count_tokens: TokenCounter) -> None:
        self.config = config
        self.count_tokens = count_tokens
        self._pattern = reflection_pattern(config.reflection_phrases)

    def check(self, response: str, record: SampleRecord) -> Verdict:
        cfg = self.config
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
        reflections = count_reflections(response, self._pattern)
        if cfg.max_reflections >= 0 and reflections > cfg.max_reflections:
            return Verdict("too_many_reflections", extracted, tokens, reflections)
        return Verdict(None, extracted, tokens, reflections)


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

    lock = threading.Lock()  # a fast tokenizer called from several threads can fail "Already borrowed"

    def count(text: str) -> int:
        with lock:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count
