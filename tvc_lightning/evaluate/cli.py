"""``python -m tvc_lightning evaluate``: score a checkpoint on MathVista, MathVision or shards.

Examples::

    python -m tvc_lightning evaluate --config recipes/eval/tiny.yaml
    python -m tvc_lightning evaluate --checkpoint outputs/tiny/checkpoints/last.ckpt \\
        --benchmark mathvision --input MathVision/testmini.jsonl --image_root MathVision \\
        --out outputs/eval/mathvision --compare_plain true --generation.max_new_tokens 8192
    torchrun --nproc_per_node 8 -m tvc_lightning evaluate --config ...   # items split over ranks

Every flag can come from a ``--config`` YAML (several compose; later flags override), and
``--print_config`` shows the composed one. Rerunning the same command continues a stopped run.
"""

from __future__ import annotations

import sys
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from tvc_lightning.evaluate.benchmarks import BENCHMARKS
from tvc_lightning.evaluate.run import EvalSettings, evaluate
from tvc_lightning.pvc import PVCConfig


def add_checkpoint_arguments(p: ArgumentParser) -> None:
    """Which model decodes: ``--config``, ``--checkpoint``, ``--base_model`` (evaluate, analyze)."""
    p.add_argument("--config", action=ActionConfigFile, help="YAML file(s) holding these flags")
    p.add_argument("--checkpoint", type=str, required=True,
                   help="HF model directory, Lightning .ckpt, or DeepSpeed / FSDP2 checkpoint directory")
    p.add_argument("--base_model", type=str | None, default=None,
                   help="for a training checkpoint: the HF directory it started from (default: "
                        "its model_name_or_path)")


def add_decoding_arguments(p: ArgumentParser) -> None:
    """How it decodes: prompt, image limits, dtype, device, attention kernel and ``--generation.*``
    (the PVC settings; plain decoding is the same with max_calibrations 0) (evaluate, analyze)."""
    p.add_argument("--system_prompt", type=str, default=None,
                   help="chat system prompt (default: the model family's: Qwen2-VL and Qwen2.5-VL "
                        "'You are a helpful assistant.', Qwen3-VL none)")
    p.add_argument("--question_suffix", type=str, default="",
                   help="appended to every question (as the training config's data.question_suffix; "
                        "TVC: a long-chain reasoning instruction)")
    p.add_argument("--min_pixels", type=int | None, default=None, help="image processor min_pixels")
    p.add_argument("--max_pixels", type=int | None, default=None,
                   help="image processor max_pixels (TVC: 262144)")
    p.add_argument("--dtype", type=str, default="auto",
                   help="float32, bfloat16 or float16; auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu or cuda")
    p.add_argument("--attn_implementation", type=str, default="sdpa", help="HF attention kernel")
    p.add_class_arguments(PVCConfig, "generation")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m tvc_lightning evaluate", description=__doc__,
                       env_prefix="TVC_EVAL", default_env=False)
    add_checkpoint_arguments(p)
    add_decoding_arguments(p)
    p.add_argument("--benchmark", type=str, required=True, help=f"one of {', '.join(BENCHMARKS)}")
    p.add_argument("--input", type=str, required=True,
                   help="MathVista testmini JSON, MathVision JSONL, or shards (folder, glob, brace pattern)")
    p.add_argument("--image_root", type=str | None, default=None,
                   help="folder the items' image paths are relative to (default: the input's folder)")
    p.add_argument("--allow_missing_images", type=bool, default=False,
                   help="skip (and count) items whose image file is missing, instead of refusing")
    p.add_argument("--out", type=str, required=True,
                   help="output folder: official results/scores files, summary.json, progress/")
    p.add_argument("--compare_plain", type=bool, default=False,
                   help="also decode every item plainly (generation with max_calibrations 0)")
    p.add_argument("--batch_size", type=int, default=8, help="items decoded together per rank")
    p.add_argument("--limit", type=int | None, default=None, help="only the first N items")
    p.add_argument("--model_name", type=str | None, default=None,
                   help="model name in MathVision's 'model' field (default: the checkpoint's name)")
    p.add_argument("--progress_bar", type=bool, default=True, help="show a progress bar on rank 0")
    p.add_argument("--judge", type=str | None, default=None,
                   help="openai:URL: extract answers with an LLM judge on this OpenAI-compatible "
                        "server (API root, e.g. openai:http://localhost:8000/v1); rule-based "
                        "extraction stands in wherever it fails. Key from $OPENAI_API_KEY if set")
    p.add_argument("--judge_model", type=str | None, default=None,
                   help="the judge's served model name (needed with --judge)")
    p.add_argument("--judge_timeout", type=float, default=120.0,
                   help="seconds to wait for one judge reply")
    p.add_argument("--judge_retries", type=int, default=4,
                   help="further attempts after a judge connection error, timeout, 5xx, 408 or 429")
    p.add_argument("--judge_concurrency", type=int, default=8, help="judge requests in flight")
    p.add_argument("--judge_max_tokens", type=int, default=256,
                   help="reply budget of one judge request")
    return p


def settings_from_args(argv: list[str]) -> EvalSettings:
    parser = build_parser()
    cfg = parser.parse_args(argv)
    init = parser.instantiate(cfg)
    values: dict[str, Any] = {k: v for k, v in vars(init).items() if k not in ("config", "__path__")}
    return EvalSettings(**values)


def _format_summary(summary: dict[str, Any]) -> str:
    lines = [f"evaluate: {summary['benchmark']}, {summary['items']} items"
             f" ({summary['missing_images']} skipped for missing images)"
             if summary["missing_images"] else
             f"evaluate: {summary['benchmark']}, {summary['items']} items"]
    for mode, m in summary["modes"].items():
        lines.append(f"  {mode:5s} accuracy {m['accuracy']:.4f} ({m['correct']}/{m['total']}), "
                     f"{m['calibrations_per_item']:.2f} calibrations and "
                     f"{m['generated_tokens_per_item']:.1f} tokens per item"
                     + (f", {m['skipped']} skipped" if m["skipped"] else "")
                     + f" -> {', '.join(m['files'])}")
        if "extraction" in m:
            e = m["extraction"]
            lines.append(f"        extracted by the judge {e['judge']}, by rules after a judge "
                         f"failure {e['rule_judge_failed']} ({e['judge_requests']} requests, "
                         f"{e['judge_replies_cached']} replies from the cache)")
    if "pvc_minus_plain" in summary:
        lines.append(f"  pvc - plain: {summary['pvc_minus_plain']:+.4f}")
    lines.append(f"  {summary['seconds_this_run']} s this run")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        settings = settings_from_args(args)
        summary = evaluate(settings)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"python -m tvc_lightning evaluate: error: {e}") from None
    if summary is not None:
        print(_format_summary(summary))
