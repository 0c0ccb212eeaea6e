"""The ``evaluate`` loop: decode a benchmark with PVC (and plainly), resumably, on one or more ranks.

Batches are fixed by the benchmark alone: items in file order, cut into ``batch_size`` chunks,
chunk ``b`` decoded by rank ``b % world_size``. So a batch always holds the same items, whatever
the number of ranks and however often the run was restarted, and greedy decoding gives the same
answers as one uninterrupted single-process run. Ranks hold the whole model each (data parallel;
launched with ``torchrun``, which sets ``RANK``/``WORLD_SIZE``) and never wait on one another while
decoding; they meet once at the end, where rank 0 reads every rank's progress file (so ``--out``
must be a folder all ranks share), extracts the answers (by rules, or with the optional LLM judge
of :mod:`.judge`), scores them and writes the official files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from tvc_lightning.data.tokenize import ChatFormat, special_token_pattern
from tvc_lightning.evaluate.benchmarks import Benchmark, EvalItem, load_benchmark
from tvc_lightning.evaluate.formats import write_outputs
from tvc_lightning.evaluate.judge import Judge
from tvc_lightning.evaluate.progress import ProgressWriter, check_run_settings, read_done
from tvc_lightning.families import family_at, family_of
from tvc_lightning.predict import skip_reason
from tvc_lightning.pvc import PVCConfig, pvc_generate

SHOWN_MISSING = 5  # missing images named in the message; the rest are counted


@dataclass
class EvalSettings:
    """Everything ``evaluate`` needs; the command line fills it (see :mod:`.cli`)."""

    checkpoint: str
    benchmark: str
    input: str
    out: str
    image_root: str | None = None
    base_model: str | None = None
    generation: PVCConfig = field(default_factory=PVCConfig)
    compare_plain: bool = False
    batch_size: int = 8
    limit: int | None = None
    allow_missing_images: bool = False
    system_prompt: str | None = None  # None: the model family's default system turn
    question_suffix: str = ""
    min_pixels: int | None = None
    max_pixels: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    attn_implementation: str = "sdpa"
    model_name: str | None = None
    progress_bar: bool = True
    judge: str | None = None
    judge_model: str | None = None
    judge_timeout: float = 120.0
    judge_retries: int = 4
    judge_concurrency: int = 8
    judge_max_tokens: int = 256

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.judge is not None and not self.judge_model:
            raise ValueError(f"--judge {self.judge}: needs --judge_model, the served model's name "
                             "(sent with each request and recorded as judge:NAME per item)")
        if self.judge is None and self.judge_model is not None:
            raise ValueError(f"--judge_model {self.judge_model}: has no effect without --judge "
                             "openai:URL")
        if not self.judge_timeout > 0:
            raise ValueError(f"--judge_timeout must be > 0, got {self.judge_timeout}")
        for flag, value, least in (("judge_retries", self.judge_retries, 0),
                                   ("judge_concurrency", self.judge_concurrency, 1),
                                   ("judge_max_tokens", self.judge_max_tokens, 1)):
            if value < least:
                raise ValueError(f"--{flag} must be >= {least}, got {value}")


# --- set-up ------------------------------------------------------------------------------------

def _distributed(device: str) -> tuple[int, int, bool]:
    """``(rank, world size, whether this call started the process group)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    dist = torch.distributed
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Ranks meet only at the end; one may finish hours before the slowest, so the default
    # collective timeout (minutes) would kill a healthy run at that barrier.
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(hours=48))
    return dist.get_rank(), dist.get_world_size(), True


