"""``python -m tvc_lightning analyze {forgetting,removal}``: visual-forgetting analyses of a checkpoint.

Examples::

    python -m tvc_lightning analyze forgetting --checkpoint outputs/tiny/checkpoints/last.ckpt \\
        --data outputs/tiny/data/val --out outputs/analyze/forgetting --limit 16 \\
        --generation.max_new_tokens 512 --wandb_project tvc-analysis
    python -m tvc_lightning analyze removal --checkpoint outputs/tiny/model \\
        --data outputs/tiny/data/val --out outputs/analyze/removal --grid '[0, 0.25, 0.5, 1]'

``--checkpoint`` is an HF model directory, a Lightning ``.ckpt`` or a DeepSpeed / FSDP2 checkpoint
directory (loaded as ``evaluate`` loads it; ``--base_model`` for the architecture). ``--data`` is
WebDataset shards (a folder such as a ``val`` split, a glob or a brace pattern). Every flag can come
from a ``--config`` YAML; ``--generation.*`` are :class:`~tvc_lightning.pvc.PVCConfig`'s fields.
With ``--wandb_project`` the results also go to a W&B run (offline unless a key is configured;
``WANDB_MODE`` wins).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from tvc_lightning.data.tokenize import ChatFormat
from tvc_lightning.evaluate.cli import add_checkpoint_arguments, add_decoding_arguments
from tvc_lightning.families import family_of
from tvc_lightning.pvc import PVCConfig

COMMANDS = ("forgetting", "removal")
PROG = "python -m tvc_lightning analyze"


def _common(p: ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    add_decoding_arguments(p)
    p.add_argument("--data", type=str, required=True,
                   help="WebDataset shards: a folder (e.g. DATA/val), glob or brace pattern")
    p.add_argument("--limit", type=int | None, default=None, help="only the first N samples")
    p.add_argument("--out", type=str, required=True, help="output folder (CSV, PNG)")
    p.add_argument("--batch_size", type=int, default=8, help="samples decoded together")
    p.add_argument("--wandb_project", type=str | None, default=None,
                   help="also log to this W&B project (offline unless a key is configured)")
    p.add_argument("--wandb_name", type=str | None, default=None, help="W&B run name")


def build_parser(command: str) -> ArgumentParser:
    """The parser of one analysis (``forgetting`` or ``removal``)."""
    p = ArgumentParser(prog=f"{PROG} {command}", description=__doc__, env_prefix="TVC_ANALYZE",
                       default_env=False)
    _common(p)
    if command == "forgetting":
        p.add_argument("--modes", type=list[str], default=["pvc", "plain"],
                       help="decodings to measure: pvc (the generation config) and/or plain "
                            "(the same, max_calibrations 0)")
        p.add_argument("--bins", type=int, default=8, help="relative response-position bins")
    else:
        from tvc_lightning.analyze.removal import DEFAULT_GRID

        p.add_argument("--grid", type=list[float], default=list(DEFAULT_GRID),
                       help="fractions r of the baseline answer decoded with the image visible")
    return p


def _device(setting: str) -> Any:
    import torch

    if setting not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {setting!r}")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device("cuda")


def load_model_and_processor(args: Namespace) -> tuple[Any, Any]:
    """The checkpoint's model (eval mode, on ``--device``) and its processor."""
    from tvc_lightning.evaluate.run import load_for_eval
    from tvc_lightning.hf import load_processor

    device = _device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    model, processor_dir = load_for_eval(args.checkpoint, args.base_model, dtype,
                                         args.attn_implementation)
    processor = load_processor(processor_dir, args.min_pixels, args.max_pixels)
    return model.to(device).eval(), processor


