"""Turning a model's response into a score.

Three layers, used the same way for synthetic validation samples and for converted benchmark
records (see ``docs/method.md`` §3):

1. :func:`extract_answer` / :func:`extract_answer_with_method` — rule-based extraction of the
   final answer from a free-text response (no LLM), defined in :mod:`tvc_lightning.extraction`
   and re-exported here: the last ``\\boxed{...}``, then "... answer is X", then "Answer: X",
   then (multiple choice only) a leading yes/no or the last standalone option letter, then the
   last list or number; the ``_with_method`` variant also names the rule that fired.
2. :func:`normalize_extracted` / :func:`score_mathvista` — MathVista's official normalisation and
   string-equality score, reproduced exactly (the stored ``true_false`` flags of a MathVista
   results file are regression vectors for it, see ``tests/test_scoring.py``).
3. :func:`score_record` (and :func:`score_record_detailed`, which adds the extraction method) —
   a slightly stricter, type-aware scorer for :class:`SampleRecord`
   (numeric comparison, letters-only MathVision choices, empty answers score wrong), plus the
   :class:`AnswerAccuracy` metric that accumulates its flags across steps and ranks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torchmetrics import Metric

from tvc_lightning.extraction import (
    Extraction,
    _letter_of,
    _match_choice_text,
    _strip_wrapping,
    _text_key,
    _to_number,
    boxed_contents,
    extract_answer,
    extract_answer_with_method,
)

if TYPE_CHECKING:
    from tvc_lightning.data.schema import SampleRecord

__all__ = [
    "AnswerAccuracy",
    "Extraction",
    "RecordScore",
    "boxed_contents",
    "edit_distance",
    "extract_answer",
    "extract_answer_with_method",
    "nearest_choice",
    "normalize_extracted",
    "score_mathvista",
    "score_record",
    "score_record_detailed",
]

# --- MathVista's official normalisation --------------------------------------------------------


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insert/delete/substitute), as ``Levenshtein.distance``."""
    if len(a) < len(b):
        a, b = b, a  # keep the DP row as short as the shorter string
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev_diag, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev_diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev_diag + (ca != cb))
    return row[-1]


def nearest_choice(text: str, choices: Sequence[str]) -> str:
    """The choice closest to ``text`` by edit distance; ties go to the earliest choice."""
    distances = [edit_distance(text, c) for c in choices]
    return choices[distances.index(min(distances))]


def normalize_extracted(
    extraction: Any,
    answer_type: str,
    choices: Sequence[str] | None = None,
    precision: int | float | None = None,
) -> str | None:
    """MathVista's ``normalize_extracted_answer``: the prediction string to compare with ``answer``.

    * multiple choice (``choices`` non-empty): the first ``(x)`` letter anywhere in the extraction
      (either case), or an extraction that *is* an upper-case letter, maps to that choice when in
      range; anything else — an out-of-range letter, ``"N/A"``, even ``""`` — maps to the nearest
      choice by edit distance, so the result is always some choice;
    * ``integer`` -> ``str(int(float(x)))`` (truncates: ``"3.7"`` -> ``"3"``, as the official code);
    * ``float`` -> ``str(round(float(x), precision))`` (``"4.05"``, 1 -> ``"4.0"``);
    * ``list`` -> ``str(x)``; other free-form types -> the extraction unchanged.

    A conversion failure returns None, which scores wrong. Two deliberate deviations where the
    official code would only crash into None: an integral float ``precision`` (``1.0``) is used as
    an int, and a float answer without a precision is not rounded.
    """
    if choices:
        choices = [str(c) for c in choices]
        text = extraction.strip() if isinstance(extraction, str) else str(extraction)
        letters = re.findall(r"\(([a-zA-Z])\)", text)
        if letters:
            text = letters[0].upper()
        options = [chr(ord("A") + i) for i in range(len(choices))]
        if text in options:
            return choices[options.index(text)]
        return nearest_choice(text, choices)
    if isinstance(precision, float) and precision.is_integer():
        precision = int(precision)
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            value = float(extraction)
            return str(value if precision is None else round(value, precision))
        if answer_type == "list":
            return str(extraction)
    except (TypeError, ValueError, OverflowError):  # "N/A", None, "inf" -> int, ...
        return None
    return extraction if isinstance(extraction, str) else None


def score_mathvista(extraction: Any, item: dict[str, Any]) -> bool:
    """MathVista's official score: normalized prediction == ``str(item["answer"])``.

    ``item`` has MathVista's fields ``answer``, ``answer_type``, ``choices``, ``precision`` and
    ``question_type``; choices count only for ``question_type == "multi_choice"`` (when the key is
    absent, non-empty choices mean multiple choice).
    """
    question_type = item.get("question_type")
    is_mc = question_type == "multi_choice" if question_type is not None else bool(item.get("choices"))
    prediction = normalize_extracted(
        extraction,
        item.get("answer_type") or "text",
        item.get("choices") if is_mc else None,
        item.get("precision"),
    )
    return prediction is not None and prediction == str(item["answer"])


# --- scoring the project's own records ---------------------------------------------------------

