"""TVCModule against HF Qwen2-VL: M-RoPE positions, logits, pooled re-injected features."""

from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import random_image
from tvc_lightning.data.collate import Collator
from tvc_lightning.data.dvr import DVRTransform
from tvc_lightning.data.schema import SampleRecord
from tvc_lightning.data.tokenize import SampleEncoder
from tvc_lightning.module import TVCModule
from tvc_lightning.vision import merged_grids, pool_visual_tokens, pooled_grid

RESPONSE = "Two shapes. Hmm, let me verify the colours. Both are red. The answer is \\boxed{2}."


def _batch(processor, dvr=None, sizes=((150, 200), (90, 60))):
    encoder = SampleEncoder(processor, dvr=dvr)
    samples = [
        encoder(SampleRecord(id=f"m{i}", question=f"Question {i}?", response=RESPONSE * (i + 1),
                             answer="2"), [random_image(w, h, seed=i)], epoch=0)
        for i, (w, h) in enumerate(sizes)
    ]
    return Collator(processor.tokenizer.pad_token_id)(samples)


def _module(model) -> TVCModule:
    module = TVCModule(model_name_or_path="unused", freeze=[])
    module.model = model  # the session's tiny model: skip loading
    return module


def _hf_rope_index(model, batch):
    kwargs = {"image_grid_thw": batch["image_grid_thw"], "attention_mask": batch["attention_mask"]}
    if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:
        kwargs["mm_token_type_ids"] = (batch["input_ids"] == model.config.image_token_id).int()
    positions, _ = model.model.get_rope_index(batch["input_ids"], **kwargs)
    return positions


def test_positions_equal_hf_get_rope_index(tiny_family):
    model, processor = tiny_family
    batch = _batch(processor)
    hf = _hf_rope_index(model, batch)
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["position_ids"][:, mask], hf[:, mask])


def _hf_logits(model, batch: dict) -> torch.Tensor:
    """HF's own forward of ``batch`` (its tower, placement, positions; Qwen3-VL: DeepStack)."""
    hf_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        hf_inputs["mm_token_type_ids"] = (batch["input_ids"] == model.config.image_token_id).int()
    model.model.rope_deltas = None
    return model(**hf_inputs).logits


def test_logits_equal_hf_forward(tiny_family):
    model, processor = tiny_family
    batch = _batch(processor)
    module = _module(model)
    with torch.no_grad():
        ours = module(batch)
        theirs = _hf_logits(model, batch)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-5, atol=1e-5)


def test_unpooled_copy_equals_hf_forward_of_the_image_shown_twice(tiny_family):
    """A DVR copy with pool kernel 1 is the image shown again: our forward (one tower pass, the
    copy's features and positions derived from the original's) equals HF recomputing everything
    for a sequence that simply holds the image twice (two tower passes, HF's positions)."""
    model, processor = tiny_family
    dvr = DVRTransform(p=1.0, max_injections=1, pool_kernel=1)
    batch = _batch(processor, dvr=dvr, sizes=((150, 120),))
    assert batch["visual_segments"].tolist() == [[0, 1], [0, 1]]
    twice = dict(batch, pixel_values=batch["pixel_values"].repeat(2, 1),
                 image_grid_thw=batch["image_grid_thw"].repeat(2, 1))
    with torch.no_grad():
        ours = _module(model)(batch)
        theirs = _hf_logits(model, twice)
    assert torch.equal(batch["position_ids"], _hf_rope_index(model, twice))
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)


