"""The distill filter's length is training's: a chain it keeps is never skipped for length there.

Training (``SampleEncoder``) skips samples over ``data.max_length`` tokens counting the prompt, the
images at the processor's pixel limits, the pooled DVR copies and the response; the filter measures
the same thing (``TrainingLength``: the longest encoding any epoch's DVR plan gives) against the
same limit, so the two agree at the boundary.
"""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from data_engine.distill import distill
from data_engine.filters import ChainChecker, FilterConfig
from data_engine.lengths import TrainingLength, TrainingShape
from tests.conftest import random_image
from tests.test_distill import FakeTeacher, chain, parse, question, shard_records, write_mathvision
from tvc_lightning.data.dvr import DVRTransform
from tvc_lightning.data.schema import SampleRecord
from tvc_lightning.data.shards import SkipSample
from tvc_lightning.data.tokenize import ChatFormat, SampleEncoder
from tvc_lightning.hf import load_processor

EPOCHS = 40


def png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    random_image(width, height, seed=3).save(buf, format="PNG")
    return buf.getvalue()


def training_lengths(processor, record, images, max_length, max_injections, suffix=""):
    """Token counts of ``record`` over ``EPOCHS`` epochs of training (None: skipped as too long)."""
    encoder = SampleEncoder(processor, max_length=max_length,
                            dvr=DVRTransform(p=1.0, max_injections=max_injections, pool_kernel=4),
                            chat=ChatFormat(question_suffix=suffix))
    lengths = []
    for epoch in range(EPOCHS):
        try:
            lengths.append(int(encoder(record, images, epoch)["input_ids"].numel()))
        except SkipSample as skip:
            assert skip.reason == "too_long"
            lengths.append(None)
    return lengths


@pytest.mark.parametrize("max_injections", [1, 2])
def test_kept_at_the_boundary_is_never_skipped_and_one_more_token_is_refused(tiny_checkpoint,
                                                                             max_injections):
    processor = load_processor(tiny_checkpoint)
    response = chain(3, filler=40, reflections=3)
    record = SampleRecord(id="q1", question="How many dots?", response=response, answer="3",
                          answer_type="integer")
    image = png_bytes(224, 168)
    shape = TrainingShape(max_length=10_000, max_injections=max_injections, pool_kernel=4,
                          question_suffix=" Think step by step.")
    measured = TrainingLength(processor, shape)(record, [image])
    pil = [random_image(224, 168, seed=3)]
    at_limit = training_lengths(processor, record, pil, measured, max_injections, shape.question_suffix)
    assert None not in at_limit  # never skipped at max_length == the measured length
    if max_injections == 1:
        assert max(at_limit) == measured  # and the measure is exact: some epoch reaches it
    checker = ChainChecker(FilterConfig(min_tokens=0, max_length=measured), len,
                           TrainingLength(processor, shape))
    verdict = checker.check(response, record, [image])
    assert verdict.ok and verdict.length == measured
    # One token less: the filter refuses, and training would indeed have skipped it.
    tighter = ChainChecker(FilterConfig(min_tokens=0, max_length=measured - 1), len,
                           TrainingLength(processor, shape))
    assert tighter.check(response, record, [image]).reason == "too_long"
    if max_injections == 1:
        assert None in training_lengths(processor, record, pil, measured - 1, 1, shape.question_suffix)


def test_offline_dvr_record_length_counts_its_stored_copy(tiny_checkpoint):
    processor = load_processor(tiny_checkpoint)
    bridge = "Let me check the image again."
    response = f"I count the dots. {bridge} Wait, there are 3. The answer is \\boxed{{3}}."
    start = response.index(bridge)
    record = SampleRecord(id="d", question="How many?", response=response, answer="3",
                          bridge_spans=((start, start + len(bridge)),))
    image = random_image(224, 224)
    measured = TrainingLength(processor, TrainingShape(max_injections=1))(record, [image])
    encoder = SampleEncoder(processor, max_length=measured, dvr=DVRTransform(p=1.0))
    assert {int(encoder(record, [image], e)["input_ids"].numel()) for e in range(10)} == {measured}


def test_distill_keeps_only_what_training_keeps(tmp_path, tiny_checkpoint):
    src = write_mathvision(tmp_path / "in", 2)
    fits, too_long = chain(0, filler=30, reflections=2), chain(1, filler=60, reflections=2)
    processor = load_processor(tiny_checkpoint)
    image = (tmp_path / "in" / "0.png").read_bytes()
    pil = [Image.open(io.BytesIO(image)).convert("RGB")]

    def longest_in_training(i: int, response: str) -> int:
        """The oracle: the longest sample training makes of this chain over many epochs."""
        record = SampleRecord(id=f"mathvision-{i}", question=question(i), response=response,
                              answer=str(i))
        return max(training_lengths(processor, record, pil, 10_000, 1))

    limit = longest_in_training(0, fits)  # the boundary: this chain fits exactly
    assert longest_in_training(1, too_long) > limit
    teacher = FakeTeacher({question(0): [[fits]], question(1): [[too_long]]})
    out = tmp_path / "out"
    report = distill(parse("--format", "mathvision", "--input", src, "--out", out, "--teacher", "x:y",
                           "--tokenizer", tiny_checkpoint, "--min-tokens", 0, "--max-length", limit,
                           "--rounds", 1, "--no-progress"), teacher)
    assert report["kept"] == 1 and report["rejected"] == {"too_long": 1}
    (kept,) = shard_records(sorted(out.glob("*.tar")))
    assert kept.response == fits
    entries = {e["key"]: e for e in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert entries["mathvision-0"]["length"] == limit
    assert entries["mathvision-1"]["reason"] == "too_long"
    assert None not in training_lengths(processor, kept, pil, limit, 1)
