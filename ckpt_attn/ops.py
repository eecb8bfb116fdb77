"""ckpt_attn.attention and attention_varlen: validate, pick a backend, run one custom op
with registered autograd.

The forward op saves exactly q, k, v, O and the row statistics for backward
(the row max and log2 of the row sum, fp32, (B, H_q, S_q, 2); the logsumexp
is their sum times ln 2), plus the caller's attn_mask, the dropout seed (one
int64) or the packed sequences' cumulative lengths, when given; the backward
op recomputes the attention probabilities, and the dropout mask, from them.
Both ops have fake (meta) implementations, so shapes propagate on the meta
device, under FakeTensorMode and through torch.compile; they promise the
layouts the backends keep (see ckpt_attn.backends): O and dq like
torch.empty_like(q), dk and dv like empty_like(k) and empty_like(v), a mask's
gradient like empty_like(mask), contiguous row statistics.

The ops (torch.ops.ckpt_attn.*), for callers that compose attention from blocks:

- ``dropout_seed(Tensor token) -> Tensor``: an int64 scalar on token's device,
  drawn from torch's default generator for that device (tagged
  nondeterministic_seeded); draw_dropout_seed(device) calls it with a fresh
  token, which keeps compilers from merging two draws into one.
- ``attention_forward(q, k, v, mask, causal, scale, window_left, window_right,
  dropout_p, seed, dropout_origin, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
  max_seqlen_k, backend) -> (O, stats)``: validated (B, H, S, D) inputs (the
  public functions validate; the ops check only the dropout arguments); `seed`
  is None or the one-element int64 tensor from draw_dropout_seed (required when
  dropout_p > 0); `dropout_origin` is None or [row_offset, col_offset,
  total_q, total_k]: the call computes the block at (row_offset, col_offset)
  of a total_q x total_k problem, and pair (i, j) of head b * H_q + h draws
  dropout at index ((b * H_q + h) * total_q + row_offset + i) * total_k +
  col_offset + j, so blocks drop exactly the pairs the whole problem would
  (None: the call is the whole problem; not with packed sequences); `backend`
  is "triton" or "torch" (resolved).
- ``attention_backward(do, dlse, q, k, v, o, stats, mask, causal, scale,
  window_left, window_right, dropout_p, seed, dropout_origin, cu_seqlens_q,
  cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask_grad, backend) -> (dq, dk,
  dv, dmask)``: `dlse` is None or the gradient of the logsumexp, (B, H_q,
  S_q); dmask is the float mask's gradient when mask_grad, else an empty
  tensor; the other arguments are the forward's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils.flop_counter import register_flop_formula

from . import backends
from .backends.chunked import compute_dtype
from .validation import (
    autocast_inputs,
    check_cu_seqlens,
    check_dropout,
    check_flag,
    check_mask,
    check_max_seqlen,
    check_qkv,
    check_transforms,
    check_window,
    resolve_scale,
)

_LIB = "ckpt_attn"
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@torch.library.custom_op(f"{_LIB}::dropout_seed", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def _dropout_seed(token: torch.Tensor) -> torch.Tensor:
    # An op of its own: opaque to the compilers (inductor replaces a traced torch.randint
    # by its own random stream), so compiled code draws the very seed eager draws, and
    # tagged nondeterministic_seeded, so a recomputation replays it with the saved RNG state.
    return torch.randint(0, 2**31 - 1, (), device=token.device)


@_dropout_seed.register_fake
def _(token):
    return torch.empty((), dtype=torch.int64, device=token.device)


def draw_dropout_seed(device: torch.device | str) -> torch.Tensor:
    """A dropout seed for the attention ops: an int64 scalar tensor on `device`, drawn from
    torch's default generator for that device (so torch.manual_seed reproduces it),
    with no host sync. Compiled code and exported programs draw it as eager does.

    The token passed to the op is a fresh empty tensor: AOT autograd's common-subexpression
    elimination merges calls of a custom op with equal arguments, random or not, but never
    two torch.empty, so two draws in one graph stay two."""
    return _dropout_seed(torch.empty(0, device=device))


@torch.library.custom_op(f"{_LIB}::attention_forward", mutates_args=())
def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None, causal: bool, scale: float, window_left: int,
                       window_right: int, dropout_p: float, seed: torch.Tensor | None,
                       dropout_origin: Sequence[int] | None,
                       cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                       max_seqlen_q: int, max_seqlen_k: int,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    check_dropout_state(dropout_p, seed, dropout_origin, q, k, cu_seqlens_q is not None)
    packed = _packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return backends.forward(backend, q, k, v, causal, scale, mask, (window_left, window_right),
                            dropout_p, seed, packed, _origin(dropout_origin))


@_attention_forward.register_fake
def _(q, k, v, mask, causal, scale, window_left, window_right, dropout_p, seed, dropout_origin,
      cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, backend):
    check_dropout_state(dropout_p, seed, dropout_origin, q, k, cu_seqlens_q is not None)
    return torch.empty_like(q), q.new_empty((*q.shape[:3], 2), dtype=compute_dtype(q.dtype))


@torch.library.custom_op(f"{_LIB}::attention_backward", mutates_args=())
def _attention_backward(do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor,
                        k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, stats: torch.Tensor,
                        mask: torch.Tensor | None, causal: bool, scale: float, window_left: int,
                        window_right: int, dropout_p: float, seed: torch.Tensor | None,
                        dropout_origin: Sequence[int] | None,
                        cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                        max_seqlen_q: int, max_seqlen_k: int, mask_grad: bool, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # The kernels read the row statistics and dlse as dense (B, H_q, S_q[, 2]) arrays and
    # dO by rows with stride(-1) == 1 (e.g. the expanded gradient of o.sum() has every
    # stride 0).
    stats = stats.contiguous()
    dlse = None if dlse is None else dlse.contiguous()
    if do.stride(-1) != 1:
        do = do.contiguous()
    check_dropout_state(dropout_p, seed, dropout_origin, q, k, cu_seqlens_q is not None)
    packed = _packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dq, dk, dv, dmask = backends.backward(backend, do, dlse, q, k, v, o, stats, causal, scale,
                                          mask, (window_left, window_right), dropout_p, seed,
                                          packed, mask_grad, _origin(dropout_origin))
    # an op returns tensors only: an empty one stands for "no mask gradient"
    return dq, dk, dv, q.new_empty(0) if dmask is None else dmask


@_attention_backward.register_fake
def _(do, dlse, q, k, v, o, stats, mask, causal, scale, window_left, window_right, dropout_p, seed,
      dropout_origin, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask_grad, backend):
    check_dropout_state(dropout_p, seed, dropout_origin, q, k, cu_seqlens_q is not None)
    dmask = torch.empty_like(mask) if mask_grad else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask


def check_dropout_state(dropout_p: float, seed: torch.Tensor | None,
                        dropout_origin: Sequence[int] | None, q: torch.Tensor, k: torch.Tensor,
                        packed: bool, origin_name: str = "dropout_origin") -> None:
    """Raise unless the dropout seed and origin fit the (B, H, S, D) q and k: with
    dropout_p > 0 the seed is a one-element integer tensor on q's device; the origin is
    None or four ints (row_offset, col_offset, total_q, total_k) with the call's
    S_q x S_k block inside the total_q x total_k problem, and no packed sequences."""
    if dropout_p > 0 and not (isinstance(seed, torch.Tensor) and seed.numel() == 1
                              and not seed.is_floating_point() and not seed.is_complex()
                              and seed.dtype != torch.bool and seed.device == q.device):
        given = (f"{seed.dtype} tensor of shape {tuple(seed.shape)} on {seed.device}"
                 if isinstance(seed, torch.Tensor) else repr(seed))
        raise ValueError(f"seed must be a one-element integer tensor on {q.device} (from "
                         f"ckpt_attn.ops.draw_dropout_seed) when dropout_p > 0, got {given}")
    if dropout_origin is None:
        return
    if (isinstance(dropout_origin, (str, bytes)) or not isinstance(dropout_origin, Sequence)
            or len(dropout_origin) != 4
            or any(isinstance(x, bool) or not isinstance(x, (int, torch.SymInt))
                   for x in dropout_origin)):
        raise TypeError(f"{origin_name} must be None or four ints (row_offset, col_offset, "
                        f"total_q, total_k), got {dropout_origin!r}")
    if packed:
        raise ValueError(f"{origin_name} is not supported with packed sequences (each "
                         f"sequence is its own dropout problem), got {dropout_origin!r}")
    row_offset, col_offset, total_q, total_k = dropout_origin
    if not (row_offset >= 0 and row_offset + q.shape[2] <= total_q
            and col_offset >= 0 and col_offset + k.shape[2] <= total_k):
        raise ValueError(f"{origin_name} (row_offset, col_offset, total_q, total_k) must place "
                         f"the {q.shape[2]} x {k.shape[2]} block inside the total_q x total_k "
                         f"problem, got {tuple(dropout_origin)}")


def _origin(dropout_origin: Sequence[int] | None) -> tuple | None:
    """The backends' dropout origin: a tuple, or None."""
    return None if dropout_origin is None else tuple(dropout_origin)


