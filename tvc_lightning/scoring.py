"""Turning a model's response into a score.

Three layers, used the same way for synthetic validation samples and for converted benchmark
records (see ``docs/method.md`` §3):

1. :func:`extract_answer` — rule-based extraction of the final answer from a free-text response
   (no LLM): the last ``\\boxed{...}``, then "... answer is X", then "Answer: X", then (multiple
   choice only) the last standalone option letter, then the last number.
2. :func:`normalize_extracted` / :func:`score_mathvista` — MathVista's official normalisation and
   string-equality score, reproduced exactly (the stored ``true_false`` flags of a MathVista
   results file are regression vectors for it, see ``tests/test_scoring.py``).
3. :func:`score_record` — a slightly stricter, type-aware scorer for :class:`SampleRecord`
   (numeric comparison, letters-only MathVision choices, empty answers score wrong), plus the
   :class:`AnswerAccuracy` metric that accumulates its flags across steps and ranks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torchmetrics import Metric

if TYPE_CHECKING:
    from tvc_lightning.data.schema import SampleRecord

__all__ = [
    "AnswerAccuracy",
    "boxed_contents",
    "edit_distance",
    "extract_answer",
    "nearest_choice",
    "normalize_extracted",
    "score_mathvista",
    "score_record",
]

# --- extraction --------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# The phrases match only the lead-in, not the answer after it: a greedy capture would swallow a
# later restatement on the same line and finditer() would never see it as the last occurrence.
# "the answer is", "final answer is", "the correct answer is"; \s* after the colon may cross a
# newline, so "The final answer is:\n\n(B)" still finds "(B)".
_ANSWER_IS = re.compile(r"\banswer\s+is\b[ \t]*[:：]?\s*", re.IGNORECASE)
# "Answer: X", "Final answer: X", "**Answer:** X", "**Answer**: X".
_ANSWER_COLON = re.compile(r"\banswer\b[ \t]*\**[ \t]*[:：]\s*", re.IGNORECASE)
# A full stop followed by whitespace ends the sentence; a decimal point ("12.5") is never followed
# by whitespace, so it survives.
_SENTENCE_END = re.compile(r"\.(?=\s)")
_OPTION_LETTER = re.compile(
    r"\(([A-Z])\)"  # (B)
    r"|(?i:\b(?:option|choice))\s*[:：]?\s*\(?([A-Z])\b"  # option B, choice (B)
    r"|(?<![\w(])([A-Z])[.:)](?=\s|$)"  # "B." "B:" "B)" as a word of their own
)
# A candidate that *starts* with an option letter: "(B) 12", "B", "B. 12", "B: 12".  A bare capital
# followed by a space is not taken ("A triangle" is a text answer, not option A).
_LEADING_LETTER = re.compile(r"^\(([A-Za-z])\)|^([A-Z])(?:[.:)]|$)")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")


def boxed_contents(text: str) -> list[str]:
    """The stripped contents of every balanced ``\\boxed{...}`` (or ``\\fbox{...}``), in order.

    Braces nest (``\\boxed{\\frac{1}{2}}``) and escaped braces (``\\{``) are ignored; an unclosed
    box is skipped rather than swallowing the rest of the text.
    """
    found = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "\\":
                i += 2  # an escaped character never opens or closes a group
                continue
            depth += {"{": 1, "}": -1}.get(c, 0)
            i += 1
        if depth == 0:
            found.append(text[m.end() : i - 1].strip())
    return found


def _strip_wrapping(answer: str) -> str:
    """Drop whitespace, Markdown bold, a sentence's full stop, ``$``/``\\(...\\)`` math wrapping
    and a ``\\text{...}`` around the whole answer."""
    previous = None
    while answer != previous:  # "**$7$**." needs several passes, in no fixed order
        previous = answer
        answer = answer.strip().strip("*").strip().rstrip(".").strip().strip("$").strip()
        if answer.startswith("\\(") and answer.endswith("\\)"):
            answer = answer[2:-2]
        wrapped = _TEXT_WRAPPER.fullmatch(answer)  # \boxed{\text{B}} is a plain "B"
        if wrapped:
            answer = wrapped.group(1)
    return answer


def _phrase_answer(pattern: re.Pattern[str], response: str) -> str:
    """The cleaned text after the last match of ``pattern``, up to the end of its sentence/line."""
    matches = list(pattern.finditer(response))
    if not matches:
        return ""
    text = response[matches[-1].end() :].split("\n", 1)[0]
    end = _SENTENCE_END.search(text)
    return _strip_wrapping(text[: end.start()] if end else text)


def _letter_of(candidate: str, n_choices: int) -> str | None:
    """The option letter a candidate starts with ("(b) 12" -> "B"), if it is within range."""
    m = _LEADING_LETTER.match(candidate.strip())
    if not m:
        return None
    letter = (m.group(1) or m.group(2)).upper()
    return letter if ord(letter) - ord("A") < n_choices else None


def _match_choice_text(candidate: str, choices: Sequence[str]) -> str | None:
    """The choice equal to ``candidate`` verbatim, else ignoring case and wrapping; else None."""
    if candidate in choices:
        return candidate
    key = _text_key(candidate)
    return next((c for c in choices if _text_key(c) == key), None)


def extract_answer(response: str, choices: Sequence[str] | None = None) -> str:
    """The final answer of a response, by rules (no LLM); ``""`` when nothing is found.

    Rules in priority order (the first that yields a non-empty answer wins, and within a rule the
    *last* occurrence counts, since models restate and correct themselves):

    0. (multiple choice) the whole response is one of ``choices`` -> itself (MathVista's rule);
    1. the last ``\\boxed{...}``;
    2. "... answer is X" (also "final answer is", "correct answer is");
    3. "Answer: X";
    4. (multiple choice) the last standalone option letter: "(B)", "option B", "B." / "B:" / "B)";
    5. the last number ("1,234" -> "1234").

    For rules 2–3 the answer runs to the end of its sentence or line, without a trailing full
    stop, ``$`` or ``**``. With ``choices``, an answer of rules 1–3 that names a choice (ignoring
    case) becomes that choice, and one that starts with an in-range option letter ("(B) 12",
    "B.") becomes the bare letter, which :func:`normalize_extracted` maps to the choice.
    """
    response = response.strip()
    if not response:
        return ""
    choices = [str(c) for c in choices] if choices else None
    if choices and response in choices:
        return response

    boxed = [b for b in boxed_contents(response) if _strip_wrapping(b)]
    for candidate in (
        _strip_wrapping(boxed[-1]) if boxed else "",
        _phrase_answer(_ANSWER_IS, response),
        _phrase_answer(_ANSWER_COLON, response),
    ):
        if not candidate:
            continue
        if choices:
            named = _match_choice_text(candidate, choices)
            if named is not None:
                return named
            letter = _letter_of(candidate, len(choices))
            if letter is not None:
                return letter
        return candidate

    if choices:
        in_range = {chr(ord("A") + i) for i in range(len(choices))}
        letters = [
            next(g for g in m.groups() if g)
            for m in _OPTION_LETTER.finditer(response)
            if next(g for g in m.groups() if g) in in_range
        ]
        if letters:
            return letters[-1]
        if _strip_wrapping(response) in in_range:  # a bare one-letter response, maybe "**B**"
            return _strip_wrapping(response)

    numbers = _NUMBER.findall(response)
    return numbers[-1].replace(",", "") if numbers else ""


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

# Spacing commands, currency/percent/degree signs and \text{unit}s, which never change the number.
_UNIT_NOISE = re.compile(
    r"\\[,!;: ]|\\?\$|\\?%|°|\^\s*\{?\\circ\}?|\\text\s*\{[^{}]*\}|\\mathrm\s*\{[^{}]*\}"
)
_NUM = r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
# A unit is words of letters with an optional exponent ("cm^2", "m/s^2", "square meters"), never
# more numbers or operators, so "3 + 4" and "2 x 3" are not read as 3 and 2.
_UNIT_WORD = r"[^\W\d_]+(?:\^\{?-?\d\}?)?"
_LEADING_NUMBER = re.compile(
    rf"(?:[A-Za-z]\w*\s*=\s*)?({_NUM})(?:\s*{_UNIT_WORD}(?:\s*/\s*{_UNIT_WORD}|\s+{_UNIT_WORD})*)?"
)
_FRACTION = re.compile(rf"({_NUM})\s*/\s*({_NUM})")
_LATEX_FRACTION = re.compile(rf"-?\\d?frac\s*\{{\s*({_NUM})\s*\}}\s*\{{\s*({_NUM})\s*\}}")


def _text_key(text: str) -> str:
    """Free-form text as compared: no wrapping, whitespace collapsed, case-folded."""
    return " ".join(_strip_wrapping(text).split()).casefold()


def _to_number(text: str) -> float | None:
    """A number from an answer string: ``"1,234"``, ``"$13.00"``, ``"45°"``, ``"3/4"``,
    ``"\\frac{3}{4}"``, ``"x = 2"``, ``"12 cm"``; None when it is not one number."""
    text = _UNIT_NOISE.sub("", _strip_wrapping(text))
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text).strip()  # thousands separators only
    try:
        return float(text)
    except ValueError:
        pass
    for pattern in (_LATEX_FRACTION, _FRACTION):
        m = pattern.fullmatch(text)
        if m:
            numerator, denominator = float(m.group(1)), float(m.group(2))
            if denominator == 0:
                return None
            value = numerator / denominator
            return -value if text.startswith("-\\") else value
    m = _LEADING_NUMBER.fullmatch(text)  # a number followed by a unit word
    return float(m.group(1)) if m else None


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


def score_record(response: str, record: SampleRecord) -> tuple[str, bool]:
    """``(extracted, correct)`` for a model's ``response`` to a :class:`SampleRecord`.

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
    shortest choice and sometimes credit it).
    """
    extracted = extract_answer(response, record.choices)
    if not extracted:
        return extracted, False
    answer, answer_type, precision = record.answer, record.answer_type, record.precision

    if record.choices:
        choices = [str(c) for c in record.choices]
        fuzzy = not all(len(c.strip()) == 1 for c in choices)
        want = _choice_index(answer, choices, fuzzy=False)
        if want is None:  # an answer outside the choices: compare as text
            return extracted, _text_key(extracted) == _text_key(answer)
        return extracted, _choice_index(extracted, choices, fuzzy) == want

    if answer_type == "list":

        def key(s: str) -> str:
            return re.sub(r"\s+", "", _strip_wrapping(s)).strip("[]()").casefold()

        return extracted, key(extracted) == key(answer)

    predicted, expected = _to_number(extracted), _to_number(answer)
    if answer_type in ("integer", "float") or (predicted is not None and expected is not None):
        if predicted is None or expected is None:
            return extracted, False
        return extracted, _numbers_equal(predicted, expected, answer_type, precision)
    return extracted, _text_key(extracted) == _text_key(answer)


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
