"""VisualAttentionProbe on the sdpa model against attention weights returned by the eager model.

The tiny model is built twice from the same seed, once with sdpa (probed) and once with eager
attention (``output_attentions=True`` is the independent reference). Both run the same inputs in
lockstep, each with its own DynamicCache, through prefill, greedy decode steps, per-row cache
edits (dropping the original image) and a re-injected pooled image chunk.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tests.conftest import random_image
from tvc_lightning.families import FAMILIES
from tvc_lightning.pvc.attention import (
    KIND_COPY,
    KIND_INVALID,
    KIND_ORIGINAL,
    KIND_TEXT,
    VisualAttentionProbe,
    cache_keyword,
    forgetting_curve,
    prompt_key_kinds,
    visual_attention_shares,
)
from tvc_lightning.testing import tiny_model, tiny_qwen2vl

ATOL = 1e-5


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def models(request):
    """Every family's tiny model twice: the probe's query/key handling (Qwen3-VL: per-head
    RMSNorm before the rotation) is checked against each family's own eager attention."""
    sdpa, processor = tiny_model(request.param, seed=0)
    eager, _ = tiny_model(request.param, seed=0, attn_implementation="eager")
    for a, b in zip(sdpa.parameters(), eager.parameters(), strict=True):
        assert torch.equal(a, b)
    processor.tokenizer.padding_side = "left"  # decoding appends on the right
    return sdpa, eager, processor


def make_inputs(processor, questions: list[str], sizes: list[tuple[int, int]]) -> dict:
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for q in questions
    ]
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    return dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))


def reference_shares(
    attentions: tuple[torch.Tensor, ...], kinds: torch.Tensor, query_rows: list[int] | None = None
) -> torch.Tensor:
    """(B, layers, 2) shares of each row's query (default: the last), straight from eager weights."""
    bsz = kinds.shape[0]
    rows = [-1] * bsz if query_rows is None else query_rows
    per_layer = []
    for attn in attentions:
        last = attn[torch.arange(bsz), :, rows, :].float()  # (B, heads, K)
        orig = (last * (kinds == KIND_ORIGINAL)[:, None]).sum(-1).mean(1)
        copy = (last * (kinds == KIND_COPY)[:, None]).sum(-1).mean(1)
        per_layer.append(torch.stack([orig, copy], dim=-1))
    return torch.stack(per_layer, dim=1)


