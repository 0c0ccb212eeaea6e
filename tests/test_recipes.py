"""Recipes parse, keep one source of truth per setting, and describe the real model sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tvc_lightning.cli import main
from tvc_lightning.module import TVCModule

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# Qwen2-VL-{7B,72B}-Instruct's published architecture (their config.json), and the parameter
# counts of their model cards: 8.29B and 73.4B.
QWEN2_VL = {
    "7b": dict(hidden=3584, layers=28, heads=28, kv=4, inter=18944, billions=8.29, digits=2),
    "72b": dict(hidden=8192, layers=80, heads=64, kv=8, inter=29568, billions=73.4, digits=1),
}


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipe_parses_and_composes(recipe, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(RECIPES / recipe), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    # Set once on the model; the data module's copy is a link, not a second setting.
    assert printed["model"]["model_name_or_path"]
    assert "model_name_or_path" not in printed["data"]


def test_print_config_output_is_yaml_even_where_deepspeed_logs():
    # A fresh process: DeepSpeed prints its accelerator notice when first imported.
    proc = subprocess.run(
        [sys.executable, "-m", "tvc_lightning", "fit", "--config", str(RECIPES / "72b.yaml"),
         "--print_config"], cwd=RECIPES.parent, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load(proc.stdout)["trainer"]["strategy"]["class_path"].endswith("DeepSpeedStrategy")


@pytest.mark.parametrize("size", ["7b", "72b"])
def test_big_recipes_match_tvc_setup(size):
    recipe = yaml.safe_load((RECIPES / f"{size}.yaml").read_text())
    trainer, model, data = recipe["trainer"], recipe["model"], recipe["data"]
    global_batch = (data["batch_size"] * trainer["accumulate_grad_batches"] * trainer["devices"]
                    * trainer["num_nodes"])
    assert global_batch == 256
    assert data["train_samples"] % global_batch == 0  # whole optimizer steps per epoch
    (saver,) = [c["init_args"] for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    total_steps = data["train_samples"] // global_batch * trainer["max_epochs"]
    assert total_steps % saver["every_n_train_steps"] == 0  # last.ckpt ends up the final model
    assert "Global batch = batch_size 1 x accumulate_grad_batches 4 x 8 GPUs x 8 nodes = 256" in (
        RECIPES / f"{size}.yaml").read_text()
    assert trainer["precision"] == "bf16-mixed" and trainer["gradient_clip_val"] == 1.0
    assert trainer["max_epochs"] == 5 and model["lr"] == 2e-5 and model["warmup_ratio"] == 0.1
    assert model["freeze"] == ["visual"] and model["gradient_checkpointing"] is True
    assert data["max_length"] == 8192 and data["max_pixels"] == 512 * 512
    ds_config = Path(trainer["strategy"]["init_args"]["config"])
    ds = json.loads((RECIPES.parent / ds_config).read_text())
    # The DeepSpeed JSON holds ZeRO settings only: precision, accumulation, clipping are the Trainer's.
    assert list(ds) == ["zero_optimization"]
    assert ds["zero_optimization"]["stage"] == (3 if size == "72b" else 2)


@pytest.mark.parametrize("size", ["7b", "72b"])
def test_real_sizes_build_on_meta_device(size):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    s = QWEN2_VL[size]
    config = Qwen2VLConfig(
        text_config=dict(hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                         intermediate_size=s["inter"], vocab_size=152064),
        vision_config=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4,
                           hidden_size=s["hidden"]),
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing allocated
    total = sum(p.numel() for p in model.parameters())
    visual = sum(p.numel() for p in model.model.visual.parameters())
    assert round(total / 1e9, s["digits"]) == s["billions"]
    assert 0.6e9 < visual < 0.7e9  # the 675M-parameter ViT with its merger
    # TVC trains everything but the vision tower (merger included): the module's freeze does so.
    module = TVCModule("unused", freeze=["visual"])
    module.model = model
    module._apply_freeze()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == total - visual
    assert not any(p.requires_grad for p in model.model.visual.merger.parameters())


def _import(path: str):
    module, _, name = path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def test_fsdp_recipe_builds_its_strategy_sharding_over_every_process():
    # Built as the CLI would (the Trainer would want 64 processes).
    recipe = yaml.safe_load((RECIPES / "72b_fsdp.yaml").read_text())
    spec, trainer = recipe["trainer"]["strategy"], recipe["trainer"]
    strategy = _import(spec["class_path"])(**spec["init_args"])
    assert type(strategy).__name__ == "ModelParallelStrategy"
    assert strategy._data_parallel_size == trainer["devices"] * trainer["num_nodes"]
    assert strategy._tensor_parallel_size == 1
    assert trainer["inference_mode"] is False  # TVCModule refuses it under FSDP2
    assert recipe["model"]["gradient_checkpointing"] is True  # the model's switch, not FSDP's


@pytest.mark.parametrize("size", ["7b", "72b"])
def test_deepspeed_recipe_builds_its_strategy(size):
    pytest.importorskip("deepspeed", reason="deepspeed is not part of the CPU set-up (pip install deepspeed)")
    recipe = yaml.safe_load((RECIPES / f"{size}.yaml").read_text())
    spec = recipe["trainer"]["strategy"]
    strategy = _import(spec["class_path"])(config=str(RECIPES.parent / spec["init_args"]["config"]))
    assert strategy.config["zero_optimization"]["stage"] == (3 if size == "72b" else 2)


@pytest.mark.parametrize("name", ["7b.yaml", "72b.yaml", "72b_fsdp.yaml"])
def test_big_recipes_decode_validation_samples_as_one_batch_per_rank(name):
    # Sharded decoding pays a full weight gather per step, whatever the batch (docs/scaling.md).
    recipe = yaml.safe_load((RECIPES / name).read_text())
    (callback,) = [c["init_args"] for c in recipe["trainer"]["callbacks"]
                   if c["class_path"].endswith("PVCGenerationCallback")]
    assert callback["batch_size"] >= callback["max_samples"]
    if name.startswith("72b"):  # one PVC pass, after the last epoch
        assert callback["compare_plain"] is False
        assert callback["every_n_epochs"] == recipe["trainer"]["max_epochs"]


@pytest.mark.parametrize("name", ["7b.yaml", "72b.yaml", "72b_fsdp.yaml"])
def test_big_recipes_train_exact_epochs_with_nothing_left_out(name):
    recipe = yaml.safe_load((RECIPES / name).read_text())
    trainer, data = recipe["trainer"], recipe["data"]
    # Resampling draws shards with replacement: an "epoch" would see ~60% of the data.
    assert data["resampled"] is False

    from tvc_lightning.data.epochs import EpochSplit

    ranks = trainer["devices"] * trainer["num_nodes"]
    # TVC's data in 1,000-sample shards; the split the 64 ranks x 4 workers read.
    split = EpochSplit([1000] * 345 + [88], ranks * data["num_workers"], multiple=data["batch_size"])
    assert split.kept == split.total == data["train_samples"]
    batches_per_rank = split.per_reader * data["num_workers"] // data["batch_size"]
    assert batches_per_rank % trainer["accumulate_grad_batches"] == 0  # DeepSpeed's whole steps
    assert batches_per_rank // trainer["accumulate_grad_batches"] == data["train_samples"] // 256
