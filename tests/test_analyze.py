"""``python -m tvc_lightning analyze`` on the tiny model: the forgetting measurement (CSV, PNG,
W&B) and the image-removal curve, and the validation callback's per-layer curves."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image

from data_engine.synth import write_split
from tests.wandb_history import history
from tvc_lightning.analyze.cli import main
from tvc_lightning.pvc import PVCConfig, pvc_generate

LAYERS = 2  # the tiny model's decoder layers
# Calibrations at fixed places whatever the random model writes: every 6 tokens, 20 per answer.
GENERATION = ["--generation.max_new_tokens", "20", "--generation.min_new_tokens", "20",
              "--generation.every_n_tokens", "6", "--generation.periodic_at", "token",
              "--generation.min_gap", "4", "--generation.reset", "visual"]


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    write_split(out, "val", 3, seed=5, per_shard=8, image_size=112)
    return out / "val"


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _is_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_forgetting_writes_per_layer_shares_and_logs_to_wandb(tiny_checkpoint, val_shards,
                                                              tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "forgetting"
    main(["forgetting", "--checkpoint", str(tiny_checkpoint), "--data", str(val_shards), "--out",
          str(out), "--batch_size", "2", "--bins", "4", "--wandb_project", "tvc-test", *GENERATION])
    summary = json.loads(capsys.readouterr().out)
    rows = _csv(out / "forgetting.csv")
    # 20 tokens: 19 measured decode steps (the first token comes from the prefill), per layer.
    assert summary["rows"] == len(rows) == 3 * 2 * 19 * LAYERS
    for row in rows:
        original, copy = float(row["original"]), float(row["copy"])
        assert 0 <= original <= 1 and 0 <= copy <= 1 and original + copy <= 1 + 1e-6
    for sample in range(3):
        plain = [r for r in rows if r["mode"] == "plain" and r["sample"] == str(sample)]
        pvc = [r for r in rows if r["mode"] == "pvc" and r["sample"] == str(sample)]
        assert all(float(r["original"]) > 0 and float(r["copy"]) == 0 for r in plain)
        assert not any(r["calibration"] == "1" for r in plain)
        calibrated = sorted({int(r["step"]) for r in pvc if r["calibration"] == "1"})
        assert calibrated == [6, 12, 18]  # every 6 tokens, no rollback
        for r in pvc:
            after = int(r["step"]) >= calibrated[0]
            # reset: visual hides the original image exactly from the first calibration on.
            assert (float(r["original"]) == 0) == after and (r["hidden"] == "1") == after
            assert (float(r["copy"]) > 0) == after
        assert sorted({int(r["layer"]) for r in pvc}) == list(range(LAYERS))
    curve = _csv(out / "forgetting_curve.csv")
    assert len(curve) == 2 * LAYERS * 4 and {r["samples"] for r in curve} == {"3"}
    late = [r for r in curve if r["mode"] == "pvc" and r["bin"] == "3"]
    assert all(float(r["original"]) == 0 and float(r["copy"]) > 0 for r in late)
    _is_png(out / "forgetting.png")
    logged = {k: v for row in history(summary["wandb_dir"]) for k, v in row.items()}
    assert logged["forgetting/per_layer/_type"] == "table-file"
    assert logged["forgetting/per_layer/nrows"] == 2 * LAYERS * 4
    assert logged["forgetting/figure/_type"] == "image-file"
    assert logged["forgetting/curve_table/_type"] == "table-file"  # the line chart's data


def test_removal_curve_r1_equals_the_unmodified_decode(tiny, tiny_checkpoint, val_shards,
                                                       tmp_path, capsys):
    out = tmp_path / "removal"
    main(["removal", "--checkpoint", str(tiny_checkpoint), "--data", str(val_shards), "--out",
          str(out), "--grid", "[0, 0.5, 1]", "--generation.max_new_tokens", "16"])
    summary = json.loads(capsys.readouterr().out)
    rows = _csv(out / "removal.csv")
    assert len(rows) == 3 * 3
    by_r = {r: [row for row in rows if float(row["r"]) == r] for r in (0, 0.5, 1)}
    # The baseline is an independent plain decode of the same samples.
    from tvc_lightning.data.shards import load_split
    from tvc_lightning.data.skips import SkipCounter

    model, processor = tiny
    samples = load_split(str(val_shards), SkipCounter(), world_size=1, rank=0)
    plain = pvc_generate(model, processor, [s.question for s, _ in samples],
                         [images for _, images in samples],
                         PVCConfig(max_calibrations=0, max_new_tokens=16))
    assert [int(r["baseline_tokens"]) for r in by_r[1]] == [p.num_generated for p in plain]
    assert all(r["hide_step"] == r["baseline_tokens"] and r["same_as_baseline"] == "1"
               for r in by_r[1])
    assert all(r["hide_step"] == "0" for r in by_r[0])
    assert [int(r["hide_step"]) for r in by_r[0.5]] == [int(p.num_generated * 0.5 + 0.5)
                                                          for p in plain]
    assert any(r["same_as_baseline"] == "0" for r in by_r[0])  # hiding did change the answers
    curve = _csv(out / "removal_curve.csv")
    assert [r["r"] for r in curve] == ["0.0", "0.5", "1.0", "baseline"]
    assert curve[2]["accuracy"] == curve[3]["accuracy"] and curve[2]["same_as_baseline"] == "1.0"
    assert summary["accuracy"]["1.0"] == summary["baseline_accuracy"]
    _is_png(out / "removal.png")


def test_flag_errors_name_the_flag(tiny_checkpoint, val_shards, tmp_path):
    base = ["--checkpoint", str(tiny_checkpoint), "--data", str(val_shards), "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="forgetting or removal"):
        main(["attention"])
    with pytest.raises(SystemExit, match="--grid"):
        main(["removal", *base, "--grid", "[0, 1.5]"])
    with pytest.raises(SystemExit, match="--modes"):
        main(["forgetting", *base, "--modes", "[beam]"])
    with pytest.raises(SystemExit, match="--data"):
        main(["forgetting", *base[:2], "--data", str(tmp_path / "missing"), "--out", str(tmp_path)])


class _Recorder(WandbLogger):
    """A WandbLogger whose run only records what is logged (no W&B process)."""

    def __init__(self) -> None:
        super().__init__(offline=True)
        self.logged: list[dict] = []

    @property
    def experiment(self):
        return SimpleNamespace(log=self.logged.append)


def _validate_with(callback, model, processor, val_shards):
    """Run the callback's end-of-validation decode on a stand-in trainer and module."""
    from tvc_lightning.data.shards import load_split
    from tvc_lightning.data.skips import SkipCounter
    from tvc_lightning.data.tokenize import ChatFormat

    logger, scalars = _Recorder(), {}
    records = load_split(str(val_shards), SkipCounter(), world_size=1, rank=0)
    datamodule = SimpleNamespace(val_records=records, processor=processor,
                                 encoder=SimpleNamespace(chat=ChatFormat()))
    trainer = SimpleNamespace(
        sanity_checking=False, state=SimpleNamespace(fn=TrainerFn.VALIDATING), datamodule=datamodule,
        precision_plugin=SimpleNamespace(forward_context=torch.no_grad), loggers=[logger],
        global_rank=0, global_step=7)
    module = SimpleNamespace(
        model=model, device=torch.device("cpu"),
        generation=PVCConfig(max_new_tokens=16, min_new_tokens=16, every_n_tokens=5,
                             periodic_at="token", min_gap=3),
        log=lambda key, value, **_: scalars.__setitem__(key, float(value)))
    callback.on_validation_epoch_end(trainer, module)
    return logger.logged, scalars


