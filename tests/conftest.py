"""Shared fixtures: one tiny random Qwen2-VL (model, processor, checkpoint dir) per session."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tvc_lightning.families import FAMILIES
from tvc_lightning.testing import save_tiny_qwen2vl, tiny_model, tiny_qwen2vl


@pytest.fixture(scope="session")
def tiny():
    """``(model, processor)``: fp32, eval mode, seed 0."""
    return tiny_qwen2vl(seed=0)


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def tiny_family(request, tiny):
    """``(model, processor)`` of a tiny model of every supported family (the exactness suite):
    fp32, eval mode, seed 0; Qwen2-VL's is the session's ``tiny``."""
    return tiny if request.param == "qwen2_vl" else tiny_model(request.param, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A local HF checkpoint directory of the same tiny model."""
    return save_tiny_qwen2vl(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def rank_batch(processor, rank: int) -> dict:
    """A one-sample DVR training batch whose answer length depends on ``rank`` (so ranks hold
    different numbers of labelled tokens, as in real data-parallel training)."""
    from tvc_lightning.data.collate import Collator
    from tvc_lightning.data.dvr import DVRTransform
    from tvc_lightning.data.schema import SampleRecord
    from tvc_lightning.data.tokenize import SampleEncoder

    encoder = SampleEncoder(processor, dvr=DVRTransform(p=1.0, pool_kernel=2))
    response = "Two squares. Wait, let me count again. Two. " * (1 + 3 * rank)
    record = SampleRecord(id=f"r{rank}", question="How many squares?", response=response, answer="2")
    sample = encoder(record, [random_image(112, 84, seed=rank)], 0)
    return Collator(processor.tokenizer.pad_token_id)([sample])


def rank_decode(model, processor, rank: int, sync=None):
    """PVC-decode rank ``rank``'s question: rank 0 generates 10 tokens and calibrates at its 4th
    and 8th, the others generate 3 (so in a distributed run the others idle in step while rank 0
    decodes and re-injects its image). Returns the one result."""
    from tvc_lightning.pvc import PVCConfig, pvc_generate

    config = PVCConfig(max_new_tokens=10 if rank == 0 else 3, min_new_tokens=3, every_n_tokens=4,
                       periodic_at="token", min_gap=2, max_calibrations=2)
    (result,) = pvc_generate(model, processor, [f"Question {rank}?"],
                             [[random_image(100, 100, seed=10 + rank)]], config, sync=sync)
    return result


def assert_ranks_decoded_as_one_process(ranks: list[dict], model, processor) -> None:
    """Each rank's decoded tokens (``tokens``, ``num_generated`` in its report) equal a
    single-process run of the same question."""
    for r, seen in enumerate(ranks):
        single = rank_decode(model, processor, r)
        assert seen["num_generated"] == (10 if r == 0 else 3)
        # Rank 0 calibrated (its image went back in mid-decode), so equal tokens show PVC in step.
        assert [c.step for c in single.calibrations] == ([4, 8] if r == 0 else [])
        assert seen["tokens"] == single.token_ids


# Validation decodes that calibrate: every 6 tokens exactly (the random model's text has few
# sentence ends), 24 tokens per sample, so a test fails if PVC stops re-injecting the image.
CALIBRATING = ["--model.generation.max_new_tokens", "24", "--model.generation.min_new_tokens", "24",
               "--model.generation.every_n_tokens", "6", "--model.generation.periodic_at", "token",
               "--model.generation.min_gap", "4"]


def assert_pvc_calibrated(rows: list[dict]) -> None:
    """Logged validation shows PVC at work: calibrations, attention on the re-injected copies, and
    (reset: visual) none on the original image late in the response, unlike plain decoding."""
    last = {k: v for r in rows for k, v in r.items()}
    assert last["val/pvc_calibrations_per_sample"] > 0
    late = "val/visual_attention/{}_{}_bin7"
    assert last[late.format("pvc", "copy")] > 0 and last[late.format("pvc", "original")] == 0
    assert last[late.format("plain", "copy")] == 0 and last[late.format("plain", "original")] > 0
