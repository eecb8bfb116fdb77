"""What ptxas makes of the attention kernels, compiled exactly as a launch specializes them.

No GPU is needed. The project's own launch wrappers (kernels/forward.py and
kernels/backward.py) are called on CPU tensors of the benchmark's shape while a
stand-in driver reports a CUDA target and Triton's `jit_cache_hook` captures
each launch just before it would compile: the signature, the specialization
(16-byte divisibility of pointers and integers, integers equal to 1 folded to
constants), the constexprs and the launch table's first candidate. Each
captured launch is then compiled with Triton's real compiler for that target,
and ptxas's verbose report (`-v`, the same command Triton runs) is read back:
registers, spill bytes, shared memory, whether wgmma is emitted, and any
C75xx "Potential Performance Loss" (serialized wgmma) warning.

    python -m ckpt_attn.benchmarks.codegen [--arch 90 80] [--head-dim 64 128] [--out DIR]

writes DIR/sm90_codegen.md (and prints it). Import-time note: the kernels must
be decorated without TRITON_INTERPRET, so run this in a process of its own
(tests/test_codegen.py does).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ckpt_attn.kernels import backward, forward  # noqa: E402

from . import DEFAULT_OUT  # noqa: E402

# The launch shape: B=2, H=8, S=4096, contiguous.
BATCH, HEADS, SEQLEN = 2, 8, 4096
# Usable shared memory per block (opt-in maximum), bytes.
SHARED_LIMIT = {80: 166912, 90: 232448}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HOT_KERNELS = ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")


@dataclass(frozen=True)
class Case:
    """One launch of the op: which pass, head dim, dtype, causal, target architecture."""

    head_dim: int
    dtype: str
    causal: bool
    arch: int
    mask: str | None = None  # None, "bool" or "float" (an attn_mask tile; float: its gradient)
    extras: bool = False  # a sliding window, dropout and packed sequences on top


@dataclass
class Report:
    """ptxas's account of one compiled kernel."""

    kernel: str
    case: Case
    config: tuple[int, int, int, int]  # BLOCK_M, BLOCK_N, num_warps, num_stages
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    wgmma: bool
    serialization: list[str] = field(default_factory=list)  # C75xx codes

    @property
    def clean(self) -> bool:
        """No spills and no serialized wgmma."""
        return not (self.spill_stores or self.spill_loads or self.serialization)


