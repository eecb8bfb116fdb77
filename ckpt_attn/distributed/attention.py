"""context_parallel_attention: attention over a sequence sharded across ranks (ring
attention), two torch.library custom ops with registered autograd.

Forward: K and V travel once around the ring (ckpt_attn.distributed.ring), the next
block's transfer overlapping the current block's computation. Each block is one call
of ckpt_attn's attention op on the part the schedule makes visible
(ckpt_attn.distributed.schedule), and its partial output is merged into a float32
accumulator through the row statistics (row max and log2 row sum, the op's own).
The result is the op's contract on this rank's rows: O and the row statistics of
the softmax over every key of the full sequence.

Backward: one more pass. K and V travel again; each block's gradients come from the
op's backward given the final O and the global row statistics, so P is recomputed as
the full problem's softmax; dQ accumulates here in float32, dK and dV accumulate in a
float32 buffer that travels with its block and reaches its owner after one more hop.
Sums run in ring order, so a fixed world size gives bitwise the same gradients.

A rank never holds more than two K/V blocks (the current one and the one arriving),
nor anything of size S x S.

Being custom ops, a checkpoint policy sees the whole ring as one op: "full"
recomputes it (one more forward ring pass), "selective" keeps its (O, statistics).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.flop_counter import register_flop_formula

from .. import backends
from ..backends.chunked import compute_dtype
from ..ops import LOG2E, draw_dropout_seed, lse_from_stats, refuse_double_backward
from ..validation import (
    autocast_inputs,
    check_dropout,
    check_flag,
    check_qkv,
    check_transforms,
    resolve_scale,
)
from . import schedule
from .agreement import check_same_arguments
from .ring import Ring
from .sharding import check_divisible, check_layout, resolve_group

_LIB = "ckpt_attn"


def _group(group_name: str) -> dist.ProcessGroup:
    """The process group registered under group_name (the ops take groups by name)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _placement(dropout_p: float, seed, block: schedule.Block, total: int) -> tuple:
    """The op's (dropout_p, seed, dropout_origin) for one block of a total x total problem:
    the origin places the block in it, for dropout and for the backward (whose rows are
    then known to be part of longer rows)."""
    return dropout_p, seed if dropout_p > 0 else None, [*block.origin, total, total]


def _block_forward(q, k, v, block: schedule.Block, scale: float, placement: tuple,
                   backend: str):
    """(O, row statistics) of one block: the rows and keys the schedule names."""
    return torch.ops.ckpt_attn.attention_forward(
        q[:, :, block.rows], k[:, :, block.keys], v[:, :, block.keys], None, block.causal,
        scale, -1, -1, *placement, None, None, 0, 0, backend)


def _block_backward(do, dlse, q, k, v, o, stats, block: schedule.Block, scale: float,
                    placement: tuple, backend: str):
    """(dq, dk, dv) of one block, P recomputed from the global statistics `stats`."""
    rows, keys = block.rows, block.keys
    dq, dk, dv, _ = torch.ops.ckpt_attn.attention_backward(
        do[:, :, rows], None if dlse is None else dlse[:, :, rows], q[:, :, rows],
        k[:, :, keys], v[:, :, keys], o[:, :, rows], stats[:, :, rows], None, block.causal,
        scale, -1, -1, *placement, None, None, 0, 0, False, backend)
    return dq, dk, dv


def _merge(o_acc: torch.Tensor, stats_acc: torch.Tensor, o_part: torch.Tensor,
           stats_part: torch.Tensor) -> None:
    """Fold a block's (O, statistics) into the accumulators' rows, in place.

    Each side's log2 row sum of 2^scores is max + log2 sum; the merged one is their
    logaddexp2, and each O is weighted by its share of the total. Rows no key has
    reached yet (statistics -inf) take weight 0, never NaN.
    """
    total = stats_acc[..., 0] + stats_acc[..., 1]
    part = stats_part[..., 0] + stats_part[..., 1]
    merged = torch.logaddexp2(total, part)
    base = torch.where(torch.isneginf(merged), 0.0, merged)
    o_acc.mul_(torch.exp2(total - base)[..., None])
    o_acc.add_(o_part.to(o_acc.dtype) * torch.exp2(part - base)[..., None])
    row_max = torch.maximum(stats_acc[..., 0], stats_part[..., 0])
    stats_acc[..., 0] = row_max
    stats_acc[..., 1] = torch.where(torch.isneginf(row_max), float("-inf"), merged - row_max)


