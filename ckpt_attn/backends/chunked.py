"""The "torch" backend: the kernels' forward/backward contract written in plain PyTorch.

It walks the queries in chunks of CHUNK rows, so at most a CHUNK x S_k score
tile (per head) is alive at a time, never S_q x S_k. It computes in float32
(float64, with float64 row statistics, for float64 inputs) and saves nothing
beyond what the kernels save. The forward works in the log2 domain, as the
kernels do, for their row statistics (row max, log2 row sum). A chunk holds whole
rows, so the backward recomputes P = softmax(S) from natural-unit scores and
delta = rowsum(P dP) as naive attention computes them; only a context-parallel
block of longer rows reads the saved statistics, as the kernels do. GQA groups
are folded into the row dimension, so k and v are never repeated per query head.
A chunk only touches the keys that causal and the window let it see; the
caller's mask is read chunk by chunk, never copied whole.

Forwards that torch's own fused CPU attention covers (fused_cpu.py: no dropout, no
window that hides a pair, float32/float64 on the CPU, values it gets right) run there
instead; packed sequences reach it one by one. The backward is always the chunked one.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from . import fused_cpu, philox

CHUNK = 128
LOG2E = 1.4426950408889634


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the arithmetic and of the logsumexp: float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B, H_kv * G, C, D) -> (B, H_kv, G * C, D): a GQA group's rows side by side."""
    return rearrange(x, "b (h g) c d -> b h (g c) d", g=group)


