"""Storage modes: where and how a policy keeps what it saves.

- "device": as autograd saves it (no hooks).
- "cpu": every tensor autograd saves for the segment (its input when recomputed,
  every intermediate when not), parameters and buffers excepted, is copied to host
  memory, pinned and asynchronous on CUDA, and brought back in the backward.
  Tensors already on the CPU stay where they are.
- "int8" / "fp8": the hidden state a recomputed segment keeps (its input) is
  quantized per row (last dim), keeping a code per element and the row's largest
  magnitude m = max|row| (float32; float64 for float64 inputs, whose range float32
  does not cover). int8: code round(x / m * 127), back as code / 127 * m, so each
  element is off by at most m / 254. fp8 (float8_e4m3fn, 3 mantissa bits): code
  x / m * 448 in float8, back as code / 448 * m, each element off by at most 2^-4 of
  its own magnitude (plus m / 448 * 2^-9 near zero). Both bounds hold for rows of any
  magnitude, subnormal ones included (x is divided by m itself, never by a scale
  that could underflow), up to the rounding of the result to x's dtype (at most one
  unit in the last place of m). A row of zeros comes back as zeros. The segment runs
  on the dequantized input, in its forward and in its recomputation alike, so its output
  carries that error and the gradients are exactly those of the output computed
  (eager and compiled agree). The gradient reaches the segment's input unchanged. A
  row holding inf or NaN comes back as NaN.

In eager mode the storages act through torch.autograd.graph.saved_tensors_hooks
(offload_hooks, stored_input_hooks). torch.compile does not trace those, so under it a recomputed
segment stores its input inside the graph instead: stored_form(x) outside the
checkpointed region (quantized, or copied to the host), restored(x, stored) inside
it, which hands the gradient to x without keeping x; the compiler's partitioner then
keeps the stored form in x's place.
"""

from __future__ import annotations

import torch

STORAGES = ("device", "cpu", "int8", "fp8")
_QUANTIZED = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}


def storage_key(t: torch.Tensor) -> int:
    """Identity of t's storage (shared by every view of it)."""
    return t.untyped_storage()._cdata


def offload_hooks(excluded: set[int]):
    """Context in which autograd keeps every tensor it saves in host memory ("cpu", eager
    mode), but those whose storage key is in excluded (parameters, buffers)."""
    return torch.autograd.graph.saved_tensors_hooks(
        lambda t: t if storage_key(t) in excluded else _offload(t), _reload)


def stored_input_hooks(x_hat: torch.Tensor, stored: tuple[torch.Tensor, ...]):
    """Context in which autograd keeps `stored` (stored_form()) in place of x_hat, the
    input a recomputed segment runs on (restored()), in eager mode."""
    # Only x_hat's key and shape: autograd keeps the pack hook alive as long as what it
    # packed, so holding x_hat here would keep the tensor it replaces.
    key, shape = storage_key(x_hat), x_hat.shape

    def pack(t):
        if storage_key(t) == key and t.shape == shape:
            return t.dtype, stored
        return t

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        dtype, kept = packed
        return _from_stored(kept, dtype, kept[0].device)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def quantize(x: torch.Tensor, storage: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, each row's max|row|) for "int8" or "fp8" (see the module docstring)."""
    code_dtype, top = _QUANTIZED[storage]
    values = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    row_max = values.abs().amax(-1, keepdim=True)
    # a row of zeros divides by 1 (its codes are 0); NaN and inf stay, to make NaN
    codes = values / torch.where(row_max == 0, 1, row_max) * top
    codes = codes.round().to(code_dtype) if storage == "int8" else codes.to(code_dtype)
    return codes, row_max


def stored_form(x: torch.Tensor, storage: str) -> tuple[torch.Tensor, ...]:
    """What a recomputed segment keeps of its input x: int8/fp8 codes and per-row
    scales, or a host copy ("cpu")."""
    if storage == "cpu":
        return (x.detach().to("cpu"),)
    return quantize(x, storage)


def restored(x: torch.Tensor, stored: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """x's values as stored_form kept them (x's dtype, on x's device), with x's
    gradient: the gradient of the result goes to x unchanged. x itself is not saved."""
    return _Restore.apply(x, *stored)


def _from_stored(stored: tuple[torch.Tensor, ...], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    if len(stored) == 1:  # a host copy
        return stored[0].to(device, non_blocking=True)
    codes, row_max = stored
    top = _QUANTIZED["int8" if codes.dtype == torch.int8 else "fp8"][1]
    # code / top is in [-1, 1]: times m, it neither overflows nor underflows early
    return codes.to(row_max.dtype).div_(top).mul_(row_max).to(dtype)


class _Restore(torch.autograd.Function):
    """restored(): the forward reads only the stored form, the backward passes the
    gradient through to x."""

    @staticmethod
    def forward(x, *stored):
        return _from_stored(stored, x.dtype, x.device)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.num_stored = len(inputs) - 1

    @staticmethod
    def backward(ctx, grad):
        return grad, *([None] * ctx.num_stored)


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
