"""Inputs, partitions, output names and the report of ``python -m data_engine distill``."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_engine.convert import FORMATS, Skip, iter_converted
from data_engine.manifest import ResumableOutput
from tvc_lightning.data.schema import SampleRecord, image_members
from tvc_lightning.data.shards import SkipCounter, decode_sample, iter_shard, resolve_urls

# Report buckets of kept chain lengths, in tokens: [0, 200), [200, 500), ..., [8000, inf).
TOKEN_EDGES = (0, 200, 500, 1000, 2000, 4000, 8000)
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,72}$")


@dataclass
class Question:
    """One input item: ``key`` (its record id) names it in the manifest, ``label`` in messages."""

    label: str
    key: str
    record: SampleRecord
    images: list[bytes]  # as read: JPEG/PNG bytes pass into the output shards unchanged


@dataclass(frozen=True)
class Chain:
    """A kept chain: the response and, for offline DVR, its bridge spans (the image follows each)."""

    text: str
    bridge_spans: tuple[tuple[int, int], ...] | None = None


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def in_partition(label: str, index: int, count: int) -> bool:
    """Whether an item belongs to partition ``index`` of ``count`` (same answer on every machine)."""
    return count == 1 or stable_hash(label) % count == index


def sample_key(key: str) -> str:
    """A shard-safe sample key for a question key: itself when safe, else cleaned + a hash.

    Capped at 72 characters so that ``-dvr`` still fits the writer's 80.
    """
    if _SAFE_KEY.match(key):
        return key
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", key)[:60]
    return f"{clean}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:10]}"


def _question(label: str, record: SampleRecord, images: list[bytes],
              control: re.Pattern[str] | None = None) -> Question | Skip:
    if not record.answer.strip():
        return Skip("no_gold_answer", "the record has no gold answer to check chains against")
    if not images:
        return Skip("no_image", "training skips samples without an image")
    found = control.search(record.question) if control is not None else None
    if found:
        # Training skips such text (it would act as the real token); the teacher never sees it.
        return Skip("control_token", f"the question holds the control-token text {found.group()!r}")
    return Question(label, record.id, record, images)


def iter_questions(fmt: str, input_spec: str | Path, image_root: Path | None, index: int = 0,
                   count: int = 1, control: re.Pattern[str] | None = None,
                   ) -> Iterator[tuple[str, Question | Skip]]:
    """``(label, Question)`` for the items of partition ``index``/``count``, ``(label, Skip)``
    for bad ones (``control`` matches the control-token text a question must not hold). The
    partition is decided on the label before any image is read."""
    if fmt == "records":
        urls = resolve_urls(str(input_spec))

        def records() -> Iterator[tuple[str, Question | Skip]]:
            for label, q in _iter_shards(urls, control):
                if in_partition(label.rsplit(":", 1)[-1], index, count):
                    yield label, q

        return records()
    if fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}")
    path = Path(input_spec)
    if not path.is_file():
        raise FileNotFoundError(f"--input {path}: no such file")
    root = image_root if image_root is not None else path.parent
    items = iter_converted(fmt, path, root, select=lambda label: in_partition(label, index, count))

    def converted() -> Iterator[tuple[str, Question | Skip]]:
        for label, item in items:
            yield label, item if isinstance(item, Skip) else _question(label, *item, control)

    return converted()


def _iter_shards(urls: Sequence[str], control: re.Pattern[str] | None = None,
                 ) -> Iterator[tuple[str, Question | Skip]]:
    """Decode shard samples with the training reader's checks; the label is ``shard:key``."""
    counter = SkipCounter()
    for url in urls:
        bad_tars = counter.as_dict()["bad_tar"]
        for sample in iter_shard(url, counter):
            label = f"{Path(url).name}:{sample.get('__key__')}"
            before = counter.as_dict()
            decoded = decode_sample(sample, counter)
            if decoded is None:
                after = counter.as_dict()
                reason = next((r for r in after if after[r] > before[r]), "bad_record")
                yield label, Skip(reason, "unusable sample (bad JSON, record or image)")
                continue
            record, _ = decoded
            images = [sample[name] for name in image_members(sample)]
            yield label, _question(label, record, images, control)
        if counter.as_dict()["bad_tar"] > bad_tars:
            yield Path(url).name, Skip("bad_tar", "unreadable or truncated shard; its rest skipped")


def iter_records(shards: Sequence[Path]) -> Iterator[tuple[str, Question | Skip]]:
    """The kept records of finished shards, as questions whose ``record.response`` is the chain."""
    return _iter_shards([str(p) for p in shards])


# --- output names ------------------------------------------------------------------------------


def output_names(prefix: str, index: int, count: int) -> tuple[str, str, str]:
    """``(shard prefix, manifest name, report name)`` of partition ``index`` of ``count``."""
    shard_prefix = f"{prefix}-p{index:03d}of{count:03d}"
    if count == 1:
        return shard_prefix, "manifest.jsonl", "report.json"
    part = f"{index:03d}-of-{count:03d}"
    return shard_prefix, f"manifest-{part}.jsonl", f"report-{part}.json"


