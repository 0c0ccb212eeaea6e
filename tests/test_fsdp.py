"""FSDP2 on CPU (gloo, 2 processes): the path of recipes/72b_fsdp.yaml at tiny size.

Shows: each rank holds only its shards after loading, and the gathered weights equal the
checkpoint; sharded training equals single-process training on the ranks' averaged losses
(ranks holding different numbers of labelled tokens); PVC decoding with ranks generating different
lengths stays in step and gives the tokens of a single-process run; tied embeddings load right;
Lightning's ModelParallelStrategy runs fit + validation with the PVC callback through the CLI, its
sharded checkpoint exports to an HF directory, and a run resumed from one continues exactly.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_engine.synth import write_split
from tests.conftest import CALIBRATING, assert_pvc_calibrated, assert_ranks_decoded_as_one_process, rank_batch
from tests.fsdp_worker import LR, STEPS, TIED_CHUNK
from tests.wandb_history import history
from tvc_lightning.hf import load_model
from tvc_lightning.module import TVCModule
from tvc_lightning.testing import save_tiny_qwen2vl

ROOT = Path(__file__).resolve().parents[1]


def _single_process_training(checkpoint: Path, processor) -> tuple[list[list[float]], dict]:
    """What FSDP2 must reproduce: one model, the mean of both ranks' losses per step."""
    module = TVCModule(str(checkpoint), loss_chunk_size=8)
    module.model = load_model(checkpoint)
    module._prepare_model()
    batches = [rank_batch(processor, r) for r in range(2)]
    optimizer = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=LR)
    losses: list[list[float]] = [[], []]
    for _ in range(STEPS):
        per_rank = [module.loss(b)[0] for b in batches]
        (sum(per_rank) / 2).backward()  # FSDP averages gradients over ranks
        optimizer.step()
        optimizer.zero_grad()
        for r, loss in enumerate(per_rank):
            losses[r].append(float(loss.detach()))
    return losses, module.model.state_dict()


