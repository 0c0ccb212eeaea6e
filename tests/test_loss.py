"""Tests of the chunked cross-entropies (fused and checkpointed) against the full-logits baseline
and an explicit formula."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tvc_lightning.loss import (
    checkpointed_cross_entropy,
    chunked_cross_entropy,
    fused_linear_cross_entropy,
    plain_cross_entropy,
)

B, L, D, V = 2, 37, 16, 101
CHUNKED = [checkpointed_cross_entropy, fused_linear_cross_entropy]


class CountingHead(torch.nn.Module):
    """A Linear head that counts its forward calls (stands in for ZeRO-3's per-call gather)."""

    def __init__(self, d: int, v: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(d, v)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.proj(x)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, D, generator=g)
    head = torch.nn.Linear(D, V)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g) * 0.5)
        head.bias.copy_(torch.randn(V, generator=g) * 0.1)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :10] = -100  # a "prompt" prefix
    labels[1, 5:20] = -100  # an "image" span in the middle
    labels[1, -1] = -100  # the final position has no next token
    return hidden, head, labels


def _explicit_loss_sum(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor):
    """sum_t -log softmax(W h_t + b)[y_t] over labelled t, written out independently."""
    logits = hidden.double() @ head.weight.double().T + head.bias.double()
    logp = torch.log_softmax(logits, dim=-1)
    mask = labels != -100
    return -logp[mask].gather(-1, labels[mask].unsqueeze(-1)).sum()


def _loss_and_grads(fn, hidden, head, labels, **kwargs):
    hidden = hidden.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    loss, n = fn(hidden, head, labels, **kwargs)
    loss.backward()
    return loss.detach(), n, hidden.grad, head.weight.grad.clone(), head.bias.grad.clone()


def test_plain_matches_explicit_formula() -> None:
    hidden, head, labels = _inputs()
    loss, n = plain_cross_entropy(hidden, head, labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert n.dtype == torch.int64 and n.dim() == 0
    assert int(n) == int((labels != -100).sum()) == 2 * L - 26
    expected = _explicit_loss_sum(hidden, head, labels)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", CHUNKED)
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_matches_plain_value_and_gradients(fn, chunk_size: int) -> None:
    hidden, head, labels = _inputs(seed=chunk_size)
    ref = _loss_and_grads(plain_cross_entropy, hidden, head, labels)
    got = _loss_and_grads(fn, hidden, head, labels, chunk_size=chunk_size)

    loss_ref, n_ref, gh_ref, gw_ref, gb_ref = ref
    loss, n, gh, gw, gb = got
    assert loss.dtype == torch.float32 and n.dtype == torch.int64
    assert int(n) == int(n_ref)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-5, atol=1e-6)
    # Positions without a label receive exactly no gradient; labelled ones do.
    ignored = labels == -100
    assert torch.count_nonzero(gh[ignored]) == 0
    assert bool((gh[~ignored].abs().sum(-1) > 0).all())


@pytest.mark.parametrize("fn", CHUNKED)
def test_chunked_does_not_save_logits_for_backward(fn) -> None:
    """Only the (N, D) hidden rows may be saved for backward, never anything V wide."""
    hidden, head, labels = _inputs()
    hidden.requires_grad_(True)

    def saved_widths(fn, **kwargs) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(hidden, head, labels, **kwargs)
        return shapes

    def holds_logits(shapes: list[tuple[int, ...]]) -> bool:
        return any(len(s) == 2 and s[-1] == V and s[0] > 0 for s in shapes)

    # The check itself can fail: the baseline saves (N, V) logits for its backward.
    assert holds_logits(saved_widths(plain_cross_entropy))
    assert not holds_logits(saved_widths(fn, chunk_size=7))