def _ungrouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of _grouped."""
    return rearrange(x, "b h (g c) d -> b (h g) c d", g=group)


def _visible_keys(seqlen_k: int, start: int, stop: int, causal: bool,
                  window: tuple[int, int]) -> slice:
    """Keys that query rows [start, stop) may see: all, less what causal and the window cut."""
    left, right = window
    lo = max(0, start - left) if left >= 0 else 0
    hi = min(seqlen_k, stop) if causal else seqlen_k
    if right >= 0:
        hi = min(hi, stop + right)
    return slice(lo, max(lo, hi))


def _log2_domain(x: torch.Tensor) -> torch.Tensor:
    """x * log2(e), a finite value kept finite (as the kernels do with a mask of finfo.min,
    which would otherwise overflow to -inf and hide the key); infinities stay infinite."""
    scaled = x * LOG2E
    largest = torch.finfo(x.dtype).max
    return torch.where(torch.isfinite(x), scaled.clamp(-largest, largest), scaled)


def _scores(q_g: torch.Tensor, k: torch.Tensor, start: int, stop: int, keys: slice,
            group: int, causal: bool, scale: float, mask: torch.Tensor | None,
            window: tuple[int, int], log2: bool = True, out: torch.Tensor | None = None
            ) -> torch.Tensor:
    """Masked, scaled scores of one query chunk, (B, H_kv, G * rows, len(keys)), in the
    log2 domain as the kernels compute them (scale * log2(e) folded into one multiply, the
    mask times log2(e)), so that softmax is exp2 and the row statistics are the kernels';
    with log2=False in natural units, as naive attention computes them.

    q_g: (B, H_kv, G * rows, D) compute dtype; k: (B, H_kv, S_k, D); mask: the
    (B, H_q, S_q, S_k) view of a boolean (True = may attend) or additive mask.
    Invisible pairs are -inf. out: a contiguous tile of the result's shape to write into.
    """
    scores = torch.matmul(q_g, k[:, :, keys].transpose(-1, -2), out=out)
    scores.mul_(scale * LOG2E if log2 else scale)
    if not causal and window == (-1, -1) and mask is None:
        return scores
    query = torch.arange(start, stop, device=q_g.device).repeat(group)[:, None]
    key = torch.arange(keys.start, keys.stop, device=q_g.device)[None, :]
    hidden = torch.zeros(query.shape[0], key.shape[1], dtype=torch.bool, device=q_g.device)
    if causal:
        hidden |= key > query
    left, right = window
    if left >= 0:
        hidden |= key < query - left
    if right >= 0:
        hidden |= key > query + right
    if mask is not None:
        mask_g = _grouped(mask[:, :, start:stop, keys], group)
        if mask.dtype == torch.bool:
            hidden = hidden | ~mask_g
        else:
            mask_g = mask_g.to(scores.dtype)
            scores += _log2_domain(mask_g) if log2 else mask_g
    return scores.masked_fill_(hidden, float("-inf"))


def _dropout_keep(seed: int, dropout_p: float, shape: tuple[int, ...], start: int, stop: int,
                  keys: slice, group: int, device: torch.device,
                  origin: tuple | None = None) -> torch.Tensor:
    """The kernels' dropout decisions for one chunk, (B, H_kv, G * rows, len(keys)): Philox
    on the pair's global index ((b * H_q + h) * total_q + row_offset + i) * total_k
    + col_offset + j, origin = (row_offset, col_offset, total_q, total_k) placing this call
    in a larger problem (None: the call is the whole problem, (0, 0, S_q, S_k))."""
    batch, heads_q, seqlen_q, seqlen_k = shape
    row_offset, col_offset, total_q, total_k = origin or (0, 0, seqlen_q, seqlen_k)
    head = torch.arange(batch * heads_q, device=device).view(batch, heads_q, 1, 1)
    row = torch.arange(start + row_offset, stop + row_offset, device=device).view(1, 1, -1, 1)
    col = torch.arange(keys.start + col_offset, keys.stop + col_offset,
                       device=device).view(1, 1, 1, -1)
    offsets = (head * total_q + row) * total_k + col
    return _grouped(philox.uniform(seed, offsets) >= dropout_p, group)


def _recomputed_probabilities(scores: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """P = exp2((S - max) - log2 sum) from log2-domain scores, as the kernels compute it, the
    statistics subtracted apart (a huge bias shared by a row cancels before its log2 sum
    is taken off), clamped at 1 (P <= 1 exactly) so that rounding cannot overflow, 0 for
    rows with no visible key; NaN propagates."""
    row_max, log2_sum = stats[..., :1], stats[..., 1:]
    empty = torch.isneginf(row_max)
    row_max = torch.where(empty, float("inf"), row_max)
    log2_sum = torch.where(empty, 0.0, log2_sum)
    return torch.exp2(((scores - row_max) - log2_sum).clamp(max=0.0))


def _natural_softmax(scores: torch.Tensor, may_hide_rows: bool, out: torch.Tensor
                     ) -> torch.Tensor:
    """Backward on natural-unit scores: P = softmax(S) as torch.softmax computes it,
    written into out, 0 for rows with no visible key (not NaN); NaN propagates.
    may_hide_rows: whether a mask or window may leave a row no key (causal alone never
    does: row i sees key 0)."""
    p = torch.softmax(scores, dim=-1, out=out)
    if may_hide_rows:
        p.masked_fill_(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)
    return p


def _softmax(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on log2-domain scores: (P, row statistics). The statistics, (..., 2), are
    the row max and log2 of the row sum, as the kernels keep them; a row with no visible
    key gets P = 0 (not NaN) and statistics -inf. P is computed from the statistics, as
    a context-parallel block's backward recomputes it."""
    if scores.shape[-1] == 0:
        return scores, scores.new_full((*scores.shape[:-1], 2), float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    shifted = torch.exp2(scores - torch.where(torch.isneginf(row_max), 0.0, row_max))
    total = shifted.sum(dim=-1, keepdim=True)
    stats = torch.cat([row_max, torch.log2(total)], dim=-1)
    return _recomputed_probabilities(scores, stats), stats


def _sequences(packed: tuple) -> list[tuple[int, slice, slice]]:
    """(index, query rows, key rows) of each packed sequence with at least one query."""
    bounds_q, bounds_k = packed[0].tolist(), packed[1].tolist()
    return [(s, slice(bounds_q[s], bounds_q[s + 1]), slice(bounds_k[s], bounds_k[s + 1]))
            for s in range(len(bounds_q) - 1) if bounds_q[s + 1] > bounds_q[s]]


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      scale: float, mask: torch.Tensor | None = None,
                      window: tuple[int, int] = (-1, -1), dropout_p: float = 0.0,
                      seed: int = 0, packed: tuple | None = None,
                      dropout_origin: tuple | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on (B, H, S, D) inputs: O shaped like q, and the row statistics
    (B, H_q, S_q, 2), the kernels' (row max, log2 of the row sum) in the log2 domain.

    With `packed` = (cu_q, cu_k, max_q, max_k) the inputs are (1, H, total, D)
    views of packed sequences, run one by one (sequence s with dropout seed + s).
    `dropout_origin` (see _dropout_keep) places an unpacked call in a larger problem.
    """
    if packed is not None:
        o = torch.zeros_like(q)
        stats = torch.full((*q.shape[:3], 2), float("-inf"), device=q.device,
                           dtype=compute_dtype(q.dtype))
        for s, rows, keys in _sequences(packed):
            o[:, :, rows], stats[:, :, rows] = attention_forward(
                q[:, :, rows], k[:, :, keys], v[:, :, keys], causal, scale, None, window,
                dropout_p, seed + s)
        return o, stats
    if dropout_origin is None and fused_cpu.covers(q, k, causal, window, dropout_p):
        fused = fused_cpu.attention_forward(q, k, v, causal, scale, mask)
        if fused is not None:
            return fused
    group = q.shape[1] // k.shape[1]
    dtype = compute_dtype(q.dtype)
    shape = (*q.shape[:3], k.shape[2])
    k_c, v_c = k.to(dtype), v.to(dtype)
    o = torch.empty_like(q)
    stats = torch.empty((*q.shape[:3], 2), device=q.device, dtype=dtype)
    for start in range(0, q.shape[2], CHUNK):
        stop = min(start + CHUNK, q.shape[2])
        keys = _visible_keys(k.shape[2], start, stop, causal, window)
        q_g = _grouped(q[:, :, start:stop].to(dtype), group)
        p, stats_g = _softmax(_scores(q_g, k_c, start, stop, keys, group, causal, scale, mask,
                                    window))
        if dropout_p > 0:
            keep = _dropout_keep(seed, dropout_p, shape, start, stop, keys, group, q.device,
                                 dropout_origin)
            p = torch.where(keep, p / (1 - dropout_p), 0.0)
        o[:, :, start:stop] = _ungrouped(torch.matmul(p, v_c[:, :, keys]), group).to(q.dtype)
        stats[:, :, start:stop] = _ungrouped(stats_g, group)
    return o, stats


def attention_backward(do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, stats: torch.Tensor,
                       causal: bool, scale: float, mask: torch.Tensor | None = None,
                       window: tuple[int, int] = (-1, -1), dropout_p: float = 0.0, seed: int = 0,
                       packed: tuple | None = None, mask_grad_shape: tuple | None = None,
                       dropout_origin: tuple | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dq, dk, dv, dmask), recomputing P (and the dropout mask) chunk by chunk.

    dmask, the gradient of a float mask (dS, summed down to `mask_grad_shape`, the
    mask's shape left-padded to 4-D), is None unless that shape is given.
    """
    if packed is not None:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for s, rows, keys in _sequences(packed):
            dq[:, :, rows], dk[:, :, keys], dv[:, :, keys], _ = attention_backward(
                do[:, :, rows], None if dlse is None else dlse[:, :, rows], q[:, :, rows],
                k[:, :, keys], v[:, :, keys], o[:, :, rows], stats[:, :, rows], causal, scale,
                None, window, dropout_p, seed + s)
        return dq, dk, dv, None
    group = q.shape[1] // k.shape[1]
    dtype = compute_dtype(q.dtype)
    shape = (*q.shape[:3], k.shape[2])
    k_c, v_c = k.to(dtype), v.to(dtype)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, device=k.device, dtype=dtype)
    dv = torch.zeros(v.shape, device=v.device, dtype=dtype)
    dmask = None
    if mask_grad_shape is not None:
        dmask = torch.zeros(mask_grad_shape, device=q.device, dtype=dtype)
    # Whole rows (every call but a context-parallel block of longer rows): P is recomputed
    # as softmax of the scores, as naive attention computes it, whichever path ran the
    # forward (the fused kernel's lse is rounded through an approximate exp, and P = exp(S
    # - lse) from it cost up to 5.5x naive's dk error; the log2-domain scores, 3.2x
    # naive's dq error where naive's was half an ulp).
    partial_rows = dropout_origin is not None and dropout_origin[3] > k.shape[2]
    may_hide_rows = mask is not None or window != (-1, -1)
    tiles = _Tiles(3, q.shape[0] * q.shape[1] * min(CHUNK, q.shape[2]) * k.shape[2], dtype,
                   q.device)
    for start in range(0, q.shape[2], CHUNK):
        stop = min(start + CHUNK, q.shape[2])
        q_g = _grouped(q[:, :, start:stop].to(dtype), group)
        do_g = _grouped(do[:, :, start:stop].to(dtype), group)
        keys = _visible_keys(k.shape[2], start, stop, causal, window)
        tile = (*q_g.shape[:3], keys.stop - keys.start)  # (B, H_kv, G * rows, keys)
        scores = _scores(q_g, k_c, start, stop, keys, group, causal, scale, mask, window,
                         log2=partial_rows, out=tiles.get(0, tile))
        if partial_rows:
            p = _recomputed_probabilities(scores, _grouped(stats[:, :, start:stop].to(dtype),
                                                           group))
        else:
            p = _natural_softmax(scores, may_hide_rows, out=tiles.get(1, tile))
        dp = torch.matmul(do_g, v_c[:, :, keys].transpose(-1, -2), out=tiles.get(2, tile))
        z = p
        if dropout_p > 0:
            keep = _dropout_keep(seed, dropout_p, shape, start, stop, keys, group, q.device,
                                 dropout_origin)
            z = torch.where(keep, p / (1 - dropout_p), 0.0)
            dp = torch.where(keep, dp / (1 - dropout_p), 0.0)
        dv[:, :, keys] += _summed_over_group(z, do_g, group)
        if partial_rows:
            # rowsum(P * dP) over the block's keys is part of the row's only, so delta is
            # rowsum(dO * O) - dlse, as the kernels take it
            row = (do[:, :, start:stop].to(dtype) * o[:, :, start:stop].to(dtype)).sum(-1)
            if dlse is not None:
                row = row - dlse[:, :, start:stop].to(dtype)
            delta = _grouped(row[..., None], group)
        else:  # (the scores are spent: their tile holds P * dP)
            delta = _row_delta(p, dp, dlse, start, stop, group, out=tiles.get(0, tile))
        ds = dp.sub_(delta).mul_(p)  # P (dP - delta), in dP's place
        if dmask is not None:
            _accumulate_mask_grad(dmask, _ungrouped(ds, group), start, stop, keys)
        # S = scale * q k^T + mask: the scale goes on dS before the products, as autograd
        # applies it to naive attention (after them, the float32 sums' rounding landed
        # in other binades and cost up to 3.1x naive's dk error)
        ds.mul_(scale)
        dq[:, :, start:stop] = _ungrouped(torch.matmul(ds, k_c[:, :, keys]), group).to(q.dtype)
        dk[:, :, keys] += _summed_over_group(ds, q_g, group)
    return dq, dk.to(k.dtype), dv.to(v.dtype), dmask


