"""Shared fixtures: one tiny random Qwen2-VL (model, processor, checkpoint dir) per session."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tvc_lightning.testing import save_tiny_qwen2vl, tiny_qwen2vl


@pytest.fixture(scope="session")
def tiny():
    """``(model, processor)``: fp32, eval mode, seed 0."""
    return tiny_qwen2vl(seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A local HF checkpoint directory of the same tiny model."""
    return save_tiny_qwen2vl(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
