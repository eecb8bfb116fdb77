"""Benchmarks of ckpt_attn, installed as ckpt_attn.benchmarks.

`ckpt-attn bench [--quick] [--out DIR]` runs the attention benchmark (bench_attention) and
then the checkpoint policies' trade-off (bench_policies); each also runs alone as
`python -m ckpt_attn.benchmarks.bench_attention` or `.bench_policies`.
"""

import argparse
from pathlib import Path

DEFAULT_OUT = Path("ckpt-attn-results")
"""Where results go without --out: a folder of that name in the working directory (an
installed package has no results folder of its own; `make bench` passes
--out benchmarks/results, the committed ones)."""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --smoke, --out and --threads, the options every benchmark takes (apply_threads
    applies the last)."""
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest shapes and one round (on CUDA the attention "
                             "benchmark's --quick grid): checks in seconds that it runs and "
                             "writes its files; the figures mean nothing")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"results directory (default ./{DEFAULT_OUT})")
    parser.add_argument("--threads", type=_threads, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 gives "
                             "stable CPU ratios on a machine busy with other work")


def apply_threads(args: argparse.Namespace) -> None:
    """torch.set_num_threads(args.threads), unless it is None."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def _threads(text: str) -> int:
    threads = int(text)
    if threads < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {threads}")
    return threads
