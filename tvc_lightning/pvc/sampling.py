"""Next-token selection on the last position's logits: penalty, temperature, top-k, top-p."""

from __future__ import annotations

import torch

from tvc_lightning.pvc.config import PVCConfig


def next_tokens(
    logits: torch.Tensor, seen: torch.Tensor, config: PVCConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick one token per row from ``logits`` (B, V); ``seen`` (B, V) marks tokens in the sequence.

    Same processors, in the same order, as HF ``generate``: repetition penalty, temperature,
    top-k, top-p; then argmax (greedy) or a draw from the softmax.
    """
    scores = logits.float()
    if config.repetition_penalty != 1.0:
        p = config.repetition_penalty
        penalized = torch.where(scores > 0, scores / p, scores * p)
        scores = torch.where(seen, penalized, scores)
    if not config.do_sample:
        return scores.argmax(-1)
    scores = scores / config.temperature
    if config.top_k > 0:
        k = min(config.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # Drop the low tail whose mass is <= 1 - top_p; the most likely token always stays.
        drop_sorted = cumulative <= 1 - config.top_p
        drop_sorted[:, -1] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
