"""The ops' arguments can cause no memory corruption, no silent wrong answer and no hang
(issue 10), on both backends:

- every tensor argument is dense (strided, not sparse) and read through its own strides or
  copied first: cu_seqlens, and lse, dO and dlse in the backward op;
- a window side of any size (sys.maxsize, 2**64) is clamped before it reaches a backend,
  so no index arithmetic overflows: the same bits as an unbounded side;
- every Python argument has its type checked: a TypeError or ValueError naming it;
- max_seqlen_q / max_seqlen_k, which size the launch grid, are bounded by the token counts.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import DEVICE
from reference import random_inputs, run_attention
from torch._subclasses.fake_tensor import FakeTensorMode

import ckpt_attn

BACKENDS = ["triton", "torch"]


def cumulative(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEVICE)


def packed(lens_q, lens_k, heads=2, head_dim=16):
    """Packed q, k, v (requiring grad) of the given sequence lengths."""
    q = torch.randn(sum(lens_q), heads, head_dim, device=DEVICE)
    k = torch.randn(sum(lens_k), heads, head_dim, device=DEVICE)
    v = torch.randn(sum(lens_k), heads, head_dim, device=DEVICE)
    return [t.requires_grad_() for t in (q, k, v)]


def small_qkv():
    q, k, v, _ = random_inputs((2, 4, 2, 5, 7, 8), torch.float32, device=DEVICE)
    return q, k, v


def varlen_with_grads(q, k, v, cu_q, cu_k, max_q, max_k, do, **kwargs):
    o = ckpt_attn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


# ---------------------------------------------------------------------------
# Tensor arguments of any strides


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["q", "k"])
def test_strided_cu_seqlens_give_the_same_bits(backend, side):
    """A column of a 2-D int32 tensor (stride 2) is read as its values, not its storage."""
    lens_q, lens_k = [20, 25, 7], [17, 30, 7]
    q, k, v = packed(lens_q, lens_k)
    do = torch.randn_like(q)
    cu = {"q": cumulative(lens_q), "k": cumulative(lens_k)}
    expected = varlen_with_grads(q, k, v, cu["q"], cu["k"], 25, 30, do, causal=True,
                                 backend=backend)
    # interleaved with zeros: reading with stride 1 would give other, in-range bounds
    cu[side] = torch.stack([cu[side], torch.zeros_like(cu[side])], dim=1)[:, 0]
    assert not cu[side].is_contiguous()
    got = varlen_with_grads(q, k, v, cu["q"], cu["k"], 25, 30, do, causal=True,
                            backend=backend)
    for name, a, b in zip(("O", "dq", "dk", "dv"), got, expected, strict=True):
        assert torch.equal(a, b), name


def sparse_message(name: str) -> str:
    return rf"^{name} must be a dense \(strided\) tensor, got layout torch.sparse_coo"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["q", "k", "v", "attn_mask"])
def test_sparse_tensors_are_refused(backend, name):
    """A tensor without strides is named, not met with a data-pointer or expand error."""
    q, k, v = small_qkv()
    args = {"q": q, "k": k, "v": v,
            "attn_mask": torch.ones(5, 7, dtype=torch.bool, device=DEVICE)}
    args[name] = args[name].detach().to_sparse()
    with pytest.raises(TypeError, match=sparse_message(name)):
        ckpt_attn.attention(**args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["cu_seqlens_q", "cu_seqlens_k"])
def test_sparse_cu_seqlens_are_refused(backend, name):
    q, k, v = packed([20, 25], [17, 30])
    cu = {"cu_seqlens_q": cumulative([20, 25]), "cu_seqlens_k": cumulative([17, 30])}
    cu[name] = cu[name].to_sparse()
    with pytest.raises(TypeError, match=sparse_message(name)):
        ckpt_attn.attention_varlen(q, k, v, **cu, max_seqlen_q=25, max_seqlen_k=30,
                                   backend=backend)


def transposed_copy(t: torch.Tensor) -> torch.Tensor:
    """t's values in a layout with its last two dims' strides swapped (not contiguous)."""
    return t.mT.contiguous().mT


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["stats", "do", "dlse"])
def test_backward_op_reads_any_strides(backend, name):
    """The registered backward op (as a compiled graph calls it) gives the same bits for row
    statistics, dO or dlse that are not laid out densely."""
    q, k, v, do = random_inputs((1, 2, 1, 37, 50, 16), torch.float32, device=DEVICE)
    q, k, v = (t.detach() for t in (q, k, v))
    scale = 0.25
    o, stats = torch.ops.ckpt_attn.attention_forward(q, k, v, None, True, scale, -1, -1, 0.0,
                                                     None, None, None, None, 0, 0, backend)
    inputs = {"do": do, "dlse": torch.randn(stats.shape[:3], device=DEVICE), "stats": stats}

    def backward(tensors):
        return torch.ops.ckpt_attn.attention_backward(
            tensors["do"], tensors["dlse"], q, k, v, o, tensors["stats"], None, True, scale,
            -1, -1, 0.0, None, None, None, None, 0, 0, False, backend)[:3]

    expected = backward(inputs)
    strided = transposed_copy(inputs[name])
    assert torch.equal(strided, inputs[name]) and not strided.is_contiguous()
    got = backward({**inputs, name: strided})
    for grad, a, b in zip(("dq", "dk", "dv"), got, expected, strict=True):
        assert torch.equal(a, b), grad


# ---------------------------------------------------------------------------
# Window sides of any size


HUGE = {
    # window: the unbounded window it equals
    (0, sys.maxsize): (0, -1),
    (sys.maxsize, 0): (-1, 0),
    (sys.maxsize, sys.maxsize): (-1, -1),
    (2**64, 3): (-1, 3),
    (4, 2**200): (4, -1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window", list(HUGE), ids=str)
def test_huge_window_side_is_unbounded(backend, causal, window):
    """O, lse and the gradients equal those of -1 on that side, bit for bit."""
    q, k, v, do = random_inputs((1, 2, 1, 37, 50, 16), torch.float32, device=DEVICE)
    dlse = torch.randn(q.shape[:3], device=DEVICE)
    got = run_attention(q, k, v, do, backend=backend, causal=causal, dlse=dlse, window=window)
    expected = run_attention(q, k, v, do, backend=backend, causal=causal, dlse=dlse,
                             window=HUGE[window])
    for name, a, b in zip(("O", "lse", "dq", "dk", "dv"), (*got[:2], *got[2]),
                          (*expected[:2], *expected[2]), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(sys.maxsize, 0), (0, 2**64)], ids=str)
def test_huge_window_side_in_packed_sequences(backend, window):
    lens_q, lens_k = [20, 25, 7], [17, 30, 7]
    q, k, v = packed(lens_q, lens_k)
    do = torch.randn_like(q)
    cu_q, cu_k = cumulative(lens_q), cumulative(lens_k)
    unbounded = tuple(-1 if side > 1000 else side for side in window)
    got = varlen_with_grads(q, k, v, cu_q, cu_k, 25, 30, do, causal=True, window=window,
                            backend=backend)
    expected = varlen_with_grads(q, k, v, cu_q, cu_k, 25, 30, do, causal=True,
                                 window=unbounded, backend=backend)
    for name, a, b in zip(("O", "dq", "dk", "dv"), got, expected, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window, error, match", [
    ((np.int64(3), 0), TypeError, r"window .*left side is numpy.int64"),
    ((0, torch.tensor(3)), TypeError, r"window .*right side is torch.Tensor"),
    ((0, "3"), TypeError, r"window .*right side is str"),
    (torch.tensor([3, 0]), TypeError, r"window must be a pair of ints"),
    ((-2**64, 0), ValueError, r"window values must be >= -1 .*got left = -1844674"),
], ids=["numpy-int", "tensor-side", "str-side", "tensor", "huge-negative"])
def test_window_side_types(backend, window, error, match):
    with pytest.raises(error, match=match):
        ckpt_attn.attention(*small_qkv(), window=window, backend=backend)


# ---------------------------------------------------------------------------
# Python arguments' types


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["causal", "return_lse"])
@pytest.mark.parametrize("value, type_name", [
    (torch.tensor([True, False]), "torch.Tensor"), (torch.tensor(True), "torch.Tensor"),
    (1, "int"), (np.bool_(True), "numpy.bool"), (None, "NoneType"), ("yes", "str"),
], ids=["tensor", "0-d-tensor", "int", "numpy-bool", "None", "str"])
def test_flags_must_be_bool(backend, name, value, type_name):
    with pytest.raises(TypeError, match=rf"^{name} must be a bool, got {type_name}$"):
        ckpt_attn.attention(*small_qkv(), backend=backend, **{name: value})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [10**400, -10**400], ids=["huge", "huge-negative"])
def test_scale_beyond_float_range(backend, scale):
    """An int too large for a float is refused as not finite, not an OverflowError."""
    with pytest.raises(ValueError, match=r"^scale must be finite, got -?1000000000"):
        ckpt_attn.attention(*small_qkv(), scale=scale, backend=backend)


@pytest.mark.parametrize("value", [torch.tensor(1), None, 1, ["torch"]],
                         ids=["tensor", "None", "int", "list"])
def test_backend_must_be_a_str(value):
    with pytest.raises(TypeError, match=r"^backend must be a str, one of \('auto', 'triton', "
                                        rf"'torch'\), got {type(value).__name__}"):
        ckpt_attn.attention(*small_qkv(), backend=value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs, error, match", [
    ({"causal": torch.tensor([True, False])}, TypeError, r"^causal must be a bool, got torch"),
    ({"window": (2**64, 0)}, None, None),
    ({"window": (1.0, 0)}, TypeError, r"window .*left side is float"),
    ({"scale": 10**400}, ValueError, r"^scale must be finite"),
    ({"dropout_p": torch.tensor(0.1)}, TypeError, r"^dropout_p must be a float"),
    ({"backend": 3}, TypeError, r"^backend must be a str"),
], ids=["causal-tensor", "huge-window", "float-window", "huge-scale", "tensor-dropout",
        "int-backend"])
def test_varlen_python_arguments(backend, kwargs, error, match):
    """attention_varlen checks causal, window, scale, dropout_p and backend as attention()."""
    q, k, v = packed([20, 25], [17, 30])
    cu_q, cu_k = cumulative([20, 25]), cumulative([17, 30])
    call = lambda: ckpt_attn.attention_varlen(q, k, v, cu_q, cu_k, 25, 30,
                                              **{"backend": backend, **kwargs})
    if error is None:
        torch.testing.assert_close(call(), ckpt_attn.attention_varlen(
            q, k, v, cu_q, cu_k, 25, 30, window=(-1, 0), backend=backend), rtol=0, atol=0)
    else:
        with pytest.raises(error, match=match):
            call()


# ---------------------------------------------------------------------------
# max_seqlen_q / max_seqlen_k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, total", [("max_seqlen_q", 45), ("max_seqlen_k", 47)])
@pytest.mark.parametrize("value, error, match", [
    (400000, ValueError, r"must be in \[0, {total}\] .*got 400000"),
    (2**64, ValueError, r"must be in \[0, {total}\] .*got 18446744073709551616"),
    (-1, ValueError, r"must be in \[0, {total}\] .*got -1"),
    (True, TypeError, r"must be an int, got bool"),
    (np.int64(30), TypeError, r"must be an int, got numpy.int64"),
    (torch.tensor(30), TypeError, r"must be an int, got torch.Tensor"),
], ids=["far-above", "2**64", "negative", "bool", "numpy-int", "tensor"])
def test_max_seqlen_bounds(backend, name, total, value, error, match):
    """A max_seqlen above its side's token count is refused before any launch (the grid is
    sized from it: 400000 for 45 tokens ran for minutes)."""
    q, k, v = packed([20, 25], [17, 30])
    lengths = {"max_seqlen_q": 25, "max_seqlen_k": 30, name: value}
    with pytest.raises(error, match=rf"^{name} " + match.format(total=total)):
        ckpt_attn.attention_varlen(q, k, v, cumulative([20, 25]), cumulative([17, 30]),
                                   lengths["max_seqlen_q"], lengths["max_seqlen_k"],
                                   backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_under_fake_tensor_mode(backend):
    """Without readable cu_seqlens (FakeTensorMode, meta) the values are not checked, but
    shapes propagate and the bounds that need no read still hold."""
    q, k, v = (t.detach() for t in packed([20, 25], [17, 30]))
    cu_q, cu_k = cumulative([20, 25]), cumulative([17, 30])
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (q, k, v, cu_q, cu_k)]
        o = ckpt_attn.attention_varlen(*fake, 25, 30, causal=True, backend=backend)
        assert o.shape == q.shape
        with pytest.raises(ValueError, match=r"^max_seqlen_q must be in \[0, 45\]"):
            ckpt_attn.attention_varlen(*fake, 46, 30, backend=backend)
    meta = [t.to("meta") for t in (q, k, v, cu_q, cu_k)]
    assert ckpt_attn.attention_varlen(*meta, 25, 30).shape == q.shape
