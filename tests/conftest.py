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
