"""Triton's tl.rand in plain PyTorch: Philox 4x32-10, bit for bit.

The kernels draw attention-dropout decisions with tl.rand(seed, offset); the
torch backend draws the very same numbers here, so both backends drop the same
(query, key) pairs for a given seed, and the backward regenerates the mask
instead of storing it.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_ROUNDS = 10
_INT32_TO_UNIT = 4.6566127342e-10  # tl.random.uint_to_uniform_float's scale


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for 32-bit unsigned values held in int64 (no overflow)."""
    upper = a * (b >> 16)  # < 2**48
    lower = a * (b & 0xFFFF)  # < 2**48
    carry = ((upper & 0xFFFF) << 16) + lower  # < 2**49
    return (upper >> 16) + (carry >> 32), carry & _MASK32


def uniform(seed: int, offset: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1) equal to Triton's tl.rand(seed, offset) for int64 offsets."""
    c0, c1 = offset & _MASK32, (offset >> 32) & _MASK32
    c2 = torch.zeros_like(offset)
    c3 = torch.zeros_like(offset)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * _INT32_TO_UNIT
