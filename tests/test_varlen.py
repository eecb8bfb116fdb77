"""attention_varlen: packed sequences give what each sequence gives on its own, never
attend across a boundary, and reject malformed cumulative lengths."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from reference import (
    ATOL,
    FORWARD_FACTOR,
    GRADIENT_FACTOR,
    assert_within_rule,
    naive_attention,
)

import ckpt_attn

BACKENDS = ["triton", "torch"]
FP16 = (torch.float16, ATOL[torch.float16])
FP32 = (torch.float32, ATOL[torch.float32])


def cumulative(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEVICE)


def packed_inputs(lens_q, lens_k, heads_q, heads_kv, head_dim, dtype):
    q = torch.randn(sum(lens_q), heads_q, head_dim, dtype=dtype, device=DEVICE)
    k = torch.randn(sum(lens_k), heads_kv, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn(sum(lens_k), heads_kv, head_dim, dtype=dtype, device=DEVICE)
    return [t.requires_grad_() for t in (q, k, v)]


def one_by_one(q, k, v, do, lens_q, lens_k, dtype, causal, window):
    """Naive attention sequence by sequence in `dtype`: (O, dq, dk, dv) of the packed tensors."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    outputs = []
    bounds_q, bounds_k = cumulative(lens_q).tolist(), cumulative(lens_k).tolist()
    for s in range(len(lens_q)):
        (a, b), (c, d) = bounds_q[s:s + 2], bounds_k[s:s + 2]
        as_batch = [t.transpose(0, 1)[None] for t in (q[a:b], k[c:d], v[c:d])]
        if b > a and d > c:
            o, _ = naive_attention(*as_batch, causal=causal, window=window)
        else:
            o = torch.zeros_like(as_batch[0])
        outputs.append(o[0].transpose(0, 1))
    o = torch.cat(outputs)
    return (o, *torch.autograd.grad(o, (q, k, v), do.to(dtype), allow_unused=True,
                                    materialize_grads=True))


