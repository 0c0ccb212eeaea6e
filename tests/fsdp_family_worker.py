"""FSDP2 on 2 CPU ranks (gloo) for one tiny checkpoint of any family, tower trained: the sharded
loss and PVC decoding (ranks in step) against one process. Run by tests/test_families.py."""

from __future__ import annotations

import faulthandler
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from tests.conftest import rank_batch, rank_decode
from tvc_lightning.callbacks import all_ranks_any
from tvc_lightning.hf import load_model, load_processor
from tvc_lightning.module import TVCModule


def main() -> None:
    faulthandler.dump_traceback_later(300, exit=True)
    checkpoint, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    module = TVCModule(checkpoint, loss_chunk_size=8, freeze=[])  # every tower unit is sharded
    module.load_fsdp(init_device_mesh("cpu", (2,)), "32-true", torch.device("cpu"))
    processor = load_processor(checkpoint)
    module.model.eval()
    result = rank_decode(module.model, processor, rank, sync=all_ranks_any)
    module.model.train()
    batch = rank_batch(processor, rank)
    loss, _ = module.loss(batch)
    loss.backward()
    reference = TVCModule(checkpoint, loss_chunk_size=8, freeze=[])
    reference.model = load_model(checkpoint)
    reference._prepare_model()
    reference_loss, _ = reference.loss(batch)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "loss": float(loss), "reference_loss": float(reference_loss), "tokens": result.token_ids,
        "num_generated": result.num_generated,
        "calibrations": [c.step for c in result.calibrations]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
