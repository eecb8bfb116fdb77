"""Run PyTorch's own tests with ckpt_attn's MultiheadAttention in place of torch's.

    python tools/client_torch_mha.py PATH [PATH ...] [--reference] [-- PYTEST_ARGS]

PATH is a PyTorch test file or directory you have on disk (for example test/nn/
test_multihead_attention.py and test/test_transformers.py of a PyTorch checkout at the
installed version); this script fetches nothing. Before pytest imports the tests,
torch.nn.MultiheadAttention, torch.nn.modules.activation.MultiheadAttention and the name
inside torch.nn.modules.transformer (which nn.TransformerEncoderLayer and friends build
their attention from) are replaced by ckpt_attn.modules.MultiheadAttention, so every
``nn.MultiheadAttention(...)`` in a test and in torch's Transformer layers builds ours.
``--reference`` runs the same tests with torch's class, for the baseline.

It prints the outcome counts, the tests that failed, and how often the attention module ran
(forward calls of ours, or of torch's class with --reference) and, with the swap, how often
ckpt_attn's fused op and the need_weights path ran: the proof that the tests were routed
through the drop-in. ``--outcomes FILE`` also writes {test id: outcome} as JSON, so two runs
can be compared.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from ckpt_attn.modules import multihead

TORCH_MHA = nn.MultiheadAttention

# client_suite.py sits beside this script; PYTHONSAFEPATH (set by the Makefile) keeps
# Python from putting the script's folder on sys.path itself
sys.path.insert(0, str(Path(__file__).resolve().parent))
from client_suite import run_suite, split_pytest_arguments  # noqa: E402


class Counts:
    """Calls counted during the run: module forwards, fused op calls, weights-path calls."""

    def __init__(self):
        self.forward = 0
        self.fused = 0
        self.weights = 0


def install(counts: Counts, swap: bool) -> None:
    """Swap torch's MultiheadAttention for ours (if ``swap``) and count the calls."""
    counted_type = multihead.MultiheadAttention if swap else TORCH_MHA

    def count_forward(module, args, output):
        if type(module) is counted_type:
            counts.forward += 1

    torch.nn.modules.module.register_module_forward_hook(count_forward)
    if not swap:
        return
    for namespace in (torch.nn, torch.nn.modules.activation, torch.nn.modules.transformer):
        namespace.MultiheadAttention = multihead.MultiheadAttention
    fused, weights = multihead.attention, multihead._attention_with_weights

    def counted_fused(*args, **kwargs):
        counts.fused += 1
        return fused(*args, **kwargs)

    def counted_weights(*args, **kwargs):
        counts.weights += 1
        return weights(*args, **kwargs)

    multihead.attention = counted_fused
    multihead._attention_with_weights = counted_weights


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the tests, print the counts; returns pytest's exit code."""
    argv = sys.argv[1:] if argv is None else argv
    argv, extra = split_pytest_arguments(argv)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Arguments after -- go to pytest, for example -- -k 'MultiheadAttention'.")
    parser.add_argument("paths", nargs="+", help="PyTorch test files or directories")
    parser.add_argument("--reference", action="store_true",
                        help="run with torch's own MultiheadAttention (no swap)")
    parser.add_argument("--outcomes", help="write {test id: outcome} as JSON to this file")
    args = parser.parse_args(argv)

    counts = Counts()
    install(counts, swap=not args.reference)
    label = "torch.nn.MultiheadAttention" if args.reference else "ckpt_attn MultiheadAttention"
    code = run_suite(args.paths, extra, label, args.outcomes)
    print(f"forward calls of {label}: {counts.forward}")
    if not args.reference:
        print(f"fused op calls: {counts.fused}, need_weights path calls: {counts.weights}")
    return code


if __name__ == "__main__":
    sys.exit(main())
