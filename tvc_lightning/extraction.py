"""Rule-based extraction of the final answer from a free-text response (no LLM).

:func:`extract_answer_with_method` returns the answer together with the name of the rule that
produced it; :func:`extract_answer` returns the answer alone. Both are re-exported by
:mod:`tvc_lightning.scoring`, which scores what they extract.

Method names are ``"rule:<source>"`` for the rule that found the answer, with ``"/<refinement>"``
appended when the found text was then turned into something else:

* sources: ``exact_choice`` (the whole response is a choice), ``boxed``, ``answer_is``,
  ``answer_colon``, ``leading_yes_no`` (a response that opens with "Yes,"/"No," over polar
  choices), ``choice_letter`` (the last standalone option letter), ``bare_letter``,
  ``none_of_choices``, ``last_list``, ``last_number``;
* refinements: ``choice_text`` (the text names a choice), ``choice_letter`` (it starts with an
  option letter), ``yes_no``, ``none_of_choices``, ``number`` (a number taken out of a sentence
  for an integer/float answer), ``list`` (a list brought to ``[a, b]`` form);
* ``"none"`` when nothing was found (the answer is then ``""``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
    "Extraction",
    "boxed_contents",
    "extract_answer",
    "extract_answer_with_method",
    "strip_control_tokens",
]


class Extraction(NamedTuple):
    """An extracted answer and the rule that produced it (see the module docstring)."""

    answer: str
    method: str


# --- patterns ----------------------------------------------------------------------------------

# Chat/end-of-sequence tokens that a decoder left in the text. They are replaced by a line break,
# not deleted, because each one ends a turn: "4.</s>" must read as the sentence "4.".
_CONTROL_TOKEN = re.compile(
    r"<\|[^<>|\s]{1,64}\|>"  # <|im_end|>, <|endoftext|>, <|eot_id|>, <|end|>
    r"|<｜[^<>｜\s]{1,64}｜>"  # DeepSeek's full-width bars: <｜end▁of▁sentence｜>
    r"|</?s>|<(?:pad|unk|eos|bos|end_of_turn|start_of_turn)>"
)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# The phrases match only the lead-in, not the answer after it: a greedy capture would swallow a
# later restatement on the same line and finditer() would never see it as the last occurrence.
# \s* after the colon may cross a newline, so "The final answer is:\n\n(B)" still finds "(B)".
_ANSWER_IS = re.compile(r"\banswer\s+is\b[ \t]*[:：]?\s*", re.IGNORECASE)
_ANSWER_COLON = re.compile(r"\banswer\b[ \t]*\**[ \t]*[:：]\s*", re.IGNORECASE)
# A full stop followed by whitespace ends the sentence; a decimal point ("12.5") never is.
_SENTENCE_END = re.compile(r"\.(?=\s)")
_OPTION_LETTER = re.compile(
    r"\(([A-Z])\)"  # (B)
    r"|(?i:\b(?:option|choice))\s*[:：]?\s*\(?([A-Z])\b"  # option B, choice (B)
    r"|(?<![\w(])([A-Z])[.:)](?=\s|$)"  # "B." "B:" "B)" as a word of their own
    r"|(?<![\w(])([A-Z])(?=\s+\()"  # "A (3 main veins)": taken only if the words name a choice
)
# A letter right after one of these nouns labels that thing ("angle A.", "point B:", "sample A"),
# it is not an option letter.
_LABEL_NOUN = re.compile(
    r"(?:\b(?:angles?|points?|vertex|vertices|sides?|lines?|segments?|triangles?|circles?|samples?"
    r"|organisms?)|[∠△⊙])\s*$",
    re.IGNORECASE,
)
# Several letters in a row ("(A, B, C, D)", "A-D", "A or B") list the options; none of them is
# an answer, so the last-letter rule must not read "(A, B, C, D)" as D.
_LETTER_RUN = re.compile(
    r"\(?\b[A-Z]\b\)?(?:\s*(?:,\s*(?:or|and)\b|,|/|-|–|\bor\b|\band\b)\s*\(?\b[A-Z]\b\)?)+"
)
# A candidate that *starts* with an option letter: "(B) 12", "B", "B. 12", "B: 12", "C (145°)".
# A bare capital followed by a plain word is not taken ("A triangle" is a text answer).
_LEADING_LETTER = re.compile(r"^\(([A-Za-z])\)|^([A-Z])(?:[.:)]|$|(?=\s*\())")
# Where a choice's text, found at the start of some text, ends as a clause of its own: "No, ...",
# "No.", "**No**", "5 (...)". A space before another word does not end it ("no longer ..."), nor a
# decimal point or slash ("1.5", "1/2" do not name the choice "1").
_CLAUSE_END = r"(?=\**\s*(?:$|[,;:!?)\]—–]|\.(?!\d)|\())"
_POLAR_WORDS = frozenset({"yes", "no", "true", "false"})
_YES_NO_LEAD = re.compile(rf"^\**\s*(yes|no)\b{_CLAUSE_END}", re.IGNORECASE)
# "none of the (given) options/choices", "not one of the choices", "not an option".
_NONE_OF_CHOICES = re.compile(
    r"\bnone\s+of\s+(?:the\s+)?(?:given\s+|provided\s+|listed\s+|answer\s+)?"
    r"(?:options?|choices?|answers?|above)\b"
    r"|\bnot\s+(?:one\s+of|among|in|available\s+in)\s+the\s+(?:given\s+|provided\s+)?(?:options|choices)\b"
    r"|\bnot\s+an?\s+(?:option|choice)\b",
    re.IGNORECASE,
)
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
# Numbers, skipping exponents and subscripts ("5 cm^2" is 5, not 2) and parts of words.
_NUMBER = re.compile(r"(?<![\w.^{_])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.^{_])-?\.\d+")
# "-2.7 x 10^-23", "3 \times 10^{4}": one number, which float() reads once written "-2.7e-23".
_SCIENTIFIC = re.compile(
    r"(-?\d+(?:\.\d+)?)\s*(?:[x×*·]|\\times|\\cdot)\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?"
)
_LIST = re.compile(r"\[([^\[\]]*)\]")
_PAREN_ASIDE = re.compile(r"\([^()]*\)")

# Number parsing shared with the scorer (tvc_lightning.scoring): spacing commands,
# currency/percent/degree signs and \text{unit}s never change the number.
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


# --- text helpers ------------------------------------------------------------------------------


def strip_control_tokens(text: str) -> str:
    """``text`` with end/control tokens (``</s>``, ``<|im_end|>``, ``<|endoftext|>``, ...) turned
    into line breaks."""
    return _CONTROL_TOKEN.sub("\n", text)


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


def _phrase_answer(pattern: re.Pattern[str], response: str) -> str:
    """The cleaned text after the last match of ``pattern``, up to the end of its sentence/line."""
    matches = list(pattern.finditer(response))
    if not matches:
        return ""
    text = response[matches[-1].end() :].split("\n", 1)[0]
    end = _SENTENCE_END.search(text)
    return _strip_wrapping(text[: end.start()] if end else text)


# --- choices -----------------------------------------------------------------------------------


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


def _choice_prefix(text: str, choices: Sequence[str]) -> int | None:
    """Index of the choice whose text ``text`` opens with as a clause of its own ("No, there are
    none" -> "No"); the longest such choice, or None. A parenthesis around it is allowed."""
    text = text.lstrip(" \t*")
    starts = [text, text[1:]] if text.startswith("(") else [text]
    best: int | None = None
    for i, choice in enumerate(choices):
        key = choice.strip()
        if not key or (best is not None and len(key) <= len(choices[best].strip())):
            continue
        pattern = re.compile(re.escape(key) + _CLAUSE_END, re.IGNORECASE)
        if any(pattern.match(start) for start in starts):
            best = i
    return best


def _letters_only(choices: Sequence[str]) -> bool:
    """Choices that are bare labels (MathVision's ``["A", ..., "E"]``): a letter is their text."""
    return all(len(c.strip()) == 1 for c in choices)


def _is_polar(choices: Sequence[str]) -> bool:
    """Choices that are yes/no (or true/false) words."""
    return all(c.strip().casefold() in _POLAR_WORDS for c in choices)


def _none_choice(choices: Sequence[str]) -> str | None:
    """A choice that itself says "none of the above", if there is one."""
    return next((c for c in choices if _NONE_OF_CHOICES.search(c)), None)


def _resolve_choice(candidate: str, choices: Sequence[str]) -> tuple[str, str] | None:
    """What an answer-position text designates among ``choices``: ``(answer, refinement)``, or
    None when it designates none (the text is then kept as said)."""
    named = _match_choice_text(candidate, choices)
    if named is not None:
        return named, "choice_text"
    letter = _letter_of(candidate, len(choices))
    if letter is not None:
        m = _LEADING_LETTER.match(candidate.strip())
        said = None if _letters_only(choices) or m is None else _choice_prefix(
            candidate.strip()[m.end() :], choices
        )
        # "A: No, ..." over Yes/No: the words name a different choice than the letter, which is
        # then Q/A's "A:" or a mislabel; the words are the more specific, so they win.
        if said is not None and said != ord(letter) - ord("A"):
            return choices[said], "choice_text"
        return letter, "choice_letter"
    said = _choice_prefix(candidate, choices)
    if said is not None:  # "no, there are not ..." -> "No"
        return choices[said], "choice_text"
    if _NONE_OF_CHOICES.search(candidate):
        none = _none_choice(choices)
        return (none, "choice_text") if none is not None else ("None", "none_of_choices")
    return None


def _last_option_letter(response: str, choices: Sequence[str]) -> tuple[str, int, bool] | None:
    """The last standalone in-range option letter outside a run of letters, as ``(answer,
    position, by_text)``; when words right after it name another choice ("A: No"), that choice's
    text (``by_text`` True)."""
    runs = [m.span() for m in _LETTER_RUN.finditer(response)]
    found = None
    for m in _OPTION_LETTER.finditer(response):
        group = next(i for i, g in enumerate(m.groups(), 1) if g)
        letter, at = m.group(group), m.start(group)
        index = ord(letter) - ord("A")
        if index >= len(choices) or any(start <= at < end for start, end in runs):
            continue
        bare = m.group(3) or m.group(4)  # a letter with no "(...)" or "option" to mark it
        if bare and _LABEL_NOUN.search(response[max(0, m.start() - 30) : m.start()]):
            continue
        said = None if _letters_only(choices) else _choice_prefix(response[m.end() :], choices)
        if m.group(4) and said is None:  # "Point A (1, 2)": a letter before an aside
            continue
        by_text = said is not None and said != index
        found = (choices[said] if by_text else letter, m.start(), by_text)
    return found


# --- answer types ------------------------------------------------------------------------------


def _number_answer(candidate: str) -> str | None:
    """The number an integer/float answer sentence states ("There are 5 objects" -> "5",
    "x = 7 m/s^2" -> "7", "-2.7 x 10^-23 J" -> "-2.7e-23"); None when it states none.

    A fraction is kept as written (the scorer reads it exactly). Otherwise the number is taken
    after the last "=" and outside parenthesised asides, the last one when several remain, as
    models state the result last ("10 - 4 = 6", "3 red and 2 blue, so 5").
    """
    text = _strip_wrapping(candidate)
    cleaned = re.sub(r"(?<=\d),(?=\d{3}\b)", "", _UNIT_NOISE.sub("", text)).strip()
    if _FRACTION.fullmatch(cleaned) or _LATEX_FRACTION.fullmatch(cleaned):
        return None
    if "=" in text:
        after = text.rsplit("=", 1)[1]
        text = after if _NUMBER.search(after) else text
    text = _PAREN_ASIDE.sub(" ", text)
    scientific = list(_SCIENTIFIC.finditer(text))
    numbers = list(_NUMBER.finditer(text))
    if not numbers:
        return None
    last = numbers[-1]
    for sci in scientific:  # the last number is the exponent or mantissa of "a x 10^b"
        if sci.start() <= last.start() < sci.end() or last.start() < sci.end() <= last.end():
            return f"{sci.group(1)}e{int(sci.group(2))}"
    return last.group().replace(",", "")


def _list_answer(candidate: str) -> str | None:
    """A list answer in MathVista's ``[a, b]`` form: from "[a,b]", "(a, b)" or "a, b, c"; None
    when the text holds no list."""
    text = _strip_wrapping(candidate)
    bracketed = _LIST.findall(text)
    if bracketed:
        body = bracketed[-1]
    elif text.startswith("(") and text.endswith(")"):
        body = text[1:-1]
    elif "," in text and all(_NUMBER.fullmatch(part.strip()) for part in text.split(",")):
        body = text  # bare "1, 2, 3"; "1,234" is one number, but only with three digits after
    else:
        return None
    items = [item.strip() for item in body.split(",")]
    return "[" + ", ".join(items) + "]" if all(items) else None


def _refine(candidate: str, choices: Sequence[str] | None, answer_type: str | None) -> tuple[str, str]:
    """An answer-position text turned into the answer the question asks for: ``(answer,
    refinement)``; the refinement is ``""`` when the text is kept as said."""
    if choices:
        resolved = _resolve_choice(candidate, choices)
        return resolved if resolved is not None else (candidate, "")
    if answer_type in ("integer", "float"):
        number = _number_answer(candidate)
        if number is not None and number != candidate:
            return number, "number"
    elif answer_type == "list":
        listed = _list_answer(candidate)
        if listed is not None and listed != candidate:
            return listed, "list"
    else:
        polar = _YES_NO_LEAD.match(candidate)
        if polar and polar.end() < len(candidate):  # "no, there are not ..." -> "No"
            return polar.group(1).capitalize(), "yes_no"
    return candidate, ""


# --- extraction --------------------------------------------------------------------------------


def extract_answer_with_method(
    response: str, choices: Sequence[str] | None = None, answer_type: str | None = None
) -> Extraction:
    """The final answer of a response and the rule that found it; ``("", "none")`` when none does.

    Rules in priority order (the first that yields a non-empty answer wins, and within a rule the
    *last* occurrence counts, since models restate and correct themselves), after end/control
    tokens (``</s>``, ``<|im_end|>``, ...) are removed:

    0. (multiple choice) the whole response is one of ``choices`` -> itself (MathVista's rule);
    1. the last ``\\boxed{...}``;
    2. "... answer is X" (also "final answer is", "correct answer is");
    3. "Answer: X";
    4. (yes/no choices) a response that opens with "Yes,"/"No." -> that choice;
    5. (multiple choice) the last standalone option letter: "(B)", "option B", "B." / "B:" / "B)",
       "B (its choice text)"; not one in a run such as "(A, B, C, D)" nor a label such as
       "angle A."; words right after it that name another choice ("A: No") give that choice. A
       statement that none of the choices fits, after the last such letter, gives ``"None"`` (or
       a "none of the above" choice);
    6. (``answer_type="list"``) the last ``[...]`` list; a list answer is never one number;
    7. the last number ("1,234" -> "1234"; exponents such as ``cm^2``'s 2 are skipped).

    For rules 1–3 the answer runs to the end of its sentence or line, without a trailing full
    stop, ``$`` or ``**``, and is then refined: with ``choices``, a text that names a choice, or
    opens with one as a clause ("no, there are not ..."), becomes that choice; one that starts with
    an in-range option letter ("(B) 12", "C (145°)") becomes the bare letter, unless the words
    after it name another choice ("A: No" over Yes/No), which then wins. For ``integer``/``float``
    answers the number in the sentence is taken; for ``list`` answers a list becomes ``[a, b]``;
    for other free-form answers an opening "yes,"/"no," becomes "Yes"/"No".
    """
    response = strip_control_tokens(response).strip()
    if not response:
        return Extraction("", "none")
    choices = [str(c) for c in choices] if choices else None
    if choices and response in choices:
        return Extraction(response, "rule:exact_choice")

    boxed = [b for b in boxed_contents(response) if _strip_wrapping(b)]
    for source, candidate in (
        ("boxed", _strip_wrapping(boxed[-1]) if boxed else ""),
        ("answer_is", _phrase_answer(_ANSWER_IS, response)),
        ("answer_colon", _phrase_answer(_ANSWER_COLON, response)),
    ):
        if candidate:
            answer, refinement = _refine(candidate, choices, answer_type)
            return Extraction(answer, f"rule:{source}/{refinement}" if refinement else f"rule:{source}")

    if choices:
        if _is_polar(choices):
            said = _choice_prefix(response, choices)
            if said is not None:
                return Extraction(choices[said], "rule:leading_yes_no")
        letter = _last_option_letter(response, choices)
        nones = list(_NONE_OF_CHOICES.finditer(response))
        if nones and (letter is None or nones[-1].start() > letter[1]):
            none = _none_choice(choices)
            if none is not None:  # "none of the above" is itself an option
                return Extraction(none, "rule:none_of_choices/choice_text")
            return Extraction("None", "rule:none_of_choices")
        if letter is not None:
            method = "rule:choice_letter/choice_text" if letter[2] else "rule:choice_letter"
            return Extraction(letter[0], method)
        in_range = {chr(ord("A") + i) for i in range(len(choices))}
        if _strip_wrapping(response) in in_range:  # a bare one-letter response, maybe "**B**"
            return Extraction(_strip_wrapping(response), "rule:bare_letter")

    if answer_type == "list":
        lists = [m.group() for m in _LIST.finditer(response) if m.group(1).strip()]
        listed = _list_answer(lists[-1]) if lists else None
        return Extraction(listed, "rule:last_list") if listed else Extraction("", "none")
    numbers = _NUMBER.findall(response)
    if numbers:
        return Extraction(numbers[-1].replace(",", ""), "rule:last_number")
    return Extraction("", "none")


def extract_answer(
    response: str, choices: Sequence[str] | None = None, answer_type: str | None = None
) -> str:
    """The final answer of a response, by rules (no LLM); ``""`` when nothing is found.

    :func:`extract_answer_with_method` without the method; see it for the rules.
    """
    return extract_answer_with_method(response, choices, answer_type).answer