def _device(setting: str) -> torch.device:
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def load_for_eval(checkpoint: str, base_model: str | None, dtype: str,
                  attn_implementation: str = "sdpa") -> tuple[Any, str]:
    """The model of ``checkpoint`` and the directory its processor comes from.

    An HF directory (``config.json`` inside) loads as it is; a Lightning ``.ckpt``, DeepSpeed or
    FSDP2 checkpoint is read with :mod:`tvc_lightning.export`'s reader and its ``model.*`` weights
    loaded into the architecture of its base checkpoint (``--base_model``, by default the
    ``model_name_or_path`` it was trained from), in memory: nothing is written to disk. Missing or
    unexpected weights are an error (the base is the wrong architecture).
    """
    from tvc_lightning.hf import load_model, nonfinite_parameter, resolve_checkpoint_path, resolve_dtype

    path = Path(checkpoint)
    if path.is_dir() and (path / "config.json").exists():
        return load_model(path, dtype, attn_implementation), str(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file or directory")
    from transformers import AutoConfig

    from tvc_lightning.export import _PREFIX, _lightning_checkpoint

    target = resolve_dtype(dtype)
    ckpt = _lightning_checkpoint(path, target)
    base = base_model or ckpt.get("hyper_parameters", {}).get("model_name_or_path")
    if not base:
        raise ValueError(f"--checkpoint {checkpoint}: no model_name_or_path in its "
                         "hyperparameters; pass --base_model")
    base = resolve_checkpoint_path(base, "--base_model (or the checkpoint's model_name_or_path)")
    state = {k[len(_PREFIX):]: (v.to(target) if v.is_floating_point() else v)
             for k, v in ckpt.pop("state_dict").items() if k.startswith(_PREFIX)}
    if not state:
        raise ValueError(f"--checkpoint {checkpoint}: no '{_PREFIX}*' weights in its state_dict")
    # from_pretrained with our weights (not a meta build + load_state_dict): it also computes the
    # non-persistent buffers (rotary frequencies) that no checkpoint holds.
    family = family_at(base)  # an unsupported family fails here, naming the base's config.json
    config = AutoConfig.from_pretrained(base)
    model, info = family.model_class().from_pretrained(
        None, config=config, state_dict=state, dtype=target,
        attn_implementation=attn_implementation, output_loading_info=True)
    # The base's end-of-turn tokens and sampling defaults, as validation and export use them
    # (config.json alone gives Qwen2-VL a single eos and answers that run past <|endoftext|>).
    if (Path(base) / "generation_config.json").exists():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(base)
    # HF would fill missing weights randomly and only warn: an evaluation of that is meaningless.
    wrong = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys",
                                                     "mismatched_keys")}
    if any(wrong.values()):
        raise ValueError(f"--checkpoint {checkpoint} does not fit --base_model {base}: "
                         + "; ".join(f"{k} {v[:5]}" for k, v in wrong.items() if v))
    bad = nonfinite_parameter(model)
    if bad is not None:
        raise ValueError(f"--checkpoint {checkpoint}: parameter {bad!r} holds NaN/inf")
    return model, base


def _checkpoint_stamp(checkpoint: str) -> list[int]:
    """Size and newest modification time of the checkpoint's files: ``last.ckpt`` rewritten in
    place by further training is another model, whose answers must not join the stored ones."""
    path = Path(checkpoint)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    stats = [f.stat() for f in files]
    return [sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0)]


