"""Accuracy of ckpt_attn.attention, forward and all three gradients, for both backends.

Every check is the rule of tests/reference.py: the error against a float64
reference is at most 2x (output) or 3x (gradients) the error of naive PyTorch
attention at the input dtype, plus ATOL[dtype]. Without CUDA, backend="triton"
runs the real kernels in the Triton interpreter (tests/conftest.py), which is
slow, so the shapes below are a bounded, diverse set rather than a product.
bfloat16 with the Triton kernels needs a GPU (the interpreter's tl.dot
miscomputes bf16): see tests/test_attention_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from reference import ATOL, assert_attention_within_rule

import ckpt_attn
from ckpt_attn.backends import chunked

FP16 = (torch.float16, ATOL[torch.float16])
BF16 = (torch.bfloat16, ATOL[torch.bfloat16])
FP32 = (torch.float32, ATOL[torch.float32])

# (batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim). Lengths: 1, odd,
# non-multiples of the interpreter's 32-row tiles, S_q < S_k and S_q > S_k
# (causal rows past S_k, and keys past S_q), exact tile multiples. Head dims:
# 1..256, mostly not powers of two, the big ones on short sequences. Heads:
# MHA, GQA (groups of 2, 3 and 4) and MQA.
SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 2, 2, 1, 239, 64),
    (1, 2, 1, 239, 1, 40),
    (2, 4, 2, 3, 77, 17),
    (1, 2, 2, 37, 53, 59),
    (1, 4, 2, 113, 203, 64),
    (1, 2, 1, 128, 217, 80),
    (1, 1, 1, 108, 256, 96),
    (1, 2, 2, 200, 65, 111),
    (2, 2, 2, 64, 64, 128),
    (1, 1, 1, 33, 47, 256),
    (1, 4, 1, 97, 31, 32),
    (1, 2, 2, 65, 65, 1),
    (1, 2, 2, 96, 96, 16),
    (1, 8, 2, 17, 129, 64),
    (1, 1, 1, 160, 33, 48),
    (3, 2, 1, 45, 45, 72),
    (1, 2, 2, 150, 150, 8),
    (1, 1, 1, 5, 256, 128),
    (1, 2, 2, 256, 7, 64),
    (1, 2, 1, 63, 95, 200),
    (1, 1, 1, 2, 3, 160),
    (2, 2, 1, 32, 33, 40),
    (1, 6, 2, 50, 40, 24),
    (1, 3, 3, 31, 32, 128),
]


def shape_id(shape) -> str:
    b, hq, hkv, sq, sk, d = shape
    return f"b{b}-h{hq}x{hkv}-s{sq}x{sk}-d{d}"


def make_inputs(shape, dtype, *, layout: str = "bhsd", device=DEVICE):
    """Random q, k, v (requiring grad) and an upstream gradient dO.

    layout "bshd" builds each of q, k, v as a (B, S, H, D) tensor passed as
    .transpose(1, 2), the non-contiguous view attention() must accept as is.
    """
    b, hq, hkv, sq, sk, d = shape

    def rand(heads, seq):
        if layout == "bshd":
            return torch.randn(b, seq, heads, d, dtype=dtype, device=device).transpose(1, 2)
        return torch.randn(b, heads, seq, d, dtype=dtype, device=device)

    q, k, v = rand(hq, sq), rand(hkv, sk), rand(hkv, sk)
    do = torch.randn(b, hq, sq, d, dtype=dtype, device=device)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def run_attention(q, k, v, do, *, backend, causal, scale=None, dlse=None):
    """O, lse and (dq, dk, dv) of ckpt_attn.attention for the loss <O, do> (+ <lse, dlse>)."""
    o, lse = ckpt_attn.attention(q, k, v, causal=causal, scale=scale, return_lse=True,
                                 backend=backend)
    outputs, grad_outputs = [o], [do]
    if dlse is not None:
        outputs.append(lse)
        grad_outputs.append(dlse)
    grads = torch.autograd.grad(outputs, (q, k, v), grad_outputs)
    return o.detach(), lse.detach(), grads


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------
# The main accuracy sweeps


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype, atol", [FP16, FP32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_triton_matches_reference(shape, dtype, atol, causal):
    q, k, v, do = make_inputs(shape, dtype)
    o, _, grads = run_attention(q, k, v, do, backend="triton", causal=causal)
    assert_attention_within_rule(o, grads, q, k, v, do, causal=causal, atol=atol,
                                 label=f"triton {dtype_name(dtype)}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype, atol", [FP16, BF16, FP32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_torch_backend_matches_reference(shape, dtype, atol, causal):
    q, k, v, do = make_inputs(shape, dtype)
    o, _, grads = run_attention(q, k, v, do, backend="torch", causal=causal)
    assert_attention_within_rule(o, grads, q, k, v, do, causal=causal, atol=atol,
                                 label=f"torch {dtype_name(dtype)}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 6, 2, 45, 70, 24), (1, 4, 1, 70, 33, 40)], ids=shape_id)
def test_torch_backend_small_chunks(monkeypatch, shape, causal):
    """Many query chunks, with GQA groups folded into the rows, and a ragged last chunk."""
    monkeypatch.setattr(chunked, "CHUNK", 16)
    q, k, v, do = make_inputs(shape, torch.float32)
    dlse = torch.randn(q.shape[:3], device=DEVICE)
    o, lse, grads = run_attention(q, k, v, do, backend="torch", causal=causal, dlse=dlse)
    assert_attention_within_rule(o, grads, q, k, v, do, causal=causal, lse=lse, dlse=dlse,
                                 label="torch float32 chunk=16")


# ---------------------------------------------------------------------------
# Layouts, scale, logsumexp


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype, atol", [FP16, FP32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("causal, shape", [(False, (2, 4, 2, 45, 70, 40)),
                                           (True, (1, 2, 1, 70, 45, 64))],
                         ids=["full", "causal"])
def test_transposed_inputs(backend, dtype, atol, causal, shape):
    """(B, S, H, D).transpose(1, 2) views are used without a copy; O keeps q's layout."""
    q, k, v, do = make_inputs(shape, dtype, layout="bshd")
    assert not q.is_contiguous() and q.stride(-1) == 1
    o, lse, grads = run_attention(q, k, v, do, backend=backend, causal=causal)
    assert o.stride() == q.stride()
    assert_attention_within_rule(o, grads, q, k, v, do, causal=causal, lse=lse, atol=atol,
                                 label=f"{backend} {dtype_name(dtype)} bshd")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_mixed_layouts(backend):
    """q dense in (B, S, H, D), k contiguous, v a slice of a wider tensor, dO transposed."""
    b, hq, hkv, sq, sk, d = 2, 4, 2, 37, 53, 24
    q = torch.randn(b, sq, hq, d, device=DEVICE).transpose(1, 2).requires_grad_()
    k = torch.randn(b, hkv, sk, d, device=DEVICE, requires_grad=True)
    v_wide = torch.randn(b, hkv, sk, 3 * d, device=DEVICE)
    v = v_wide[..., d:2 * d].requires_grad_()
    do = torch.randn(b, sq, hq, d, device=DEVICE).transpose(1, 2)
    assert v.stride(-1) == 1 and not v.is_contiguous()
    o, lse, grads = run_attention(q, k, v, do, backend=backend, causal=True)
    assert o.stride() == q.stride()
    assert_attention_within_rule(o, grads, q, k, v, do, causal=True, lse=lse,
                                 label=f"{backend} float32 mixed layout")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("scale", [0.03, 1.7])
