"""Padding-free packing: per-sample losses and gradients equal the unpacked run's, exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import random_image
from tvc_lightning.data.collate import Collator
from tvc_lightning.data.dvr import DVRTransform
from tvc_lightning.data.packing import (
    PackingCollator,
    batch_samples,
    first_fit_decreasing,
    language_model_inputs,
    pack_layout,
)
from tvc_lightning.data.schema import SampleRecord
from tvc_lightning.data.tokenize import IGNORE_INDEX, SampleEncoder
from tvc_lightning.module import TVCModule

RESPONSE = "Two shapes. Hmm, let me verify the colours. Both are red. The answer is \\boxed{2}. "
VARLEN = "tvc_test_varlen"


def _samples(processor) -> list[dict]:
    """Five samples of different lengths, each with an image (of its own size) and DVR copies."""
    encoder = SampleEncoder(processor, dvr=DVRTransform(p=1.0, max_injections=2, pool_kernel=2))
    sizes = [(112, 84), (168, 112), (84, 84), (140, 168), (112, 112)]
    return [
        encoder(SampleRecord(id=f"p{i}", question=f"Question {i}?", response=RESPONSE * (1 + 2 * i % 7),
                             answer="2"), [random_image(w, h, seed=i)], epoch=0)
        for i, (w, h) in enumerate(sizes)
    ]


def _module(model) -> TVCModule:
    module = TVCModule(model_name_or_path="unused", freeze=["visual"])
    module.model = model
    module._apply_freeze()
    return module


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      cu_seq_lens_q=None, **kwargs):
    """A varlen backend as flash-attention's: no mask, segments from ``cu_seq_lens_q`` over the
    flattened rows (causal within each); without them, each row is one sequence (HF gives such
    a backend no mask, so it must not be used with padding)."""
    assert attention_mask is None
    b, h, length, d = query.shape
    if cu_seq_lens_q is None:
        cu_seq_lens_q = torch.arange(0, b * length + 1, length)
    groups = h // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    flat = [x.transpose(0, 1).reshape(h, b * length, d) for x in (query, key, value)]
    out = torch.empty_like(flat[0])
    bounds = cu_seq_lens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q, k, v = (x[:, start:end] for x in flat)
        out[:, start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    return out.reshape(h, b, length, d).permute(1, 2, 0, 3), None


@pytest.fixture(scope="module")
def fp64(tiny_family):
    """Every family's tiny model in fp64 (Qwen3-VL: DeepStack inputs over the packed layout)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, _varlen_attention)
    model, processor = tiny_family
    return copy.deepcopy(model).double(), processor


def _set_text_attention(model, name: str) -> None:
    model.model.language_model.config._attn_implementation = name


def _per_sample_reference(module, samples):
    """Each sample alone (no padding): its summed loss, label count and gradients."""
    params = [p for p in module.model.parameters() if p.requires_grad]
    out = []
    for s in samples:
        loss, n = module.summed_loss(Collator(0)([s]))
        out.append((loss.detach(), int(n), torch.autograd.grad(loss, params)))
    return out


def _layout(batch, samples) -> list[int]:
    """Original index of each packed sample, in layout order (matched by token ids)."""
    real = batch["input_ids"][batch["attention_mask"].bool()]
    order, at = [], 0
    for n in batch["sample_lengths"].tolist():
        ids = real[at:at + n]
        order.append(next(i for i, s in enumerate(samples)
                          if s["input_ids"].numel() == n and torch.equal(s["input_ids"], ids)))
        at += n
    return order


@pytest.mark.parametrize("attention", ["sdpa", "eager", VARLEN])
def test_packed_per_sample_losses_and_gradients_equal_unpacked(fp64, attention):
    model, processor = fp64
    _set_text_attention(model, attention)
    module = _module(model)
    samples = _samples(processor)
    lengths = [int(s["input_ids"].numel()) for s in samples]
    assert len(set(lengths)) == len(lengths) and all(int(s["num_injections"]) for s in samples)
    row = max(lengths) + min(lengths) + 5  # several rows, some holding more than one sample
    batch = PackingCollator(processor.tokenizer.pad_token_id, row, pad_to_multiple_of=8)(samples)
    rows = batch["input_ids"].shape[0]
    assert 1 < rows < len(samples) and batch["input_ids"].shape[1] % 8 == 0
    assert batch_samples(batch) == len(samples)
    assert (batch["attention_mask"].sum(-1) < batch["input_ids"].shape[1]).any()  # padded tails

    reference = _per_sample_reference(module, samples)
    order = _layout(batch, samples)
    params = [p for p in module.model.parameters() if p.requires_grad]
    # HF's eager attention takes its softmax in float32 even in a float64 model, so its gradients
    # agree to float32 rounding only (torch 2.14's softmax sums a longer, packed row in another
    # order: ~1e-7 relative); sdpa and varlen stay float64 throughout.
    grad_tol = dict(rtol=1e-5, atol=1e-6) if attention == "eager" else dict(rtol=1e-9, atol=1e-12)
    hidden = module.hidden_states(batch)
    labels = batch["labels"][:, 1:]
    token_loss = F.cross_entropy(module.model.lm_head(hidden[:, :-1]).transpose(1, 2), labels,
                                 ignore_index=IGNORE_INDEX, reduction="none")
    # Which packed sample each (shifted) position belongs to, in layout order; pads: none.
    owner = torch.full(batch["input_ids"].shape, -1)
    owner[batch["attention_mask"].bool()] = torch.repeat_interleave(
        torch.arange(len(samples)), batch["sample_lengths"])
    owner = owner[:, :-1]
    for slot, i in enumerate(order):
        mine = (owner == slot) & (labels != IGNORE_INDEX)
        loss_ref, n_ref, grads_ref = reference[i]
        assert int(mine.sum()) == n_ref
        loss = token_loss[mine].sum()
        torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-10)
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, g_ref, **grad_tol)
    # The module's own loss on the packed batch: the unpacked sums and label counts.
    loss_sum, n_tokens = module.summed_loss(batch)
    torch.testing.assert_close(loss_sum, sum(r[0] for r in reference), rtol=1e-10, atol=1e-10)
    assert int(n_tokens) == sum(r[1] for r in reference)
    _set_text_attention(model, "sdpa")


