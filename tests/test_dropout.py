"""Attention dropout: reproducible from torch's seed, regenerated (not stored) in the
backward, the same pairs dropped by both backends, and gradients equal to a
reference that applies the very same mask."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from reference import ATOL, FORWARD_FACTOR, GRADIENT_FACTOR, assert_within_rule

import ckpt_attn
from ckpt_attn.backends import philox

BACKENDS = ["triton", "torch"]


def qkv(b, hq, hkv, sq, sk, d, dtype=torch.float32):
    return (torch.randn(b, hq, sq, d, dtype=dtype, device=DEVICE, requires_grad=True),
            torch.randn(b, hkv, sk, d, dtype=dtype, device=DEVICE, requires_grad=True),
            torch.randn(b, hkv, sk, d, dtype=dtype, device=DEVICE, requires_grad=True))


def dropped_probabilities(q, k, p, seed, backend, causal=False, attn_mask=None):
    """dropout(P) itself, recovered by attending to v = identity (S_k == D)."""
    eye = torch.eye(k.shape[2], dtype=q.dtype, device=q.device).expand(k.shape).contiguous()
    torch.manual_seed(seed)
    return ckpt_attn.attention(q.detach(), k.detach(), eye, attn_mask, dropout_p=p,
                               causal=causal, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_output_other_seed_other_output(backend):
    q, k, v = qkv(1, 2, 2, 37, 45, 16)
    outputs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outputs.append(ckpt_attn.attention(q, k, v, dropout_p=0.2, backend=backend))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], outputs[2])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backends_drop_the_same_pairs(causal):
    """Philox in PyTorch (ckpt_attn.backends.philox) equals Triton's tl.rand bit for bit."""
    q, k, v = qkv(2, 4, 2, 45, 70, 16)
    do = torch.randn(2, 4, 45, 16, device=DEVICE)
    results = {}
    for backend in BACKENDS:
        torch.manual_seed(3)
        o = ckpt_attn.attention(q, k, v, dropout_p=0.3, causal=causal, backend=backend)
        results[backend] = (o, *torch.autograd.grad(o, (q, k, v), do))
    for ours, theirs in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_philox_matches_known_stream():
    """The PyTorch Philox is deterministic and uniform on [0, 1)."""
    u = philox.uniform(12345, torch.arange(100_000, dtype=torch.int64))
    assert torch.equal(u, philox.uniform(12345, torch.arange(100_000, dtype=torch.int64)))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate(backend, p):
    """Over 2 * 2 * 64 * 64 = 16384 probabilities the dropped share is within 0.02 of p."""
    q, k, _ = qkv(2, 2, 2, 64, 64, 64)
    z = dropped_probabilities(q, k, p, seed=11, backend=backend)
    kept = z != 0
    assert abs((1 - kept.float().mean()).item() - p) < 0.02
    probabilities = torch.softmax(q.detach() @ k.detach().transpose(-1, -2) / 8, dim=-1)
    torch.testing.assert_close(z[kept], probabilities[kept] / (1 - p), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradients_equal_reference_with_the_same_mask(backend, causal):
    """Recover the kernel's mask, apply it in a naive float64 reference and compare
    O and all gradients under the accuracy rule (naive float32 with the same mask)."""
    b, hq, hkv, sq, d = 1, 4, 2, 40, 48
    p, seed = 0.25, 5
    q, k, v = qkv(b, hq, hkv, sq, d, d)
    mask = torch.ones(b, 1, sq, d, dtype=torch.bool, device=DEVICE)
    mask[..., 7] = False  # combined with an attn_mask column
    z = dropped_probabilities(q, k, p, seed, backend, causal=causal, attn_mask=mask)
    keep = z != 0
    do = torch.randn(b, hq, sq, d, device=DEVICE)

    torch.manual_seed(seed)
    o = ckpt_attn.attention(q, k, v, mask, dropout_p=p, causal=causal, backend=backend)
    grads = torch.autograd.grad(o, (q, k, v), do)

    def naive(q, k, v):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = q @ k.transpose(-1, -2) / d**0.5
        hidden = ~mask.expand_as(scores)
        if causal:
            hidden = hidden | torch.ones_like(hidden).triu(1)
        probabilities = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
        return torch.where(keep, probabilities / (1 - p), 0.0) @ v

    results = {}
    for name, dtype in (("naive", torch.float32), ("reference", torch.float64)):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = naive(*inputs)
        results[name] = (out, *torch.autograd.grad(out, inputs, do.to(dtype)))
    for index, what in enumerate(("O", "dq", "dk", "dv")):
        assert_within_rule((o, *grads)[index], results["naive"][index],
                           results["reference"][index],
                           factor=FORWARD_FACTOR if what == "O" else GRADIENT_FACTOR,
                           atol=ATOL[torch.float32], what=f"{backend} dropout {what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_saves_no_mask(backend):
    """With dropout, autograd keeps only q, k, v, O, the row statistics and the seed (one
    int64), nothing of size S_q x S_k."""
    q, k, v = qkv(1, 2, 2, 33, 40, 16)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        o = ckpt_attn.attention(q, k, v, dropout_p=0.5, backend=backend)
    assert [t.shape for t in packed] == [q.shape, k.shape, v.shape, o.shape, (1, 2, 33, 2), ()]
    assert packed[-1].dtype == torch.int64


@pytest.mark.parametrize("value, error", [(-0.1, ValueError), (1.0, ValueError),
                                          (1.5, ValueError), (True, TypeError),
                                          ("0.1", TypeError)])
def test_bad_dropout_p(value, error):
    q, k, v = qkv(1, 1, 1, 4, 4, 8)
    with pytest.raises(error, match="dropout_p"):
        ckpt_attn.attention(q, k, v, dropout_p=value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_block_with_its_origin_drops_the_pairs_of_the_whole_problem(backend):
    """_dropout_origin=(row_offset, col_offset, total_q, total_k) (context parallelism): the
    block of a larger problem drops exactly the pairs the whole problem drops there under
    the same seed, and its backward regenerates that mask (dV = dropout(P)^T dO)."""
    batch, heads_q, heads_kv, total_q, total_k = 1, 4, 2, 40, 70
    rows, cols = slice(29, 40), slice(20, 57)  # across the interpreter's 32-row tiles

    def dropped_identity(seqlen_q, seqlen_k, origin):
        """(dropout(P), v): attention of q = k = 0 (P uniform) over v = identity."""
        q = torch.zeros(batch, heads_q, seqlen_q, seqlen_k, device=DEVICE)
        k = torch.zeros(batch, heads_kv, seqlen_k, seqlen_k, device=DEVICE)
        v = torch.eye(seqlen_k, device=DEVICE).expand(k.shape).contiguous().requires_grad_()
        torch.manual_seed(7)
        return ckpt_attn.attention(q, k, v, dropout_p=0.4, backend=backend,
                                   _dropout_origin=origin), v

    whole, _ = dropped_identity(total_q, total_k, None)
    block, v = dropped_identity(rows.stop - rows.start, cols.stop - cols.start,
                                (rows.start, cols.start, total_q, total_k))
    assert torch.equal(block > 0, whole[:, :, rows, cols] > 0)
    assert 0.3 < (block == 0).float().mean().item() < 0.5
    do = torch.randn_like(block)
    (dv,) = torch.autograd.grad(block, v, do)
    expected = (block.detach().transpose(-1, -2) @ do).unflatten(1, (heads_kv, -1)).sum(2)
    torch.testing.assert_close(dv, expected)
