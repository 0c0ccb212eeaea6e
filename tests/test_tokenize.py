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


def test_dvr_off_equals_hf_processor(tiny):
    _, processor = tiny
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