def test_callback_per_layer_curves_are_optional(tiny, val_shards):
    from tvc_lightning.callbacks import PVCGenerationCallback

    model, processor = tiny
    off, off_scalars = _validate_with(PVCGenerationCallback(curve_bins=4), model, processor,
                                      val_shards)
    on, on_scalars = _validate_with(PVCGenerationCallback(curve_bins=4, per_layer=True), model,
                                    processor, val_shards)
    # The same scalar keys and values (but the timings): per-layer adds no scalars.
    assert on_scalars.keys() == off_scalars.keys()
    assert {k: v for k, v in on_scalars.items() if not k.endswith("tokens_per_s")} == {
        k: v for k, v in off_scalars.items() if not k.endswith("tokens_per_s")}
    assert not any("val/visual_attention_per_layer" in entry for entry in off)
    (entry,) = [e for e in on if "val/visual_attention_per_layer" in e]
    table = entry["val/visual_attention_per_layer"]
    assert table.columns == ["mode", "layer", "bin", "original", "copy"]
    assert len(table.data) == 2 * LAYERS * 4
    values = {(m, lay, b): (o, c) for m, lay, b, o, c in table.data}
    for mode in ("pvc", "plain"):
        # The layer mean of the per-layer table is the logged layer-averaged scalar.
        for b in range(4):
            mean = sum(values[(mode, lay, b)][0] for lay in range(LAYERS)) / LAYERS
            assert mean == pytest.approx(on_scalars[f"val/visual_attention/{mode}_original_bin{b}"],
                                         rel=1e-5, abs=1e-7)
    assert values[("pvc", 0, 3)][0] == 0 and values[("pvc", 0, 3)][1] > 0
    assert values[("plain", 1, 3)][0] > 0 and values[("plain", 1, 3)][1] == 0
    image = entry["val/visual_attention_heatmap"].image
    assert image.width > 300
