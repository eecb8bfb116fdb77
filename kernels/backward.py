"""Attention backward: recompute P tile by tile from q, k and the saved row statistics.

Three kernels, no atomics, so the gradients are bitwise deterministic:

- preprocess: delta = rowsum(dO * O) - dlse and dlse, per query row (dlse is
  the gradient flowing into the returned logsumexp, zero when it is unused);
- dK/dV: a program owns BLOCK_N keys of one kv head and streams over the
  queries of every query head in its GQA group, so the group's gradients are
  summed in registers;
- dQ: a program owns BLOCK_M queries and streams over the keys; for a float
  attn_mask that requires grad it also writes dS, the mask's gradient.

With P = exp2((S - max) - log2 sum) from the forward's row statistics and its scores S
(masking.scores, the same bits), dP = dO V^T and dS = P * (dP - delta), dS = dlse where
P = 1 (see _score_grads):
dV = P^T dO, dK = (scale * dS)^T Q (dS scaled before the product, as autograd does:
after it, q of magnitude 1e3 cost dk 3x naive's error), dQ = scale * dS K. With dropout, the mask is
regenerated from the seed: dV = Z^T dO with Z = keep * P / (1 - p), and dP is
masked and scaled the same way before dS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .forward import dropout_launch_args, input_precision, mask_launch_args, packed_launch_args
from .launch_config import launch, padded_head_dim
from .masking import (
    dropout_keep,
    dropout_origin,
    dropout_seed,
    head_dim_mask,
    key_range,
    query_range,
    scores,
    sequence_bounds,
    unmasked_key_split,
)


@triton.jit
def _attn_bwd_preprocess(O, DO, DLSE, DELTA,
                         stride_ob, stride_oh, stride_om,
                         stride_dob, stride_doh, stride_dom,
                         num_heads, seqlen_q,
                         HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = (off_bh % num_heads).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_m < seqlen_q
    tile_ok = rows_ok[:, None] & head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + rows * stride_om + offs_d[None, :],
                mask=tile_ok, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows * stride_dom + offs_d[None, :],
                 mask=tile_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    row_ptrs = off_bh.to(tl.int64) * seqlen_q + offs_m
    dlse = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_DLSE:
        dlse = tl.load(DLSE + row_ptrs, mask=rows_ok, other=0.0)
    tl.store(DELTA + 2 * row_ptrs, delta - dlse, mask=rows_ok)
    tl.store(DELTA + 2 * row_ptrs + 1, dlse, mask=rows_ok)


@triton.jit
def _load_row_stats(stats_ptrs, delta_ptrs, rows_ok):
    """(row max, log2 of the row sum) of the forward (log2 domain), and (delta, dlse) of the
    preprocess. A row with no visible key gets max +inf and log2 sum 0, so its P is 0."""
    row_max = tl.load(stats_ptrs, mask=rows_ok, other=0.0)
    log2_sum = tl.load(stats_ptrs + 1, mask=rows_ok, other=0.0)
    empty = row_max == float("-inf")
    row_max = tl.where(empty, float("inf"), row_max)
    log2_sum = tl.where(empty, 0.0, log2_sum)
    delta = tl.load(delta_ptrs, mask=rows_ok, other=0.0)
    dlse = tl.load(delta_ptrs + 1, mask=rows_ok, other=0.0)
    return row_max, log2_sum, delta, dlse


@triton.jit
def _probabilities(s, row_max, log2_sum):
    """P = exp2((s - max) - log2 sum) from the scores s, the two statistics subtracted
    apart: a shared huge bias cancels in s - max before log2 sum is taken off. P <= 1
    exactly; the min keeps rounding from overflowing exp2 at huge scores, and lets NaN
    through. A row's only key gets exp2(0 - 0) = 1."""
    s = s - row_max
    return tl.math.exp2(tl.minimum(s - log2_sum, 0.0, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _score_grads(p, dp, delta, dlse, ONE_KEY_ROWS: tl.constexpr):
    """dS = P (dP - delta), delta = rowsum(dO * O) - dlse; dlse where P = 1 if the tile
    may hold ONE_KEY_ROWS (any dK/dV tile, whose key block may end past S_k; the dQ
    kernel's masked tiles: its unmasked ones give every row BLOCK_N keys). P = 1 only
    where the row's other keys sum below half an ulp of 1 (a row with one key, say):
    there O is that key's V, so dP - rowsum(dO * O) is 0 but for the two dot products'
    rounding, which naive softmax's backward (rowsum(P dP) = dP) does not have."""
    ds = p * (dp - delta)
    if ONE_KEY_ROWS:
        ds = tl.where(p == 1.0, dlse, ds)
    return ds


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, qt_offs, do_offs, stride_qm, stride_dom,
                         stats_base, delta_base, rng_base, rng_row_stride, offs_m, offs_n,
                         d_ok, lo, hi,
                         seqlen_q, seqlen_k, qk_scale, sm_scale, mask_base, stride_mm, stride_mn,
                         window_left, window_right, seed, dropout_p,
                         CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr,
                         HAS_WINDOW: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr,
                         BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # scalar 64-bit bases advanced by a loop-invariant step (see the forward's inner loop)
    q_tile = q_base + tl.cast(lo, tl.int64) * stride_qm
    do_tile = do_base + tl.cast(lo, tl.int64) * stride_dom
    stats_tile = stats_base + 2 * lo
    delta_tile = delta_base + 2 * lo
    q_step = tl.cast(stride_qm, tl.int64) * BLOCK_M
    do_step = tl.cast(stride_dom, tl.int64) * BLOCK_M
    if DROPOUT:  # Philox index of pair (row, col): rng_base + row * rng_row_stride + col
        rng_tile = rng_base + tl.cast(lo, tl.int64) * rng_row_stride
        rng_rows = offs_m[None, :].to(tl.int64) * rng_row_stride
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        if MASKED:
            qt_mask = d_ok[:, None] & (rows[None, :] < seqlen_q)
            do_mask = (rows[:, None] < seqlen_q) & d_ok[None, :]
        else:
            qt_mask = d_ok[:, None]
            do_mask = d_ok[None, :]
        # Q^T tile (BLOCK_D, BLOCK_M): K Q^T then multiplies as the forward's Q K^T does
        q_t = tl.load(q_tile + qt_offs, mask=qt_mask, other=0.0)
        do = tl.load(do_tile + do_offs, mask=do_mask, other=0.0)
        row_max, log2_sum, delta, dlse = _load_row_stats(stats_tile + 2 * offs_m,
                                                         delta_tile + 2 * offs_m,
                                                         rows < seqlen_q)
        # -- P^T for this tile: (BLOCK_N, BLOCK_M) --
        s_t = scores(tl.dot(k, q_t, input_precision=INPUT_PRECISION), qk_scale,
                     rows[None, :], offs_n[:, None], seqlen_q, seqlen_k, mask_base, stride_mm,
                     stride_mn, window_left, window_right, CAUSAL, MASK_KIND, MASK_ROW,
                     HAS_WINDOW, MASKED)
        if MASKED:  # rows past seqlen_q too: their q and dO were loaded as 0
            s_t = tl.where(rows[None, :] < seqlen_q, s_t, float("-inf"))
        p_t = _probabilities(s_t, row_max[None, :], log2_sum[None, :])
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        if DROPOUT:
            # the forward's mask, regenerated: dV = Z^T dO with Z = keep * P / (1 - p),
            # and dP = keep * (dO V^T) / (1 - p)
            keep_t = dropout_keep(seed, rng_tile, rng_rows, offs_n[:, None], dropout_p)
            rng_tile += rng_row_stride * BLOCK_M
            z_t = tl.where(keep_t, p_t / (1.0 - dropout_p), 0.0)
            dp_t = tl.where(keep_t, dp_t / (1.0 - dropout_p), 0.0)
        else:
            z_t = p_t
        dv = tl.dot(z_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        # -- dS^T = P^T * (dP^T - delta), scaled before the product as autograd does --
        ds_t = _score_grads(p_t, dp_t, delta[None, :], dlse[None, :], True) * sm_scale
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=INPUT_PRECISION)
        q_tile += q_step
        do_tile += do_step
        stats_tile += 2 * BLOCK_M
        delta_tile += 2 * BLOCK_M
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, STATS, DELTA, MASK, CU_Q, CU_K, DK, DV, sm_scale,
                   stride_qb, stride_qh, stride_qm,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_dom,
                   stride_mb, stride_mh, stride_mm, stride_mn,
                   stride_dkb, stride_dkh, stride_dkn,
                   stride_dvb, stride_dvh, stride_dvn,
                   num_heads_kv, group_size, seqlen_q, seqlen_k, row_stride, window_left,
                   window_right, SEED, rng_head_stride, rng_origin, rng_total_k, dropout_p,
                   CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
                   HEAD_DIM: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    off_bhk = tl.program_id(1)
    off_b = (off_bhk // num_heads_kv).to(tl.int64)
    off_hk = (off_bhk % num_heads_kv).to(tl.int64)
    # -- packed sequences (sides swapped: this program owns keys, loops over queries) --
    k_start, q_start, seqlen_k, seqlen_q, seqlen_q_loop, seed = sequence_bounds(
        CU_K, CU_Q, start_n, seqlen_k, seqlen_q, dropout_seed(SEED, DROPOUT), VARLEN)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    kv_ok = (offs_n[:, None] < seqlen_k) & d_ok[None, :]
    tile_n = tl.arange(0, BLOCK_N)[:, None]
    key0 = k_start + tl.cast(start_n, tl.int64)
    k = tl.load(K + off_b * stride_kb + off_hk * stride_kh + key0 * stride_kn
                + tile_n * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + key0 * stride_vn
                + tile_n * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e)
    qt_offs = offs_m[None, :] * stride_qm + offs_d[:, None]
    do_offs = offs_m[:, None] * stride_dom + offs_d[None, :]

    # -- query range. Without masks or a window: [lo, mid) masked (causal diagonal),
    #    [mid, full) unmasked, [full, seqlen_q) masked (the last, partial query block).
    #    With them: every tile of [lo, hi) masked. --
    full = (seqlen_q_loop // BLOCK_M) * BLOCK_M
    lo = 0
    mid = 0
    hi = seqlen_q_loop
    if MASK_KIND != 0 or HAS_WINDOW:
        lo, hi = query_range(start_n, seqlen_q_loop, window_left, window_right,
                             CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    elif CAUSAL:
        # queries before start_n see none of these keys; from the first
        # multiple of BLOCK_M at or past start_n + BLOCK_N - 1 they see all.
        lo = tl.minimum((start_n // BLOCK_M) * BLOCK_M, full)
        mid = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, full)

    for g in range(0, group_size):
        off_h = off_hk * group_size + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qm
        do_base = DO + off_b * stride_dob + off_h * stride_doh + q_start * stride_dom
        mask_base = MASK + off_b * stride_mb + off_h * stride_mh
        off_bh = off_b * num_heads_kv * group_size + off_h
        stats_base = STATS + 2 * (off_bh * row_stride + q_start)
        delta_base = DELTA + 2 * (off_bh * row_stride + q_start)
        rng_base, rng_row_stride = dropout_origin(off_bh, seqlen_q, seqlen_k, rng_head_stride,
                                                  rng_origin, rng_total_k, VARLEN)
        # each query head's sums apart, then added: one sequential sum over the group's
        # G x S_q rows cost dk 4x naive's error (naive sums each head, then the heads)
        dk_h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv_h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        if MASK_KIND != 0 or HAS_WINDOW:
            dk_h, dv_h = _attn_bwd_dkdv_inner(
                dk_h, dv_h, k, v, q_base, do_base, qt_offs, do_offs, stride_qm, stride_dom,
                stats_base, delta_base, rng_base, rng_row_stride, offs_m, offs_n, d_ok, lo, hi,
                seqlen_q, seqlen_k, qk_scale, sm_scale, mask_base, stride_mm, stride_mn,
                window_left, window_right, seed, dropout_p, CAUSAL, MASK_KIND, MASK_ROW, HAS_WINDOW,
                DROPOUT, True, BLOCK_M, INPUT_PRECISION)
        else:
            dk_h, dv_h = _attn_bwd_dkdv_inner(
                dk_h, dv_h, k, v, q_base, do_base, qt_offs, do_offs, stride_qm, stride_dom,
                stats_base, delta_base, rng_base, rng_row_stride, offs_m, offs_n, d_ok, lo, mid,
                seqlen_q, seqlen_k, qk_scale, sm_scale, mask_base, stride_mm, stride_mn,
                window_left, window_right, seed, dropout_p, CAUSAL, MASK_KIND, MASK_ROW, HAS_WINDOW,
                DROPOUT, True, BLOCK_M, INPUT_PRECISION)
            dk_h, dv_h = _attn_bwd_dkdv_inner(
                dk_h, dv_h, k, v, q_base, do_base, qt_offs, do_offs, stride_qm, stride_dom,
                stats_base, delta_base, rng_base, rng_row_stride, offs_m, offs_n, d_ok, mid, full,
                seqlen_q, seqlen_k, qk_scale, sm_scale, mask_base, stride_mm, stride_mn,
                window_left, window_right, seed, dropout_p, CAUSAL, MASK_KIND, MASK_ROW, HAS_WINDOW,
                DROPOUT, False, BLOCK_M, INPUT_PRECISION)
            dk_h, dv_h = _attn_bwd_dkdv_inner(
                dk_h, dv_h, k, v, q_base, do_base, qt_offs, do_offs, stride_qm, stride_dom,
                stats_base, delta_base, rng_base, rng_row_stride, offs_m, offs_n, d_ok, full,
                seqlen_q_loop, seqlen_q, seqlen_k, qk_scale, sm_scale, mask_base, stride_mm,
                stride_mn, window_left, window_right, seed, dropout_p, CAUSAL, MASK_KIND, MASK_ROW,
                HAS_WINDOW, DROPOUT, True, BLOCK_M, INPUT_PRECISION)
        dk += dk_h
        dv += dv_h

    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + key0 * stride_dkn
             + tile_n * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + key0 * stride_dvn
             + tile_n * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, row_max, log2_sum, delta, dlse, k_base, v_base, k_offs, v_offs,
                       stride_kn, stride_vn, offs_m, offs_n, d_ok, lo, hi, seqlen_q, seqlen_k,
                       qk_scale, mask_base, stride_mm, stride_mn, window_left, window_right,
                       seed, rng_base, rng_row_stride, dropout_p, dbias_base, stride_dbm,
                       CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr,
                       HAS_WINDOW: tl.constexpr, DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr,
                       MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr):
    # scalar 64-bit bases advanced by a loop-invariant step (see the forward's inner loop)
    k_tile = k_base + tl.cast(lo, tl.int64) * stride_kn
    v_tile = v_base + tl.cast(lo, tl.int64) * stride_vn
    k_step = tl.cast(stride_kn, tl.int64) * BLOCK_N
    v_step = tl.cast(stride_vn, tl.int64) * BLOCK_N
    dbias_tile = dbias_base + lo
    if DROPOUT:  # Philox index of pair (row, col): rng_base + row * rng_row_stride + col
        rng_tile = rng_base + tl.cast(lo, tl.int64)
        rng_rows = offs_m[:, None].to(tl.int64) * rng_row_stride
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_mask = d_ok[:, None] & (cols[None, :] < seqlen_k)
        else:
            kv_mask = d_ok[:, None]
        # K^T and V^T tiles: (BLOCK_D, BLOCK_N)
        k_t = tl.load(k_tile + k_offs, mask=kv_mask, other=0.0)
        v_t = tl.load(v_tile + v_offs, mask=kv_mask, other=0.0)
        s = scores(tl.dot(q, k_t, input_precision=INPUT_PRECISION), qk_scale, offs_m[:, None],
                   cols[None, :], seqlen_q, seqlen_k, mask_base, stride_mm, stride_mn,
                   window_left, window_right, CAUSAL, MASK_KIND, MASK_ROW, HAS_WINDOW, MASKED)
        p = _probabilities(s, row_max[:, None], log2_sum[:, None])
        dp = tl.dot(do, v_t, input_precision=INPUT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, rng_tile, rng_rows, offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            rng_tile += BLOCK_N
        ds = _score_grads(p, dp, delta[:, None], dlse[:, None], MASKED)
        # -- the gradient of an additive mask is dS itself (S = scale * q k^T + mask) --
        if BIAS_GRAD == 1:
            tl.store(dbias_tile + offs_m[:, None].to(tl.int64) * stride_dbm + offs_n[None, :],
                     ds, mask=(offs_m[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))
        elif BIAS_GRAD == 2:  # mask broadcast over queries: this block's rows summed
            ds_rows = tl.where(offs_m[:, None] < seqlen_q, ds, 0.0)
            tl.store(dbias_tile + offs_n, tl.sum(ds_rows, 0), mask=cols < seqlen_k)
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=INPUT_PRECISION)
        k_tile += k_step
        v_tile += v_step
        dbias_tile += BLOCK_N
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, STATS, DELTA, MASK, CU_Q, CU_K, DQ, DBIAS, sm_scale,
                 stride_qb, stride_qh, stride_qm,
                 stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn,
                 stride_dob, stride_doh, stride_dom,
                 stride_mb, stride_mh, stride_mm, stride_mn,
                 stride_dqb, stride_dqh, stride_dqm,
                 stride_dbb, stride_dbh, stride_dbm,
                 num_heads, group_size, seqlen_q, seqlen_k, row_stride, window_left,
                 window_right, SEED, rng_head_stride, rng_origin, rng_total_k, dropout_p,
                 CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
                 BIAS_GRAD: tl.constexpr,
                 HEAD_DIM: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = (off_bh % num_heads).to(tl.int64)
    off_hk = off_h // group_size
    q_start, k_start, seqlen_q, seqlen_k, seqlen_k_loop, seed = sequence_bounds(
        CU_Q, CU_K, start_m, seqlen_q, seqlen_k, dropout_seed(SEED, DROPOUT), VARLEN)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tile_m = tl.arange(0, BLOCK_M)[:, None]
    d_ok = head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    tile_ok = (offs_m[:, None] < seqlen_q) & d_ok[None, :]
    row0 = q_start + tl.cast(start_m, tl.int64)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + row0 * stride_qm
                + tile_m * stride_qm + offs_d[None, :], mask=tile_ok, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + row0 * stride_dom
                 + tile_m * stride_dom + offs_d[None, :], mask=tile_ok, other=0.0)
    row_base = off_bh.to(tl.int64) * row_stride + q_start
    row_max, log2_sum, delta, dlse = _load_row_stats(STATS + 2 * (row_base + offs_m),
                                                     DELTA + 2 * (row_base + offs_m),
                                                     offs_m < seqlen_q)
    k_base = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn
    v_base = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn
    k_offs = offs_n[None, :] * stride_kn + offs_d[:, None]
    v_offs = offs_n[None, :] * stride_vn + offs_d[:, None]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e)

    mask_base = MASK + off_b * stride_mb + off_h * stride_mh
    rng_base, rng_row_stride = dropout_origin(off_bh, seqlen_q, seqlen_k, rng_head_stride,
                                              rng_origin, rng_total_k, VARLEN)
    # BIAS_GRAD 1: dS tiles into a (B, H_q, S_q, S_k) buffer; 2: one row per query block
    dbias_base = DBIAS + off_b * stride_dbb + off_h * stride_dbh
    if BIAS_GRAD == 2:
        dbias_base += tl.program_id(0).to(tl.int64) * stride_dbm
    if MASK_KIND != 0 or HAS_WINDOW:
        # -- key range as in the forward, every tile masked --
        lo, hi = key_range(start_m, seqlen_k_loop, window_left, window_right,
                           CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
        dq = _attn_bwd_dq_inner(
            dq, q, do, row_max, log2_sum, delta, dlse, k_base, v_base, k_offs, v_offs, stride_kn,
            stride_vn, offs_m, offs_n, d_ok, lo, hi, seqlen_q, seqlen_k, qk_scale, mask_base,
            stride_mm, stride_mn, window_left, window_right, seed, rng_base, rng_row_stride,
            dropout_p, dbias_base, stride_dbm, CAUSAL, MASK_KIND, MASK_ROW, HAS_WINDOW, DROPOUT,
            BIAS_GRAD, True, BLOCK_N, INPUT_PRECISION)
    else:
        # -- key range, as in the forward: [0, full) unmasked, [full, hi) masked --
        full, hi = unmasked_key_split(start_m, seqlen_k_loop, CAUSAL, BLOCK_M, BLOCK_N)
        dq = _attn_bwd_dq_inner(
            dq, q, do, row_max, log2_sum, delta, dlse, k_base, v_base, k_offs, v_offs, stride_kn,
            stride_vn, offs_m, offs_n, d_ok, 0, full, seqlen_q, seqlen_k, qk_scale, mask_base,
            stride_mm, stride_mn, window_left, window_right, seed, rng_base, rng_row_stride,
            dropout_p, dbias_base, stride_dbm, CAUSAL, MASK_KIND, MASK_ROW, HAS_WINDOW, DROPOUT,
            BIAS_GRAD, False, BLOCK_N, INPUT_PRECISION)
        dq = _attn_bwd_dq_inner(
            dq, q, do, row_max, log2_sum, delta, dlse, k_base, v_base, k_offs, v_offs, stride_kn,
            stride_vn, offs_m, offs_n, d_ok, full, hi, seqlen_q, seqlen_k, qk_scale, mask_base,
            stride_mm, stride_mn, window_left, window_right, seed, rng_base, rng_row_stride,
            dropout_p, dbias_base, stride_dbm, CAUSAL, MASK_KIND, MASK_ROW, HAS_WINDOW, DROPOUT,
            BIAS_GRAD, True, BLOCK_N, INPUT_PRECISION)

    dq *= sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + row0 * stride_dqm
             + tile_m * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=tile_ok)


def attention_backward(do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, stats: torch.Tensor,
                       causal: bool, scale: float, mask: torch.Tensor | None = None,
                       window: tuple[int, int] = (-1, -1), dropout_p: float = 0.0,
                       seed: torch.Tensor | None = None, packed: tuple | None = None,
                       mask_grad_shape: tuple | None = None, dropout_origin: tuple | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dq, dk, dv) of the attention forward, recomputing P from the forward's
    row statistics `stats` (dense, (B, H_q, S_q, 2)).

    `do` must have stride(-1) == 1; `dlse`, if given, is the gradient of the
    returned logsumexp, shape (B, H_q, S_q); `mask`, `window`, `dropout_p` and
    `seed` and `dropout_origin` as in the forward, whose dropout mask is regenerated,
    not stored;
    `packed` as in the forward. With `mask_grad_shape` (a float mask's shape, left
    padded to 4-D), also returns the mask's gradient: dS summed down to that
    shape; otherwise None.
    """
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    block_d = padded_head_dim(head_dim)
    precision = input_precision(q.dtype)
    delta = torch.empty(stats.shape, device=q.device, dtype=torch.float32)  # (delta, dlse)
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()

    preprocess_block = 64
    _attn_bwd_preprocess[(triton.cdiv(seqlen_q, preprocess_block), batch * heads_q)](
        o, do, dlse, delta,
        o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        heads_q, seqlen_q,
        HAS_DLSE=dlse is not None, HEAD_DIM=head_dim, BLOCK_M=preprocess_block, BLOCK_D=block_d,
    )
    mask_ptr, mask_strides, mask_kind, mask_row = mask_launch_args(mask, q)
    strides_in = (q.stride(0), q.stride(1), q.stride(2),
                  k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2),
                  do.stride(0), do.stride(1), do.stride(2), *mask_strides)
    constexprs = dict(CAUSAL=causal, MASK_KIND=mask_kind, MASK_ROW=mask_row,
                      HAS_WINDOW=tuple(window) != (-1, -1), DROPOUT=dropout_p > 0,
                      HEAD_DIM=head_dim, INPUT_PRECISION=precision)
    cu_q, cu_k, programs_q, programs_k, sequences = packed_launch_args(packed, q, k)
    dropout_args = dropout_launch_args(dropout_p, seed, dropout_origin, q, k)
    constexprs["VARLEN"] = packed is not None
    launch(
        _attn_bwd_dkdv,
        lambda cfg: (triton.cdiv(programs_k, cfg.block_n), batch * heads_kv, sequences),
        (q, k, v, do, stats, delta, mask_ptr, cu_q, cu_k, dk, dv, scale, *strides_in,
         dk.stride(0), dk.stride(1), dk.stride(2),
         dv.stride(0), dv.stride(1), dv.stride(2),
         heads_kv, group, seqlen_q, seqlen_k, seqlen_q, *window, *dropout_args,
         dropout_p),
        constexprs, kernel="dkdv", block_d=block_d, element_size=q.element_size(),
    )
    dbias, bias_grad = _mask_grad_buffer(mask_grad_shape, q, k)
    launch(
        _attn_bwd_dq,
        lambda cfg: (triton.cdiv(programs_q, cfg.block_m), batch * heads_q, sequences),
        (q, k, v, do, stats, delta, mask_ptr, cu_q, cu_k, dq, dbias, scale,
         *strides_in,
         dq.stride(0), dq.stride(1), dq.stride(2),
         dbias.stride(0), dbias.stride(1), dbias.stride(2),
         heads_q, group, seqlen_q, seqlen_k, seqlen_q, *window, *dropout_args,
         dropout_p),
        {**constexprs, "BIAS_GRAD": bias_grad}, kernel="dq", block_d=block_d,
        element_size=q.element_size(),
    )
    if not bias_grad:
        return dq, dk, dv, None
    return dq, dk, dv, dbias.sum_to_size(mask_grad_shape)


def _mask_grad_buffer(shape: tuple | None, q: torch.Tensor,
                      k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(fp32 buffer, BIAS_GRAD) for the dQ kernel's dS: (B, H_q, S_q, S_k), or one row per
    query block (blocks have at least 16 rows) when the mask is broadcast over queries."""
    if shape is None:
        return q, 0
    mode = 2 if shape[2] == 1 else 1
    rows = triton.cdiv(q.shape[2], 16) if mode == 2 else q.shape[2]
    buffer = torch.zeros(q.shape[0], q.shape[1], rows, k.shape[2], device=q.device,
                         dtype=torch.float32)
    return buffer, mode