def _check_inputs(s: EvalSettings, dtype: str) -> None:
    """Flags whose mistakes would otherwise only show after run.json recorded them (and then
    refused the corrected rerun)."""
    from tvc_lightning.hf import resolve_dtype

    if not Path(s.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {s.checkpoint}: no such file or directory")
    try:
        resolve_dtype(dtype)
    except (ValueError, KeyError) as error:
        raise ValueError(f"--dtype {s.dtype}: {error}") from None
    if s.base_model is not None and not Path(s.base_model).is_dir():
        raise FileNotFoundError(f"--base_model {s.base_model}: no such directory")


def _run_settings(s: EvalSettings, dtype: str) -> dict[str, Any]:
    """What shapes the answers: a restart must keep these (see :func:`check_run_settings`)."""
    return {"checkpoint": str(Path(s.checkpoint).resolve()),
            "checkpoint_stamp": _checkpoint_stamp(s.checkpoint), "benchmark": s.benchmark,
            "input": str(Path(s.input).resolve()), "base_model": s.base_model,
            "generation": dataclasses.asdict(s.generation), "system_prompt": s.system_prompt,
            "question_suffix": s.question_suffix, "min_pixels": s.min_pixels,
            "max_pixels": s.max_pixels, "dtype": dtype, "judge": _judge_settings(s)}


def _judge_settings(s: EvalSettings) -> dict[str, Any] | None:
    """The judge settings that shape extractions (None without a judge, as in runs that predate
    the judge, so their run.json still matches)."""
    if s.judge is None:
        return None
    return {"spec": s.judge, "model": s.judge_model, "max_tokens": s.judge_max_tokens}


def make_judge(s: EvalSettings, out: Path) -> Judge | None:
    """The LLM judge of ``--judge`` (its URL checked now, before any decoding), or None."""
    if s.judge is None or s.judge_model is None:
        return None
    return Judge(s.judge, s.judge_model, out, timeout=s.judge_timeout, retries=s.judge_retries,
                 concurrency=s.judge_concurrency, max_tokens=s.judge_max_tokens)


def missing_images_message(bench: Benchmark, missing: list[tuple[str, Path]], root: str | None,
                           allowed: bool) -> str:
    items = len({i for i, _ in missing})
    shown = ", ".join(f"{p.name} (item {i})" for i, p in missing[:SHOWN_MISSING])
    more = f" and {len(missing) - SHOWN_MISSING} more" if len(missing) > SHOWN_MISSING else ""
    where = f"--image_root {root}" if root else "the input file's folder (no --image_root)"
    head = (f"{len(missing)} image(s) of {items} of {len(bench.items)} {bench.name} items not "
            f"found under {where}: {shown}{more}")
    if allowed:
        return head + f". Skipping those {items} items (--allow_missing_images); scores cover the rest."
    return head + (". Point --image_root at the benchmark's image folder, or pass "
                   "--allow_missing_images to score the others.")


# --- decoding ----------------------------------------------------------------------------------

def _decode_rows(model: Any, processor: Any, items: list[EvalItem], config: PVCConfig,
                 chat: ChatFormat, pattern: Any) -> list[dict[str, Any]]:
    """One progress row per item: the decoded answer, or ``skipped`` with the reason."""
    rows: dict[str, dict[str, Any]] = {}
    todo, images = [], []
    for item in items:
        reason = skip_reason(item.prompt, pattern)
        if reason is None:
            try:
                loaded = item.images()
            except Exception as e:  # PIL raises many types for a bad file
                reason = f"bad_image: {type(e).__name__}: {e}"
        if reason is not None:
            rows[item.id] = {"id": item.id, "skipped": reason}
            continue
        todo.append(item)
        images.append(loaded)
    if todo:
        results = pvc_generate(model, processor, [i.prompt for i in todo], images, config, chat=chat)
        for item, r in zip(todo, results, strict=True):
            rows[item.id] = {
                "id": item.id, "response": r.text,
                "calibrations": [{"step": c.step, "trigger": c.trigger} for c in r.calibrations],
                "num_generated": r.num_generated, "finish_reason": r.finish_reason}
    return [rows[item.id] for item in items]


def _progress(total: int, initial: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="answer",
                dynamic_ncols=True, smoothing=0.1)


def evaluate(s: EvalSettings) -> dict[str, Any] | None:
    """Run an evaluation; returns the summary on rank 0 (None on other ranks)."""
    started = time.monotonic()
    rank, world, started_group = _distributed(s.device)
    try:
        return _evaluate(s, rank, world, started)
    finally:
        if started_group:
            torch.distributed.destroy_process_group()


def _evaluate(s: EvalSettings, rank: int, world: int, started: float) -> dict[str, Any] | None:
    out = Path(s.out)
    device = _device(s.device)
    dtype = s.dtype if s.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    bench = load_benchmark(s.benchmark, s.input, s.image_root, s.limit)
    missing = bench.missing()
    if missing:
        message = missing_images_message(bench, missing, s.image_root, s.allow_missing_images)
        if not s.allow_missing_images:
            raise FileNotFoundError(message)
        if rank == 0:
            print(f"evaluate: {message}", file=sys.stderr)
    absent = {i for i, _ in missing}
    items = [item for item in bench.items if item.id not in absent]
    _check_inputs(s, dtype)
    judge = make_judge(s, out) if rank == 0 else None  # a bad --judge URL fails before run.json
    try:
        rescored = check_run_settings(out, _run_settings(s, dtype), write=rank == 0,
                                      rescoring=("judge",))
        if rescored and rank == 0:
            print(f"evaluate: scoring settings changed since the last run ({'; '.join(rescored)}):"
                  " every stored answer is scored again with them (none is decoded again)",
                  file=sys.stderr)
        return _decode_and_finish(s, rank, world, started, out, device, dtype, bench, items,
                                  len(absent), judge)
    finally:
        if judge is not None:
            judge.close()


def _decode_and_finish(s: EvalSettings, rank: int, world: int, started: float, out: Path,
                       device: torch.device, dtype: str, bench: Benchmark, items: list[EvalItem],
                       missing: int, judge: Judge | None) -> dict[str, Any] | None:
    """Decode this rank's share of the batches not yet in the progress files; then, on rank 0
    once every rank is done, score all of them (:func:`_finish`)."""

    from tvc_lightning.hf import load_processor

    model, processor_dir = load_for_eval(s.checkpoint, s.base_model, dtype, s.attn_implementation)
    model.to(device).eval()
    processor = load_processor(processor_dir, s.min_pixels, s.max_pixels)
    chat = ChatFormat.for_family(family_of(model), s.system_prompt, question_suffix=s.question_suffix)
    pattern = special_token_pattern(processor.tokenizer)
    configs = {"pvc": s.generation}
    if s.compare_plain:
        configs["plain"] = dataclasses.replace(s.generation, max_calibrations=0)

    done = read_done(out)
    batches = [items[i:i + s.batch_size] for i in range(0, len(items), s.batch_size)]
    mine = batches[rank::world]
    total = sum(len(b) for b in mine) * len(configs)
    initial = sum((mode, item.id) in done for b in mine for item in b for mode in configs)
    writer = ProgressWriter(out, rank)
    bar = _progress(total, initial, s.progress_bar and rank == 0,
                    f"evaluate {bench.name}" + (f" (rank 0 of {world})" if world > 1 else ""))
    try:
        for batch in mine:
            for mode, config in configs.items():
                todo = [item for item in batch if (mode, item.id) not in done]
                if todo:
                    writer.write(mode, _decode_rows(model, processor, todo, config, chat, pattern))
                    bar.update(len(todo))
    finally:
        bar.close()
        writer.close()
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    return _finish(s, bench, items, list(configs), out, time.monotonic() - started, missing, judge)


def _finish(s: EvalSettings, bench: Benchmark, items: list[EvalItem], modes: list[str], out: Path,
            seconds: float, missing: int, judge: Judge | None = None) -> dict[str, Any]:
    """Rank 0, after every rank is done: the official files per mode and ``summary.json``."""
    done = read_done(out)
    lost = [(m, i.id) for m in modes for i in items if (m, i.id) not in done]
    if lost:
        raise RuntimeError(
            f"{len(lost)} answers are not in {out / 'progress'} after every rank finished (first: "
            f"{lost[:3]}): is --out a folder that all ranks share?")
    name = s.model_name or Path(s.checkpoint.rstrip("/")).stem
    summary: dict[str, Any] = {
        "benchmark": bench.name, "checkpoint": s.checkpoint, "items": len(bench.items),
        "missing_images": missing, "unreadable_input": bench.skipped,
        "judge": _judge_settings(s), "modes": {}, "seconds_this_run": round(seconds, 1)}
    for mode in modes:
        rows = {i.id: done[(mode, i.id)] for i in items}
        skipped = [r for r in rows.values() if "skipped" in r]
        judged, extraction = None, {}
        if judge is not None:
            judged, stats = judge.extract(mode, [(i, rows[i.id]["response"]) for i in items
                                                 if "skipped" not in rows[i.id]], s.progress_bar)
            extraction = {"extraction": {"judge": len(judged) - stats.failed,
                                         "rule_judge_failed": stats.failed,
                                         "judge_replies_cached": stats.cached,
                                         "judge_requests": stats.asked}}
        paths, accuracy, correct, total = write_outputs(bench.name, items, rows, out, mode,
                                                        f"{name}-{mode}", judged)
        decoded = [r for r in rows.values() if "skipped" not in r]
        summary["modes"][mode] = {**extraction,
            "accuracy": accuracy, "correct": correct, "total": total, "skipped": len(skipped),
            "calibrations_per_item": (sum(len(r["calibrations"]) for r in decoded) / len(decoded)
                                      if decoded else 0.0),
            "generated_tokens_per_item": (sum(r["num_generated"] for r in decoded) / len(decoded)
                                          if decoded else 0.0),
            "files": [p.name for p in paths]}
    if "plain" in summary["modes"]:
        summary["pvc_minus_plain"] = (summary["modes"]["pvc"]["accuracy"]
                                      - summary["modes"]["plain"]["accuracy"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
