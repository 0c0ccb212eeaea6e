"""Model FLOPs of a Qwen VL training step, and model FLOPs utilization (MFU) against a device's peak.

Counted the usual way (a multiply-add is 2 FLOPs), per step, from the batch's real (non-pad)
tokens only, so padding and packing waste show up as lower utilization:

- every weight matmul costs ``2 x params x tokens`` forward; backward adds ``2 x params x
  tokens`` for the weight gradient if the weight trains, and as much for the input gradient if
  anything upstream of it trains (the gradient must flow through it). A frozen vision tower runs
  under ``no_grad``: forward only. Trained, its matmuls cost 6x (the patch embedding 4x: pixels
  need no gradient);
- attention scores and values cost ``4 x heads x head_dim`` per attended (query, key) pair,
  forward; backward twice that. Language-model attention is causal within each sample
  (``n (n + 1) / 2`` pairs for ``n`` tokens); the vision tower attends fully within each image
  frame (``(h w)^2`` pairs per frame), or within each window in Qwen2.5-VL's windowed blocks;
- the output head runs only at labelled positions (the chunked loss never builds the other logits);
- embeddings (a lookup), norms, activations, rotary and biases are left out (well under 1%).

Gradient-checkpointing recomputation is not counted: MFU measures the model's work, not the
hardware's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

MATMULS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Matmuls of a decoder layer in data-flow order; those in one group read the same input.
_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets. Matched as
# substrings of the device name, in this order (so "H100 PCIe" wins over "H100", "L40S" over "L4").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM (the name is "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),  # AWS's A10G: fewer tensor-core clocks than the A10
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.0),
    ("A6000", 155.0),
    ("RTX 4090", 165.0),  # GeForce: bf16 with fp32 accumulation runs at half the fp16 rate
    ("RTX 3090", 71.0),
    ("MI300X", 1307.0),
)


@dataclass(frozen=True)
class TextShape:
    """Qwen2-VL language model dimensions."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    def matmul_params(self) -> dict[str, int]:
        """Weights of each matmul of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        ffn = self.hidden * self.intermediate
        return {"q_proj": self.hidden * q, "k_proj": self.hidden * kv, "v_proj": self.hidden * kv,
                "o_proj": q * self.hidden, "gate_proj": ffn, "up_proj": ffn, "down_proj": ffn}


@dataclass(frozen=True)
class VisionShape:
    """Vision tower dimensions: ViT blocks over patches, 2-layer merger MLP(s).

    ``mlp_matrices``: 2 for a GELU MLP (Qwen2-VL, Qwen3-VL), 3 for SwiGLU (Qwen2.5-VL).
    ``mergers``: the main merger plus Qwen3-VL's DeepStack mergers. ``window``: side of the
    attention window in patches for windowed blocks (Qwen2.5-VL; 0: every block attends over the
    whole frame), ``full_blocks`` of the ``depth`` blocks attend over the whole frame anyway.
    """

    dim: int
    depth: int
    mlp_hidden: int
    patch_inputs: int  # channels x temporal patch x patch x patch: one patch's input values
    merge: int
    out_dim: int
    mlp_matrices: int = 2
    mergers: int = 1
    window: int = 0
    full_blocks: int | None = None

    @property
    def block_params(self) -> int:
        return 4 * self.dim * self.dim + self.mlp_matrices * self.dim * self.mlp_hidden

    @property
    def merger_params(self) -> int:
        wide = self.dim * self.merge * self.merge
        return wide * wide + wide * self.out_dim

    def attention_pairs(self, grid: Sequence[int]) -> int:
        """Attended (query, key) pairs of one ``(t, h, w)`` patch grid, summed over the blocks."""
        t, h, w = grid
        full = t * (h * w) ** 2
        if not self.window:
            return self.depth * full
        # Windows tile the frame from its corner; the last row/column of windows may be partial.
        sides = lambda n: [min(self.window, n - i) for i in range(0, n, self.window)]  # noqa: E731
        windowed = t * sum(r * r for r in sides(h)) * sum(c * c for c in sides(w))
        n_full = self.depth if self.full_blocks is None else self.full_blocks
        return n_full * full + (self.depth - n_full) * windowed


@dataclass(frozen=True)
class ModelShape:
    text: TextShape
    vision: VisionShape

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a supported family's config (transformers 5.x, nested ``text_config``)."""
        from tvc_lightning.families import family_of

        text = getattr(config, "text_config", None) or config
        heads = int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(
            TextShape(int(text.hidden_size), int(text.num_hidden_layers), heads,
                      int(text.num_key_value_heads), int(head_dim), int(text.intermediate_size),
                      int(text.vocab_size)),
            family_of(config).vision_shape(config.vision_config),
        )


@dataclass(frozen=True)
class Trainable:
    """Which parts train. ``layers[i]`` maps each of :data:`MATMULS` of decoder layer ``i`` to
    whether its weight trains; None: every layer's all do."""

    vision: bool = False
    embed: bool = True
    layers: tuple[dict[str, bool], ...] | None = None
    head: bool = True

    @classmethod
    def from_model(cls, model: Any) -> Trainable:
        """Read ``requires_grad`` off a model of a supported family."""
        from tvc_lightning.families import family_of

        family = family_of(model)
        language = family.language_model(model)
        trains = lambda m: any(p.requires_grad for p in m.parameters())  # noqa: E731
        layers = tuple(
            {name: trains(getattr(layer.self_attn if name[0] in "qkvo" else layer.mlp, name))
             for name in MATMULS}
            for layer in language.layers
        )
        return cls(trains(family.vision_tower(model)), trains(language.embed_tokens), layers,
                   trains(model.lm_head))


