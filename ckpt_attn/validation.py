"""Argument checks for the attention ops, and the dtypes they compute in under autocast:
every message names the argument, what was given and what is accepted."""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake

MAX_HEAD_DIM = 256
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Check q, k, v of shapes (B, H_q, S_q, D), (B, H_kv, S_k, D), (B, H_kv, S_k, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _check_strided(t, name)
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
    try:
        finite = math.isfinite(scale)
    except OverflowError:  # an int beyond float's range
        finite = False
    if not finite:
        raise ValueError(f"scale must be finite, got {_shown(scale)}")
    return float(scale)


def autocast_inputs(q, k, v, attn_mask=None) -> tuple:
    """q, k, v and attn_mask as the op takes them inside an autocast region, by SDPA's rule.

    scaled_dot_product_attention is on autocast's lower-precision list: in a region
    enabled for q's device type, its floating-point tensors other than float64 are cast to
    the region's dtype (torch.get_autocast_dtype). q, k and v are cast so; a float mask is
    cast only when the op would refuse it (float16 under bfloat16 autocast, say): a float32
    mask is accepted with any q (see check_mask) and added to the float32 scores unrounded,
    and the op keeps the caller's tensor for backward instead of a copy. Outside autocast,
    or for anything that is not a tensor (left for the checks to refuse), the arguments come
    back unchanged.
    """
    if not isinstance(q, torch.Tensor):
        return q, k, v, attn_mask
    device_type = q.device.type
    if not torch.amp.is_autocast_available(device_type) or \
            not torch.is_autocast_enabled(device_type):
        return q, k, v, attn_mask
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        eligible = (isinstance(t, torch.Tensor) and t.is_floating_point()
                    and t.device.type == device_type and t.dtype != torch.float64)
        return t.to(dtype) if eligible else t

    q, k, v = cast(q), cast(k), cast(v)
    if isinstance(attn_mask, torch.Tensor) and attn_mask.dtype not in _mask_dtypes(q.dtype):
        attn_mask = cast(attn_mask)
    return q, k, v, attn_mask


def check_mask(attn_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> None:
    """attn_mask must broadcast to (B, H_q, S_q, S_k) and be bool (True = may attend), or
    float32 or q's dtype (added to the scores, computed in float32 or float64), the
    dtypes SDPA accepts."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got "
                        f"{type(attn_mask).__name__}")
    _check_strided(attn_mask, "attn_mask")
    if attn_mask.dtype not in _mask_dtypes(q.dtype):
        raise TypeError(f"attn_mask must be bool, float32 or q's dtype ({q.dtype}), got "
                        f"{attn_mask.dtype}")
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


def _mask_dtypes(q_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The attn_mask dtypes SDPA accepts with queries of q_dtype: bool, float32, q's own."""
    return (torch.bool, torch.float32, q_dtype)


def check_window(window, bound: int) -> tuple[int, int]:
    """(left, right) of a sliding window, -1 meaning unbounded; None is (-1, -1).

    `bound` is the longest distance a window can span: max(S_q, S_k), or for packed
    sequences the larger token total. A side of `bound` or more already reaches every key,
    so it is clamped to `bound`: the same pairs, and no kernel index arithmetic
    (row + window) can overflow, whatever the caller passed (sys.maxsize, 2**64).
    """
    if window is None:
        return (-1, -1)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a pair of ints (left, right) or None, got "
                        f"{_shown(window)}")
    for side, value in zip(("left", "right"), window, strict=True):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"window must be a pair of ints (left, right) or None; its {side} "
                            f"side is {_type_name(value)} {_shown(value)}")
        if value < -1:
            raise ValueError(f"window values must be >= -1 (-1 = unbounded), got {side} = "
                             f"{_shown(value)}")
    left, right = window
    return (min(left, bound) if left >= 0 else -1, min(right, bound) if right >= 0 else -1)


def check_dropout(dropout_p) -> float:
    """dropout_p as a float in [0, 1)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def check_flag(value, name: str) -> bool:
    """A bool argument (causal, return_lse): a tensor or another truthy stand-in is refused,
    its truth value may be ambiguous or need a device sync."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_type_name(value)}")
    return value


