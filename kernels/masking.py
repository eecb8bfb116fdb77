"""Which (query, key) pairs a score tile may use: bounds, causal, sliding window, attn_mask;
and which ones attention dropout keeps.

Shared by the forward and both backward kernels. Tiles are given by two
broadcastable 2-D index tensors, rows (query positions) and cols (key
positions), so the same code serves a (BLOCK_M, BLOCK_N) tile and the
transposed (BLOCK_N, BLOCK_M) tile of the dK/dV kernel.

MASK_KIND: 0 no attn_mask, 1 boolean (nonzero = may attend), 2 additive
float. MASK_ROW: the mask is broadcast over queries (a key-padding mask), so
one row of keys is read instead of a tile.
"""

import triton
import triton.language as tl


@triton.jit
def mask_scores(s, rows, cols, seqlen_q, seqlen_k, mask_base, stride_mm, stride_mn,
                window_left, window_right,
                CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr,
                HAS_WINDOW: tl.constexpr):
    """Scores s (log2 domain) with the additive mask added and invisible pairs at -inf."""
    visible = cols < seqlen_k
    if CAUSAL:
        visible = visible & (cols <= rows)
    if HAS_WINDOW:
        # -1 means unbounded on that side
        visible = visible & ((window_left < 0) | (cols >= rows - window_left))
        visible = visible & ((window_right < 0) | (cols <= rows + window_right))
    if MASK_KIND != 0:
        if MASK_ROW:
            m = tl.load(mask_base + cols * stride_mn, mask=cols < seqlen_k, other=0)
        else:
            in_bounds = (rows < seqlen_q) & (cols < seqlen_k)
            m = tl.load(mask_base + rows.to(tl.int64) * stride_mm + cols * stride_mn,
                        mask=in_bounds, other=0)
        if MASK_KIND == 1:
            visible = visible & (m != 0)
        else:
            s = s + m.to(tl.float32) * 1.4426950408889634  # log2(e): s is in the log2 domain
    return tl.where(visible, s, float("-inf"))


@triton.jit
def key_range(start_m, seqlen_k, window_left, window_right,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the keys that queries [start_m, start_m + BLOCK_M) may see; lo is a
    multiple of BLOCK_N. Key blocks outside it are skipped, not masked."""
    lo = start_m * 0
    hi = seqlen_k + start_m * 0
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M)
    if HAS_WINDOW:
        lo = tl.where(window_left >= 0, tl.maximum(start_m - window_left, 0), lo)
        hi = tl.where(window_right >= 0, tl.minimum(hi, start_m + BLOCK_M + window_right), hi)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def query_range(start_n, seqlen_q, window_left, window_right,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the queries that may see keys [start_n, start_n + BLOCK_N); lo is a
    multiple of BLOCK_M."""
    lo = start_n * 0
    hi = seqlen_q + start_n * 0
    if CAUSAL:
        lo = start_n + lo
    if HAS_WINDOW:
        lo = tl.where(window_right >= 0, tl.maximum(lo, start_n - window_right), lo)
        hi = tl.where(window_left >= 0, tl.minimum(hi, start_n + BLOCK_N + window_left), hi)
    return (tl.maximum(lo, 0) // BLOCK_M) * BLOCK_M, hi


@triton.jit
def dropout_keep(seed, rng_row_base, rows, cols, seqlen_k, dropout_p):
    """True where dropout keeps the pair: Philox via tl.rand on the pair's global index
    (rng_row_base + row) * seqlen_k + col, in int64, the same in forward and backward."""
    offsets = (rng_row_base + rows.to(tl.int64)) * seqlen_k + cols
    return tl.rand(seed, offsets) >= dropout_p
