"""The attention-share arithmetic behind the visual-forgetting measurement (method.md §1).

``A_img(l, i) = mean_h sum_{j in image} attn[l, h, i, j]``, for one query per sequence, from rotated
queries and keys, without materialising repeated keys for grouped-query attention. *Key kinds*
(one small integer per key position: :data:`KIND_TEXT`, :data:`KIND_ORIGINAL`, :data:`KIND_COPY`,
:data:`KIND_INVALID`) say which keys are the original image and which re-injected copies; the probe
in :mod:`tvc_lightning.pvc.attention` feeds this from hooks while a model decodes.
"""

from __future__ import annotations

import math

import torch

__all__ = ["KIND_COPY", "KIND_INVALID", "KIND_ORIGINAL", "KIND_TEXT", "forgetting_curve", "prompt_key_kinds",
           "visual_attention_shares"]

KIND_INVALID = -1  # padding or otherwise unseen position: excluded from the softmax
KIND_TEXT = 0
KIND_ORIGINAL = 1  # the prompt's full-resolution image tokens
KIND_COPY = 2  # re-injected (pooled) image tokens


def prompt_key_kinds(
    input_ids: torch.Tensor, image_token_id: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Key kinds (B, S) of a prompt: ``<|image_pad|>`` positions are original image, padding invalid.

    Only the image pad tokens (the visual features) count as image; ``<|vision_start|>`` and
    ``<|vision_end|>`` are counted as text, a choice of this project (the paper does not say).
    """
    kinds = torch.where(input_ids == image_token_id, KIND_ORIGINAL, KIND_TEXT)
    if attention_mask is not None:
        kinds = kinds.masked_fill(attention_mask == 0, KIND_INVALID)
    return kinds.long()


def visual_attention_shares(
    query: torch.Tensor,
    keys: torch.Tensor,
    kinds: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    query_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-averaged attention mass on original-image and copy keys for one query per sequence.

    Args:
        query: one rotated query per sequence, (B, heads, head_dim).
        keys: rotated keys, (B, kv_heads, K, head_dim); grouped-query attention is handled by
            viewing the query heads as (kv_heads, groups), never by materialising repeated keys.
        kinds: (B, K) key kinds; :data:`KIND_INVALID` positions get no probability.
        attention_mask: what the attention layer received: a 4-D additive float or boolean
            (True = attend) mask (B, 1|heads, Q, K), a 2-D (B, K) padding mask (flash-attention
            style, nonzero = attend), or None.
        scaling: score scale; 1/sqrt(head_dim) by default.
        query_rows: (B,) the row of a 4-D mask that belongs to each query; the last row by default.

    Returns:
        (B, 2) fp32: ``[..., 0]`` the share on original-image keys, ``[..., 1]`` on copies.
    """
    _check_kinds(kinds, query.shape[0], keys.shape[2])
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    bias, onehot = _kind_tensors(kinds.to(keys.device))
    return _shares(query, keys, bias, onehot, attention_mask, scaling, query_rows)


def _check_kinds(kinds: torch.Tensor, bsz: int, n_keys: int) -> None:
    if kinds.shape != (bsz, n_keys):
        raise ValueError(
            f"key kinds have shape {tuple(kinds.shape)} but the cache holds {n_keys} keys for batch {bsz}; "
            "keep the kinds aligned with the cache (set_key_kinds / append_kinds / select_kinds / "
            "select_rows) before every forward"
        )


def _kind_tensors(kinds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kinds contribute to every layer: a (B, 1, K) fp32 bias (-inf on invalid keys) and
    a (B, K, 2) fp32 one-hot of original/copy keys. Computed once per kinds change, not per layer."""
    bias = torch.zeros(kinds.shape, dtype=torch.float32, device=kinds.device)
    bias = bias.masked_fill(kinds == KIND_INVALID, float("-inf"))[:, None, :]
    onehot = torch.stack([kinds == KIND_ORIGINAL, kinds == KIND_COPY], dim=-1).float()
    return bias, onehot


def _shares(
    query: torch.Tensor,
    keys: torch.Tensor,
    bias: torch.Tensor,
    onehot: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    query_rows: torch.Tensor | None,
) -> torch.Tensor:
    bsz, n_heads, head_dim = query.shape
    n_kv, n_keys = keys.shape[1], keys.shape[2]
    # The product runs in the cache's dtype, like the model's own attention (whose kernels also scale
    # in fp32 after it); everything from the scores on is fp32. bias + scaling * scores is one op.
    q = query.to(keys.dtype).view(bsz, n_kv, n_heads // n_kv, head_dim)
    scores = torch.matmul(q, keys.transpose(-1, -2)).view(bsz, n_heads, n_keys)
    scores = torch.add(bias, scores.float(), alpha=scaling)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() not in (2, 4):
            raise TypeError(
                f"unsupported attention mask {type(attention_mask).__name__}: expected None, a 2-D padding "
                "mask or a 4-D float/bool mask (flex attention's BlockMask is not supported)"
            )
        if attention_mask.shape[-1] != n_keys:
            raise ValueError(f"attention mask covers {attention_mask.shape[-1]} keys, the cache {n_keys}")
        mask = attention_mask.to(keys.device)
        if mask.dim() == 4 and query_rows is None:  # -> (B, 1|heads, K): the query's row
            mask = mask[:, :, -1]
        elif mask.dim() == 4:
            mask = mask[torch.arange(bsz, device=keys.device), :, query_rows.to(keys.device)]
        else:
            mask = mask.bool()[:, None, :]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    # Mean over heads before summing over keys: the sums are linear, and (B, 1, K) @ (B, K, 2) is
    # one small product instead of one per head.
    probs = torch.softmax(scores, dim=-1).mean(dim=1, keepdim=True)  # (B, 1, K)
    return torch.bmm(probs, onehot)[:, 0]


def forgetting_curve(shares: torch.Tensor, bins: int = 8) -> torch.Tensor:
    """Average per-token shares over ``bins`` equal bins of response position.

    ``shares`` is one sample's (T, ...) shares of its T generated tokens, in order (e.g. (T, layers)
    for one kind, or (T, layers, 2)). Token ``i`` falls in bin ``floor(i * bins / T)``, so bin ``b``
    covers relative positions [b/bins, (b+1)/bins). Returns (bins, ...); a bin without tokens
    (T < bins) is NaN.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    n = shares.shape[0]
    flat = shares.reshape(n, math.prod(shares.shape[1:])).float()  # explicit width: T may be 0
    which = torch.arange(n, device=shares.device) * bins // max(n, 1)
    sums = flat.new_zeros(bins, flat.shape[1]).index_add_(0, which, flat)
    counts = torch.bincount(which, minlength=bins).to(flat.dtype)
    # 0 / 0 gives NaN for empty bins, which is what an undefined average should read as.
    return (sums / counts[:, None]).reshape(bins, *shares.shape[1:])
