"""GPU-only checks of the compiled Triton kernels (skipped without CUDA).

bfloat16 (which the Triton interpreter cannot run), realistic sequence lengths,
float32 with and without TF32, peak memory, and large bf16 values. `make
gpu-check` runs these plus the tests marked gpu elsewhere (int64 offsets,
huge inputs, determinism), which run on the CPU too. Compilation dominates the
run time, so the cases share a small set of (head_dim, causal, dtype)
combinations.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from reference import (
    ATOL,
    assert_attention_within_rule,
    naive_attention,
    random_inputs,
    run_attention,
)

import ckpt_attn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = "cuda"


def shape_id(shape) -> str:
    b, hq, hkv, sq, sk, d = shape
    return f"b{b}-h{hq}x{hkv}-s{sq}x{sk}-d{d}"


@contextlib.contextmanager
def allow_tf32(enabled: bool):
    """torch.backends.cuda.matmul.allow_tf32, restored afterwards (monkeypatch cannot
    undo it: the attribute is computed)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


# (dtype, shape, causal). bf16, which the interpreter cannot run: head dims
# 64/128/256, odd lengths, S_q < S_k and S_q > S_k, GQA and MQA. fp16: realistic
# sequence lengths.
GPU_CASES = [
    (torch.bfloat16, (2, 4, 2, 113, 203, 64), False),
    (torch.bfloat16, (1, 4, 1, 257, 129, 64), True),
    (torch.bfloat16, (1, 2, 2, 1, 239, 128), True),
    (torch.bfloat16, (2, 2, 1, 300, 300, 128), True),
    (torch.bfloat16, (1, 2, 2, 77, 61, 256), False),
    (torch.bfloat16, (1, 2, 1, 511, 1023, 256), False),
    (torch.float16, (2, 8, 2, 1024, 1024, 64), True),
    (torch.float16, (2, 8, 8, 1024, 2048, 64), False),
    (torch.float16, (1, 16, 4, 2048, 2048, 128), False),
    (torch.float16, (1, 8, 1, 4096, 4096, 128), True),
]


@pytest.mark.parametrize("dtype, shape, causal", GPU_CASES,
                         ids=[f"{str(d)[6:]}-{shape_id(s)}-{'causal' if c else 'full'}"
                              for d, s, c in GPU_CASES])
def test_matches_reference(dtype, shape, causal):
    q, k, v, do = random_inputs(shape, dtype, device=CUDA)
    dlse = torch.randn(q.shape[:3], device=CUDA)
    o, lse, grads = run_attention(q, k, v, do, backend="triton", causal=causal, dlse=dlse)
    assert_attention_within_rule(o, grads, q, k, v, do, causal=causal, lse=lse, dlse=dlse,
                                 label=f"gpu triton {str(dtype)[6:]}")


def test_fp16_transposed_layout_and_determinism():
    """(B, S, H, D) views at a realistic size; O keeps q's layout; bitwise-equal reruns."""
    q, k, v, do = random_inputs((2, 8, 2, 1024, 1024, 64), torch.float16, device=CUDA,
                                layout="bshd")
    first = run_attention(q, k, v, do, backend="triton", causal=True)
    second = run_attention(q, k, v, do, backend="triton", causal=True)
    assert first[0].stride() == q.stride()
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[2], second[2], strict=True):
        assert torch.equal(a, b)
    assert_attention_within_rule(first[0], first[2], q, k, v, do, causal=True,
                                 label="gpu triton float16 bshd")


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_fp32_with_and_without_tf32(tf32):
    """fp32 inputs: tl.dot in TF32 exactly when torch allows TF32 matmuls; the naive
    baseline runs under the same setting (the float64 reference is unaffected)."""
    shape = (2, 4, 2, 300, 517, 64)
    q, k, v, do = random_inputs(shape, torch.float32, device=CUDA)
    with allow_tf32(tf32):
        o, lse, grads = run_attention(q, k, v, do, backend="triton", causal=True)
        assert_attention_within_rule(o, grads, q, k, v, do, causal=True, lse=lse,
                                     label=f"gpu triton float32 {'tf32' if tf32 else 'ieee'}")
    if not tf32:
        # and TF32 really is off: the error is far below TF32's 2**-11 rounding
        ref = naive_attention(q.double(), k.double(), v.double(), causal=True)[0]
        assert (o.double() - ref).abs().max() < 1e-5


def test_no_sq_by_sk_allocation():
    """Peak memory of forward + backward at S = 8192 stays far below one S x S matrix."""
    b, h, s, d = 1, 8, 8192, 64
    q, k, v, do = random_inputs((b, h, h, s, s, d), torch.float16, device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    o = ckpt_attn.attention(q, k, v, causal=True, backend="triton")
    o.backward(do)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - baseline
    one_score_matrix = b * h * s * s * 2
    # O, dq, dk, dv, lse and delta: about 4 * 8 MiB here, versus 1 GiB for S x S
    assert extra < one_score_matrix // 8, f"{extra} bytes"
    assert torch.isfinite(q.grad).all()


# Large bf16 values, as in PyTorch's flash-attention NaN regression test (the float32
# counterpart on the CPU: test_attention_kernels.py's test_gradients_finite_for_huge_inputs).


@pytest.mark.parametrize("seqlen", [1, 7])
def test_large_bf16_values_forward(seqlen):
    q, k, v = (torch.full((1, 1, seqlen, 64), 133120.0, dtype=torch.bfloat16, device=CUDA)
               for _ in range(3))
    o, lse = ckpt_attn.attention(q, k, v, return_lse=True, backend="triton")
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert torch.equal(o, q)  # every score equal: O is the mean of identical rows
    assert torch.isfinite(lse).all()


def test_large_bf16_random_values():
    q, k, v, do = random_inputs((1, 2, 1, 100, 130, 64), torch.bfloat16, device=CUDA)
    with torch.no_grad():
        for t in (q, k, v):
            t.mul_(133120.0 / 4)
    o, lse, grads = run_attention(q, k, v, do, backend="triton", causal=True)
    for name, t in zip(("O", "lse", "dq", "dk", "dv"), (o, lse, *grads), strict=True):
        assert not torch.isnan(t).any(), f"NaN in {name}"
        assert torch.isfinite(t).all(), f"inf in {name}"
    assert_attention_within_rule(o, grads, q, k, v, do, causal=True,
                                 atol=ATOL[torch.bfloat16], label="gpu triton bfloat16 large")
