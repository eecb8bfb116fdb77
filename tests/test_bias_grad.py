"""Gradient of a float attn_mask (an attention bias): dS, summed over the mask's broadcast
dimensions, against float64 autograd of naive attention, for both backends."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from reference import ATOL, GRADIENT_FACTOR, assert_within_rule, naive_attention

import ckpt_attn

BACKENDS = ["triton", "torch"]
B, HQ, HKV, SQ, SK, D = 2, 4, 2, 45, 70, 16

# Bias shapes: full, per head (ALiBi / relative position), key padding as a bias,
# 1-D over keys, 2-D, per head broadcast over queries, and broadcast over keys.
SHAPES = [(B, HQ, SQ, SK), (1, HQ, SQ, SK), (B, 1, 1, SK), (SK,), (SQ, SK), (1, HQ, 1, SK),
          (B, HQ, SQ, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol", [(torch.float16, ATOL[torch.float16]),
                                         (torch.float32, ATOL[torch.float32])],
                         ids=["fp16", "fp32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bias_gradient(backend, dtype, atol, causal, shape):
    q = torch.randn(B, HQ, SQ, D, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(B, HKV, SK, D, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(B, HKV, SK, D, device=DEVICE, dtype=dtype, requires_grad=True)
    bias = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    do = torch.randn(B, HQ, SQ, D, device=DEVICE, dtype=dtype)
    o = ckpt_attn.attention(q, k, v, bias, causal=causal, backend=backend)
    grads = torch.autograd.grad(o, (q, k, v, bias), do)
    assert grads[3].shape == bias.shape and grads[3].dtype == bias.dtype

    def naive_grads(precision):
        inputs = [t.detach().to(precision).requires_grad_() for t in (q, k, v, bias)]
        out, _ = naive_attention(*inputs[:3], causal=causal, attn_mask=inputs[3])
        return torch.autograd.grad(out, inputs, do.to(precision))

    naive, reference = naive_grads(dtype), naive_grads(torch.float64)
    for index, what in enumerate(("dq", "dk", "dv", "dbias")):
        assert_within_rule(grads[index], naive[index], reference[index], factor=GRADIENT_FACTOR,
                           atol=atol, what=f"{backend} {str(dtype)[6:]} bias {what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_gradient_unless_required(backend):
    """A bias that does not require grad gets none, and q's gradient is unaffected."""
    q = torch.randn(1, 2, 20, 16, device=DEVICE, requires_grad=True)
    bias = torch.randn(20, 20, device=DEVICE)
    o = ckpt_attn.attention(q, q.detach(), q.detach(), bias, backend=backend)
    o.sum().backward()
    assert bias.grad is None and q.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gradient_with_dropout_matches_across_backends(backend):
    """With dropout the bias gradient follows the same regenerated mask on both backends."""
    inputs = [torch.randn(1, 2, 33, 16, device=DEVICE, requires_grad=True) for _ in range(3)]
    bias = torch.randn(2, 33, 33, device=DEVICE, requires_grad=True)
    results = {}
    for name in BACKENDS:
        torch.manual_seed(8)
        o = ckpt_attn.attention(*inputs, bias, dropout_p=0.3, backend=name)
        results[name] = torch.autograd.grad(o.square().sum(), bias)[0]
    torch.testing.assert_close(results["triton"], results["torch"], rtol=1e-5, atol=1e-5)
