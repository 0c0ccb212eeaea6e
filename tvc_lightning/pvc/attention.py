"""Per-layer share of attention on image tokens, measured during decoding without eager attention.

The visual-forgetting measurement (method.md §1) is ``A_img(l, i) = mean_h sum_{j in image}
attn[l, h, i, j]``. HF only returns attention weights from the eager implementation, which would
change the numerics and the speed of the decoding being measured. :class:`VisualAttentionProbe`
instead hooks every decoder layer's ``self_attn``: after the layer has run (with sdpa or flash
attention), it rotates each sequence's predicting query row (``q_proj``'s output, captured by a
second hook, with the layer's own ``position_embeddings``), takes the already-rotated keys from the
cache (which the layer has just updated), and evaluates one softmax row per head in fp32. That is
O(keys) per layer and step, like the model's own attention, and nothing is kept but two numbers per
layer, step and batch row.

Which key positions are "original image" and which are re-injected (pooled) copies is told by the
caller through *key kinds*, one small integer per cache position (:data:`KIND_TEXT`,
:data:`KIND_ORIGINAL`, :data:`KIND_COPY`, :data:`KIND_INVALID`). The decoding loop owns the cache
and therefore the alignment: before each forward, the kinds must describe the keys the layer will
hold *after* its cache update, i.e. the cached positions followed by the positions being fed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from tvc_lightning.families import family_of
from tvc_lightning.families.base import rotate_half

# The share arithmetic lives in shares.py; its names stay importable from here.
from tvc_lightning.pvc.shares import (
    KIND_COPY,
    KIND_INVALID,
    KIND_ORIGINAL,
    KIND_TEXT,
    _check_kinds,
    _kind_tensors,
    _shares,
    forgetting_curve,
    prompt_key_kinds,
    visual_attention_shares,
)

__all__ = ["KIND_COPY", "KIND_INVALID", "KIND_ORIGINAL", "KIND_TEXT", "VisualAttentionProbe", "cache_keys",
           "cache_keyword", "forgetting_curve", "prompt_key_kinds", "visual_attention_shares"]


def cache_keyword(forward: Callable[..., Any]) -> str:
    """The keyword under which a transformers ``forward`` takes the KV cache.

    transformers 5.24 renamed it from ``past_key_values`` to ``cache`` in Qwen2-VL's models, decoder
    layers and attention layers (the old name lives on only as a deprecation shim). Reading the
    signature once, instead of relying on the shim, keeps the decode loop and the attention probe
    right on both sides of the rename and fails loudly on a third spelling.
    """
    params = inspect.signature(forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(
        f"{getattr(forward, '__qualname__', forward)!r} takes neither `cache` nor `past_key_values`: "
        "this transformers version passes the KV cache some other way; the PVC decoder and the "
        "attention probe need updating for it"
    )


def cache_keys(cache: Any, layer_idx: int) -> torch.Tensor:
    """The key states (B, kv_heads, K, head_dim) a cache holds for one layer (transformers 4.x and 5.x)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56: a list of per-layer cache objects
        return layers[layer_idx].keys
    if hasattr(cache, "key_cache"):  # older DynamicCache: parallel lists of tensors
        return cache.key_cache[layer_idx]
    raise TypeError(f"cannot read key states from a {type(cache).__name__}")


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers of a Qwen2-VL-style model (several HF layouts)."""
    for path in ("model.language_model.layers", "language_model.layers", "model.layers", "layers"):
        obj: Any = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) and hasattr(obj[0], "self_attn"):
            return obj
    raise ValueError(f"no decoder layers with self_attn found in {type(model).__name__}")


class VisualAttentionProbe:
    """Records, per forward, layer and batch row, the attention share on original and copy image keys.

    Usage::

        probe = VisualAttentionProbe(model)
        probe.set_key_kinds(prompt_key_kinds(input_ids, image_token_id, attention_mask))
        model(..., past_key_values=cache)            # prefill: not recorded by default
        for step in range(n):
            probe.append_kinds(KIND_TEXT)            # the token about to be fed
            model(input_ids=tok, ..., past_key_values=cache)
        shares = probe.records()                     # (steps, B, layers, 2)
        probe.remove()

    Every forward predicts one next token per sequence, from one query row: a recorded *step* is
    one forward while :attr:`enabled`, measured at that row. The row is the last of the fed
    positions whose kind is not :data:`KIND_INVALID`, so a step may feed one token to some rows and
    a chunk (a re-injected image) to others, right-padded with invalid holes. A forward that starts
    from an empty cache (a prefill, or any forward without a cache) is recorded only with
    ``record_prefill``. When rows leave the batch (``cache.batch_select_indices``), call
    :meth:`select_rows` with the same index: records stay indexed by the original row.

    The records are kept on the model's device and moved to the CPU only by :meth:`records`, so
    measuring adds no host synchronisation. Sliding-window attention is not modelled (Qwen2-VL uses
    full attention). Use the probe in eval mode: a checkpointed forward would be measured twice.

    Args:
        model: a Qwen2-VL-style model (decoder layers with ``self_attn.q_proj``).
        record_prefill: also record forwards that start from an empty cache.
        enabled: initial value of :attr:`enabled`.
        capture_query: take the query projection from a hook on ``q_proj`` (free) instead of
            projecting the query row again; turn off if ``q_proj`` is bypassed by a fused kernel.
    """

    def __init__(
        self, model: nn.Module, record_prefill: bool = False, enabled: bool = True, capture_query: bool = True
    ) -> None:
        self.record_prefill = record_prefill
        self.enabled = enabled
        self._kinds: torch.Tensor | None = None
        self._row_ids: torch.Tensor | None = None  # original row of each current batch row (CPU)
        self._num_rows = 0
        # _kind_tensors per device (layers of a sharded model live on several), reset on every kinds edit.
        self._derived: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        layers = _decoder_layers(model)
        # What the attention does between projection and rotation (Qwen3-VL: per-head RMSNorm).
        self._norm = family_of(model).query_key_norm
        # Decided once: the layers are all of one class, and the name depends on the transformers release.
        self._cache_kw = cache_keyword(layers[0].self_attn.forward)
        self._records: list[list[torch.Tensor]] = [[] for _ in layers]  # per layer, per step (B_s, 2)
        self._step_rows: list[torch.Tensor] = []  # per step, the original rows measured
        # q_proj's output of the running forward, so the query need not be projected a second time.
        self._q_out: list[torch.Tensor | None] = [None for _ in layers]
        self._handles = [
            layer.self_attn.register_forward_hook(self._make_hook(i), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]
        if capture_query:
            self._handles += [layer.self_attn.q_proj.register_forward_hook(self._make_q_hook(i))
                              for i, layer in enumerate(layers)]

    # ---------------------------------------------------------------- key kinds (caller-maintained)
    @property
    def key_kinds(self) -> torch.Tensor | None:
        """The current (B, K) key kinds, or None before :meth:`set_key_kinds`."""
        return self._kinds

    def set_key_kinds(self, kinds: torch.Tensor) -> None:
        """Replace the key kinds: (B, K) ints describing the cache's keys as of after the next update.

        After construction or :meth:`clear`, the first measured batch's rows are rows 0..B-1.
        """
        if kinds.dim() != 2:
            raise ValueError(f"key kinds must be (B, K), got shape {tuple(kinds.shape)}")
        if self._row_ids is not None and kinds.shape[0] != len(self._row_ids):
            raise ValueError(
                f"key kinds have {kinds.shape[0]} rows but the batch has {len(self._row_ids)}: call "
                "select_rows(index) when rows leave the batch, or clear() before a new batch"
            )
        self._set(kinds.long())

    def append_kinds(self, kinds: torch.Tensor | int, length: int = 1) -> None:
        """Append kinds of positions about to be fed: a (B, n) tensor, or one kind for ``length`` of them."""
        old = self._require_kinds()
        if isinstance(kinds, int):
            kinds = old.new_full((old.shape[0], length), kinds)
        if kinds.dim() != 2 or kinds.shape[0] != old.shape[0]:
            raise ValueError(f"appended kinds must be (B={old.shape[0]}, n): {tuple(kinds.shape)}")
        self._set(torch.cat([old, kinds.to(old.device).long()], dim=1))

    def select_kinds(self, index: torch.Tensor) -> None:
        """Keep the kinds of the cache positions a cache edit keeps, in the same order.

        ``index`` is what the caller applied to the cache's key dimension: a 1-D index or boolean
        keep-mask shared by all rows (``index_select``), or a (B, K') per-row index (``gather``).
        """
        old = self._require_kinds()
        index = index.to(old.device)
        if index.dtype == torch.bool:
            if index.dim() != 1:
                raise ValueError("a boolean keep-mask must be 1-D (shared by all rows)")
            index = index.nonzero().squeeze(1)
        self._set(old[:, index] if index.dim() == 1 else old.gather(1, index.long()))

    def select_rows(self, index: torch.Tensor | list[int]) -> None:
        """Keep only these batch rows (current positions), as ``cache.batch_select_indices(index)`` does."""
        index = torch.as_tensor(index, dtype=torch.long)
        old = self._require_kinds()
        self._row_ids = self._batch_rows()[index]
        self._set(old[index.to(old.device)])

    def _require_kinds(self) -> torch.Tensor:
        if self._kinds is None:
            raise RuntimeError("set_key_kinds must be called first")
        return self._kinds

    def _set(self, kinds: torch.Tensor) -> None:
        self._kinds, self._derived = kinds, {}

    def _batch_rows(self) -> torch.Tensor:
        """Original row of each current batch row; a new batch (0..B-1) starts with the first need."""
        if self._row_ids is None:
            bsz = self._require_kinds().shape[0]
            self._row_ids, self._num_rows = torch.arange(bsz), bsz
        return self._row_ids

    # ---------------------------------------------------------------- switching and results
    @contextmanager
    def paused(self) -> Iterator[None]:
        """Temporarily stop recording (restores the previous :attr:`enabled`)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    @property
    def num_steps(self) -> int:
        """Number of recorded forwards."""
        return len(self._step_rows)

    def records(self) -> torch.Tensor:
        """Recorded shares, CPU fp32 (steps, B, layers, 2): ``[..., 0]`` original image, ``[..., 1]`` copy.

        B is the batch of the first :meth:`set_key_kinds`; a row absent from a step (it had left
        the batch) reads NaN there.
        """
        if any(len(r) != self.num_steps for r in self._records):
            counts = sorted({len(r) for r in self._records})
            raise RuntimeError(
                f"layers recorded different numbers of steps ({counts}): a forward was interrupted, or some "
                "layers were not measured"
            )
        out = torch.full((self.num_steps, self._batch_size(), len(self._records), 2), float("nan"))
        if self.num_steps == 0:
            return out
        steps = torch.cat([torch.full((len(r),), s) for s, r in enumerate(self._step_rows)])
        values = torch.stack([torch.cat(r) for r in self._records], dim=1).cpu()  # (sum B_s, layers, 2)
        out[steps, torch.cat(self._step_rows)] = values.float()
        return out

    def row_records(self, row: int) -> torch.Tensor:
        """One original row's shares (T, layers, 2) over the steps it took part in, in order.

        T is 0 for a row that was never measured (it stopped at its first token)."""
        out = self.records()
        if not 0 <= row < out.shape[1]:
            raise IndexError(f"row {row} is not in the measured batch of {out.shape[1]} rows")
        present = torch.tensor([bool((r == row).any()) for r in self._step_rows], dtype=torch.bool)
        return out[present, row]

    def _batch_size(self) -> int:
        """Rows of the measured batch: fixed by the first measurement, else the current kinds'."""
        if self._row_ids is not None:
            return self._num_rows
        return 0 if self._kinds is None else self._kinds.shape[0]

    def clear(self) -> None:
        """Forget the recorded shares and the batch: the current rows, or the next set_key_kinds' rows,
        become rows 0..B-1 (kinds and hooks stay)."""
        for r in self._records:
            r.clear()
        self._step_rows.clear()
        self._row_ids, self._num_rows = None, 0

    def remove(self) -> None:
        """Detach the hooks from the model; recorded shares stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> VisualAttentionProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ---------------------------------------------------------------- the hooks
    def _make_q_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            # A reference only, dropped by the attention hook right after: nothing is copied or kept.
            self._q_out[index] = output if self.enabled else None

        return hook

    def _make_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            q_out, self._q_out[index] = self._q_out[index], None
            if not self.enabled:
                return
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cache = kwargs.get(self._cache_kw)
            if cache is None:
                self._check_uncached(index, hidden)
            keys = cache_keys(cache, module.layer_idx) if cache is not None else None
            # The cache now holds this forward's keys: as many as fed means it was empty before.
            if (keys is None or keys.shape[2] == hidden.shape[1]) and not self.record_prefill:
                return
            with torch.no_grad():
                self._records[index].append(self._measure(module, hidden, q_out, keys, kwargs))
            if index == 0:
                self._step_rows.append(self._batch_rows())

        return hook

    def _check_uncached(self, index: int, hidden: torch.Tensor) -> None:
        """A layer that got no cache sees only the fed positions: kinds describing more keys than
        that mean the cache went missing on its way to the layer (e.g. under a keyword this probe
        does not read), and measuring would silently skip every step."""
        kinds = self._kinds
        if kinds is not None and kinds.shape[1] != hidden.shape[1]:
            raise RuntimeError(
                f"VisualAttentionProbe: decoder layer {index} received no KV cache under `{self._cache_kw}` "
                f"but the key kinds describe {kinds.shape[1]} keys for {hidden.shape[1]} fed positions; "
                "pass the cache to the model under the keyword its forward declares (see cache_keyword)"
            )

    def _measure(
        self,
        module: nn.Module,
        hidden: torch.Tensor,
        q_out: torch.Tensor | None,
        keys: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        kinds = self._kinds
        if kinds is None:
            raise RuntimeError("VisualAttentionProbe: call set_key_kinds before a measured forward")
        bsz, q_len, _ = hidden.shape
        head_dim = module.head_dim
        cos, sin = kwargs["position_embeddings"]  # (B, q_len, head_dim), M-RoPE sections already merged
        if keys is None:  # forward without a cache: the keys are exactly this forward's rotated k_proj
            keys = self._norm(module, module.k_proj(hidden).view(bsz, q_len, -1, head_dim), "k")
            keys = (keys * cos[:, :, None] + rotate_half(keys) * sin[:, :, None]).transpose(1, 2)
        _check_kinds(kinds, bsz, keys.shape[2])
        captured = q_out is not None and q_out.shape[:2] == hidden.shape[:2]
        source = q_out if captured else hidden
        rows = None
        if q_len == 1:
            picked, cos, sin = source[:, 0], cos[:, 0], sin[:, 0]
        else:  # each row's last fed position that is not an invalid hole
            real = (kinds[:, -q_len:] != KIND_INVALID).to(hidden.device)
            rows = q_len - 1 - real.flip(1).int().argmax(1)
            batch = torch.arange(bsz, device=hidden.device)
            picked, cos, sin = source[batch, rows], cos[batch, rows], sin[batch, rows]
        if not captured:
            picked = module.q_proj(picked)
        # Same norm and rotation as the family's attention forward, for one query per sequence.
        query = self._norm(module, picked.view(bsz, -1, head_dim), "q")
        query = query * cos[:, None] + rotate_half(query) * sin[:, None]  # (B, heads, head_dim)
        if keys.device not in self._derived:
            self._derived[keys.device] = _kind_tensors(kinds.to(keys.device))
        bias, onehot = self._derived[keys.device]
        return _shares(query, keys, bias, onehot, kwargs.get("attention_mask"), module.scaling, rows)
