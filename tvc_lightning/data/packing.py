"""Padding-free packing: a batch's samples laid end to end in rows of at most ``row_length`` tokens.

A packed batch holds exactly the samples an unpadded one would (``batch_size`` of them, in a
layout fixed by their lengths alone), so every stream invariant of the data module still holds:
each step consumes ``batch_size`` samples, ranks take equal steps, resume counts batches x
``batch_size`` samples, and the label count of a step is the same.

What keeps the samples apart inside a row:

- positions: each sample keeps its own M-RoPE positions (computed by the encoder for the sample
  alone, i.e. HF's ``get_rope_index`` for it), and a fourth leading row of *text* positions,
  ``0..n-1`` per sample. transformers' Qwen2-VL takes such ``(4, rows, L)`` position ids: it
  rotates with the last three and, given no attention mask, derives the attention mask from the
  first (a new sequence wherever it does not go up by one): sdpa/eager/flex build an exact
  block-diagonal causal mask;
- varlen kernels (flash-attention and the like) get the segments' ``cu_seqlens`` directly (see
  :func:`language_model_inputs`), over the flattened rows: HF's own detection from position ids
  works only for a single row and costs a device sync in every layer;
- labels: the label of each sample's first token is ignored, so the shifted loss never asks the
  last token of one sample to predict the first of the next. An unpacked sample's first label is
  never used either (nothing precedes it), so the labelled positions and their count are the same.

Each row's padded tail is a segment of its own (positions ``0..``, no labels): it attends only to
itself and nothing attends to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tvc_lightning.data.tokenize import IGNORE_INDEX

CU_SEQLENS_KEY = "cu_seqlens"  # its presence marks a packed batch
SAMPLE_LENGTHS_KEY = "sample_lengths"

# Backends for which HF builds the mask from the text positions; any other (flash-attention 2/3,
# hub kernels) reads the segments from cu_seqlens.
MASK_FROM_POSITIONS = frozenset({"sdpa", "eager", "flex_attention"})


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of total at most ``capacity``, longest first, each
    into the first row it fits (a deterministic function of ``lengths``)."""
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise ValueError(f"a sample of {max(too_long)} tokens does not fit a packed row of "
                         f"{capacity} (data.max_length)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def pack_layout(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Rows of sample indices, each of at most ``row_length`` tokens, padded to the longest row.

    Of the first-fit-decreasing layouts into rows as long as the longest sample or as
    ``row_length``, the one with fewer token slots (rows x longest row), then the narrower:
    narrow rows also keep a dense masked attention (sdpa's ``rows x width^2``) small.
    """
    best: tuple[tuple[int, int], list[list[int]]] | None = None
    for capacity in sorted({max(lengths), row_length}):
        rows = first_fit_decreasing(lengths, capacity)
        width = max(sum(lengths[i] for i in row) for row in rows)
        if best is None or (len(rows) * width, width) < best[0]:
            best = ((len(rows) * width, width), rows)
    assert best is not None
    return best[1]


class PackingCollator:
    """Packs a batch's encoded samples into rows of at most ``row_length`` tokens
    (:func:`pack_layout`).

    Returns what :class:`~tvc_lightning.data.collate.Collator` returns, with ``position_ids`` of
    shape ``(4, rows, L)`` (text positions first), ``attention_mask`` marking real tokens (for
    counting; the model is given none), and two more keys: ``cu_seqlens`` (int32 segment starts
    over the flattened ``rows x L`` tokens, padded tails included, and their total) and
    ``sample_lengths`` (each sample's tokens, in layout order). Visual tensors follow the layout
    order, as the model scatters image features in reading order.

    Args:
        pad_token_id: Token id of the padded tails.
        row_length: The most tokens in a row (``data.max_length``: no kept sample is longer).
        pad_to_multiple_of: Round the rows' common length up to a multiple of this.
    """

    def __init__(self, pad_token_id: int, row_length: int, pad_to_multiple_of: int = 1) -> None:
        if row_length < 1:
            raise ValueError(f"row_length must be >= 1, got {row_length}")
        self.pad_token_id = pad_token_id
        self.row_length = row_length
        self.pad_to_multiple_of = max(1, pad_to_multiple_of)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [int(s["input_ids"].numel()) for s in samples]
        rows = pack_layout(lengths, self.row_length)
        m = self.pad_to_multiple_of
        width = -(-max(sum(lengths[i] for i in row) for row in rows) // m) * m
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        position_ids = torch.empty((4, len(rows), width), dtype=torch.long)
        segments: list[int] = []
        order: list[int] = []
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                s, n = samples[i], lengths[i]
                input_ids[r, at:at + n] = s["input_ids"]
                labels[r, at:at + n] = s["labels"]
                labels[r, at] = IGNORE_INDEX  # nothing in this sample predicts its first token
                attention_mask[r, at:at + n] = 1
                position_ids[0, r, at:at + n] = torch.arange(n)
                position_ids[1:, r, at:at + n] = s["position_ids"]
                segments.append(n)
                order.append(i)
                at += n
            if at < width:  # the padded tail: a segment of its own
                position_ids[:, r, at:] = torch.arange(width - at)
                segments.append(width - at)
        visual, image_offset = [], 0
        for i in order:
            seg = samples[i]["visual_segments"].clone()
            seg[:, 0] += image_offset
            visual.append(seg)
            image_offset += int(samples[i]["image_grid_thw"].shape[0])
        cu_seqlens = torch.zeros(len(segments) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(torch.tensor(segments), 0)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "pixel_values": torch.cat([samples[i]["pixel_values"] for i in order]),
            "image_grid_thw": torch.cat([samples[i]["image_grid_thw"] for i in order]),
            "visual_segments": torch.cat(visual),
            "num_injections": torch.tensor([samples[i]["num_injections"] for i in order]),
            CU_SEQLENS_KEY: cu_seqlens,
            SAMPLE_LENGTHS_KEY: torch.tensor([lengths[i] for i in order]),
        }


def is_packed(batch: dict[str, Any]) -> bool:
    return CU_SEQLENS_KEY in batch


def batch_samples(batch: dict[str, Any]) -> int:
    """Samples in a (packed or padded) batch."""
    if is_packed(batch):
        return int(batch[SAMPLE_LENGTHS_KEY].numel())
    return int(batch["input_ids"].shape[0])


def sample_lengths(batch: dict[str, Any]) -> torch.Tensor:
    """Each sample's real tokens (a padded batch: its attention mask's row sums)."""
    if is_packed(batch):
        return batch[SAMPLE_LENGTHS_KEY]
    return batch["attention_mask"].sum(-1)


def language_model_inputs(batch: dict[str, Any], attn_implementation: str) -> dict[str, Any]:
    """Keyword arguments of ``Qwen2VLTextModel.forward`` (besides the embeddings) for ``batch``.

    A padded batch gives its mask and 3-row M-RoPE positions. A packed one gives no mask, so
    that HF builds the packed mask from its 4-row positions, and for a varlen backend the
    segments' ``cu_seqlens`` (its kernels take the flattened rows as one ragged batch).
    """
    if not is_packed(batch):
        return {"attention_mask": batch["attention_mask"], "position_ids": batch["position_ids"]}
    kwargs: dict[str, Any] = {"attention_mask": None, "position_ids": batch["position_ids"]}
    if attn_implementation not in MASK_FROM_POSITIONS:
        cu = batch[CU_SEQLENS_KEY].to(device=batch["input_ids"].device, dtype=torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                      max_length_k=longest)
    return kwargs
