"""Loading Qwen2-VL checkpoints (model and processor) from a local directory or a hub id.

The tiny random checkpoint of :mod:`tvc_lightning.testing` and ``Qwen/Qwen2-VL-72B-Instruct`` go
through the same two functions here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """HF's ``Qwen2VLProcessor`` without its video processor.

    Recent transformers cannot build Qwen2-VL's video processor without torchvision, and that
    makes the whole processor unconstructible on a CPU-only install. TVC uses images only, so this
    subclass drops the video part and keeps HF's own image/text logic (``__call__``, chat
    template, placeholder expansion) unchanged.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                 **kwargs: Any) -> None:
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.video_processor = None
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    def to_dict(self) -> dict[str, Any]:
        # Saved as the standard class, so an exported directory loads with AutoProcessor/vLLM.
        return {**super().to_dict(), "processor_class": "Qwen2VLProcessor"}


def check_checkpoint_path(path: str | Path, setting: str = "model.model_name_or_path") -> None:
    """A path that looks local must be a checkpoint directory: say so, naming the setting,
    rather than letting the hub client complain about an invalid repo id."""
    local = Path(str(path)).expanduser()
    looks_local = str(path).startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").exists():
        raise FileNotFoundError(
            f"{setting}={str(path)!r}: no config.json there. Point it at a local HF checkpoint "
            "directory (e.g. one written by `python -m tvc_lightning.testing DIR`)."
        )


def load_processor(path: str | Path, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> ImageOnlyQwen2VLProcessor:
    """Tokenizer + image processor of a Qwen2-VL checkpoint; pixel limits override the saved ones."""
    from transformers import AutoImageProcessor

    check_checkpoint_path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    kwargs: dict[str, Any] = {}
    if min_pixels is not None:
        kwargs["min_pixels"] = min_pixels
    if max_pixels is not None:
        kwargs["max_pixels"] = max_pixels
    image_processor = AutoImageProcessor.from_pretrained(str(path), **kwargs)
    chat_template = getattr(tokenizer, "chat_template", None)
    return ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=chat_template)


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"model dtype {name!r} not one of {sorted(_DTYPES)}") from None


# transformers decides "partition while loading" from a process-wide weak reference to this object.
_zero3_config: Any = None


def load_model(path: str | Path, dtype: str = "float32", attn_implementation: str = "sdpa",
               deepspeed_config: dict[str, Any] | None = None) -> Qwen2VLForConditionalGeneration:
    """``Qwen2VLForConditionalGeneration.from_pretrained`` with a clear error for a bad path.

    With a ZeRO-3 ``deepspeed_config`` the weights are materialized already partitioned across
    ranks (no full copy per rank): transformers' DeepSpeed integration is kept alive for the
    load, which makes ``from_pretrained`` build the model under ``deepspeed.zero.Init``.
    """
    global _zero3_config
    check_checkpoint_path(path)
    stage = ((deepspeed_config or {}).get("zero_optimization") or {}).get("stage")
    if stage == 3:
        try:
            from transformers.integrations import HfDeepSpeedConfig
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError("ZeRO-3 loading needs `pip install deepspeed accelerate`") from e
        _zero3_config = HfDeepSpeedConfig(deepspeed_config)
    return Qwen2VLForConditionalGeneration.from_pretrained(
        str(path), dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
    )