class _CompileOnlyDriver:
    """Just enough of a Triton driver for the JIT to specialize a launch without a GPU."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)  # the last field is the warp size

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@dataclass
class _Captured:
    fn: object
    signature: dict
    constants: dict
    attrs: dict
    num_warps: int
    num_stages: int
    enable_fp_fusion: bool


@contextlib.contextmanager
def _capture_launches(arch: int):
    """Within the block, Triton launches are captured (and skipped) instead of compiled."""
    captured: list[_Captured] = []

    def hook(*, fn, compile, **_):
        captured.append(_Captured(fn.jit_function, compile["signature"], compile["constants"],
                                  compile["configs"][0], compile["num_warps"],
                                  compile["num_stages"], compile["enable_fp_fusion"]))
        return True  # skip the compile and the launch

    drivers = triton.runtime.driver
    previous_hook, previous_driver = knobs.runtime.jit_cache_hook, drivers._active
    drivers.set_active(_CompileOnlyDriver(arch))
    knobs.runtime.jit_cache_hook = hook
    try:
        yield captured
    finally:
        knobs.runtime.jit_cache_hook = previous_hook
        drivers._active = previous_driver  # reset_active() would look for a real GPU


def _launches(case: Case) -> list[_Captured]:
    """The forward and backward launches of `case`, as the wrappers specialize them."""
    dtype = DTYPES[case.dtype]
    batch, seqlen, packed = BATCH, SEQLEN, None
    if case.extras:  # the batch packed into one sequence axis, as attention_varlen does
        cu = torch.arange(0, BATCH * SEQLEN + 1, SEQLEN, dtype=torch.int32)
        batch, seqlen, packed = 1, BATCH * SEQLEN, (cu, cu, SEQLEN, SEQLEN)
    q = torch.empty(batch, HEADS, seqlen, case.head_dim, dtype=dtype)
    k, v, o = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)
    lse = torch.empty(batch, HEADS, seqlen)
    mask = mask_grad_shape = None
    if case.mask is not None:
        mask_dtype = torch.bool if case.mask == "bool" else dtype
        mask = torch.empty(batch, 1, seqlen, seqlen, dtype=mask_dtype).expand(
            batch, HEADS, seqlen, seqlen)
        mask_grad_shape = (batch, 1, seqlen, seqlen) if case.mask == "float" else None
    options = dict(mask=mask, packed=packed)
    if case.extras:
        options.update(window=(256, 0), dropout_p=0.1, seed=torch.ones((), dtype=torch.int64))
    scale = case.head_dim**-0.5
    with _capture_launches(case.arch) as captured:
        forward.attention_forward(q, k, v, case.causal, scale, **options)
        backward.attention_backward(torch.empty_like(o), None, q, k, v, o, lse, case.causal,
                                    scale, mask_grad_shape=mask_grad_shape, **options)
    return captured


_CODE = re.compile(r"\((C75\d\d)\)")


def _ptxas_report(captured: _Captured, arch: int) -> tuple[object, str]:
    """Compile one captured launch (fresh cache, so ptxas runs) and return (kernel, ptxas log)."""
    source = ASTSource(captured.fn, captured.signature, captured.constants, captured.attrs)
    options = {"num_warps": captured.num_warps, "num_stages": captured.num_stages,
               "enable_fp_fusion": captured.enable_fp_fusion}
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log):
        previous = knobs.cache.dir, knobs.nvidia.dump_ptxas_log
        knobs.cache.dir, knobs.nvidia.dump_ptxas_log = cache, True
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        finally:
            knobs.cache.dir, knobs.nvidia.dump_ptxas_log = previous
    return compiled, log.getvalue()


def _number(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    return int(found.group(1)) if found else 0


def compile_case(case: Case, kernels: tuple[str, ...] = HOT_KERNELS) -> list[Report]:
    """Reports for the named kernels of one case, in launch order."""
    reports = []
    for captured in _launches(case):
        name = captured.fn.__name__
        if name not in kernels:
            continue
        compiled, log = _ptxas_report(captured, case.arch)
        block_m = captured.constants.get((captured.fn.arg_names.index("BLOCK_M"),), 0)
        block_n = captured.constants.get((captured.fn.arg_names.index("BLOCK_N"),), 0)
        reports.append(Report(
            kernel=name, case=case,
            config=(block_m, block_n, captured.num_warps, captured.num_stages),
            registers=_number(r"Used (\d+) registers", log),
            spill_stores=_number(r"(\d+) bytes spill stores", log),
            spill_loads=_number(r"(\d+) bytes spill loads", log),
            shared=compiled.metadata.shared,
            wgmma="wgmma.mma_async" in compiled.asm["ptx"],
            serialization=sorted(set(_CODE.findall(log))),
        ))
    return reports


def default_cases(archs, head_dims, dtypes, mask=None, extras=False) -> list[Case]:
    """Every head-dim bucket, causal and not, per dtype; fp32 only on sm_80 (on Hopper the
    kernels' fp32 path is TF32 or IEEE mma, not wgmma)."""
    return [Case(head_dim, dtype, causal, arch, mask, extras)
            for arch in archs for dtype in dtypes if not (dtype == "fp32" and arch >= 90)
            for head_dim in head_dims for causal in (False, True)]


def as_json(report: Report) -> str:
    """One report as a JSON line (what tests/test_codegen.py reads)."""
    return json.dumps({**dataclasses.asdict(report), "clean": report.clean,
                       "limit": SHARED_LIMIT[report.case.arch]})


def markdown(reports: list[Report]) -> str:
    """One table row per kernel compile."""
    lines = [
        "| arch | kernel | D | dtype | causal | BLOCK_M, BLOCK_N, warps, stages | registers "
        "| spill st/ld (B) | shared (KiB) | wgmma | serialized |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        c = r.case
        arch = f"sm_{c.arch}{'a' if c.arch >= 90 else ''}"
        lines.append(
            f"| {arch} | {r.kernel} | {c.head_dim} | {c.dtype} | {c.causal} "
            f"| {', '.join(map(str, r.config))} | {r.registers} "
            f"| {r.spill_stores}/{r.spill_loads} | {r.shared / 1024:.0f} "
            f"| {'yes' if r.wgmma else 'no'} | {', '.join(r.serialization) or 'no'} |")
    return "\n".join(lines)


def main() -> None:
    """Compile the grid; write sm90_codegen.md, or print JSON lines with --json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--head-dim", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"])
    parser.add_argument("--mask", choices=("bool", "float"), default=None,
                        help="add an attn_mask tile (float: and its gradient)")
    parser.add_argument("--extras", action="store_true",
                        help="add a sliding window, dropout and packed sequences")
    parser.add_argument("--json", action="store_true", help="print JSON lines, write nothing")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    reports = []
    for case in default_cases(args.arch, args.head_dim, args.dtype, args.mask, args.extras):
        for report in compile_case(case):
            reports.append(report)
            print(as_json(report) if args.json else markdown([report]).splitlines()[-1],
                  flush=True)
    if not args.json:
        args.out.mkdir(parents=True, exist_ok=True)
        header = (f"# ptxas report, Triton {triton.__version__}, B={BATCH} H={HEADS} S={SEQLEN} "
                  "(make codegen regenerates this file)\n\n")
        (args.out / "sm90_codegen.md").write_text(header + markdown(reports) + "\n")


if __name__ == "__main__":
    main()
