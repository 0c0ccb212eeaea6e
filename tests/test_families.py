"""Qwen2.5-VL and Qwen3-VL through the CLI: fit + validate (PVC calibrating) + export, on tiny
random models; and the family registry. The exactness suite (positions, logits, pooled copies,
PVC vs recompute and vs HF generate, probe vs eager) runs every family through the
``tiny_family`` fixture in test_module.py, test_pvc.py and test_attention.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from data_engine.synth import write_split
from tests.conftest import CALIBRATING, assert_pvc_calibrated, random_image
from tests.wandb_history import history
from tvc_lightning.cli import main
from tvc_lightning.families import FAMILIES, Qwen2VL, family_at, family_of
from tvc_lightning.testing import save_tiny

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
NEWER = ["qwen2_5_vl", "qwen3_vl"]


@pytest.fixture(params=NEWER)
def family_workdir(request, tmp_path_factory, tmp_path, monkeypatch):
    """The tiny recipe's layout (`outputs/tiny/...`) holding a tiny model of a newer family."""
    family = request.param
    root = tmp_path / "outputs" / "tiny"
    save_tiny(root / "model", family, seed=0)
    write_split(root / "data", "train", 16, seed=0, per_shard=8, image_size=160)
    write_split(root / "data", "val", 4, seed=0, per_shard=4, image_size=160)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return family, root


def test_fit_validate_export_through_the_cli(family_workdir, tmp_path):
    from tvc_lightning.module import TVCModule

    family, root = family_workdir
    main(["fit", "--config", str(RECIPE), "--trainer.max_steps", "6", "--trainer.max_epochs", "-1",
          "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
          "--trainer.num_sanity_val_steps", "0"])
    (fit_run,) = (root / "wandb").glob("offline-run-*")
    losses = [r["train/loss"] for r in history(fit_run) if "train/loss" in r]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    ckpt = root / "checkpoints" / "last.ckpt"

    shutil.rmtree(root / "wandb")
    main(["validate", "--config", str(RECIPE), "--ckpt_path", str(ckpt),
          "--trainer.enable_progress_bar", "false", *CALIBRATING])
    (val_run,) = (root / "wandb").glob("offline-run-*")
    assert_pvc_calibrated(history(val_run))

    out = tmp_path / "exported"
    main(["export", str(ckpt), "--out", str(out), "--dtype", "float32"])
    adapter = FAMILIES[family]
    assert family_at(out) is adapter
    processor_config = json.loads((out / "processor_config.json").read_text())
    assert processor_config["processor_class"] == adapter.processor_class_name
    exported = adapter.model_class().from_pretrained(out).eval()
    module = TVCModule.load_from_checkpoint(ckpt, map_location="cpu")
    module.configure_model()
    module.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    module.eval()
    # With an image: the exported tower (and Qwen3-VL's DeepStack mergers) carry the weights too.
    from tvc_lightning.hf import load_processor

    processor = load_processor(out)
    text = "<|vision_start|><|image_pad|><|vision_end|>How many?"
    inputs = processor(text=[text], images=[random_image(112, 84)], return_tensors="pt")
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == exported.config.image_token_id).int()
    with torch.no_grad():
        theirs = exported(**inputs).logits
        ours = module.model(**inputs).logits
    torch.testing.assert_close(theirs, ours)


