"""Training-data throughput: the shard stream with the DVR transform vs without it.

Writes ``--samples`` long-CoT samples (a ``--tokens``-token response with reflection phrases and
one ``--image-size`` square photo-like JPEG each) to WebDataset shards, then reads one epoch
through ``TVCDataModule.train_dataloader()`` (decode, image processor, tokenization, M-RoPE
positions, DVR, collation) for each number of DataLoader workers, with DVR off (``p=0``: the
baseline, plain SFT samples) and on (``p=1``: one pooled re-injection per sample), in one run.

samples/s excludes the time to the first batch (worker start-up), reported on its own. The
tokenizer is the offline tiny one (:mod:`tvc_lightning.testing`); Qwen's own BPE tokenizer runs
in the same Rust library. Example:

    python benchmarks/data_pipeline.py --samples 64 --tokens 4096 --image-size 512 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from data_engine.shards import ShardWriter
from tvc_lightning.data.datamodule import TVCDataModule
from tvc_lightning.data.dvr import DVRTransform
from tvc_lightning.data.schema import SampleRecord
from tvc_lightning.testing import save_tiny_qwen2vl

SENTENCES = [
    "The figure shows a triangle inscribed in a circle of radius five.",
    "Wait, let me check the angle at the top vertex again.",
    "By the inscribed angle theorem the central angle is twice as large.",
    "Hmm, the side opposite that angle must then be the diameter.",
    "So the area follows from the two legs of the right triangle.",
]


def _photo(seed: int, size: int) -> Image.Image:
    """A smooth random image (JPEG-compresses like a photo, unlike white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BILINEAR).filter(ImageFilter.SMOOTH)


def write_shards(out: Path, samples: int, tokens: int, image_size: int, tokenizer) -> int:
    """Write the samples; returns the response length in tokens."""
    text, n = "", 0
    while n < tokens:
        text += " ".join(SENTENCES) + " "
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    with ShardWriter(out, "bench", maxcount=16, image_format="jpg") as writer:
        for i in range(samples):
            record = SampleRecord(id=f"b{i}", question="What is the area of the triangle?",
                                  response=text + "The answer is \\boxed{24}.", answer="24")
            writer.write(f"bench-{i:06d}", record, [_photo(i, image_size)])
    return n


def read_epoch(model_dir: Path, shards: Path, workers: int, dvr_p: float, max_pixels: int,
               max_length: int) -> tuple[int, int, float, float]:
    """``(samples, tokens, seconds to the first batch, seconds for the rest)`` of one epoch."""
    dm = TVCDataModule(str(model_dir), str(shards), batch_size=1, num_workers=workers,
                       shuffle_buffer=16, max_length=max_length, max_pixels=max_pixels,
                       dvr=DVRTransform(p=dvr_p, max_injections=1, pool_kernel=4))
    dm.setup("fit")
    dm.set_epoch(0)
    start = time.perf_counter()
    first = None
    samples = tokens = 0
    for batch in dm.train_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)
        if first is None:
            first = time.perf_counter()
            continue
        samples += batch["input_ids"].shape[0]
        tokens += int(batch["attention_mask"].sum())
    return samples, tokens, first - start, time.perf_counter() - first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64, help="samples in the epoch")
    parser.add_argument("--tokens", type=int, default=4096, help="response length in tokens")
    parser.add_argument("--image-size", type=int, default=512, help="square image side, px")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker; the main process only collates here
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_qwen2vl(Path(tmp) / "model")
        from tvc_lightning.hf import load_processor

        tokenizer = load_processor(model_dir).tokenizer
        n = write_shards(Path(tmp) / "shards", args.samples, args.tokens, args.image_size, tokenizer)
        print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
              f"{args.samples} samples, response {n} tokens, image {args.image_size}px JPEG")
        print("| DVR | workers | samples/s | tokens/s | first batch s |")
        print("|---|---:|---:|---:|---:|")
        for workers in args.workers:
            for p in (0.0, 1.0):
                samples, tokens, first, rest = read_epoch(
                    model_dir, Path(tmp) / "shards", workers, p, args.image_size ** 2, n + 2048)
                print(f"| {'on' if p else 'off'} | {workers} | {samples / rest:.1f} | "
                      f"{tokens / rest:,.0f} | {first:.2f} |", flush=True)


if __name__ == "__main__":
    main()
