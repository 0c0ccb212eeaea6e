"""Benchmark items for ``evaluate``: MathVista (testmini JSON), MathVision (JSONL), converted shards.

Each item keeps the benchmark's own fields (``raw``, written back in the official results layout),
the prompt the model is given, and a :class:`~tvc_lightning.data.schema.SampleRecord` that the
project's scorer reads (answer, answer type, choices, precision). Items are read in file order;
that order fixes the batches (see :mod:`tvc_lightning.evaluate.run`), so it must not depend on
anything but the input file.

The prompts follow the project's converters (``python -m data_engine convert``): MathVista's own
``query`` when the file has one, else the same zero-shot layout built from its fields; MathVision's
question without its ``<imageN>`` placeholder lines, with text options listed as ``Choices: (A) ...``.
So a benchmark evaluated from its raw file and from converted shards asks the same questions.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from tvc_lightning.data.schema import ANSWER_TYPES, SampleRecord

BENCHMARKS = ("mathvista", "mathvision", "shards")


@dataclass
class EvalItem:
    """One question to decode: ``id`` is unique within the benchmark (MathVista's ``pid``,
    MathVision's ``id``, a shard record's ``id``)."""

    id: str
    prompt: str
    record: SampleRecord
    raw: dict[str, Any]
    image_paths: list[Path] = field(default_factory=list)
    image_bytes: list[bytes] = field(default_factory=list)

    def images(self) -> list[Image.Image]:
        """The item's images as RGB; raises ``OSError``/``ValueError`` for an unreadable file."""
        if self.image_bytes:
            sources: list[Any] = [io.BytesIO(b) for b in self.image_bytes]
        else:
            sources = list(self.image_paths)
        out = []
        for source in sources:
            with Image.open(source) as im:
                out.append(im.convert("RGB"))
        return out

    def missing_images(self) -> list[Path]:
        return [p for p in self.image_paths if not p.is_file()]


@dataclass
class Benchmark:
    """The items of one benchmark file, in file order."""

    name: str
    items: list[EvalItem]
    skipped: dict[str, int] = field(default_factory=dict)  # unreadable input, by reason

    def missing(self) -> list[tuple[str, Path]]:
        """``(item id, image path)`` for every image file that does not exist."""
        return [(item.id, path) for item in self.items for path in item.missing_images()]


# --- MathVista ---------------------------------------------------------------------------------

def _mathvista_hint(item: dict[str, Any]) -> str:
    # The benchmark's zero-shot instructions, as in the HF dataset's ``query`` field.
    if item.get("question_type") == "multi_choice":
        return ("Hint: Please answer the question and provide the correct option letter, "
                "e.g., A, B, C, D, at the end.")
    answer_type, precision = item.get("answer_type"), item.get("precision")
    if answer_type == "integer":
        return ("Hint: Please answer the question requiring an integer answer and provide the "
                "final value, e.g., 1, 2, 3, at the end.")
    if answer_type == "float" and precision == 1:
        return ("Hint: Please answer the question requiring a floating-point number with one "
                "decimal place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.")
    if answer_type == "float" and precision == 2:
        return ("Hint: Please answer the question requiring a floating-point number with two "
                "decimal places and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.")
    if answer_type == "list":
        return ("Hint: Please answer the question requiring a Python list as an answer and "
                "provide the final list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.")
    return ""


def mathvista_query(item: dict[str, Any]) -> str:
    """The item's ``query`` if it has one, else MathVista's zero-shot prompt built from its
    question, unit and choices."""
    query = item.get("query")
    if isinstance(query, str) and query.strip():
        return query
    question = f"Question: {item.get('question', '')}"
    if item.get("unit"):
        question += f" (Unit: {item['unit']})"
    parts = [_mathvista_hint(item), question]
    choices = item.get("choices") or []
    if choices:
        parts.append("\n".join(["Choices:", *(f"({chr(ord('A') + i)}) {c}"
                                              for i, c in enumerate(choices))]))
    return "\n".join(p for p in parts if p)


def _precision(value: Any) -> int | None:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_mathvista(path: Path, image_root: Path) -> Benchmark:
    """MathVista's ``pid -> item`` JSON (a list of items is accepted too)."""
    data = _read_json(path)
    if isinstance(data, list):
        data = {str(item.get("pid", i)) if isinstance(item, dict) else str(i): item
                for i, item in enumerate(data)}
    if not isinstance(data, dict):
        raise ValueError(f"--input {path}: expected a JSON object (pid -> item) or list")
    items = []
    for pid, item in data.items():
        if not isinstance(item, dict) or "answer" not in item or not item.get("image"):
            raise ValueError(f"--input {path}: item {pid!r} lacks 'answer' or 'image'")
        answer_type = item.get("answer_type") or "text"
        if answer_type not in ANSWER_TYPES:
            raise ValueError(f"--input {path}: item {pid!r}: answer_type {answer_type!r} "
                             f"not in {ANSWER_TYPES}")
        mc = item.get("question_type") == "multi_choice"
        query = mathvista_query(item)
        record = SampleRecord(
            id=str(pid), question=query, response="", answer=str(item["answer"]),
            answer_type=answer_type,
            choices=[str(c) for c in item["choices"]] if mc and item.get("choices") else None,
            precision=_precision(item.get("precision")), source="mathvista")
        raw = {**item, "query": query}  # the official extraction step reads ``query``
        items.append(EvalItem(str(pid), query, record, raw, [image_root / item["image"]]))
    return Benchmark("mathvista", items)


