"""Argument checks for the attention ops: every message names the argument, what was given
and what is accepted."""

from __future__ import annotations

import math

import torch

MAX_HEAD_DIM = 256
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Check q, k, v of shapes (B, H_q, S_q, D), (B, H_kv, S_k, D), (B, H_kv, S_k, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}"
            )
        if not t.dtype.is_floating_point:
            raise TypeError(
                f"{name} must be a floating-point tensor (float16, bfloat16, float32), "
                f"got {t.dtype}"
            )
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(
                f"{name} must have stride(-1) == 1 (head dim contiguous), got strides "
                f"{t.stride()}; call .contiguous() first"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"q, k, v dtype must be float16, bfloat16, float32 (or float64 on the torch "
            f"backend), got {q.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(
            f"q, k, v must share the batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}"
        )
    if k.shape[1:3] != v.shape[1:3]:
        raise ValueError(
            f"k and v must share (heads, seq), got {tuple(k.shape[1:3])} and {tuple(v.shape[1:3])}"
        )
    if not (q.shape[-1] == k.shape[-1] == v.shape[-1]):
        raise ValueError(
            f"q, k, v must share the head dim, got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}"
        )
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    heads_q, heads_kv = q.shape[1], k.shape[1]
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(
            f"q heads ({heads_q}) must be a multiple of k/v heads ({heads_kv}) for GQA/MQA"
        )


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale: `scale` if given (finite), else 1/sqrt(head_dim)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_mask(attn_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> None:
    """attn_mask must broadcast to (B, H_q, S_q, S_k) and be bool (True = may attend) or
    q's float dtype (added to the scores)."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got "
                        f"{type(attn_mask).__name__}")
    if attn_mask.dtype not in (torch.bool, q.dtype):
        raise TypeError(f"attn_mask must be bool or q's dtype ({q.dtype}), got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask must be on q's device ({q.device}), got {attn_mask.device}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask must have at most 4 dims, got shape {tuple(attn_mask.shape)}")
    try:
        broadcasts = torch.broadcast_shapes(attn_mask.shape, target) == target
    except RuntimeError:
        broadcasts = False
    if not broadcasts:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
            f"(batch, heads_q, seq_q, seq_k) = {target}"
        )


def check_window(window) -> tuple[int, int]:
    """(left, right) of a sliding window, -1 meaning unbounded; None is (-1, -1)."""
    if window is None:
        return (-1, -1)
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"window must be a pair of ints (left, right) or None, got {window!r}")
    if min(window) < -1:
        raise ValueError(f"window values must be >= -1 (-1 = unbounded), got {tuple(window)}")
    return (window[0], window[1])


def check_dropout(dropout_p) -> float:
    """dropout_p as a float in [0, 1)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def check_cu_seqlens(cu_seqlens, name: str, total: int, max_seqlen, max_name: str,
                     q: torch.Tensor) -> None:
    """Cumulative sequence lengths: int32, 1-D, on q's device, from 0, non-decreasing,
    ending at `total`, with no sequence longer than `max_seqlen`."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be 1-D with num_seqs + 1 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{name} must be on q's device ({q.device}), got {cu_seqlens.device}")
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if bounds[0] != 0 or any(n < 0 for n in lengths):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {bounds[:8]}...")
    if bounds[-1] != total:
        raise ValueError(f"{name}[-1] must equal the token count {total}, got {bounds[-1]}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{max_name} must be an int, got {type(max_seqlen).__name__}")
    if max_seqlen < max(lengths, default=0):
        raise ValueError(f"{max_name} ({max_seqlen}) is below the longest sequence in {name} "
                         f"({max(lengths)})")
