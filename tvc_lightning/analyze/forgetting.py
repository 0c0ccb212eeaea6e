"""``analyze forgetting``: per-layer attention share on the image over the response.

Each sample is decoded in each mode (``pvc``: the generation config; ``plain``: the same with
``max_calibrations: 0``) with ``measure_attention``: for every decode step and layer, the share of
the newest query's attention on the original image's tokens and on re-injected (pooled) copies
(method.md §1, ``A_img(l, i)``, averaged over heads). Outputs in ``--out``:

- ``forgetting.csv``: one row per sample, mode, step and layer: ``sample, id, mode, step,
  position, layer, original, copy, calibration, hidden``. ``step`` k >= 1 is the forward after
  k sampled tokens (it predicts the next one; the first token comes from the unmeasured
  prefill); ``position`` is ``(k - 1) / T`` over the sample's T measured steps, the coordinate
  :func:`~tvc_lightning.pvc.attention.forgetting_curve` bins; ``calibration`` is 1 where that
  step fed a calibration chunk (its query is the chunk's last token); ``hidden`` is 1 from the
  step on which the original image was hidden (``reset: visual``).
- ``forgetting_curve.csv``: ``mode, layer, bin, original, copy, samples``: the per-sample curves
  (``--bins`` bins of relative position) averaged over samples.
- ``forgetting.png``: heat maps (layer x position) per mode and kind, and layer-mean curves, with
  the calibrations marked.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tvc_lightning.analyze.plots import curve_rows, forgetting_figure, save_png
from tvc_lightning.data.tokenize import ChatFormat
from tvc_lightning.families import family_of
from tvc_lightning.pvc import PVCConfig, PVCResult, pvc_generate
from tvc_lightning.pvc.attention import forgetting_curve

MODES = ("pvc", "plain")
COLUMNS = ("sample", "id", "mode", "step", "position", "layer", "original", "copy", "calibration",
           "hidden")
CURVE_COLUMNS = ("mode", "layer", "bin", "original", "copy", "samples")


@dataclass
class ForgettingResult:
    """What the analysis produced: per-mode mean curves (bins, layers, 2), the relative positions
    of every calibration per mode, the number of CSV rows, and the files written."""

    curves: dict[str, torch.Tensor]
    calibrations: dict[str, list[float]]
    rows: int
    files: dict[str, Path]


def mode_configs(config: PVCConfig, modes: list[str]) -> dict[str, PVCConfig]:
    """The generation config of each requested mode (``--modes``)."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"--modes must be a non-empty subset of {list(MODES)}, got {modes}")
    return {m: config if m == "pvc" else replace(config, max_calibrations=0) for m in modes}


def decode(model: Any, processor: Any, samples: list[tuple[Any, list[Any]]], config: PVCConfig,
           chat: ChatFormat, batch_size: int, **kwargs: Any) -> list[PVCResult]:
    """Decode ``(record, images)`` samples in batches; ``kwargs`` go to ``pvc_generate``, with
    per-sample lists (``hide_image_at``) cut to each batch."""
    results: list[PVCResult] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        extra = {k: (v[start:start + batch_size] if isinstance(v, list) else v)
                 for k, v in kwargs.items()}
        results += pvc_generate(model, processor, [r.question for r, _ in chunk],
                                [images for _, images in chunk], config, chat=chat, **extra)
    return results


def step_rows(sample: int, record_id: str, mode: str, result: PVCResult) -> list[list[Any]]:
    """The CSV rows of one decoded sample (see the module docstring), built with tensor ops."""
    shares = result.attention
    if shares is None or not len(shares):
        return []
    steps, layers = shares.shape[0], shares.shape[1]
    step = torch.arange(1, steps + 1).repeat_interleave(layers)
    layer = torch.arange(layers).repeat(steps)
    fed = torch.zeros(steps + 1, dtype=torch.bool)
    fed[torch.tensor([c.decode_step for c in result.calibrations if c.decode_step <= steps],
                     dtype=torch.long)] = True
    hidden_from = steps + 1 if result.image_hidden_at is None else result.image_hidden_at
    flat = shares.reshape(-1, 2).tolist()
    columns = zip(step.tolist(), ((step - 1).float() / steps).tolist(), layer.tolist(), flat,
                  fed[step].tolist(), (step >= hidden_from).tolist(), strict=True)
    return [[sample, record_id, mode, s, round(p, 6), lay, o, c, int(f), int(h)]
            for s, p, lay, (o, c), f, h in columns]


