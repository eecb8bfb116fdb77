"""The backward recomputes the forward's P bit for bit, and rows with one key are exact.

- P as the backward kernels use it, read back exactly: the dK/dV kernel's dv = P^T dO
  with dO = identity, and the dQ kernel's float-mask gradient dS = P (dP - delta) - which
  is P with dO = 0 and dlse = 1. Both must equal, bit for bit, the P that the forward's
  scores and row statistics define: a test kernel computes the scores tile by tile as
  the forward does (masking.scores on the product Q K^T of the forward's tiles) and takes
  backward._probabilities of them with the forward's statistics; the forward's row max
  must be the largest of those scores, bit for bit.
- flash-attention's (seqlen_q, seqlen_k) pairs (its tests/test_flash_attn.py) in
  float32 under the accuracy rule, (239, 1) among them: every query sees one key (two
  or three for (799, 3)), where naive float32 gives dq = dk = 0 exactly.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE
from reference import assert_attention_within_rule, random_inputs, run_attention

from ckpt_attn.kernels.backward import _probabilities, attention_backward
from ckpt_attn.kernels.forward import attention_forward
from ckpt_attn.kernels.launch_config import INTERPRETER_CONFIG, padded_head_dim
from ckpt_attn.kernels.masking import scores

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's tiles and arithmetic")


@triton.jit
def _forward_probabilities(Q, K, STATS, MASK, S, P, sm_scale, seqlen_q, seqlen_k,
                           CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Scores and P of one (BLOCK_M, BLOCK_N) tile of a one-head problem (contiguous q, k
    and a (S_q, S_k) mask), the scores computed as the forward's tiles compute them."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rows_ok = rows < seqlen_q
    q = tl.load(Q + rows[:, None] * HEAD_DIM + offs_d[None, :],
                mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    k_t = tl.load(K + cols[None, :] * HEAD_DIM + offs_d[:, None],
                  mask=d_ok[:, None] & (cols[None, :] < seqlen_k), other=0.0)
    s = scores(tl.dot(q, k_t, input_precision="ieee"), sm_scale * 1.4426950408889634,
               rows[:, None], cols[None, :], seqlen_q, seqlen_k, MASK, seqlen_k, 1, -1, -1,
               CAUSAL, MASK_KIND, False, False, True)
    row_max = tl.load(STATS + 2 * rows, mask=rows_ok, other=0.0)
    log2_sum = tl.load(STATS + 2 * rows + 1, mask=rows_ok, other=0.0)
    p = _probabilities(s, row_max[:, None], log2_sum[:, None])
    tile = rows[:, None] * seqlen_k + cols[None, :]
    tile_ok = rows_ok[:, None] & (cols[None, :] < seqlen_k)
    tl.store(S + tile, s, mask=tile_ok)
    tl.store(P + tile, p, mask=tile_ok)


def forward_probabilities(q, k, stats, mask, scale, causal):
    """(scores, P), (S_q, S_k) each, of the one-head problem q, k (1, 1, S, D) and the
    forward's row statistics `stats`."""
    seqlen_q, seqlen_k, head_dim = q.shape[2], k.shape[2], q.shape[3]
    s = torch.empty(seqlen_q, seqlen_k)
    p = torch.empty(seqlen_q, seqlen_k)
    block_m, block_n = INTERPRETER_CONFIG.block_m, INTERPRETER_CONFIG.block_n
    grid = (triton.cdiv(seqlen_q, block_m), triton.cdiv(seqlen_k, block_n))
    _forward_probabilities[grid](
        q.contiguous(), k.contiguous(), stats.contiguous(), q if mask is None else mask, s, p,
        scale, seqlen_q, seqlen_k, CAUSAL=causal, MASK_KIND=0 if mask is None else 2,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=padded_head_dim(head_dim))
    return s, p


@pytest.mark.parametrize("mask", [None, "float"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_recomputes_forward_probabilities_bit_for_bit(causal, mask):
    """dK/dV's and dQ's P equal the forward's, bit for bit, on ragged tiles (unmasked and
    masked ones), D = 64."""
    seqlen_q, seqlen_k, head_dim = 50, 70, 64  # dO = identity needs D >= S_q
    q, k, v = (torch.randn(1, 1, n, head_dim) for n in (seqlen_q, seqlen_k, seqlen_k))
    bias = None if mask is None else torch.randn(1, 1, seqlen_q, seqlen_k)
    scale = head_dim**-0.5
    o, stats = attention_forward(q, k, v, causal, scale, mask=bias)
    s, p = forward_probabilities(q, k, stats, bias, scale, causal)
    visible = s > float("-inf")
    assert visible.any(dim=1).all()
    row_max = s.amax(dim=1)
    assert torch.equal(row_max, stats[0, 0, :, 0]), "the forward's row max is not its scores'"

    eye = torch.eye(seqlen_q, head_dim)[None, None]
    _, _, dv, _ = attention_backward(eye, None, q, k, v, o, stats, causal, scale, mask=bias)
    p_dkdv = dv[0, 0, :, :seqlen_q].T
    mismatch = int((p_dkdv != p).sum())
    assert not mismatch, f"dK/dV's P differs from the forward's at {mismatch} of {p.numel()}"
    if bias is not None:
        _, _, _, p_dq = attention_backward(torch.zeros_like(q), torch.ones(1, 1, seqlen_q), q, k,
                                           v, o, stats, causal, scale, mask=bias,
                                           mask_grad_shape=tuple(bias.shape))
        mismatch = int((p_dq[0, 0] != p).sum())
        assert not mismatch, f"dQ's P differs from the forward's at {mismatch} of {p.numel()}"


# flash-attention's (seqlen_q, seqlen_k) pairs, a few of its tests/test_flash_attn.py list
FLASH_ATTN_PAIRS = [(1, 1), (239, 1), (799, 3), (64, 128), (113, 203), (128, 217), (108, 256)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen_q, seqlen_k", FLASH_ATTN_PAIRS)
def test_flash_attn_seqlen_pairs_float32(seqlen_q, seqlen_k, causal):
    """O, lse, dq, dk, dv in float32 under the rule (2x, 3x for gradients, naive float32's
    error against float64), 2 heads, D = 32."""
    q, k, v, do = random_inputs((1, 2, 2, seqlen_q, seqlen_k, 32), torch.float32, device=DEVICE)
    o, lse, grads = run_attention(q, k, v, do, backend="triton", causal=causal)
    assert_attention_within_rule(o, grads, q, k, v, do, causal=causal, lse=lse,
                                 label=f"flash-attn pair {seqlen_q}x{seqlen_k}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_one_key_rows_with_lse_gradient(causal):
    """Rows with one key and a gradient on lse: dS = dlse there (naive: P dlse, P = 1)."""
    q, k, v, do = random_inputs((1, 2, 2, 239, 1, 32), torch.float32, device=DEVICE)
    dlse = torch.randn(1, 2, 239)
    o, lse, grads = run_attention(q, k, v, do, backend="triton", causal=causal, dlse=dlse)
    assert_attention_within_rule(o, grads, q, k, v, do, causal=causal, lse=lse, dlse=dlse,
                                 label="one-key rows with dlse")
