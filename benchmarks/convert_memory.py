"""Peak memory of ``data_engine convert`` against the input's size: flat, since input is streamed.

Generates sharegpt JSON arrays shaped like TVC's release (one human turn with ``<image>``, one
long-CoT gpt turn of ``--item-kb`` KB, a few small images shared by all items) of each size in
``--sizes-gb`` under ``--tmp``, converts each in a subprocess and reports that subprocess's peak
RSS (``getrusage(RUSAGE_CHILDREN)``; it keeps the largest child's peak, so each size is measured
from a fresh helper process). Loading the whole file first, as ``convert`` used to, needs several
times the file's size.

    python benchmarks/convert_memory.py                      # 0.25 GB and 2 GB, CPU
    python benchmarks/convert_memory.py --sizes-gb 2 --keep  # keep the generated files
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
_SENTENCE = "Let me count the shapes in the figure carefully. Wait, let me double-check the image. "


def generate(path: Path, size_bytes: int, item_kb: int) -> int:
    """Write a sharegpt JSON array of about ``size_bytes``; returns the number of items."""
    images = path.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (60 * i, 100, 200 - 40 * i)).save(buf, format="PNG")
        (images / f"{i}.png").write_bytes(buf.getvalue())
    body = _SENTENCE * max(1, item_kb * 1024 // len(_SENTENCE))
    n = 0
    with path.open("w", encoding="utf-8") as f:
        f.write("[")
        while f.tell() < size_bytes:
            item = {"conversations": [
                {"from": "human", "value": f"<image>How many shapes are in figure {n}?"},
                {"from": "gpt", "value": f"{body}The final answer is \\boxed{{{n % 9}}}."}],
                "images": [f"images/{n % 4}.png"]}
            f.write(("," if n else "") + "\n" + json.dumps(item))
            n += 1
        f.write("\n]\n")
    return n


def measure(path: Path, out: Path, workers: int) -> dict:
    """Run convert on ``path`` in a subprocess; its peak RSS, time and summary line."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "data_engine", "convert", "--input", str(path), "--out", str(out),
         "--workers", str(workers), "--no-progress", "--samples-per-shard", "5000"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"convert failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    return {"peak_rss_mib": round(peak_kib / 1024, 1), "seconds": round(elapsed, 1),
            "summary": proc.stdout.strip().splitlines()[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.25, 2.0])
    parser.add_argument("--item-kb", type=int, default=8, help="size of each long-CoT response")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tmp", type=Path, default=Path("/tmp/tvc_convert_memory"))
    parser.add_argument("--keep", action="store_true", help="keep the generated inputs and shards")
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)  # helper: measure one size
    args = parser.parse_args()
    if args.one is not None:
        work = args.tmp / f"{args.one:g}gb"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        items = generate(work / "data.json", int(args.one * (1 << 30)), args.item_kb)
        result = measure(work / "data.json", work / "shards", args.workers)
        result.update(size_gib=round((work / "data.json").stat().st_size / (1 << 30), 3), items=items)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(result))
        return
    for size in args.sizes_gb:
        # A fresh helper per size: RUSAGE_CHILDREN keeps the largest child's peak so far.
        line = subprocess.run(
            [sys.executable, __file__, "--one", str(size), "--item-kb", str(args.item_kb),
             "--workers", str(args.workers), "--tmp", str(args.tmp), *(["--keep"] * args.keep)],
            capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]
        r = json.loads(line)
        print(f"input {r['size_gib']:.2f} GiB ({r['items']} items): convert peak RSS "
              f"{r['peak_rss_mib']} MiB, {r['seconds']} s; {r['summary']}", flush=True)


if __name__ == "__main__":
    main()
