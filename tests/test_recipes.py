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

# Qwen2.5-VL-{7B,72B}-Instruct (their config.json): the language model has Qwen2-VL's shapes (and
# vocabulary); the vision tower is new (window attention, RMSNorm, SwiGLU MLP), its merger projecting
# to the LM's width. Measured on the meta device below (transformers 5.24): 7B 8,292,166,656 total,
# 676,550,144 vision tower; 72B 73,406,351,360 total, 700,147,712 vision tower. Pinned in billions.
QWEN25_VL = {
    "7b": dict(total=8.29, visual=0.68, trained=7.62, digits=2),
    "72b": dict(total=73.4, visual=0.70, trained=72.7, digits=1),
}

# The DeepSpeed recipes and their ZeRO stage; the Qwen2.5-VL ones are the Qwen2-VL ones on a new base.
DEEPSPEED_RECIPES = {"7b.yaml": 2, "72b.yaml": 3, "qwen25vl_7b.yaml": 2, "qwen25vl_72b.yaml": 3}
QWEN25_VL_RECIPES = {"qwen25vl_7b.yaml": "7b.yaml", "qwen25vl_72b.yaml": "72b.yaml"}
BIG_RECIPES = [*DEEPSPEED_RECIPES, "72b_fsdp.yaml"]


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


@pytest.mark.parametrize("name", list(DEEPSPEED_RECIPES))
def test_big_recipes_match_tvc_setup(name):
    recipe = yaml.safe_load((RECIPES / name).read_text())
    trainer, model, data = recipe["trainer"], recipe["model"], recipe["data"]
    global_batch = (data["batch_size"] * trainer["accumulate_grad_batches"] * trainer["devices"]
                    * trainer["num_nodes"])
    assert global_batch == 256
    assert data["train_samples"] % global_batch == 0  # whole optimizer steps per epoch
    (saver,) = [c["init_args"] for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    total_steps = data["train_samples"] // global_batch * trainer["max_epochs"]
    assert total_steps % saver["every_n_train_steps"] == 0  # last.ckpt ends up the final model
    assert "Global batch = batch_size 1 x accumulate_grad_batches 4 x 8 GPUs x 8 nodes = 256" in (
        RECIPES / name).read_text()
    assert trainer["precision"] == "bf16-mixed" and trainer["gradient_clip_val"] == 1.0
    assert trainer["max_epochs"] == 5 and model["lr"] == 2e-5 and model["warmup_ratio"] == 0.1
    assert model["freeze"] == ["visual"] and model["gradient_checkpointing"] is True
    assert data["max_length"] == 8192 and data["max_pixels"] == 512 * 512
    ds_config = Path(trainer["strategy"]["init_args"]["config"])
    ds = json.loads((RECIPES.parent / ds_config).read_text())
    # The DeepSpeed JSON holds ZeRO settings only: precision, accumulation, clipping are the Trainer's.
    assert list(ds) == ["zero_optimization"]
    assert ds["zero_optimization"]["stage"] == DEEPSPEED_RECIPES[name]


@pytest.mark.parametrize("name", list(QWEN25_VL_RECIPES))
def test_qwen25vl_recipes_are_the_qwen2vl_recipes_on_another_checkpoint(name):
    new = yaml.safe_load((RECIPES / name).read_text())
    old = yaml.safe_load((RECIPES / QWEN25_VL_RECIPES[name]).read_text())
    size = QWEN25_VL_RECIPES[name].removesuffix(".yaml")
    # The family comes from the checkpoint's config.json (model_type qwen2_5_vl): no setting names it.
    assert "model_type qwen2_5_vl" in (RECIPES / name).read_text()
    assert new["model"].pop("model_name_or_path") == f"checkpoints/Qwen2.5-VL-{size.upper()}-Instruct"
    assert old["model"].pop("model_name_or_path") == f"checkpoints/Qwen2-VL-{size.upper()}-Instruct"
    # Their own outputs and run name, so the two runs never write into each other's directories.
    outputs = {"new": f"outputs/qwen25vl_{size}", "old": f"outputs/{size}"}
    runs = {"new": f"tvc-qwen25vl-{size}", "old": f"tvc-{size}"}
    for key, recipe in (("new", new), ("old", old)):
        trainer = recipe["trainer"]
        assert trainer.pop("default_root_dir") == outputs[key]
        logger = trainer["logger"]["init_args"]
        assert logger.pop("save_dir") == outputs[key] and logger.pop("name") == runs[key]
        (saver,) = [c["init_args"] for c in trainer["callbacks"]
                    if c["class_path"].endswith("ModelCheckpoint")]
        assert saver.pop("dirpath") == f"{outputs[key]}/checkpoints"
    assert new == old  # everything else: TVC's setup, unchanged


def _qwen2_vl_on_meta(size):
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
        return Qwen2VLForConditionalGeneration(config)


def _frozen_like_tvc(model):
    """TVC trains everything but the vision tower (merger included): the module's freeze does so."""
    module = TVCModule("unused", freeze=["visual"])
    module.model = model
    module._apply_freeze()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _trained_shapes(model):
    return [p.shape for p in [*model.model.language_model.parameters(), model.lm_head.weight]]


@pytest.mark.parametrize("size", ["7b", "72b"])
def test_real_sizes_build_on_meta_device(size):
    s = QWEN2_VL[size]
    model = _qwen2_vl_on_meta(size)
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing allocated
    total = sum(p.numel() for p in model.parameters())
    visual = sum(p.numel() for p in model.model.visual.parameters())
    assert round(total / 1e9, s["digits"]) == s["billions"]
    assert 0.6e9 < visual < 0.7e9  # the 675M-parameter ViT with its merger
    assert _frozen_like_tvc(model) == total - visual
    assert not any(p.requires_grad for p in model.model.visual.merger.parameters())


@pytest.mark.parametrize("size", ["7b", "72b"])
def test_qwen25vl_real_sizes_build_on_meta_device(size):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    s, lm = QWEN25_VL[size], QWEN2_VL[size]
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=lm["hidden"], num_hidden_layers=lm["layers"],
                         num_attention_heads=lm["heads"], num_key_value_heads=lm["kv"],
                         intermediate_size=lm["inter"], vocab_size=152064),
        # Given in full: the library's vision default hidden_size (3584) is not the checkpoints' 1280.
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=lm["hidden"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                           hidden_act="silu"),
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing allocated
    total = sum(p.numel() for p in model.parameters())
    visual = sum(p.numel() for p in model.model.visual.parameters())
    assert round(total / 1e9, s["digits"]) == s["total"]
    assert round(visual / 1e9, 2) == s["visual"]
    assert round((total - visual) / 1e9, s["digits"]) == s["trained"]
    assert _frozen_like_tvc(model) == total - visual
    assert not any(p.requires_grad for p in model.model.visual.merger.parameters())
    # The trained part has Qwen2-VL's shapes: the same language model and head, tensor for tensor.
    assert _trained_shapes(model) == _trained_shapes(_qwen2_vl_on_meta(size))


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