def test_checkpointed_backward_recomputes_each_chunk_once() -> None:
    hidden, _, labels = _inputs()
    head = CountingHead(D, V)
    n_labelled = int((labels != -100).sum())
    n_chunks = -(-n_labelled // 8)
    hidden.requires_grad_(True)

    loss, _ = checkpointed_cross_entropy(hidden, head, labels, chunk_size=8)
    assert head.calls == n_chunks
    loss.backward()
    assert head.calls == 2 * n_chunks  # logits were recomputed, not kept

    with torch.no_grad():  # no graph, nothing to recompute, no checkpoint overhead
        head.calls = 0
        checkpointed_cross_entropy(hidden, head, labels, chunk_size=8)
        assert head.calls == n_chunks


def test_single_chunk_is_not_recomputed() -> None:
    hidden, _, labels = _inputs()
    head = CountingHead(D, V)
    loss, _ = checkpointed_cross_entropy(
        hidden.requires_grad_(True), head, labels, chunk_size=1000
    )
    loss.backward()
    assert head.calls == 1


@pytest.mark.parametrize("fn", CHUNKED)
def test_head_gradient_hooks_fire_once_per_backward(fn) -> None:
    """Chunk gradients must be summed before reaching the parameter (ZeRO-1/2 grad hooks)."""
    hidden, head, labels = _inputs()
    fired = {"weight": 0, "bias": 0}
    for name in fired:
        getattr(head, name).register_post_accumulate_grad_hook(
            lambda _p, name=name: fired.__setitem__(name, fired[name] + 1)
        )
    loss, _ = fn(hidden.requires_grad_(True), head, labels, chunk_size=3)
    loss.backward()
    assert fired == {"weight": 1, "bias": 1}


def test_min_chunks_pads_head_calls_without_changing_the_loss() -> None:
    hidden, _, labels = _inputs()
    head = CountingHead(D, V)
    ref, _ = checkpointed_cross_entropy(hidden, head, labels, chunk_size=1000)
    head.calls = 0
    loss, _ = checkpointed_cross_entropy(
        hidden.requires_grad_(True), head, labels, chunk_size=1000, min_chunks=4
    )
    assert head.calls == 4
    loss.backward()
    assert head.calls == 8
    torch.testing.assert_close(loss.detach(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("fn", [*CHUNKED, plain_cross_entropy])
def test_all_ignored_is_connected_zero(fn) -> None:
    hidden, head, labels = _inputs()
    hidden = hidden.requires_grad_(True)
    labels = torch.full_like(labels, -100)
    loss, n = fn(hidden, head, labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert n.dtype == torch.int64 and int(n) == 0
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    # Every input and head parameter is reached by backward (DDP needs no unused parameter).
    assert hidden.grad is not None and torch.count_nonzero(hidden.grad) == 0
    assert head.weight.grad is not None and torch.count_nonzero(head.weight.grad) == 0
    assert head.bias.grad is not None and torch.count_nonzero(head.bias.grad) == 0


@pytest.mark.parametrize("fn", CHUNKED)
def test_all_ignored_stays_zero_with_non_finite_hidden(fn) -> None:
    hidden, head, labels = _inputs()
    hidden[0, 0, 0] = float("nan")
    loss, _ = fn(hidden, head, torch.full_like(labels, -100))
    assert loss.item() == 0.0


@pytest.mark.parametrize("fn", CHUNKED)
@pytest.mark.parametrize("head_dtype", [torch.float32, torch.bfloat16])
def test_bf16_hidden_computes_ce_in_fp32(fn, head_dtype: torch.dtype) -> None:
    hidden, head, labels = _inputs()
    head = head.to(head_dtype)
    hidden_bf16 = hidden.to(torch.bfloat16).requires_grad_(True)

    loss, n = fn(hidden_bf16, head, labels, chunk_size=7)
    assert loss.dtype == torch.float32
    loss.backward()
    assert hidden_bf16.grad is not None and hidden_bf16.grad.dtype == torch.bfloat16
    assert head.weight.grad is not None and head.weight.grad.dtype == head_dtype

    # Same logits as the head produces, then an fp32 cross-entropy: the chunked loss must match
    # it to fp32 accuracy (a bf16 log-sum-exp would be off by ~1e-2 relative).
    with torch.no_grad():
        logits = head(hidden_bf16.to(head_dtype)).float()
        mask = labels != -100
        expected = F.cross_entropy(logits[mask], labels[mask], reduction="sum")
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-4)
    plain, _ = plain_cross_entropy(hidden_bf16, head, labels)
    assert plain.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), plain.detach(), rtol=1e-5, atol=1e-4)
    assert int(n) == int(mask.sum())


@pytest.mark.parametrize("fn", CHUNKED)
def test_under_autocast_matches_plain(fn) -> None:
    hidden, head, labels = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _loss_and_grads(plain_cross_entropy, hidden, head, labels)
        got = _loss_and_grads(fn, hidden, head, labels, chunk_size=5)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-4)
    # Both paths multiply in bf16 as autocast's Linear does (the checkpointed one recomputes
    # under the same autocast state), so the gradients agree too, up to bf16 rounding of
    # differently partitioned matmul sums (hence a norm-wise comparison); all stay fp32.
    assert [g.dtype for g in got[2:]] == [torch.float32] * 3
    for g, g_ref in zip(got[2:], ref[2:], strict=True):
        assert float((g.float() - g_ref.float()).norm() / g_ref.float().norm()) < 1e-2