def _packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> tuple | None:
    """The backends' description of packed sequences, or None for a batch; the kernels
    index cu_seqlens with stride 1, so a strided one is copied (num_seqs + 1 ints)."""
    if cu_seqlens_q is None:
        return None
    return (cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q, max_seqlen_k)


def _setup_context(ctx, inputs, output):
    (q, k, v, mask, causal, scale, window_left, window_right, dropout_p, seed, dropout_origin,
     cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, backend) = inputs
    o, stats = output
    # Optional extras: the caller's mask itself (never a copy or an expansion), needed
    # to recompute P; the dropout seed (the mask is regenerated from it and each pair's
    # index, never stored); the packed sequences' cumulative lengths.
    extras = (mask, seed if dropout_p > 0 else None, cu_seqlens_q, cu_seqlens_k)
    ctx.extras_present = tuple(t is not None for t in extras)
    ctx.save_for_backward(q, k, v, o, stats, *(t for t in extras if t is not None))
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.window = (window_left, window_right)
    ctx.dropout_p, ctx.dropout_origin = dropout_p, dropout_origin
    # Unused outputs (usually the statistics) arrive as None instead of a tensor of zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dstats):
    q, k, v, o, stats, *saved = ctx.saved_tensors
    saved = iter(saved)
    mask, seed, cu_seqlens_q, cu_seqlens_k = (next(saved) if present else None
                                              for present in ctx.extras_present)
    # the statistics reach the caller only through lse = (max + log2 sum) * ln 2
    dlse = None if dstats is None else dstats[..., 0] * LOG2E
    if do is None:
        do = torch.zeros_like(o)
    mask_grad = mask is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = _attention_backward(
        do, dlse, q, k, v, o, stats, mask, ctx.causal, ctx.scale, *ctx.window, ctx.dropout_p,
        seed, ctx.dropout_origin, cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlens, mask_grad,
        ctx.backend)
    return dq, dk, dv, dmask if mask_grad else None, *([None] * 12)


