"""End to end: `python -m tvc_lightning fit --config recipes/tiny.yaml` trains and logs to W&B."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data_engine.synth import write_split
from tests.wandb_history import history
from tvc_lightning.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


@pytest.fixture
def tiny_workdir(tmp_path, tiny_checkpoint, monkeypatch):
    """A working directory laid out as the tiny recipe expects (`outputs/tiny/...`)."""
    root = tmp_path / "outputs" / "tiny"
    shutil.copytree(tiny_checkpoint, root / "model")
    write_split(root / "data", "train", 48, seed=0, per_shard=12, image_size=160)
    write_split(root / "data", "val", 8, seed=0, per_shard=8, image_size=160)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return root


def test_fit_tiny_recipe_loss_falls_and_wandb_run_has_metrics(tiny_workdir):
    main(["fit", "--config", str(RECIPE), "--trainer.max_epochs", "3",
          "--trainer.enable_progress_bar", "false"])
    (run_dir,) = (tiny_workdir / "wandb").glob("offline-run-*")
    rows = history(run_dir)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) >= 4
    assert losses[-1] < losses[0] - 1.0  # a random model starts near ln(vocab) ~ 6.3
    keys = {k for r in rows for k in r}
    for key in ("val/loss", "train/lr", "train/tokens_per_s_per_device",
                "train/dvr_injections_per_sample", "data/skipped_bad_tar", "data/skipped_too_long"):
        assert key in keys, key
    injections = [r["train/dvr_injections_per_sample"] for r in rows
                  if "train/dvr_injections_per_sample" in r]
    assert min(injections) >= 1  # p=1: every sample has a reflection point or the midpoint
    assert (tiny_workdir / "checkpoints" / "last.ckpt").exists()


def test_print_config_composes_and_overrides(tiny_workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(RECIPE), "--data.dvr.pool_kernel", "2", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "pool_kernel: 2" in printed
    # The checkpoint path is linked from the model to the data module, not repeated.
    assert "model_name_or_path: outputs/tiny/model" in printed


def test_missing_checkpoint_names_the_setting(tiny_workdir):
    with pytest.raises(FileNotFoundError, match="model.model_name_or_path"):
        main(["fit", "--config", str(RECIPE), "--model.model_name_or_path", "./nowhere",
              "--trainer.max_steps", "1"])


def test_validate_logs_pvc_and_plain_accuracy_and_table(tiny_workdir):
    main(["validate", "--config", str(RECIPE), "--trainer.enable_progress_bar", "false",
          "--model.generation.max_new_tokens", "24"])
    (run_dir,) = (tiny_workdir / "wandb").glob("offline-run-*")
    rows = history(run_dir)
    keys = {k for r in rows for k in r}
    for key in ("val/loss", "val/pvc_accuracy", "val/plain_accuracy",
                "val/pvc_calibrations_per_sample", "val/pvc_generated_tokens",
                "val/pvc_tokens_per_s", "val/visual_attention/pvc_original_bin0",
                "val/visual_attention/plain_original_bin7", "val/visual_attention/pvc_copy_bin7"):
        assert key in keys, key
    # The forgetting curve chart (a W&B line series, stored as a table behind a panel).
    assert any(r.get("val/visual_attention_curve_table/_type") == "table-file" for r in rows)
    table = next(r for r in rows if "val/pvc_samples/_type" in r)
    assert table["val/pvc_samples/_type"] == "table-file"
    assert table["val/pvc_samples/nrows"] == 8  # the recipe's 8 val samples (max_samples 16)


def test_predict_writes_one_json_line_per_sample(tiny_workdir):
    import json

    main(["predict", "--config", str(RECIPE), "--trainer.enable_progress_bar", "false",
          "--model.generation.max_new_tokens", "16"])
    lines = (tiny_workdir / "predictions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 8
    assert {r["id"] for r in records} == {f"synth-val-{i:06d}" for i in range(8)}
    assert all({"id", "response", "extracted", "calibrations"} <= set(r) for r in records)


def test_export_reloads_with_transformers_and_same_logits(tiny_workdir, tmp_path):
    import json

    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from tvc_lightning.module import TVCModule

    main(["fit", "--config", str(RECIPE), "--trainer.max_steps", "2",
          "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"])
    ckpt = tiny_workdir / "checkpoints" / "last.ckpt"
    out = tmp_path / "exported"
    main(["export", str(ckpt), "--out", str(out), "--dtype", "float32"])
    exported = Qwen2VLForConditionalGeneration.from_pretrained(out).eval()
    processor_config = json.loads((out / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "Qwen2VLProcessor"  # loadable by AutoProcessor
    module = TVCModule.load_from_checkpoint(ckpt, map_location="cpu")  # configure_model runs lazily
    module.configure_model()
    module.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    module.eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        theirs = exported(input_ids=ids).logits
        ours = module.model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours)
    base = Qwen2VLForConditionalGeneration.from_pretrained(tiny_workdir / "model").eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, theirs)  # training changed it


def test_distilled_shards_train_with_the_tiny_recipe(tiny_workdir, tmp_path):
    """The data engine's output is valid training input: distill (scripted teacher answering
    with the synth chains) -> shards -> `fit --config recipes/tiny.yaml` on them."""
    import json
    from collections import defaultdict

    from data_engine.__main__ import main as data_engine_main
    from tvc_lightning.data.shards import SkipCounter, load_split

    source = tiny_workdir / "data" / "train"
    records = load_split(str(source), SkipCounter(), world_size=1, rank=0)[:12]
    subset = tmp_path / "subset"
    write_split(subset, "train", 12, seed=0, per_shard=12, image_size=160)
    responses = defaultdict(list)
    for record, _ in records:
        responses[record.question].append([record.response])
    (tmp_path / "teacher.json").write_text(json.dumps({"responses": responses}))
    out = tmp_path / "distilled"
    assert data_engine_main([
        "distill", "--format", "records", "--input", str(subset / "train"), "--out", str(out),
        "--teacher", f"scripted:{tmp_path / 'teacher.json'}", "--tokenizer", "words",
        "--min-tokens", "0", "--concurrency", "1", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] == 12
    main(["fit", "--config", str(RECIPE), "--data.train_shards", str(out),
          "--data.val_shards", str(out), "--trainer.max_epochs", "1",
          "--trainer.enable_progress_bar", "false"])
    (run_dir,) = (tiny_workdir / "wandb").glob("offline-run-*")
    losses = [r["train/loss"] for r in history(run_dir) if "train/loss" in r]
    assert losses and all(loss == loss for loss in losses)


def test_generation_callback_runs_after_every_nth_epoch_and_always_in_validate():
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from tvc_lightning.callbacks import PVCGenerationCallback

    def trainer(fn, epoch, sanity=False):
        return SimpleNamespace(sanity_checking=sanity, state=SimpleNamespace(fn=fn), current_epoch=epoch)

    every5 = PVCGenerationCallback(every_n_epochs=5)
    fitting = [e for e in range(10) if every5.due(trainer(TrainerFn.FITTING, e))]
    assert fitting == [4, 9]  # with max_epochs 5: the last epoch only
    assert every5.due(trainer(TrainerFn.VALIDATING, 0))
    assert not every5.due(trainer(TrainerFn.FITTING, 4, sanity=True))
    every1 = PVCGenerationCallback()
    assert all(every1.due(trainer(TrainerFn.FITTING, e)) for e in range(3))