def load_samples(data: str, limit: int | None, processor: Any) -> list[tuple[Any, list[Any]]]:
    """``(record, images)`` of the shards, in order; questions the decoder must refuse (a
    control-token string) are left out with a warning."""
    import warnings

    from tvc_lightning.data.shards import load_split, resolve_urls
    from tvc_lightning.data.skips import SkipCounter
    from tvc_lightning.data.tokenize import special_token_pattern

    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    try:
        resolve_urls(data)
    except (FileNotFoundError, ValueError) as e:
        raise FileNotFoundError(f"--data {data}: {e}") from None
    samples = load_split(data, SkipCounter(), world_size=1, rank=0)
    pattern = special_token_pattern(processor.tokenizer)
    kept = [s for s in samples if not pattern.search(s[0].question)]
    if len(kept) < len(samples):
        warnings.warn(f"--data {data}: {len(samples) - len(kept)} samples left out (control-token "
                      "strings in their questions)", stacklevel=2)
    return kept[:limit]


def wandb_run(project: str, name: str | None, out: Path, config: dict[str, Any]) -> Any:
    """A W&B run in ``out``: online with a configured key, else offline; ``WANDB_MODE`` wins."""
    import wandb

    from tvc_lightning.loggers import wandb_key_configured

    mode = os.environ.get("WANDB_MODE") or ("online" if wandb_key_configured() else "offline")
    return wandb.init(project=project, name=name, dir=str(out.resolve()), config=config, mode=mode,
                      reinit="finish_previous")


def run(command: str, argv: list[str]) -> dict[str, Any]:
    """Parse ``argv`` for ``command``, run the analysis, and return a JSON-ready summary."""
    from tvc_lightning.analyze.forgetting import analyze_forgetting, log_forgetting, mode_configs
    from tvc_lightning.analyze.removal import analyze_removal, check_grid, log_removal

    parser = build_parser(command)
    args = parser.parse_args(argv)
    config: PVCConfig = parser.instantiate_classes(args).generation
    # Flag errors before the (slow) model load.
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if command == "forgetting":
        mode_configs(config, args.modes)
        if args.bins < 1:
            raise ValueError(f"--bins must be >= 1, got {args.bins}")
    else:
        check_grid(args.grid)
    out = Path(args.out)
    model, processor = load_model_and_processor(args)
    chat = ChatFormat.for_family(family_of(model), args.system_prompt,
                                 question_suffix=args.question_suffix)
    samples = load_samples(args.data, args.limit, processor)
    if command == "forgetting":
        result = analyze_forgetting(model, processor, samples, config, out, args.modes, args.bins,
                                    args.batch_size, chat)
        summary: dict[str, Any] = {
            "samples": len(samples), "rows": result.rows,
            "calibrations": {m: len(v) for m, v in result.calibrations.items()}}
        log = log_forgetting
    else:
        result = analyze_removal(model, processor, samples, config, out, args.grid,
                                 args.batch_size, chat)
        summary = {"samples": len(samples), "baseline_accuracy": result.baseline_accuracy,
                   "accuracy": dict(zip(map(str, result.grid), result.accuracy, strict=True))}
        log = log_removal
    summary["files"] = {k: str(v) for k, v in result.files.items()}
    if args.wandb_project:
        settings = parser.dump(args, format="json", skip_none=False)
        wb = wandb_run(args.wandb_project, args.wandb_name, out, json.loads(settings))
        try:
            log(wb, result)
            summary["wandb_dir"] = str(Path(wb.dir).parent)
        finally:
            wb.finish()
    return summary


def main(argv: list[str]) -> None:
    """Entry point: ``argv`` is what follows ``analyze`` (``forgetting ...`` or ``removal ...``)."""
    if not argv or argv[0] not in COMMANDS:
        given = repr(argv[0]) if argv else "nothing"
        raise SystemExit(f"usage: {PROG} {{{','.join(COMMANDS)}}} [--help] ...\n"
                         f"{PROG}: error: the first argument must be forgetting or removal, got {given}")
    try:
        summary = run(argv[0], argv[1:])
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{PROG} {argv[0]}: error: {e}") from None
    print(json.dumps(summary, indent=2))