_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def refuse_double_backward(op: str, instead: str):
    """(backward, setup_context) to register as the autograd of a backward op; the
    backward raises: the gradient of a gradient (create_graph=True, then
    a second backward) through `op` gets a RuntimeError naming it and what to use
    instead, not torch's message about a missing formula. A first backward with
    create_graph=True still works."""
    def backward(ctx, *grads):
        raise RuntimeError(f"{op} has no double backward: its gradient is a fused kernel "
                           f"(attention_backward) with no derivative of its own, so the "
                           f"gradient of a gradient taken with create_graph=True cannot go "
                           f"through it; {instead}")

    return backward, lambda ctx, inputs, output: None


_refusal, _no_context = refuse_double_backward(
    "ckpt_attn.attention", "for second derivatives use "
    "torch.nn.functional.scaled_dot_product_attention (its math backend has them)")
_attention_backward.register_autograd(_refusal, setup_context=_no_context)
_AUTOCAST_LIB = torch.library.Library(_LIB, "FRAGMENT")


def _run_without_autocast(op_name: str) -> None:
    """Autocast kernels for an op: run it with autocast off. attention() has already cast
    q, k, v as SDPA's autocast rule does (validation.autocast_inputs); inside, the backends
    pick their own compute dtypes, which autocast would otherwise lower (their float32
    matmuls run in bfloat16). Covers the backward op too, when backward runs in a region."""
    op = getattr(torch.ops.ckpt_attn, op_name).default
    for device_type in ("cpu", "cuda"):
        def kernel(_keyset, *args, device_type=device_type):
            with torch.autocast(device_type, enabled=False):
                return op(*args)
        _AUTOCAST_LIB.impl(op_name, kernel,
                           "Autocast" + torch._C._dispatch_key_for_device(device_type),
                           with_keyset=True)


