"""Model families: one adapter per vision-language architecture, chosen from ``config.json``.

``family_of(config)`` (a loaded config or model) and ``family_at(path)`` (a checkpoint
directory) return the :class:`~tvc_lightning.families.base.ModelFamily` subclass of a model.
Adding a family: a new module with its subclass, listed in :data:`FAMILIES`, and its tiny model
in the family-parametrized tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tvc_lightning.families.base import ModelFamily
from tvc_lightning.families.qwen2_5_vl import Qwen25VL
from tvc_lightning.families.qwen2_vl import Qwen2VL
from tvc_lightning.families.qwen3_vl import Qwen3VL

FAMILIES: dict[str, type[ModelFamily]] = {f.model_type: f for f in (Qwen2VL, Qwen25VL, Qwen3VL)}

__all__ = ["FAMILIES", "ModelFamily", "Qwen25VL", "Qwen2VL", "Qwen3VL", "family_at", "family_named",
           "family_of", "family_of_processor"]


def family_named(model_type: str, where: str = "the checkpoint") -> type[ModelFamily]:
    """The family of ``model_type``; a clear error naming ``where`` and the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(f"{where}: model_type {model_type!r} is not a supported family; "
                         f"supported: {', '.join(sorted(FAMILIES))}") from None


def family_of(config_or_model: Any) -> type[ModelFamily]:
    """The family of a loaded HF config, or of a model (through its ``config``)."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = str(getattr(config, "model_type", None))
    # A family's bare language model (``qwen2_vl_text``, ...) belongs to the family.
    return family_named(model_type.removesuffix("_text"), f"{type(config_or_model).__name__}")


def family_of_processor(processor: Any) -> type[ModelFamily]:
    """The family a processor from ``hf.load_processor`` belongs to; a plain HF processor (no
    ``family``) is taken as Qwen2-VL's: image positions follow one rule in every family, only
    the default system turn differs."""
    return getattr(processor, "family", None) or Qwen2VL


def family_at(path: str | Path) -> type[ModelFamily]:
    """The family of checkpoint directory ``path``, from its ``config.json``."""
    file = Path(path) / "config.json"
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: cannot read the model config ({e})") from e
    return family_named(str(model_type), str(file))
