"""Loading refuses what would train quietly wrong: NaN/inf weights, and hub ids it would download."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import time

import numpy as np
import pytest

from tvc_lightning.hf import load_model, load_processor


def _randomize_tensors(safetensors_file, seed: int = 0) -> None:
    """Overwrite every tensor's bytes with random ones, keeping the header (a corrupt copy)."""
    data = bytearray(safetensors_file.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    start = 8 + header_len
    rng = np.random.default_rng(seed)
    data[start:] = rng.integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()
    safetensors_file.write_bytes(bytes(data))


def test_load_model_rejects_nonfinite_weights_naming_file_tensor_and_setting(tmp_path, tiny_checkpoint):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoint, corrupt)
    _randomize_tensors(corrupt / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.model_name_or_path=.*model\.safetensors holds "
                                         r"NaN/inf in tensor '[^']+'"):
        load_model(corrupt)


def test_finite_weights_still_load(tiny_checkpoint):
    assert load_model(tiny_checkpoint) is not None


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any connection attempt fails loudly; the HF cache is an empty folder."""
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return tmp_path / "hub"


@pytest.mark.parametrize("path", ["nobody/no-such-model", "outputs/model"])
def test_missing_hub_like_path_fails_at_once_naming_the_setting(no_network, path):
    began = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"model\.model_name_or_path='" + path):
        load_model(path)
    with pytest.raises(FileNotFoundError, match=r"model\.model_name_or_path"):
        load_processor(path)
    assert time.perf_counter() - began < 5


def test_hub_id_in_the_local_cache_loads_without_network(no_network, tiny_checkpoint):
    repo = no_network / "models--someone--tiny-qwen2vl"
    commit = "0" * 40
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = load_model("someone/tiny-qwen2vl")
    assert model.config.image_token_id == json.loads(
        (tiny_checkpoint / "config.json").read_text())["image_token_id"]
    assert load_processor("someone/tiny-qwen2vl").tokenizer is not None
