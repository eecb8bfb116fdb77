"""The torch backend's forward on torch's own fused CPU attention (backends/fused_cpu.py).

- The forwards it covers take the fused kernel (counted); O, lse and the gradients of
  the (chunked) backward are within the accuracy rule of the float64 reference (float64
  inputs: equal to it to 1e-10).
- The backward never reads the kernel's lse: its gradients are bitwise those after a
  chunked forward, and bitwise the same on repeat.
- The forwards it does not cover (dropout, windows, a row whose keys all carry one huge
  bias, NaN, bfloat16, GQA on a kernel without it, packed sequences without keys) take
  the chunked path, still right.
- The saved tensors are q, k, v, O and the row statistics.
"""

from __future__ import annotations

import pytest
import torch
from reference import (
    assert_attention_within_rule,
    naive_outputs_and_grads,
    random_inputs,
    run_attention,
)

import ckpt_attn
from ckpt_attn.backends import fused_cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU kernels")


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts of the forwards the fused kernel served."""
    counts = {"forward": 0}
    original = fused_cpu.attention_forward

    def counted(*args, **kwargs):
        result = original(*args, **kwargs)
        counts["forward"] += result is not None
        return result

    monkeypatch.setattr(fused_cpu, "attention_forward", counted)
    return counts


def key_padding(batch: int, seqlen_k: int) -> torch.Tensor:
    """(B, 1, 1, S_k) bool, batch b keeping its first S_k - 3 b keys."""
    return (torch.arange(seqlen_k) < seqlen_k - 3 * torch.arange(batch)[:, None])[:, None, None]


def float_mask_with_empty_row(shape) -> torch.Tensor:
    """(B, 1, S_q, S_k) float: normal, -inf on some keys and on every key of row 2."""
    batch, _, _, seqlen_q, seqlen_k, _ = shape
    mask = torch.randn(batch, 1, seqlen_q, seqlen_k)
    mask = mask.masked_fill(torch.rand(mask.shape) < 0.3, float("-inf"))
    mask[:, :, 2] = float("-inf")
    return mask


COVERED = {
    # id: (shape (B, H_q, H_kv, S_q, S_k, D), causal, layout, mask maker)
    "mha": ((2, 3, 3, 37, 45, 16), False, "bhsd", None),
    "gqa-causal-bshd": ((1, 4, 2, 150, 70, 24), True, "bshd", None),
    "key-padding": ((3, 2, 1, 20, 33, 8), True, "bhsd", lambda s: key_padding(s[0], s[4])),
    "float-mask": ((2, 2, 2, 9, 13, 40), False, "bhsd", float_mask_with_empty_row),
    "one-query": ((2, 2, 1, 1, 50, 16), False, "bhsd", None),
}


@pytest.mark.parametrize("case", COVERED)
def test_covered_calls_take_the_fused_kernel_and_are_accurate(case, fused_calls):
    """float32: the forward on the kernel; O, lse and grads within the rule."""
    shape, causal, layout, make_mask = COVERED[case]
    q, k, v, do = random_inputs(shape, torch.float32, device="cpu", layout=layout)
    mask = make_mask(shape) if make_mask else None
    o, lse, grads = run_attention(q, k, v, do, backend="torch", causal=causal, attn_mask=mask)
    assert fused_calls == {"forward": 1}
    assert_attention_within_rule(o, grads, q, k, v, do, causal=causal, lse=lse,
                                 attn_mask=mask, label=f"fused {case}")


def test_float64_equals_float64_reference(fused_calls):
    """float64 on the kernel agrees with naive float64 attention to 1e-10."""
    shape = (2, 4, 2, 33, 41, 16)
    q, k, v, do = random_inputs(shape, torch.float64, device="cpu")
    mask = key_padding(2, 41)
    o, lse, grads = run_attention(q, k, v, do, backend="torch", causal=True, attn_mask=mask)
    assert fused_calls == {"forward": 1}
    ref_o, ref_lse, ref_grads = naive_outputs_and_grads(q, k, v, do, causal=True,
                                                        attn_mask=mask, dtype=torch.float64)
    for ours, ref in zip((o, lse, *grads), (ref_o, ref_lse, *ref_grads), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_packed_sequences_reach_the_kernel_one_by_one(fused_calls):
    """attention_varlen without dropout or window: each sequence with a query on the kernel,
    each equal to attention() on that sequence alone."""
    lens = [5, 0, 17, 9]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lens), 2, 16) for _ in range(3))
    o = ckpt_attn.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True,
                                   backend="torch")
    assert fused_calls["forward"] == 3
    for start, stop in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        alone = ckpt_attn.attention(*(t[start:stop].transpose(0, 1)[None] for t in (q, k, v)),
                                    causal=True, backend="torch")
        torch.testing.assert_close(o[start:stop], alone[0].transpose(0, 1), rtol=0, atol=0)


def test_rows_without_keys_give_zero_and_minus_inf(fused_calls):
    """Causal with S_q > S_k and a mask hiding every key (rows past S_k see all keys, none
    visible): O = 0, lse = -inf, zero gradients, as the reference (fuzz-found: the rows
    past S_k were taken for rows that see a key)."""
    q, k, v, do = random_inputs((1, 2, 1, 5, 2, 8), torch.float64, device="cpu")
    mask = torch.tensor([[True, False], [False, False], [True, True], [False, False],
                         [False, False]])
    o, lse, grads = run_attention(q, k, v, do, backend="torch", causal=True, attn_mask=mask)
    assert fused_calls == {"forward": 1}
    ref_o, ref_lse, ref_grads = naive_outputs_and_grads(q, k, v, do, causal=True,
                                                        attn_mask=mask, dtype=torch.float64)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert torch.isneginf(lse[..., [1, 3, 4]]).all()
    for ours, ref in zip((o, lse, *grads), (ref_o, ref_lse, *ref_grads), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_packed_sequence_without_keys_stays_off_the_kernel(fused_calls):
    """A packed sequence with queries and no keys (the kernel divides by the key count:
    SIGFPE, fuzz-found) gives O = 0 there; the other sequence runs on the kernel."""
    cu_q = torch.tensor([0, 4, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 0, 5], dtype=torch.int32)
    q, k, v = torch.randn(7, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    o = ckpt_attn.attention_varlen(q, k, v, cu_q, cu_k, 4, 5, backend="torch")
    assert fused_calls["forward"] == 1 and not o[:4].any()
    alone = ckpt_attn.attention(*(t.transpose(0, 1)[None] for t in (q[4:], k, v)),
                                backend="torch")
    torch.testing.assert_close(o[4:], alone[0].transpose(0, 1), rtol=0, atol=0)


def test_window_that_hides_nothing_takes_the_kernel(fused_calls):
    """A window wider than the sequences (or any right side under causal) hides no pair:
    the kernel runs, and O equals that of no window bit for bit."""
    q, k, v, _ = random_inputs((1, 2, 2, 20, 30, 8), torch.float32, device="cpu")
    wide = ckpt_attn.attention(q, k, v, causal=True, window=(19, 0), backend="torch")
    plain = ckpt_attn.attention(q, k, v, causal=True, backend="torch")
    assert fused_calls == {"forward": 2} and torch.equal(wide, plain)
    ckpt_attn.attention(q, k, v, causal=True, window=(18, 0), backend="torch")
    assert fused_calls == {"forward": 2}


def huge_bias_row_mask(shape) -> torch.Tensor:
    """(B, 1, S_q, S_k) float: normal, -1e9 on every key of row 1."""
    batch, _, _, seqlen_q, seqlen_k, _ = shape
    mask = torch.randn(batch, 1, seqlen_q, seqlen_k)
    mask[:, :, 1] = -1e9
    return mask


def test_uncovered_calls_take_the_chunked_path(fused_calls):
    """Dropout, a window, a row whose every key carries -1e9, a NaN in q: the chunked
    forward (the NaN reaching that row only)."""
    shape = (1, 2, 1, 12, 10, 8)
    q, k, v, _ = random_inputs(shape, torch.float32, device="cpu")
    ckpt_attn.attention(q, k, v, dropout_p=0.3, backend="torch").sum().backward()
    ckpt_attn.attention(q, k, v, window=(2, 0), backend="torch").sum().backward()
    ckpt_attn.attention(q, k, v, huge_bias_row_mask(shape), backend="torch").sum().backward()
    nan_q = q.detach().clone()
    nan_q[0, 0, 3, 0] = float("nan")
    o = ckpt_attn.attention(nan_q, k, v, backend="torch")
    assert o[0, 0, 3].isnan().all() and not o[0, 0, 4].isnan().any()
    assert fused_calls == {"forward": 0}


def test_huge_bias_row_falls_back_and_keeps_the_forwards_softmax(fused_calls):
    """A row whose every key carries -1e9 (the other rows see none): the fused lse would
    lose log(S_k); the chunked path gives that row uniform attention, O = mean(V), and
    the gradients of that softmax, dv = dO / S_k for each key."""
    q, k, v, do = random_inputs((1, 1, 1, 4, 10, 8), torch.float32, device="cpu")
    mask = torch.full((1, 1, 4, 10), float("-inf"))
    mask[:, :, 1] = -1e9
    o = ckpt_attn.attention(q, k, v, mask, backend="torch")
    (dv,) = torch.autograd.grad(o, v, do)
    assert fused_calls == {"forward": 0}
    torch.testing.assert_close(o[0, 0, 1], v[0, 0].mean(0))
    assert not o[0, 0, [0, 2, 3]].any()
    torch.testing.assert_close(dv[0, 0], do[0, 0, 1].expand(10, 8) / 10)


def test_bfloat16_and_gqa_without_kernel_support_take_the_chunked_path(fused_calls,
                                                                        monkeypatch):
    """bfloat16 stays on the chunked path (float32 arithmetic); GQA does too when the
    kernel cannot map query heads to key heads."""
    q, k, v, do = random_inputs((1, 4, 2, 16, 16, 8), torch.float32, device="cpu")
    ckpt_attn.attention(*(t.detach().bfloat16() for t in (q, k, v)), backend="torch")
    monkeypatch.setattr(fused_cpu, "_kernel_maps_gqa", lambda: False)
    o, lse, grads = run_attention(q, k, v, do, backend="torch", causal=True)
    assert fused_calls == {"forward": 0}
    assert_attention_within_rule(o, grads, q, k, v, do, causal=True, lse=lse,
                                 label="chunked gqa")


def test_gqa_probe_matches_the_kernel():
    """The probe's answer is the kernel's behaviour: with it, a GQA call equals the call on
    k, v repeated per query head."""
    if not fused_cpu._kernel_maps_gqa():
        pytest.skip("this torch's kernel has no GQA")
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    grouped, _ = kernel(q, k, v)
    repeated, _ = kernel(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(grouped, repeated, rtol=0, atol=0)


def test_backward_is_that_of_the_chunked_forward_and_deterministic(fused_calls,
                                                                   monkeypatch):
    """The gradients after a fused forward are bitwise those after the chunked forward
    (the backward recomputes its statistics, never reads the kernel's lse), and bitwise
    the same on repeat."""
    q, k, v, do = random_inputs((2, 4, 2, 160, 140, 32), torch.float32, device="cpu")
    mask = key_padding(2, 140)
    fused = run_attention(q, k, v, do, backend="torch", causal=True, attn_mask=mask)[2]
    again = run_attention(q, k, v, do, backend="torch", causal=True, attn_mask=mask)[2]
    assert fused_calls == {"forward": 2}
    monkeypatch.setattr(fused_cpu, "covers", lambda *args: False)
    chunked = run_attention(q, k, v, do, backend="torch", causal=True, attn_mask=mask)[2]
    assert fused_calls == {"forward": 2}
    for first, second, third in zip(fused, again, chunked, strict=True):
        assert torch.equal(first, second) and torch.equal(first, third)


def test_saves_q_k_v_o_and_statistics_only():
    """Autograd keeps q, k, v, O and the (B, H, S_q, 2) float32 statistics: their bytes."""
    q, k, v, _ = random_inputs((2, 4, 2, 24, 30, 16), torch.float32, device="cpu")
    saved = {}

    def pack(t):
        saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o = ckpt_attn.attention(q, k, v, causal=True, backend="torch")
    statistics = 2 * 4 * 24 * 2 * 4
    expected = sum(t.numel() * 4 for t in (q, k, v, o)) + statistics
    assert sum(saved.values()) == expected