def test_packing_is_needed_for_exactness(fp64):
    """Control: the same rows with 3-row positions and a plain causal mask let samples see each
    other, so the equalities above do depend on the packed mask."""
    model, processor = fp64
    module = _module(model)
    samples = _samples(processor)
    batch = PackingCollator(processor.tokenizer.pad_token_id, 10_000)(samples)
    assert batch["input_ids"].shape[0] == 1
    unmasked = dict(batch, position_ids=batch["position_ids"][1:])
    del unmasked["cu_seqlens"], unmasked["sample_lengths"]
    with torch.no_grad():
        reference = sum(float(module.summed_loss(Collator(0)([s]))[0]) for s in samples)
        assert float(module.summed_loss(batch)[0]) == pytest.approx(reference, rel=1e-10)
        assert float(module.summed_loss(unmasked)[0]) != pytest.approx(reference, rel=1e-4)


def test_first_labels_are_ignored_and_counts_kept(tiny):
    _, processor = tiny
    samples = _samples(processor)
    batch = PackingCollator(processor.tokenizer.pad_token_id, 10_000)(samples)
    starts = torch.nonzero((batch["position_ids"][0] == 0) & batch["attention_mask"].bool())
    assert (batch["labels"][starts[:, 0], starts[:, 1]] == IGNORE_INDEX).all()
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == sum(
        int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in samples)
    # M-RoPE rows are each sample's own positions; the text row counts 0..n-1 per sample.
    real = batch["attention_mask"].bool()
    order = _layout(batch, samples)
    assert torch.equal(batch["position_ids"][1:, real],
                       torch.cat([samples[i]["position_ids"] for i in order], 1))
    assert torch.equal(batch["position_ids"][0, real],
                       torch.cat([torch.arange(samples[i]["input_ids"].numel()) for i in order]))
    cu = batch["cu_seqlens"]
    assert cu[0] == 0 and cu[-1] == batch["input_ids"].numel() and cu.dtype == torch.int32


def test_first_fit_decreasing_is_deterministic_and_bounded():
    lengths = [5, 9, 3, 7, 2, 8, 4]
    rows = first_fit_decreasing(lengths, 10)
    assert rows == [[1], [5, 4], [3, 2], [0, 6]]
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    with pytest.raises(ValueError, match="data.max_length"):
        first_fit_decreasing([11], 10)


def test_layout_takes_the_fewer_token_slots():
    # Rows of the longest sample (9): [9], [8], [7, 2], [5, 4], [3] -> 5 x 9 = 45 slots;
    # rows of 10: [9], [8, 2], [7, 3], [5, 4] -> 4 x 10 = 40 slots.
    assert pack_layout([5, 9, 3, 7, 2, 8, 4], 10) == first_fit_decreasing([5, 9, 3, 7, 2, 8, 4], 10)
    # [6, 5, 5] in rows of 16: one row of 16 slots; rows of 6: [6], [5], [5] -> 18.
    assert pack_layout([6, 5, 5], 16) == [[0, 1, 2]]
    # [8, 4, 4, 3] in rows of 16: [8, 4, 4] + [3] -> 2 x 16 = 32; rows of 8: [8], [4, 4], [3] -> 24.
    assert pack_layout([8, 4, 4, 3], 16) == [[0], [1, 2], [3]]


def test_language_model_inputs_by_backend(tiny):
    _, processor = tiny
    samples = _samples(processor)[:2]
    padded = Collator(0)(samples)
    packed = PackingCollator(0, 10_000)(samples)
    assert language_model_inputs(padded, "flash_attention_2")["attention_mask"] is padded[
        "attention_mask"]
    sdpa = language_model_inputs(packed, "sdpa")
    assert sdpa["attention_mask"] is None and "cu_seq_lens_q" not in sdpa
    flash = language_model_inputs(packed, "flash_attention_2")
    assert flash["attention_mask"] is None and torch.equal(flash["cu_seq_lens_q"], packed["cu_seqlens"])
    assert flash["max_length_q"] == max(int(s["input_ids"].numel()) for s in samples)
