"""Offline-DVR records (``bridge_spans``): the schema field, and training shows the image once there.

An offline-DVR chain already holds its bridging prompt; training must show the (pooled) image
right after it in every epoch, whatever ``dvr.p`` is, and neither inject a second bridge and image
at that point nor treat the stored bridge as a fresh reflection point.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import random_image
from tvc_lightning.data.dvr import DEFAULT_BRIDGES, DVRTransform
from tvc_lightning.data.schema import InvalidRecord, SampleRecord
from tvc_lightning.data.tokenize import IGNORE_INDEX, SampleEncoder

BRIDGE = "Let me check the image again."
STORED = (f"First, count the circles. There are 2 circles. {BRIDGE} Yes, 2 circles. "
          "Wait, one more look. The final answer is \\boxed{2}.")
SPAN = [STORED.index(BRIDGE), STORED.index(BRIDGE) + len(BRIDGE)]
VS, VE, PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"


def record_json(spans: list[list[int]] | None = None, response: str = STORED) -> dict:
    data = {"id": "o1", "question": "How many circles?", "response": response, "answer": "2",
            "answer_type": "integer"}
    if spans is not None:
        data["bridge_spans"] = spans
    return data


def test_bridge_spans_round_trip_and_old_records_are_unchanged():
    stored = SampleRecord.from_json(json.dumps(record_json([SPAN])))
    assert stored.bridge_spans == (tuple(SPAN),)
    assert SampleRecord.from_json(stored.to_json()) == stored
    assert json.loads(stored.to_json())["bridge_spans"] == [SPAN]
    old = record_json()  # a shard written before the field existed
    plain = SampleRecord.from_json(json.dumps(old))
    assert plain.bridge_spans is None
    assert json.loads(plain.to_json()).keys() == {*old, "choices", "precision", "source"}


@pytest.mark.parametrize("spans", [
    [[0, len(STORED) + 1]],  # beyond the response
    [[-1, 4]],
    [[5, 5]],  # empty
    [[SPAN[1], SPAN[0]]],
    [[True, 4]],
    [[0, 3.5]],
    [[0, 1, 2]],
    [SPAN, [SPAN[0] + 1, SPAN[1] + 2]],  # overlapping
    [[SPAN[1] + 5, SPAN[1] + 8], SPAN],  # out of order
    [[SPAN[1], SPAN[1] + 1]],  # a bridge of blank text
    {"start": 1},
])
def test_bad_bridge_spans_are_invalid_records(spans):
    with pytest.raises(InvalidRecord) as info:
        SampleRecord.from_json(json.dumps(record_json(spans)))
    assert info.value.reason == "bad_record"


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_offline_dvr_record_shows_one_bridge_and_one_image_at_the_stored_point(tiny, p):
    _, processor = tiny
    tok = processor.tokenizer
    record = SampleRecord.from_json(json.dumps(record_json([SPAN])))
    image = random_image(224, 224)  # 8x8 merged tokens -> 2x2 pooled
    encoder = SampleEncoder(processor, dvr=DVRTransform(p=p, max_injections=1, pool_kernel=4))
    for epoch in range(12):
        sample = encoder(record, [image], epoch=epoch)
        ids, labels = sample["input_ids"], sample["labels"]
        full = tok.decode(ids)
        assert sample["visual_segments"].tolist() == [[0, 1], [0, 4]]
        assert sample["num_injections"] == 1
        assert full.count(VS) == 2
        assert f"There are 2 circles. {BRIDGE}{VS}{PAD * 4}{VE} Yes, 2 circles." in full
        # Exactly one bridge: the stored one; none added before it or at the later reflection.
        assert [full.count(b) for b in DEFAULT_BRIDGES] == [int(b == BRIDGE) for b in DEFAULT_BRIDGES]
        # The response (bridge included) is learned as stored; the image copy is not.
        assert tok.decode(ids[labels != IGNORE_INDEX]) == STORED + "<|im_end|>"


def test_stored_bridges_count_towards_max_injections(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    record = SampleRecord.from_json(json.dumps(record_json([SPAN])))
    dvr = DVRTransform(p=1.0, max_injections=2, pool_kernel=4, bridges=["Look again."])
    sample = SampleEncoder(processor, dvr=dvr)(record, [random_image(224, 224)], epoch=0)
    full = tok.decode(sample["input_ids"])
    assert sample["visual_segments"].tolist() == [[0, 1], [0, 4], [0, 4]]
    assert sample["num_injections"] == 2
    # The one free point is the later "Wait": the stored bridge is no fresh reflection point.
    assert f"{BRIDGE}{VS}{PAD * 4}{VE} Yes, 2 circles. Look again.{VS}{PAD * 4}{VE}Wait," in full
    assert full.count("Look again.") == 1


def test_old_record_without_the_field_encodes_as_before(tiny):
    _, processor = tiny
    image = random_image(224, 224)
    old = SampleRecord.from_json(json.dumps(record_json()))
    stored = SampleRecord.from_json(json.dumps(record_json([SPAN])))
    off = SampleEncoder(processor, dvr=DVRTransform(p=0.0))
    # With DVR off an old record shows no copy (it cannot say where one belongs) ...
    assert off(old, [image], epoch=0)["visual_segments"].tolist() == [[0, 1]]
    assert off(stored, [image], epoch=0)["visual_segments"].tolist() == [[0, 1], [0, 4]]
    # ... and with DVR on it is planned from its reflection points as any record is.
    on = SampleEncoder(processor, dvr=DVRTransform(p=1.0, bridges=["Look again."]))
    full = processor.tokenizer.decode(on(old, [image], epoch=0)["input_ids"])
    assert full.count("Look again.") == 1 and full.count(VS) == 2
