"""Distill long-CoT chains from a teacher with rejection sampling (method.md §2.5) into shards.

For each input question, round 1 asks the teacher once, greedily; the chain is checked by the
filters of :mod:`data_engine.filters` (a final answer equal to the gold one per the project's
scorer, a response of at least 200 tokens, a training sample of at most ``--max-length`` tokens as
training counts it -- prompt, images, DVR copies and response, measured with the checkpoint given
as ``--tokenizer`` and the training settings given as flags -- and at most 25 reflection words).
A question whose chains all failed goes to the next round: best-of-N sampling (N 8, temperature
1.0), until one passes or ``--rounds`` (2) are spent. The first passing chain is kept; a question
is "solved" only by a chain that passes every filter, so a correct but overlong greedy chain is
re-sampled too. The teacher is sent the question followed by ``--instruction``; the stored record
keeps the question alone.

Inputs (``--format``): ``records`` (shards of sample records: a directory, glob or brace pattern),
``sharegpt`` (LLaMA-Factory JSON), ``mathvista`` (JSON), ``mathvision`` (JSONL), read as
``convert`` reads them. Only the question, images and gold answer are used. Bad items (malformed,
missing image, no gold answer, a question holding control-token text such as ``<|im_end|>``) are
reported on stderr with their label (index, pid, line or shard:key) and counted in the report's
``invalid_input``, never fatal.

Output in OUT: kept records as shards ``PREFIX-pIIIofNNN-rRRR-XXXXXX.tar`` (record id = sample
key = the input record's id, made key-safe); ``manifest.jsonl`` (one line per finished question:
kept or the rejection reason, round, response tokens, training length, the shard), which makes
restarts exactly-once (see :mod:`data_engine.manifest`): rerun the same command after a crash or
``kill -9`` and done questions are skipped, those of an unfinished shard redone;
``manifest.settings.json``, the flags that shape the chains (teacher, rounds, filters, training
lengths, seed...), so a restart that changes one once questions are done is refused with the
differences listed; ``report.json`` (also printed): kept, rejected by reason, failed chains by
filter, token-length histogram, rounds needed.

Offline DVR (``--offline-dvr``, the paper's way): each kept chain is cut at a reflection point (else
near its midpoint), chosen by :class:`tvc_lightning.data.dvr.DVRTransform` with a bridging prompt;
the teacher is asked to go on from ``prefix + bridge`` with the image shown again, and the result
``prefix + bridge + continuation`` is kept if it passes the same filters. Chat APIs do not all
accept an assistant prefix, so the request is one user turn: image, question, then
``"Continue this reasoning after looking at the image again:\\n" + prefix + bridge``. The records
go to ``OUT/dvr/`` with their own manifest and report section; each stores where its bridge is
(``bridge_spans``), and training shows the image right there, once (see
:mod:`data_engine.offline_dvr`).

Scale-out: ``--shard-index I --num-shards N`` keeps the items whose label (index, pid, line number
or sample key) hashes (SHA-256) to I modulo N, so N jobs -- a SLURM array with
``--shard-index $SLURM_ARRAY_TASK_ID`` -- cover the input with disjoint parts, each writing its own
shards, ``manifest-III-of-NNN.jsonl`` and ``report-III-of-NNN.json`` into the same OUT.

Teachers (``--teacher``): ``local:MODEL_DIR``, ``openai:BASE_URL`` (``--model``, key from
``$OPENAI_API_KEY``), ``scripted:FILE`` (tests and dry runs); see :mod:`data_engine.teachers`.
Flags can come from ``--config FILE.yaml`` (keys are the flag names, ``_`` or ``-``); flags
given on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from data_engine.convert import Skip
from data_engine.distill_cli import TVC_INSTRUCTION, add_arguments, resolve
from data_engine.distill_io import (
    Chain,
    Question,
    build_report,
    check_partitioning,
    check_run_settings,
    iter_questions,
    iter_records,
    output_names,
    print_report,
    run_settings,
    sample_key,
)
from data_engine.filters import ChainChecker, FilterConfig, furthest
from data_engine.lengths import TrainingShape, load_measures
from data_engine.manifest import ResumableOutput
from data_engine.offline_dvr import continue_after_image
from data_engine.teachers import (
    Teacher,
    TeacherError,
    TeacherRequestError,
    make_teacher,
)
from tvc_lightning.data.dvr import DEFAULT_BRIDGES, DVRTransform

__all__ = ["Settings", "add_arguments", "distill", "resolve", "run", "solve"]
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Settings:
    """How questions are put to the teacher and chains are sampled."""

    rounds: int = 2
    best_of: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 8192
    seed: int = 0
    instruction: str = TVC_INSTRUCTION
    bridges: list[str] = field(default_factory=lambda: list(DEFAULT_BRIDGES))

    def prompt(self, question: str) -> str:
        return f"{question}\n{self.instruction}" if self.instruction else question


def stable_seed(*parts: object) -> int:
    """A seed from its parts that does not depend on the process, order or partition."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# --- one question ------------------------------------------------------------------------------


