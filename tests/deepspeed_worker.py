"""One Lightning fit of the tiny model with DVR data, through Lightning's DeepSpeedStrategy on CPU
(run by tests/test_deepspeed.py in a fresh process: DeepSpeed and HF's ZeRO-3 config are
process-global), on DEVICES processes. Trains, then validates with PVC decoding (ranks kept in
step under ZeRO-3). Writes rank 0's per-batch training losses and what validation logged to
OUT/STAGE-DEVICES.json; stage 0 is the plain run (single device, or DDP) to compare with.

Lightning refuses DeepSpeed without CUDA in three places; ``CPUDeepSpeedStrategy`` bypasses only
those (the device check, the device-index check, and a device with an index for DeepSpeed's
engine), so everything else is Lightning's and DeepSpeed's own code path.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from tvc_lightning.callbacks import PVCGenerationCallback
from tvc_lightning.data.datamodule import TVCDataModule
from tvc_lightning.data.dvr import DVRTransform
from tvc_lightning.module import TVCModule
from tvc_lightning.pvc import PVCConfig

ACCUMULATE, STEPS = 3, 4


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)  # DeepSpeed's engine wants a device index

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips only the CUDA-accelerator check

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


class LoggedLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before Lightning imports deepspeed
    faulthandler.dump_traceback_later(240, exit=True)
    checkpoint, data_dir, stage, devices, out = sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:5]), \
        Path(sys.argv[5])
    if stage:
        strategy = CPUDeepSpeedStrategy(
            config={"zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True},
            process_group_backend="gloo")
    else:
        strategy = "auto" if devices == 1 else "ddp"
    module = TVCModule(checkpoint, loss_chunk_size=16, lr=2e-3,
                       generation=PVCConfig(max_new_tokens=8, min_new_tokens=8, every_n_tokens=4,
                                            periodic_at="token", min_gap=2, max_calibrations=1))
    data = TVCDataModule(checkpoint, str(data_dir / "train"), str(data_dir / "val"), batch_size=1,
                         num_workers=0, max_length=2048, dvr=DVRTransform(p=1.0, pool_kernel=2))
    losses = LoggedLosses()
    decode = PVCGenerationCallback(compare_plain=False, max_samples=2, batch_size=2,
                                   measure_attention=False)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS,
                        accumulate_grad_batches=ACCUMULATE, gradient_clip_val=1.0,
                        num_sanity_val_steps=0, val_check_interval=ACCUMULATE * STEPS,
                        check_val_every_n_epoch=None, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[losses, decode])
    trainer.fit(module, data)
    if trainer.global_rank == 0:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        (out / f"{stage}-{devices}.json").write_text(json.dumps({
            "losses": losses.losses, "val": metrics,
            "partitioned": any(hasattr(p, "ds_id") for p in module.model.parameters()),
        }))


if __name__ == "__main__":
    main()
