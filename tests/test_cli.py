"""End to end: `python -m tvc_lightning fit --config recipes/tiny.yaml` trains and logs to W&B."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data_engine.synth import write_split
from tests.conftest import CALIBRATING, assert_pvc_calibrated
from tests.wandb_history import config as wandb_config
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
    with pytest.warns(UserWarning, match="no --ckpt_path"):
        main(["validate", "--config", str(RECIPE), "--trainer.enable_progress_bar", "false", *CALIBRATING])
    (run_dir,) = (tiny_workdir / "wandb").glob("offline-run-*")
    rows = history(run_dir)
    assert_pvc_calibrated(rows)
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

    from tvc_lightning.pvc import PVCConfig

    def predict(*extra: str) -> dict[str, dict]:
        with pytest.warns(UserWarning, match="no --ckpt_path"):
            main(["predict", "--config", str(RECIPE), "--trainer.enable_progress_bar", "false",
                  *CALIBRATING, *extra])
        lines = (tiny_workdir / "predictions.jsonl").read_text().splitlines()
        return {r["id"]: r for r in map(json.loads, lines)}

    records = predict()
    assert len(records) == 8
    assert set(records) == {f"synth-val-{i:06d}" for i in range(8)}
    assert all({"id", "response", "extracted", "calibrations"} <= set(r) for r in records.values())
    plain = predict("--model.generation.max_calibrations", "0")
    bridge = PVCConfig().bridges[0]
    for key, record in records.items():
        assert [c["step"] for c in record["calibrations"]] == [6, 12]  # the recipe's max_calibrations: 2
        assert bridge in record["response"] and bridge not in plain[key]["response"]
        assert plain[key]["calibrations"] == [] and record["response"] != plain[key]["response"]


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
    # The base checkpoint's generation config as it was: both stop tokens (a list), not one.
    source = json.loads((tiny_workdir / "model" / "generation_config.json").read_text())
    copied = json.loads((out / "generation_config.json").read_text())
    assert copied == source and isinstance(copied["eos_token_id"], list)
    assert exported.generation_config.eos_token_id == source["eos_token_id"]
    _assert_auto_processor_loads(out, tiny_workdir / "model")
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


def _assert_auto_processor_loads(exported: Path, base: Path) -> None:
    """HF's AutoProcessor finds everything Qwen2VLProcessor reads in ``exported`` (its video
    processor entry too) and, given torchvision, tokenizes as the project's processor does."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available
    from transformers.video_processing_utils import BaseVideoProcessor

    from tests.conftest import random_image
    from tvc_lightning.hf import load_processor

    video, _ = BaseVideoProcessor.get_video_processor_dict(str(exported))
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    if not is_torchvision_available():
        # HF's Qwen2VLProcessor cannot be built at all without torchvision: say so, no file error.
        with pytest.raises(ImportError, match="(?i)torchvision"):
            AutoProcessor.from_pretrained(exported)
        return
    theirs = AutoProcessor.from_pretrained(exported)
    ours = load_processor(base)
    text = "<|vision_start|><|image_pad|><|vision_end|>How many?"
    image = random_image(112, 84)
    assert (theirs(text=[text], images=[image], return_tensors="pt")["input_ids"].tolist()
            == ours(text=[text], images=[image], return_tensors="pt")["input_ids"].tolist())


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


def test_fit_again_refuses_the_old_checkpoints_and_wandb_config_is_the_whole_config(tiny_workdir):
    args = ["fit", "--config", str(RECIPE), "--trainer.max_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"]
    main(args)
    folder = tiny_workdir / "checkpoints"
    assert (folder / "last.ckpt").exists()
    assert "pool_kernel: 4" in (folder / "config.yaml").read_text()  # the run's own config
    (run_dir,) = (tiny_workdir / "wandb").glob("offline-run-*")
    config = wandb_config(run_dir)
    assert "data" in config, sorted(config)
    assert config["data"]["dvr"]["max_injections"] == 2
    assert config["model"]["generation"]["every_n_tokens"] == 48
    assert config["trainer"]["max_steps"] == 1
    with pytest.raises(FileExistsError, match=r"already holds .*last\.ckpt.*--ckpt_path"):
        main(args + ["--model.lr", "1e-3"])
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "last.ckpt"]
    # Continuing the same run is fine, and writes last.ckpt again.
    main(args[:4] + ["2"] + args[5:] + ["--ckpt_path", str(folder / "last.ckpt")])
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "last.ckpt"]


def test_nonfinite_loss_stops_fit_with_an_error_and_no_checkpoint(tiny_workdir):
    from safetensors.torch import load_file, save_file

    weights = tiny_workdir / "model" / "model.safetensors"
    state = load_file(weights)
    (norm,) = [k for k in state if k in ("model.norm.weight", "model.language_model.norm.weight")]
    state[norm] = state[norm] * 1e38  # finite weights, overflowing logits: NaN cross-entropy
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(FloatingPointError, match=r"not finite.*model\.max_nonfinite_losses=0"):
        main(["fit", "--config", str(RECIPE), "--trainer.max_steps", "3",
              "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"])
    assert not (tiny_workdir / "checkpoints" / "last.ckpt").exists()


def test_predict_skips_control_token_questions_and_warns_without_checkpoint(tiny_workdir):
    import json
    from dataclasses import replace

    from data_engine.shards import ShardWriter, encode_image
    from data_engine.synth import make_sample

    bad = tiny_workdir / "data" / "bad"
    with ShardWriter(bad, "bad", maxcount=8) as w:
        for i, question in enumerate(["How many?<|im_end|>", "Count <|image_pad|> shapes.", None]):
            key, record, image, _, fmt = make_sample(0, "val", i, 160)
            if question is not None:
                record = replace(record, question=question)
            w.write(key, record, [encode_image(image, fmt)[1]])
    with pytest.warns(UserWarning) as caught:
        main(["predict", "--config", str(RECIPE), "--trainer.enable_progress_bar", "false",
              "--data.val_shards", str(bad), "--model.generation.max_new_tokens", "8"])
    messages = [str(w.message) for w in caught]
    assert any("no --ckpt_path" in m and "model.model_name_or_path='outputs/tiny/model'" in m
               for m in messages), messages
    assert any("2 of 3 samples skipped (control_token: 2)" in m for m in messages), messages
    rows = [json.loads(line) for line in
            (tiny_workdir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    skipped = sorted(r["skipped"] for r in rows if "skipped" in r)
    assert skipped == ["control_token: <|im_end|>", "control_token: <|image_pad|>"]
    assert sum("response" in r for r in rows) == 1


def test_test_subcommand_is_gone_and_points_to_validate(tiny_workdir):
    from tvc_lightning.cli import TVCLightningCLI
    from tvc_lightning.module import TVCModule

    with pytest.raises(SystemExit, match="validate"):
        main(["test", "--config", str(RECIPE)])
    assert "test" not in TVCLightningCLI.subcommands()
    assert "validate" in TVCLightningCLI.subcommands()
    assert "test_step" not in vars(TVCModule)


def test_skipping_nonfinite_steps_is_refused_with_accumulation(tiny_workdir):
    """A skipped micro-batch mid-window would still let the window's other gradients update the
    weights (under DDP, each rank its own): refused before training starts."""
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        main(["fit", "--config", str(RECIPE), "--trainer.max_steps", "1", "--trainer.enable_progress_bar",
              "false", "--trainer.limit_val_batches", "0", "--model.max_nonfinite_losses", "1",
              "--trainer.accumulate_grad_batches", "2"])
