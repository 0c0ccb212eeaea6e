"""Convert existing data sets (sharegpt, MathVista, MathVision) into WebDataset shards.

- ``sharegpt``: LLaMA-Factory's format, in which TVC's data was released: a JSON list of
  ``{"conversations": [{"from": "human", "value": "<image>..."}, {"from": "gpt", ...}],
  "images": ["rel/path.jpg"]}``. The question is the human turn without its ``<image>``
  placeholders, the response the gpt turn, the answer extracted from the response (last
  ``\\boxed{...}``, else the text after the last "answer is"/"Answer:", else empty).
- ``mathvista``: the MathVista testmini dict (pid -> item). The question is the item's ``query``
  (the benchmark's own prompt, hint and lettered choices included), else ``question``.
- ``mathvision``: MathVision JSONL. With options, ``choices`` are the options and the answer is the
  option text the gold letter designates; lines holding only ``<imageN>`` placeholders are dropped
  from the question (inline ones are kept: they name parts of the one composite image).

The two benchmarks have no reasoning chains, and a record needs a non-empty response, so converted
benchmark records carry only ``The final answer is \\boxed{ANSWER}.``: use them for evaluation, not
for training. Bad items (malformed, missing or undecodable image, invalid record) are reported on
stderr with their index or key, counted by reason, and skipped; they never stop the conversion.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from data_engine.shards import ShardWriter, encode_image
from tvc_lightning.data.schema import ANSWER_TYPES, InvalidRecord, SampleRecord
from tvc_lightning.scoring import boxed_contents

Item = tuple[str, Any]  # (label for messages: index, pid or line number; the raw item)
Converted = tuple[SampleRecord, list[bytes]]


class Skip(Exception):
    """An item that cannot be converted; ``reason`` is the counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# --- answer extraction -------------------------------------------------------------------------

_ANSWER_IS = re.compile(r"(?:answer\s+is|answer\s*:)\s*:?\s*([^\n]+)", re.IGNORECASE)


def _clean(answer: str) -> str:
    """Drop the sentence's full stop and Markdown/LaTeX wrapping: ``**$7$**.`` -> ``7``."""
    answer = answer.strip().rstrip(".").strip().strip("*").strip()
    if len(answer) > 1 and answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$").strip()
    return answer.rstrip(".").strip()


def extract_answer(response: str) -> str:
    """The gold answer stated by a response: last ``\\boxed{}``, else after the last "answer is".

    Stricter than :func:`tvc_lightning.scoring.extract_answer` on purpose: no last-number guess,
    since this becomes the gold answer of a training record.
    """
    boxed = boxed_contents(response)
    if boxed:
        return boxed[-1]
    matches = list(_ANSWER_IS.finditer(response))
    return _clean(matches[-1].group(1)) if matches else ""


# --- images and records ------------------------------------------------------------------------


def load_image(image_root: Path, rel: Any) -> bytes:
    """Image bytes (JPEG/PNG, others re-encoded to PNG), fully decoded once to catch bad files."""
    if not isinstance(rel, str) or not rel:
        raise Skip("malformed", f"image path must be a non-empty string, got {rel!r}")
    path = image_root / rel
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Skip("missing_image", f"{path}: {e.strerror or e}") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # verify() misses truncated data; a full decode does not
        return encode_image(data)[1]
    except Exception as e:  # PIL raises many exception types on bad files
        raise Skip("bad_image", f"{path}: {e}") from None


def make_record(fields: dict[str, Any]) -> SampleRecord:
    """Validate through the schema's parser so converted records obey the same rules as reads."""
    try:
        return SampleRecord.from_json(fields)
    except InvalidRecord as e:
        raise Skip(e.reason, str(e)) from None


def _answer_only(answer: str) -> str:
    return f"The final answer is \\boxed{{{answer}}}."


# --- sharegpt ----------------------------------------------------------------------------------

_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def convert_sharegpt(label: str, item: Any, image_root: Path) -> Converted:
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        raise Skip("malformed", "expected an object with a 'conversations' list")
    turns = []
    for turn in item["conversations"]:
        if not isinstance(turn, dict):
            raise Skip("malformed", "a conversation turn is not an object")
        # LLaMA-Factory's default tags are from/value; accept OpenAI-style role/content too.
        role = _ROLES.get(turn.get("from", turn.get("role")))
        value = turn.get("value", turn.get("content"))
        if role is None or not isinstance(value, str):
            raise Skip("malformed", f"unsupported turn {str(turn)[:80]!r}")
        turns.append((role, value))
    if [r for r, _ in turns] != ["human", "gpt"]:
        raise Skip("unsupported_conversation", "expected exactly one human turn then one gpt turn")
    (_, human), (_, gpt) = turns
    paths = item.get("images") or []
    if not isinstance(paths, list) or not paths:
        raise Skip("no_image", "no 'images' list")
    if human.count("<image>") != len(paths):
        raise Skip(
            "image_count_mismatch",
            f"{human.count('<image>')} <image> placeholders but {len(paths)} images",
        )
    images = [load_image(image_root, p) for p in paths]
    fields = {
        "id": f"sg{label}",
        "question": human.replace("<image>", "").strip(),
        "response": gpt.strip(),
        "answer": extract_answer(gpt),
        "answer_type": "text",
        "source": "sharegpt",
    }
    return make_record(fields), images


