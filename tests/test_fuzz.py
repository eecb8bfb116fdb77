"""Property tests: random shapes and feature combinations, drawn by hypothesis.

The torch backend in float64 must equal naive float64 attention (with the same
mask and window) to float64 precision, and the Triton kernels in float32 must
match the torch backend, for any mix of GQA, S_q != S_k, lengths 0 and 1, odd
head dims, causal, windows, bool and float masks, and broadcast mask shapes.
"""

from __future__ import annotations

import torch
from conftest import DEVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import naive_attention

import ckpt_attn


@st.composite
def problems(draw, max_seqlen: int, max_head_dim: int):
    """(shape, causal, window, mask kind, mask broadcast pattern) of one random problem."""
    heads_kv = draw(st.integers(1, 3))
    shape = (draw(st.integers(0, 2)), heads_kv * draw(st.integers(1, 3)), heads_kv,
             draw(st.integers(0, max_seqlen)), draw(st.integers(0, max_seqlen)),
             draw(st.integers(1, max_head_dim)))
    window = draw(st.none() | st.tuples(st.integers(-1, 12), st.integers(-1, 12)))
    mask_kind = draw(st.sampled_from([None, "bool", "float"]))
    keep_dims = draw(st.tuples(*[st.booleans()] * 4))  # False: broadcast that dim
    return shape, draw(st.booleans()), window, mask_kind, keep_dims


def make_problem(problem, dtype, seed):
    shape, causal, window, mask_kind, keep_dims = problem
    batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim = shape
    generator = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=generator, dtype=dtype).to(DEVICE)

    q = rand(batch, heads_q, seqlen_q, head_dim)
    k, v = rand(batch, heads_kv, seqlen_k, head_dim), rand(batch, heads_kv, seqlen_k, head_dim)
    mask = None
    if mask_kind is not None:
        full = (batch, heads_q, seqlen_q, seqlen_k)
        size = [n if keep else 1 for n, keep in zip(full, keep_dims, strict=True)]
        mask = rand(*size) * 2
        if mask_kind == "bool":
            mask = mask > -1.0
    return q, k, v, mask, causal, window


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(max_seqlen=40, max_head_dim=48), seed=st.integers(0, 2**16))
def test_torch_backend_equals_float64_naive(problem, seed):
    q, k, v, mask, causal, window = make_problem(problem, torch.float64, seed)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    o, lse = ckpt_attn.attention(*inputs, mask, causal=causal, window=window, backend="torch",
                                 return_lse=True)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    ref_o, ref_lse = naive_attention(*ref_inputs, causal=causal, attn_mask=mask, window=window)
    torch.testing.assert_close(o, ref_o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    if o.numel():
        do = torch.randn_like(o)
        grads = torch.autograd.grad(o, inputs, do)
        ref_grads = torch.autograd.grad(ref_o, ref_inputs, do)
        for grad, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(max_seqlen=70, max_head_dim=40), seed=st.integers(0, 2**16))
def test_triton_kernels_equal_torch_backend(problem, seed):
    q, k, v, mask, causal, window = make_problem(problem, torch.float32, seed)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    results = []
    for backend in ("triton", "torch"):
        o, lse = ckpt_attn.attention(*inputs, mask, causal=causal, window=window,
                                     backend=backend, return_lse=True)
        grads = torch.autograd.grad(o, inputs, torch.ones_like(o)) if o.numel() else ()
        results.append((o, lse, *grads))
    for ours, theirs in zip(*results, strict=True):
        assert not ours.isnan().any()
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
