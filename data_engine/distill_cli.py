"""Command-line flags of ``python -m data_engine distill`` and their resolution with ``--config``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TVC_INSTRUCTION = "Please answer the question using a long-chain reasoning style and think step by step."

# Real defaults live here, not in argparse: every flag parses to None when absent, so a config
# file can fill exactly the flags that the command line did not give.
DEFAULTS: dict[str, Any] = {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def a(flag: str, default: Any = None, **kwargs: Any) -> None:
        DEFAULTS[flag[2:].replace("-", "_")] = default
        if default not in (None, False, ""):
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(flag, default=None, **kwargs)

    a("--config", type=Path, help="YAML (or .json) file of flag values; command-line flags win")
    a("--format", "records", choices=["records", "sharegpt", "mathvista", "mathvision"],
      help="input format")
    a("--input", help="input file (records: shard directory, glob or brace pattern); required")
    a("--image-root", type=Path, help="directory image paths are relative to (default: the input "
      "file's directory)")
    a("--out", type=Path, help="output directory; required")
    a("--teacher", help="local:MODEL_DIR, openai:BASE_URL or scripted:FILE; required")
    a("--model", "default", help="model name sent to an openai: teacher")
    a("--dtype", "float32", help="local: teacher dtype (float32, bfloat16, float16)")
    a("--device", help="local: teacher device, e.g. cuda (default: cpu)")
    a("--rounds", 2, type=int, help="round 1 greedy, later rounds best-of-N sampling")
    a("--best-of", 8, type=int, help="N: samples per later round")
    a("--temperature", 1.0, type=float, help="sampling temperature of later rounds")
    a("--max-new-tokens", 8192, type=int, help="teacher generation limit")
    a("--seed", 0, type=int, help="base seed (mixed with each question key and round)")
    a("--instruction", TVC_INSTRUCTION, help="appended to the question sent to the teacher")
    a("--tokenizer", help="target model's checkpoint dir (tokenizer and image processor) for "
      "lengths, or 'words' for a rough dry run (default for local: the teacher's)")
    a("--min-tokens", 200, type=int, help="shortest response kept, in tokens (0: no bound)")
    a("--max-tokens", 0, type=int, help="longest response kept, in tokens (0: no bound; "
      "--max-length bounds what training sees)")
    a("--max-length", 8192, type=int, help="training's data.max_length: longest training sample "
      "kept, counted as training counts it (prompt, images, DVR copies, response; needs the "
      "checkpoint's image processor in --tokenizer); 0: not checked")
    a("--min-pixels", type=int, help="training's data.min_pixels (default: the processor's)")
    a("--max-pixels", type=int, help="training's data.max_pixels (default: the processor's)")
    a("--dvr-max-injections", 1, type=int, help="training's data.dvr.max_injections, for the "
      "length (0: training without DVR, data.dvr.p 0)")
    a("--dvr-pool-kernel", 4, type=int, help="training's data.dvr.pool_kernel, for the length")
    a("--question-suffix", "", help="training's data.question_suffix, for the length")
    a("--max-reflections", 25, type=int, help="most reflection words kept (-1: no bound)")
    a("--require-final-answer", True, action=argparse.BooleanOptionalAction,
      help="reject chains without a \\boxed{}/'answer is' final answer")
    a("--offline-dvr", False, action="store_true", help="also write DVR continuations to OUT/dvr/")
    a("--concurrency", 8, type=int, help="questions in flight at once")
    a("--timeout", 600.0, type=float, help="openai: seconds per request")
    a("--retries", 4, type=int, help="openai: retries with exponential backoff")
    a("--shard-index", 0, type=int, help="this job's partition of the input")
    a("--num-shards", 1, type=int, help="number of partitions (jobs)")
    a("--prefix", "distill", help="shard name prefix")
    a("--samples-per-shard", 1000, type=int, help="shard size bound")
    a("--max-shard-mb", 1024, type=int, help="shard size bound (MiB)")
    a("--progress", True, action=argparse.BooleanOptionalAction, help="progress bar on stderr")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags not given from ``--config``, then from :data:`DEFAULTS`; validate."""
    if args.config is not None:
        text = Path(args.config).read_text(encoding="utf-8")
        if args.config.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{args.config}: expected a mapping of flag names to values")
        for name, value in values.items():
            dest = str(name).replace("-", "_")
            if dest == "config" or dest not in DEFAULTS:
                raise ValueError(f"{args.config}: unknown key {name!r}")
            if getattr(args, dest) is None:
                setattr(args, dest, Path(value) if dest in ("out", "image_root") else value)
    for dest, default in DEFAULTS.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, default)
    missing = [f"--{n}" for n in ("input", "out", "teacher") if getattr(args, n) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (flag or config key)")
    if not 0 <= args.shard_index < args.num_shards:
        raise ValueError(f"need 0 <= --shard-index < --num-shards, got {args.shard_index}, "
                         f"{args.num_shards}")
    if args.rounds < 1 or args.best_of < 1 or args.concurrency < 1:
        raise ValueError("--rounds, --best-of and --concurrency must be >= 1")
    if args.max_length < 0 or args.dvr_max_injections < 0 or args.dvr_pool_kernel < 1:
        raise ValueError("--max-length and --dvr-max-injections must be >= 0, --dvr-pool-kernel >= 1")
    return args