def test_rejects_bad_arguments() -> None:
    hidden, head, labels = _inputs()
    with pytest.raises(ValueError, match="labels shape"):
        chunked_cross_entropy(hidden, head, labels[:, :-1])
    with pytest.raises(ValueError, match="labels shape"):
        plain_cross_entropy(hidden, head, labels[:1])
    for fn in CHUNKED:
        with pytest.raises(ValueError, match="chunk_size"):
            fn(hidden, head, labels, chunk_size=0)
        with pytest.raises(ValueError, match="labels shape"):
            fn(hidden, head, labels[:, :-1])


# -- fused linear cross-entropy ------------------------------------------------------------------


class CountingLinear(torch.nn.Linear):
    """An nn.Linear (so the fused path takes it) that counts its calls with a pre-forward hook,
    the same place ZeRO-3 and FSDP2 gather the weight."""

    def __init__(self, d: int, v: int, bias: bool = True) -> None:
        super().__init__(d, v, bias=bias)
        self.calls = 0
        self.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))


class _OnBackward(torch.autograd.Function):
    """Identity whose backward first runs a callback (DeepSpeed's pre/post-backward Functions)."""

    @staticmethod
    def forward(ctx, x, callback):  # noqa: ANN001, ANN205
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        ctx.callback()
        return grad, None


class PartitionedLinear(torch.nn.Linear):
    """ZeRO-3 in miniature: outside its calls the parameters hold no data. A pre-forward hook
    gathers them and wraps the inputs so that their backward releases them again; a forward hook
    releases them and wraps the outputs so that backward gathers them first."""

    def __init__(self, d: int, v: int) -> None:
        super().__init__(d, v)
        self.full = {name: p.data for name, p in self.named_parameters()}
        self.gathers = 0
        self.release()
        self.register_forward_pre_hook(self._pre)
        self.register_forward_hook(self._post)

    def gather(self) -> None:
        self.gathers += 1
        for name, p in self.named_parameters():
            p.data = self.full[name]

    def release(self) -> None:
        for p in self.parameters():
            p.data = torch.empty(0, dtype=p.dtype)

    def _pre(self, _module, args):  # noqa: ANN001, ANN202
        self.gather()
        return tuple(_OnBackward.apply(a, self.release) if a.requires_grad else a for a in args)

    def _post(self, _module, _args, out):  # noqa: ANN001, ANN202
        self.release()
        return _OnBackward.apply(out, self.gather)


def _fp64_inputs(seed: int, bias: bool = True) -> tuple[torch.Tensor, torch.nn.Linear, torch.Tensor]:
    hidden, head, labels = _inputs(seed)
    ref = torch.nn.Linear(D, V, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(head.weight)
        if bias:
            ref.bias.copy_(head.bias)
    return hidden.double(), ref, labels


def _assert_same(got, ref, rtol: float = 1e-12, atol: float = 1e-12) -> None:
    assert int(got[1]) == int(ref[1])
    for g, r in zip([got[0], *got[2:]], [ref[0], *ref[2:]], strict=True):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol)


def _grads(fn, hidden, head, labels, **kwargs):
    """Like _loss_and_grads, for heads with or without a bias."""
    hidden = hidden.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    loss, n = fn(hidden, head, labels, **kwargs)
    loss.backward()
    bias = None if head.bias is None else head.bias.grad.clone()
    return loss.detach(), n, hidden.grad, head.weight.grad.clone(), *([bias] if bias is not None else [])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 5, 7, 48, 1000])  # 48 labelled rows: 5 and 7 do not divide
def test_fused_matches_plain_in_fp64(chunk_size: int, bias: bool) -> None:
    hidden, head, labels = _fp64_inputs(chunk_size, bias)
    assert int((labels != -100).sum()) == 48
    ref = _grads(plain_cross_entropy, hidden, head, labels)
    got = _grads(fused_linear_cross_entropy, hidden, head, labels, chunk_size=chunk_size)
    _assert_same(got, ref)
    assert torch.count_nonzero(got[2][labels == -100]) == 0  # ignored rows: exactly no gradient


