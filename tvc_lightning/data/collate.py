"""Batch encoded samples: right-pad token tensors, concatenate visual tensors."""

from __future__ import annotations

import torch

from tvc_lightning.data.tokenize import IGNORE_INDEX


class Collator:
    """Pads ``input_ids`` with ``pad_token_id``, ``labels`` with -100 and positions with 0.

    Visual tensors are concatenated over the batch (the vision tower takes them flat);
    ``visual_segments`` image indices are shifted so they index the batch's images.
    ``pad_to_multiple_of`` rounds the padded length up (tensor-core friendly shapes on GPU).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = max(1, pad_to_multiple_of)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [int(s["input_ids"].numel()) for s in samples]
        m = self.pad_to_multiple_of
        width = -(-max(lengths) // m) * m
        batch = len(samples)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        position_ids = torch.zeros((3, batch, width), dtype=torch.long)
        segments, image_offset = [], 0
        for b, (s, n) in enumerate(zip(samples, lengths, strict=True)):
            input_ids[b, :n] = s["input_ids"]
            labels[b, :n] = s["labels"]
            attention_mask[b, :n] = 1
            position_ids[:, b, :n] = s["position_ids"]
            seg = s["visual_segments"].clone()
            seg[:, 0] += image_offset
            segments.append(seg)
            image_offset += int(s["image_grid_thw"].shape[0])
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
            "image_grid_thw": torch.cat([s["image_grid_thw"] for s in samples]),
            "visual_segments": torch.cat(segments),
            "num_injections": torch.tensor([s["num_injections"] for s in samples]),
        }