def solve(q: Question, teacher: Teacher, checker: ChainChecker,
          settings: Settings) -> tuple[dict[str, Any], Chain | None]:
    """Rejection sampling for one question: ``(manifest entry, kept chain or None)``."""
    chains: Counter[str] = Counter()
    reason: str | None = None
    base = {"key": q.key, "label": q.label}
    for rnd in range(1, settings.rounds + 1):
        greedy = rnd == 1
        try:
            responses = teacher.generate(
                settings.prompt(q.record.question), q.images, n=1 if greedy else settings.best_of,
                temperature=0.0 if greedy else settings.temperature,
                max_tokens=settings.max_new_tokens, seed=stable_seed(settings.seed, q.key, rnd),
            )
        except TeacherRequestError as e:
            print(f"distill: {q.label} ({q.key}): teacher refused: {e}", file=sys.stderr)
            return {**base, "outcome": "rejected", "reason": "teacher_error",
                    "rounds": rnd, "chains": dict(chains)}, None
        for response in responses:
            verdict = checker.check(response.strip(), q.record, q.images)
            chains[verdict.reason or "kept"] += 1
            if verdict.ok:
                return {**base, "outcome": "kept", "round": rnd, "tokens": verdict.tokens,
                        "length": verdict.length, "reflections": verdict.reflections,
                        "chains": dict(chains)}, Chain(response.strip())
            reason = furthest(reason, verdict.reason or "")
    return {**base, "outcome": "rejected", "reason": reason or "no_response",
            "rounds": settings.rounds, "chains": dict(chains)}, None


