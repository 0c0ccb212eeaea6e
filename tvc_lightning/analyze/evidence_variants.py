"""The evidence run's configurations (:mod:`tvc_lightning.analyze.evidence`): the model size,
the task variants, and the helpers every stage shares (variant settings, subprocess set-up)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

MODEL_SIZES = dict(hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2,
                   intermediate_size=512, vision_depth=2, vision_dim=64, vision_heads=2)
FAMILY_NAMES = {"qwen2_vl": "Qwen2-VL", "qwen3_vl": "Qwen3-VL"}


def _late_lookup(detour: str, detour_steps: int, doc: str, tokens: str, max_new_tokens: int = 640,
                 image_size: int = 168, generation: dict[str, Any] | None = None,
                 **extra: Any) -> dict[str, Any]:
    """One variant: 4000 training and 128 held-out ``synth --task late_lookup`` samples (seed 0),
    decoded greedily with one PVC calibration at the lookup unless ``generation`` says otherwise.
    ``extra``: ``family`` (default Qwen2-VL), ``lengths`` (the longer held-out splits' scales)."""
    return dict(
        data=dict(num_train=4000, num_val=128, detour=detour, detour_steps=detour_steps,
                  image_size=image_size, seed=0),
        generation=generation or dict(pool_kernel=2, reset="visual", min_gap=64, max_calibrations=1,
                                      max_new_tokens=max_new_tokens, repetition_penalty=1.0),
        doc=dict(name=doc, tokens=tokens), **extra)


# Images are image_size squares read at full size (max_pixels = image_size ** 2): 6 x 6 merged
# tokens in both families, one kernel-2 pooled token per cell.
VARIANTS: dict[str, dict[str, Any]] = {
    # As survey, on a tiny Qwen3-VL: its tower adds a learned position embedding to every patch
    # and its M-RoPE interleaves the three axes over all frequencies, where the tiny Qwen2-VL's
    # random tower has no absolute position and its width axis gets the five lowest rotary
    # frequencies (columns 0-5 turn a query by under 0.01 rad). 192 px: Qwen3-VL's 32-px merged
    # tokens, 6 x 6 of them.
    "survey_qwen3vl": _late_lookup(
        "survey", 8, "evidence_survey_qwen3vl.md",
        "~200 question tokens, ~520 response tokens, 36 image tokens", max_new_tokens=704,
        image_size=192, family="qwen3_vl", lengths=(2, 4)),
    # As repeat (same question, chain and lengths), every cell one colour: no position to find.
    # lengths: held-out splits whose detour is 2x and 4x as long, read teacher-forced.
    "uniform": _late_lookup(
        "uniform", 14, "evidence.md", "~200 question tokens, ~475 response tokens, 36 image tokens",
        lengths=(2, 4)),
    # As repeat, the lookup reading every cell; ~520-token chains.
    "survey": _late_lookup(
        "survey", 8, "evidence_survey.md",
        "~200 question tokens, ~520 response tokens, 36 image tokens", max_new_tokens=704),
    # As copy, with only short-range text dependencies; ~475-token chains.
    "repeat": _late_lookup(
        "repeat", 14, "evidence_repeat.md",
        "~200 question tokens, ~475 response tokens, 36 image tokens"),
    # The lookup sentence opens with the chain's only reflection phrase: DVR injects its one copy
    # there and PVC calibrates there once (no periodic calibration); ~485-token chains.
    "copy": _late_lookup(
        "copy", 40, "evidence_copy.md", "~300 question tokens, ~485 response tokens, 36 image tokens"),
    # PVC as DVR trained it: the same pooling (6 x 6 merged grid -> 3 x 3), a calibration at a
    # reflection phrase or bridge, else every 200 tokens (DVR's fallback is the response
    # midpoint, ~220 tokens into these ~440-token chains); greedy, long enough for the chain.
    "arithmetic": _late_lookup(
        "arithmetic", 1, "evidence_arithmetic.md",
        "~320 question tokens, ~440 response tokens, 36 image tokens",
        generation=dict(pool_kernel=2, reset="visual", every_n_tokens=200, min_gap=64,
                        max_calibrations=2, max_new_tokens=640, repetition_penalty=1.0)),
}
RESAMPLES = 2000


def family(variant: str) -> str:
    """The variant's model family (a ``model_type``)."""
    return VARIANTS[variant].get("family", "qwen2_vl")


def max_pixels(variant: str) -> int:
    """Pixels per image for the fits, evaluations and analyses: the full ``image_size`` square."""
    return VARIANTS[variant]["data"]["image_size"] ** 2


def generation_flags(variant: str, **override: object) -> list[str]:
    """``--generation.*`` flags of the variant's decoding, with ``override`` settings."""
    settings = {**VARIANTS[variant]["generation"], **override}
    return [f"--generation.{k}={v}" for k, v in settings.items()]


def subprocess_env(threads: int) -> dict[str, str]:
    """The environment of a driver subprocess: ``threads`` BLAS threads, W&B off."""
    # Two processes share two cores: several BLAS threads each thrash (50x slower decode steps
    # measured on this machine), one thread each does not.
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    return env


def synth_split(out: Path, variant: str, num_train: int, scale: int = 1) -> None:
    """``synth --task late_lookup`` shards of ``variant`` in ``out`` (its detour ``scale`` times
    as long)."""
    s = VARIANTS[variant]["data"]
    subprocess.run([sys.executable, "-m", "data_engine", "synth", "--task", "late_lookup",
                    "--out", str(out), "--num-train", str(num_train),
                    "--num-val", str(s["num_val"]), "--detour", s["detour"],
                    "--detour-steps", str(s["detour_steps"] * scale),
                    "--image-size", str(s["image_size"]), "--seed", str(s["seed"])],
                   check=True, env=subprocess_env(1))
