"""Tests of the chunked cross-entropy against the full-logits baseline and an explicit formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tvc_lightning.loss import chunked_cross_entropy, plain_cross_entropy

B, L, D, V = 2, 37, 16, 101


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


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_matches_plain_value_and_gradients(chunk_size: int) -> None:
    hidden, head, labels = _inputs(seed=chunk_size)
    ref = _loss_and_grads(plain_cross_entropy, hidden, head, labels)
    got = _loss_and_grads(chunked_cross_entropy, hidden, head, labels, chunk_size=chunk_size)

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


def test_chunked_does_not_save_logits_for_backward() -> None:
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
    assert not holds_logits(saved_widths(chunked_cross_entropy, chunk_size=7))


def test_backward_recomputes_each_chunk_once() -> None:
    hidden, _, labels = _inputs()
    head = CountingHead(D, V)
    n_labelled = int((labels != -100).sum())
    n_chunks = -(-n_labelled // 8)
    hidden.requires_grad_(True)

    loss, _ = chunked_cross_entropy(hidden, head, labels, chunk_size=8)
    assert head.calls == n_chunks
    loss.backward()
    assert head.calls == 2 * n_chunks  # logits were recomputed, not kept

    with torch.no_grad():  # no graph, nothing to recompute, no checkpoint overhead
        head.calls = 0
        chunked_cross_entropy(hidden, head, labels, chunk_size=8)
        assert head.calls == n_chunks


def test_single_chunk_is_not_recomputed() -> None:
    hidden, _, labels = _inputs()
    head = CountingHead(D, V)
    loss, _ = chunked_cross_entropy(hidden.requires_grad_(True), head, labels, chunk_size=1000)
    loss.backward()
    assert head.calls == 1


def test_head_gradient_hooks_fire_once_per_backward() -> None:
    """Chunk gradients must be summed before reaching the parameter (ZeRO-1/2 grad hooks)."""
    hidden, head, labels = _inputs()
    fired = {"weight": 0, "bias": 0}
    for name in fired:
        getattr(head, name).register_post_accumulate_grad_hook(
            lambda _p, name=name: fired.__setitem__(name, fired[name] + 1)
        )
    loss, _ = chunked_cross_entropy(hidden.requires_grad_(True), head, labels, chunk_size=3)
    loss.backward()
    assert fired == {"weight": 1, "bias": 1}


def test_min_chunks_pads_head_calls_without_changing_the_loss() -> None:
    hidden, _, labels = _inputs()
    head = CountingHead(D, V)
    ref, _ = chunked_cross_entropy(hidden, head, labels, chunk_size=1000)
    head.calls = 0
    loss, _ = chunked_cross_entropy(
        hidden.requires_grad_(True), head, labels, chunk_size=1000, min_chunks=4
    )
    assert head.calls == 4
    loss.backward()
    assert head.calls == 8
    torch.testing.assert_close(loss.detach(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("fn", [chunked_cross_entropy, plain_cross_entropy])
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


def test_all_ignored_stays_zero_with_non_finite_hidden() -> None:
    hidden, head, labels = _inputs()
    hidden[0, 0, 0] = float("nan")
    loss, _ = chunked_cross_entropy(hidden, head, torch.full_like(labels, -100))
    assert loss.item() == 0.0


@pytest.mark.parametrize("head_dtype", [torch.float32, torch.bfloat16])
def test_bf16_hidden_computes_ce_in_fp32(head_dtype: torch.dtype) -> None:
    hidden, head, labels = _inputs()
    head = head.to(head_dtype)
    hidden_bf16 = hidden.to(torch.bfloat16).requires_grad_(True)

    loss, n = chunked_cross_entropy(hidden_bf16, head, labels, chunk_size=7)
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


def test_under_autocast_matches_plain() -> None:
    hidden, head, labels = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _loss_and_grads(plain_cross_entropy, hidden, head, labels)
        got = _loss_and_grads(chunked_cross_entropy, hidden, head, labels, chunk_size=5)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-4)
    # The recomputation runs under the same autocast state, so the gradients agree too, up to
    # bf16 rounding of differently partitioned matmul sums (hence a norm-wise comparison).
    for g, g_ref in zip(got[2:], ref[2:], strict=True):
        assert float((g.float() - g_ref.float()).norm() / g_ref.float().norm()) < 1e-2


def test_rejects_bad_arguments() -> None:
    hidden, head, labels = _inputs()
    with pytest.raises(ValueError, match="labels shape"):
        chunked_cross_entropy(hidden, head, labels[:, :-1])
    with pytest.raises(ValueError, match="labels shape"):
        plain_cross_entropy(hidden, head, labels[:1])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden, head, labels, chunk_size=0)
