"""``analyze removal``: accuracy when the image is hidden from a fraction of the response on.

Method.md §1's image-removal curve, done inside one decode with the PVC decoder's visibility
mechanism (``pvc_generate(hide_image_at=...)``): no re-injection, no extra forward.

First every sample is decoded plainly (``max_calibrations: 0``); its answer length ``L`` (generated
tokens) is the baseline. Then, for each ``r`` of ``--grid``, the sample is decoded again with the
original image's K/V hidden from answer token ``s = floor(r * L + 0.5)`` on: tokens ``0..s-1`` are
predicted seeing the image, tokens from ``s`` on are not. So

- ``r = 0``: the image is hidden from the whole answer, the first token included (that token is
  predicted at the prompt's last position, so the prefill runs with the image hidden from that
  position; the question's own positions still saw the image, as in any prefix-cut experiment
  that keeps the question's hidden states);
- ``r = 1``: ``s = L``: every token of the baseline answer was predicted seeing the image, and the
  decode equals the unmodified one token for token (``same_as_baseline`` in the CSV shows it).

A hidden image is hidden for good: the answer may run past ``L`` (up to ``max_new_tokens``), blind.
Hiding removes the answer's direct attention to the image tokens; what the question's and earlier
answer tokens' hidden states took from the image stays (their cached K/V were computed seeing it).

Outputs in ``--out``: ``removal.csv`` (``sample, id, r, hide_step, baseline_tokens,
num_generated, extracted, correct, same_as_baseline``), ``removal_curve.csv`` (``r, accuracy,
samples, mean_generated, same_as_baseline``; plus a ``baseline`` row) and ``removal.png``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tvc_lightning.analyze.forgetting import decode
from tvc_lightning.analyze.plots import removal_figure, save_png
from tvc_lightning.data.tokenize import ChatFormat
from tvc_lightning.families import family_of
from tvc_lightning.pvc import PVCConfig
from tvc_lightning.scoring import score_record

DEFAULT_GRID = tuple(k / 10 for k in range(11))
COLUMNS = ("sample", "id", "r", "hide_step", "baseline_tokens", "num_generated", "extracted",
           "correct", "same_as_baseline")
CURVE_COLUMNS = ("r", "accuracy", "samples", "mean_generated", "same_as_baseline")


@dataclass
class RemovalResult:
    """Accuracy per ``r`` (in grid order), the unmodified decode's accuracy, and the files."""

    grid: list[float]
    accuracy: list[float]
    baseline_accuracy: float
    same_as_baseline: list[float]
    files: dict[str, Path]


def hide_step(r: float, length: int) -> int:
    """The first answer token decoded without the image: ``floor(r * length + 0.5)``."""
    return math.floor(r * length + 0.5)


def check_grid(grid: list[float]) -> list[float]:
    if not grid or any(not 0.0 <= r <= 1.0 for r in grid):
        raise ValueError(f"--grid must hold fractions in [0, 1], got {grid}")
    return list(grid)


def analyze_removal(model: Any, processor: Any, samples: list[tuple[Any, list[Any]]],
                    config: PVCConfig, out: Path, grid: list[float] | None = None,
                    batch_size: int = 8, chat: ChatFormat | None = None) -> RemovalResult:
    """Baseline decode, one hidden-image decode per ``r``, scores; writes the CSVs and the PNG."""
    grid = check_grid(list(DEFAULT_GRID if grid is None else grid))
    if not samples:
        raise ValueError("--data: no usable samples to analyze")
    chat = chat or ChatFormat.for_family(family_of(model))
    plain = replace(config, max_calibrations=0)  # removal only: nothing is re-injected
    out.mkdir(parents=True, exist_ok=True)
    base = decode(model, processor, samples, plain, chat, batch_size)
    lengths = [r.num_generated for r in base]
    base_correct = [score_record(r.text, record)[1] for (record, _), r in zip(samples, base, strict=True)]
    rows: list[list[Any]] = []
    accuracy, same = [], []
    for r in grid:
        hide = [hide_step(r, n) for n in lengths]
        results = decode(model, processor, samples, plain, chat, batch_size, hide_image_at=hide)
        correct_here, same_here = 0, 0
        for i, ((record, _), result) in enumerate(zip(samples, results, strict=True)):
            extracted, correct = score_record(result.text, record)
            unchanged = result.token_ids == base[i].token_ids
            rows.append([i, record.id, r, hide[i], lengths[i], result.num_generated, extracted,
                         int(correct), int(unchanged)])
            correct_here += correct
            same_here += unchanged
        accuracy.append(correct_here / len(samples))
        same.append(same_here / len(samples))
    files = {"csv": out / "removal.csv", "curve": out / "removal_curve.csv",
             "png": out / "removal.png"}
    with files["csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    baseline = sum(base_correct) / len(samples)
    with files["curve"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CURVE_COLUMNS)
        for k, r in enumerate(grid):
            generated = [row[5] for row in rows[k * len(samples):(k + 1) * len(samples)]]
            writer.writerow([r, accuracy[k], len(samples), sum(generated) / len(samples), same[k]])
        writer.writerow(["baseline", baseline, len(samples), sum(lengths) / len(samples), 1.0])
    save_png(removal_figure(grid, accuracy, baseline, len(samples)), files["png"])
    return RemovalResult(grid, accuracy, baseline, same, files)


def log_removal(run: Any, result: RemovalResult) -> None:
    """W&B: the accuracy-vs-r table and line chart, the baseline accuracy, and the figure."""
    import wandb

    table = wandb.Table(columns=["r", "accuracy", "same_as_baseline"],
                        data=[[r, a, s] for r, a, s in zip(result.grid, result.accuracy,
                                                          result.same_as_baseline, strict=True)])
    run.log({"removal/curve_table": table,
             "removal/curve": wandb.plot.line(table, "r", "accuracy",
                                              title="Accuracy vs share of the answer seeing the image"),
             "removal/baseline_accuracy": result.baseline_accuracy,
             "removal/figure": wandb.Image(str(result.files["png"]))})
