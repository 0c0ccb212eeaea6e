"""Qwen2.5-VL: the Qwen2-VL layout with a windowed-attention, RMSNorm/SwiGLU vision tower.

Images are placed and positioned as in Qwen2-VL (``second_per_grid_ts`` only moves video frames
along the time axis), so only the classes and the tower's config differ.
"""

from __future__ import annotations

from typing import Any

from tvc_lightning.families.base import ModelFamily


class Qwen25VL(ModelFamily):
    model_type = "qwen2_5_vl"
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
    config_class_name = "Qwen2_5_VLConfig"
    processor_class_name = "Qwen2_5_VLProcessor"
    video_processor_type = "Qwen2VLVideoProcessor"
    image_processor_settings = {"patch_size": 14}

    @staticmethod
    def vision_shape(v: Any) -> Any:
        from tvc_lightning.flops import VisionShape

        # SwiGLU MLP (3 matrices); windows of window_size pixels, i.e. window_size / patch_size
        # patches a side, except in the full-attention blocks.
        return VisionShape(int(v.hidden_size), int(v.depth), int(v.intermediate_size),
                           int(v.in_channels * v.temporal_patch_size * v.patch_size ** 2),
                           int(v.spatial_merge_size), int(v.out_hidden_size), mlp_matrices=3,
                           window=int(v.window_size) // int(v.patch_size),
                           full_blocks=len(v.fullatt_block_indexes))

    @classmethod
    def tiny_vision(cls, depth: int, dim: int, heads: int, out_dim: int) -> dict[str, Any]:
        # A 56-pixel window is 2x2 merged tokens: the tiny images span several windows, and the
        # last block attends over the whole image, as the real towers' full-attention blocks do.
        return {"depth": depth, "hidden_size": dim, "intermediate_size": 2 * dim, "num_heads": heads,
                "out_hidden_size": out_dim, "patch_size": 14, "spatial_merge_size": 2,
                "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [depth - 1]}
