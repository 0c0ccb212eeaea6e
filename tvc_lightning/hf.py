"""Loading Qwen VL checkpoints (model and processor) from a local directory or a hub id.

The tiny random checkpoint of :mod:`tvc_lightning.testing` and ``Qwen/Qwen2-VL-72B-Instruct`` go
through the same two functions here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from tvc_lightning.families import ModelFamily, Qwen2VL, family_at

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SETTING = "model.model_name_or_path"
# Settings an image processor shares with Qwen2-VL's video processor (patching, normalization):
# a saved processor carries them for the video side too, as HF infers it for Hub checkpoints.
_SHARED_VIDEO_KEYS = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                      "do_convert_rgb", "do_normalize", "do_rescale", "rescale_factor")


class ImageOnlyQwenVLProcessor(Qwen2VLProcessor):
    """HF's ``Qwen2VLProcessor`` without its video processor, for every supported family.

    Recent transformers cannot build a Qwen VL video processor without torchvision, and that
    makes the whole processor unconstructible on a CPU-only install. TVC uses images only, so this
    subclass drops the video part and keeps HF's own image/text logic (``__call__``, chat
    template, placeholder expansion), which the three families share for images. ``family``
    names the classes it is saved as.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                 family: type[ModelFamily] = Qwen2VL, **kwargs: Any) -> None:
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.video_processor = None
        self.family = family
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    def to_dict(self) -> dict[str, Any]:
        # Saved as the family's standard class, with the video processor entry it reads (the
        # family's video processor, sharing the image side's patching), so a saved directory
        # loads with AutoProcessor and vLLM wherever torchvision is installed. (Without it HF
        # cannot build such a processor at all: load_processor reads the directory then.)
        saved = super().to_dict()
        saved.pop("family", None)
        image = saved.get("image_processor", {})
        video = {"video_processor_type": self.family.video_processor_type,
                 **{k: image[k] for k in _SHARED_VIDEO_KEYS if k in image}}
        return {**saved, "video_processor": video, "processor_class": self.family.processor_class_name}


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_checkpoint_path(path: str | Path, setting: str = SETTING) -> str:
    """The local checkpoint directory for ``path``: itself, or a hub id's snapshot in the local
    Hugging Face cache; never a network call.

    Nothing is downloaded at run time: under several ranks every rank would fetch it, and with
    no network the hub client spends about a minute in retries before failing. So a path that is
    not a directory fails at once, naming ``setting``, unless the hub cache already holds it.
    """
    text = str(path)
    local = Path(text).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise FileNotFoundError(
                f"{setting}={text!r}: no config.json there. Point it at a local HF checkpoint "
                "directory (e.g. one written by `python -m tvc_lightning.testing DIR`)."
            )
        return str(local)
    cached = _cached_snapshot(text)
    if cached is not None:
        return cached
    hint = (" (HF_HUB_OFFLINE is set)" if _offline() else "")
    raise FileNotFoundError(
        f"{setting}={text!r}: no such local directory, and no model of that id in the local "
        f"Hugging Face cache{hint}. Checkpoints are read from disk only, never downloaded "
        f"during a run: point {setting} at a local HF checkpoint directory, after e.g. "
        f"`hf download {text} --local-dir DIR` for a hub model."
    )


