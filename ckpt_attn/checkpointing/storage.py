"""Storage modes: where and how a policy keeps what it saves.

- "device": as autograd saves it (no hooks).
- "cpu": every tensor autograd saves for the segment (its input when recomputed,
  every intermediate when not), parameters and buffers excepted, is copied to host
  memory, pinned and asynchronous on CUDA, and brought back in the backward.
  Tensors already on the CPU stay where they are.
- "int8" / "fp8": the hidden state a recomputed segment keeps (its input) is
  quantized per row (last dim) with an fp32 scale per row. int8: round(x / s),
  s = max|row| / 127, so each element is off by at most max|row| / 254. fp8
  (float8_e4m3fn, 3 mantissa bits): s = max|row| / 448, each element off by at most
  2^-4 of its own magnitude (plus s * 2^-9 near zero). The recomputation then
  starts from the dequantized input, so gradients carry that error. A row holding
  inf or NaN comes back as NaN.
"""

from __future__ import annotations

import contextlib

import torch

STORAGES = ("device", "cpu", "int8", "fp8")
_QUANTIZED = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}


def storage_key(t: torch.Tensor) -> int:
    """Identity of t's storage (shared by every view of it)."""
    return t.untyped_storage()._cdata


def saved_tensor_hooks(storage: str, excluded: set[int], hidden: torch.Tensor | None):
    """Context in which autograd saves tensors as `storage` says.

    excluded: storage keys never touched (parameters, buffers). hidden: the segment's
    input, the one tensor int8/fp8 quantize.
    """
    if storage == "device":
        return contextlib.nullcontext()
    if storage == "cpu":
        return torch.autograd.graph.saved_tensors_hooks(
            lambda t: t if storage_key(t) in excluded else _offload(t), _reload)
    # Only the key and shape: autograd keeps the pack hook alive as long as what it
    # packed, so holding `hidden` here would keep the tensor it replaces.
    hidden_key = None if hidden is None else storage_key(hidden)
    hidden_shape = None if hidden is None else hidden.shape

    def pack(t):
        if (t.is_floating_point() and t.dim() >= 1 and storage_key(t) == hidden_key
                and t.shape == hidden_shape):
            return quantize(t, storage)
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, _dequantize)


def quantize(x: torch.Tensor, storage: str) -> tuple:
    """(codes, per-row fp32 scales, dtype) for "int8" or "fp8"."""
    code_dtype, top = _QUANTIZED[storage]
    scale = x.detach().abs().amax(-1, keepdim=True).float().clamp(min=1e-30) / top
    codes = x.detach().float() / scale
    codes = codes.round().to(code_dtype) if storage == "int8" else codes.to(code_dtype)
    return codes, scale, x.dtype


def _dequantize(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    codes, scale, dtype = packed
    return (codes.float() * scale).to(dtype)


def _offload(t: torch.Tensor):
    if t.device.type in ("cpu", "meta"):  # nothing to move (meta: no data to copy)
        return t
    host = torch.empty_like(t, device="cpu", pin_memory=True)
    host.copy_(t, non_blocking=True)
    return t.device, host


def _reload(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    device, host = packed
    return host.to(device, non_blocking=True)
