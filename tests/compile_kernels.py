"""Compile every attention kernel for Ampere (sm_80) and Hopper (sm_90) without a GPU.

Run as a script (never under TRITON_INTERPRET): for each kernel, head-dim
bucket and dtype it compiles the launch table's first candidate with Triton's
real compiler (ptxas included) and prints one JSON line per compile with the
shared memory the kernel needs and the limit of that architecture. The test
tests/test_kernel_compile.py runs it in a subprocess.

    python tests/compile_kernels.py [--block-d 64 128 256] [--arch 80 90] [--mask-kind 1]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from ckpt_attn.kernels import backward, forward, launch_config  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# Usable shared memory per block (opt-in maximum), bytes.
SHARED_LIMIT = {80: 166912, 90: 232448}
FP32_POINTERS = {"LSE", "DELTA", "DLSE", "DBIAS"}
INT32_POINTERS = {"CU_Q", "CU_K"}
FP32_SCALARS = {"sm_scale", "dropout_p"}

KERNELS = {
    "forward": (forward._attn_fwd, False),
    "dkdv": (backward._attn_bwd_dkdv, True),
    "dq": (backward._attn_bwd_dq, False),
}


def signature(kernel, dtype: str, constexprs: dict) -> dict:
    """Triton signature of `kernel`: tensors by name (a boolean MASK as u8), sm_scale fp32,
    other scalars i32."""
    sig = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.isupper():
            if name in FP32_POINTERS:
                sig[name] = "*fp32"
            elif name in INT32_POINTERS:
                sig[name] = "*i32"
            elif name == "MASK" and constexprs["MASK_KIND"] == 1:
                sig[name] = "*u8"
            else:
                sig[name] = f"*{dtype}"
        elif name in FP32_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(name: str, block_d: int, dtype: str, arch: int, mask_kind: int = 0) -> dict:
    """Compile one kernel with its first table candidate; return its resource use.

    mask_kind 0 compiles the plain causal kernel; 1 (bool) and 2 (float) add an
    attn_mask tile, a sliding window, dropout and packed sequences, and the dQ
    kernel's two mask-gradient paths (1: one summed row per query block, 2: full
    dS tiles), to compile the code each takes.
    """
    kernel, key_major = KERNELS[name]
    table = launch_config._KEY_MAJOR if key_major else launch_config._QUERY_MAJOR
    config = table[block_d][0]
    element_size = 4 if dtype == "fp32" else 2
    if element_size > 2:
        config = launch_config._shrink_for_fp32(config)
    extras = mask_kind != 0
    values = dict(CAUSAL=True, MASK_KIND=mask_kind, MASK_ROW=False, HAS_WINDOW=extras,
                  DROPOUT=extras, VARLEN=extras, BIAS_GRAD=(0, 2, 1)[mask_kind],
                  HEAD_DIM=block_d, INPUT_PRECISION="ieee",
                  BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d)
    constexprs = {p.name: values[p.name] for p in kernel.params if p.is_constexpr}
    src = ASTSource(fn=kernel, signature=signature(kernel, dtype, constexprs),
                    constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps,
                                       "num_stages": config.num_stages})
    return {"kernel": name, "block_d": block_d, "dtype": dtype, "arch": arch,
            "mask_kind": mask_kind,
            "config": [config.block_m, config.block_n, config.num_warps, config.num_stages],
            "shared": compiled.metadata.shared, "limit": SHARED_LIMIT[arch]}


def main() -> None:
    """Compile the requested grid and print one JSON line per kernel."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-d", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=["fp16", "fp32"])
    parser.add_argument("--mask-kind", type=int, choices=(0, 1, 2), default=0)
    args = parser.parse_args()
    for arch in args.arch:
        for dtype in args.dtype:
            for block_d in args.block_d:
                for name in KERNELS:
                    row = compile_one(name, block_d, dtype, arch, args.mask_kind)
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