@torch.library.custom_op(f"{_LIB}::ring_attention_forward", mutates_args=())
def _ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  scale: float, dropout_p: float, seed: torch.Tensor | None, layout: str,
                  group_name: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    ring = Ring(_group(group_name))
    dtype = compute_dtype(q.dtype)
    o_acc = torch.zeros(q.shape, device=q.device, dtype=dtype)
    stats = torch.full((*q.shape[:3], 2), float("-inf"), device=q.device, dtype=dtype)
    kv = torch.stack([k, v])  # the block this rank holds: one contiguous message
    total = q.shape[2] * ring.world_size
    plan = schedule.steps(ring.rank, ring.world_size, q.shape[2], causal, layout)
    for step, (_, blocks) in enumerate(plan):
        arriving = ring.start(kv) if step + 1 < len(plan) else None
        for block in blocks:
            o_part, stats_part = _block_forward(q, kv[0], kv[1], block, scale,
                                                _placement(dropout_p, seed, block, total), backend)
            _merge(o_acc[:, :, block.rows], stats[:, :, block.rows], o_part, stats_part)
            del o_part, stats_part
        if arriving is not None:
            kv = arriving.wait()
    o = torch.empty_like(q)
    o.copy_(o_acc)
    return o, stats


@_ring_forward.register_fake
def _(q, k, v, causal, scale, dropout_p, seed, layout, group_name, backend):
    return torch.empty_like(q), q.new_empty((*q.shape[:3], 2), dtype=compute_dtype(q.dtype))