class _Tiles:
    """Flat buffers that one backward call reuses for its chunks' (B, H_kv, G * rows, keys)
    tiles. A fresh tile per chunk is a new allocation of megabytes, which the CPU's
    allocator maps from and returns to the system each time; those page faults cost about
    as much as the elementwise arithmetic (S=1024, 8 heads, one thread: a backward of 197
    ms with fresh tiles, 150 ms reusing them)."""

    def __init__(self, count: int, numel: int, dtype: torch.dtype, device: torch.device):
        self.flat = [torch.empty(numel, dtype=dtype, device=device) for _ in range(count)]

    def get(self, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Buffer `index` as a contiguous tensor of `shape` (what it held is left as is)."""
        return self.flat[index][:math.prod(shape)].view(shape)


def _row_delta(p: torch.Tensor, dp: torch.Tensor, dlse: torch.Tensor | None, start: int,
               stop: int, group: int, out: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(P * dP) - dlse of one chunk, (B, H_kv, G * rows, 1), in dS = P (dP -
    delta). A chunk holds whole rows, so delta is summed from them as softmax's backward
    (and naive attention) sums it, not taken as rowsum(dO * O) as the kernels must: the
    rounding of the stored O does not cancel against dP, which left a row that sees one
    key (exact dS = 0) with 6x naive's dq error under dropout 0.6. out: a tile for
    P * dP."""
    delta = torch.mul(p, dp, out=out).sum(dim=-1, keepdim=True)
    if dlse is None:
        return delta
    return delta - _grouped(dlse[:, :, start:stop, None].to(delta.dtype), group)


def _summed_over_group(x: torch.Tensor, y: torch.Tensor, group: int) -> torch.Tensor:
    """x^T y for a key gradient, (B, H_kv, G * rows, K) and (B, H_kv, G * rows, D) ->
    (B, H_kv, K, D): each query head's rows reduced by a matmul of its own, then the G heads
    summed, as autograd reduces naive attention. One matmul over all G * rows would be a
    sequential float32 sum G times as long, whose rounding after a dominant term cost 5.7x
    naive's dk error (GQA 2:1 with dropout)."""
    per_head = torch.matmul(x.unflatten(2, (group, -1)).transpose(-1, -2),
                            y.unflatten(2, (group, -1)))
    return per_head.sum(dim=2)


def _accumulate_mask_grad(dmask: torch.Tensor, ds: torch.Tensor, start: int, stop: int,
                          keys: slice) -> None:
    """Add one chunk's dS, (B, H_q, rows, len(keys)), into dmask summed over the dims where
    the mask broadcasts (size 1): S = scale * q k^T + mask, so dmask = dS."""
    rows = slice(start, stop) if dmask.shape[2] != 1 else slice(0, 1)
    cols = keys if dmask.shape[3] != 1 else slice(0, 1)
    target = (dmask.shape[0], dmask.shape[1], rows.stop - rows.start, cols.stop - cols.start)
    dmask[:, :, rows, cols] += ds.sum_to_size(target)
