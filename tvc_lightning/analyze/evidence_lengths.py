"""The evidence run's lengths stage: held-out splits whose detour is 2x and 4x as long (same
items otherwise), read teacher-forced by both arms with and without DVR's copy, and decoded
after the reference chain cut at its reflection (:mod:`tvc_lightning.analyze.forced`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tvc_lightning.analyze.evidence_report import (
    ARMS,
    bootstrap_ci,
    cut_chain_markdown,
    forced_reads_markdown,
    paired_diff_ci,
    paired_pooled_rate_diff_ci,
    pooled_rate_ci,
)
from tvc_lightning.analyze.evidence_variants import RESAMPLES, VARIANTS, max_pixels, synth_split


def length_splits(root: Path, variant: str) -> dict[str, Path]:
    """``x1`` (the held-out split) and, per ``lengths`` scale m, ``xm``: the same items (same
    seeds: same image and target) with an m-times longer detour."""
    splits = {"x1": root / "data" / "val"}
    for m in VARIANTS[variant].get("lengths", ()):
        splits[f"x{m}"] = root / f"data_x{m}" / "val"
    return splits


def forced_jobs(root: Path, variant: str) -> dict[str, list[str]]:
    """Teacher-forced reads of both arms, with and without a copy, on every length split (the
    longer splits are written first if absent); none for a variant without ``lengths``."""
    if not VARIANTS[variant].get("lengths"):
        return {}
    jobs = {}
    for name, split in length_splits(root, variant).items():
        if not split.exists():
            synth_split(split.parent, variant, 0, scale=int(name[1:]))
        for arm in ARMS:
            for copy in (0, 1):
                out = root / arm / "forced" / f"{name}_copy{copy}.json"
                if out.exists():
                    continue
                jobs[f"forced_{arm}_{name}_copy{copy}"] = _forced_cmd(root, arm, split, out, variant,
                                                                      ["--dvr", str(copy)])
        if name == "x1":
            continue  # at the training length the models write their own chains (evaluate)
        for arm, decoding in DECODED:
            out = root / arm / "forced" / f"{name}_decode_{decoding}.json"
            if not out.exists():
                jobs[f"decode_{arm}_{name}_{decoding}"] = _forced_cmd(root, arm, split, out, variant,
                                                                      ["--decode", decoding])
    return jobs


# The cut-chain decodings run on the longer splits: the scored comparison and its reset-free twin.
DECODED = (("plain", "plain"), ("dvr", "pvc"), ("dvr", "pvc_keep"))


def _forced_cmd(root: Path, arm: str, split: Path, out: Path, variant: str,
                extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "tvc_lightning.analyze.forced",
            "--checkpoint", str(root / arm / "checkpoints" / "last.ckpt"),
            "--base_model", str(root / "model"), "--data", str(split), "--out", str(out),
            "--max_pixels", str(max_pixels(variant)),
            "--pool_kernel", str(VARIANTS[variant]["generation"]["pool_kernel"]), *extra]


def lengths_section(root: Path, variant: str) -> list[str]:
    """The teacher-forced reads section (empty for a variant without ``lengths``)."""
    if not VARIANTS[variant].get("lengths"):
        return []
    splits = length_splits(root, variant)
    counts = {(arm, copy, name): json.loads(
        (root / arm / "forced" / f"{name}_copy{copy}.json").read_text(encoding="utf-8"))["reads"]
        for arm in ARMS for copy in (0, 1) for name in splits}
    ids = sorted(set.intersection(*(set(c) for c in counts.values())))
    vec = {k: [tuple(c[i]) for i in ids] for k, c in counts.items()}
    reads = {k: pooled_rate_ci(v, RESAMPLES) for k, v in vec.items()}
    diffs = {name: paired_pooled_rate_diff_ci(vec[("dvr", 1, name)], vec[("plain", 0, name)],
                                              RESAMPLES) for name in splits}
    steps = VARIANTS[variant]["data"]["detour_steps"]
    columns = {}
    for name in splits:
        n = steps * int(name[1:])
        columns[name] = f"{name}: {max(1, n - n // 4)}-{n + n // 4} checks"
    longer = [name for name in splits if name != "x1"]
    flags = {(arm, d, name): json.loads((root / arm / "forced" / f"{name}_decode_{d}.json")
                                        .read_text(encoding="utf-8"))["answers"]
             for arm, d in DECODED for name in longer}
    decoded = {k: bootstrap_ci([v[i] for i in ids], RESAMPLES) for k, v in flags.items()}
    decoded_diffs = {(d, name): paired_diff_ci([flags[("dvr", d, name)][i] for i in ids],
                                               [flags[("plain", "plain", name)][i] for i in ids],
                                               RESAMPLES)
                     for d in ("pvc", "pvc_keep") for name in longer}
    return forced_reads_markdown(reads, diffs, columns) + cut_chain_markdown(
        decoded, decoded_diffs, {k: columns[k] for k in longer}, DECODED)