@torch.library.custom_op(f"{_LIB}::ring_attention_backward", mutates_args=())
def _ring_backward(do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, stats: torch.Tensor,
                   causal: bool, scale: float, dropout_p: float, seed: torch.Tensor | None,
                   layout: str, group_name: str, backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ring = Ring(_group(group_name))
    dtype = compute_dtype(q.dtype)
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq = torch.zeros(q.shape, device=q.device, dtype=dtype)
    kv = torch.stack([k, v])
    dkv = torch.zeros(kv.shape, device=kv.device, dtype=dtype)  # the held block's dK, dV
    returning = None  # the dK/dV buffer travelling to the next rank
    total = q.shape[2] * ring.world_size
    plan = schedule.steps(ring.rank, ring.world_size, q.shape[2], causal, layout)
    for step, (_, blocks) in enumerate(plan):
        arriving = ring.start(kv) if step + 1 < len(plan) else None
        grads = []
        for block in blocks:
            dq_part, dk_part, dv_part = _block_backward(
                do, dlse, q, kv[0], kv[1], o, stats, block, scale,
                _placement(dropout_p, seed, block, total), backend)
            dq[:, :, block.rows] += dq_part
            grads.append((block.keys, dk_part, dv_part))
        if returning is not None:  # the previous rank's sums for the block held now
            dkv = returning.wait()
        for keys, dk_part, dv_part in grads:
            dkv[0][:, :, keys] += dk_part
            dkv[1][:, :, keys] += dv_part
        del grads
        returning = ring.start(dkv)
        if arriving is not None:
            kv = arriving.wait()
    own = returning.wait()  # this rank's block, summed over every rank
    # copies: an op's outputs may not alias one another
    return dq.to(q.dtype), own[0].to(k.dtype, copy=True), own[1].to(v.dtype, copy=True)


@_ring_backward.register_fake
def _(do, dlse, q, k, v, o, stats, causal, scale, dropout_p, seed, layout, group_name,
      backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, dropout_p, seed, layout, group_name, backend = inputs
    o, stats = output
    # the dropout mask is regenerated from the seed and each pair's global index
    ctx.save_for_backward(q, k, v, o, stats, *([seed] if dropout_p > 0 else []))
    ctx.options = (causal, scale, dropout_p, layout, group_name, backend)
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dstats):
    q, k, v, o, stats, *seed = ctx.saved_tensors
    # the statistics reach the caller only through lse = (max + log2 sum) * ln 2
    dlse = None if dstats is None else dstats[..., 0] * LOG2E
    if do is None:
        do = torch.zeros_like(o)
    causal, scale, dropout_p, layout, group_name, backend = ctx.options
    dq, dk, dv = _ring_backward(do, dlse, q, k, v, o, stats, causal, scale, dropout_p,
                                seed[0] if seed else None, layout, group_name, backend)
    return dq, dk, dv, *([None] * 7)


_ring_forward.register_autograd(_backward, setup_context=_setup_context)
_refusal, _no_context = refuse_double_backward(
    "ckpt_attn.distributed.context_parallel_attention", "for second derivatives gather the "
    "sequence (unshard_sequence) and use torch.nn.functional.scaled_dot_product_attention")
_ring_backward.register_autograd(_refusal, setup_context=_no_context)


def _rank_pairs(q, causal, layout, group_name) -> int:
    group = _group(group_name)
    return schedule.rank_pairs(dist.get_rank(group), dist.get_world_size(group), q.shape[2],
                               causal, layout)


# FlopCounterMode formulas, ops.py's convention on the pairs this rank computes.
@register_flop_formula(torch.ops.ckpt_attn.ring_attention_forward, get_raw=True)
def _forward_flops(q, k, v, causal, scale, dropout_p, seed, layout, group_name, backend,
                   out_val=None) -> int:
    batch, heads, _, head_dim = q.shape
    return 2 * 2 * batch * heads * head_dim * _rank_pairs(q, causal, layout, group_name)


@register_flop_formula(torch.ops.ckpt_attn.ring_attention_backward, get_raw=True)
def _backward_flops(do, dlse, q, k, v, o, stats, causal, scale, dropout_p, seed, layout,
                    group_name, backend, out_val=None) -> int:
    batch, heads, _, head_dim = q.shape
    return 5 * 2 * batch * heads * head_dim * _rank_pairs(q, causal, layout, group_name)


def _shared_seed(device: torch.device, group: dist.ProcessGroup) -> torch.Tensor:
    """A dropout seed drawn as attention() draws it, the group's first rank's for all."""
    seed = draw_dropout_seed(device)
    dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
    return seed


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               group=None, causal: bool = False, scale: float | None = None,
                               dropout_p: float = 0.0, layout: str = "zigzag",
                               return_lse: bool = False, backend: str = "auto"):
    """Attention over a sequence sharded across the ranks of `group` (ring attention).

    Every rank of the group calls it with its own shards, as shard_sequence cuts
    them with the same layout. On this rank's positions the result equals
    ``attention(q_full, k_full, v_full, causal=causal, scale=scale)``, in O, lse and
    the gradients of q, k and v.

    Args:
        q: (B, H_q, S/P, D) this rank's queries.
        k, v: (B, H_kv, S/P, D) this rank's keys and values (H_q a multiple of H_kv).
        group: ProcessGroup, 1-D DeviceMesh, or None (the default group); P ranks.
        causal: query i sees keys j <= i, in global positions.
        scale: softmax scale, default 1/sqrt(D).
        dropout_p: attention dropout, as in ckpt_attn.attention: the seed is drawn
            from the default generator of the group's first rank and broadcast, and
            each pair drops exactly as in attention() on the full sequence after the
            same torch.manual_seed.
        layout: "zigzag" (balanced causal work) or "contiguous"; see
            ckpt_attn.distributed.sharding.
        return_lse: also return the float32 logsumexp over every key, (B, H_q, S/P).
        backend: "auto", "triton" or "torch", as in ckpt_attn.attention.

    Returns O, (B, H_q, S/P, D) in q's layout, or (O, lse). Under autocast q, k, v are
    cast as attention() casts them.

    Before its first transfer it checks, with one all_gather of a fingerprint, that every
    rank passed the same arguments (shapes, dtype, causal, scale, dropout_p, layout,
    return_lse, backend): a ValueError naming the argument on every rank otherwise (not
    checked while torch.compile traces). As attention(), it refuses torch.func's grad
    and jvp transforms and a double backward, naming what to use instead.
    """
    q, k, v, _ = autocast_inputs(q, k, v)
    check_qkv(q, k, v)
    check_transforms("ckpt_attn.distributed.context_parallel_attention", q, k, v)
    scale = resolve_scale(scale, q.shape[-1])
    causal = check_flag(causal, "causal")
    return_lse = check_flag(return_lse, "return_lse")
    dropout_p = check_dropout(dropout_p)
    check_layout(layout)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must hold the same shard length (self-attention over one "
                         f"sharded sequence), got {q.shape[2]} and {k.shape[2]}")
    pg = resolve_group(group)
    world_size = dist.get_world_size(pg)
    check_divisible(q.shape[2] * world_size, world_size, layout,
                    what=f"sequence ({q.shape[2]} tokens per rank)")
    resolved = backends.resolve_backend(backend, q)
    if not torch.compiler.is_compiling():
        check_same_arguments("context_parallel_attention", {
            "q.shape": q.shape, "k.shape": k.shape, "v.shape": v.shape, "dtype": q.dtype,
            "causal": causal, "scale": scale, "dropout_p": dropout_p, "layout": layout,
            "return_lse": return_lse, "backend": resolved}, pg, q.device)
    seed = _shared_seed(q.device, pg) if dropout_p > 0 else None
    o, stats = _ring_forward(q, k, v, causal, scale, dropout_p, seed, layout, pg.group_name,
                             resolved)
    return (o, lse_from_stats(stats)) if return_lse else o