class Lockstep:
    """The probed sdpa model and the eager reference fed identical inputs, each with its own cache.

    Keeps, like a decode loop, the 2-D attention mask, the next M-RoPE position of every row, the
    probe's key kinds and the original index of every row still in the batch.
    """

    def __init__(self, sdpa, eager, probe: VisualAttentionProbe, inputs: dict) -> None:
        self.sdpa, self.eager, self.probe = sdpa, eager, probe
        self.caches = [DynamicCache(config=sdpa.config), DynamicCache(config=eager.config)]
        self.refs: list[tuple[list[int], torch.Tensor]] = []  # (original rows, (B_s, layers, 2))
        self.mask = inputs["attention_mask"]
        self.ids = list(range(self.mask.shape[0]))
        pos, _ = sdpa.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=self.mask,
        )
        self.next_pos = pos.amax(dim=(0, 2)) + 1  # (B,): text continues after the largest M-RoPE index
        probe.set_key_kinds(prompt_key_kinds(inputs["input_ids"], sdpa.config.image_token_id, self.mask))
        self.logits = self._run(dict(inputs, position_ids=pos), recorded=probe.record_prefill)

    def _run(self, kwargs: dict, query_rows: list[int] | None = None, recorded: bool = True) -> torch.Tensor:
        with torch.no_grad():
            kw = cache_keyword(self.sdpa.forward)
            out = self.sdpa(**kwargs, **{kw: self.caches[0]}, use_cache=True)
            ref = self.eager(**kwargs, **{kw: self.caches[1]}, use_cache=True, output_attentions=True)
        if recorded:
            shares = reference_shares(ref.attentions, self.probe.key_kinds, query_rows)
            self.refs.append((list(self.ids), shares))
        rows = torch.tensor([-1] * len(self.ids) if query_rows is None else query_rows)
        return out.logits[torch.arange(len(self.ids)), rows]  # (B, V): each row's prediction

    def decode(self, steps: int) -> None:
        """Greedy steps of the sdpa model, one token per row, positions = previous max + 1 (all 3 rows)."""
        for _ in range(steps):
            bsz = len(self.ids)
            token = self.logits.argmax(-1, keepdim=True)
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            self.probe.append_kinds(KIND_TEXT)
            position_ids = self.next_pos.view(1, bsz, 1).expand(3, bsz, 1)
            self.next_pos = self.next_pos + 1
            step = dict(input_ids=token, attention_mask=self.mask, position_ids=position_ids)
            self.logits = self._run(step)

    def drop_original_image(self) -> None:
        """Visual cache reset: remove each row's image K/V entries (per-row positions, equal counts)."""
        keep_rows = [(k != KIND_ORIGINAL).nonzero().squeeze(1) for k in self.probe.key_kinds]
        index = torch.stack(keep_rows)  # (B, K'): gather index, rows differ under left padding
        for cache in self.caches:
            for layer in cache.layers:
                idx = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
                layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
        self.mask = self.mask.gather(1, index)
        self.probe.select_kinds(index)

    def keep_rows(self, keep: list[int]) -> None:
        """Rows leave the batch, as in the PVC loop: cache.batch_select_indices + probe.select_rows."""
        index = torch.tensor(keep)
        for cache in self.caches:
            cache.batch_select_indices(index)
        self.probe.select_rows(index)
        self.mask, self.next_pos, self.logits = self.mask[index], self.next_pos[index], self.logits[index]
        self.ids = [self.ids[i] for i in keep]

    def pooled_chunk(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Per row: <|vision_start|> + its image's 2x2-pooled tokens + <|vision_end|> embeddings."""
        model = self.sdpa.model
        merge = model.config.vision_config.spatial_merge_size
        with torch.no_grad():
            feats = model.get_image_features(pixel_values, grid_thw).pooler_output
            pooled = []
            for f, (_, h, w) in zip(feats, grid_thw.tolist(), strict=True):
                grid = f.view(h // merge, w // merge, -1).permute(2, 0, 1)[None]
                pooled.append(F.avg_pool2d(grid, 2)[0].flatten(1).T)  # (h'' * w'', hidden), row-major
            pooled = torch.stack(pooled)[self.ids]  # equal grids in these tests
            ids = torch.tensor([self.sdpa.config.vision_start_token_id, self.sdpa.config.vision_end_token_id])
            start, end = model.get_input_embeddings()(ids)
        bsz = pooled.shape[0]
        return torch.cat([start.expand(bsz, 1, -1), pooled, end.expand(bsz, 1, -1)], dim=1), pooled.shape[1]

    def chunk_positions(self, n_img: int) -> torch.Tensor:
        """(3, B, n_img + 2) M-RoPE positions of a pooled chunk: markers as text, the image on its grid."""
        side = int(n_img**0.5)
        p = self.next_pos.view(1, -1, 1)
        rows, cols = torch.arange(n_img) // side, torch.arange(n_img) % side
        img_pos = torch.stack([torch.zeros(n_img), rows, cols]).long().view(3, 1, n_img) + p + 1
        return torch.cat([p.expand(3, -1, 1), img_pos, (p + 1 + side).expand(3, -1, 1)], dim=2)

    def reinject_pooled_image(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> None:
        """Every row appends its pooled image chunk (one multi-token forward)."""
        chunk, n_img = self.pooled_chunk(pixel_values, grid_thw)
        bsz, width = chunk.shape[:2]
        position_ids = self.chunk_positions(n_img)
        self.next_pos = self.next_pos + 2 + int(n_img**0.5)
        kinds = torch.tensor([KIND_TEXT] + [KIND_COPY] * n_img + [KIND_TEXT])
        self.probe.append_kinds(kinds.expand(bsz, -1))
        self.mask = torch.cat([self.mask, torch.ones(bsz, width, dtype=self.mask.dtype)], dim=1)
        step = dict(inputs_embeds=chunk, attention_mask=self.mask, position_ids=position_ids)
        self.logits = self._run(step)

    def mixed_step(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, chunk_row: int) -> None:
        """Like the PVC loop's step: one row feeds its chunk, the others one token right-padded with
        invalid holes (mask = kinds >= 0, hole positions 0)."""
        chunk, n_img = self.pooled_chunk(pixel_values, grid_thw)
        bsz, width = chunk.shape[:2]
        tokens = self.sdpa.model.get_input_embeddings()(self.logits.argmax(-1)).detach()
        embeds = torch.zeros_like(chunk)
        embeds[:, 0] = tokens
        embeds[chunk_row] = chunk[chunk_row]
        position_ids = torch.zeros(3, bsz, width, dtype=torch.long)
        position_ids[:, :, 0] = self.next_pos
        position_ids[:, chunk_row] = self.chunk_positions(n_img)[:, chunk_row]
        kinds = torch.full((bsz, width), KIND_INVALID)
        kinds[:, 0] = KIND_TEXT
        kinds[chunk_row] = torch.tensor([KIND_TEXT] + [KIND_COPY] * n_img + [KIND_TEXT])
        self.probe.append_kinds(kinds)
        self.mask = (self.probe.key_kinds >= 0).long()
        advance = torch.ones(bsz, dtype=torch.long)
        advance[chunk_row] = 2 + int(n_img**0.5)
        self.next_pos = self.next_pos + advance
        rows = [width - 1 if b == chunk_row else 0 for b in range(bsz)]
        step = dict(inputs_embeds=embeds, attention_mask=self.mask, position_ids=position_ids)
        self.logits = self._run(step, query_rows=rows)

    def check(self, atol: float = ATOL) -> torch.Tensor:
        got = self.probe.records()
        want = torch.full_like(got, float("nan"))
        assert len(self.refs) == got.shape[0]
        for s, (ids, ref) in enumerate(self.refs):
            want[s, ids] = ref
        torch.testing.assert_close(got, want, atol=atol, rtol=0, equal_nan=True)
        return got


def test_single_sequence_prefill_and_decode(models):
    sdpa, eager, processor = models
    inputs = make_inputs(processor, ["How many circles are in the image?"], [(112, 112)])
    with VisualAttentionProbe(sdpa, record_prefill=True) as probe:
        run = Lockstep(sdpa, eager, probe, inputs)
        run.decode(5)
    got = run.check()
    assert got.shape == (6, 1, 2, 2)
    assert (got[..., 0] > 1e-3).all() and (got[..., 0] < 1).all()  # a real, non-degenerate share
    assert (got[..., 1] == 0).all()  # no copies yet


def test_batched_left_padded_rows(models):
    sdpa, eager, processor = models
    inputs = make_inputs(
        processor, ["How many circles?", "Which shape is larger, the red one or the blue one?"],
        [(112, 112), (112, 84)],
    )
    assert (inputs["attention_mask"] == 0).any()  # the rows really are padded
    with VisualAttentionProbe(sdpa, record_prefill=True) as probe:
        run = Lockstep(sdpa, eager, probe, inputs)
        run.decode(4)
    got = run.check()
    assert got.shape == (5, 2, 2, 2)
    assert not torch.allclose(got[:, 0], got[:, 1])  # per-row kinds and attention


@pytest.mark.parametrize("drop", [True, False], ids=["reset-visual", "reset-none"])
def test_reinjected_copy_with_and_without_cache_reset(models, drop):
    sdpa, eager, processor = models
    inputs = make_inputs(processor, ["How many circles?", "Let me count the shapes, then the total."],
                         [(112, 112), (112, 112)])
    with VisualAttentionProbe(sdpa) as probe:  # record_prefill off: the prompt is not recorded
        run = Lockstep(sdpa, eager, probe, inputs)
        run.decode(2)
        if drop:
            width = probe.key_kinds.shape[1]
            run.drop_original_image()
            assert probe.key_kinds.shape[1] == width - 16 == run.caches[0].get_seq_length()
        run.reinject_pooled_image(inputs["pixel_values"], inputs["image_grid_thw"])  # recorded: last row
        run.decode(3)
    got = run.check()
    assert got.shape == (6, 2, 2, 2)
    # steps: 2 decodes, the chunk's last row, 3 decodes
    assert (got[:2, ..., 1] == 0).all()
    assert (got[2:, ..., 1] > 1e-3).all()  # the copy is attended from its own chunk on
    if drop:
        assert (got[2:, ..., 0] == 0).all()  # nothing of the original image is left to attend
    else:
        assert (got[2:, ..., 0] > 1e-3).all()


def test_bf16_model():
    """bf16 cache and queries: the product in bf16, the softmax in fp32, records fp32."""
    sdpa, processor = tiny_qwen2vl(seed=0)
    eager, _ = tiny_qwen2vl(seed=0, attn_implementation="eager")
    sdpa.to(torch.bfloat16)
    eager.to(torch.bfloat16)
    processor.tokenizer.padding_side = "left"
    inputs = make_inputs(processor, ["How many circles?", "Which shape is larger?"], [(112, 112), (112, 84)])
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    with VisualAttentionProbe(sdpa, record_prefill=True) as probe:
        run = Lockstep(sdpa, eager, probe, inputs)
        run.decode(3)
    # eager rounds its probabilities to bf16 (~3 significant digits) before returning them
    assert run.check(atol=2e-3).dtype == torch.float32


def test_recomputed_query_matches_captured(models):
    sdpa, eager, processor = models
    inputs = make_inputs(processor, ["How many circles?"], [(112, 112)])
    with VisualAttentionProbe(sdpa, record_prefill=True, capture_query=False) as probe:
        run = Lockstep(sdpa, eager, probe, inputs)
        run.decode(2)
    run.check()


def test_mixed_chunk_step_and_rows_leaving(models):
    """The PVC loop's shapes: one row re-injects while the other decodes (right-padded holes), then
    a row leaves the batch; records stay per original row."""
    sdpa, eager, processor = models
    inputs = make_inputs(processor, ["How many circles?", "Let me count the shapes, then the total."],
                         [(112, 112), (112, 112)])
    with VisualAttentionProbe(sdpa) as probe:
        run = Lockstep(sdpa, eager, probe, inputs)
        run.decode(2)
        run.mixed_step(inputs["pixel_values"], inputs["image_grid_thw"], chunk_row=1)
        run.decode(2)
        run.keep_rows([1])
        run.decode(2)
    got = run.check()
    assert got.shape == (7, 2, 2, 2)
    assert got[5:, 0].isnan().all() and not got[:5].isnan().any()
    assert (got[2:, 1, :, 1] > 1e-3).all()  # row 1 attends its copy from its chunk's last row on
    assert (got[:5, 0, :, 1] == 0).all() and (got[:5, 0, :, 0] > 1e-3).all()  # row 0: no copy
    torch.testing.assert_close(probe.row_records(1), got[:, 1])
    torch.testing.assert_close(probe.row_records(0), got[:5, 0])


def test_forward_without_cache_recomputes_keys(models):
    sdpa, eager, processor = models
    inputs = make_inputs(processor, ["How many circles?", "Which shape is larger?"], [(112, 84), (84, 112)])
    kinds = prompt_key_kinds(inputs["input_ids"], sdpa.config.image_token_id, inputs["attention_mask"])
    with VisualAttentionProbe(sdpa, record_prefill=True) as probe, torch.no_grad():
        probe.set_key_kinds(kinds)
        sdpa(**inputs, use_cache=False)
        ref = eager(**inputs, use_cache=False, output_attentions=True)
    torch.testing.assert_close(probe.records()[0], reference_shares(ref.attentions, kinds), atol=ATOL, rtol=0)


def test_mask_forms_agree():
    """2-D (flash-style), 4-D boolean (sdpa), 4-D additive (eager) masks and INVALID kinds are one thing."""
    gen = torch.Generator().manual_seed(0)
    bsz, heads, kv_heads, n_keys, dim = 3, 8, 2, 11, 16
    query = torch.randn(bsz, heads, dim, generator=gen)
    keys = torch.randn(bsz, kv_heads, n_keys, dim, generator=gen)
    kinds = torch.randint(0, 3, (bsz, n_keys), generator=gen)
    pad = torch.ones(bsz, n_keys, dtype=torch.long)
    pad[1, :4] = 0
    pad[2, :2] = 0
    as_bool = pad.bool()[:, None, None, :].expand(-1, 1, 2, -1).clone()  # two query rows
    as_float = torch.zeros(as_bool.shape).masked_fill(~as_bool, torch.finfo(torch.float32).min)
    # a mask whose row 0 hides everything but key 0: only used where query_rows points at it
    staggered = as_bool.clone()
    staggered[:, :, 0, 1:] = False
    results = [
        visual_attention_shares(query, keys, kinds, pad),
        visual_attention_shares(query, keys, kinds, as_bool),
        visual_attention_shares(query, keys, kinds, as_float),
        visual_attention_shares(query, keys, kinds.masked_fill(pad == 0, KIND_INVALID)),
        visual_attention_shares(query, keys, kinds, staggered, query_rows=torch.tensor([1, 1, 1])),
    ]
    # Independent reference: repeat the kv heads, softmax over the unpadded keys only.
    rep = keys.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("bhd,bhkd->bhk", query, rep) / dim**0.5
    probs = scores.masked_fill(pad[:, None] == 0, float("-inf")).softmax(-1)
    want = torch.stack([(probs * (kinds == k)[:, None]).sum(-1).mean(1) for k in (1, 2)], dim=-1)
    for got in results:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # query_rows picks each sequence's own row of a 4-D mask: row 0 sees only key 0 (unpadded there)
    picked = visual_attention_shares(query, keys, kinds, staggered, query_rows=torch.tensor([0, 1, 1]))
    torch.testing.assert_close(picked[1:], want[1:], atol=1e-6, rtol=0)
    only_key0 = torch.tensor([kinds[0, 0] == 1, kinds[0, 0] == 2]).float()
    torch.testing.assert_close(picked[0], only_key0)


def test_misaligned_or_missing_kinds_raise(models):
    sdpa, _, processor = models
    inputs = make_inputs(processor, ["How many circles?"], [(112, 112)])
    with VisualAttentionProbe(sdpa, record_prefill=True) as probe, torch.no_grad():
        with pytest.raises(RuntimeError, match="set_key_kinds"):
            sdpa(**inputs)
        probe.set_key_kinds(torch.zeros(1, inputs["input_ids"].shape[1] - 1, dtype=torch.long))
        with pytest.raises(ValueError, match="aligned"):
            sdpa(**inputs)


def test_switches_and_lifecycle(models):
    sdpa, _, processor = models
    inputs = make_inputs(processor, ["How many circles?"], [(112, 112)])
    kinds = prompt_key_kinds(inputs["input_ids"], sdpa.config.image_token_id)
    probe = VisualAttentionProbe(sdpa)
    probe.set_key_kinds(kinds)
    with torch.no_grad():
        sdpa(**inputs)  # prefill: skipped by default
        assert probe.num_steps == 0 and probe.records().shape == (0, 1, 2, 2)  # the kinds' batch
        probe.record_prefill = True
        with probe.paused():
            sdpa(**inputs)
        assert probe.num_steps == 0 and probe.enabled
        sdpa(**inputs)
        assert probe.records().shape == (1, 1, 2, 2)
        probe.clear()
        assert probe.num_steps == 0
        probe.remove()
        sdpa(**inputs)  # hooks gone: nothing recorded, no kinds check
    assert probe.num_steps == 0
    assert not any(layer.self_attn._forward_hooks for layer in sdpa.model.language_model.layers)


def test_kinds_editing(models):
    probe = VisualAttentionProbe(models[0])
    probe.remove()  # kinds bookkeeping only
    with pytest.raises(RuntimeError):
        probe.append_kinds(KIND_TEXT)
    probe.set_key_kinds(torch.tensor([[-1, 0, 1, 1, 0], [0, 1, 1, 0, 0]]))
    probe.append_kinds(KIND_TEXT, length=2)
    probe.append_kinds(torch.tensor([[2], [2]]))
    assert probe.key_kinds.tolist() == [[-1, 0, 1, 1, 0, 0, 0, 2], [0, 1, 1, 0, 0, 0, 0, 2]]
    probe.select_kinds(torch.tensor([0, 1, 4, 5, 6, 7]))
    assert probe.key_kinds.tolist() == [[-1, 0, 0, 0, 0, 2], [0, 1, 0, 0, 0, 2]]
    probe.select_kinds(torch.tensor([True, False, True, True, True, True]))
    assert probe.key_kinds.tolist() == [[-1, 0, 0, 0, 2], [0, 0, 0, 0, 2]]
    probe.select_kinds(torch.tensor([[1, 2, 4], [0, 3, 4]]))
    assert probe.key_kinds.tolist() == [[0, 0, 2], [0, 0, 2]]
    with pytest.raises(ValueError):
        probe.append_kinds(torch.zeros(3, 1, dtype=torch.long))
    probe.select_rows([1])
    assert probe.key_kinds.tolist() == [[0, 0, 2]]
    with pytest.raises(ValueError, match="select_rows"):
        probe.set_key_kinds(torch.zeros(2, 3, dtype=torch.long))
    probe.clear()  # a new batch may have another size
    probe.set_key_kinds(torch.zeros(3, 3, dtype=torch.long))


def test_prompt_key_kinds():
    ids = torch.tensor([[5, 5, 7, 9, 9, 7], [7, 9, 9, 9, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert prompt_key_kinds(ids, 9, mask).tolist() == [[-1, -1, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0]]


def test_forgetting_curve_bins_by_hand():
    shares = torch.arange(10.0)[:, None] + torch.tensor([0.0, 10.0])  # (T=10, layers=2)
    # token i -> bin floor(4 i / 10): bins {0,1,2} {3,4} {5,6,7} {8,9}
    want = torch.tensor([[1.0, 11.0], [3.5, 13.5], [6.0, 16.0], [8.5, 18.5]])
    torch.testing.assert_close(forgetting_curve(shares, bins=4), want)
    # trailing dims are kept: (T, layers, 2) -> (bins, layers, 2)
    both = torch.stack([shares, -shares], dim=-1)
    torch.testing.assert_close(forgetting_curve(both, bins=4), torch.stack([want, -want], dim=-1))
    # fewer tokens than bins: tokens 0, 1, 2 land in bins 0, 2, 5; the others are NaN
    short = forgetting_curve(torch.tensor([[1.0], [2.0], [3.0]]), bins=8)
    assert short.shape == (8, 1)
    filled = torch.tensor([0, 2, 5])
    torch.testing.assert_close(short[filled, 0], torch.tensor([1.0, 2.0, 3.0]))
    empty = torch.ones(8, dtype=torch.bool)
    empty[filled] = False
    assert short[empty].isnan().all()
    assert forgetting_curve(torch.empty(0, 3), bins=2).isnan().all()
    with pytest.raises(ValueError):
        forgetting_curve(shares, bins=0)


def test_cache_keyword_follows_the_signature(models):
    sdpa, _, _ = models
    attention = sdpa.model.language_model.layers[0].self_attn
    assert cache_keyword(sdpa.model.language_model.forward) == cache_keyword(attention.forward)
    assert cache_keyword(lambda hidden, cache=None: None) == "cache"
    assert cache_keyword(lambda hidden, past_key_values=None: None) == "past_key_values"
    with pytest.raises(TypeError, match="neither `cache` nor `past_key_values`"):
        cache_keyword(lambda hidden, kv=None: None)


def test_layer_without_the_cache_it_was_told_of_raises(models):
    """Kinds describing a cache longer than the fed positions while the layer got no cache: the
    probe would otherwise skip silently (the transformers 5.24 failure) and must say so."""
    sdpa, _, processor = models
    inputs = make_inputs(processor, ["How many circles?"], [(112, 112)])
    n = inputs["input_ids"].shape[1]
    with VisualAttentionProbe(sdpa) as probe, torch.no_grad():
        probe.set_key_kinds(torch.zeros(1, n + 5, dtype=torch.long))
        with pytest.raises(RuntimeError, match="received no KV cache"):
            sdpa(**inputs, use_cache=False)
