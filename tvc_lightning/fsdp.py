"""FSDP2 (``fully_shard``) for Qwen2-VL: per-layer sharding and loading without a copy per rank.

Used by :class:`~tvc_lightning.module.TVCModule` under Lightning's ``ModelParallelStrategy``
(recipes/72b_fsdp.yaml). Every rank builds the model on the meta device and shards it; only rank 0
reads the checkpoint, and each tensor is broadcast once and kept as local shards, so no rank ever
holds a full fp32 copy (rank 0 holds the checkpoint once, in its stored dtype, while loading).

Units: each vision block, the vision tower (patch embedding + merger), each decoder layer, the
token embedding, the language model (final norm), ``lm_head`` and the root. The embedding and
``lm_head`` are their own units because training and PVC decoding call them directly, outside
the root's forward; with tied embeddings they share one unit.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from tvc_lightning.hf import nonfinite_parameter, raise_nonfinite, resolve_checkpoint_path

# Trainer precision -> FSDP2 mixed-precision policy: all-gather and compute in bf16, reduce
# gradients in fp32 (the Trainer's autocast still runs on top; the fp32 master weights stay sharded).
_MIXED = {"bf16-mixed": torch.bfloat16}


def mixed_precision_policy(precision: str) -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = _MIXED.get(precision)
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def build_on_meta(path: str | Path, dtype: torch.dtype, attn_implementation: str) -> Any:
    """The model of checkpoint ``path`` with every parameter on the meta device (no memory)."""
    from transformers import AutoConfig

    from tvc_lightning.families import family_at

    path = resolve_checkpoint_path(path)
    family = family_at(path)  # an unsupported family fails here, naming the config.json
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return family.model_class()._from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )


def shard(model: Any, mesh: Any, policy: Any) -> None:
    """Apply ``fully_shard`` per vision block and decoder layer, then to the outer units."""
    from torch.distributed.fsdp import fully_shard

    def wrap(module: Any) -> None:
        fully_shard(module, mesh=mesh, mp_policy=policy)

    from tvc_lightning.families import family_of

    family = family_of(model)
    visual, language = family.vision_tower(model), family.language_model(model)
    for block in visual.blocks:
        wrap(block)
    wrap(visual)
    for layer in language.layers:
        wrap(layer)
    if model.lm_head.weight is language.embed_tokens.weight:  # tied: one unit holds both
        wrap([language.embed_tokens, model.lm_head])
    else:
        wrap(language.embed_tokens)
        wrap(model.lm_head)
    wrap(language)
    wrap(model)


def load_sharded(model: Any, path: str | Path, device: torch.device) -> None:
    """Fill a sharded meta model with checkpoint ``path``: rank 0 reads, every rank keeps its shards.

    Must run on every rank at once (it broadcasts). Rank 0 checks the weights it read: NaN/inf
    ones make every rank raise together, naming the file and tensor.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from tvc_lightning.families import family_of

    rank = dist.get_rank()
    path = resolve_checkpoint_path(path)
    full, bad = None, None
    if rank == 0:
        # The stored dtype ("auto"): fp32 shards are filled by copying, so no fp32 copy is made.
        full = family_of(model).model_class().from_pretrained(
            path, dtype="auto", attn_implementation=model.config._attn_implementation
        )
        bad = nonfinite_parameter(full)
    flag = torch.tensor([int(bad is not None)], device=device)
    dist.broadcast(flag, src=0)
    if flag.item():
        raise_nonfinite(path, bad)
    model.to_empty(device=device)
    state = full.state_dict() if full is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, strict=True))
    # Non-persistent buffers (rotary inverse frequencies) are in no state dict: send rank 0's.
    sources = dict(full.named_buffers()) if full is not None else {}
    for name, buffer in model.named_buffers():
        if rank == 0:
            buffer.copy_(sources[name])
        dist.broadcast(buffer, src=0)
    del full, state
    gc.collect()  # rank 0's full copy, before training allocates
    # FSDP picks its root on the first forward; training and decoding call inner units (the
    # embedding, the vision tower, lm_head) directly, so make the whole model the root now.
    model._get_fsdp_state()._lazy_init()


def data_parallel_mesh(device_mesh: Any) -> Any:
    """The 1-D mesh to shard over, from ``ModelParallelStrategy``'s (data, tensor) mesh."""
    if device_mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            "TVCModule shards with FSDP only (no tensor parallelism): set "
            "trainer.strategy.init_args.tensor_parallel_size=1 and data_parallel_size to the "
            "number of processes (devices x num_nodes)"
        )
    return device_mesh["data_parallel"]
