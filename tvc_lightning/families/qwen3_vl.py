"""Qwen3-VL: 16-pixel patches with learned position embeddings, DeepStack, interleaved M-RoPE.

DeepStack: the tower also merges the hidden states of a few of its blocks, and the decoder adds
each of those levels to the image tokens' hidden states after its first layers. Here an image's
features are the main merged tokens followed, along the feature axis, by every DeepStack level,
so a pooled re-injected copy carries pooled DeepStack inputs too (pooling is linear per level)
and :meth:`visual_inputs` hands the levels to the language model for whatever placeholders the
forward holds: originals, copies, or a decode step's chunk. The language model's interleaved
M-RoPE and its query/key RMSNorm live inside HF's layers; positions are Qwen2-VL's rule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tvc_lightning.families.base import ModelFamily


class Qwen3VL(ModelFamily):
    model_type = "qwen3_vl"
    model_class_name = "Qwen3VLForConditionalGeneration"
    config_class_name = "Qwen3VLConfig"
    processor_class_name = "Qwen3VLProcessor"
    video_processor_type = "Qwen3VLVideoProcessor"
    image_processor_settings = {"patch_size": 16, "image_mean": [0.5, 0.5, 0.5],
                                "image_std": [0.5, 0.5, 0.5]}
    mrope_interleaved = True
    rope_scaling_key = False
    default_system_prompt = None  # Qwen3-VL's template writes no system turn unless given one

    @staticmethod
    def features_of(tower_output: Any) -> torch.Tensor:
        return torch.cat([tower_output.pooler_output, *tower_output.deepstack_features], dim=-1)

    @staticmethod
    def visual_inputs(mask: torch.Tensor, extra: torch.Tensor, width: int) -> dict[str, Any]:
        if extra.shape[-1] % width:
            raise ValueError(f"DeepStack features of width {extra.shape[-1]} are not whole levels "
                             f"of the hidden size {width}")
        if not extra.shape[-1]:
            return {}
        return {"visual_pos_masks": mask, "deepstack_visual_embeds": list(extra.split(width, dim=-1))}

    @staticmethod
    def query_key_norm(attention: nn.Module, states: torch.Tensor, which: str) -> torch.Tensor:
        return getattr(attention, f"{which}_norm")(states)

    @staticmethod
    def vision_shape(v: Any) -> Any:
        from tvc_lightning.flops import VisionShape

        return VisionShape(int(v.hidden_size), int(v.depth), int(v.intermediate_size),
                           int(v.in_channels * v.temporal_patch_size * v.patch_size ** 2),
                           int(v.spatial_merge_size), int(v.out_hidden_size),
                           mergers=1 + len(v.deepstack_visual_indexes))

    @classmethod
    def tiny_vision(cls, depth: int, dim: int, heads: int, out_dim: int) -> dict[str, Any]:
        # DeepStack taps every tower block but the last; the learned position grid is 8x8
        # patches, bilinearly resampled to each image as in the real 48x48 one.
        return {"depth": depth, "hidden_size": dim, "intermediate_size": 2 * dim, "num_heads": heads,
                "out_hidden_size": out_dim, "patch_size": 16, "spatial_merge_size": 2,
                "temporal_patch_size": 2, "num_position_embeddings": 64,
                "deepstack_visual_indexes": list(range(max(1, depth - 1)))}