# --- orchestration -----------------------------------------------------------------------------


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in input order, at most ``workers`` calls running at once.

    Order is kept so that a run's shards do not depend on reply timings. On an error the queued
    calls are cancelled and the running ones are not waited for here.
    """
    pool = ThreadPoolExecutor(max_workers=workers)
    window: list[tuple[T, Future[R]]] = []
    failed = True
    try:
        for item in items:
            window.append((item, pool.submit(fn, item)))
            if len(window) >= 2 * workers:  # a little read-ahead keeps every worker busy
                first, future = window.pop(0)
                yield first, future.result()
        for first, future in window:
            yield first, future.result()
        failed = False
    finally:
        pool.shutdown(wait=not failed, cancel_futures=True)


def _progress(desc: str, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # plain prints instead
        return None
    return tqdm(desc=desc, unit="q", disable=not enabled, mininterval=2.0, file=sys.stderr)


def run_stage(name: str, items: Iterator[tuple[str, Question | Skip]], work: Callable[..., Any],
              output: ResumableOutput, concurrency: int, progress: bool,
              key_suffix: str = "") -> Counter[str]:
    """Feed the questions not done yet to ``work`` and write its results in input order.

    ``work(question) -> (manifest entry, Chain or None)``; a chain is written as the question's
    record with its response and bridge spans (none but offline DVR's), under the key
    ``sample_key(question.key) + key_suffix``. Invalid items are reported on stderr and counted by
    reason (returned).
    """
    invalid: Counter[str] = Counter()
    bar = _progress(name, progress)
    seen: set[str] = set()

    def todo() -> Iterator[tuple[str, Question | Skip]]:
        for label, q in items:
            if isinstance(q, Question):
                if q.key in seen:
                    q = Skip("duplicate_key", f"record id {q.key!r} already seen in this partition")
                else:
                    seen.add(q.key)
                    if q.key in output.done:
                        continue
            yield label, q

    def call(item: tuple[str, Question | Skip]) -> Any:
        return None if isinstance(item[1], Skip) else work(item[1])

    n = 0
    for (label, q), result in ordered_map(call, todo(), concurrency):
        if isinstance(q, Skip):
            invalid[q.reason] += 1
            print(f"{name}: skip input item {label}: {q}", file=sys.stderr)
            continue
        entry, kept = result
        if kept is None:
            output.add_rejected(entry)
        else:
            key = sample_key(q.key) + key_suffix
            record = dataclasses.replace(q.record, id=key, response=kept.text,
                                         bridge_spans=kept.bridge_spans)
            output.add_kept({**entry, "sample": key}, key, record, q.images)
        n += 1
        if bar is not None:
            bar.update(1)
        elif progress and n % 100 == 0:
            print(f"distill: {name}: {n} questions done", file=sys.stderr)
    if bar is not None:
        bar.close()
    return invalid


def distill(args: argparse.Namespace, teacher: Teacher | None = None) -> dict[str, Any]:
    """Run both stages for ``args`` (the CLI namespace); returns the report."""
    out = Path(args.out)
    check_partitioning(out, args.shard_index, args.num_shards)
    tokenizer = args.tokenizer
    if tokenizer is None and str(args.teacher).startswith("local:"):
        tokenizer = args.teacher.split(":", 1)[1]  # student and teacher share Qwen2-VL's tokenizer
    if tokenizer is None:
        raise ValueError("pass --tokenizer DIR (the target model's) to measure chain lengths, or "
                         "--tokenizer words for a rough whitespace count")
    # Everything cheap is checked before the teacher (possibly a 72B model) is loaded.
    shape = TrainingShape(args.max_length, args.min_pixels, args.max_pixels,
                          args.dvr_max_injections, args.dvr_pool_kernel, args.question_suffix)
    measures = load_measures(tokenizer, shape)
    checker = ChainChecker(
        FilterConfig(args.min_tokens, args.max_tokens, args.max_reflections, args.require_final_answer,
                     max_length=args.max_length),
        measures.count_tokens, measures.training_length, measures.control,
    )
    prefix, manifest_name, report_name = output_names(args.prefix, args.shard_index, args.num_shards)
    manifest = out / manifest_name
    check_run_settings(manifest.with_name(manifest.stem + ".settings.json"),
                       run_settings(args, tokenizer),
                       started=manifest.exists() and manifest.stat().st_size > 0)
    if teacher is None:
        teacher = make_teacher(args.teacher, model=args.model, timeout=args.timeout,
                               retries=args.retries, concurrency=args.concurrency,
                               dtype=args.dtype, device=args.device)
    settings = Settings(args.rounds, args.best_of, args.temperature, args.max_new_tokens, args.seed,
                        args.instruction)
    started = time.monotonic()
    maxsize = args.max_shard_mb << 20
    questions = iter_questions(args.format, args.input, args.image_root, args.shard_index,
                               args.num_shards, measures.control)
    with ResumableOutput(out, prefix, out / manifest_name, args.samples_per_shard, maxsize) as main:
        invalid = run_stage("distill", questions, lambda q: solve(q, teacher, checker, settings),
                            main, args.concurrency, args.progress)
    report = build_report(main, invalid)
    if args.offline_dvr:
        dvr = DVRTransform(p=1.0, max_injections=1, bridges=settings.bridges, seed=args.seed)
        dvr_dir = out / "dvr"
        with ResumableOutput(dvr_dir, prefix, dvr_dir / manifest_name, args.samples_per_shard,
                             maxsize) as side:
            kept = iter_records(main.shards)
            unreadable = run_stage(
                "dvr", kept, lambda q: continue_after_image(
                    q, teacher, checker, settings, dvr, stable_seed(settings.seed, q.key, "dvr")),
                side, args.concurrency, args.progress, key_suffix="-dvr",
            )
        report["dvr"] = build_report(side, unreadable)
    report["partition"] = [args.shard_index, args.num_shards]
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    tmp = out / (report_name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / report_name)  # a reader never sees half a report
    print_report(report, out / report_name)
    return report


# --- CLI ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace, teacher: Teacher | None = None) -> int:
    try:
        distill(resolve(args), teacher)
    except (ValueError, TeacherError) as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    return 0
