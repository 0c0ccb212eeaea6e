"""Benchmark inputs: MathVista (testmini JSON) and MathVision (JSONL).

- ``mathvista``: the MathVista testmini dict (pid -> item). The question is the item's ``query``
  (the benchmark's own prompt, hint and lettered choices included), else ``question``.
- ``mathvision``: MathVision JSONL. With options, ``choices`` are the options and the answer is the
  option text the gold letter designates; lines holding only ``<imageN>`` placeholders are dropped
  from the question (inline ones are kept: they name parts of the one composite image).

The benchmarks have no reasoning chains, and a record needs a non-empty response, so converted
records carry only ``The final answer is \\boxed{ANSWER}.``: use them for evaluation, not training.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from data_engine.items import Converted, Skip, answer_only, load_image, make_record
from tvc_lightning.data.schema import ANSWER_TYPES


def convert_mathvista(label: str, item: Any, image_root: Path) -> Converted:
    """One MathVista item (``label``: its pid or index) as an evaluation record."""
    if not isinstance(item, dict) or "answer" not in item:
        raise Skip("malformed", "expected an object with an 'answer'")
    choices = item.get("choices")
    if choices is not None:
        if not isinstance(choices, list):
            raise Skip("malformed", "'choices' is not a list")
        choices = [str(c) for c in choices]  # scoring compares strings
    query = item.get("query")
    question = query if isinstance(query, str) and query.strip() else item.get("question")
    precision = item.get("precision")
    if isinstance(precision, float) and precision.is_integer():
        precision = int(precision)
    answer = str(item["answer"])
    answer_type = item.get("answer_type") or "text"
    if answer_type not in ANSWER_TYPES:
        raise Skip("bad_record", f"answer_type {answer_type!r} not in {ANSWER_TYPES}")
    images = [load_image(image_root, item.get("image"))]
    fields = {
        "id": f"mathvista-{item.get('pid', label)}",
        "question": question,
        "response": answer_only(answer),
        "answer": answer,
        "answer_type": answer_type,
        "choices": choices,
        "precision": precision,
        "source": "mathvista",
    }
    return make_record(fields), images


_PLACEHOLDER_LINE = re.compile(r"^\s*(?:<image\d*>\s*)+$")


def convert_mathvision(label: str, item: Any, image_root: Path) -> Converted:
    """One MathVision line (``label``: ``line N``) as an evaluation record."""
    if not isinstance(item, dict) or "answer" not in item or "question" not in item:
        raise Skip("malformed", "expected an object with 'question' and 'answer'")
    if not isinstance(item["question"], str):
        raise Skip("malformed", "'question' is not a string")
    lines = item["question"].splitlines()
    question = "\n".join(ln for ln in lines if not _PLACEHOLDER_LINE.match(ln)).strip()
    options = item.get("options") or []
    if not isinstance(options, list):
        raise Skip("malformed", "'options' is not a list")
    gold = str(item["answer"]).strip()
    choices: list[str] | None = None
    if options:
        choices = [str(o) for o in options]
        letter = ord(gold.upper()) - ord("A") if len(gold) == 1 else -1
        if 0 <= letter < len(choices):
            answer = choices[letter]
        elif gold in choices:
            answer = gold
        else:
            raise Skip("bad_answer", f"answer {gold!r} designates none of {len(choices)} options")
        # Options that are just the letters mean the choices are drawn in the image.
        if choices != [chr(ord("A") + i) for i in range(len(choices))]:
            question += "\nChoices: " + " ".join(
                f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices)
            )
        answer_type = "text"
    else:
        answer = gold
        answer_type = "integer" if re.fullmatch(r"[+-]?\d+", gold) else "text"
    images = [load_image(image_root, item.get("image"))]
    fields = {
        "id": f"mathvision-{item.get('id', label)}",
        "question": question,
        "response": answer_only(answer),
        "answer": answer,
        "answer_type": answer_type,
        "choices": choices,
        "source": "mathvision",
    }
    return make_record(fields), images
