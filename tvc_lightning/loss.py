"""Memory-bounded language-model loss for a very large vocabulary.

Qwen2-VL's vocabulary has 151,936 tokens, so the fp32 logits of a single 8k-token sequence take
~5 GB, and autograd keeps about as much again for the backward pass. ``chunked_cross_entropy``
computes the same summed cross-entropy without ever materialising full-vocabulary logits for a
whole sequence, in the forward *and* in the backward pass:

1. only the positions that carry a label are kept (prompt, system and image tokens are usually
   the large majority of a multimodal sequence and cost nothing here);
2. the kept positions are processed ``chunk_size`` rows at a time, and each chunk runs under
   activation checkpointing, so autograd saves only the chunk's hidden states and recomputes the
   chunk's logits during backward; at most one chunk of logits is alive at any moment.

Both functions return ``(loss_sum, n_tokens)`` rather than a mean, so that the caller can divide
by the number of labelled tokens of the whole (gradient-accumulated, data-parallel) batch instead
of averaging per-micro-batch means, which would over-weight micro-batches with short answers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["chunked_cross_entropy", "plain_cross_entropy"]


def _check_shapes(hidden: torch.Tensor, labels: torch.Tensor) -> None:
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (..., D), got shape {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] "
            f"{tuple(hidden.shape[:-1])} (labels are already shifted by the caller)"
        )


def _to_head_dtype(h: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    """Cast hidden states to the dtype of the head's parameters, if it has floating ones.

    Outside autocast, ``nn.Linear`` raises on a bf16 input with an fp32 weight (or vice versa);
    casting the hidden states (N x D) is cheap, casting the head weight (V x D) would not be. Only
    the parameter *object* is inspected, never its data, which stays valid under DeepSpeed ZeRO-3
    where the storage is partitioned away between forward calls. Under autocast the matmul is
    re-cast to the autocast dtype anyway, so this changes nothing there.
    """
    for p in lm_head.parameters():
        if p.is_floating_point():
            return h if h.dtype == p.dtype else h.to(p.dtype)
    return h


def _chunk_ce_sum(
    lm_head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    # The module is called (not F.linear on lm_head.weight) so that its hooks run: DeepSpeed
    # ZeRO-3 gathers the partitioned weight in a pre-forward hook. The logits are upcast before the
    # softmax because a log-sum-exp over 152k bf16 values loses most of its precision.
    logits = lm_head(h).float()
    return F.cross_entropy(logits, y, reduction="sum", ignore_index=ignore_index)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    *,
    min_chunks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy, computed ``chunk_size`` labelled positions at a time.

    Args:
        hidden: (B, L, D) final hidden states (after the model's final norm).
        lm_head: the output projection module (D -> V), e.g. ``model.lm_head``. It is called as a
            module, so ZeRO-3 / FSDP hooks on it keep working.
        labels: (B, L) targets, already aligned so that ``labels[b, t]`` is the target for position
            ``t`` (the caller does the next-token shift); ``ignore_index`` marks positions without
            a target.
        chunk_size: labelled positions per chunk. The logits part of the peak memory is about
            ``min(N, chunk_size) * V * 12`` bytes (fp32 logits, log-softmax, gradient),
            independent of the sequence length. With two or more chunks, the backward also holds
            up to two extra transient copies of the head's weight gradient (V x D): autograd sums
            the per-chunk weight gradients, which ``nn.Linear`` produces as transposed views, out
            of place (see docs/benchmarks.md). The plain loss peaks near ``3 * N * V * 4``
            bytes, this one near ``3 * V * D * grad_bytes``, so chunking pays off once
            ``N > D * grad_bytes / 4`` labelled tokens. A single chunk (``N <= chunk_size``) is
            not checkpointed and costs what the plain loss on the N labelled rows costs.
        ignore_index: label value of positions that carry no loss.
        min_chunks: call ``lm_head`` at least this many times, padding with zero-row calls that
            add exactly 0. Under DeepSpeed ZeRO-3 each call of ``lm_head`` is a collective
            all-gather, so all data-parallel ranks must make the same number of calls (here
            ``ceil(n_tokens / chunk_size)`` in forward and again in the backward recomputation);
            a caller on ZeRO-3 passes the all-reduced maximum chunk count. The default 1 keeps a
            rank whose micro-batch has no labelled token calling the head once.

    Returns:
        ``(loss_sum, n_tokens)``: the fp32 scalar sum of the per-token losses and the int64 scalar
        number of labelled tokens; ``loss_sum / n_tokens`` is the usual mean loss. When no token is
        labelled, ``loss_sum`` is an exact 0 that is still connected to the autograd graph (to
        ``hidden`` and to every head parameter, which then receive zero gradients, so DDP sees no
        unused parameter) and ``n_tokens`` is 0.

    Selecting the labelled positions needs their count on the host (one device sync per call).
    """
    _check_shapes(hidden, labels)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")

    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    keep = flat_labels != ignore_index
    n_tokens = keep.sum()
    # Boolean indexing copies only the N labelled rows (N x D, small next to N x V logits); its
    # backward scatters the gradient into a (B*L, D) zero tensor, so unlabelled positions get an
    # exact zero gradient. With N == 0 the (0, D) result still links the loss to ``hidden``.
    h = _to_head_dtype(flat[keep], lm_head)
    y = flat_labels[keep]

    # torch.split is one autograd node whose backward concatenates the chunk gradients once;
    # slicing per chunk would instead allocate and add a full (N, D) zero tensor per chunk.
    chunks = list(zip(h.split(chunk_size), y.split(chunk_size), strict=True)) if len(y) else []
    while len(chunks) < min_chunks:
        # Zero-row chunks: cross_entropy over no rows sums to exactly 0, but the head is still
        # called (ZeRO-3 all-gather parity) and its parameters stay in the graph (DDP).
        chunks.append((h[:0], y[:0]))

    # With a single chunk, checkpointing would buy nothing: the loss is the last op of the forward,
    # so its saved tensors are released by the first step of the backward, exactly when the
    # recomputation would have re-created them; it would only cost a second head matmul.
    use_checkpoint = (
        len(chunks) > 1
        and torch.is_grad_enabled()
        and (h.requires_grad or any(p.requires_grad for p in lm_head.parameters()))
    )
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for h_chunk, y_chunk in chunks:
        if use_checkpoint:
            # Autograd keeps only h_chunk (and the scalar result); the chunk's logits are freed
            # right after the forward and recomputed, one chunk at a time, in the backward pass.
            # Non-reentrant: the chunks' weight gradients then meet in the single AccumulateGrad
            # node of each head parameter, whose hooks fire once per backward, whatever the chunk
            # count (ZeRO-1/2 reject a gradient that is "computed twice"; reentrant checkpointing
            # would run one inner backward, and so one accumulation, per chunk).
            part = checkpoint(
                _chunk_ce_sum, lm_head, h_chunk, y_chunk, ignore_index, use_reentrant=False
            )
        else:
            part = _chunk_ce_sum(lm_head, h_chunk, y_chunk, ignore_index)
        total = total + part
    return total, n_tokens


def plain_cross_entropy(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The obvious baseline: full-vocabulary fp32 logits for every position at once.

    This is what ``Qwen2VLForConditionalGeneration.forward`` does when given labels; it is kept as
    the reference for the tests and the benchmark. Same arguments and return convention as
    :func:`chunked_cross_entropy`; peak memory grows as ``B * L * V``.
    """
    _check_shapes(hidden, labels)
    flat = _to_head_dtype(hidden.reshape(-1, hidden.shape[-1]), lm_head)
    flat_labels = labels.reshape(-1)
    n_tokens = (flat_labels != ignore_index).sum()
    # With every label ignored, cross_entropy(reduction="sum") is already an exact, connected 0.
    return _chunk_ce_sum(lm_head, flat, flat_labels, ignore_index), n_tokens
