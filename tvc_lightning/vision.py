"""Visual tokens: grids, token pooling and M-RoPE positions for text/image segments.

Vocabulary used across the package:

- an *image* is one picture of a sample, encoded once by the vision tower into ``h' x w'`` merged
  tokens (``h' = grid_h / merge``, ``w' = grid_w / merge`` from ``image_grid_thw``);
- a *visual segment* is one run of ``<|image_pad|>`` tokens in the sequence that shows an image:
  the original (pool kernel 1) or a re-injected copy pooled with kernel ``k`` on the merged grid,
  which has ``ceil(h'/k) x ceil(w'/k)`` tokens. ``visual_segments`` rows are
  ``(image index, pool kernel)`` in order of appearance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def pooled_grid(grid_h: int, grid_w: int, kernel: int) -> tuple[int, int]:
    """Merged-token grid of a segment: ``(ceil(h/k), ceil(w/k))`` for a merged ``h x w`` grid."""
    if kernel < 1:
        raise ValueError(f"pool kernel must be >= 1, got {kernel}")
    return math.ceil(grid_h / kernel), math.ceil(grid_w / kernel)


def pool_visual_tokens(features: torch.Tensor, grid_h: int, grid_w: int, kernel: int) -> torch.Tensor:
    """Average-pool one image's merged tokens ``(h*w, D)`` on their 2-D grid, kernel = stride = k.

    Edge windows of a grid that ``k`` does not divide average only the tokens they cover, so a
    pooled token is always a mean of real tokens. Returns ``(ceil(h/k) * ceil(w/k), D)``.
    """
    if kernel == 1:
        return features
    dim = features.shape[-1]
    grid = features.reshape(grid_h, grid_w, dim).permute(2, 0, 1).unsqueeze(0)
    # avg_pool2d in fp32: bf16 sums of 16 tokens lose precision for no speed gain at this size.
    pooled = F.avg_pool2d(grid.float(), kernel_size=kernel, stride=kernel, ceil_mode=True)
    return pooled.squeeze(0).permute(1, 2, 0).reshape(-1, dim).to(features.dtype)


def merged_grids(image_grid_thw: torch.Tensor, merge_size: int) -> list[tuple[int, int]]:
    """``(h', w')`` merged-token grid of each image from ``image_grid_thw`` rows ``(t, h, w)``."""
    return [(int(h) // merge_size, int(w) // merge_size) for _, h, w in image_grid_thw.tolist()]


def mrope_positions(
    input_ids: torch.Tensor,
    image_token_id: int,
    grids: Sequence[tuple[int, int]],
    offset: int = 0,
) -> torch.Tensor:
    """M-RoPE positions ``(3, L)`` of one unpadded sequence whose visual segments have ``grids``.

    Text tokens get the same value in all three rows; a segment's token at (row, col) gets
    ``(s, s + row, s + col)`` with ``s`` the position where the segment starts, and the text after
    it continues at ``s + max(h, w)``. This is HF's ``get_rope_index`` generalised to segments whose
    grid is not the vision tower's (pooled re-injected copies), computed with tensor ops: no
    per-token Python. ``offset`` starts the sequence at a later position (appending to a cache).
    """
    device = input_ids.device
    is_image = input_ids == image_token_id
    n_image = int(is_image.sum())
    expected = sum(h * w for h, w in grids)
    if n_image != expected:
        raise ValueError(
            f"{n_image} image placeholder tokens but the visual segments need {expected} "
            f"(grids {list(grids)})"
        )
    advance = torch.ones_like(input_ids)
    advance[is_image] = 0
    if grids:
        sizes = torch.tensor([h * w for h, w in grids], device=device)
        widths = torch.tensor([w for _, w in grids], device=device)
        spans = torch.tensor([max(h, w) for h, w in grids], device=device)
        image_pos = torch.nonzero(is_image).squeeze(1)
        ends = torch.cumsum(sizes, 0) - 1
        # A segment's span is added at its last token, so everything after it moves on by max(h, w).
        advance[image_pos[ends]] = spans
        # Index of each image token within its segment -> (row, col) on that segment's grid.
        seg_of_token = torch.repeat_interleave(torch.arange(len(grids), device=device), sizes)
        starts = torch.cumsum(sizes, 0) - sizes
        local = torch.arange(n_image, device=device) - starts[seg_of_token]
        seg_w = widths[seg_of_token]
        rows, cols = local // seg_w, local % seg_w
    base = torch.cumsum(advance, 0) - advance + offset
    positions = base.unsqueeze(0).repeat(3, 1)
    if grids:
        positions[1, image_pos] += rows
        positions[2, image_pos] += cols
    return positions


def segment_features(
    images: Sequence[torch.Tensor],
    grids: Sequence[tuple[int, int]],
    visual_segments: torch.Tensor,
) -> torch.Tensor:
    """Features of every visual segment, concatenated in sequence order.

    Originals are the tower's tokens; copies are pooled once per (image, kernel) and reused, so
    re-showing an image costs a pooling, never another vision-tower pass.
    """
    cache: dict[tuple[int, int], torch.Tensor] = {}
    parts = []
    for i, k in visual_segments.tolist():
        if (i, k) not in cache:
            cache[(i, k)] = pool_visual_tokens(images[i], *grids[i], k)
        parts.append(cache[(i, k)])
    return torch.cat(parts) if parts else images[0].new_zeros((0, images[0].shape[-1]))
