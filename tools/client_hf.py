"""Run transformers' own model tests with every "sdpa" attention routed to ckpt_attn's op.

    python tools/client_hf.py PATH [PATH ...] [--reference] [--outcomes FILE]
                                   [-- PYTEST_ARGS]

PATH is a transformers test file or directory you have on disk (for example
tests/models/llama of a transformers checkout at the installed version, with the
tests/test_modeling_common.py and tests/causal_lm_tester.py it imports); this script
fetches nothing. Before pytest imports the tests, transformers' registry entries for
"sdpa" (the attention function in AttentionInterface and the mask function in
AttentionMaskInterface) are replaced by ckpt_attn's (ckpt_attn.integrations.transformers,
backend "torch" unless --backend says otherwise), so every model the tests build with
``attn_implementation="sdpa"``, the default, runs the op, with the name "sdpa" kept so the
tests' own checks of the name still hold. ``--reference`` runs the same tests with
transformers' own sdpa, for the baseline.

It prints the outcome counts, the tests that failed, and how often the attention function
ran and, with the swap, how often it called ckpt_attn's op (attention and
attention_varlen; under torch.compile a call is counted when it is traced): the proof that
the tests were routed through the op. ``--outcomes FILE`` also writes {test id: outcome}
as JSON, so two runs can be compared.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ckpt_attn import ops

# client_suite.py sits beside this script; PYTHONSAFEPATH (set by the Makefile) keeps
# Python from putting the script's folder on sys.path itself
sys.path.insert(0, str(Path(__file__).resolve().parent))
from client_suite import run_suite, split_pytest_arguments  # noqa: E402


class Counts:
    """Calls counted during the run: attention-function calls, op calls."""

    def __init__(self):
        self.attention = 0
        self.op = 0


def install(counts: Counts, swap: bool, backend: str) -> None:
    """Route "sdpa" to ckpt_attn's attention and mask functions (if ``swap``) and count."""
    from transformers import AttentionInterface, AttentionMaskInterface

    from ckpt_attn.integrations import transformers as hf

    if swap:
        name = hf.register(f"ckpt_attn_{backend}", backend=backend)
        function = AttentionInterface._global_mapping[name]
        masks = AttentionMaskInterface._global_mapping
        masks["sdpa"] = masks[name]
        for op in ("attention", "attention_varlen"):
            setattr(ops, op, _counted(getattr(ops, op), counts))
    else:
        function = AttentionInterface._global_mapping["sdpa"]

    def counted_attention(*args, **kwargs):
        counts.attention += 1
        return function(*args, **kwargs)

    AttentionInterface._global_mapping["sdpa"] = counted_attention


def _counted(op, counts: Counts):
    """op, counting its calls in counts.op."""

    def counted(*args, **kwargs):
        counts.op += 1
        return op(*args, **kwargs)

    return counted


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the tests, print the counts; returns pytest's exit code."""
    argv = sys.argv[1:] if argv is None else argv
    argv, extra = split_pytest_arguments(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="transformers test files or directories")
    parser.add_argument("--reference", action="store_true",
                        help="run with transformers' own sdpa (no swap)")
    parser.add_argument("--backend", default="torch", choices=("auto", "triton", "torch"),
                        help="ckpt_attn backend for the swap (default: torch)")
    parser.add_argument("--outcomes", help="write {test id: outcome} as JSON to this file")
    args = parser.parse_args(argv)

    # the tests must not reach the hub: what needs it skips or fails alike in both runs
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    counts = Counts()
    install(counts, swap=not args.reference, backend=args.backend)
    label = "transformers sdpa" if args.reference else "ckpt_attn as sdpa"
    code = run_suite(args.paths, extra, label, args.outcomes)
    print(f"attention-function calls: {counts.attention}")
    if not args.reference:
        print(f"ckpt_attn op calls: {counts.op}")
    return code


if __name__ == "__main__":
    sys.exit(main())
