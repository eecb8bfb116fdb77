"""Attention backends and the choice between them.

- "triton": the fused kernels of ckpt_attn.kernels, on CUDA tensors, or on CPU
  tensors when TRITON_INTERPRET=1 (the real kernel code, interpreted).
- "torch": ckpt_attn.backends.chunked, the same contract in plain PyTorch.
- "auto": triton where it can run, torch otherwise (float64, and bfloat16 in
  the interpreter, go to torch).

Both backends take validated (B, H, S, D) inputs and return (o, stats) forward,
stats being the (B, H_q, S_q, 2) row statistics (row max, log2 of the row sum,
in the log2 domain) the backward recomputes P from, and (dq, dk, dv) backward.
Empty problems (a zero-sized dimension) never reach a backend: their results
are filled in here.

Layout contract (what the op's fake implementation promises, so that compiled
graphs can rely on it): O and dq are laid out as torch.empty_like(q) would be,
dk and dv as empty_like(k) and empty_like(v), a mask's gradient as
empty_like(mask), and the row statistics are contiguous. A result in another
layout is copied into that one here, whatever the backend did.

Meta and fake tensors (the meta device, FakeTensorMode, torch.compile's tracing)
never reach a backend, the op's fake implementation serves them, so any backend
may be named for them; the backend is checked again on the real tensors.
"""

from __future__ import annotations

import importlib.util

import torch
from torch._subclasses.fake_tensor import is_fake

from . import chunked

BACKENDS = ("auto", "triton", "torch")


@torch.compiler.assume_constant_result
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@torch.compiler.assume_constant_result
def _triton_interpreting() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """Turn a requested backend into "triton" or "torch" for tensors like q, or raise."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    has_triton = _triton_available()
    # Under torch.compile's tracing q is a fake tensor (and is_fake cannot be traced).
    shape_only = q.device.type == "meta" or torch.compiler.is_compiling() or is_fake(q)
    triton_runs = has_triton and (q.is_cuda or (q.device.type == "cpu" and _triton_interpreting()))
    # The interpreter's tl.dot computes garbage for bfloat16 (triton issue #11584).
    interpreted_bf16 = q.device.type == "cpu" and q.dtype == torch.bfloat16
    if backend == "auto":
        usable = triton_runs and q.dtype != torch.float64 and not interpreted_bf16
        return "triton" if usable else "torch"
    if backend == "triton":
        if not has_triton:
            raise ValueError("backend='triton' needs the triton package, which is not "
                             "installed: pip install 'ckpt-attn[triton]' (a CUDA build of "
                             "torch from PyPI brings it)")
        if not triton_runs and not shape_only:
            raise ValueError(
                f"backend='triton' runs on CUDA tensors, or on CPU tensors with "
                f"TRITON_INTERPRET=1 set before import; got tensors on {q.device}"
            )
        if q.dtype == torch.float64:
            raise TypeError("backend='triton' supports float16, bfloat16 and float32, "
                            "got float64; use backend='torch'")
        if interpreted_bf16:
            raise TypeError("backend='triton' cannot run bfloat16 in the Triton interpreter "
                            "(its tl.dot miscomputes bf16, triton issue #11584); use CUDA "
                            "or backend='torch'")
    return backend


def forward(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
            scale: float, mask: torch.Tensor | None, window: tuple[int, int], dropout_p: float,
            seed: torch.Tensor | None, packed: tuple | None,
            dropout_origin: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, stats) from the resolved backend; mask is None or broadcasts to (B, H_q, S_q, S_k);
    seed is the dropout seed, a one-element int64 tensor on q's device (None without
    dropout); packed is None or (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
    dropout_origin is None or (row_offset, col_offset, total_q, total_k)."""
    if q.numel() == 0 or k.shape[2] == 0:
        # No queries, or no keys to attend to: O = 0 and row statistics -inf.
        stats = torch.full((*q.shape[:3], 2), float("-inf"), device=q.device,
                           dtype=chunked.compute_dtype(q.dtype))
        return torch.zeros_like(q), stats
    resolve_backend(backend, q)
    mask = _as_4d(mask, q, k)
    if backend == "triton":
        o, stats = _kernels().attention_forward(q, k, v, causal, scale, mask, window, dropout_p,
                                                seed, packed, dropout_origin)
    else:
        o, stats = chunked.attention_forward(q, k, v, causal, scale, mask, window, dropout_p,
                                             _host_seed(seed), packed,
                                             dropout_origin=dropout_origin)
    return _laid_out_like(o, q), stats.contiguous()


def backward(backend: str, do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, stats: torch.Tensor, causal: bool,
             scale: float, mask: torch.Tensor | None, window: tuple[int, int],
             dropout_p: float, seed: torch.Tensor | None, packed: tuple | None, mask_grad: bool,
             dropout_origin: tuple | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dmask) from the resolved backend; dmask, the gradient of a float
    mask in the mask's own shape, is None unless mask_grad. The other arguments are the
    forward's (see forward)."""
    grad_shape = (1,) * (4 - mask.dim()) + tuple(mask.shape) if mask_grad else None
    if q.numel() == 0 or k.numel() == 0:
        dmask = torch.zeros_like(mask) if mask_grad else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dmask
    resolve_backend(backend, q)
    mask_4d = _as_4d(mask, q, k)
    if backend == "triton":
        dq, dk, dv, dmask = _kernels().attention_backward(
            do, dlse, q, k, v, o, stats, causal, scale, mask_4d, window, dropout_p, seed,
            packed, grad_shape, dropout_origin)
    else:
        dq, dk, dv, dmask = chunked.attention_backward(
            do, dlse, q, k, v, o, stats, causal, scale, mask_4d, window, dropout_p,
            _host_seed(seed), packed, grad_shape, dropout_origin=dropout_origin)
    if dmask is not None:
        dmask = _laid_out_like(dmask.view(mask.shape).to(mask.dtype), mask)
    return _laid_out_like(dq, q), _laid_out_like(dk, k), _laid_out_like(dv, v), dmask


def _host_seed(seed: torch.Tensor | None) -> int:
    """The torch backend's seed as a Python int (one device sync on CUDA), 0 if None."""
    return 0 if seed is None else int(seed)


def _laid_out_like(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """result in the layout torch.empty_like(like) has, which the op's fake implementation
    promises: returned as is when its strides already agree, copied otherwise."""
    expected = torch.empty_like(like, device="meta")  # strides only, nothing allocated
    if result.stride() == expected.stride():
        return result
    return torch.empty_like(like).copy_(result)


def _as_4d(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """A validated mask as a (B, H_q, S_q, S_k) view: stride 0 where it broadcasts, no copy."""
    if mask is None:
        return None
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return mask[(None,) * (4 - mask.dim())].expand(target)


def _kernels():
    from ckpt_attn import kernels

    return kernels
