"""The kernels compile with Triton's real compiler for Ampere and Hopper, within shared memory.

No GPU is needed: tests/compile_kernels.py compiles for a GPUTarget in a
subprocess without TRITON_INTERPRET. This covers what the interpreter cannot:
the compiler's type checks, bfloat16, and the launch table's shared-memory use.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_kernels.py")


@pytest.mark.parametrize(
    "block_d, dtype, archs, mask_kind",
    [
        (256, "bf16", ["80", "90"], 0),  # the largest tiles, in the dtype the interpreter can't run
        (64, "fp32", ["80"], 0),
        (128, "bf16", ["90"], 1),  # boolean mask tile + sliding window
        (64, "fp16", ["80"], 2),  # additive float mask + sliding window
    ],
)
def test_kernels_compile_within_shared_memory(block_d, dtype, archs, mask_kind):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--block-d", str(block_d), "--dtype", dtype,
         "--arch", *archs, "--mask-kind", str(mask_kind)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 3 * len(archs)
    for row in rows:
        assert 0 < row["shared"] <= row["limit"], row