def check_partitioning(out: Path, index: int, count: int) -> None:
    """Refuse to mix partitionings in one OUT: their items would overlap and be done twice."""
    if not out.is_dir():
        return
    for path in out.glob("manifest*.jsonl"):
        m = re.fullmatch(r"manifest-\d+-of-(\d+)\.jsonl", path.name)
        other = int(m.group(1)) if m else 1 if path.name == "manifest.jsonl" else None
        if other is not None and other != count:
            raise ValueError(f"{out} holds a run split into {other} partition(s) ({path.name}); "
                             f"--num-shards {count} would redo its items: use another --out")


# Flags whose values shape the chains a run writes; the others (concurrency, timeouts, shard
# sizes, progress, --offline-dvr, which adds a stage beside them) can change between restarts.
OUTPUT_SETTINGS = ("format", "input", "image_root", "teacher", "model", "dtype", "rounds", "best_of",
                   "temperature", "max_new_tokens", "seed", "instruction", "tokenizer", "min_tokens",
                   "max_tokens", "max_reflections", "require_final_answer", "prefix", "max_length",
                   "min_pixels", "max_pixels", "dvr_max_injections", "dvr_pool_kernel",
                   "question_suffix")


def _normalized(value: Any) -> Any:
    """One spelling per setting: numbers as numbers ('1' from a config file == 1.0 == 1), existing
    paths absolute, the rest as strings."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return int(number) if number.is_integer() else number
    kind, sep, target = text.partition(":")
    if sep and kind in ("local", "scripted") and Path(target).exists():  # a teacher spec
        return f"{kind}:{Path(target).resolve()}"
    return str(Path(text).resolve()) if Path(text).exists() else text


def run_settings(args: Any, tokenizer: str) -> dict[str, Any]:
    """The chain-shaping settings of ``args`` (the resolved CLI namespace), normalized."""
    settings = {k: getattr(args, k) for k in OUTPUT_SETTINGS}
    settings["tokenizer"] = tokenizer
    if settings["image_root"] is None and args.format != "records":
        settings["image_root"] = Path(args.input).parent  # the default, made explicit
    if str(args.teacher).startswith("openai:"):
        settings["teacher"] = "openai"  # the served --model is the teacher; its URL may move
    return {k: _normalized(v) for k, v in settings.items()}


def check_run_settings(path: Path, settings: dict[str, Any], started: bool) -> None:
    """Record a run's output settings at ``path``; once the run has ``started`` (its manifest has
    entries), refuse a restart that changes any of them: chains made under two settings would be
    mixed silently. Before that, a rerun (after a typo, say) simply records its own."""
    if started and path.exists():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        changed = [f"--{k.replace('_', '-')} {earlier.get(k)!r} -> {settings.get(k)!r}"
                   for k in sorted(set(earlier) | set(settings)) if earlier.get(k) != settings.get(k)]
        if changed:
            raise ValueError(
                f"{path.parent} was started with other settings ({path.name}): "
                f"{'; '.join(changed)}. A restart must use the same ones; to distill with the "
                "new settings, use another --out"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


# --- report ------------------------------------------------------------------------------------


def _bucket(tokens: int) -> str:
    lower = max(e for e in TOKEN_EDGES if e <= tokens)
    i = TOKEN_EDGES.index(lower)
    return f"{lower}+" if i == len(TOKEN_EDGES) - 1 else f"{lower}-{TOKEN_EDGES[i + 1] - 1}"


def build_report(output: ResumableOutput, invalid: Counter[str]) -> dict[str, Any]:
    """Counts over every finished question of this partition (earlier runs' included)."""
    entries = list(output.done.values())
    kept = [e for e in entries if e["outcome"] == "kept"]
    chains: Counter[str] = Counter()
    for e in entries:
        chains.update(e.get("chains") or {})
    histogram = Counter(_bucket(int(e["tokens"])) for e in kept if e.get("tokens") is not None)
    order = [_bucket(e) for e in TOKEN_EDGES]
    report: dict[str, Any] = {
        "questions": len(entries),
        "kept": len(kept),
        "rejected": dict(sorted(Counter(e["reason"] for e in entries if e["outcome"] != "kept").items())),
        "invalid_input": dict(sorted(invalid.items())),
        "token_histogram": {b: histogram[b] for b in order if histogram[b]},
        "shards": [p.name for p in output.shards],
    }
    if chains:
        report["chains"] = dict(sorted(chains.items()))
    rounds = Counter(str(e["round"]) for e in kept if "round" in e)
    if rounds:
        report["rounds_needed"] = dict(sorted(rounds.items(), key=lambda kv: int(kv[0])))
    return report


def print_report(report: dict[str, Any], path: Path) -> None:
    def line(name: str, r: dict[str, Any]) -> str:
        rejected = ", ".join(f"{k} {v}" for k, v in r["rejected"].items()) or "none"
        text = f"{name}: {r['kept']} kept of {r['questions']}; rejected: {rejected}"
        if r["invalid_input"]:
            text += "; invalid input: " + ", ".join(f"{k} {v}" for k, v in r["invalid_input"].items())
        return text

    print(line("distill", report))
    if report.get("rounds_needed"):
        print("  rounds needed: " + ", ".join(f"{k}: {v}" for k, v in report["rounds_needed"].items()))
    if report["token_histogram"]:
        print("  kept tokens: " + ", ".join(f"{k}: {v}" for k, v in report["token_histogram"].items()))
    if "dvr" in report:
        print(line("offline dvr", report["dvr"]))
    print(f"  report: {path}", flush=True)
