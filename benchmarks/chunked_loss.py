"""Peak memory and time of the plain, checkpointed and fused cross-entropies, forward + backward.

Methods (all from ``tvc_lightning.loss``): ``plain`` (full-vocabulary logits at once),
``checkpointed`` (chunks recomputed in backward; ``chunked_cross_entropy``'s path before the fused
one, and still its fallback for non-Linear heads) and ``fused`` (gradients computed chunk by chunk
in the forward pass; ``chunked_cross_entropy``'s path for an ``nn.Linear`` head).

Each (method, L) configuration runs in its own fresh Python process, so that one method's
allocations (and the allocator's cached or not-yet-returned memory) cannot inflate the other's
figure:

* on CUDA the child reports ``torch.cuda.max_memory_allocated()`` minus the memory allocated
  before the step (after ``reset_peak_memory_stats``), following one untimed warm-up step;
* on CPU ``tracemalloc`` does not see torch's allocations, so the child reports its RSS
  high-water mark (``getrusage(RUSAGE_SELF).ru_maxrss``) after the step minus its current RSS
  before the step (weights, hidden states and labels are already resident then). The CPU warm-up
  runs on tiny tensors only, because a full-size one would already set the high-water mark.

The reported peak is the memory the loss step adds on top of the inputs and the head: it includes
the head's weight gradient (V x D, allocated by backward or, for fused, by forward) for all
methods alike.

Example (the defaults, sized for a 2-core / 24 GiB CPU machine; a few minutes):

    python benchmarks/chunked_loss.py

On a GPU, the Qwen2-VL-7B shapes:

    python benchmarks/chunked_loss.py --device cuda --dtype bf16 --hidden 3584 --lengths 2048 8192 \
        --chunk 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

QWEN2VL_VOCAB = 151_936
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _current_rss_bytes() -> int:
    """Resident set size now (Linux); falls back to the high-water mark elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _max_rss_bytes()


def _max_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_one(cfg: dict) -> dict:
    """Run one forward + backward of one method in this (fresh) process and measure it."""
    import torch

    # Imported here so the parent process never loads the package (nor torch) itself.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tvc_lightning.loss import (
        checkpointed_cross_entropy,
        fused_linear_cross_entropy,
        plain_cross_entropy,
    )

    chunked = {"checkpointed": checkpointed_cross_entropy, "fused": fused_linear_cross_entropy}

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    dtype = getattr(torch, DTYPES[cfg["dtype"]])
    torch.manual_seed(0)
    head = torch.nn.Linear(cfg["hidden"], cfg["vocab"], bias=False, device=device, dtype=dtype)
    hidden = torch.randn(1, cfg["length"], cfg["hidden"], device=device, dtype=dtype)
    hidden.requires_grad_(True)
    labels = torch.randint(0, cfg["vocab"], (1, cfg["length"]), device=device)
    n_ignored = int(round(cfg["length"] * (1.0 - cfg["labeled_frac"])))
    labels[:, :n_ignored] = -100  # an unlabelled prompt prefix, as in instruction tuning

    def step(hidden=hidden, head=head, labels=labels) -> float:
        if cfg["method"] == "plain":
            loss_sum, n = plain_cross_entropy(hidden, head, labels)
        else:
            loss_sum, n = chunked[cfg["method"]](hidden, head, labels, chunk_size=cfg["chunk"])
        (loss_sum / n.clamp(min=1)).backward()
        return float(loss_sum.detach() / n.clamp(min=1))

    # The first checkpointed call lazily imports ~800 modules (over 1 s and ~100 MiB of RSS on
    # CPU); a step on tiny tensors runs the same code paths without touching the peak.
    tiny_head = torch.nn.Linear(cfg["hidden"], 8, bias=False, device=device, dtype=dtype)
    step(
        torch.randn(1, 4, cfg["hidden"], device=device, dtype=dtype, requires_grad=True),
        tiny_head,
        torch.randint(0, 8, (1, 4), device=device),
    )

    if device.type == "cuda":
        step()  # full-size warm-up: cuBLAS workspaces, kernels; then drop its grads and cache
        hidden.grad = None
        head.weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _current_rss_bytes()
        t0 = time.perf_counter()
        loss = step()
        seconds = time.perf_counter() - t0
        peak = _max_rss_bytes() - before
    return {**cfg, "peak_mib": peak / 2**20, "seconds": seconds, "loss": loss}


def spawn(cfg: dict) -> dict:
    """Run ``cfg`` in a fresh interpreter and return its JSON result."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(cfg)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"child for {cfg} failed with exit code {proc.returncode} "
            f"(a negative code is a signal: -9 is usually the OOM killer)\n{proc.stderr}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="hidden/head dtype")
    p.add_argument(
        "--hidden", type=int, default=1536, help="D: 1536 = Qwen2-VL-2B, 3584 = Qwen2-VL-7B"
    )
    p.add_argument("--vocab", type=int, default=QWEN2VL_VOCAB, help="V (default: Qwen2-VL's)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048], help="L values")
    p.add_argument(
        "--chunk", type=int, default=512, help="chunk_size of the checkpointed and fused methods"
    )
    p.add_argument(
        "--labeled-frac",
        type=float,
        default=1.0,
        help="fraction of positions with a label (the rest is an ignored prefix); 1.0 is the "
        "worst case for the chunked methods, which only pay for labelled positions",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["plain", "checkpointed", "fused"],
        choices=["plain", "checkpointed", "fused"],
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_one(json.loads(args.child))))
        return

    results = []
    for length in args.lengths:
        for method in args.methods:
            cfg = {
                "method": method,
                "length": length,
                "hidden": args.hidden,
                "vocab": args.vocab,
                "chunk": args.chunk if method != "plain" else None,
                "dtype": args.dtype,
                "device": args.device,
                "labeled_frac": args.labeled_frac,
                "threads": args.threads,
            }
            results.append(spawn(cfg))
            r = results[-1]
            print(
                f"# done: {method:12s} L={length}: {r['peak_mib']:.0f} MiB, {r['seconds']:.2f} s",
                file=sys.stderr,
            )

    import torch  # only for the version string; the measurements ran in the children

    argv_shown = sys.argv[1:] if argv is None else argv
    print("command: python benchmarks/chunked_loss.py " + shlex.join(argv_shown))
    print(
        f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, "
        f"{os.cpu_count()} CPUs, {platform.platform()}"
    )
    print()
    print("| method | L | D | V | chunk | labelled | fp32 logits MiB | peak MiB | seconds | loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        n_lab = r["length"] - int(round(r["length"] * (1.0 - r["labeled_frac"])))
        print(
            f"| {r['method']} | {r['length']} | {r['hidden']} | {r['vocab']} "
            f"| {r['chunk'] if r['chunk'] else '-'} | {n_lab} "
            f"| {r['length'] * r['vocab'] * 4 / 2**20:.0f} | {r['peak_mib']:.0f} "
            f"| {r['seconds']:.2f} | {r['loss']:.5f} |"
        )

    # All methods see identical inputs (same seed), so their mean losses must agree.
    for length in args.lengths:
        losses = [r["loss"] for r in results if r["length"] == length]
        if any(abs(x - losses[0]) > 1e-4 * max(1.0, abs(losses[0])) for x in losses):
            raise SystemExit(f"loss mismatch at L={length}: {losses}")


if __name__ == "__main__":
    main()
