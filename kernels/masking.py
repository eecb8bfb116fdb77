"""A score tile's arithmetic, and which (query, key) pairs it may use: bounds, causal,
sliding window, attn_mask; which ones attention dropout keeps; and, for packed
sequences, where a program's sequence lies.

Shared by the forward and both backward kernels. Tiles are given by two
broadcastable 2-D index tensors, rows (query positions) and cols (key
positions), so the same code serves a (BLOCK_M, BLOCK_N) tile and the
transposed (BLOCK_N, BLOCK_M) tile of the dK/dV kernel.

MASK_KIND: 0 no attn_mask, 1 boolean (nonzero = may attend), 2 additive
float. MASK_ROW: the mask is broadcast over queries (a key-padding mask), so
one row of keys is read instead of a tile.

Dropout: the seed is read from a one-element int64 tensor on the device (no host
sync, so it can be drawn inside a captured or compiled graph), and pair (i, j)
of head bh draws Philox at index (bh * total_q + row_offset + i) * total_k +
col_offset + j: the pair's index in a problem of total_q x total_k of which
this call computes the block at (row_offset, col_offset); by default the block
is the whole problem (offsets 0, totals the call's own lengths).
"""

import triton
import triton.language as tl


@triton.jit
def scores(qk, qk_scale, rows, cols, seqlen_q, seqlen_k, mask_base, stride_mm, stride_mn,
           window_left, window_right,
           CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr,
           HAS_WINDOW: tl.constexpr, MASKED: tl.constexpr):
    """A tile's scores in the log2 domain from its products qk = q k^T: one rounded
    multiply by qk_scale, then the masks where MASKED. Every kernel computes its scores
    here from the same products (Q K^T, or K Q^T: the same pairs in the same order), so
    the backward recomputes the forward's scores bit for bit. On masked tiles the select
    keeps the product rounded, so the key holding a row's max gives s - max = 0 exactly;
    on unmasked ones LLVM contracts the multiply into that subtraction (an FMA), alike in
    all three kernels (without contraction ptxas spills the forward on sm_90a)."""
    s = qk * qk_scale
    if MASKED:
        s = mask_scores(s, rows, cols, seqlen_q, seqlen_k, mask_base, stride_mm, stride_mn,
                        window_left, window_right, CAUSAL, MASK_KIND, MASK_ROW, HAS_WINDOW)
    return s


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
            s = s + _log2_domain(m.to(tl.float32))
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _log2_domain(bias):
    """An additive mask in the log2 domain (times log2(e)); a finite bias stays finite
    (finfo.min would overflow to -inf and hide the key), an infinite one stays infinite."""
    scaled = bias * 1.4426950408889634
    overflowed = (tl.abs(scaled) == float("inf")) & (tl.abs(bias) != float("inf"))
    return tl.where(overflowed, tl.where(bias > 0, 3.4028234663852886e38,
                                         -3.4028234663852886e38), scaled)


@triton.jit
def head_dim_mask(offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Which of the tile's BLOCK_D columns are real head dims. When the head dim is a
    power of two the mask is a constant True, which the compiler folds out of every
    load and store instead of predicating each copy on offs_d < HEAD_DIM."""
    if HEAD_DIM == BLOCK_D:
        return tl.full([BLOCK_D], 1, tl.int1)
    else:
        return offs_d < HEAD_DIM


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
def unmasked_key_split(start_m, seqlen_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """(full, hi) without masks or a window: keys [0, full) are visible to every row of
    queries [start_m, start_m + BLOCK_M), so those tiles need no mask; [full, hi) do (the
    causal diagonal and the partial last key block)."""
    full = (seqlen_k // BLOCK_N) * BLOCK_N
    hi = seqlen_k
    if CAUSAL:
        full = tl.minimum(full, ((start_m + 1) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(seqlen_k, start_m + BLOCK_M)
    return full, hi


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
def dropout_seed(SEED, DROPOUT: tl.constexpr):
    """The dropout seed, loaded from its device tensor (0, unused, without dropout)."""
    if DROPOUT:
        return tl.load(SEED)
    else:
        return 0


@triton.jit
def dropout_origin(off_bh, seqlen_q, seqlen_k, rng_head_stride, rng_origin, rng_row_stride,
                   VARLEN: tl.constexpr):
    """(Philox index of pair (0, 0) of head off_bh, index step of one query row), int64.

    Batched: off_bh * total_q * total_k + row_offset * total_k + col_offset and total_k,
    the launcher passing rng_head_stride = total_q * total_k, rng_origin = row_offset *
    total_k + col_offset and rng_row_stride = total_k. Packed (VARLEN): each sequence
    is a whole problem of its own lengths.
    """
    if VARLEN:
        return off_bh.to(tl.int64) * seqlen_q * seqlen_k, tl.cast(seqlen_k, tl.int64)
    else:
        return (off_bh.to(tl.int64) * rng_head_stride + rng_origin,
                tl.cast(rng_row_stride, tl.int64))


@triton.jit
def dropout_keep(seed, tile_base, row_offs, col_offs, dropout_p):
    """True where dropout keeps the pair: Philox via tl.rand on the pair's global index
    (see dropout_origin) in int64, the same in forward and backward.

    Callers split that index into a scalar int64 tile_base, advanced by a constant
    step as their loop moves on (a loop index in int64 arithmetic serializes wgmma,
    see forward.py), and loop-invariant in-tile offsets row_offs and col_offs.
    """
    return tl.rand(seed, tile_base + row_offs + col_offs) >= dropout_p


@triton.jit
def sequence_bounds(CU_Q, CU_K, start, seqlen_q, seqlen_k, seed, VARLEN: tl.constexpr):
    """(q_start, k_start, seqlen_q, seqlen_k, loop_len, seed) of this program's sequence.

    Packed (VARLEN): sequence program_id(2) spans CU_Q[s]:CU_Q[s+1] and
    CU_K[s]:CU_K[s+1]; its dropout stream is seed + s. loop_len is the length of
    the other side (keys for a query block) to loop over, 0 when the program's
    block `start` lies past its own side's length, so it does no work.
    Otherwise: offsets 0 and the given lengths.
    """
    if VARLEN:
        seq = tl.program_id(2)
        q_start = tl.load(CU_Q + seq)
        k_start = tl.load(CU_K + seq)
        seqlen_q = tl.load(CU_Q + seq + 1) - q_start
        seqlen_k = tl.load(CU_K + seq + 1) - k_start
        return (q_start.to(tl.int64), k_start.to(tl.int64), seqlen_q, seqlen_k,
                tl.where(start < seqlen_q, seqlen_k, 0), seed + seq)
    else:
        return 0, 0, seqlen_q, seqlen_k, seqlen_k, seed