@dataclass
class StepFlops:
    """One step's model FLOPs by part (forward + backward)."""

    vision: float = 0.0
    text: float = 0.0
    attention: float = 0.0
    head: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.vision + self.text + self.attention + self.head


def step_flops(shape: ModelShape, trainable: Trainable, sample_lengths: Sequence[int],
               image_grids: Sequence[Sequence[int]], head_tokens: int) -> StepFlops:
    """Model FLOPs of one forward+backward over samples of ``sample_lengths`` real tokens, whose
    images have ``(t, h, w)`` patch grids ``image_grids`` (each encoded once), with the head
    applied at ``head_tokens`` labelled positions."""
    out = StepFlops()
    v = shape.vision
    patches = sum(t * h * w for t, h, w in image_grids)
    pairs = sum(v.attention_pairs(g) for g in image_grids)
    linear, embed_factor, attn = (6, 4, 3) if trainable.vision else (2, 2, 1)
    out.vision = (embed_factor * v.patch_inputs * v.dim * patches
                  + linear * v.depth * v.block_params * patches
                  + linear * v.mergers * v.merger_params * patches // (v.merge * v.merge)
                  + attn * 4 * v.dim * pairs)

    t = shape.text
    tokens = sum(sample_lengths)
    causal_pairs = sum(n * (n + 1) // 2 for n in sample_lengths)
    params = t.matmul_params()
    upstream = trainable.vision or trainable.embed  # something before this point trains
    all_train = dict.fromkeys(MATMULS, True)
    for i in range(t.layers):
        layer = trainable.layers[i] if trainable.layers is not None else all_train
        for g, group in enumerate(_GROUPS):
            for name in group:
                factor = 2 + 2 * layer[name] + 2 * upstream
                out.text += factor * params[name] * tokens
            upstream = upstream or any(layer[name] for name in group)
            if g == 0:  # attention sits between q/k/v and o
                out.attention += (1 + 2 * upstream) * 4 * t.heads * t.head_dim * causal_pairs
    out.head = (2 + 2 * trainable.head + 2 * upstream) * t.hidden * t.vocab * head_tokens
    out.parts = {"vision": out.vision, "text": out.text, "attention": out.attention,
                 "head": out.head}
    return out


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s from :data:`PEAK_BF16_TFLOPS`; None on CPU or for
    an unknown GPU."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_for_name(torch.cuda.get_device_name(torch.device(device)))


def peak_for_name(name: str) -> float | None:
    """Peak FLOP/s of the GPU called ``name`` (``torch.cuda.get_device_name``), if known."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def throughput_metrics(flops: float, real_tokens: int, processed_tokens: int, seconds: float,
                       peak: float | None) -> dict[str, float]:
    """Per-step figures to log: real tokens/s, model TFLOP/s, MFU (when ``peak`` is known) and the
    share of processed token slots that hold real tokens."""
    seconds = max(seconds, 1e-9)
    metrics = {
        "train/tokens_per_s_per_device": real_tokens / seconds,
        "train/tflops_per_device": flops / seconds / 1e12,
        "train/packing_efficiency": real_tokens / max(processed_tokens, 1),
    }
    if peak:
        metrics["train/mfu"] = flops / seconds / peak
    return metrics


class ThroughputMeter:
    """Times training batches end to end and turns each into :func:`throughput_metrics`.

    A batch's time runs from the previous batch's end (data loading, forward, backward and any
    optimizer step in between), or from its own start after a pause (the first batch, or after
    validation: call :meth:`pause`). Reading the batch's sizes off the device waits for its
    kernels, so the clock stops after the work, not after its launch.

    Args:
        peak_flops: The device's peak FLOP/s (None: no MFU).
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        self.peak_flops = peak_flops
        self._since: float | None = None
        self._shape: ModelShape | None = None
        self._trainable: Trainable | None = None

    def start(self) -> None:
        """A batch starts: the clock runs from here unless it already runs from the last end."""
        if self._since is None:
            self._since = time.perf_counter()

    def pause(self) -> None:
        """Stop the clock until the next :meth:`start` (what runs meanwhile is not training)."""
        self._since = None

    def step(self, model: Any, batch: dict[str, Any]) -> dict[str, float]:
        """The metrics of the batch that just ended, on ``model`` (a Qwen2-VL)."""
        from tvc_lightning.data.packing import sample_lengths
        from tvc_lightning.data.tokenize import IGNORE_INDEX

        if self._shape is None:
            self._shape, self._trainable = ModelShape.from_config(model.config), \
                Trainable.from_model(model)
        lengths = sample_lengths(batch).tolist()
        head_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        grids = batch["image_grid_thw"].tolist() if "image_grid_thw" in batch else []
        now = time.perf_counter()
        elapsed = now - (self._since if self._since is not None else now)
        self._since = now
        assert self._trainable is not None
        flops = step_flops(self._shape, self._trainable, lengths, grids, head_tokens).total
        return throughput_metrics(flops, sum(lengths), batch["input_ids"].numel(), elapsed,
                                  self.peak_flops)