def _numbers_equal(predicted: float, answer: float, answer_type: str, precision: int | None) -> bool:
    if not (math.isfinite(predicted) and math.isfinite(answer)):
        return False
    if precision is not None:
        return round(predicted, precision) == round(answer, precision)
    if answer_type == "integer":
        return predicted == answer  # exact: "3.0" matches 3, "3.7" does not (MathVista truncates)
    return math.isclose(predicted, answer, rel_tol=1e-6, abs_tol=1e-12)


def _choice_index(text: str, choices: Sequence[str], fuzzy: bool) -> int | None:
    """Which choice ``text`` designates: by its text (ignoring case), by an in-range option letter,
    and, when ``fuzzy``, by MathVista's nearest-choice rule; None when it designates none."""
    named = _match_choice_text(text, choices)
    if named is not None:
        return list(choices).index(named)
    letter = _letter_of(text, len(choices))
    if letter is not None:
        return ord(letter) - ord("A")
    return list(choices).index(nearest_choice(text, choices)) if fuzzy else None


class RecordScore(NamedTuple):
    """One scored response: what was extracted, whether it is right, and which rule extracted it
    (an :func:`extract_answer_with_method` method name)."""

    extracted: str
    correct: bool
    method: str


def score_record(response: str, record: SampleRecord) -> tuple[str, bool]:
    """``(extracted, correct)`` for a model's ``response`` to a :class:`SampleRecord`; see
    :func:`score_record_detailed`, which also returns the extraction method."""
    scored = score_record_detailed(response, record)
    return scored.extracted, scored.correct


def score_record_detailed(response: str, record: SampleRecord,
                          nearest_choice: bool = True) -> RecordScore:
    """:class:`RecordScore` for a model's ``response`` to a :class:`SampleRecord`.

    The answer is extracted knowing the record's choices and answer type (an integer answer
    stated in a sentence is taken as its number; a list answer is never one number).

    * multiple choice: the extraction and the answer each designate a choice (by text, by option
      letter, and — for the extraction, when the choices are real texts — by MathVista's
      nearest-choice rule); correct when both designate the same one. Letters-only choices
      (MathVision's ``["A", ..., "E"]``) never fall back to edit distance: "12" is no letter;
    * ``integer``/``float``: numeric comparison, rounded to ``precision`` when given, else exact
      for integers and within 1e-6 relative for floats;
    * ``list``: equal after dropping whitespace, case and outer brackets;
    * ``text``: equal ignoring case, whitespace, trailing full stop and ``$``/``**`` wrapping, or
      numerically equal when both sides are numbers.

    An empty extraction always scores wrong (MathVista's official rule would map it to the
    shortest choice and sometimes credit it), and so does a statement that none of the choices
    fits (which MathVista would map to the nearest choice by edit distance).

    ``nearest_choice=False`` drops MathVista's nearest-choice fallback altogether (MATH-V's own
    evaluation has none): an extraction then counts only when it names a choice by its text or
    option letter, so "12345" is not credited for being closest to the right option.
    """
    extracted, method = extract_answer_with_method(response, record.choices, record.answer_type)
    correct = _judge(extracted, method, record, nearest_choice)
    return RecordScore(extracted, correct, method)


def _judge(extracted: str, method: str, record: SampleRecord, nearest_choice: bool = True) -> bool:
    """Whether an extraction (found by ``method``) answers ``record`` correctly; see
    :func:`score_record_detailed` for ``nearest_choice``."""
    if not extracted or method.endswith("none_of_choices"):
        return False
    answer, answer_type, precision = record.answer, record.answer_type, record.precision

    if record.choices:
        choices = [str(c) for c in record.choices]
        fuzzy = nearest_choice and not all(len(c.strip()) == 1 for c in choices)
        want = _choice_index(answer, choices, fuzzy=False)
        if want is None:  # an answer outside the choices: compare as text
            return _text_key(extracted) == _text_key(answer)
        return _choice_index(extracted, choices, fuzzy) == want

    if answer_type == "list":

        def key(s: str) -> str:
            return re.sub(r"\s+", "", _strip_wrapping(s)).strip("[]()").casefold()

        return key(extracted) == key(answer)

    predicted, expected = _to_number(extracted), _to_number(answer)
    if answer_type in ("integer", "float") or (predicted is not None and expected is not None):
        if predicted is None or expected is None:
            return False
        return _numbers_equal(predicted, expected, answer_type, precision)
    return _text_key(extracted) == _text_key(answer)


# --- metric ------------------------------------------------------------------------------------


class AnswerAccuracy(Metric):
    """Fraction of answers scored correct, accumulated over steps and summed across ranks.

    ``update`` takes the per-sample flags (a bool tensor of any shape, or a list of bools);
    ``compute`` returns ``correct / total`` as a float tensor, and 0.0 when nothing was scored —
    a number rather than NaN, so that a logger or checkpoint monitor never sees NaN from an empty
    validation run (the ``total`` state tells the two cases apart).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False  # update() does not need the accumulated state
    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Counts, not a running mean, so that the cross-rank reduction is a plain sum.
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor | Sequence[bool]) -> None:
        flags = torch.as_tensor(correct, device=self.correct.device).reshape(-1).to(torch.bool)
        self.correct += flags.sum()
        self.total += flags.numel()

    def compute(self) -> torch.Tensor:
        if int(self.total) == 0:
            return torch.tensor(0.0, device=self.total.device)
        return self.correct.double().div(self.total).float()
