"""One rank of the ZeRO-3-on-CPU check (run by tests/test_zero3.py under torchrun, 2 ranks, gloo).

Loads the tiny checkpoint partitioned (``load_model`` with a ZeRO-3 config), PVC-decodes a
rank-dependent number of tokens with the ranks kept in step, then trains a few steps through
DeepSpeed with TVCModule's loss on rank-dependent batches (different label counts). Writes what it saw
to OUT/rank{R}.json.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402

from tests.conftest import rank_batch, rank_decode  # noqa: E402
from tvc_lightning.callbacks import all_ranks_any  # noqa: E402
from tvc_lightning.hf import load_model, load_processor  # noqa: E402
from tvc_lightning.module import TVCModule  # noqa: E402

ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
         "zero_allow_untested_optimizer": True}


def main() -> None:
    # A collective mismatch hangs rather than fails: dump every thread's stack and exit instead.
    faulthandler.dump_traceback_later(240, exit=True)
    checkpoint, out = sys.argv[1], Path(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model = load_model(checkpoint, deepspeed_config=ZERO3)
    full = sum(p.ds_numel for p in model.parameters())
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=3e-3),
                                      config=ZERO3)
    processor = load_processor(checkpoint)
    # Decode first, on the weights as loaded (a single-process run must give the same tokens).
    engine.eval()
    result = rank_decode(engine.module, processor, rank, sync=all_ranks_any)
    engine.train()
    module = TVCModule(checkpoint, loss_chunk_size=8)
    module.model = engine.module
    batch = rank_batch(processor, rank)  # ranks hold different numbers of labelled tokens
    losses = []
    for _ in range(4):
        loss, _ = module.loss(batch)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    (out / f"rank{rank}.json").write_text(json.dumps({
        "full_params": full, "local_params": local, "losses": losses,
        "tokens": result.token_ids, "num_generated": result.num_generated,
    }))


if __name__ == "__main__":
    main()