@pytest.mark.parametrize("family", NEWER)
def test_fsdp2_shards_trains_and_decodes_in_step(family, tmp_path):
    """Sharded per block (Qwen3-VL's DeepStack mergers with the tower): each rank's loss and its
    PVC decode (rank 0 calibrating while rank 1 idles in step) equal one process's."""
    import os
    import subprocess
    import sys

    from tests.conftest import assert_ranks_decoded_as_one_process
    from tvc_lightning.hf import load_model, load_processor

    root = Path(__file__).resolve().parents[1]
    checkpoint = save_tiny(tmp_path / "model", family, seed=0)
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29521", str(root / "tests" / "fsdp_family_worker.py"),
         str(checkpoint), str(tmp_path)],
        cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for seen in ranks:
        assert seen["loss"] == pytest.approx(seen["reference_loss"], rel=1e-5)
    assert_ranks_decoded_as_one_process(ranks, load_model(checkpoint), load_processor(checkpoint))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_family):
    """DeepStack adds its levels between checkpointed decoder layers: nothing changes."""
    import copy

    from tests.conftest import rank_batch
    from tvc_lightning.module import TVCModule

    model, processor = tiny_family
    model = copy.deepcopy(model).train()
    batch = rank_batch(processor, 1)

    def loss_and_grads():
        module = TVCModule(model_name_or_path="unused", freeze=[])
        module.model = model
        loss, _ = module.summed_loss(batch)
        return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))

    plain = loss_and_grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = loss_and_grads()
    torch.testing.assert_close(plain[0], checkpointed[0])
    for a, b in zip(plain[1], checkpointed[1], strict=True):
        torch.testing.assert_close(a, b)


def test_family_is_read_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match=r"config\.json.*'llava'.*qwen2_5_vl, qwen2_vl, qwen3_vl"):
        family_at(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    assert family_at(tmp_path).model_type == "qwen3_vl"


def test_every_family_has_its_own_tiny_model_and_classes(tiny_family):
    model, processor = tiny_family
    adapter = family_of(model)
    assert type(model) is adapter.model_class()
    assert family_of(adapter.language_model(model)) is adapter  # `..._text` configs too
    assert processor.family is adapter
    assert processor.image_processor.patch_size == adapter.image_processor_settings["patch_size"]


def test_tiny_processors_give_every_family_the_same_token_grid(tiny_family):
    """Pixel limits scale with the patch area, so 16-pixel patches (Qwen3-VL) reach the same
    8 x 8 merged tokens as 14-pixel ones at the tiny limit."""
    _, processor = tiny_family
    grid = processor.image_processor(images=[random_image(256, 256)], return_tensors="pt")
    assert grid["image_grid_thw"].tolist() == [[1, 16, 16]]


def test_chat_format_follows_the_family_template(tiny_family):
    from tvc_lightning.data.tokenize import ChatFormat

    model, processor = tiny_family
    chat = ChatFormat.for_family(family_of(model))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    hf = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.prompt("Hi?", [1]) == hf  # one image of one merged token: one pad either way
    assert (chat.system_prompt is None) == (model.config.model_type == "qwen3_vl")
    assert ChatFormat.for_family(family_of(model), "Be brief.").prompt("Hi?", [1]).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n")


def test_save_tiny_refuses_a_directory_of_another_family(tmp_path):
    save_tiny(tmp_path / "m", "qwen2_vl", num_layers=1)
    with pytest.raises(FileExistsError, match="qwen2_vl.*not qwen3_vl"):
        save_tiny(tmp_path / "m", "qwen3_vl", num_layers=1)


def test_default_freeze_is_the_whole_vision_tower(tiny_family, tmp_path):
    """TVC froze the tower with its merger(s): Qwen3-VL's DeepStack mergers included."""
    from tvc_lightning.module import TVCModule

    model, _ = tiny_family
    module = TVCModule(model_name_or_path="unused")
    module.model = model
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        module._apply_freeze()
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen == {n for n, _ in model.named_parameters() if n.startswith("model.visual.")}
        if model.config.model_type == "qwen3_vl":
            assert any("deepstack_merger_list" in n for n in frozen)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])


def test_a_wider_feature_row_is_refused_for_a_family_without_deepstack(tiny):
    model, _ = tiny
    ids = torch.tensor([[model.config.image_token_id]])
    width = model.config.text_config.hidden_size
    with pytest.raises(ValueError, match="wider than the hidden size"):
        Qwen2VL.embed(model, ids, torch.zeros(1, 2 * width))
    with pytest.raises(ValueError, match="1 image placeholder tokens but 2"):
        Qwen2VL.embed(model, ids, torch.zeros(2, width))
