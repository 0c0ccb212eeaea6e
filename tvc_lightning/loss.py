"""Memory-bounded language-model loss for a very large vocabulary.

Qwen2-VL's vocabulary has 151,936 tokens, so the fp32 logits of a single 8k-token sequence take
~5 GB, and autograd keeps about as much again for the backward pass. The chunked losses compute
the summed cross-entropy of :func:`plain_cross_entropy` without full-vocabulary logits for a
whole sequence: they keep only the positions that carry a label (prompt, system and image tokens,
usually most of a multimodal sequence, cost nothing), then work ``chunk_size`` rows at a time.

* :func:`fused_linear_cross_entropy` (:func:`chunked_cross_entropy`'s path for an ``nn.Linear``
  head) computes per chunk, *in the forward pass*, the loss and its gradients for the hidden
  rows, the weight (added in place into one V x D buffer) and the bias; backward only scales
  them. Extra memory: one chunk's logits and one weight gradient; FLOPs: the plain loss's.
* :func:`checkpointed_cross_entropy` (the fallback for other heads) checkpoints each chunk, so
  backward recomputes its logits: a fourth head matmul, and up to three weight gradients alive
  at once (see docs/benchmarks.md).

All return ``(loss_sum, n_tokens)`` rather than a mean, so that the caller can divide by the
number of labelled tokens of the whole (gradient-accumulated, data-parallel) batch instead of
averaging per-micro-batch means, which would over-weight micro-batches with short answers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "calls_head_once",
    "checkpointed_cross_entropy",
    "chunked_cross_entropy",
    "fused_linear_cross_entropy",
    "plain_cross_entropy",
]

_SCALE_SLICE = 1 << 24  # elements per fp32 slice when rescaling a low-precision gradient


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


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    # A log-sum-exp over 152k bf16 values loses most of its precision; fp64 stays fp64 (tests).
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _labelled_rows(
    hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The labelled rows of ``hidden`` (N x D, in the head's dtype), their labels and N."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    keep = flat_labels != ignore_index
    # Boolean indexing copies only the N labelled rows (N x D, small next to N x V logits); its
    # backward scatters the gradient into a (B*L, D) zero tensor, so unlabelled positions get an
    # exact zero gradient. With N == 0 the (0, D) result still links the loss to ``hidden``.
    return _to_head_dtype(flat[keep], lm_head), flat_labels[keep], keep.sum()


# -- fused ---------------------------------------------------------------------------------------


def _chunk_loss_and_grad_(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the logits rows ``z`` (C x V, fp32+), which are overwritten with
    the loss's gradient ``softmax(z) - onehot(y)``: no second C x V buffer is allocated."""
    target = z.gather(1, y[:, None])
    top = z.amax(1, keepdim=True)
    z.sub_(top).exp_()
    norm = z.sum(1, keepdim=True)
    loss = (top + norm.log() - target).sum()
    z.div_(norm)
    z.scatter_add_(1, y[:, None], z.new_full((len(y), 1), -1.0))
    return loss