def check_max_seqlen(max_seqlen, name: str, total: int) -> int:
    """max_seqlen_q or max_seqlen_k: an int in [0, total], total being the token count on its
    side. It sizes the kernels' launch grid, so a value far above any sequence would launch
    (and run) programs that have no work; this bound needs no read of cu_seqlens."""
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{name} must be an int, got {_type_name(max_seqlen)}")
    if not 0 <= max_seqlen <= total:
        raise ValueError(f"{name} must be in [0, {total}] (the token count on its side), got "
                         f"{_shown(max_seqlen)}")
    return max_seqlen


def check_cu_seqlens(cu_seqlens, name: str, total: int, max_seqlen: int, max_name: str,
                     q: torch.Tensor) -> None:
    """Cumulative sequence lengths: int32, 1-D, on q's device, from 0, non-decreasing,
    ending at `total`, with no sequence longer than `max_seqlen`.

    Any strides are accepted (the op passes a contiguous copy to the kernels). The values
    are read (on CUDA, one device sync) wherever they exist; on the meta device and under
    FakeTensorMode they do not, and only dtype, shape and device are checked.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    _check_strided(cu_seqlens, name)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be 1-D with num_seqs + 1 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{name} must be on q's device ({q.device}), got {cu_seqlens.device}")
    # under torch.compile's tracing the values are fake (and is_fake cannot be traced)
    if cu_seqlens.device.type == "meta" or torch.compiler.is_compiling() or is_fake(cu_seqlens):
        return
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if bounds[0] != 0 or any(n < 0 for n in lengths):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {bounds[:8]}...")
    if bounds[-1] != total:
        raise ValueError(f"{name}[-1] must equal the token count {total}, got {bounds[-1]}")
    if max_seqlen < max(lengths, default=0):
        raise ValueError(f"{max_name} ({max_seqlen}) is below the longest sequence in {name} "
                         f"({max(lengths)})")


def _check_strided(t: torch.Tensor, name: str) -> None:
    """Sparse and nested tensors have no strides for the kernels to read: refused."""
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def _type_name(value) -> str:
    """The name of value's type, with its module unless built in: numpy.bool is no bool."""
    kind = type(value)
    if kind.__module__ == "builtins":
        return kind.__name__
    return f"{kind.__module__}.{kind.__qualname__}"


def _shown(value) -> str:
    """repr(value), cut short: an error message quoting a 400-digit int stays readable."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


_TRANSFORMS_REFUSED = (torch._C._functorch.TransformType.Grad,
                       torch._C._functorch.TransformType.Jvp)


def check_transforms(op: str, *tensors: torch.Tensor | None) -> None:
    """Refuse torch.func's grad and jvp transforms (grad, vjp, jacrev, jacfwd, hessian,
    jvp) and forward-mode AD around the op named `op`: its gradient is a torch.library
    custom op's registered autograd, which those transforms cannot run (torch.func.grad
    fails inside torch, jvp and dual tensors would get zero tangents). vmap is left to
    run (torch's per-example fallback). Not checked while torch.compile traces."""
    if torch.compiler.is_compiling():
        return
    stack = torch._C._functorch.get_interpreter_stack() or ()
    transform = next((i.key() for i in stack if i.key() in _TRANSFORMS_REFUSED), None)
    dual = torch.autograd.forward_ad._current_level >= 0 and any(
        t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None
        for t in tensors)
    if transform is not None or dual:
        how = f"torch.func's {transform.name.lower()} transform" if transform is not None \
            else "forward-mode AD (a dual tensor input)"
        raise RuntimeError(
            f"{op} does not support {how}: its backward is a custom op's registered autograd, "
            f"which torch.func.grad, vjp, jacrev, jacfwd, hessian and jvp cannot differentiate "
            f"(jvp would give zero tangents). For gradients use torch.autograd.grad or "
            f".backward() (torch.func.vmap works); where you need these transforms use "
            f"torch.nn.functional.scaled_dot_product_attention")
