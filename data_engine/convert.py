"""Convert multimodal SFT data (sharegpt, messages, LLaVA, Parquet) and benchmarks into shards.

Formats (``--format``; ``auto``, the default, detects it from the first items and says so):

- ``sharegpt``: LLaMA-Factory's format, in which TVC's data was released (``conversations`` of
  ``from``/``value`` turns, ``system``, ``images``); other key and role names with ``--tags``
  (a JSON object like a ``dataset_info.json`` entry's ``columns``/``tags``, or a file holding it);
- ``messages``: OpenAI style (ms-swift's and LLaMA-Factory's default): ``messages`` of
  ``role``/``content``, content a string with ``<image>`` or a list of text/image parts;
- ``llava``: LLaVA-Instruct JSON (``image``: one path, ``conversations``);
- ``parquet``: Hugging Face datasets' Parquet files whose rows are any of the above, images
  embedded as bytes (``image`` or ``images: [{bytes, path}]``) or paths under ``--image-root``;
- ``mathvista``, ``mathvision``: the benchmarks (evaluation records; see ``formats_bench``).

Input is streamed (JSON arrays and objects a window at a time, JSON lines by line, Parquet by row
group), so memory does not grow with the file. A system turn becomes the record's system prompt;
conversations other than one question with its images in front and one answer keep all their
turns (every answer is learned; DVR goes into the long-CoT ones, ``--dvr-turns``); images stay
where their ``<image>`` placeholders are. Bad items (malformed, unsupported conversation, image
and placeholder counts that differ, missing or undecodable image, invalid record) are reported on
stderr with their label, counted by reason and skipped; they never stop the conversion.

Output in OUT, as ``distill`` writes it: shards ``PREFIX-pIIIofNNN-rRRR-XXXXXX.tar``, a manifest
(``manifest.jsonl``) that makes restarts exactly-once (rerun the same command after a crash: done
items are skipped, those of an unfinished shard redone), the settings it was started with (a
restart that changes one is refused), and ``report.json`` (converted, skipped by reason, shards).
``--shard-index I --num-shards N`` converts the items whose label hashes to I modulo N (a SLURM
array over one OUT); images are read and checked by ``--workers`` threads, in input order.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from data_engine.formats import FORMATS, Options, Source, convert_item, iter_converted
from data_engine.formats_chat import ShareGPTTags
from data_engine.items import Converted, Skip, extract_answer
from data_engine.manifest import ResumableOutput

__all__ = ["FORMATS", "Skip", "add_arguments", "convert_file", "extract_answer", "iter_converted",
           "run"]


def _start_afresh(out: Path, shard_prefix: str, names: tuple[str, ...]) -> None:
    """``--overwrite``: remove this partition's shards, manifest, settings and report."""
    shard = re.compile(rf"^{re.escape(shard_prefix)}-r\d{{3,}}-\d{{6}}\.tar(\.tmp)?$")
    for path in out.iterdir():
        if shard.match(path.name) or path.name in names:
            path.unlink()


