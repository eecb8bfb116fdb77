"""Test setup: without CUDA the Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before triton decorates the kernels, so it is
set here, before any test module imports ckpt_attn.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter):
    """Print the largest error ratios against the accuracy rule (see tests/reference.py)."""
    from reference import OBSERVED_RATIOS

    if OBSERVED_RATIOS:
        terminalreporter.section("largest error / naive-PyTorch-error ratios")
        for what, ratio in sorted(OBSERVED_RATIOS.items()):
            terminalreporter.write_line(f"{what:<40s} {ratio:6.3f}")
