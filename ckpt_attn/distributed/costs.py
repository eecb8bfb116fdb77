"""What the ring adds to one context-parallel attention call, exactly: the buffers it
holds while it runs and the bytes each rank sends.

Per rank: B batch, H_q and H_kv heads, L = S/P local tokens, D head dim, b bytes per
element of the inputs, c bytes of the compute dtype (4; 8 for float64 inputs).
A K/V block is 2 B H_kv L D b bytes (k and v stacked into one message).

Held during the forward (besides the op's own outputs O and statistics): the block
computed on, the block arriving, and the float32 output accumulator (B H_q L D c).
Held during the backward (besides dq, dk, dv): the two K/V blocks, the float32 dQ
accumulator (B H_q L D c) and two float32 dK/dV buffers (the held block's and the
one travelling), 2 B H_kv L D c each. Both exclude one block's own op outputs and
temporaries, which a single-device call has too. Nothing is kept between forward and
backward beyond what the op saves (q, k, v, O, statistics), so a rank keeps exactly
1/P of a single device's activations.

Sent per rank: the forward passes K/V P - 1 hops; the backward passes K/V P - 1 hops
and the float32 dK/dV P hops (the last one home to its owner).
"""

from __future__ import annotations

import dataclasses

import torch

from ..backends.chunked import compute_dtype


@dataclasses.dataclass(frozen=True)
class RingBytes:
    """Bytes of one attention call on one rank, forward and backward."""

    forward: int
    backward: int

    @property
    def total(self) -> int:
        """forward + backward."""
        return self.forward + self.backward


def _sizes(batch: int, heads: int, kv_heads: int, local_len: int, head_dim: int,
           dtype: torch.dtype) -> tuple[int, int, int]:
    """(K/V block bytes, float32 dK/dV block bytes, float32 O-sized accumulator bytes)."""
    for name, value in (("batch", batch), ("heads", heads), ("kv_heads", kv_heads),
                        ("local_len", local_len), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    wide = compute_dtype(dtype).itemsize
    kv_elements = 2 * batch * kv_heads * local_len * head_dim
    return (kv_elements * dtype.itemsize, kv_elements * wide,
            batch * heads * local_len * head_dim * wide)


def ring_buffer_bytes(batch: int, heads: int, kv_heads: int, local_len: int, head_dim: int,
                      dtype: torch.dtype, world_size: int) -> RingBytes:
    """The most bytes the ring's own buffers hold at once on a rank (see the module
    docstring); a ring of one rank receives nothing, so it holds one block of each."""
    kv, dkv, accumulator = _sizes(batch, heads, kv_heads, local_len, head_dim, dtype)
    blocks = 2 if world_size > 1 else 1
    return RingBytes(forward=blocks * kv + accumulator,
                     backward=blocks * (kv + dkv) + accumulator)


def ring_bytes_sent(batch: int, heads: int, kv_heads: int, local_len: int, head_dim: int,
                    dtype: torch.dtype, world_size: int) -> RingBytes:
    """Bytes each rank sends in one attention call (see the module docstring)."""
    kv, dkv, _ = _sizes(batch, heads, kv_heads, local_len, head_dim, dtype)
    hops = world_size - 1
    return RingBytes(forward=hops * kv, backward=hops * kv + (world_size * dkv if hops else 0))