def test_pooled_copy_positions_follow_its_grid(tiny):
    model, processor = tiny
    dvr = DVRTransform(p=1.0, max_injections=1, pool_kernel=4)
    batch = _batch(processor, dvr=dvr, sizes=((224, 224),))
    ids, pos = batch["input_ids"][0], batch["position_ids"][:, 0]
    image_pos = torch.nonzero(ids == model.config.image_token_id).squeeze(1)
    copy = image_pos[64:]  # 8x8 original, then the 2x2 pooled copy
    assert copy.numel() == 4
    start = int(pos[0, copy[0]])
    assert pos[0, copy].tolist() == [start] * 4
    assert pos[1, copy].tolist() == [start, start, start + 1, start + 1]
    assert pos[2, copy].tolist() == [start, start + 1, start, start + 1]
    # The text right after the copy (<|vision_end|>) continues at start + max(2, 2).
    assert pos[:, copy[-1] + 1].tolist() == [start + 2] * 3
    # And the text before the copy (<|vision_start|>) was one position earlier.
    assert pos[:, copy[0] - 1].tolist() == [start - 1] * 3


@pytest.mark.parametrize("kernel", [2, 4, 3])
def test_reinjected_features_are_avg_pool_of_original(tiny_family, kernel):
    """The copy's features are the tower's, average-pooled on the merged grid: the embedded
    tokens and (Qwen3-VL) every DeepStack level handed to the decoder."""
    model, processor = tiny_family
    dvr = DVRTransform(p=1.0, max_injections=1, pool_kernel=kernel)
    batch = _batch(processor, dvr=dvr, sizes=((224, 168),))  # 8x6 merged tokens
    module = _module(model)
    family = module.family
    with torch.no_grad():
        embeds, extra = module.language_inputs(batch)
        tower = family.vision_tower(model)(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    levels = [tower.pooler_output, *getattr(tower, "deepstack_features", [])]
    assert len(levels) == {"qwen3_vl": 2}.get(model.config.model_type, 1)
    (h, w), = merged_grids(batch["image_grid_thw"], family.merge_size(model))
    image_pos = torch.nonzero(batch["input_ids"][0] == model.config.image_token_id).squeeze(1)
    deepstack = extra.get("deepstack_visual_embeds", [])
    assert len(deepstack) == len(levels) - 1
    for level, placed in zip(levels, [embeds[0, image_pos], *deepstack], strict=True):
        _assert_original_then_pooled(level, placed, h, w, kernel)


def _assert_original_then_pooled(original: torch.Tensor, placed: torch.Tensor, h: int, w: int,
                                 kernel: int) -> None:
    grid = original.reshape(h, w, -1).permute(2, 0, 1)
    expected = F.avg_pool2d(grid, kernel, stride=kernel, ceil_mode=True).flatten(1).T
    ph, pw = pooled_grid(h, w, kernel)
    assert expected.shape[0] == ph * pw
    assert placed.shape[0] == h * w + ph * pw
    torch.testing.assert_close(placed[: h * w], original)
    torch.testing.assert_close(placed[h * w:], expected)
    torch.testing.assert_close(pool_visual_tokens(original, h, w, kernel), expected)


def test_pooling_edge_windows_average_only_real_tokens():
    feats = torch.arange(5 * 3, dtype=torch.float32).reshape(15, 1)  # a 5x3 grid
    pooled = pool_visual_tokens(feats, 5, 3, 4)
    assert pooled.shape == (2, 1)  # ceil(5/4) x ceil(3/4)
    grid = feats.reshape(5, 3)
    assert pooled[0, 0] == grid[:4].mean()
    assert pooled[1, 0] == grid[4:].mean()


def test_loss_falls_and_frozen_tower_gets_no_grad(tiny_checkpoint):
    from tvc_lightning.hf import load_processor

    module = TVCModule(str(tiny_checkpoint), freeze=["visual"], lr=3e-3)
    module.configure_model()
    processor = load_processor(tiny_checkpoint)
    batch = _batch(processor, dvr=DVRTransform(p=1.0, pool_kernel=2))
    params = [p for p in module.model.parameters() if p.requires_grad]
    assert all(not p.requires_grad for p in module.model.model.visual.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(8):
        loss, n = module.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert int(n) > 0
    assert losses[-1] < losses[0] * 0.8
    assert all(p.grad is None for p in module.model.model.visual.parameters())


def test_freeze_prefix_must_match(tiny_checkpoint):
    module = TVCModule(str(tiny_checkpoint), freeze=["vision_tower"])
    with pytest.raises(ValueError, match="model.freeze"):
        module.configure_model()


def test_gradient_checkpointing_recomputes_with_equal_loss_and_gradients(tiny_checkpoint):
    from tvc_lightning.hf import load_processor

    processor = load_processor(tiny_checkpoint)
    batch = _batch(processor, dvr=DVRTransform(p=1.0, pool_kernel=2))
    results = []
    for checkpointing in (False, True):
        module = TVCModule(str(tiny_checkpoint), gradient_checkpointing=checkpointing)
        module.configure_model()
        layers = module.model.model.language_model.layers
        calls = []
        # Inside the checkpointed forward (HF keeps module hooks of the layer itself outside it).
        hook = layers[0].input_layernorm.register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        loss, _ = module.loss(batch)
        loss.backward()
        hook.remove()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward
        grads = {n: p.grad for n, p in module.model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


def test_fsdp1_strategy_is_refused_naming_the_setting_and_its_replacement(tiny_checkpoint):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    module = TVCModule(str(tiny_checkpoint))
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), precision="bf16-mixed")
    with pytest.raises(ValueError, match="trainer.strategy.*ModelParallelStrategy"):
        module.configure_model()
    assert module.model is None


class _CaptureSteps(L.Callback):
    """The micro-batches trained on and the gradients each optimizer step is about to apply."""

    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({k: v.clone() for k, v in batch.items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Before clipping (Lightning clips after this hook).
        self.grads.append({n: p.grad.clone() for n, p in pl_module.model.named_parameters()
                           if p.grad is not None})


@pytest.mark.parametrize("normalization", ["tokens", "micro_batch"])
def test_accumulated_step_gradient_follows_the_loss_normalization(tmp_path, tiny_checkpoint,
                                                                   normalization):
    from data_engine.synth import write_split
    from tvc_lightning.data.datamodule import TVCDataModule

    write_split(tmp_path, "train", 6, seed=3, per_shard=6, image_size=160)
    # lr 0: both steps see the initial weights, so each one's gradient can be recomputed.
    module = TVCModule(str(tiny_checkpoint), loss_normalization=normalization, loss_chunk_size=16,
                       lr=0.0)
    data = TVCDataModule(str(tiny_checkpoint), str(tmp_path / "train"), batch_size=1,
                         num_workers=0, max_length=2048, dvr=DVRTransform(p=1.0, pool_kernel=2))
    capture = _CaptureSteps()
    # Windows of 3 in a 5-batch epoch: the second step is the epoch's short window (batches 3-4).
    L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=3, limit_train_batches=5,
              limit_val_batches=0, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False,
              callbacks=[capture]).fit(module, data)
    assert len(capture.batches) == 5 and len(capture.grads) == 2

    reference = TVCModule(str(tiny_checkpoint), loss_chunk_size=16)
    reference.configure_model()
    for step, window in enumerate((capture.batches[:3], capture.batches[3:])):
        sums, counts = zip(*(reference.summed_loss(b) for b in window), strict=True)
        assert all(int(b["window_labels"]) == sum(int(n) for n in counts) for b in window)
        if normalization == "tokens":
            objective = sum(sums) / sum(counts)
        else:  # Lightning divides by the accumulation (3) even for a short window
            objective = sum(s / n for s, n in zip(sums, counts, strict=True)) / 3
        objective.backward()
        for name, param in reference.model.named_parameters():
            if param.grad is not None:
                torch.testing.assert_close(capture.grads[step][name], param.grad, msg=f"{step} {name}")
        reference.model.zero_grad()
        if step == 0:
            assert len({int(n) for n in counts}) > 1  # unequal answers: the objectives differ


@pytest.mark.parametrize("world, deepspeed", [(1, False), (2, False), (2, True)])
def test_step_loss_gives_the_token_mean_gradient_after_the_framework_scaling(world, deepspeed):
    from tvc_lightning.module import step_loss

    acc = 3
    divided = acc * acc if deepspeed else acc  # Lightning's division, and DeepSpeed's engine's
    w = torch.tensor(1.0, requires_grad=True)
    per_token = torch.tensor([[0.5, 2.0, 1.0], [3.0, 1.5, 0.25]])[:world]  # rank x micro-batch
    labels = torch.tensor([[4.0, 1.0, 7.0], [2.0, 9.0, 5.0]])[:world]
    total = labels.sum()
    grads = []
    for r in range(world):  # each rank accumulates its micro-batches' gradients
        (sum(step_loss(w * per_token[r, i] * labels[r, i], total, divided, world) / divided
             for i in range(acc))).backward()
        grads.append(w.grad.clone())
        w.grad = None
    averaged = sum(grads) / world  # data parallelism averages gradients over ranks
    torch.testing.assert_close(averaged, (per_token * labels).sum() / total)


def test_deepspeed_needs_whole_steps_per_epoch_for_token_normalization():
    from types import SimpleNamespace

    def check(batches: int, normalization: str = "tokens") -> None:
        module = TVCModule("unused", loss_normalization=normalization)
        module._trainer = SimpleNamespace(
            accumulate_grad_batches=4, num_training_batches=batches,
            strategy=SimpleNamespace(handles_gradient_accumulation=True))  # as DeepSpeed's
        module._check_step_windows()

    with pytest.raises(ValueError, match="data.train_samples.*micro_batch"):
        check(5390)  # 345,000 samples over 64 ranks: DeepSpeed's steps would straddle epochs
    check(5392)
    check(5390, "micro_batch")


def test_packed_fit_takes_the_unpacked_steps_and_logs_throughput(tmp_path, tiny_checkpoint):
    """The same stream through ``data.pack``: equal label windows and step gradients, no more
    token slots;
    throughput, TFLOP/s and packing efficiency logged (no MFU on CPU). Packed batches are made
    in a DataLoader worker."""
    from data_engine.synth import write_split
    from tvc_lightning.data.datamodule import TVCDataModule

    write_split(tmp_path, "train", 6, seed=3, per_shard=6, image_size=160)
    runs = {}
    for pack in (False, True):
        module = TVCModule(str(tiny_checkpoint), loss_chunk_size=16, lr=0.0)
        data = TVCDataModule(str(tiny_checkpoint), str(tmp_path / "train"), batch_size=3,
                             num_workers=1 if pack else 0, max_length=1024, pack=pack,
                             dvr=DVRTransform(p=1.0, pool_kernel=2))
        capture = _CaptureSteps()
        trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[capture])
        trainer.fit(module, data)
        runs[pack] = (capture, dict(trainer.callback_metrics))
    (plain, plain_metrics), (packed, packed_metrics) = runs[False], runs[True]
    assert len(packed.grads) == len(plain.grads) == 2
    for step in range(2):
        a, b = plain.batches[step], packed.batches[step]
        assert "cu_seqlens" in b and b["input_ids"].numel() <= a["input_ids"].numel()
        assert int(a["window_labels"]) == int(b["window_labels"])
        for name, grad in plain.grads[step].items():
            torch.testing.assert_close(packed.grads[step][name], grad, rtol=1e-4, atol=1e-6,
                                       msg=f"{step} {name}")
    for metrics in (plain_metrics, packed_metrics):
        assert metrics["train/tokens_per_s_per_device"] > 0
        assert metrics["train/tflops_per_device"] > 0
        assert 0 < metrics["train/packing_efficiency"] <= 1
        assert "train/mfu" not in metrics
    last = packed.batches[-1]
    assert float(packed_metrics["train/packing_efficiency"]) == pytest.approx(
        int(last["attention_mask"].sum()) / last["input_ids"].numel())