def calibration_positions(result: PVCResult) -> list[float]:
    """Relative response positions (as in the CSV's ``position``) of a result's calibrations."""
    steps = 0 if result.attention is None else len(result.attention)
    return [(c.decode_step - 1) / steps for c in result.calibrations if 0 < c.decode_step <= steps]


def analyze_forgetting(model: Any, processor: Any, samples: list[tuple[Any, list[Any]]],
                       config: PVCConfig, out: Path, modes: list[str] | None = None,
                       bins: int = 8, batch_size: int = 8, chat: ChatFormat | None = None
                       ) -> ForgettingResult:
    """Decode, measure and write ``forgetting.csv``, ``forgetting_curve.csv``, ``forgetting.png``."""
    if bins < 1:
        raise ValueError(f"--bins must be >= 1, got {bins}")
    if not samples:
        raise ValueError("--data: no usable samples to analyze")
    configs = mode_configs(config, list(modes or MODES))
    chat = chat or ChatFormat.for_family(family_of(model))
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "forgetting.csv", "curve": out / "forgetting_curve.csv",
             "png": out / "forgetting.png"}
    curves: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    marks: dict[str, list[float]] = {}
    n_rows = 0
    with files["csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for mode, mode_config in configs.items():
            results = decode(model, processor, samples, mode_config, chat, batch_size,
                             measure_attention=True)
            per_sample, marks[mode] = [], []
            for i, ((record, _), result) in enumerate(zip(samples, results, strict=True)):
                rows = step_rows(i, record.id, mode, result)
                writer.writerows(rows)  # streamed: a long response has steps x layers rows
                n_rows += len(rows)
                if rows:
                    per_sample.append(forgetting_curve(result.attention, bins))
                    marks[mode] += calibration_positions(result)
            if per_sample:
                curves[mode] = torch.stack(per_sample).nanmean(dim=0)
                counts[mode] = len(per_sample)
    with files["curve"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CURVE_COLUMNS)
        writer.writerows([*row, counts[row[0]]] for row in curve_rows(curves))
    if curves:
        save_png(forgetting_figure(curves, marks), files["png"])
    else:
        files.pop("png")  # every sample stopped at its first token: nothing was measured
    return ForgettingResult(curves, marks, n_rows, files)


def log_forgetting(run: Any, result: ForgettingResult) -> None:
    """W&B: the per-layer curve table, the layer-mean curves as a line chart, and the figure."""
    import wandb

    from tvc_lightning.analyze.plots import KIND_NAMES, nan_to_none

    table = wandb.Table(columns=["mode", "layer", "bin", "original", "copy"],
                        data=[[m, lay, b, nan_to_none(o), nan_to_none(c)]
                              for m, lay, b, o, c in curve_rows(result.curves)])
    payload: dict[str, Any] = {"forgetting/per_layer": table}
    if result.curves:
        bins = next(iter(result.curves.values())).shape[0]
        keys, ys = [], []
        for mode, curve in result.curves.items():
            for k, kind in enumerate(KIND_NAMES):
                keys.append(f"{mode}: {kind}")
                ys.append([v if v == v else 0.0 for v in curve[:, :, k].nanmean(dim=1).tolist()])
        payload["forgetting/curve"] = wandb.plot.line_series(
            xs=[(b + 0.5) / bins for b in range(bins)], ys=ys, keys=keys,
            xname="relative response position", title="Attention share on the image (layer mean)")
    if "png" in result.files:
        payload["forgetting/figure"] = wandb.Image(str(result.files["png"]))
    run.log(payload)