def test_fused_tied_embedding_gradient_is_summed_with_the_embeddings() -> None:
    g = torch.Generator().manual_seed(3)
    embed = torch.nn.Embedding(V, D, dtype=torch.float64)
    head = torch.nn.Linear(D, V, bias=False, dtype=torch.float64)
    head.weight = embed.weight  # tied, as in Qwen2-VL-2B
    ids = torch.randint(0, V, (B, L), generator=g)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[:, :9] = -100
    fired = []
    embed.weight.register_post_accumulate_grad_hook(lambda p: fired.append(1))

    def run(fn, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        embed.weight.grad = None
        hidden = torch.tanh(embed(ids))  # the embedding's own gradient path
        loss, _ = fn(hidden, head, labels, **kwargs)
        loss.backward()
        return loss.detach(), embed.weight.grad.clone()

    ref = run(plain_cross_entropy)
    got = run(fused_linear_cross_entropy, chunk_size=5)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert fired == [1, 1]  # one accumulation per backward: both paths summed before .grad


def test_fused_gradient_accumulation_and_scaled_loss() -> None:
    """Two micro-batches, each loss scaled as module.step_loss does: .grad holds their sum."""
    (h1, head, y1), (h2, _, y2) = _fp64_inputs(1), _fp64_inputs(2)

    def accumulate(fn, **kwargs) -> list[torch.Tensor]:
        head.zero_grad(set_to_none=True)
        grads = []
        for h, y, scale in ((h1, y1, 0.37), (h2, y2, 1.9)):
            h = h.clone().requires_grad_(True)
            loss, _ = fn(h, head, y, **kwargs)
            (loss * scale).backward()
            grads.append(h.grad)
        return [*grads, head.weight.grad.clone(), head.bias.grad.clone()]

    ref = accumulate(plain_cross_entropy)
    got = accumulate(fused_linear_cross_entropy, chunk_size=7)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_fused_bf16_matches_plain_within_bf16_rounding() -> None:
    hidden, head, labels = _inputs()
    head = head.to(torch.bfloat16)
    hidden = hidden.to(torch.bfloat16)
    ref = _grads(plain_cross_entropy, hidden, head, labels)
    got = _grads(fused_linear_cross_entropy, hidden, head, labels, chunk_size=7)
    assert got[0].dtype == torch.float32
    assert [g.dtype for g in got[2:]] == [torch.bfloat16] * 3
    # Same bf16 logits, fp32 log-sum-exp on both sides: the losses agree to fp32 accuracy.
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-4)
    # The gradients differ by bf16 rounding (2^-8 relative per element): the weight gradient is
    # rounded once per chunk here, the hidden and bias ones in a different order.
    for g, r in zip(got[2:], ref[2:], strict=True):
        assert float((g.float() - r.float()).norm() / r.float().norm()) < 1e-2