def _fused_chunks(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    chunk_size: int,
    compute_dtype: torch.dtype,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Loss sum and the gradients (for h, weight, bias, as ``needs`` asks) of the labelled rows.

    The matmuls run in ``compute_dtype`` (the autocast dtype, or the weight's), like
    ``nn.Linear`` would: the same logits as the plain loss, the same gradient matmuls.
    """
    need_h, need_w, need_b = needs
    w = weight.to(compute_dtype)  # no copy unless autocast lowers an fp32 weight, as Linear does
    b = bias.to(compute_dtype) if bias is not None else None
    x_all = h.to(compute_dtype)
    grad_h = torch.empty_like(h) if need_h else None
    # Accumulated in place across chunks. For an fp32 weight under bf16 autocast each chunk's
    # bf16 product is added into the fp32 buffer (a reused bf16 scratch, half a weight);
    # otherwise addmm_ adds into the buffer inside the matmul, which accumulates in fp32.
    grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_w else None
    scratch: torch.Tensor | None = None
    acc_dtype = _upcast(x_all[:0]).dtype
    grad_b = torch.zeros(weight.shape[0], dtype=acc_dtype, device=h.device) if need_b else None
    total = torch.zeros((), dtype=acc_dtype, device=h.device)
    # Every dtype above is explicit; autocast must not re-cast the in-place and out= matmuls.
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, len(y), chunk_size):
            x, y_c = x_all[start:start + chunk_size], y[start:start + chunk_size]
            logits = torch.addmm(b, x, w.t()) if b is not None else x @ w.t()
            z = _upcast(logits)
            del logits  # the low-precision copy, if any: only one C x V fp32 buffer lives on
            total += _chunk_loss_and_grad_(z, y_c)
            if grad_b is not None:
                grad_b += z.sum(0)
            # What Linear's backward would get from the fp32 upcast; deleted at the end of the
            # iteration (it may be z itself), so that two chunks' logits never coexist.
            dz = z.to(compute_dtype) if need_h or need_w else None
            del z
            if grad_h is not None:
                rows = grad_h[start:start + len(y_c)]
                if rows.dtype == compute_dtype:
                    torch.mm(dz, w, out=rows)
                else:
                    rows.copy_(dz @ w)
            if grad_w is not None:
                if grad_w.dtype == compute_dtype:
                    grad_w.addmm_(dz.t(), x)
                else:
                    if scratch is None:
                        scratch = torch.empty_like(w)
                    grad_w += torch.mm(dz.t(), x, out=scratch)
            del dz
    return total, grad_h, grad_w, grad_b


def _scale_(grad: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor | None:
    """``grad * scale`` in place, rounded once: low-precision tensors go through fp32 slices, as
    whether a mixed-dtype in-place multiply first rounds the fp32 scalar to bf16 is up to the
    backend's kernel (the CPU one does not; a 0.4 % error on every gradient would be too much)."""
    if grad is None:
        return None
    if grad.dtype in (torch.float32, torch.float64):
        return grad.mul_(scale)
    for part in grad.view(-1).split(_SCALE_SLICE):
        part.copy_(part.float().mul_(scale))
    return grad


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss of an affine head over labelled rows, its gradients computed in the forward pass.

    Only the gradients (N x D, V x D, V) are kept for backward, which scales them in place and
    hands them over: with no other reference left, autograd adopts the weight gradient as
    ``.grad`` (or adds it in place to an existing one) instead of copying it."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk_size, compute_dtype, needs):  # noqa: ANN001, ANN205
        total, *grads = _fused_chunks(h, weight, bias, y, chunk_size, compute_dtype, needs)
        ctx.grads = grads
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward through the same loss twice is not "
                "supported (its stored gradients were handed to autograd the first time)"
            )
        (grad_h, grad_w, grad_b), ctx.grads = ctx.grads, None
        grad_h, grad_w = _scale_(grad_h, grad_out), _scale_(grad_w, grad_out)
        if grad_b is not None:  # kept in fp32 (or fp64) until now: it is only V wide
            grad_b = grad_b.mul_(grad_out).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def _fusable(lm_head: torch.nn.Module) -> bool:
    """Is the head exactly ``x @ weight.T + bias`` with nothing else wrapping its forward?

    A subclass with its own ``forward`` (LoRA, quantised layers) or an instance-level forward
    wrapper (accelerate's offloading hooks) computes something else or needs its own forward to
    run, so those take the checkpointed path. FSDP2's per-module subclass keeps Linear.forward.
    """
    return (
        isinstance(lm_head, torch.nn.Linear)
        and type(lm_head).forward is torch.nn.Linear.forward
        and "forward" not in vars(lm_head)
    )


def calls_head_once(lm_head: torch.nn.Module) -> bool:
    """Does :func:`chunked_cross_entropy` call this head once per loss, whatever the chunk count
    (the fused path)? Then sharded ranks need no agreement on a number of head calls."""
    return _fusable(lm_head)


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` would multiply in: autocast's, else the weight's."""
    device = h.device.type
    if weight.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    lm_head: torch.nn.Linear,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    *,
    min_chunks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy with gradients computed chunk by chunk in the forward pass.

    Same arguments and return value as :func:`chunked_cross_entropy`, whose path this is for an
    ``nn.Linear`` head (``TypeError`` for any other). Peak memory on top of the inputs: one
    chunk's logits (``min(N, chunk_size) * V`` fp32, plus a copy in the matmul dtype when that
    is lower) and one weight gradient (V x D, in the weight's dtype), which autograd then adopts
    as ``.grad``; the backward pass calls no matmul at all.

    Sharded heads: the whole computation runs *inside one call of the module*, whose
    ``forward`` is swapped for the fused computation for that call only, so the module's hooks
    frame it as they frame a ``Linear`` call: ZeRO-3 gathers the partitioned weight before,
    releases it after, and (hooked on the loss coming out) re-gathers it before backward, so the
    weight gradient is accumulated with its full shape and reduce-scattered; FSDP2 unshards
    (``lm_head.weight`` is then the unsharded parameter, not the DTensor), reshards, and hooks
    its pre-/post-backward steps on the loss and the hidden rows. Forward hooks on the head thus
    see the loss where they would see logits. The head is called once whatever the chunk count,
    so ZeRO-3 ranks stay in step by themselves: ``min_chunks`` is accepted and not needed.

    Numerics: the logits and both gradient matmuls run in the dtype ``nn.Linear`` would use (the
    autocast dtype, else the weight's); log-sum-exp, softmax and the bias gradient run in fp32.
    The weight gradient accumulates over chunks in the weight's dtype (fp32 inside each matmul,
    so a bf16 weight's gradient is rounded once per chunk: the same as autograd summing per-chunk
    gradients, and cheaper than an fp32 copy of a bf16 weight). Not twice differentiable, and
    one backward per call (the stored gradients are handed over, not copied).
    """
    _check_shapes(hidden, labels)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not _fusable(lm_head):
        raise TypeError(
            f"fused_linear_cross_entropy needs a plain nn.Linear head, got {type(lm_head).__name__}"
            " (use chunked_cross_entropy, which falls back to checkpointed chunks)"
        )
    del min_chunks  # one head call whatever the chunk count (see above)
    h, y, n_tokens = _labelled_rows(hidden, labels, lm_head, ignore_index)

    def fused_forward(x: torch.Tensor) -> torch.Tensor:
        # Read here, not before the call: only inside it is lm_head.weight the gathered ZeRO-3
        # parameter or FSDP2's unsharded one.
        weight, bias = lm_head.weight, lm_head.bias
        needs = (
            x.requires_grad,
            weight.requires_grad,
            bias is not None and bias.requires_grad,
        )
        dtype = _compute_dtype(x, weight)
        if torch.is_grad_enabled() and any(needs):
            return _FusedLinearCrossEntropy.apply(x, weight, bias, y, chunk_size, dtype, needs)
        return _fused_chunks(x, weight, bias, y, chunk_size, dtype, (False, False, False))[0]

    # Only the hidden rows go through the call: the hooks wrap module inputs that need a
    # gradient (for their post-backward step), and the labels need none.
    lm_head.forward = fused_forward
    try:
        total = lm_head(h)
    finally:
        del lm_head.forward
    return total, n_tokens


# -- checkpointed --------------------------------------------------------------------------------


def _chunk_ce_sum(
    lm_head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    # The module is called (not F.linear on lm_head.weight) so that its hooks run: DeepSpeed
    # ZeRO-3 gathers the partitioned weight in a pre-forward hook, FSDP2 unshards it.
    logits = _upcast(lm_head(h))
    return F.cross_entropy(logits, y, reduction="sum", ignore_index=ignore_index)


def checkpointed_cross_entropy(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    *,
    min_chunks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy, ``chunk_size`` labelled rows at a time, each checkpointed.

    Works with any head module (it is only ever called); arguments and return value as for
    :func:`chunked_cross_entropy`. Autograd keeps each chunk's hidden rows and recomputes its
    logits in backward (a fourth head matmul, and a second head call, per chunk). With two or
    more chunks the backward holds up to two extra transient weight gradients: autograd sums
    the per-chunk ones, transposed views from ``nn.Linear``, out of place (docs/benchmarks.md).
    A single chunk is not checkpointed. ``min_chunks`` pads with zero-row head calls adding
    exactly 0: under ZeRO-3 each head call is a collective, made ``ceil(N / chunk_size)`` times
    in forward and again in backward, so a caller passes the all-reduced maximum chunk count.
    """
    _check_shapes(hidden, labels)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    h, y, n_tokens = _labelled_rows(hidden, labels, lm_head, ignore_index)

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


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    *,
    min_chunks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy over labelled positions, ``chunk_size`` of them at a time.

    Uses :func:`fused_linear_cross_entropy` for a plain ``nn.Linear`` head (gradients computed in
    the forward pass, no recomputation) and :func:`checkpointed_cross_entropy` for any other head.

    Args:
        hidden: (B, L, D) final hidden states (after the model's final norm).
        lm_head: the output projection module (D -> V), e.g. ``model.lm_head``. It is called as a
            module, so ZeRO-3 / FSDP hooks on it keep working.
        labels: (B, L) targets, already aligned so that ``labels[b, t]`` is the target for position
            ``t`` (the caller does the next-token shift); ``ignore_index`` marks positions without
            a target.
        chunk_size: labelled positions per chunk; bounds the logits part of the peak memory to
            about ``min(N, chunk_size) * V * 4`` bytes (fused) or 12 bytes (checkpointed).
        ignore_index: label value of positions that carry no loss.
        min_chunks: under ZeRO-3 each ``lm_head`` call is a collective all-gather, so all ranks
            must make as many calls; a ZeRO-3 caller passes the all-reduced maximum chunk count.
            The fused path calls the head once whatever the chunk count and needs no padding;
            the checkpointed one pads to ``min_chunks`` calls.

    Returns:
        ``(loss_sum, n_tokens)``: the fp32 scalar sum of the per-token losses (fp64 for an fp64
        head) and the int64 scalar number of labelled tokens; ``loss_sum / n_tokens`` is the usual
        mean loss. When no token is labelled, ``loss_sum`` is an exact 0 that is still connected
        to the autograd graph (to ``hidden`` and to every head parameter, which then receive zero
        gradients, so DDP sees no unused parameter) and ``n_tokens`` is 0.

    Selecting the labelled positions needs their count on the host (one device sync per call).
    """
    impl = fused_linear_cross_entropy if _fusable(lm_head) else checkpointed_cross_entropy
    return impl(
        hidden, lm_head, labels, chunk_size, ignore_index, min_chunks=min_chunks
    )


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