_run_without_autocast("attention_forward")
_run_without_autocast("attention_backward")


def visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool,
                  window: tuple[int, int] = (-1, -1)) -> int:
    """Number of (query, key) pairs attention computes, given causal and the window: the
    pairs of query i < seqlen_q and key j < seqlen_k with j <= i (causal, top-left
    aligned), i - left <= j (left >= 0) and j <= i + right (right >= 0). Closed form,
    exact in Python ints."""
    left, right = window
    if seqlen_q <= 0 or seqlen_k <= 0:
        return 0
    if causal or right >= 0:
        pairs = _pairs_below(seqlen_q, seqlen_k, 0 if causal else right)
    else:
        pairs = seqlen_q * seqlen_k
    if left >= 0:  # less those left of the window
        pairs -= _pairs_below(seqlen_q, seqlen_k, -left - 1)
    return pairs


def _pairs_below(seqlen_q: int, seqlen_k: int, offset: int) -> int:
    """Number of pairs of query i < seqlen_q and key j < seqlen_k with j <= i + offset:
    row i holds min(max(i + offset + 1, 0), seqlen_k) of them."""
    return (_clamped_sum(offset + 1 + seqlen_q, seqlen_k)
            - _clamped_sum(offset + 1, seqlen_k))


def _clamped_sum(stop: int, bound: int) -> int:
    """The sum of min(max(x, 0), bound) over the integers x < stop."""
    stop = max(stop, 0)
    if stop <= bound + 1:
        return stop * (stop - 1) // 2
    return bound * (bound + 1) // 2 + (stop - bound - 1) * bound