def _progress_bar(source: Source, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    _, total, unit = source.progress
    return tqdm(desc="convert", total=total, unit=unit, unit_scale=unit == "B", mininterval=2.0,
                file=sys.stderr)


def convert_file(
    fmt: str,
    input_path: Path,
    image_root: Path,
    out_dir: Path,
    prefix: str | None = None,
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 1 << 30,
    overwrite: bool = False,
    *,
    options: Options | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    workers: int = 4,
    progress: bool = False,
) -> tuple[int, Counter[str], list[Path]]:
    """Convert partition ``shard_index`` of ``input_path`` into ``out_dir`` (resuming a run
    there); returns (records converted, skips by reason, shards), earlier runs' included."""
    # distill imports this package's readers, so its helpers are imported when used.
    from data_engine.distill import ordered_map
    from data_engine.distill_io import (
        check_partitioning,
        check_run_settings,
        in_partition,
        output_names,
        sample_key,
    )

    if not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= --shard-index < --num-shards, got {shard_index}, {num_shards}")
    options = options or Options(image_root)
    source = Source(fmt, input_path, options.tags)  # whole-input errors raise before OUT is made
    if source.detected:
        print(f"convert: detected {source.detected}", file=sys.stderr)
    shard_prefix, manifest_name, report_name = output_names(
        prefix or (fmt if fmt != "auto" else source.format), shard_index, num_shards)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / manifest_name
    settings_path = manifest.with_name(manifest.stem + ".settings.json")
    if overwrite:
        _start_afresh(out_dir, shard_prefix, (manifest_name, settings_path.name, report_name))
    check_partitioning(out_dir, shard_index, num_shards)
    settings = {"command": "convert", "format": source.format, "input": str(Path(input_path).resolve()),
                "image_root": str(Path(options.image_root).resolve()), "tags": asdict(options.tags),
                "dvr_turns": options.dvr_turns, "prefix": shard_prefix}
    check_run_settings(settings_path, settings,
                       started=manifest.exists() and manifest.stat().st_size > 0)

    with ResumableOutput(out_dir, shard_prefix, manifest, samples_per_shard, max_shard_bytes) as out:
        seen = {e["sample"] for e in out.done.values() if e.get("sample")}

        def todo() -> Iterator[tuple[str, Any]]:
            for label, item in source:
                if in_partition(label, shard_index, num_shards) and label not in out.done:
                    yield label, item

        def work(entry: tuple[str, Any]) -> Converted | Skip:
            try:
                return convert_item(source.format, entry[0], entry[1], options)
            except Skip as e:
                return e

        bar = _progress_bar(source, progress)
        for (label, _), result in ordered_map(work, todo(), workers):
            if not isinstance(result, Skip):
                record, images = result
                key = sample_key(record.id)
                if key not in seen:
                    seen.add(key)
                    out.add_kept({"key": label, "outcome": "kept", "sample": key}, key, record, images)
                    result = None
                else:
                    result = Skip("duplicate_id", f"record id {record.id!r} already converted")
            if isinstance(result, Skip):
                print(f"convert: skip {source.format} item {label}: {result}", file=sys.stderr)
                out.add_rejected({"key": label, "outcome": "skipped", "reason": result.reason})
            if bar is not None:
                bar.update(source.progress[0] - bar.n)
        if bar is not None:
            bar.update(source.progress[0] - bar.n)
            bar.close()
    entries = out.done.values()
    written = sum(e["outcome"] == "kept" for e in entries)
    skipped = Counter(e["reason"] for e in entries if e["outcome"] != "kept")
    report = {"format": source.format, "partition": [shard_index, num_shards], "converted": written,
              "skipped": dict(sorted(skipped.items())), "shards": [p.name for p in out.shards]}
    tmp = out_dir / (report_name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out_dir / report_name)  # a reader never sees half a report
    return written, skipped, out.shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="auto", help="input format")
    parser.add_argument("--input", type=Path, required=True,
                        help="the input file: JSON (array or object), JSON lines or Parquet")
    parser.add_argument("--image-root", type=Path, default=None,
                        help="directory the items' image paths are relative to "
                        "(default: the input file's directory)")
    parser.add_argument("--out", type=Path, required=True, help="output directory for shards")
    parser.add_argument("--prefix", default=None, help="shard name prefix (default: the format)")
    parser.add_argument("--tags", default=None,
                        help="sharegpt keys and role names: JSON like a LLaMA-Factory dataset_info "
                        "entry's columns/tags, or a file holding it")
    parser.add_argument("--dvr-turns", choices=("longest", "last", "all", "none"),
                        default="longest",
                        help="multi-turn items: which assistant turns are long CoT (DVR goes there)")
    parser.add_argument("--workers", type=int, default=4, help="threads reading and checking images")
    parser.add_argument("--shard-index", type=int, default=0, help="this job's partition")
    parser.add_argument("--num-shards", type=int, default=1, help="number of partitions (jobs)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="shard size bound")
    parser.add_argument("--max-shard-mb", type=int, default=1024, help="shard size bound (MiB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh: delete this partition's shards and manifest in OUT")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    try:
        if args.workers < 1:
            raise ValueError("--workers must be >= 1")
        image_root = args.image_root if args.image_root is not None else args.input.parent
        options = Options(image_root, ShareGPTTags.parse(args.tags), args.dvr_turns)
        written, skipped, shards = convert_file(
            args.format, args.input, image_root, args.out, args.prefix,
            args.samples_per_shard, args.max_shard_mb << 20, args.overwrite, options=options,
            shard_index=args.shard_index, num_shards=args.num_shards, workers=args.workers,
            progress=args.progress,
        )
    except (ValueError, UnicodeDecodeError) as e:
        # Whole-input problems (unreadable, broken JSON array, bad flag) are fatal.
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    reasons = ", ".join(f"{r} {c}" for r, c in sorted(skipped.items()))
    print(
        f"convert: {args.format}: {written} converted, {sum(skipped.values())} skipped"
        f"{f' ({reasons})' if reasons else ''}; {len(shards)} shard(s) in {args.out}"
    )
    return 0
