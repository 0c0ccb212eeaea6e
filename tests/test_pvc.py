"""PVC decoding on the tiny model (fp32, CPU): equal to HF generate, to the naive re-prefill
path, to one-at-a-time decoding, and to the training forward on the final sequence."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_image
from tvc_lightning.data.collate import Collator
from tvc_lightning.data.tokenize import ChatFormat
from tvc_lightning.families import family_of
from tvc_lightning.module import TVCModule
from tvc_lightning.pvc import PVCConfig, pvc_generate
from tvc_lightning.pvc.triggers import Trigger, TriggerDetector
from tvc_lightning.vision import merged_grids, mrope_positions, pooled_grid

QUESTIONS = ["How many circles?", "What colour is the biggest shape here?", "Count the squares."]


def _images():
    return [[random_image(150, 120, 1)], [random_image(224, 224, 2)],
            [random_image(100, 180, 3), random_image(84, 84, 4)]]


class ScriptedTriggers:
    """Fires the n-th calibration's trigger when the segment since the last one reaches the
    given length: exercises rollback, bridge-only and periodic chunks whatever the random
    model writes."""

    def __init__(self, script: list[tuple[int, Trigger]]) -> None:
        self.script = script

    def check(self, segment: list[int], calibrations: int,
              context: list[int] | None = None) -> Trigger | None:
        if calibrations < len(self.script) and len(segment) == self.script[calibrations][0]:
            return self.script[calibrations][1]
        return None


SCRIPT = [
    (5, Trigger("periodic", 0, " Let me look at the figure once more.")),
    (6, Trigger("reflection", 3, " Let me check the image again.")),
    (9, Trigger("bridge", 0, None)),
]


def _hf_greedy(model, processor, question, images, max_new_tokens, answer_prefix=""):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True) + answer_prefix
    inputs = processor(text=[text], images=images, return_tensors="pt")
    # The decoder never emits a placeholder (a sampled one would claim features that do not
    # exist): HF's greedy choice gets the same two tokens suppressed.
    never = [model.config.image_token_id, model.config.video_token_id]
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, suppress_tokens=never)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_triggers_off_equals_hf_generate_greedy(tiny_family):
    model, processor = tiny_family
    config = PVCConfig(max_calibrations=0, max_new_tokens=30)
    results = pvc_generate(model, processor, QUESTIONS, _images(), config)
    for question, images, result in zip(QUESTIONS, _images(), results, strict=True):
        assert result.token_ids == _hf_greedy(model, processor, question, images, 30)
        assert result.calibrations == []
        assert result.finish_reason == ("eos" if len(result.token_ids) < 30 else "length")


@pytest.mark.parametrize("reset", ["visual", "none"])
def test_kv_preserving_equals_naive_recompute(tiny_family, reset):
    model, processor = tiny_family
    config = PVCConfig(reset=reset, max_new_tokens=40, min_new_tokens=40)
    kv = pvc_generate(model, processor, QUESTIONS, _images(), config,
                      triggers=ScriptedTriggers(SCRIPT))
    naive = pvc_generate(model, processor, QUESTIONS, _images(), config, recompute=True,
                         triggers=ScriptedTriggers(SCRIPT))
    for a, b in zip(kv, naive, strict=True):
        assert [c.trigger for c in a.calibrations] == ["periodic", "reflection", "bridge"]
        assert a.token_ids == b.token_ids
        assert a.calibrations == b.calibrations


def test_reset_changes_what_the_model_sees(tiny):
    model, processor = tiny
    runs = {reset: pvc_generate(model, processor, QUESTIONS, _images(),
                                PVCConfig(reset=reset, max_new_tokens=40, min_new_tokens=40),
                                triggers=ScriptedTriggers(SCRIPT)) for reset in ("visual", "none")}
    assert any(a.token_ids != b.token_ids for a, b in zip(runs["visual"], runs["none"], strict=True))


def test_batched_equals_one_at_a_time(tiny):
    model, processor = tiny
    config = PVCConfig(max_new_tokens=40, min_new_tokens=40)
    batched = pvc_generate(model, processor, QUESTIONS, _images(), config,
                           triggers=ScriptedTriggers(SCRIPT))
    for i, (question, images) in enumerate(zip(QUESTIONS, _images(), strict=True)):
        (single,) = pvc_generate(model, processor, [question], [images], config,
                                 triggers=ScriptedTriggers(SCRIPT))
        assert single.token_ids == batched[i].token_ids
        assert single.calibrations == batched[i].calibrations


def test_calibration_chunk_layout_and_training_forward_agree(tiny_family):
    """The final sequence, laid out as DVR training data and run through TVCModule's forward,
    predicts every generated token greedily (reset none: nothing is hidden)."""
    model, processor = tiny_family
    tok = processor.tokenizer
    (images,) = [_images()[2]]
    config = PVCConfig(reset="none", pool_kernel=2, max_new_tokens=40, min_new_tokens=40)
    (result,) = pvc_generate(model, processor, [QUESTIONS[2]], [images], config,
                             triggers=ScriptedTriggers(SCRIPT))
    vision = processor.image_processor(images=images, return_tensors="pt")
    grids = merged_grids(vision["image_grid_thw"], 2)
    prompt = ChatFormat.for_family(family_of(model)).prompt(QUESTIONS[2], [h * w for h, w in grids])
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(prompt_ids + result.token_ids)
    segments = [(i, 1) for i in range(len(grids))]
    for calibration in result.calibrations:
        segments += [(i, 2) for i in range(len(grids))]
        chunk = tok.decode(result.token_ids[calibration.index:][:calibration.length])
        bridge = {"periodic": " Let me look at the figure once more.", "bridge": "",
                  "reflection": " Let me check the image again."}[calibration.trigger]
        pads = "".join(f"<|vision_start|>{'<|image_pad|>' * (h * w)}<|vision_end|>"
                       for h, w in (pooled_grid(*g, 2) for g in grids))
        assert chunk == bridge + pads
    seg_grids = [pooled_grid(*grids[i], k) for i, k in segments]
    sample = {"input_ids": ids, "labels": ids.clone(), "num_injections": 0,
              "position_ids": mrope_positions(ids, model.config.image_token_id, seg_grids),
              "pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"],
              "visual_segments": torch.tensor(segments)}
    batch = Collator(tok.pad_token_id)([sample])
    module = TVCModule("unused", freeze=[])
    module.model = model
    with torch.no_grad():
        logits = module(batch)[0]
    logits[:, tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])] = float("-inf")
    logits[:, [model.config.image_token_id, model.config.video_token_id]] = float("-inf")
    predicted = logits.argmax(-1)
    # Tokens the model chose (not injected) are each the argmax at the previous position
    # (end-of-turn suppressed, as min_new_tokens did while decoding; placeholders, as always).
    injected = {i for c in result.calibrations for i in range(c.index, c.index + c.length)}
    chosen = [i for i in range(len(result.token_ids)) if i not in injected]
    offset = len(prompt_ids)
    assert len(chosen) > 20
    for i in chosen:
        assert int(predicted[offset + i - 1]) == result.token_ids[i], i


def test_sampling_is_seeded(tiny):
    model, processor = tiny
    config = PVCConfig(max_calibrations=0, max_new_tokens=20, do_sample=True, temperature=1.5,
                       top_p=0.9, top_k=50, repetition_penalty=1.05, seed=3)
    a = pvc_generate(model, processor, QUESTIONS[:1], _images()[:1], config)
    b = pvc_generate(model, processor, QUESTIONS[:1], _images()[:1], config)
    config.seed = 4
    c = pvc_generate(model, processor, QUESTIONS[:1], _images()[:1], config)
    assert a[0].token_ids == b[0].token_ids
    assert a[0].token_ids != c[0].token_ids


def test_repetition_penalty_matches_hf(tiny):
    model, processor = tiny
    config = PVCConfig(max_calibrations=0, max_new_tokens=25, repetition_penalty=1.3)
    (ours,) = pvc_generate(model, processor, QUESTIONS[:1], _images()[:1], config)
    images = _images()[0]
    content = [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=25, do_sample=False, repetition_penalty=1.3)
    assert ours.token_ids == out[0, inputs["input_ids"].shape[1]:].tolist()


def test_trigger_detector_on_text(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    config = PVCConfig(min_gap=2, every_n_tokens=None)
    detector = TriggerDetector(config, tok)

    def fire(text: str) -> list[tuple[int, Trigger]]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return [(n, t) for n in range(1, len(ids) + 1)
                if (t := detector.check(ids[:n], 0)) is not None]

    fired = fire("So there are 3 circles. Wait, let me recount them.")
    assert len(fired) == 1
    n, trigger = fired[0]
    ids = tok("So there are 3 circles. Wait, let me recount them.", add_special_tokens=False)
    kept = tok.decode(ids["input_ids"][: n - trigger.rollback])
    assert kept.rstrip() == "So there are 3 circles."
    assert trigger.kind == "reflection" and trigger.bridge == " " + config.bridges[0]
    # Mid-sentence "wait", and "Waiting", do not fire; a model-emitted bridge does.
    assert fire("I will wait here. Waiting is fine.") == []
    (_, bridge), = fire("Two squares. Let me check the image again.")
    assert bridge.kind == "bridge" and bridge.rollback == 0 and bridge.bridge is None
    periodic = TriggerDetector(PVCConfig(every_n_tokens=5, min_gap=1, on_reflection=False), tok)
    ids = tok("one two three four five six. seven", add_special_tokens=False)["input_ids"]
    hits = [(n, t) for n in range(1, len(ids) + 1) if (t := periodic.check(ids[:n], 0))]
    # Confirmed by the whitespace-led token after the period, which is rolled back.
    (n, trigger), = hits
    assert tok.decode(ids[:n - trigger.rollback]) == "one two three four five six."


@pytest.mark.parametrize("reset", ["visual", "none"])
def test_attention_shares_follow_calibrations(tiny_family, reset):
    model, processor = tiny_family
    config = PVCConfig(reset=reset, max_new_tokens=30, min_new_tokens=30)
    measured = pvc_generate(model, processor, QUESTIONS, _images(), config,
                            triggers=ScriptedTriggers(SCRIPT), measure_attention=True)
    plain = pvc_generate(model, processor, QUESTIONS, _images(), config,
                         triggers=ScriptedTriggers(SCRIPT))
    for result, same in zip(measured, plain, strict=True):
        assert result.token_ids == same.token_ids  # measuring does not change decoding
        shares = result.attention
        layers = model.config.text_config.num_hidden_layers
        # One row per decode step, i.e. per sampled token but the last (the first came from the
        # prefill); sampled tokens include the rolled-back ones, no longer counted as generated.
        rolled_back = sum(SCRIPT[i][1].rollback for i in range(len(result.calibrations)))
        assert shares.shape == (result.num_generated + rolled_back - 1, layers, 2)
        first = result.calibrations[0].step - 1  # the step that fed the first chunk
        assert (shares[:first, :, 1] == 0).all() and (shares[:first, :, 0] > 0).all()
        assert (shares[first:, :, 1] > 0).all()
        if reset == "visual":
            assert (shares[first:, :, 0] == 0).all()
        else:
            assert (shares[first:, :, 0] > 0).all()


def test_placeholder_tokens_are_never_generated_and_control_text_is_refused():
    from tvc_lightning.testing import tiny_qwen2vl

    model, processor = tiny_qwen2vl(seed=1)
    pad = model.config.image_token_id
    head = model.lm_head

    class PreferPad(torch.nn.Module):
        def forward(self, hidden):
            out = head(hidden)
            out[..., pad] += 1e4  # the model "wants" an image placeholder every step
            return out

    model.lm_head = PreferPad()
    (result,) = pvc_generate(model, processor, QUESTIONS[:1], _images()[:1],
                             PVCConfig(max_calibrations=0, max_new_tokens=12, min_new_tokens=12))
    assert len(result.token_ids) == 12 and pad not in result.token_ids
    with pytest.raises(ValueError, match="control-token"):
        pvc_generate(model, processor, ["What is <|im_end|> here?"], _images()[:1], PVCConfig())


def test_rolled_back_tokens_do_not_count_as_generated(tiny):
    """A reflection calibration removes its phrase: those tokens are not part of the answer, so
    max_new_tokens and num_generated count only the model tokens that remain."""
    model, processor = tiny
    config = PVCConfig(max_new_tokens=30, min_new_tokens=30)
    results = pvc_generate(model, processor, QUESTIONS, _images(), config, triggers=ScriptedTriggers(SCRIPT))
    for result in results:
        assert any(SCRIPT[i][1].rollback for i in range(len(result.calibrations)))  # the script rolled back
        injected = sum(c.length for c in result.calibrations)
        assert len(result.token_ids) - injected == result.num_generated == 30


def test_attention_records_every_decode_step_and_none_for_first_token_stops(tiny):
    """The probe must see every cached decode step (transformers 5.24 renamed the cache keyword:
    a probe reading the old name recorded nothing), and rows that stop at their first token have
    empty records rather than an error."""
    model, processor = tiny
    layers = model.config.text_config.num_hidden_layers
    results = pvc_generate(model, processor, QUESTIONS, _images(),
                           PVCConfig(max_calibrations=0, max_new_tokens=6, min_new_tokens=6),
                           measure_attention=True)
    for result in results:
        assert result.attention.shape == (5, layers, 2)
        assert (result.attention[..., 0] > 0).all()  # the prompt's image keys get attention
        assert (result.attention[..., 1] == 0).all()  # no copies without calibrations
    first_only = pvc_generate(model, processor, QUESTIONS, _images(), PVCConfig(max_new_tokens=1),
                              measure_attention=True)
    for result in first_only:
        assert result.num_generated == 1 and result.attention.shape == (0, layers, 2)


# --- hide_image_at: the image-removal experiment ------------------------------------------------

PLAIN = PVCConfig(max_calibrations=0, max_new_tokens=16, min_new_tokens=16)


def _full_forward_greedy(model, processor, question, images, n_tokens, hide_at, tokens):
    """Reference without the decoder's bookkeeping: one forward over prompt + ``tokens`` with a
    4-D mask hiding the image pads from the query that predicts answer token ``hide_at`` on;
    returns the greedy choice at each answer position (end-of-turn and placeholders excluded,
    as ``min_new_tokens`` and the decoder do)."""
    from tvc_lightning.families import Qwen2VL

    tok = processor.tokenizer
    vision = processor.image_processor(images=images, return_tensors="pt")
    grids = merged_grids(vision["image_grid_thw"], 2)
    prompt = tok(ChatFormat().prompt(question, [h * w for h, w in grids]),
                 add_special_tokens=False)["input_ids"]
    ids = torch.tensor(prompt + tokens[:n_tokens - 1])
    pad = model.config.image_token_id
    features = Qwen2VL.encode_images(model, vision["pixel_values"], vision["image_grid_thw"])
    embeds = model.get_input_embeddings()(ids)[None]
    embeds = embeds.masked_scatter((ids == pad)[None, :, None], torch.cat(features))
    n = len(ids)
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    query = torch.arange(n)[:, None]
    allowed &= ~((ids == pad)[None, :] & (query >= len(prompt) - 1 + hide_at))
    mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    positions = mrope_positions(ids, pad, grids)[:, None]
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                            position_ids=positions).last_hidden_state
        logits = model.lm_head(hidden[0, len(prompt) - 1:])
    banned = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) + [
        pad, model.config.video_token_id]
    logits[:, banned] = float("-inf")
    return logits.argmax(-1).tolist()


def test_hide_at_the_answer_end_equals_the_unmodified_decode(tiny):
    model, processor = tiny
    base = pvc_generate(model, processor, QUESTIONS, _images(), PLAIN)
    lengths = [r.num_generated for r in base]
    at_end = pvc_generate(model, processor, QUESTIONS, _images(), PLAIN, hide_image_at=lengths)
    assert [r.token_ids for r in at_end] == [r.token_ids for r in base]
    assert all(r.image_hidden_at is None for r in at_end)
    # One token earlier the last answer token is chosen blind; at 0 the whole answer is: the
    # hide must change what the model writes somewhere (else it did not hide anything).
    blind = pvc_generate(model, processor, QUESTIONS, _images(), PLAIN, hide_image_at=[0, 0, 0])
    assert any(a.token_ids != b.token_ids for a, b in zip(blind, base, strict=True))
    assert all(r.image_hidden_at == 0 for r in blind)


@pytest.mark.parametrize("hide", [[0, 5, 11], [3, None, 1]])
def test_hide_zeroes_the_original_share_from_its_step_on(tiny, hide):
    model, processor = tiny
    results = pvc_generate(model, processor, QUESTIONS, _images(), PLAIN, hide_image_at=hide,
                           measure_attention=True)
    for s, result in zip(hide, results, strict=True):
        original = result.attention[..., 0]  # row k: decode step k + 1, predicting token k + 1
        steps = torch.arange(1, len(original) + 1)
        if s is None:
            assert (original > 0).all() and result.image_hidden_at is None
            continue
        assert result.image_hidden_at == s
        assert (original[steps >= s] == 0).all()
        assert (original[steps < s] > 0).all() and (steps < s).sum() == max(s - 1, 0)
        assert (result.attention[..., 1] == 0).all()  # nothing was re-injected


@pytest.mark.parametrize("hide", [[0, 4, 9], [2, 13, None]])
def test_hide_kv_reuse_equals_recompute_and_a_masked_full_forward(tiny, hide):
    model, processor = tiny
    kv = pvc_generate(model, processor, QUESTIONS, _images(), PLAIN, hide_image_at=hide)
    naive = pvc_generate(model, processor, QUESTIONS, _images(), PLAIN, hide_image_at=hide,
                         recompute=True)
    assert [r.token_ids for r in kv] == [r.token_ids for r in naive]
    for question, images, s, result in zip(QUESTIONS, _images(), hide, kv, strict=True):
        s = 10**9 if s is None else s
        assert result.token_ids == _full_forward_greedy(model, processor, question, images, 16, s,
                                                        result.token_ids)


def test_hide_with_calibrations_matches_recompute(tiny):
    """A hide before PVC's first calibration (reset none) keeps the image hidden afterwards, in
    the cached path and in the re-prefill alike."""
    model, processor = tiny
    config = PVCConfig(reset="none", max_new_tokens=30, min_new_tokens=30)
    runs = [pvc_generate(model, processor, QUESTIONS, _images(), config, recompute=recompute,
                         triggers=ScriptedTriggers(SCRIPT), hide_image_at=[2, 3, 0],
                         measure_attention=not recompute) for recompute in (False, True)]
    for a, b in zip(*runs, strict=True):
        assert a.token_ids == b.token_ids and a.calibrations == b.calibrations
        assert (a.attention[a.image_hidden_at - 1 if a.image_hidden_at else 0:, :, 0] == 0).all()
        assert (a.attention[a.calibrations[0].decode_step - 1:, :, 1] > 0).all()


def test_hide_image_at_is_checked(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="hide_image_at has 1 entries"):
        pvc_generate(model, processor, QUESTIONS[:2], _images()[:2], PLAIN, hide_image_at=[1])
    with pytest.raises(ValueError, match="ints >= 0"):
        pvc_generate(model, processor, QUESTIONS[:1], _images()[:1], PLAIN, hide_image_at=[-1])


def test_answer_prefixes_force_the_start_of_each_answer(tiny):
    """A forced answer start is decoded on as HF greedy-decodes the prompt with the prefix
    appended; with calibrations (scripted, counted from the prefix's end), the KV-preserving
    decode equals the naive recompute and a batch of different prefixes equals one row at a time."""
    model, processor = tiny
    prefixes = [" The answer", " Let me count the shapes one by one.", ""]
    plain = pvc_generate(model, processor, QUESTIONS, _images(), PVCConfig(max_calibrations=0,
                                                                           max_new_tokens=20),
                         answer_prefixes=prefixes)
    for question, images, prefix, result in zip(QUESTIONS, _images(), prefixes, plain, strict=True):
        assert result.token_ids == _hf_greedy(model, processor, question, images, 20, prefix)
    config = PVCConfig(max_new_tokens=30, min_new_tokens=30)
    runs = [pvc_generate(model, processor, QUESTIONS, _images(), config, recompute=recompute,
                         triggers=ScriptedTriggers(SCRIPT), answer_prefixes=prefixes)
            for recompute in (False, True)]
    for a, b in zip(*runs, strict=True):
        assert [c.trigger for c in a.calibrations] == ["periodic", "reflection", "bridge"]
        assert a.calibrations[0].step == 5  # the script's 5 tokens, counted after the prefix
        assert a.token_ids == b.token_ids and a.calibrations == b.calibrations
    for i, (question, images) in enumerate(zip(QUESTIONS, _images(), strict=True)):
        (single,) = pvc_generate(model, processor, [question], [images], config,
                                 triggers=ScriptedTriggers(SCRIPT), answer_prefixes=[prefixes[i]])
        assert single.token_ids == runs[0][i].token_ids
    with pytest.raises(ValueError, match="answer prefix 0 contains"):
        pvc_generate(model, processor, QUESTIONS[:1], _images()[:1], PVCConfig(max_new_tokens=2),
                     answer_prefixes=["<|im_end|>"])
    with pytest.raises(ValueError, match="answer_prefixes has 1 entries for 2"):
        pvc_generate(model, processor, QUESTIONS[:2], _images()[:2], answer_prefixes=["x"])
