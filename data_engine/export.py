"""Export shards as JSON + image files that LLaMA-Factory or ms-swift can train on.

``--format sharegpt`` writes LLaMA-Factory's sharegpt items (``conversations`` of ``from``/``value``
turns, ``system``, ``images``); ``--format messages`` writes OpenAI-style ``messages`` (ms-swift's
and LLaMA-Factory's default), both with ``<image>`` placeholders where the images are shown. OUT
gets ``data.json`` (a JSON array; ``--name x.jsonl`` writes JSON lines), ``images/`` (the shards'
JPEG/PNG bytes, unchanged) and ``dataset_info.json``, the LLaMA-Factory entry for the file.

Each item also carries ``id`` and a ``tvc`` object (gold answer, answer type, choices, precision,
source, bridge spans, which answers are long-CoT) that the trainers ignore and ``convert`` reads
back, so shards -> export -> convert gives the same records. Unreadable samples are counted by
reason, reported and left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_engine.conversation import META_KEY
from data_engine.shards import sniff_image_format
from tvc_lightning.data.schema import IMAGE_PLACEHOLDER, SampleRecord, image_members
from tvc_lightning.data.shards import SkipCounter, decode_sample, iter_shard, resolve_urls

_SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def conversation_of(record: SampleRecord, n_images: int) -> list[tuple[str, str]]:
    """``(role, text)`` turns of a record, system first when set, images as ``<image>``."""
    turns = [] if record.system is None else [("system", record.system)]
    if record.turns is None:
        turns += [("user", IMAGE_PLACEHOLDER * n_images + record.question),
                  ("assistant", record.response)]
    else:
        turns += [(t.role, t.content) for t in record.turns]
    return turns


def metadata(record: SampleRecord) -> dict[str, Any]:
    """What a chat item cannot say and ``convert`` needs to rebuild ``record`` exactly."""
    meta: dict[str, Any] = {"answer": record.answer, "answer_type": record.answer_type,
                            "choices": record.choices, "precision": record.precision,
                            "source": record.source, "conversation": record.turns is not None}
    if record.turns is None:
        meta["dvr"] = [1]
    else:
        meta["dvr"] = [i for i, t in enumerate(record.turns) if t.dvr]
    if record.bridge_spans is not None:
        meta["bridge_spans"] = [list(s) for s in record.bridge_spans]
    return meta


def export_item(record: SampleRecord, images: list[str], fmt: str) -> dict[str, Any]:
    """One record as a ``sharegpt`` or ``messages`` item whose images are the paths ``images``."""
    turns = conversation_of(record, len(images))
    item: dict[str, Any] = {"id": record.id}
    if fmt == "sharegpt":
        if record.system is not None:
            item["system"] = turns.pop(0)[1]
        item["conversations"] = [{"from": _SHAREGPT_ROLES[r], "value": t} for r, t in turns]
    else:
        item["messages"] = [{"role": r, "content": t} for r, t in turns]
    item["images"] = images
    item[META_KEY] = metadata(record)
    return item


def dataset_info(fmt: str, name: str) -> dict[str, Any]:
    """The LLaMA-Factory ``dataset_info.json`` entry for the exported file."""
    entry: dict[str, Any] = {"file_name": name, "formatting": "sharegpt"}
    if fmt == "sharegpt":
        entry["columns"] = {"messages": "conversations", "images": "images", "system": "system"}
    else:
        entry["columns"] = {"messages": "messages", "images": "images"}
        entry["tags"] = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "system_tag": "system"}
    return {Path(name).stem: entry}


def _samples(urls: list[str], counter: SkipCounter) -> Iterator[tuple[str, SampleRecord, list[bytes]]]:
    for url in urls:
        for sample in iter_shard(url, counter):
            decoded = decode_sample(sample, counter)  # the training reader's checks
            if decoded is not None:
                images = [sample[name] for name in image_members(sample)]
                yield str(sample.get("__key__")), decoded[0], images


def export_shards(input_spec: str, fmt: str, out: Path, name: str = "data.json",
                  overwrite: bool = False) -> tuple[int, dict[str, int]]:
    """Write the records of the shards ``input_spec`` to ``out``; returns (items, skips by reason)."""
    if fmt not in ("sharegpt", "messages"):
        raise ValueError(f"--format must be sharegpt or messages, got {fmt!r}")
    urls = resolve_urls(input_spec)
    target = Path(out) / name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    (Path(out) / "images").mkdir(parents=True, exist_ok=True)
    lines = name.endswith(".jsonl")
    counter = SkipCounter()
    n = 0
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write("" if lines else "[")
        for key, record, images in _samples(urls, counter):
            paths = []
            for i, data in enumerate(images):
                suffix = f".{i}" if len(images) > 1 else ""
                rel = f"images/{n:08d}-{key}{suffix}.{sniff_image_format(data) or 'png'}"
                (Path(out) / rel).write_bytes(data)
                paths.append(rel)
            text = json.dumps(export_item(record, paths, fmt), ensure_ascii=False)
            f.write(f"{text}\n" if lines else f"{',' if n else ''}\n{text}")
            n += 1
        f.write("" if lines else "\n]\n")
    tmp.replace(target)  # a reader never sees half a file
    info = Path(out) / "dataset_info.json"
    info.write_text(json.dumps(dataset_info(fmt, name), indent=2) + "\n", encoding="utf-8")
    return n, {r: c for r, c in counter.as_dict().items() if c}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="shards: a directory, glob or brace pattern")
    parser.add_argument("--format", choices=("sharegpt", "messages"), required=True,
                        help="sharegpt (LLaMA-Factory) or messages (ms-swift, OpenAI style)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--name", default="data.json",
                        help="data file name in OUT (.jsonl: JSON lines)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export")


def run(args: argparse.Namespace) -> int:
    try:
        n, skipped = export_shards(args.input, args.format, args.out, args.name, args.overwrite)
    except ValueError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    reasons = ", ".join(f"{r} {c}" for r, c in sorted(skipped.items()))
    print(f"export: {n} item(s) written to {args.out / args.name}"
          f"{f'; skipped: {reasons}' if reasons else ''}")
    return 0
