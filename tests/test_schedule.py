"""The learning-rate schedule (:func:`tvc_lightning.schedule.cosine_with_warmup`): values pinned by
hand, and a Lightning fit of the tiny model that uses them step by step."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

from tvc_lightning.schedule import cosine_with_warmup


def _cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The decay written out independently: cos from 1 at the end of warmup to min_ratio at total."""
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2


def test_warmup_peak_and_cosine_by_hand():
    f = cosine_with_warmup(10, 0.2, min_ratio=0.1)  # 2 warmup steps, 8 of cosine
    # Warmup climbs linearly on the line through 0 at step -1: the first step already gets
    # lr / (warmup + 1), so no optimizer step is spent at lr 0.
    assert f(0) == pytest.approx(1 / 3) and f(1) == pytest.approx(2 / 3)
    assert f(2) == 1.0  # the peak, at the end of warmup
    assert f(6) == pytest.approx(0.55)  # half way through the cosine: (1 + 0.1) / 2
    assert f(10) == pytest.approx(0.1) and f(12) == pytest.approx(0.1)  # min_ratio, then held
    for step, value in ((3, 0.96574579), (4, 0.86819805), (8, 0.23180195)):  # worked out by hand
        assert f(step) == pytest.approx(value, abs=1e-8)
    for step in range(2, 13):
        assert f(step) == pytest.approx(_cosine(step, 2, 10, 0.1), rel=1e-12)
    values = [f(s) for s in range(12)]
    assert values[:3] == sorted(values[:3]) and values[2:] == sorted(values[2:], reverse=True)


def test_no_warmup_zero_floor_and_rounding_up():
    f = cosine_with_warmup(4, 0.0)
    assert [f(s) for s in range(5)] == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                                      (1 + math.cos(3 * math.pi / 4)) / 2, 0.0])
    g = cosine_with_warmup(10, 0.15)  # 1.5 warmup steps round up to 2
    assert [g(0), g(1), g(2)] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_warmup_length_is_not_lengthened_by_float_error():
    f = cosine_with_warmup(100, 0.07)
    assert f(6) == pytest.approx(7 / 8) and f(7) == 1.0


# --- a tiny Lightning fit ------------------------------------------------------------------------

LR, STEPS, WARMUP_RATIO, MIN_RATIO = 1e-3, 5, 0.4, 0.1  # 2 warmup steps, 3 of cosine


class _StepLR(L.Callback):
    """The learning rate each optimizer step is taken with."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: object) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def tiny_fit(tmp_path_factory, tiny_checkpoint) -> tuple[list[float], dict[int, float]]:
    """Five optimizer steps of the tiny model (batch 1, a 6-sample epoch): the learning rates
    the steps used and the ``train/lr`` logged per step."""
    from data_engine.synth import write_split
    from tvc_lightning.data.datamodule import TVCDataModule
    from tvc_lightning.data.dvr import DVRTransform
    from tvc_lightning.module import TVCModule

    tmp = tmp_path_factory.mktemp("schedule")
    write_split(tmp, "train", 6, seed=3, per_shard=6, image_size=96)
    module = TVCModule(str(tiny_checkpoint), lr=LR, warmup_ratio=WARMUP_RATIO,
                       min_lr_ratio=MIN_RATIO, loss_chunk_size=64)
    data = TVCDataModule(str(tiny_checkpoint), str(tmp / "train"), batch_size=1, num_workers=0,
                         max_length=2048, dvr=DVRTransform(p=0.0))
    used = _StepLR()
    L.Trainer(accelerator="cpu", max_steps=STEPS, limit_val_batches=0, log_every_n_steps=1,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              logger=CSVLogger(tmp, name="log", version=""), callbacks=[used]).fit(module, data)
    with open(tmp / "log" / "metrics.csv") as f:
        logged = {int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(f) if r.get("train/lr")}
    return used.lrs, logged


def _expected() -> list[float]:
    return [LR * v for v in (1 / 3, 2 / 3, 1.0, _cosine(3, 2, STEPS, MIN_RATIO),
                             _cosine(4, 2, STEPS, MIN_RATIO))]


def test_fit_steps_with_the_scheduled_learning_rates(tiny_fit):
    used, _ = tiny_fit
    assert used == pytest.approx(_expected(), rel=1e-12)  # 1/3, 2/3, 1, 0.775, 0.325 of the peak


def test_fit_logs_the_learning_rate_each_step_used(tiny_fit):
    _, logged = tiny_fit
    assert sorted(logged) == list(range(STEPS))
    assert [logged[k] for k in range(STEPS)] == pytest.approx(_expected(), rel=1e-6)  # float32 log
