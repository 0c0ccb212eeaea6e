"""Decode throughput: PVC with KV reuse vs plain decoding vs naive PVC (re-prefill per calibration).

All runs use one random Qwen2-VL of the chosen shape, the same prompts and images, greedy
decoding of exactly ``--new-tokens`` tokens (end-of-turn suppressed), in one process:

- ``hf_generate``: HF ``model.generate`` (the obvious plain baseline);
- ``plain``: ``pvc_generate`` with calibrations off;
- ``pvc_kv``: a calibration every ``--every`` tokens, KV cache kept (``reset: visual``);
- ``pvc_naive``: the same calibrations, whole sequence re-prefilled at each one.

tokens/s counts generated tokens (injected chunks excluded). Examples:

    python benchmarks/pvc_decode.py                                  # CPU, small model
    python benchmarks/pvc_decode.py --device cuda --dtype bfloat16 --shape 2b --new-tokens 2048
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from PIL import Image

from tvc_lightning.pvc import PVCConfig, pvc_generate
from tvc_lightning.pvc.triggers import Trigger
from tvc_lightning.testing import build_tiny_processor, tiny_qwen2vl

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab, vision depth, vision dim, vision heads
    "small": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                  intermediate_size=768, vocab_size=8192, vision_depth=2, vision_dim=64,
                  vision_heads=2),
    "2b": dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
               intermediate_size=8960, vocab_size=151936, vision_depth=32, vision_dim=1280,
               vision_heads=16),
}


class EveryN:
    """Calibrate every ``n`` generated tokens, wherever the sentence is (benchmark trigger)."""

    def __init__(self, n: int, bridge: str) -> None:
        self.n, self.bridge = n, bridge

    def check(self, segment: list[int], calibrations: int) -> Trigger | None:
        return Trigger("periodic", 0, self.bridge) if len(segment) == self.n else None


def _image(seed: int, size: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--every", type=int, default=256, help="tokens between calibrations")
    parser.add_argument("--image-size", type=int, default=448, help="pixels (448: 256 tokens)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    model, _ = tiny_qwen2vl(seed=0, **SHAPES[args.shape])
    processor = build_tiny_processor(max_pixels=args.image_size**2)
    model = model.to(args.device, getattr(torch, args.dtype)).eval()
    questions = [f"How many shapes are in picture {i}?" for i in range(args.batch)]
    images = [[_image(i, args.image_size)] for i in range(args.batch)]
    n = args.new_tokens
    base = dict(max_new_tokens=n, min_new_tokens=n)
    bridge = " Let me check the image again."

    def hf_generate() -> int:
        content = [{"type": "image"}, {"type": "text", "text": questions[0]}]
        text = processor.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text] * args.batch, images=[im[0] for im in images],
                           return_tensors="pt", padding=True).to(args.device)
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return (out.shape[1] - inputs["input_ids"].shape[1]) * args.batch

    def run(config: PVCConfig, recompute: bool, triggers) -> int:
        results = pvc_generate(model, processor, questions, images, config, recompute=recompute,
                               triggers=triggers)
        return sum(r.num_generated for r in results)

    every = EveryN(args.every, bridge)
    cases = {
        "hf_generate": hf_generate,
        "plain": lambda: run(PVCConfig(max_calibrations=0, **base), False, None),
        "pvc_kv": lambda: run(PVCConfig(max_calibrations=10**6, **base), False, every),
        "pvc_naive": lambda: run(PVCConfig(max_calibrations=10**6, **base), True, every),
    }
    with torch.inference_mode():
        # Warm-up: allocator, kernels, the tokenizer's piece table.
        run(PVCConfig(max_calibrations=0, max_new_tokens=8), False, None)
        rates = dict.fromkeys(cases, 0.0)
        # Round-robin over methods, best of --repeats: a burst of load on the machine then hits
        # one repeat of each method rather than all repeats of one.
        for _ in range(args.repeats):
            for name, fn in cases.items():
                _sync(args.device)
                start = time.perf_counter()
                tokens = fn()
                _sync(args.device)
                rates[name] = max(rates[name], tokens / (time.perf_counter() - start))
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"device {args.device}, {args.dtype}, shape {args.shape}, batch {args.batch}, "
          f"{n} new tokens, calibration every {args.every}")
    print("| method | tokens/s | vs plain | vs hf_generate |")
    print("|---|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {rate / rates['plain']:.2f}x | "
              f"{rate / rates['hf_generate']:.2f}x |")
    print(f"pvc_kv / pvc_naive = {rates['pvc_kv'] / rates['pvc_naive']:.2f}x")


if __name__ == "__main__":
    main()
