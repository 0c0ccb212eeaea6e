"""``python -m tvc_lightning export CKPT --out DIR``: a trained checkpoint as an HF model directory.

The directory holds safetensors weights, ``config.json``, the ``generation_config.json`` of the
checkpoint the run started from (its stop tokens and sampling defaults, copied as they are) and
its processor (tokenizer, chat template, image processor), so
the family's ``...ForConditionalGeneration.from_pretrained(DIR)`` (e.g.
``Qwen2_5_VLForConditionalGeneration``), ``AutoProcessor.from_pretrained(DIR)``
and vLLM load it directly.

``CKPT`` is a Lightning ``.ckpt`` file, a sharded FSDP2 checkpoint directory (torch.distributed.
checkpoint, from ``ModelParallelStrategy``), or a DeepSpeed checkpoint directory (ZeRO shards),
which is first consolidated into one fp32 state dict (needs ``deepspeed``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from tvc_lightning.hf import load_processor, resolve_checkpoint_path, resolve_dtype

_PREFIX = "model."  # TVCModule keeps the HF model as its ``model`` attribute


def _distributed_checkpoint(path: Path, dtype: torch.dtype) -> dict[str, Any]:
    """The model weights and hyperparameters of a sharded (torch.distributed.checkpoint) directory,
    as written by ``ModelParallelStrategy`` (FSDP2); optimizer state is not read. Tensors are
    read straight into ``dtype`` (one copy of the model in memory, not an fp32 one too)."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(path))
    prefix = "state_dict."
    template = {
        key: torch.empty(meta.size, dtype=dtype if meta.properties.dtype.is_floating_point
                         else meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(prefix + _PREFIX) and hasattr(meta, "size")
    }
    if not template:
        raise ValueError(f"{path}: no '{prefix}{_PREFIX}*' tensors in this distributed checkpoint")
    dcp.load(template, storage_reader=reader, no_dist=True)  # fills the tensors in place
    meta = path / "meta.pt"
    extra = torch.load(meta, map_location="cpu", weights_only=False) if meta.exists() else {}
    return {**extra, "state_dict": {k[len(prefix):]: v for k, v in template.items()}}


def _lightning_checkpoint(path: Path, dtype: torch.dtype) -> dict[str, Any]:
    if path.is_dir() and (path / ".metadata").exists():
        return _distributed_checkpoint(path, dtype)
    if path.is_dir():
        if not ((path / "latest").exists() or (path / "checkpoint").is_dir()):
            raise ValueError(
                f"checkpoint {path}: a folder that is neither a DeepSpeed checkpoint (no `latest` "
                "file or `checkpoint/` folder), nor FSDP2's sharded one (no `.metadata`), nor an HF "
                "model directory (no config.json); give a .ckpt file or one of those folders"
            )
        try:
            from lightning.pytorch.utilities.deepspeed import (
                convert_zero_checkpoint_to_fp32_state_dict,
            )
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError(
                f"{path} is a DeepSpeed checkpoint directory: `pip install deepspeed` to read it"
            ) from e
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "consolidated.ckpt"
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(out))
            return torch.load(out, map_location="cpu", weights_only=False)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # Memory-mapped: the optimizer state beside the weights is never read in.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path,
                      base_model: str | None = None, dtype: str = "bfloat16") -> Path:
    """Write ``checkpoint``'s model as an HF directory; returns ``out_dir``.

    ``base_model`` is the checkpoint directory the run started from (its config and processor
    are reused); by default the ``model_name_or_path`` stored in the checkpoint's hyperparameters.
    """
    from transformers import AutoConfig

    from tvc_lightning.families import family_at

    target = resolve_dtype(dtype)
    ckpt = _lightning_checkpoint(Path(checkpoint), target)
    base = base_model or ckpt.get("hyper_parameters", {}).get("model_name_or_path")
    if not base:
        raise ValueError(f"{checkpoint}: no model_name_or_path in its hyperparameters; pass --base-model")
    # Converted tensor by tensor, each fp32 original dropped as it goes: at 72B the bf16 copy
    # must not sit beside the whole fp32 one.
    weights, state = ckpt.pop("state_dict"), {}
    for key in list(weights):
        value = weights.pop(key)
        if key.startswith(_PREFIX):
            state[key[len(_PREFIX):]] = value.to(target) if value.is_floating_point() else value
    if not state:
        raise ValueError(f"{checkpoint}: no '{_PREFIX}*' weights in its state_dict")
    base = resolve_checkpoint_path(base, "--base-model (or the checkpoint's model_name_or_path)")
    family = family_at(base)  # an unsupported family fails here, naming the base's config.json
    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = family.model_class()(config)
    model.load_state_dict(state, strict=True, assign=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    # save_pretrained writes a generation config rebuilt from config.json (a single eos id, no
    # sampling defaults): the base checkpoint's own file is what it was trained to stop with.
    source = Path(base) / "generation_config.json"
    if source.exists():
        shutil.copyfile(source, out / "generation_config.json")
    load_processor(base).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tvc_lightning export", description=__doc__)
    parser.add_argument("checkpoint", help="Lightning .ckpt file, FSDP2 or DeepSpeed checkpoint directory")
    parser.add_argument("--out", required=True, help="output HF model directory")
    parser.add_argument("--base-model", default=None,
                        help="checkpoint dir the run started from (default: from the checkpoint)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    print(export_checkpoint(args.checkpoint, args.out, args.base_model, args.dtype))