@pytest.mark.parametrize("name", list(DEEPSPEED_RECIPES))
def test_deepspeed_recipe_builds_its_strategy(name):
    pytest.importorskip("deepspeed", reason="deepspeed is not part of the CPU set-up (pip install deepspeed)")
    recipe = yaml.safe_load((RECIPES / name).read_text())
    spec = recipe["trainer"]["strategy"]
    strategy = _import(spec["class_path"])(config=str(RECIPES.parent / spec["init_args"]["config"]))
    assert strategy.config["zero_optimization"]["stage"] == DEEPSPEED_RECIPES[name]


@pytest.mark.parametrize("name", BIG_RECIPES)
def test_big_recipes_decode_validation_samples_as_one_batch_per_rank(name):
    # Sharded decoding pays a full weight gather per step, whatever the batch (docs/scaling.md).
    recipe = yaml.safe_load((RECIPES / name).read_text())
    (callback,) = [c["init_args"] for c in recipe["trainer"]["callbacks"]
                   if c["class_path"].endswith("PVCGenerationCallback")]
    assert callback["batch_size"] >= callback["max_samples"]
    if "72b" in name:  # one PVC pass, after the last epoch
        assert callback["compare_plain"] is False
        assert callback["every_n_epochs"] == recipe["trainer"]["max_epochs"]


@pytest.mark.parametrize("name", BIG_RECIPES)
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
