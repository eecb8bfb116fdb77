"""Launch configurations for the attention kernels: tables, not autotuning.

Autotuning would benchmark every candidate on the first call of each shape
(seconds per shape) and could pick different tiles from run to run. Instead a
table gives, per architecture, kernel and padded head dim, candidates ordered
from fastest to smallest. The first candidate that compiles within the
device's shared memory wins and is remembered; a candidate that overflows it
(Triton raises OutOfResources at launch) falls through to the next. The last
candidate of every list needs under 48 KiB of shared memory, so something
always fits on Ampere (164 KiB usable) and Hopper (227 KiB usable).

The Hopper (sm_90) first choices are the ones ptxas compiles without spills
and without serialized wgmma (benchmarks/codegen.py reads its report;
benchmarks/results/sm90_codegen.md has the figures, tests/test_codegen.py
keeps them so). `make tune` measures the candidates on the GPU at hand and
writes the fastest per kernel and head dim to kernels/tuned/sm_<arch>.json,
which goes first when present.

Under TRITON_INTERPRET=1 one small tile is used: the interpreter's cost is per
operation, and small tiles exercise more block boundaries in the tests.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.runtime.errors import OutOfResources

TUNED_DIR = Path(__file__).resolve().parent / "tuned"
KERNELS = ("fwd", "dq", "dkdv")


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch parameters of one kernel launch."""

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


INTERPRETER_CONFIG = LaunchConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)
C = LaunchConfig

# Forward and dQ: a program owns BLOCK_M query rows and streams over keys.
# dK/dV: a program owns BLOCK_N key rows (two fp32 accumulators) and streams
# over queries, so the key tile is the large one.
_AMPERE = {
    "fwd": {
        16: [C(128, 64, 4, 3), C(64, 64, 4, 2)],
        32: [C(128, 64, 4, 3), C(64, 64, 4, 2)],
        64: [C(128, 64, 4, 3), C(64, 64, 4, 2), C(64, 32, 4, 1)],
        128: [C(128, 64, 8, 3), C(128, 32, 8, 2), C(64, 32, 4, 1)],
        256: [C(64, 64, 8, 2), C(64, 32, 8, 1), C(32, 16, 4, 1)],
    },
    "dq": {
        16: [C(128, 64, 4, 3), C(64, 64, 4, 2)],
        32: [C(64, 64, 4, 3), C(64, 64, 4, 2)],
        64: [C(64, 64, 4, 3), C(64, 64, 4, 2), C(64, 32, 4, 1)],
        128: [C(64, 64, 4, 3), C(128, 32, 8, 2), C(64, 32, 4, 1)],
        256: [C(64, 64, 8, 2), C(64, 32, 8, 1), C(32, 16, 4, 1)],
    },
    "dkdv": {
        16: [C(32, 128, 4, 3), C(32, 64, 4, 2)],
        32: [C(32, 128, 4, 3), C(32, 64, 4, 2)],
        64: [C(32, 128, 8, 3), C(32, 64, 4, 2), C(16, 32, 4, 1)],
        128: [C(16, 128, 8, 2), C(32, 64, 4, 2), C(16, 32, 4, 1)],
        256: [C(32, 64, 8, 2), C(16, 64, 8, 1), C(16, 16, 4, 1)],
    },
}

# Hopper: Ampere's table but where sm_90a's ptxas report (spills, wgmma) chose otherwise.
_HOPPER_CHOICES = {
    "fwd": {128: [C(128, 128, 8, 2), C(128, 64, 8, 3), C(64, 32, 4, 1)]},
    "dq": {
        32: [C(128, 64, 4, 3), C(64, 64, 4, 2)],
        64: [C(128, 64, 8, 3), C(64, 64, 4, 3), C(64, 32, 4, 1)],
        128: [C(128, 64, 8, 2), C(128, 32, 8, 2), C(64, 32, 4, 1)],
        256: [C(64, 32, 8, 2), C(64, 32, 8, 1), C(32, 16, 4, 1)],
    },
    "dkdv": {32: [C(32, 128, 8, 3), C(32, 64, 4, 2)]},
}
_HOPPER = {kernel: {**per_dim, **_HOPPER_CHOICES[kernel]} for kernel, per_dim in _AMPERE.items()}

_chosen: dict[tuple, LaunchConfig] = {}


def padded_head_dim(head_dim: int) -> int:
    """The tile width used for a head dim: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def current_arch() -> int:
    """Compute capability of the current device as Triton sees it (90 on H100/H200)."""
    return triton.runtime.driver.active.get_current_target().arch


@functools.cache
def tuned_table(arch: int) -> dict[str, dict[int, LaunchConfig]]:
    """The measured best per kernel and head dim that `make tune` wrote for `arch`, if any."""
    path = TUNED_DIR / f"sm_{arch}.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {kernel: {int(d): LaunchConfig(*config) for d, config in per_dim.items()}
            for kernel, per_dim in data["best"].items()}


def candidates(kernel: str, arch: int, block_d: int, element_size: int,
               masked: bool = False) -> list[LaunchConfig]:
    """The configurations `launch` tries, in order, for one kernel on one architecture.

    fp32 inputs take tiles half as tall, since each tile holds twice the bytes.
    A measured best (kernels/tuned/) for 2-byte inputs goes first. `masked`
    kernels (an attn_mask, a window or dropout: more live values per score)
    skip tiles above 128 x 64, which spill there (sm90_codegen.md).
    """
    table = _HOPPER if arch >= 90 else _AMPERE
    listed = list(table[kernel][block_d])
    if masked:
        listed = [c for c in listed if c.block_m * c.block_n <= 128 * 64]
    tuned = tuned_table(arch).get(kernel, {}).get(block_d)
    if tuned is not None and element_size == 2:
        listed = [tuned] + [c for c in listed if c != tuned]
    if element_size > 2:
        listed = [_shrink_for_fp32(c) for c in listed]
    return listed


def launch(kernel_fn, grid_fn, args: tuple, constexprs: dict, *, kernel: str, block_d: int,
           element_size: int) -> None:
    """Launch `kernel_fn` (the table entry `kernel`) with the first candidate that fits.

    `grid_fn(config)` returns the grid for a candidate.
    """
    if triton.knobs.runtime.interpret:
        arch, configs = 0, [INTERPRETER_CONFIG]
    else:
        arch = current_arch()
        masked = bool(constexprs.get("MASK_KIND") or constexprs.get("HAS_WINDOW")
                      or constexprs.get("DROPOUT"))
        configs = candidates(kernel, arch, block_d, element_size, masked)
    cache_key = (kernel, arch, block_d, element_size, tuple(sorted(constexprs.items())))
    if cache_key in _chosen:
        configs = [_chosen[cache_key]]
    for index, config in enumerate(configs):
        try:
            kernel_fn[grid_fn(config)](
                *args,
                BLOCK_M=config.block_m,
                BLOCK_N=config.block_n,
                BLOCK_D=block_d,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
                **constexprs,
            )
        except OutOfResources:
            if index == len(configs) - 1:
                raise
            continue
        _chosen[cache_key] = config
        return


def _shrink_for_fp32(config: LaunchConfig) -> LaunchConfig:
    return LaunchConfig(max(16, config.block_m // 2), max(16, config.block_n // 2),
                        config.num_warps, max(1, config.num_stages - 1))
