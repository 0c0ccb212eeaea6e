"""What every supported model family shares, and the hooks a family overrides.

TVC's mechanics touch a vision-language model in a few places only: running the vision tower
once per image, placing visual features (originals and pooled copies) into the token embeddings,
M-RoPE positions for text and visual segments, the language model's attention (for the probe),
and which HF classes load and save it. :class:`ModelFamily` holds those places; the module, the
DVR data path, PVC decoding, the attention probe, FSDP and export call it and hold no
family-specific code. A family is one subclass in its own file, registered in ``__init__``.

Visual *features* of an image are one tensor ``(h' * w', F)`` on its merged-token grid. For most
families ``F`` is the language model's hidden size; a family that feeds the decoder extra
per-token visual inputs (Qwen3-VL's DeepStack levels) concatenates them along ``F``, so pooling a
re-injected copy pools every level at once and everything between the tower and the embedding
(caching, pooling, batching) stays family-agnostic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from tvc_lightning.vision import mrope_positions


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's half rotation: ``(x1, x2) -> (-x2, x1)`` on the last dimension's halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ModelFamily:
    """A vision-language model family (Qwen2-VL's layout; subclasses override what differs)."""

    #: ``model_type`` in the checkpoint's ``config.json``.
    model_type: ClassVar[str]
    #: transformers class names: the model, the config, the processor a saved checkpoint names.
    model_class_name: ClassVar[str]
    config_class_name: ClassVar[str]
    processor_class_name: ClassVar[str]
    #: The video processor a saved processor declares (loaders of the standard class need one).
    video_processor_type: ClassVar[str]
    #: The image processor's settings for the family (patching, normalization) in tiny models.
    image_processor_settings: ClassVar[dict[str, Any]] = {}
    #: Parameter-name prefixes of the vision tower with its merger(s): TVC freezes them.
    vision_prefixes: ClassVar[tuple[str, ...]] = ("visual",)
    #: The system turn the family's chat template writes when none is given (None: no turn).
    default_system_prompt: ClassVar[str | None] = "You are a helpful assistant."
    #: Special tokens of the chat format (the same strings across the Qwen VL families).
    vision_start: ClassVar[str] = "<|vision_start|>"
    vision_end: ClassVar[str] = "<|vision_end|>"
    image_token: ClassVar[str] = "<|image_pad|>"

    # -- HF classes ------------------------------------------------------------------------------

    @classmethod
    def model_class(cls) -> type:
        import transformers

        return getattr(transformers, cls.model_class_name)

    @classmethod
    def config_class(cls) -> type:
        import transformers

        return getattr(transformers, cls.config_class_name)

    # -- model parts -----------------------------------------------------------------------------

    @staticmethod
    def vision_tower(model: nn.Module) -> nn.Module:
        return model.model.visual

    @staticmethod
    def language_model(model: nn.Module) -> nn.Module:
        return model.model.language_model

    @classmethod
    def merge_size(cls, model: nn.Module) -> int:
        return int(cls.vision_tower(model).spatial_merge_size)

    @staticmethod
    def text_config(config: Any) -> Any:
        return getattr(config, "text_config", None) or config

    # -- vision ----------------------------------------------------------------------------------

    @classmethod
    def encode_images(cls, model: nn.Module, pixel_values: torch.Tensor,
                      image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Run the vision tower once over all images; each image's features ``(h'*w', F)``."""
        visual = cls.vision_tower(model)
        out = visual(pixel_values.to(next(visual.parameters()).dtype), grid_thw=image_grid_thw)
        features = cls.features_of(out)
        merge = visual.spatial_merge_size
        sizes = (image_grid_thw.prod(-1) // (merge * merge)).tolist()
        return list(torch.split(features, sizes))

    @staticmethod
    def features_of(tower_output: Any) -> torch.Tensor:
        """The merged visual tokens in a tower's output (transformers 5: ``pooler_output``)."""
        return getattr(tower_output, "pooler_output", tower_output)

    @staticmethod
    def vision_shape(vision_config: Any) -> Any:
        """The tower's :class:`~tvc_lightning.flops.VisionShape` (for model FLOPs)."""
        raise NotImplementedError

    # -- positions -------------------------------------------------------------------------------

    @staticmethod
    def positions(input_ids: torch.Tensor, image_token_id: int,
                  grids: Sequence[tuple[int, int]], offset: int = 0) -> torch.Tensor:
        """M-RoPE positions ``(3, L)`` of one sequence whose visual segments have ``grids``.

        Images sit at time 0 of their segment in all three Qwen VL families (the time axis and
        ``second_per_grid_ts`` matter for video only), so they share one rule; a family with
        another rule overrides this.
        """
        return mrope_positions(input_ids, image_token_id, grids, offset)

    # -- the language model's inputs -------------------------------------------------------------

    @classmethod
    def embed(cls, model: nn.Module, input_ids: torch.Tensor,
              features: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Token embeddings with ``features`` (one row per image placeholder, in order) scattered
        into the placeholders, and the extra keyword arguments the language model needs."""
        embeds = model.get_input_embeddings()(input_ids)
        if features is None or features.numel() == 0:
            return embeds, {}
        mask = input_ids == int(model.config.image_token_id)
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"{int(mask.sum())} image placeholder tokens but {features.shape[0]} "
                             "visual features to place")
        width = embeds.shape[-1]
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), features[:, :width].to(embeds.dtype))
        return embeds, cls.visual_inputs(mask, features[:, width:].to(embeds.dtype), width)

    @staticmethod
    def visual_inputs(mask: torch.Tensor, extra: torch.Tensor, width: int) -> dict[str, Any]:
        """Language-model keyword arguments from the features beyond the hidden size (none here)."""
        if extra.shape[-1]:
            raise ValueError(f"visual features wider than the hidden size ({width}) for a family "
                             "that feeds the decoder nothing else")
        return {}

    # -- attention (for the probe) ---------------------------------------------------------------

    @staticmethod
    def query_key_norm(attention: nn.Module, states: torch.Tensor, which: str) -> torch.Tensor:
        """What the attention does to per-head query/key states ``(..., heads, head_dim)`` between
        the projection and the rotation (``which``: ``q`` or ``k``). Nothing, here."""
        return states

    # -- tiny random models ----------------------------------------------------------------------

    #: Tiny text configs: the interleaved M-RoPE layout (Qwen3-VL), and the older ``rope_scaling``
    #: spelling of the M-RoPE sections beside ``rope_parameters`` (Qwen2-VL, Qwen2.5-VL).
    mrope_interleaved: ClassVar[bool] = False
    rope_scaling_key: ClassVar[bool] = True

    @classmethod
    def tiny_vision(cls, depth: int, dim: int, heads: int, out_dim: int) -> dict[str, Any]:
        """The vision config of a tiny model of this family."""
        raise NotImplementedError(f"{cls.__name__} has no tiny vision config")

    @classmethod
    def tiny_config(cls, ids: dict[str, int], vocab_size: int, hidden_size: int, num_layers: int,
                    num_heads: int, num_kv_heads: int, intermediate_size: int, vision_depth: int,
                    vision_dim: int, vision_heads: int, tie_word_embeddings: bool) -> Any:
        """A small config of this family whose special-token ids are ``ids``."""
        head_dim = hidden_size // num_heads
        # M-RoPE splits head_dim/2 rotary frequencies into (temporal, height, width) sections.
        mrope = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]
        rope: dict[str, Any] = {"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0}
        if cls.mrope_interleaved:
            rope["mrope_interleaved"] = True
        text = {
            "vocab_size": vocab_size, "hidden_size": hidden_size,
            "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
            "head_dim": head_dim, "max_position_embeddings": 32768, "rope_parameters": rope,
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        }
        if cls.rope_scaling_key:
            text["rope_scaling"] = {"type": "mrope", **rope}
        return cls.config_class()(
            text_config=text, vision_config=cls.tiny_vision(vision_depth, vision_dim, vision_heads,
                                                            hidden_size),
            tie_word_embeddings=tie_word_embeddings, **cls._token_ids(ids))

    @staticmethod
    def _token_ids(ids: dict[str, int]) -> dict[str, int]:
        return {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
                "vision_start_token_id": ids["<|vision_start|>"],
                "vision_end_token_id": ids["<|vision_end|>"]}