def _cached_snapshot(repo_id: str) -> str | None:
    """The snapshot directory of hub model ``repo_id`` in the local HF cache, or None."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError:  # not a hub id at all, e.g. a missing relative path
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


def check_checkpoint_path(path: str | Path, setting: str = SETTING) -> None:
    """Raise, naming ``setting``, unless ``path`` is a local checkpoint (see
    :func:`resolve_checkpoint_path`)."""
    resolve_checkpoint_path(path, setting)


def load_processor(path: str | Path, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> ImageOnlyQwenVLProcessor:
    """Tokenizer + image processor of a Qwen VL checkpoint; pixel limits override the saved ones."""
    from transformers import AutoImageProcessor

    path = resolve_checkpoint_path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs: dict[str, Any] = {}
    if min_pixels is not None:
        kwargs["min_pixels"] = min_pixels
    if max_pixels is not None:
        kwargs["max_pixels"] = max_pixels
    image_processor = AutoImageProcessor.from_pretrained(path, **kwargs)
    chat_template = getattr(tokenizer, "chat_template", None)
    return ImageOnlyQwenVLProcessor(image_processor, tokenizer, chat_template=chat_template,
                                     family=family_at(path))


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"model dtype {name!r} not one of {sorted(_DTYPES)}") from None


# transformers decides "partition while loading" from a process-wide weak reference to this object.
_zero3_config: Any = None


def load_model(path: str | Path, dtype: str = "float32", attn_implementation: str = "sdpa",
               deepspeed_config: dict[str, Any] | None = None) -> Any:
    """The family's ``...ForConditionalGeneration.from_pretrained`` (family from ``config.json``)
    with a clear error for a bad path or an unsupported family, and non-finite weights refused
    (naming the file and tensor): they would train with NaN losses.

    With a ZeRO-3 ``deepspeed_config`` the weights are materialized already partitioned across
    ranks (no full copy per rank): transformers' DeepSpeed integration is kept alive for the
    load, which makes ``from_pretrained`` build the model under ``deepspeed.zero.Init``.
    """
    global _zero3_config
    path = resolve_checkpoint_path(path)
    family = family_at(path)
    stage = ((deepspeed_config or {}).get("zero_optimization") or {}).get("stage")
    if stage == 3:
        try:
            from transformers.integrations import HfDeepSpeedConfig
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError("ZeRO-3 loading needs `pip install deepspeed accelerate`") from e
        _zero3_config = HfDeepSpeedConfig(deepspeed_config)
    model = family.model_class().from_pretrained(
        path, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
    )
    bad = nonfinite_parameter(model)
    # Under ZeRO-3 each rank sees its own partitions: all ranks must agree to raise together.
    if (any_rank(bad is not None) if stage == 3 else bad is not None):
        raise_nonfinite(path, bad)
    return model


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 24) -> bool:
    # In chunks: a whole-tensor isfinite would allocate a mask as large as the embedding.
    flat = tensor.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first floating-point parameter or buffer holding NaN or inf (for a ZeRO-3
    partitioned parameter: in this rank's partition), or None."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        local = getattr(tensor, "ds_tensor", tensor)
        if local.is_floating_point() and local.numel() and not _all_finite(local):
            return name
    return None


def any_rank(local: bool) -> bool:
    """True if ``local`` is true on any rank (an all-reduce MAX; just ``local`` when not
    distributed). Every rank must call it at the same point."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    flag = torch.tensor([int(local)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def nonfinite_in_files(path: str | Path) -> tuple[str, str] | None:
    """``(file, tensor)`` of the first stored tensor with NaN or inf in checkpoint directory
    ``path``'s safetensors files, or None. Reads every tensor: for the error message only."""
    from safetensors import safe_open

    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not _all_finite(tensor):
                    return file.name, key
    return None


def raise_nonfinite(path: str | Path, parameter: str | None, setting: str = SETTING) -> None:
    """Refuse checkpoint ``path``: it holds NaN/inf weights (``parameter``: where this rank saw
    them, if it did); names the stored file and tensor."""
    found = nonfinite_in_files(path)
    where = (f"{found[0]} holds NaN/inf in tensor {found[1]!r}" if found
             else f"its weights hold NaN/inf (parameter {parameter!r} after loading)")
    raise ValueError(
        f"{setting}={str(path)!r}: {where}. The checkpoint is corrupt (a truncated download or "
        f"copy, or a diverged run): training on it gives NaN losses. Re-download or re-export it, "
        f"or point {setting} at another checkpoint."
    )