def test_explicit_scale(backend, scale):
    q, k, v, do = make_inputs((1, 2, 1, 40, 50, 32), torch.float16)
    o, _, grads = run_attention(q, k, v, do, backend=backend, causal=True, scale=scale)
    assert_attention_within_rule(o, grads, q, k, v, do, causal=True, scale=scale,
                                 label=f"{backend} float16 scale")
    # the scale really is used: the default one gives a different O
    assert not torch.allclose(o, ckpt_attn.attention(q, k, v, causal=True, backend=backend))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype, atol", [FP16, FP32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("causal, shape", [(False, (1, 4, 2, 45, 77, 40)),
                                           (True, (2, 2, 1, 77, 45, 59)),
                                           (True, (1, 2, 2, 1, 33, 16))],
                         ids=["full", "causal", "causal-sq1"])
def test_lse_value_and_gradient(backend, dtype, atol, causal, shape):
    """return_lse gives the float32 natural-log logsumexp, and a loss using both O and
    lse back-propagates through both (delta = rowsum(dO * O) - dlse)."""
    q, k, v, do = make_inputs(shape, dtype)
    dlse = torch.randn(q.shape[:3], device=DEVICE)
    o, lse, grads = run_attention(q, k, v, do, backend=backend, causal=causal, dlse=dlse)
    assert_attention_within_rule(o, grads, q, k, v, do, causal=causal, lse=lse, dlse=dlse,
                                 atol=atol, label=f"{backend} {dtype_name(dtype)} with dlse")
    # the lse term matters: without it the gradients differ
    _, _, grads_o_only = run_attention(q, k, v, do, backend=backend, causal=causal)
    assert not torch.equal(grads[0], grads_o_only[0])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradient_through_lse_only(backend):
    """O unused (its gradient arrives as None): the gradients are those of lse alone."""
    q, k, v, _ = make_inputs((1, 4, 2, 50, 61, 32), torch.float32)
    _, lse = ckpt_attn.attention(q, k, v, causal=True, return_lse=True, backend=backend)
    dlse = torch.randn_like(lse)
    grads = torch.autograd.grad(lse, (q, k, v), dlse)
    o = ckpt_attn.attention(q, k, v, causal=True, backend=backend).detach()
    zeros = torch.zeros_like(o)
    assert_attention_within_rule(o, grads, q, k, v, zeros, causal=True, dlse=dlse,
                                 label=f"{backend} float32 lse only")
    assert grads[2].abs().max() == 0  # dv = P^T dO = 0
    assert grads[0].abs().max() > 0


