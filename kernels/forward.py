"""Attention forward: online softmax over key tiles, writes O and fp32 row statistics.

FlashAttention-2's schedule: a program owns BLOCK_M query rows of one
(batch, head) and streams the key/value tiles of that head through fp32
accumulators. Scores live only as a BLOCK_M x BLOCK_N tile in registers;
nothing of size S_q x S_k is ever written.

Scores are kept in the log2 domain (scale * log2(e) folded into one multiply)
so the exponentials are exp2. Without an attn_mask or a window, key tiles are
visited in two phases: tiles that every row of the block sees in full (no
masking), then the tiles on the causal diagonal or past the end of the keys
(masked). With them, every tile of the visible key range is masked and tiles
outside it are skipped. Dropout (Philox) applies to P after the row sums, so
O = dropout(softmax) V; packed sequences give each program one sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import launch, padded_head_dim
from .masking import (
    dropout_keep,
    dropout_origin,
    dropout_seed,
    head_dim_mask,
    key_range,
    scores,
    sequence_bounds,
    unmasked_key_split,
)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, stride_kn, stride_vn,
                    offs_m, offs_n, d_ok, lo, hi, seqlen_q, seqlen_k, qk_scale,
                    mask_base, stride_mm, stride_mn, window_left, window_right,
                    seed, rng_base, rng_row_stride, dropout_p,
                    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr,
                    BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # Scalar 64-bit tile bases advanced by a loop-invariant step: an index multiplied
    # inside the loop gets widened by LLVM, and that serializes Hopper's wgmma.
    k_tile = k_base + tl.cast(lo, tl.int64) * stride_kn
    v_tile = v_base + tl.cast(lo, tl.int64) * stride_vn
    k_step = tl.cast(stride_kn, tl.int64) * BLOCK_N
    v_step = tl.cast(stride_vn, tl.int64) * BLOCK_N
    if DROPOUT:  # Philox index of pair (row, col): rng_base + row * rng_row_stride + col
        rng_tile = rng_base + tl.cast(lo, tl.int64)
        rng_rows = offs_m[:, None].to(tl.int64) * rng_row_stride
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        # -- scores of this tile (log2 domain) --
        if MASKED:
            k_t = tl.load(k_tile + k_offs, mask=d_ok[:, None] & (cols[None, :] < seqlen_k),
                          other=0.0)
        else:
            k_t = tl.load(k_tile + k_offs, mask=d_ok[:, None], other=0.0)
        # The scale is not folded into exp2's argument (max(qk) * scale, then one FMA per
        # score): the backward could not recompute those bits, and at D=128 with 128x128
        # tiles ptxas then spills (24 bytes).
        qk = scores(tl.dot(q, k_t, input_precision=INPUT_PRECISION), qk_scale, offs_m[:, None],
                    cols[None, :], seqlen_q, seqlen_k, mask_base, stride_mm, stride_mn,
                    window_left, window_right, CAUSAL, MASK_KIND, MASK_ROW, HAS_WINDOW, MASKED)
        # -- online softmax; a row that has seen no key keeps m = -inf and l = 0 --
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- accumulate P V --
        if MASKED:
            v = tl.load(v_tile + v_offs, mask=(cols[:, None] < seqlen_k) & d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_tile + v_offs, mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        if DROPOUT:
            # l_i normalises the undropped P; O = dropout(P) V, kept entries scaled 1/(1-p)
            keep = dropout_keep(seed, rng_tile, rng_rows, offs_n[None, :], dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            rng_tile += BLOCK_N
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
        k_tile += k_step
        v_tile += v_step
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, STATS, MASK, CU_Q, CU_K, sm_scale,
              stride_qb, stride_qh, stride_qm,
              stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn,
              stride_ob, stride_oh, stride_om,
              stride_mb, stride_mh, stride_mm, stride_mn,
              num_heads, group_size, seqlen_q, seqlen_k, row_stride, window_left,
              window_right, SEED, rng_head_stride, rng_origin, rng_total_k, dropout_p,
              CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr,
              HAS_WINDOW: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
              HEAD_DIM: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = (off_bh % num_heads).to(tl.int64)
    off_hk = off_h // group_size  # GQA: the kv head this query head reads
    # -- packed sequences: this program's sequence, its offsets and lengths --
    q_start, k_start, seqlen_q, seqlen_k, seqlen_k_loop, seed = sequence_bounds(
        CU_Q, CU_K, start_m, seqlen_q, seqlen_k, dropout_seed(SEED, DROPOUT), VARLEN)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_m < seqlen_q
    d_ok = head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)

    # Scalar bases in int64 (B * H * S * D may pass 2**31 elements); offsets
    # inside one tile stay int32.
    q_base = (Q + off_b * stride_qb + off_h * stride_qh
              + (q_start + tl.cast(start_m, tl.int64)) * stride_qm)
    k_base = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn
    v_base = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn
    k_offs = offs_n[None, :] * stride_kn + offs_d[:, None]  # (BLOCK_D, BLOCK_N): K^T tile
    v_offs = offs_n[:, None] * stride_vn + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
    tile_ok = rows_ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + tl.arange(0, BLOCK_M)[:, None] * stride_qm + offs_d[None, :],
                mask=tile_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e)

    mask_base = MASK + off_b * stride_mb + off_h * stride_mh
    rng_base, rng_row_stride = dropout_origin(off_bh, seqlen_q, seqlen_k, rng_head_stride,
                                              rng_origin, rng_total_k, VARLEN)
    if MASK_KIND != 0 or HAS_WINDOW:
        # -- masks or a window: every tile of the key range [lo, hi) is masked --
        lo, hi = key_range(start_m, seqlen_k_loop, window_left, window_right,
                           CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, stride_kn, stride_vn,
            offs_m, offs_n, d_ok, lo, hi, seqlen_q, seqlen_k, qk_scale,
            mask_base, stride_mm, stride_mn, window_left, window_right,
            seed, rng_base, rng_row_stride, dropout_p,
            CAUSAL, MASK_KIND, MASK_ROW, HAS_WINDOW, DROPOUT, True, BLOCK_N, INPUT_PRECISION)
    else:
        # -- [0, full) is visible to every row of the block; [full, hi) needs masks --
        full, hi = unmasked_key_split(start_m, seqlen_k_loop, CAUSAL, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, stride_kn, stride_vn,
            offs_m, offs_n, d_ok, 0, full, seqlen_q, seqlen_k, qk_scale,
            mask_base, stride_mm, stride_mn, window_left, window_right,
            seed, rng_base, rng_row_stride, dropout_p,
            CAUSAL, MASK_KIND, MASK_ROW, HAS_WINDOW, DROPOUT, False, BLOCK_N, INPUT_PRECISION)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, stride_kn, stride_vn,
            offs_m, offs_n, d_ok, full, hi, seqlen_q, seqlen_k, qk_scale,
            mask_base, stride_mm, stride_mn, window_left, window_right,
            seed, rng_base, rng_row_stride, dropout_p,
            CAUSAL, MASK_KIND, MASK_ROW, HAS_WINDOW, DROPOUT, True, BLOCK_N, INPUT_PRECISION)

    # -- epilogue: O, and the row statistics (max, log2 of the sum) that the backward
    #    recomputes P from; rows with no visible key give O = 0 and statistics -inf --
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_base = (O + off_b * stride_ob + off_h * stride_oh
              + (q_start + tl.cast(start_m, tl.int64)) * stride_om)
    tl.store(o_base + tl.arange(0, BLOCK_M)[:, None] * stride_om + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=tile_ok)
    stats_ptrs = STATS + 2 * (off_bh.to(tl.int64) * row_stride + q_start + offs_m)
    tl.store(stats_ptrs, m_i, mask=rows_ok)
    tl.store(stats_ptrs + 1, tl.math.log2(l_i), mask=rows_ok)


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision for fp32 inputs: TF32 only when torch allows it for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def packed_launch_args(packed: tuple | None, q: torch.Tensor, k: torch.Tensor):
    """(CU_Q, CU_K, query programs' span, key programs' span, sequences) for a launch.

    `packed` is None or (cu_q, cu_k, max_q, max_k): q, k, v are then (1, H, total, D)
    views and sequence s spans rows cu_q[s]:cu_q[s+1] of q and cu_k[s]:cu_k[s+1] of
    k and v (int32 on the device).
    """
    if packed is None:
        return q, q, q.shape[2], k.shape[2], 1
    cu_q, cu_k, max_q, max_k = packed
    return cu_q, cu_k, max_q, max_k, cu_q.numel() - 1


def mask_launch_args(mask: torch.Tensor | None, like: torch.Tensor):
    """(pointer tensor, 4 strides, MASK_KIND, MASK_ROW) for a (B, H_q, S_q, S_k) mask view."""
    if mask is None:
        return like, (0, 0, 0, 0), 0, False
    kind = 1 if mask.dtype == torch.bool else 2
    pointer = mask.view(torch.uint8) if kind == 1 else mask
    return pointer, mask.stride(), kind, mask.stride(2) == 0 or mask.shape[2] == 1


def dropout_launch_args(dropout_p: float, seed: torch.Tensor | None,
                        dropout_origin: tuple | None, q: torch.Tensor, k: torch.Tensor):
    """(SEED pointer, rng_head_stride, rng_origin, rng_total_k) for a launch: the Philox
    index of pair (i, j) of head bh is bh * rng_head_stride + rng_origin + i * rng_total_k
    + j (see masking.dropout_origin).

    `seed` is a one-element int64 tensor on q's device (required when dropout_p > 0);
    `dropout_origin` is None (this call is the whole problem) or (row_offset, col_offset,
    total_q, total_k), placing the call's block in a larger problem.
    """
    if dropout_p > 0 and seed is None:
        raise ValueError("seed must be a one-element int64 tensor when dropout_p > 0, got None")
    row_offset, col_offset, total_q, total_k = dropout_origin or (0, 0, q.shape[2], k.shape[2])
    pointer = seed if dropout_p > 0 else q
    return pointer, total_q * total_k, row_offset * total_k + col_offset, total_k


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      scale: float, mask: torch.Tensor | None = None,
                      window: tuple[int, int] = (-1, -1), dropout_p: float = 0.0,
                      seed: torch.Tensor | None = None, packed: tuple | None = None,
                      dropout_origin: tuple | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel on validated (B, H, S, D) inputs with stride(-1) == 1.

    `mask` is None or a (B, H_q, S_q, S_k) view (stride 0 on broadcast dims) of a
    boolean (True = may attend) or additive float mask; `window` is (left, right)
    with -1 for unbounded; dropout_p > 0 drops pairs by Philox(seed) on their
    index (b * H_q + h, i, j), placed by `dropout_origin` (see dropout_launch_args)
    in a larger problem; `seed` is a one-element int64 tensor on the device, read
    by the kernel (no host sync); `packed` (see packed_launch_args) runs packed
    sequences, each with its own dropout stream seed + s. Returns O (same shape
    and, where dense, same strides as q) and the fp32 row statistics, shape
    (B, H_q, S_q, 2): the row max of the scores and log2 of the row sum, in the
    log2 domain (logsumexp = (max + log2 sum) * ln 2). Kept apart, the backward
    recomputes P = exp2(s - max - log2 sum) exactly even where every score of a
    row carries the same huge bias, which a single fp32 logsumexp would swallow.
    """
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    stats = torch.empty((batch, heads_q, seqlen_q, 2), device=q.device, dtype=torch.float32)
    mask_ptr, mask_strides, mask_kind, mask_row = mask_launch_args(mask, q)
    cu_q, cu_k, programs_q, _, sequences = packed_launch_args(packed, q, k)
    dropout_args = dropout_launch_args(dropout_p, seed, dropout_origin, q, k)
    launch(
        _attn_fwd,
        lambda cfg: (triton.cdiv(programs_q, cfg.block_m), batch * heads_q, sequences),
        (q, k, v, o, stats, mask_ptr, cu_q, cu_k, scale,
         q.stride(0), q.stride(1), q.stride(2),
         k.stride(0), k.stride(1), k.stride(2),
         v.stride(0), v.stride(1), v.stride(2),
         o.stride(0), o.stride(1), o.stride(2),
         *mask_strides,
         heads_q, heads_q // heads_kv, seqlen_q, seqlen_k, seqlen_q, *window, *dropout_args,
         dropout_p),
        dict(CAUSAL=causal, MASK_KIND=mask_kind, MASK_ROW=mask_row,
             HAS_WINDOW=tuple(window) != (-1, -1), DROPOUT=dropout_p > 0,
             VARLEN=packed is not None, HEAD_DIM=head_dim,
             INPUT_PRECISION=input_precision(q.dtype)),
        kernel="fwd",
        block_d=padded_head_dim(head_dim),
        element_size=q.element_size(),
    )
    return o, stats