def iter_json_list(path: Path) -> Iterator[Item]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of samples")
    return ((str(i), item) for i, item in enumerate(data))


# --- MathVista ---------------------------------------------------------------------------------


def convert_mathvista(label: str, item: Any, image_root: Path) -> Converted:
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
        "response": _answer_only(answer),
        "answer": answer,
        "answer_type": answer_type,
        "choices": choices,
        "precision": precision,
        "source": "mathvista",
    }
    return make_record(fields), images


def iter_mathvista(path: Path) -> Iterator[Item]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        return ((str(pid), item) for pid, item in data.items())
    if isinstance(data, list):
        return ((str(i), item) for i, item in enumerate(data))
    raise ValueError(f"{path}: expected a JSON object (pid -> item) or list")


# --- MathVision --------------------------------------------------------------------------------

_PLACEHOLDER_LINE = re.compile(r"^\s*(?:<image\d*>\s*)+$")


def convert_mathvision(label: str, item: Any, image_root: Path) -> Converted:
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
        "response": _answer_only(answer),
        "answer": answer,
        "answer_type": answer_type,
        "choices": choices,
        "source": "mathvision",
    }
    return make_record(fields), images


def iter_jsonl(path: Path) -> Iterator[Item]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {n}", Skip("malformed", f"not JSON: {e}")


# --- driver ------------------------------------------------------------------------------------

FORMATS: dict[str, tuple[Callable[[Path], Iterator[Item]], Callable[..., Converted]]] = {
    "sharegpt": (iter_json_list, convert_sharegpt),
    "mathvista": (iter_mathvista, convert_mathvista),
    "mathvision": (iter_jsonl, convert_mathvision),
}


def iter_converted(
    fmt: str, input_path: Path, image_root: Path, select: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, Converted | Skip]]:
    """``(label, (record, images))`` per item of ``input_path``, or ``(label, Skip)`` for a bad
    one; items whose label ``select`` refuses are passed over before their images are read.

    A whole-input error (not JSON, wrong top-level shape) raises when this is called.
    """
    iterate, convert = FORMATS[fmt]
    items = iterate(input_path)

    def converted() -> Iterator[tuple[str, Converted | Skip]]:
        for label, item in items:
            if select is not None and not select(label):
                continue
            result: Converted | Skip
            try:
                if isinstance(item, Skip):
                    raise item
                result = convert(label, item, image_root)
            except Skip as e:
                result = e
            yield label, result

    return converted()


def convert_file(
    fmt: str,
    input_path: Path,
    image_root: Path,
    out_dir: Path,
    prefix: str | None = None,
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 1 << 30,
    overwrite: bool = False,
) -> tuple[int, Counter[str], list[Path]]:
    """Convert one file; returns (records written, skips by reason, shard paths)."""
    prefix = prefix or fmt
    skipped: Counter[str] = Counter()
    written = 0
    # A whole-input error (not JSON...) raises here, before OUT is made.
    items = iter_converted(fmt, input_path, image_root)
    with ShardWriter(
        out_dir, prefix, maxcount=samples_per_shard, maxsize=max_shard_bytes, overwrite=overwrite
    ) as writer:
        for n, (label, converted) in enumerate(items):
            if isinstance(converted, Skip):
                skipped[converted.reason] += 1
                print(f"convert: skip {fmt} item {label}: {converted}", file=sys.stderr)
                continue
            record, images = converted
            writer.write(f"{prefix}-{n:08d}", record, images)
            written += 1
    return written, skipped, writer.shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=sorted(FORMATS), required=True, help="input format")
    parser.add_argument("--input", type=Path, required=True, help="the JSON (JSONL) input file")
    parser.add_argument("--image-root", type=Path, required=True,
                        help="directory the items' image paths are relative to")
    parser.add_argument("--out", type=Path, required=True, help="output directory for shards")
    parser.add_argument("--prefix", default=None, help="shard name prefix (default: the format)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="shard size bound")
    parser.add_argument("--max-shard-mb", type=int, default=1024, help="shard size bound (MiB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards with the same prefix an earlier run left in OUT")


def run(args: argparse.Namespace) -> int:
    try:
        written, skipped, shards = convert_file(
            args.format, args.input, args.image_root, args.out, args.prefix,
            args.samples_per_shard, args.max_shard_mb << 20, args.overwrite,
        )
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
        # Whole-input problems (not JSON, wrong top-level shape, bad prefix) are fatal.
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    reasons = ", ".join(f"{r} {c}" for r, c in sorted(skipped.items()))
    print(
        f"convert: {args.format}: {written} converted, {sum(skipped.values())} skipped"
        f"{f' ({reasons})' if reasons else ''}; {len(shards)} shard(s) in {args.out}"
    )
    return 0