# ---------------------------------------------------------------------------
# Large magnitudes, determinism


LARGE_CASES = {
    # scores ~ +-400 after scaling: softmax saturates to near one-hot rows
    "q*100": dict(q=100.0, k=1.0, v=1.0),
    # raw q k^T products in the tens of thousands, near float16's max (65504)
    "q*100,k*8": dict(q=100.0, k=8.0, v=1.0),
    # O and dO V^T in the thousands
    "v*1000": dict(q=1.0, k=1.0, v=1000.0),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype, atol", [FP16, FP32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", list(LARGE_CASES))
def test_large_magnitude_inputs(backend, dtype, atol, case):
    factors = LARGE_CASES[case]
    q, k, v, do = make_inputs((1, 2, 1, 61, 70, 64), dtype)
    with torch.no_grad():
        q.mul_(factors["q"])
        k.mul_(factors["k"])
        v.mul_(factors["v"])
    dlse = torch.randn(q.shape[:3], device=DEVICE)
    o, lse, grads = run_attention(q, k, v, do, backend=backend, causal=True, dlse=dlse)
    for name, t in zip(("O", "lse", "dq", "dk", "dv"), (o, lse, *grads), strict=True):
        assert torch.isfinite(t).all(), f"non-finite {name}"
    assert_attention_within_rule(o, grads, q, k, v, do, causal=True, lse=lse, dlse=dlse,
                                 atol=atol, label=f"{backend} {dtype_name(dtype)} large")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_is_deterministic(backend, causal):
    q, k, v, do = make_inputs((2, 4, 2, 70, 90, 40), torch.float16)
    dlse = torch.randn(q.shape[:3], device=DEVICE)
    first = run_attention(q, k, v, do, backend=backend, causal=causal, dlse=dlse)
    second = run_attention(q, k, v, do, backend=backend, causal=causal, dlse=dlse)
    for name, a, b in zip(("O", "lse"), first[:2], second[:2], strict=True):
        assert torch.equal(a, b), name
    for name, a, b in zip(("dq", "dk", "dv"), first[2], second[2], strict=True):
        assert torch.equal(a, b), name
