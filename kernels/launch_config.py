"""Launch configurations for the attention kernels: a table, not autotuning.

Autotuning would benchmark every candidate on the first call of each shape
(seconds per shape) and could pick different tiles from run to run. Instead a
table gives, per kernel and padded head dim, candidates ordered from fastest
to smallest. The first candidate that compiles within the device's shared
memory wins and is remembered; a candidate that overflows it (Triton raises
OutOfResources at launch) falls through to the next. The last candidate of
every list needs under 48 KiB of shared memory, so something always fits on
Ampere (164 KiB usable) and Hopper (227 KiB usable).

Under TRITON_INTERPRET=1 one small tile is used: the interpreter's cost is per
operation, and small tiles exercise more block boundaries in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
from triton.runtime.errors import OutOfResources


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch parameters of one kernel launch."""

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


INTERPRETER_CONFIG = LaunchConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)

# Forward and dQ: a program owns BLOCK_M query rows and streams over keys.
_QUERY_MAJOR = {
    16: [LaunchConfig(128, 64, 4, 3), LaunchConfig(64, 64, 4, 2)],
    32: [LaunchConfig(128, 64, 4, 3), LaunchConfig(64, 64, 4, 2)],
    64: [LaunchConfig(128, 64, 4, 3), LaunchConfig(64, 64, 4, 2), LaunchConfig(64, 32, 4, 1)],
    128: [LaunchConfig(128, 64, 8, 3), LaunchConfig(128, 32, 8, 2), LaunchConfig(64, 32, 4, 1)],
    256: [LaunchConfig(64, 64, 8, 2), LaunchConfig(64, 32, 8, 1), LaunchConfig(32, 16, 4, 1)],
}

# dK/dV: a program owns BLOCK_N key rows (two fp32 accumulators) and streams
# over queries, so the key tile is the large one.
_KEY_MAJOR = {
    16: [LaunchConfig(32, 128, 4, 3), LaunchConfig(32, 64, 4, 2)],
    32: [LaunchConfig(32, 128, 4, 3), LaunchConfig(32, 64, 4, 2)],
    64: [LaunchConfig(32, 128, 4, 3), LaunchConfig(32, 64, 4, 2), LaunchConfig(16, 32, 4, 1)],
    128: [LaunchConfig(32, 128, 8, 3), LaunchConfig(32, 64, 4, 2), LaunchConfig(16, 32, 4, 1)],
    256: [LaunchConfig(32, 64, 8, 2), LaunchConfig(16, 64, 8, 1), LaunchConfig(16, 16, 4, 1)],
}

_chosen: dict[tuple, LaunchConfig] = {}


def padded_head_dim(head_dim: int) -> int:
    """The tile width used for a head dim: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def launch(kernel, grid_fn, args: tuple, constexprs: dict, *, key_major: bool, block_d: int,
           element_size: int) -> None:
    """Launch `kernel` with the first table candidate that fits the device.

    `grid_fn(config)` returns the grid for a candidate. fp32 inputs take tiles
    half as tall, since each tile holds twice the bytes.
    """
    if triton.knobs.runtime.interpret:
        candidates = [INTERPRETER_CONFIG]
    else:
        table = _KEY_MAJOR if key_major else _QUERY_MAJOR
        candidates = [_shrink_for_fp32(c) if element_size > 2 else c for c in table[block_d]]
    cache_key = (kernel, key_major, block_d, element_size, tuple(sorted(constexprs.items())))
    if cache_key in _chosen:
        candidates = [_chosen[cache_key]]
    for index, config in enumerate(candidates):
        try:
            kernel[grid_fn(config)](
                *args,
                BLOCK_M=config.block_m,
                BLOCK_N=config.block_n,
                BLOCK_D=block_d,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
                **constexprs,
            )
        except OutOfResources:
            if index == len(candidates) - 1:
                raise
            continue
        _chosen[cache_key] = config
        return


def _shrink_for_fp32(config: LaunchConfig) -> LaunchConfig:
    return LaunchConfig(max(16, config.block_m // 2), max(16, config.block_n // 2),
                        config.num_warps, max(1, config.num_stages - 1))