def _pairs(q, k, causal, window, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> int:
    """Visible pairs per (batch, head): summed over packed sequences when there are any.

    Without readable lengths (meta or fake tensors) each sequence counts as the
    longest one, an upper bound."""
    if cu_seqlens_q is None:
        return visible_pairs(q.shape[2], k.shape[2], causal, window)
    if cu_seqlens_q.device.type == "meta" or is_fake(cu_seqlens_q):
        count = cu_seqlens_q.shape[0] - 1
        return count * visible_pairs(max_seqlen_q, max_seqlen_k, causal, window)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return sum(visible_pairs(bounds_q[s + 1] - bounds_q[s], bounds_k[s + 1] - bounds_k[s],
                             causal, window) for s in range(len(bounds_q) - 1))


# FlopCounterMode formulas (FlashAttention-2's convention, exact for causal, windows and
# packed sequences): forward = 2 matmuls (QK^T, PV); backward = 5 (the recomputed QK^T,
# dV, dP, dQ, dK).
@register_flop_formula(torch.ops.ckpt_attn.attention_forward, get_raw=True)
def _forward_flops(q, k, v, mask, causal, scale, window_left, window_right, dropout_p, seed,
                   dropout_origin, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, backend,
                   out_val=None) -> int:
    batch, heads, _, head_dim = q.shape
    pairs = _pairs(q, k, causal, (window_left, window_right), cu_seqlens_q, cu_seqlens_k,
                   max_seqlen_q, max_seqlen_k)
    return 2 * 2 * batch * heads * head_dim * pairs


@register_flop_formula(torch.ops.ckpt_attn.attention_backward, get_raw=True)
def _backward_flops(do, dlse, q, k, v, o, stats, mask, causal, scale, window_left, window_right,
                    dropout_p, seed, dropout_origin, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                    max_seqlen_k, mask_grad, backend, out_val=None) -> int:
    batch, heads, _, head_dim = q.shape
    pairs = _pairs(q, k, causal, (window_left, window_right), cu_seqlens_q, cu_seqlens_k,
                   max_seqlen_q, max_seqlen_k)
    return 5 * 2 * batch * heads * head_dim * pairs


def lse_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """The natural-log logsumexp, (B, H_q, S_q), from the op's row statistics (row max and
    log2 of the row sum, log2 domain); differentiable, -inf for rows with no visible key."""
    return (stats[..., 0] + stats[..., 1]) * LN2


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
              causal: bool = False, *,
              scale: float | None = None, window: tuple[int, int] | None = None,
              return_lse: bool = False, backend: str = "auto",
              _dropout_origin: tuple[int, int, int, int] | None = None):
    """Fused scaled-dot-product attention that never stores an S_q x S_k matrix.

    Args:
        q: (B, H_q, S_q, D) queries.
        k: (B, H_kv, S_k, D) keys; H_q must be a multiple of H_kv (GQA/MQA).
        v: (B, H_kv, S_k, D) values.
        attn_mask: broadcastable to (B, H_q, S_q, S_k). Boolean: True = may attend
            (SDPA's convention); a (B, 1, 1, S_k) key-padding mask costs one row per
            tile. Float, in q's dtype or float32 (as SDPA): added to the scores (a
            bias) unrounded. Read tile by tile, never copied or expanded. If a float
            mask requires grad, its gradient (dS, summed over its broadcast dims) is
            computed too.
        dropout_p: attention dropout probability in [0, 1), applied whenever > 0
            (as SDPA), kept entries scaled by 1/(1 - dropout_p). The seed is drawn
            from torch's default generator for q's device (an int64 tensor, drawn as
            eager draws it under torch.compile too), so torch.manual_seed reproduces
            it; the backward regenerates the mask (Philox on each pair's index), never
            stores it, and both backends drop the same pairs.
        causal: query i attends to keys j <= i (SDPA's ``is_causal``, top-left aligned).
        scale: softmax scale, default 1/sqrt(D).
        window: (left, right) sliding window, query i sees keys i - left .. i + right,
            -1 meaning unbounded on that side; combines with causal. Key blocks
            outside the window are skipped, so the cost scales with the window. A side
            of max(S_q, S_k) or more (sys.maxsize, say) sees as much as -1.
        return_lse: also return the natural-log logsumexp, (B, H_q, S_q), float32
            (float64 for float64 inputs); it is differentiable.
        backend: "auto", "triton" or "torch" (see ckpt_attn.backends).
        _dropout_origin: internal (context parallelism), not a stable API:
            (row_offset, col_offset, total_q, total_k) says this call computes the block
            at (row_offset, col_offset) of a total_q x total_k attention problem, so its
            dropout drops exactly the pairs the whole problem would (same seed: same
            torch.manual_seed state before the call). None: the call is the whole problem.

    Any strides with stride(-1) == 1 are accepted, so a (B, S, H, D) tensor can
    be passed as ``x.transpose(1, 2)`` without a copy; O has q's layout. D may be
    1..256; float16, bfloat16 and float32 are supported (float64 on the torch
    backend). Backward saves only q, k, v, O and two fp32 statistics per query row (the
    row max and log2 of the row sum: kept apart, a bias shared by all of a row's keys,
    even -1e9, still gives the softmax's exact gradient; lse is their sum).

    Under torch.autocast, q, k and v are cast to the autocast dtype, as for SDPA (float64
    excepted), and the backends run with autocast off.

    A query row with no visible key (masked out, or outside the window) gives
    O = 0, lse = -inf and zero gradients, never NaN.

    Returns:
        O of q's shape, or (O, lse) when return_lse is True.
    """
    q, k, v, attn_mask = autocast_inputs(q, k, v, attn_mask)
    check_qkv(q, k, v)
    check_transforms("ckpt_attn.attention", q, k, v, attn_mask)
    scale = resolve_scale(scale, q.shape[-1])
    check_mask(attn_mask, q, k)
    causal = check_flag(causal, "causal")
    return_lse = check_flag(return_lse, "return_lse")
    window_left, window_right = check_window(window, max(q.shape[2], k.shape[2]))
    dropout_p = check_dropout(dropout_p)
    check_dropout_state(0.0, None, _dropout_origin, q, k, False, "_dropout_origin")
    resolved = backends.resolve_backend(backend, q)
    seed = draw_dropout_seed(q.device) if dropout_p > 0 else None
    o, stats = _attention_forward(q, k, v, attn_mask, causal, scale, window_left,
                                  window_right, dropout_p, seed, _dropout_origin, None, None, 0, 0,
                                  resolved)
    return (o, lse_from_stats(stats)) if return_lse else o


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, *, causal: bool = False, scale: float | None = None,
                     dropout_p: float = 0.0, window: tuple[int, int] | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Attention over packed sequences of different lengths (flash-attention's varlen API).

    Args:
        q: (total_q, H_q, D) the queries of every sequence, one after the other.
        k, v: (total_k, H_kv, D).
        cu_seqlens_q, cu_seqlens_k: int32 (num_seqs + 1,) cumulative lengths starting
            at 0: sequence s owns rows cu_seqlens_q[s]:cu_seqlens_q[s+1] of q and
            cu_seqlens_k[s]:cu_seqlens_k[s+1] of k and v.
        max_seqlen_q, max_seqlen_k: the longest sequence on each side; checked to be at
            most that side's token count and, where cu_seqlens can be read (not on the
            meta device or under FakeTensorMode), at least its longest sequence.
        causal, scale, dropout_p, window: as in attention(), within each sequence.

    No query attends across a sequence boundary and no padding is computed. With
    dropout, sequence s draws from the stream seed + s.

    Returns:
        O, (total_q, H_q, D), in q's layout.
    """
    q, k, v, _ = autocast_inputs(q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be 3-D (total_tokens, heads, head_dim), got {shape}")
    # (total, H, D) -> (1, H, total, D) views: the batched kernels' layout, no copy
    q4, k4, v4 = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))
    check_qkv(q4, k4, v4)
    check_transforms("ckpt_attn.attention_varlen", q, k, v)
    max_seqlen_q = check_max_seqlen(max_seqlen_q, "max_seqlen_q", q.shape[0])
    max_seqlen_k = check_max_seqlen(max_seqlen_k, "max_seqlen_k", k.shape[0])
    check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q", q)
    check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k", q)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe as many sequences, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()} entries")
    scale = resolve_scale(scale, q.shape[-1])
    causal = check_flag(causal, "causal")
    # no sequence is longer than its side's token total
    window_left, window_right = check_window(window, max(q.shape[0], k.shape[0]))
    dropout_p = check_dropout(dropout_p)
    resolved = backends.resolve_backend(backend, q4)
    seed = draw_dropout_seed(q.device) if dropout_p > 0 else None
    o, _ = _attention_forward(q4, k4, v4, None, causal, scale, window_left, window_right,
                              dropout_p, seed, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, resolved)
    return o[0].transpose(0, 1)
