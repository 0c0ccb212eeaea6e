"""PVC decoding's data: what it returns per sample (the answer, where it calibrated, what it
measured) and the state it keeps per row while decoding."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Calibration", "PVCResult", "RowState"]


@dataclass
class Calibration:
    """One calibration: after ``step`` generated tokens, ``length`` injected tokens (bridge,
    vision markers, pooled image pads) starting at ``token_ids[index]``."""

    step: int
    index: int
    length: int
    trigger: str
    decode_step: int = 0
    """Tokens sampled before the chunk, rolled-back ones included: the chunk is fed by decode
    step ``decode_step``, measured in ``PVCResult.attention[decode_step - 1]``."""


@dataclass
class PVCResult:
    """One sample's output. ``token_ids`` is what the model saw after the prompt: its own tokens
    and the injected chunks (bridge, vision markers, pooled image pads); ``text`` decodes it
    without special tokens, so the image pads vanish and bridges remain. ``attention``
    (with ``measure_attention``): per decode step, per layer, the attention share of the newest
    token on the original image ``[..., 0]`` and on re-injected copies ``[..., 1]``; row ``k``
    is decode step ``k + 1``, the forward after ``k + 1`` sampled tokens (the first token comes
    from the prefill, which is not measured). ``image_hidden_at``: the decode step from which the
    original image was hidden (by ``hide_image_at`` or a ``reset: visual`` calibration; 0: in the
    prefill already), None while it stayed visible."""

    token_ids: list[int]
    text: str
    calibrations: list[Calibration]
    num_generated: int
    finish_reason: str
    attention: torch.Tensor | None = None
    image_hidden_at: int | None = None


@dataclass
class RowState:
    """Decoding state of one sample; ``seq_*`` lists describe its clean sequence token by token."""

    sample: int
    images: list[torch.Tensor]
    grids: list[tuple[int, int]]
    seq_ids: list[int]
    seq_kinds: list[int]
    seq_pos: list[tuple[int, int, int]]
    seq_hidden_from: list[int]
    hide_at: int | None = None
    seq_cols: list[int] = field(default_factory=list)
    segments: list[tuple[int, int]] = field(default_factory=list)
    pooled: dict[int, torch.Tensor] = field(default_factory=dict)
    generated: list[int] = field(default_factory=list)
    segment_start: int = 0
    prefix_ids: list[int] = field(default_factory=list)  # a forced answer start (trigger context)
    num_generated: int = 0
    sampled: int = 0  # every sampled token, rolled-back ones included: the decode step count
    image_hidden_at: int | None = None
    calibrations: list[Calibration] = field(default_factory=list)
    finish: str | None = None
    pending: list[int] = field(default_factory=list)
    pending_kinds: list[int] = field(default_factory=list)
    pending_pos: list[tuple[int, int, int]] = field(default_factory=list)
    pending_features: list[torch.Tensor] = field(default_factory=list)

    @property
    def next_position(self) -> int:
        return max(self.seq_pos[-1]) + 1