def test_fsdp2_sharded_load_training_and_synced_pvc(tmp_path, tiny_checkpoint, tiny):
    tied_checkpoint = save_tiny_qwen2vl(tmp_path / "tied", seed=1, tie_word_embeddings=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29519", str(ROOT / "tests" / "fsdp_worker.py"),
         str(tiny_checkpoint), str(tied_checkpoint), str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    model, processor = tiny

    # Loading: shards only, and together they are the checkpoint.
    full = sum(p.numel() for p in model.parameters())
    assert all(seen["local_params"] <= full // 2 + 64 for seen in ranks)
    expected = model.state_dict()
    assert state["loaded"].keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(state["loaded"][name], tensor, rtol=0, atol=0, msg=name)

    # Decoding: rank 0 decoded 10 tokens while rank 1 stopped at 3 and idled in step.
    assert_ranks_decoded_as_one_process(ranks, model, processor)

    # Training: the same losses and weights as one process on the averaged loss.
    losses, weights = _single_process_training(tiny_checkpoint, processor)
    for r, seen in enumerate(ranks):
        assert seen["losses"] == pytest.approx(losses[r], rel=1e-4, abs=1e-5)
        assert seen["losses"][-1] < seen["losses"][0]
    moved = 0
    for name, tensor in weights.items():
        torch.testing.assert_close(state["trained"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
        moved += not torch.equal(tensor, expected[name])
    assert moved > 0

    # Tied embeddings: lm_head and the embedding stay one parameter; its gradient through many
    # lm_head calls per step and the logits are those of one process.
    assert all(seen["tied_shares"] for seen in ranks)
    module = TVCModule(str(tied_checkpoint), loss_chunk_size=TIED_CHUNK)
    module.model = load_model(tied_checkpoint)
    module._prepare_model()
    (sum(module.loss(rank_batch(processor, r))[0] for r in range(2)) / 2).backward()
    torch.testing.assert_close(state["tied_grad"], module.model.lm_head.weight.grad)
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(state["tied_logits"], module(rank_batch(processor, 0)))


def test_model_parallel_strategy_fit_validate_and_export(tmp_path, tiny_checkpoint):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import Qwen2VLForConditionalGeneration

    root = tmp_path / "outputs" / "tiny"
    shutil.copytree(tiny_checkpoint, root / "model")
    write_split(root / "data", "train", 16, seed=0, per_shard=8, image_size=160)
    write_split(root / "data", "val", 4, seed=0, per_shard=4, image_size=160)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tvc_lightning", "fit", "--config", str(ROOT / "recipes" / "tiny.yaml"),
         "--trainer.devices", "2", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
         "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1",
         "--trainer.inference_mode", "false", "--data.num_workers", "1",
         # The 72B recipe's settings: bf16 gathers and compute, activation checkpointing.
         "--trainer.precision", "bf16-mixed", "--model.gradient_checkpointing", "true",
         *CALIBRATING],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (root / "wandb").glob("offline-run-*")
    rows = history(run_dir)
    assert_pvc_calibrated(rows)
    keys = {k for row in rows for k in row}
    for key in ("train/loss", "val/loss", "val/pvc_accuracy", "val/plain_accuracy"):
        assert key in keys, key

    # The sharded checkpoint exports to HF format with exactly its weights.
    ckpt = root / "checkpoints" / "last.ckpt"
    assert (ckpt / ".metadata").exists()  # a torch.distributed.checkpoint directory
    out = tmp_path / "exported"
    subprocess.run([sys.executable, "-m", "tvc_lightning", "export", str(ckpt), "--out", str(out),
                    "--dtype", "float32"], cwd=tmp_path, env=env, check=True, capture_output=True)
    exported = Qwen2VLForConditionalGeneration.from_pretrained(out).state_dict()
    dcp_to_torch_save(ckpt, tmp_path / "reference.pt")  # torch's own reader, everything in it
    saved = torch.load(tmp_path / "reference.pt", weights_only=False)["state_dict"]
    base = load_model(tiny_checkpoint).state_dict()
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, saved[f"model.{name}"], rtol=0, atol=0, msg=name)
        if name.startswith("model.visual."):  # frozen
            torch.testing.assert_close(tensor, base[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(exported["lm_head.weight"], base["lm_head.weight"])  # trained


def _fit_two_ranks(workdir: Path, name: str, ckpt_path: str | None = None) -> dict[int, tuple[float, float]]:
    """Six steps of the tiny recipe on 2 FSDP2 ranks; the first run checkpoints every step.
    Returns rank 0's ``{step: (loss, lr)}``."""
    if ckpt_path is None:
        callbacks = ("  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                     "      init_args: {dirpath: ckpts, every_n_train_steps: 1, save_top_k: -1,"
                     " filename: '{step}'}\n")
    else:
        callbacks = "  callbacks: []\n  enable_checkpointing: false\n"
    (workdir / f"{name}.yaml").write_text(
        "trainer:\n  max_steps: 6\n  devices: 2\n  log_every_n_steps: 1\n"
        "  enable_progress_bar: false\n  enable_model_summary: false\n"
        "  strategy:\n    class_path: lightning.pytorch.strategies.ModelParallelStrategy\n"
        "    init_args: {data_parallel_size: 2, tensor_parallel_size: 1}\n  inference_mode: false\n"
        "  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n"
        f"    init_args: {{save_dir: logs, name: {name}, version: ''}}\n{callbacks}"
        "data:\n  val_shards: null\n  batch_size: 2\n  num_workers: 2\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tvc_lightning", "fit", "--config", str(ROOT / "recipes" / "tiny.yaml"),
         "--config", f"{name}.yaml"] + (["--ckpt_path", ckpt_path] if ckpt_path else []),
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(workdir / "logs" / name / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {int(r["step"]): (float(r["train/loss"]), float(r["train/lr"])) for r in rows}


def test_fsdp2_resume_from_a_sharded_checkpoint_matches_the_uninterrupted_run(tmp_path, tiny_checkpoint):
    root = tmp_path / "outputs" / "tiny"
    shutil.copytree(tiny_checkpoint, root / "model")
    write_split(root / "data", "train", 16, seed=0, per_shard=4, image_size=160)  # 4 steps/epoch
    full = _fit_two_ranks(tmp_path, "full")
    assert sorted(full) == list(range(6))
    resumed = _fit_two_ranks(tmp_path, "resumed", "ckpts/step=3.ckpt")  # the epoch's last batch
    assert sorted(resumed) == [3, 4, 5]
    for step, values in resumed.items():
        assert values == pytest.approx(full[step], rel=1e-6, abs=1e-7), step


def test_inference_mode_is_refused_under_fsdp2_naming_the_setting(tiny_checkpoint):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    module = TVCModule(str(tiny_checkpoint))
    module._trainer = SimpleNamespace(strategy=ModelParallelStrategy(), precision="bf16-mixed",
                                      validate_loop=SimpleNamespace(inference_mode=True))
    with pytest.raises(ValueError, match="trainer.inference_mode"):
        module.configure_model()
    assert module.model is None


def test_tensor_parallelism_is_refused_naming_the_settings():
    from types import SimpleNamespace

    from tvc_lightning.fsdp import data_parallel_mesh

    # ModelParallelStrategy's defaults on 8 nodes x 8 GPUs: data 8 x tensor 8.
    mesh = {"data_parallel": SimpleNamespace(size=lambda: 8),
            "tensor_parallel": SimpleNamespace(size=lambda: 8)}
    with pytest.raises(ValueError, match="tensor_parallel_size=1 and data_parallel_size"):
        data_parallel_mesh(mesh)
    mesh["tensor_parallel"] = SimpleNamespace(size=lambda: 1)
    assert data_parallel_mesh(mesh) is mesh["data_parallel"]
