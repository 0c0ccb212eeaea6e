"""The data pipeline's ids, masks and pixels equal HF's Qwen2-VL processor (DVR off)."""

from __future__ import annotations

import torch

from tests.conftest import random_image
from tvc_lightning.data.collate import Collator
from tvc_lightning.data.dvr import DVRTransform
from tvc_lightning.data.schema import SampleRecord
from tvc_lightning.data.tokenize import IGNORE_INDEX, SampleEncoder

RESPONSE = (
    "First, count the circles. There are 2 circles. Wait, let me double-check the count. "
    "Yes, 2 circles. The final answer is \\boxed{2}."
)


def _record(i: int = 0, response: str = RESPONSE) -> SampleRecord:
    return SampleRecord(id=f"s{i}", question=f"How many circles are there? ({i})",
                        response=response, answer="2", answer_type="integer")


def _hf_batch(processor, records, images):
    texts = []
    for r in records:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.question}]},
            {"role": "assistant", "content": [{"type": "text", "text": r.response}]},
        ]
        texts.append(processor.apply_chat_template(messages, tokenize=False))
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def test_dvr_off_equals_hf_processor(tiny_family):
    """Token for token what HF's processor makes of the family's chat template (Qwen3-VL's
    writes no default system turn)."""
    _, processor = tiny_family
    records = [_record(0), _record(1, "Short answer: \\boxed{5}.")]
    images = [random_image(150, 200, seed=1), random_image(90, 60, seed=2)]
    encoder = SampleEncoder(processor, dvr=None)
    batch = Collator(processor.tokenizer.pad_token_id)(
        [encoder(r, [im], epoch=0) for r, im in zip(records, images, strict=True)]
    )
    hf = _hf_batch(processor, records, images)
    assert torch.equal(batch["input_ids"], hf["input_ids"])
    assert torch.equal(batch["attention_mask"], hf["attention_mask"])
    assert torch.equal(batch["pixel_values"], hf["pixel_values"])
    assert torch.equal(batch["image_grid_thw"], hf["image_grid_thw"])
    assert batch["num_injections"].tolist() == [0, 0]


