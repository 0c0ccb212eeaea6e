"""FLOP counting against numbers worked out by hand for a small shape, and the model it reads."""

from __future__ import annotations

import pytest
import torch

from tvc_lightning.flops import (
    MATMULS,
    ModelShape,
    TextShape,
    ThroughputMeter,
    Trainable,
    VisionShape,
    peak_flops,
    peak_for_name,
    step_flops,
    throughput_metrics,
)

# hidden 8, 2 layers, 2 heads x head_dim 4, 1 KV head, FFN 16, vocab 32. Per layer:
# q 8*8=64, k 8*4=32, v 32, o 64, gate 8*16=128, up 128, down 128 -> 576 weights.
TEXT = TextShape(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=32)
# dim 4, 1 block, MLP 8; patch inputs 3 channels x 2 frames x 2 x 2 = 24; 2x2 merge to 8.
# block: qkv 4*12 + proj 4*4 + fc1 4*8 + fc2 8*4 = 128; merger: 16*16 + 16*8 = 384.
VISION = VisionShape(dim=4, depth=1, mlp_hidden=8, patch_inputs=24, merge=2, out_dim=8)
SHAPE = ModelShape(TEXT, VISION)
LENGTHS = [3, 5]  # 8 tokens; causal pairs 3*4/2 + 5*6/2 = 21
GRIDS = [(1, 4, 4)]  # 16 patches, 4 merged tokens, 16^2 = 256 pairs in its one frame
HEAD_TOKENS = 4

# Frozen vision tower (forward only, 2 FLOPs per weight and patch):
# patch 2*24*4*16 = 3072, block 2*128*16 = 4096, merger 2*384*4 = 3072, attention 4*4*256 = 4096.
FROZEN_VISION = 3072 + 4096 + 3072 + 4096


def test_shape_params():
    assert sum(TEXT.matmul_params().values()) == 576
    assert VISION.block_params == 128 and VISION.merger_params == 384


def test_default_training_hand_count():
    """Vision frozen, embeddings, every layer and the head trained: all text matmuls 6x."""
    flops = step_flops(SHAPE, Trainable(), LENGTHS, GRIDS, HEAD_TOKENS)
    assert flops.vision == FROZEN_VISION
    assert flops.text == 6 * 2 * 576 * 8  # 55,296
    assert flops.attention == 2 * 3 * 4 * 8 * 21  # layers x (fwd+bwd) x 4 x heads*head_dim x pairs
    assert flops.head == 6 * 8 * 32 * HEAD_TOKENS  # 6,144: only labelled positions
    assert flops.total == 79_808


def test_trained_vision_tower_hand_count():
    flops = step_flops(SHAPE, Trainable(vision=True), LENGTHS, GRIDS, HEAD_TOKENS)
    # patch 4x (no gradient for pixels), block and merger 6x, attention 3x.
    assert flops.vision == 4 * 24 * 4 * 16 + 6 * 128 * 16 + 6 * 384 * 4 + 3 * 4 * 4 * 256  # 39,936
    assert flops.total == 39_936 + 55_296 + 4_032 + 6_144


def test_only_late_parts_trained_hand_count():
    """Embeddings and everything up to the last down_proj frozen: no gradient flows below it."""
    frozen = dict.fromkeys(MATMULS, False)
    last = dict(frozen, down_proj=True)
    flops = step_flops(SHAPE, Trainable(embed=False, layers=(frozen, last)), LENGTHS, GRIDS,
                       HEAD_TOKENS)
    # layer 0 and layer 1 up to up_proj: forward only; down_proj: forward + weight gradient.
    assert flops.text == 2 * 576 * 8 + 2 * 448 * 8 + 4 * 128 * 8  # 9,216 + 7,168 + 4,096
    assert flops.attention == 2 * 4 * 8 * 21  # forward only in both layers
    assert flops.head == 6 * 8 * 32 * HEAD_TOKENS  # the gradient must reach down_proj
    assert flops.total == 42_304


def test_shape_and_trainable_read_off_the_tiny_model(tiny_family):
    model, _ = tiny_family
    shape = ModelShape.from_config(model.config)
    layer = model.model.language_model.layers[0]
    weights = {n: getattr(layer.self_attn if n[0] in "qkvo" else layer.mlp, n).weight.numel()
               for n in MATMULS}
    assert weights == shape.text.matmul_params()
    visual = model.model.visual
    linear = lambda m: sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))  # noqa: E731
    assert all(shape.vision.block_params == linear(block) for block in visual.blocks)
    mergers = [visual.merger, *getattr(visual, "deepstack_merger_list", [])]
    assert shape.vision.mergers == len(mergers)
    assert all(shape.vision.merger_params == linear(m) for m in mergers)
    assert shape.vision.patch_inputs * shape.vision.dim == visual.patch_embed.proj.weight.numel()
    assert shape.text.vocab * shape.text.hidden == model.lm_head.weight.numel()

    for p in visual.parameters():
        p.requires_grad_(False)
    try:
        trainable = Trainable.from_model(model)
    finally:
        for p in visual.parameters():
            p.requires_grad_(True)
    assert not trainable.vision and trainable.embed and trainable.head
    assert trainable.layers is not None and all(all(layer.values()) for layer in trainable.layers)


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA L40S", 362), ("NVIDIA L4", 121), ("NVIDIA A10G", 70), ("NVIDIA A10", 125),
    ("NVIDIA GeForce RTX 4090", 165), ("NVIDIA RTX A6000", 155), ("Some Future GPU", None),
])
def test_peak_table(name, tflops):
    assert peak_for_name(name) == (None if tflops is None else tflops * 1e12)


def test_no_peak_and_no_mfu_on_cpu():
    assert peak_flops("cpu") is None
    metrics = throughput_metrics(2e12, 600, 800, 2.0, None)
    assert metrics == {"train/tokens_per_s_per_device": 300.0, "train/tflops_per_device": 1.0,
                       "train/packing_efficiency": 0.75}
    assert throughput_metrics(2e12, 600, 800, 2.0, 4e12)["train/mfu"] == 0.25


def test_windowed_attention_pairs_by_hand():
    """Qwen2.5-VL: windowed blocks attend within 8x8-patch windows; a 10x12 frame has windows of
    8 and 2 rows by 8 and 4 columns; the full-attention block sees all 120 patches."""
    shape = VisionShape(dim=4, depth=3, mlp_hidden=8, patch_inputs=24, merge=2, out_dim=8,
                        window=8, full_blocks=1)
    windows = (8 * 8) ** 2 + (8 * 4) ** 2 + (2 * 8) ** 2 + (2 * 4) ** 2
    assert shape.attention_pairs((1, 10, 12)) == 120 ** 2 + 2 * windows
    assert VISION.attention_pairs((2, 4, 4)) == 2 * 16 ** 2  # depth 1, no windows


def test_meter_counts_real_tokens_and_labelled_positions(tiny):
    model, _ = tiny
    batch = {  # two padded rows of 3 and 5 real tokens, 4 labelled positions after the shift
        "input_ids": torch.zeros(2, 6, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, 7, 7, -100, -100, -100], [-100, -100, 7, 7, -100, -100]]),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
    }
    meter = ThroughputMeter()
    meter.start()
    metrics = meter.step(model, batch)
    shape = ModelShape.from_config(model.config)
    expected = step_flops(shape, Trainable.from_model(model), [3, 5], [(1, 4, 4)], 4)
    seconds = expected.total / (metrics["train/tflops_per_device"] * 1e12)
    assert metrics["train/tokens_per_s_per_device"] == pytest.approx(8 / seconds)
    assert metrics["train/packing_efficiency"] == 8 / 12
