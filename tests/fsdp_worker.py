"""One rank of the FSDP2-on-CPU check (run by tests/test_fsdp.py under torchrun, 2 ranks, gloo).

Loads the tiny checkpoint the way ``TVCModule.configure_model`` does under Lightning's
``ModelParallelStrategy`` (meta build, per-layer ``fully_shard``, rank 0 reads and broadcasts),
gathers the weights back, PVC-decodes a rank-dependent number of tokens with the ranks kept in
step, then trains a few AdamW steps with TVCModule's loss on rank-dependent batches. Also loads a
tied-embedding checkpoint and runs its forward. Writes what it saw to OUT/rank{R}.json and the
trained full state dict to OUT/trained.pt (rank 0).
"""

from __future__ import annotations

import faulthandler
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

from tests.conftest import rank_batch, rank_decode
from tvc_lightning.callbacks import all_ranks_any
from tvc_lightning.hf import load_processor
from tvc_lightning.module import TVCModule

STEPS, LR, TIED_CHUNK = 3, 3e-3, 2


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main() -> None:
    # A collective mismatch hangs rather than fails: dump every thread's stack and exit instead.
    faulthandler.dump_traceback_later(240, exit=True)
    checkpoint, tied_checkpoint, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    device = torch.device("cpu")

    module = TVCModule(checkpoint, loss_chunk_size=8)
    module.load_fsdp(mesh, "32-true", device)
    model = module.model
    local = sum(p.to_local().numel() for p in model.parameters())
    loaded = full_state(model)  # collective; rank 0 saves it for the test to compare
    processor = load_processor(checkpoint)

    model.eval()
    result = rank_decode(model, processor, rank, sync=all_ranks_any)
    model.train()

    batch = rank_batch(processor, rank)  # ranks hold different numbers of labelled tokens
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        loss, _ = module.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    trained = full_state(model)

    # Tied embeddings (Qwen2-VL-2B): one unit for embedding and lm_head, called many times per
    # step by the chunked loss (2 labels per chunk).
    tied = TVCModule(tied_checkpoint, loss_chunk_size=TIED_CHUNK)
    tied.load_fsdp(mesh, "32-true", device)
    tied_shares = tied.model.lm_head.weight is tied.model.get_input_embeddings().weight
    loss, _ = tied.loss(batch)
    loss.backward()
    tied_grad = tied.model.lm_head.weight.grad.full_tensor()
    tied.model.eval()
    with torch.no_grad():
        tied_logits = tied(rank_batch(processor, 0))

    if rank == 0:
        torch.save({"loaded": loaded, "trained": trained, "tied_logits": tied_logits,
                    "tied_grad": tied_grad}, out / "state.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "local_params": local, "losses": losses, "tied_shares": tied_shares,
        "tokens": result.token_ids, "num_generated": result.num_generated,
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