CASES = [
    # (lens_q, lens_k, heads_q, heads_kv, head_dim)
    ([5, 0, 37, 64, 1], [9, 3, 37, 70, 40], 4, 2, 24),  # empty sequence, S_q != S_k
    ([33], [33], 2, 2, 40),  # one sequence
    ([17, 50, 2], [17, 50, 2], 4, 1, 16),  # MQA, self-attention lengths
    ([3, 40], [0, 45], 2, 2, 32),  # a sequence with no keys
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol", [FP16, FP32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (False, (6, 3)),
                                            (True, (10, -1))],
                         ids=["full", "causal", "window", "causal-window"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_varlen_matches_sequences_one_by_one(backend, dtype, atol, causal, window, case):
    lens_q, lens_k, heads_q, heads_kv, head_dim = case
    q, k, v = packed_inputs(lens_q, lens_k, heads_q, heads_kv, head_dim, dtype)
    o = ckpt_attn.attention_varlen(q, k, v, cumulative(lens_q), cumulative(lens_k),
                                   max(lens_q), max(lens_k), causal=causal, window=window,
                                   backend=backend)
    do = torch.randn_like(o)
    ours = (o, *torch.autograd.grad(o, (q, k, v), do))
    naive = one_by_one(q, k, v, do, lens_q, lens_k, dtype, causal, window)
    reference = one_by_one(q, k, v, do, lens_q, lens_k, torch.float64, causal, window)
    for index, what in enumerate(("O", "dq", "dk", "dv")):
        assert_within_rule(ours[index], naive[index], reference[index],
                           factor=FORWARD_FACTOR if what == "O" else GRADIENT_FACTOR,
                           atol=atol, what=f"{backend} {str(dtype)[6:]} varlen {what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_attention_across_boundaries(backend):
    """Changing one sequence's keys and values leaves the other sequences' outputs bitwise."""
    lens = [20, 35, 9]
    q, k, v = packed_inputs(lens, lens, 2, 2, 16, torch.float32)
    cu = cumulative(lens)
    first = ckpt_attn.attention_varlen(q, k, v, cu, cu, 35, 35, backend=backend)
    with torch.no_grad():
        k[20:55] += 5.0
        v[20:55] -= 3.0
    second = ckpt_attn.attention_varlen(q, k, v, cu, cu, 35, 35, backend=backend)
    assert torch.equal(first[:20], second[:20]) and torch.equal(first[55:], second[55:])
    assert not torch.equal(first[20:55], second[20:55])


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_sequence_equals_attention(backend):
    """One packed sequence is attention() on a batch of one, dropout stream included."""
    q, k, v = packed_inputs([45], [61], 4, 2, 32, torch.float32)
    torch.manual_seed(9)
    packed = ckpt_attn.attention_varlen(q, k, v, cumulative([45]), cumulative([61]), 45, 61,
                                        causal=True, dropout_p=0.2, backend=backend)
    torch.manual_seed(9)
    batched = ckpt_attn.attention(*(t.transpose(0, 1)[None] for t in (q, k, v)),
                                  dropout_p=0.2, causal=True, backend=backend)
    torch.testing.assert_close(packed, batched[0].transpose(0, 1), rtol=0, atol=0)


def test_backends_drop_the_same_pairs_in_packed_sequences():
    lens_q, lens_k = [30, 7, 41], [25, 7, 50]
    q, k, v = packed_inputs(lens_q, lens_k, 4, 2, 16, torch.float32)
    do = torch.randn_like(q)
    results = []
    for backend in BACKENDS:
        torch.manual_seed(4)
        o = ckpt_attn.attention_varlen(q, k, v, cumulative(lens_q), cumulative(lens_k), 41, 50,
                                       causal=True, dropout_p=0.3, backend=backend)
        results.append((o, *torch.autograd.grad(o, (q, k, v), do)))
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_flop_counter_sums_sequences():
    from torch.utils.flop_counter import FlopCounterMode

    lens = [10, 30, 5]
    q, k, v = packed_inputs(lens, lens, 2, 2, 16, torch.float32)
    with FlopCounterMode(display=False) as counter:
        ckpt_attn.attention_varlen(q, k, v, cumulative(lens), cumulative(lens), 30, 30,
                                   causal=True, backend="torch").sum().backward()
    pairs = sum(n * (n + 1) // 2 for n in lens)
    assert counter.get_total_flops() == (4 + 10) * 2 * 16 * pairs


def test_cu_seqlens_on_another_device():
    q = torch.empty(100, 4, 64, device="meta")
    k = torch.empty(80, 2, 64, device="meta")
    cu_q = torch.tensor([0, 40, 100], dtype=torch.int32)
    cu_k = torch.tensor([0, 30, 80], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q must be on q's device"):
        ckpt_attn.attention_varlen(q, k, k, cu_q, cu_k, 60, 50)


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a["cu_q"].to(torch.int64), TypeError, "cu_seqlens_q must be int32"),
    (lambda a: torch.tensor([0, 30, 20, 45], dtype=torch.int32), ValueError, "non-decreasing"),
    (lambda a: torch.tensor([1, 20, 45], dtype=torch.int32), ValueError, "start at 0"),
    (lambda a: torch.tensor([0, 20, 44], dtype=torch.int32), ValueError, "token count 45"),
    (lambda a: torch.tensor([[0, 20, 45]], dtype=torch.int32), ValueError, "1-D"),
])
def test_bad_cu_seqlens(change, error, match):
    q, k, v = packed_inputs([20, 25], [20, 25], 2, 2, 8, torch.float32)
    cu = cumulative([20, 25])
    with pytest.raises(error, match=match):
        ckpt_attn.attention_varlen(q, k, v, change({"cu_q": cu}).to(DEVICE), cu, 25, 25)


def test_bad_varlen_arguments():
    q, k, v = packed_inputs([20, 25], [20, 25], 2, 2, 8, torch.float32)
    cu = cumulative([20, 25])
    with pytest.raises(ValueError, match="max_seqlen_q"):
        ckpt_attn.attention_varlen(q, k, v, cu, cu, 24, 25)
    with pytest.raises(ValueError, match="as many sequences"):
        ckpt_attn.attention_varlen(q, k, v, cu, cumulative([45]), 25, 45)
    with pytest.raises(ValueError, match="q must be 3-D"):
        ckpt_attn.attention_varlen(q[None], k, v, cu, cu, 25, 25)
    with pytest.raises(TypeError, match="max_seqlen_k must be an int"):
        ckpt_attn.attention_varlen(q, k, v, cu, cu, 25, 25.0)
