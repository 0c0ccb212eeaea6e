"""Figures of the visual-forgetting analyses, drawn with matplotlib's Agg canvas.

Figures are built as :class:`matplotlib.figure.Figure` objects on an Agg canvas, never through
``pyplot``: nothing touches the process-wide backend, so a training process (Lightning, W&B) that
draws a heat map at validation is not switched to another backend or left holding open windows.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

KIND_NAMES = ("original image", "re-injected copies")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def forgetting_figure(curves: dict[str, torch.Tensor], calibrations: dict[str, Sequence[float]],
                      title: str = "Attention share on the image over the response") -> Any:
    """One row per decoding mode: heat maps (layer x relative response position) of the share on
    the original image and on re-injected copies, and the layer-mean curves.

    ``curves[mode]`` is (bins, layers, 2) (``forgetting_curve`` averaged over samples; NaN where
    no token fell in a bin); ``calibrations[mode]`` the relative positions of every calibration,
    marked as white ticks above the heat maps and as a rug under the curves.
    """
    from matplotlib.ticker import MaxNLocator

    modes = list(curves)
    fig = _figure(13, 3.2 * max(1, len(modes)))
    fig.suptitle(title)
    finite = [c[torch.isfinite(c)] for c in curves.values()]
    vmax = max([float(v.max()) for v in finite if v.numel()] + [1e-6])
    for m, mode in enumerate(modes):
        curve = curves[mode].float()
        bins, layers = curve.shape[0], curve.shape[1]
        marks = list(calibrations.get(mode, []))
        image = None
        for k in range(2):
            ax = fig.add_subplot(len(modes), 3, 3 * m + k + 1)
            image = ax.imshow(curve[:, :, k].T.numpy(), aspect="auto", origin="lower",
                              extent=(0, 1, -0.5, layers - 0.5), vmin=0, vmax=vmax, cmap="viridis")
            if marks:
                ax.plot(marks, [layers - 0.5] * len(marks), "v", color="white", markersize=5,
                        markeredgecolor="black", clip_on=False)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{mode}: {KIND_NAMES[k]}")
            ax.set_xlabel("relative response position")
            ax.set_ylabel("layer")
        fig.colorbar(image, ax=fig.axes[-2:], shrink=0.8, label="attention share")
        ax = fig.add_subplot(len(modes), 3, 3 * m + 3)
        xs = [(b + 0.5) / bins for b in range(bins)]
        for k, style in enumerate(("-o", "--s")):
            ax.plot(xs, curve[:, :, k].nanmean(dim=1).tolist(), style, label=KIND_NAMES[k])
        if marks:
            ax.plot(marks, [0.0] * len(marks), "|", color="red", markersize=12,
                    label="calibrations")
        ax.set_xlim(0, 1)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{mode}: mean over layers")
        ax.set_xlabel("relative response position")
        ax.set_ylabel("attention share")
        ax.legend(fontsize="small")
    return fig


def removal_figure(grid: Sequence[float], accuracy: Sequence[float], baseline: float,
                   samples: int) -> Any:
    """Accuracy against the fraction ``r`` of the response decoded with the image visible."""
    fig = _figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(list(grid), list(accuracy), "-o", label="image hidden from r x length on")
    ax.axhline(baseline, color="grey", linestyle="--", label="unmodified decode")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("r (share of the baseline response decoded with the image visible)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Image removal ({samples} samples)")
    ax.legend(fontsize="small")
    return fig


def save_png(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def figure_image(fig: Any) -> Any:
    """The figure as a PIL image (for ``wandb.Image``)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def curve_rows(curves: dict[str, torch.Tensor]) -> list[tuple[str, int, int, float, float]]:
    """``(mode, layer, bin, original, copy)`` rows of per-layer curves (NaN kept as NaN)."""
    rows = []
    for mode, curve in curves.items():
        values = curve.float().permute(1, 0, 2).tolist()  # (layers, bins, 2)
        for layer, per_bin in enumerate(values):
            rows += [(mode, layer, b, o, c) for b, (o, c) in enumerate(per_bin)]
    return rows


def nan_to_none(value: float) -> float | None:
    """JSON/W&B-safe: NaN becomes None."""
    return None if isinstance(value, float) and math.isnan(value) else value