def test_labels_cover_exactly_the_response(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    sample = SampleEncoder(processor)(_record(), [random_image(64, 64)], epoch=0)
    ids, labels = sample["input_ids"], sample["labels"]
    learned = labels != IGNORE_INDEX
    assert torch.equal(labels[learned], ids[learned])
    # The learned tokens decode to the response followed by <|im_end|>, nothing else.
    assert tok.decode(ids[learned]) == RESPONSE + "<|im_end|>"
    assert not learned[ids == tok.convert_tokens_to_ids("<|image_pad|>")].any()


def test_dvr_injects_bridge_and_pooled_image(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    dvr = DVRTransform(p=1.0, max_injections=1, pool_kernel=4, bridges=["Let me check the image again."])
    image = random_image(224, 224)  # 16x16 patches -> 8x8 merged tokens -> 2x2 pooled
    sample = SampleEncoder(processor, dvr=dvr)(_record(), [image], epoch=0)
    ids, labels = sample["input_ids"], sample["labels"]
    assert sample["num_injections"] == 1
    assert sample["visual_segments"].tolist() == [[0, 1], [0, 4]]
    assert int((ids == pad).sum()) == 64 + 4
    # The bridge sits right before the reflection sentence and is learned with the response.
    learned_text = tok.decode(ids[labels != IGNORE_INDEX])
    expected = RESPONSE.replace("Wait,", "Let me check the image again.Wait,") + "<|im_end|>"
    assert learned_text == expected
    full = tok.decode(ids)
    vs, ve = "<|vision_start|>", "<|vision_end|>"
    assert f"Let me check the image again.{vs}{'<|image_pad|>' * 4}{ve}Wait," in full
    # Neither image run nor its markers is learned.
    for marker in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"):
        assert not (labels == tok.convert_tokens_to_ids(marker)).any()


def test_dvr_p0_is_plain_sft(tiny):
    _, processor = tiny
    image = random_image(100, 100)
    plain = SampleEncoder(processor)(_record(), [image], epoch=3)
    off = SampleEncoder(processor, dvr=DVRTransform(p=0.0))(_record(), [image], epoch=3)
    assert torch.equal(plain["input_ids"], off["input_ids"])
    assert torch.equal(plain["labels"], off["labels"])


def test_too_long_is_skipped(tiny):
    import pytest

    from tvc_lightning.data.shards import SkipSample

    _, processor = tiny
    with pytest.raises(SkipSample) as info:
        SampleEncoder(processor, max_length=20)(_record(), [random_image(64, 64)], epoch=0)
    assert info.value.reason == "too_long"


def test_control_token_text_in_a_record_is_skipped(tiny):
    import pytest

    from tvc_lightning.data.shards import SkipSample

    _, processor = tiny
    encoder = SampleEncoder(processor)
    for bad in (_record(response="Three.<|im_end|>\n<|im_start|>user\nmore"),
                SampleRecord(id="q", question="Count <|image_pad|> here", response="2", answer="2")):
        with pytest.raises(SkipSample) as info:
            encoder(bad, [random_image(64, 64)], epoch=0)
        assert info.value.reason == "bad_record"


# --- conversation records (system prompt, several turns, images where their placeholders are) --

LONG = ("Look at both figures. The left one has 2 circles. Wait, let me check the right one. "
        "It has 3. So 5 in all. The final answer is \\boxed{5}.")


def _conversation(system: str | None = "You count shapes."):
    from tvc_lightning.data.schema import Turn

    turns = (
        Turn("user", "<image>What is on the left?"),
        Turn("assistant", "Circles."),
        Turn("user", "And here <image> on the right: how many in all?"),
        Turn("assistant", LONG, dvr=True),
    )
    return SampleRecord(id="c1", question="What is on the left?", response=LONG, answer="5",
                        system=system, turns=turns)


def _hf_messages(record):
    """The same conversation as HF chat messages (content parts where the images are)."""
    messages = [] if record.system is None else [{"role": "system", "content": record.system}]
    for turn in record.turns:
        parts = []
        for i, text in enumerate(turn.content.split("<image>")):
            if i:
                parts.append({"type": "image"})
            if text:
                parts.append({"type": "text", "text": text})
        messages.append({"role": turn.role, "content": parts})
    return messages


def _assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of each assistant answer and its <|im_end|> in a rendered chat."""
    head, end = "<|im_start|>assistant\n", "<|im_end|>"
    spans, at = [], text.find(head)
    while at >= 0:
        start = at + len(head)
        stop = text.index(end, start) + len(end)
        spans.append((start, stop))
        at = text.find(head, stop)
    return spans


def test_multi_turn_labels_cover_exactly_the_assistant_turns_of_hfs_rendering(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    record = _conversation()
    images = [random_image(120, 90, seed=3), random_image(64, 100, seed=4)]
    sample = SampleEncoder(processor, dvr=None)(record, images, epoch=0)
    rendered = processor.apply_chat_template(_hf_messages(record), tokenize=False)
    hf = processor(text=[rendered], images=images, return_tensors="pt")
    assert torch.equal(sample["input_ids"], hf["input_ids"][0])
    assert torch.equal(sample["pixel_values"], hf["pixel_values"])
    # HF's rendering, tokenized with offsets: tokens starting inside an assistant span are answers.
    enc = tok(rendered, return_offsets_mapping=True, add_special_tokens=False)
    spans = _assistant_spans(rendered)
    assert len(spans) == 2
    expected = [i for i, (s, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
                if any(a <= s < b for a, b in spans)]
    learned = sample["labels"] != IGNORE_INDEX
    assert sample["input_ids"][learned].tolist() == expected
    assert tok.decode(sample["input_ids"][learned]) == "Circles.<|im_end|>" + LONG + "<|im_end|>"
    assert torch.equal(sample["labels"][learned], sample["input_ids"][learned])
    # The system prompt, both questions and the images are never learned.
    assert f"<|im_start|>system\n{record.system}<|im_end|>" in tok.decode(sample["input_ids"])
    assert sample["visual_segments"].tolist() == [[0, 1], [1, 1]]


def test_multi_turn_dvr_only_in_the_long_cot_turn_with_the_images_seen_so_far(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    bridge = "Let me check the image again."
    dvr = DVRTransform(p=1.0, max_injections=1, pool_kernel=4, bridges=[bridge])
    encoder = SampleEncoder(processor, dvr=dvr)
    record = _conversation(system=None)
    images = [random_image(224, 224, seed=5), random_image(224, 224, seed=6)]  # 64 tokens, 4 pooled
    sample = encoder(record, images, epoch=0)
    assert sample["num_injections"] == 1
    assert sample["visual_segments"].tolist() == [[0, 1], [1, 1], [0, 4], [1, 4]]
    assert int((sample["input_ids"] == pad).sum()) == 2 * 64 + 2 * 4
    learned = tok.decode(sample["input_ids"][sample["labels"] != IGNORE_INDEX])
    assert learned == "Circles.<|im_end|>" + LONG.replace("Wait,", bridge + "Wait,") + "<|im_end|>"
    full = tok.decode(sample["input_ids"])
    assert full.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert "<|im_start|>assistant\nCircles.<|im_end|>" in full  # the short answer: no DVR
    assert encoder.longest(record, images) >= max(
        int(encoder(record, images, epoch=e)["input_ids"].numel()) for e in range(4))


def test_single_turn_record_with_a_system_prompt_equals_hf(tiny):
    _, processor = tiny
    record = SampleRecord(id="s", question="How many?", response=RESPONSE, answer="2",
                          system="Be brief.")
    image = random_image(80, 80, seed=7)
    sample = SampleEncoder(processor, dvr=DVRTransform(p=1.0))(record, [image], epoch=0)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": RESPONSE}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    hf = processor(text=[text], images=[image], return_tensors="pt")
    plain = SampleEncoder(processor, dvr=None)(record, [image], epoch=0)
    assert torch.equal(plain["input_ids"], hf["input_ids"][0])
    assert sample["num_injections"] == 1  # DVR still applies to a single-turn response


def test_image_count_must_match_the_placeholders(tiny):
    import pytest

    from tvc_lightning.data.shards import SkipSample

    _, processor = tiny
    with pytest.raises(SkipSample) as info:
        SampleEncoder(processor)(_conversation(), [random_image(64, 64)], epoch=0)
    assert info.value.reason == "bad_record" and "placeholders" in str(info.value)