def test_fused_calls_the_head_once_and_never_in_backward() -> None:
    """The property that distinguishes it from the checkpointed path, which recomputes."""
    hidden, _, labels = _inputs()
    n_chunks = -(-int((labels != -100).sum()) // 8)
    for fn, forward_calls, backward_calls in (
        (fused_linear_cross_entropy, 1, 0),
        (checkpointed_cross_entropy, n_chunks, n_chunks),
    ):
        head = CountingLinear(D, V)
        loss, _ = fn(hidden.clone().requires_grad_(True), head, labels, chunk_size=8, min_chunks=4)
        assert head.calls == forward_calls, fn.__name__
        loss.backward()
        assert head.calls == forward_calls + backward_calls, fn.__name__


def _head_matmuls_and_peak(fn, hidden, head, labels, **kwargs) -> tuple[int, int, int, int]:
    """(V-wide matmuls in forward, in backward, peak bytes of live op outputs in forward, in the
    whole step) of one step.

    Storage is counted once per storage, from the op that created it until its last tensor
    dies; views of the already-resident inputs (``weight.t()``) are not allocations."""
    hidden = hidden.clone().requires_grad_(True)
    resident = {t.untyped_storage().data_ptr() for t in (hidden, *head.parameters())}
    live: dict[int, list[int]] = {}
    state = {"now": 0, "peak": 0, "mm": 0}

    def drop(key: int) -> None:
        live[key][1] -= 1
        if live[key][1] == 0:
            state["now"] -= live.pop(key)[0]

    aten = torch.ops.aten

    class Tracker(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (aten.mm, aten.addmm, aten.addmm_) and any(
                V in t.shape for t in args if isinstance(t, torch.Tensor)
            ):
                state["mm"] += 1
            for t in out if isinstance(out, tuple | list) else [out]:
                key = t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else 0
                if key and key not in resident:
                    entry = live.setdefault(key, [t.untyped_storage().nbytes(), 0])
                    if entry[1] == 0:
                        state["now"] += entry[0]
                        state["peak"] = max(state["peak"], state["now"])
                    entry[1] += 1
                    weakref.finalize(t, drop, key)
            return out

    with Tracker():
        loss, _ = fn(hidden, head, labels, **kwargs)
        forward_mm, forward_peak = state["mm"], state["peak"]
        loss.backward()
    return forward_mm, state["mm"] - forward_mm, forward_peak, state["peak"]


def test_fused_flops_and_peak_memory() -> None:
    """Three head matmuls per chunk, all in forward; one chunk of logits and one weight gradient
    alive at most."""
    d, chunk = 128, 16
    _, _, labels = _inputs()
    hidden = torch.randn(B, L, d)
    n_chunks = -(-int((labels != -100).sum()) // chunk)
    figures = {}
    for fn in (fused_linear_cross_entropy, checkpointed_cross_entropy):
        head = torch.nn.Linear(d, V, bias=False)
        figures[fn.__name__] = _head_matmuls_and_peak(fn, hidden, head, labels, chunk_size=chunk)
    fused, checkpointed = figures["fused_linear_cross_entropy"], figures[
        "checkpointed_cross_entropy"]
    assert fused[:2] == (3 * n_chunks, 0)
    assert checkpointed[:2] == (n_chunks, 3 * n_chunks)
    weight_bytes, hidden_bytes, rows_bytes = V * d * 4, B * L * d * 4, 48 * d * 4
    chunk_bytes = chunk * V * 4
    # Forward: the weight gradient, the labelled rows and their gradient, one chunk of logits
    # (a second one, or a second weight gradient, would exceed the slack).
    assert fused[2] <= weight_bytes + 2 * rows_bytes + chunk_bytes + 2048
    # Whole step: the same plus two hidden-sized tensors made by the row selection's backward
    # (zeros, then index_put); the checkpointed loss exceeds it with its 3 weight gradients.
    bound = weight_bytes + 2 * hidden_bytes + 2 * rows_bytes + chunk_bytes + 4096
    assert fused[3] <= bound < checkpointed[3]


def test_fused_weight_gradient_is_adopted_not_copied() -> None:
    hidden, head, labels = _inputs()
    loss, _ = fused_linear_cross_entropy(hidden.requires_grad_(True), head, labels, chunk_size=7)
    stored = loss.grad_fn.grads[1].data_ptr()
    loss.backward()
    assert head.weight.grad.data_ptr() == stored
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_fused_uses_the_weight_gathered_by_the_head_call() -> None:
    """A partitioned head has data only inside its call (and backward): the fused path must
    read it there, and its weight gradient must reach the parameter while it is gathered."""
    hidden, plain_head, labels = _inputs()
    head = PartitionedLinear(D, V)
    with torch.no_grad():
        head.full["weight"].copy_(plain_head.weight)
        head.full["bias"].copy_(plain_head.bias)
    ref = _loss_and_grads(plain_cross_entropy, hidden, plain_head, labels)
    got = _loss_and_grads(fused_linear_cross_entropy, hidden, head, labels, chunk_size=7)
    assert head.weight.numel() == 0  # released again after the backward
    assert head.gathers == 2  # one call, and one gather before backward
    for g, r in zip([got[0], *got[2:]], [ref[0], *ref[2:]], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_fused_without_grad_and_with_a_frozen_head() -> None:
    hidden, head, labels = _fp64_inputs(4)
    ref, _ = plain_cross_entropy(hidden, head, labels)
    with torch.no_grad():
        loss, _ = fused_linear_cross_entropy(hidden, head, labels, chunk_size=7)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    head.requires_grad_(False)  # e.g. LoRA: only the hidden states need a gradient
    grads = []
    for fn, kwargs in ((plain_cross_entropy, {}), (fused_linear_cross_entropy, {"chunk_size": 7})):
        h = hidden.clone().requires_grad_(True)
        fn(h, head, labels, **kwargs)[0].backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
    assert head.weight.grad is None and head.bias.grad is None


def test_chunked_dispatches_on_the_head_type() -> None:
    hidden, _, labels = _inputs()
    with pytest.raises(TypeError, match="nn.Linear"):
        fused_linear_cross_entropy(hidden, CountingHead(D, V), labels)
    linear = CountingLinear(D, V)
    chunked_cross_entropy(hidden, linear, labels, chunk_size=8)
    assert linear.calls == 1  # fused
    wrapped = CountingHead(D, V)
    chunked_cross_entropy(hidden, wrapped, labels, chunk_size=8)
    assert wrapped.calls == 6  # checkpointed


def test_calls_head_once_only_for_the_fused_path():
    """Sharded ranks skip the chunk-count all-reduce exactly when the loss calls the head once."""
    from tvc_lightning.loss import calls_head_once

    class Lora(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert calls_head_once(torch.nn.Linear(4, 8))
    assert not calls_head_once(Lora(4, 8))
    assert not calls_head_once(torch.nn.Sequential(torch.nn.Linear(4, 8)))
