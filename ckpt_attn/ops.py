"""ckpt_attn.attention: validate, pick a backend, run one custom op with registered autograd.

The forward op saves exactly q, k, v, O and the logsumexp for backward; the
backward op recomputes the attention probabilities from them. Both ops have
fake (meta) implementations, so shapes propagate on the meta device, under
FakeTensorMode and through torch.compile.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from . import backends
from .backends.chunked import compute_dtype
from .validation import check_dropout, check_qkv, check_window, expand_mask, resolve_scale

_LIB = "ckpt_attn"


@torch.library.custom_op(f"{_LIB}::attention_forward", mutates_args=())
def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None, causal: bool, scale: float, window_left: int,
                       window_right: int, dropout_p: float, seed: int,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return backends.forward(backend, q, k, v, causal, scale, mask, (window_left, window_right),
                            dropout_p, seed)


@_attention_forward.register_fake
def _(q, k, v, mask, causal, scale, window_left, window_right, dropout_p, seed, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=compute_dtype(q.dtype))


@torch.library.custom_op(f"{_LIB}::attention_backward", mutates_args=())
def _attention_backward(do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor,
                        k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                        mask: torch.Tensor | None, causal: bool, scale: float, window_left: int,
                        window_right: int, dropout_p: float, seed: int, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.backward(backend, do, dlse, q, k, v, o, lse, causal, scale, mask,
                             (window_left, window_right), dropout_p, seed)


@_attention_backward.register_fake
def _(do, dlse, q, k, v, o, lse, mask, causal, scale, window_left, window_right, dropout_p, seed,
      backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, causal, scale, window_left, window_right, dropout_p, seed, backend = inputs
    o, lse = output
    ctx.has_mask = mask is not None
    # the caller's mask (a broadcast view, never a copy) is needed to recompute P
    ctx.save_for_backward(q, k, v, o, lse, *((mask,) if ctx.has_mask else ()))
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.window = (window_left, window_right)
    # the dropout mask is regenerated from (seed, pair index), never stored
    ctx.dropout = (dropout_p, seed)
    # Unused outputs (usually lse) arrive as None instead of a tensor of zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, *mask = ctx.saved_tensors
    mask = mask[0] if ctx.has_mask else None
    if do is None:
        do = torch.zeros_like(o)
    elif do.stride(-1) != 1:
        # e.g. the expanded gradient of o.sum(): every stride 0
        do = do.contiguous()
    dq, dk, dv = _attention_backward(do, dlse, q, k, v, o, lse, mask, ctx.causal, ctx.scale,
                                     *ctx.window, *ctx.dropout, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool) -> int:
    """Number of (query, key) pairs attention computes: all, or j <= i when causal."""
    if not causal:
        return seqlen_q * seqlen_k
    diagonal = min(seqlen_q, seqlen_k)
    return diagonal * (diagonal + 1) // 2 + (seqlen_q - diagonal) * seqlen_k


# FlopCounterMode formulas (FlashAttention-2's convention, exact for causal):
# forward = 2 matmuls (QK^T, PV); backward = 5 (the recomputed QK^T, dV, dP, dQ, dK).
@register_flop_formula(torch.ops.ckpt_attn.attention_forward)
def _forward_flops(q_shape, k_shape, v_shape, mask_shape, causal, *args, out_shape=None,
                   **kwargs) -> int:
    batch, heads, seqlen_q, head_dim = q_shape
    return 2 * 2 * batch * heads * head_dim * visible_pairs(seqlen_q, k_shape[2], causal)


@register_flop_formula(torch.ops.ckpt_attn.attention_backward)
def _backward_flops(do_shape, dlse_shape, q_shape, k_shape, v_shape, o_shape, lse_shape,
                    mask_shape, causal, *args, out_shape=None, **kwargs) -> int:
    batch, heads, seqlen_q, head_dim = q_shape
    return 5 * 2 * batch * heads * head_dim * visible_pairs(seqlen_q, k_shape[2], causal)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
              causal: bool = False, *,
              scale: float | None = None, window: tuple[int, int] | None = None,
              return_lse: bool = False, backend: str = "auto"):
    """Fused scaled-dot-product attention that never stores an S_q x S_k matrix.

    Args:
        q: (B, H_q, S_q, D) queries.
        k: (B, H_kv, S_k, D) keys; H_q must be a multiple of H_kv (GQA/MQA).
        v: (B, H_kv, S_k, D) values.
        attn_mask: broadcastable to (B, H_q, S_q, S_k). Boolean: True = may attend
            (SDPA's convention); a (B, 1, 1, S_k) key-padding mask costs one row per
            tile. Float, in q's dtype: added to the scores (a bias). Read tile by
            tile, never copied or expanded; it must not require grad (yet).
        dropout_p: attention dropout probability in [0, 1), applied whenever > 0
            (as SDPA), kept entries scaled by 1/(1 - dropout_p). The seed is drawn
            from torch's default generator, so torch.manual_seed reproduces it; the
            backward regenerates the mask (Philox on each pair's index), never stores
            it, and both backends drop the same pairs.
        causal: query i attends to keys j <= i (SDPA's ``is_causal``, top-left aligned).
        scale: softmax scale, default 1/sqrt(D).
        window: (left, right) sliding window, query i sees keys i - left .. i + right,
            -1 meaning unbounded on that side; combines with causal. Key blocks
            outside the window are skipped, so the cost scales with the window.
        return_lse: also return the natural-log logsumexp, (B, H_q, S_q), float32
            (float64 for float64 inputs); it is differentiable.
        backend: "auto", "triton" or "torch" (see ckpt_attn.backends).

    Any strides with stride(-1) == 1 are accepted, so a (B, S, H, D) tensor can
    be passed as ``x.transpose(1, 2)`` without a copy; O has q's layout. D may be
    1..256; float16, bfloat16 and float32 are supported (float64 on the torch
    backend). Backward saves only q, k, v, O and lse.

    A query row with no visible key (masked out, or outside the window) gives
    O = 0, lse = -inf and zero gradients, never NaN.

    Returns:
        O of q's shape, or (O, lse) when return_lse is True.
    """
    check_qkv(q, k, v)
    scale = resolve_scale(scale, q.shape[-1])
    mask = expand_mask(attn_mask, q, k)
    window_left, window_right = check_window(window)
    dropout_p = check_dropout(dropout_p)
    seed = int(torch.randint(0, 2**31 - 1, ())) if dropout_p > 0 else 0
    resolved = backends.resolve_backend(backend, q)
    o, lse = _attention_forward(q, k, v, mask, bool(causal), scale, window_left, window_right,
                                dropout_p, seed, resolved)
    return (o, lse) if return_lse else o