# --- MathVision --------------------------------------------------------------------------------

_PLACEHOLDER_LINE = re.compile(r"^\s*(?:<image\d*>\s*)+$")


def mathvision_prompt(item: dict[str, Any]) -> str:
    """The question without lines that hold only ``<imageN>`` placeholders (inline ones name
    parts of the one composite image and stay), plus text options as ``Choices: (A) ...``."""
    lines = str(item["question"]).splitlines()
    question = "\n".join(ln for ln in lines if not _PLACEHOLDER_LINE.match(ln)).strip()
    options = [str(o) for o in item.get("options") or []]
    if options and options != [chr(ord("A") + i) for i in range(len(options))]:
        question += "\nChoices: " + " ".join(f"({chr(ord('A') + i)}) {o}"
                                             for i, o in enumerate(options))
    return question


def read_mathvision(path: Path, image_root: Path) -> Benchmark:
    """MathVision's JSONL (``id``, ``question``, ``options``, ``answer``, ``image``, ``level``,
    ``subject``). A letter answer to options is scored as the option it designates."""
    items = []
    for n, item in _read_jsonl(path):
        if not isinstance(item, dict) or not {"id", "question", "answer", "image"} <= set(item):
            raise ValueError(f"--input {path} line {n}: needs 'id', 'question', 'answer', 'image'")
        options = [str(o) for o in item.get("options") or []]
        gold = str(item["answer"]).strip()
        if options:
            index = ord(gold.upper()) - ord("A") if len(gold) == 1 else -1
            if not 0 <= index < len(options) and gold not in options:
                raise ValueError(f"--input {path} line {n}: answer {gold!r} designates none of "
                                 f"{len(options)} options")
            answer = options[index] if 0 <= index < len(options) else gold
            answer_type = "text"
        else:
            answer = gold
            answer_type = "integer" if re.fullmatch(r"[+-]?\d+", gold) else "text"
        prompt = mathvision_prompt(item)
        record = SampleRecord(id=str(item["id"]), question=prompt, response="", answer=answer,
                              answer_type=answer_type, choices=options or None,
                              source="mathvision")
        items.append(EvalItem(str(item["id"]), prompt, record, item, [image_root / item["image"]]))
    return Benchmark("mathvision", items)


# --- converted shards --------------------------------------------------------------------------

def read_shards(pattern: str) -> Benchmark:
    """Records of WebDataset shards (a directory, brace pattern or glob), read with the training
    reader's safety rules; unusable samples are skipped and counted in the log."""
    from tvc_lightning.data.schema import InvalidRecord, image_members
    from tvc_lightning.data.skips import SkipCounter
    from tvc_lightning.data.tarread import iter_shard, resolve_urls

    counter = SkipCounter()
    items, seen = [], set()
    for url in resolve_urls(pattern):
        for sample in iter_shard(url, counter):
            try:
                record = SampleRecord.from_json(sample.get("json", b""))
            except InvalidRecord as e:
                counter.add(e.reason if e.reason in counter.reasons else "bad_record")
                continue
            names = image_members(sample)
            if not names:
                counter.add("bad_record")
                continue
            if record.id in seen:
                raise ValueError(f"--input {pattern}: record id {record.id!r} occurs twice; "
                                 "evaluate keys its results by id")
            seen.add(record.id)
            raw = {k: v for k, v in json.loads(record.to_json()).items()
                   if k not in ("response", "bridge_spans")}
            items.append(EvalItem(record.id, record.question, record, raw,
                                  image_bytes=[sample[name] for name in names]))
    return Benchmark("shards", items, {k: v for k, v in counter.as_dict().items() if v})


# --- helpers -----------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--input {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--input {path}: not JSON ({e})") from None


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"--input {path}: no such file") from None
    for n, line in enumerate(lines, start=1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--input {path} line {n}: not JSON ({e})") from None


def load_benchmark(name: str, input_path: str | Path, image_root: str | Path | None = None,
                   limit: int | None = None) -> Benchmark:
    """Read benchmark ``name`` (one of :data:`BENCHMARKS`); ``limit`` keeps the first N items.
    Image paths are relative to ``image_root`` (default: the input file's folder)."""
    if name not in BENCHMARKS:
        raise ValueError(f"--benchmark {name!r}: not one of {BENCHMARKS}")
    if name == "shards":
        bench = read_shards(str(input_path))
    else:
        path = Path(input_path)
        root = Path(image_root) if image_root is not None else path.parent
        bench = (read_mathvista if name == "mathvista" else read_mathvision)(path, root)
    ids = Counter(item.id for item in bench.items)
    twice = [i for i, c in ids.items() if c > 1]
    if twice:
        raise ValueError(f"--input {input_path}: ids occur more than once: {twice[:5]}")
    if limit is not None:
        bench.items = bench.items[:limit]
    if not bench.items:
        raise ValueError(f"--input {input_path}: no items")
    return bench
