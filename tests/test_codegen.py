"""What ptxas makes of the kernels, compiled exactly as a launch specializes them, on no GPU.

ckpt_attn.benchmarks.codegen (benchmarks/codegen.py) runs the launch wrappers on CPU
tensors of a real shape (B=2, H=8, S=4096), captures each launch's specialization and
first table candidate, compiles it with Triton's compiler for the target and reads
ptxas's verbose report. It runs in a subprocess: the kernels must be
decorated without TRITON_INTERPRET, which this test process sets.

- The hot kernels (forward, dK/dV, dQ; D = 64 and 128; causal and not; bf16)
  compile on sm_90a with wgmma, no spills and no serialized wgmma (ptxas
  C75xx warnings).
- Every kernel, in the other configurations the old compile check covered
  (the largest tiles, fp32 on sm_80, masks with a window, dropout and packed
  sequences), compiles within the architecture's shared memory.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def codegen(*args: str) -> list[dict]:
    """Reports of `python -m ckpt_attn.benchmarks.codegen --json ARGS`, one per compiled kernel."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-m", "ckpt_attn.benchmarks.codegen", "--json", *args],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def describe(report: dict) -> str:
    case = report["case"]
    return (f"{report['kernel']} D={case['head_dim']} causal={case['causal']} "
            f"config={report['config']}: {report['registers']} registers, spills "
            f"{report['spill_stores']}/{report['spill_loads']} B, "
            f"serialization {report['serialization']}")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_hot_kernels_are_clean_on_hopper(head_dim):
    reports = codegen("--arch", "90", "--dtype", "bf16", "--head-dim", str(head_dim))
    assert len(reports) == 2 * 3  # causal and not, three kernels each
    for report in reports:
        assert report["wgmma"], describe(report)
        assert report["clean"], describe(report)
        assert report["shared"] <= report["limit"], describe(report)


@pytest.mark.parametrize("args", [
    ("--arch", "80", "90", "--dtype", "bf16", "--head-dim", "256"),
    ("--arch", "80", "--dtype", "fp32", "--head-dim", "64"),
    ("--arch", "90", "--dtype", "bf16", "--head-dim", "128", "--mask", "bool", "--extras"),
    ("--arch", "80", "--dtype", "fp16", "--head-dim", "64", "--mask", "float", "--extras"),
], ids=["largest-tiles", "fp32-sm80", "bool-mask-extras", "float-mask-extras"])
def test_kernels_compile_within_shared_memory(args):
    reports = codegen(*args)
    kernels = {report["kernel"] for report in reports}
    assert kernels == {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"}
    for report in reports:
        assert 0 < report["shared"] <= report["limit"], describe(report)
