"""Forced chains: does a model read the image at a point of a chain it did not write?

``python -m tvc_lightning.analyze.forced --checkpoint CKPT --data SHARDS --out reads.json``
``python -m tvc_lightning.analyze.forced --decode pvc --checkpoint CKPT --data SHARDS --out answers.json``

Decoding can only test a model at the lengths it writes itself: a model trained on ~15-step
chains writes ~15 steps when asked for 30, so a longer held-out chain never gets a late read.
Here the reference chain is fed in whole, encoded exactly as training encodes it (``--dvr 1``:
with DVR's bridge and pooled copy at the reflection point, as PVC with ``reset none`` decodes;
``--dvr 0``: without), and the model's greedy choice is checked at every word of ``--words``
that the chain states right after `` is`` (``late_lookup``'s "The cell in row R, column C is X."):
a read is right when every token of the word is the model's argmax, i.e. greedy decoding from
that prefix would write it.
Only the final hidden states at those positions go through the LM head: no full-vocabulary
logits for the sequence.

Writes ``{"reads": {id: [right, total]}, "right": R, "total": T, "rate": R / T, ...}``.

With ``--decode plain|pvc|pvc_keep`` the reference chain is instead cut just before its first
reflection sentence (DVR's injection point) and given as the start of the answer; the model
decodes the rest (greedy; ``pvc``: one calibration allowed from the first generated token, the
original image hidden after it; ``pvc_keep``: kept, reset none) and the answer is scored:
``{"answers": {id: correct}, "accuracy": ..., ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch


def word_ids(tokenizer: Any, words: list[str]) -> list[list[int]]:
    """The tokens of `` word`` for each word, longest first (a match takes the longest)."""
    return sorted((tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words),
                  key=len, reverse=True)


def read_spans(input_ids: torch.Tensor, labels: torch.Tensor, is_id: int,
               words: list[list[int]]) -> list[tuple[int, int]]:
    """``(start, end)`` token spans of learned words of ``words`` right after the token `` is``."""
    ids = input_ids.tolist()
    spans = []
    for p in range(1, len(ids)):
        if ids[p - 1] != is_id or int(labels[p]) == -100:
            continue
        word = next((w for w in words if ids[p:p + len(w)] == w), None)
        if word is not None:
            spans.append((p, p + len(word)))
    return spans


@torch.no_grad()
def greedy_choices(module: Any, batch: dict[str, torch.Tensor],
                   spans: list[tuple[int, int]]) -> torch.Tensor:
    """The model's argmax for every token of ``spans`` (row 0 of ``batch``), each predicted from
    the position before it; the LM head sees those positions only."""
    before = [q - 1 for a, b in spans for q in range(a, b)]
    return module.model.lm_head(module.hidden_states(batch)[0, before]).argmax(-1)


@torch.no_grad()
def forced_reads(module: Any, encoder: Any, samples: list[tuple[Any, list[Any]]],
                 words: list[str]) -> dict[str, tuple[int, int]]:
    """Per sample id: (reads whose every token is the model's greedy choice, reads)."""
    from tvc_lightning.data.collate import Collator

    tokenizer = encoder.tokenizer
    tokens = word_ids(tokenizer, words)
    is_ids = tokenizer(" is", add_special_tokens=False)["input_ids"]
    if len(is_ids) != 1:
        raise ValueError(f"' is' is {len(is_ids)} tokens in this tokenizer; reads need one")
    collate = Collator(tokenizer.pad_token_id)
    out = {}
    for record, images in samples:
        batch = collate([encoder(record, images)])
        ids = batch["input_ids"][0]
        spans = read_spans(ids, batch["labels"][0], is_ids[0], tokens)
        if not spans:
            out[record.id] = (0, 0)
            continue
        chosen = greedy_choices(module, batch, spans)
        match = (chosen == ids[[q for a, b in spans for q in range(a, b)]]).tolist()
        right, k = 0, 0
        for a, b in spans:
            right += all(match[k:k + b - a])
            k += b - a
        out[record.id] = (right, len(spans))
    return out


DECODINGS = ("plain", "pvc", "pvc_keep")


def decode_config(decoding: str, pool_kernel: int, max_new_tokens: int) -> Any:
    """The PVC settings of a ``--decode`` mode: a calibration may fire on the first generated
    token (min_gap 0), since the chain before it is given."""
    from tvc_lightning.pvc import PVCConfig

    if decoding not in DECODINGS:
        raise ValueError(f"--decode must be one of {DECODINGS}, got {decoding!r}")
    return PVCConfig(pool_kernel=pool_kernel, reset="none" if decoding == "pvc_keep" else "visual",
                     max_calibrations=0 if decoding == "plain" else 1, min_gap=0,
                     max_new_tokens=max_new_tokens)


def cut_before_reflection(response: str) -> str:
    """The response up to its first reflection sentence (DVR's first candidate point)."""
    from tvc_lightning.data.dvr import DVRTransform

    points = DVRTransform().reflection_points(response)
    if not points:
        raise ValueError(f"no reflection sentence to cut the chain at: {response[:80]!r}...")
    return response[:points[0]].rstrip()


def decoded_answers(model: Any, processor: Any, samples: list[tuple[Any, list[Any]]],
                    config: Any, batch_size: int = 32) -> dict[str, bool]:
    """Per sample id: whether the answer decoded after the cut reference chain is right."""
    from tvc_lightning.pvc import pvc_generate
    from tvc_lightning.scoring import score_record

    out = {}
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        results = pvc_generate(model, processor, [r.question for r, _ in chunk],
                               [images for _, images in chunk], config,
                               answer_prefixes=[cut_before_reflection(r.response) for r, _ in chunk])
        for (record, _), result in zip(chunk, results, strict=True):
            out[record.id] = score_record(result.text, record)[1]
    return out


def main(argv: list[str] | None = None) -> int:
    from data_engine.synth_late import PALETTE
    from tvc_lightning.analyze.cli import load_samples
    from tvc_lightning.data.dvr import DVRTransform
    from tvc_lightning.data.tokenize import SampleEncoder
    from tvc_lightning.evaluate.run import load_for_eval
    from tvc_lightning.hf import load_processor
    from tvc_lightning.module import TVCModule

    p = argparse.ArgumentParser(prog="python -m tvc_lightning.analyze.forced", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="HF directory or Lightning .ckpt")
    p.add_argument("--base_model", default=None, help="the architecture of a .ckpt")
    p.add_argument("--data", required=True, help="WebDataset shards (e.g. DATA/val)")
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    p.add_argument("--dvr", type=int, choices=(0, 1), default=0,
                   help="1: DVR's bridge and pooled copy at the reflection point (one injection)")
    p.add_argument("--pool_kernel", type=int, default=2, help="the copy's pooling kernel")
    p.add_argument("--max_pixels", type=int, default=None)
    p.add_argument("--max_length", type=int, default=8192)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--words", nargs="+", default=list(PALETTE),
                   help="the words read (default: late_lookup's ten colours)")
    p.add_argument("--decode", choices=DECODINGS, default=None,
                   help="decode the answer after the cut chain instead of reading teacher-forced")
    p.add_argument("--max_new_tokens", type=int, default=256,
                   help="--decode: tokens generated at most (the lookup and answer that follow the cut)")
    p.add_argument("--batch_size", type=int, default=32, help="--decode: samples decoded together")
    args = p.parse_args(argv)

    model, processor_dir = load_for_eval(args.checkpoint, args.base_model, "float32", "sdpa")
    processor = load_processor(processor_dir, None, args.max_pixels)
    samples = load_samples(args.data, args.limit, processor)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.decode is not None:
        config = decode_config(args.decode, args.pool_kernel, args.max_new_tokens)
        answers = decoded_answers(model.eval(), processor, samples, config, args.batch_size)
        right = sum(answers.values())
        args.out.write_text(json.dumps({
            "checkpoint": args.checkpoint, "data": args.data, "decode": args.decode,
            "right": right, "total": len(answers),
            "accuracy": right / len(answers) if answers else None,
            "answers": answers}, indent=1), encoding="utf-8")
        print(f"forced-chain answers ({args.decode}): {right}/{len(answers)} right -> {args.out}")
        return 0
    module = TVCModule("unused", freeze=[])
    module.model = model.eval()
    dvr = DVRTransform(p=float(args.dvr), max_injections=1, pool_kernel=args.pool_kernel)
    encoder = SampleEncoder(processor, max_length=args.max_length, dvr=dvr)
    reads = forced_reads(module, encoder, samples, args.words)
    right, total = sum(r for r, _ in reads.values()), sum(t for _, t in reads.values())
    args.out.write_text(json.dumps({
        "checkpoint": args.checkpoint, "data": args.data, "dvr": args.dvr, "right": right,
        "total": total, "rate": right / total if total else None,
        "reads": {k: list(v) for k, v in reads.items()}}, indent=1), encoding="utf-8")
    print(f"forced reads: {right}/{total} right -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
