"""Qwen2-VL: ViT with a 2x2 patch merger, LayerNorm/GELU tower, M-RoPE language model."""

from __future__ import annotations

from typing import Any

from tvc_lightning.families.base import ModelFamily


class Qwen2VL(ModelFamily):
    model_type = "qwen2_vl"
    model_class_name = "Qwen2VLForConditionalGeneration"
    config_class_name = "Qwen2VLConfig"
    processor_class_name = "Qwen2VLProcessor"
    video_processor_type = "Qwen2VLVideoProcessor"
    image_processor_settings = {"patch_size": 14}

    @staticmethod
    def vision_shape(v: Any) -> Any:
        from tvc_lightning.flops import VisionShape

        return VisionShape(int(v.embed_dim), int(v.depth), int(v.embed_dim * v.mlp_ratio),
                           int(v.in_channels * v.temporal_patch_size * v.patch_size ** 2),
                           int(v.spatial_merge_size), int(v.hidden_size))

    @classmethod
    def tiny_vision(cls, depth: int, dim: int, heads: int, out_dim: int) -> dict[str, Any]:
        return {"depth": depth, "embed_dim": dim, "hidden_size": out_dim, "mlp_ratio": 2,
                "num_heads": heads, "patch_size": 14, "spatial_merge_size": 2,
                "temporal_patch_size": 2}
