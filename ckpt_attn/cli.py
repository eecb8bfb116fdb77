"""The ckpt-attn command line: activation-memory estimates, budget plans, benchmarks.

    ckpt-attn estimate --preset llama-7b --seq 4096 [--json] [--plot pareto.png]
    ckpt-attn estimate --preset llama-3-8b --seq 131072 --context-parallel 8  (per rank)
    ckpt-attn plan --preset llama-7b --seq 4096 --budget 40GiB
    ckpt-attn bench [--quick | --smoke] [--out DIR] [--threads N] [--no-hf] [--only NAME]

Also ``python -m ckpt_attn``. Bad input exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import torch

from .benchmarks import add_common_arguments
from .checkpointing import POLICIES as CHECKPOINT_POLICIES
from .memory import estimate, layer_terms, plan
from .memory.report import GIB, gib
from .modules.config import MLPS, NORMS, TransformerConfig

PROG = "ckpt-attn"
BENCH_HELP = ("Benchmark the attention op against torch's SDPA (time, saved bytes, FLOPs), "
              "then the checkpoint policies' trade-off of memory against recompute and step "
              "time, on CUDA if present, else on the CPU. Results go to --out.")

PRESETS = {
    "gpt2": dict(num_layers=12, hidden_size=768, num_heads=12, ffn_hidden_size=3072,
                 mlp="gelu", norm="layernorm", bias=True, max_seq_len=1024),
    "llama-7b": dict(num_layers=32, hidden_size=4096, num_heads=32, ffn_hidden_size=11008,
                     mlp="swiglu", norm="rmsnorm"),
    "llama-3-8b": dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                       ffn_hidden_size=14336, rope_theta=500000.0, max_seq_len=8192),
    "llama-70b": dict(num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8,
                      ffn_hidden_size=28672, rope_theta=500000.0, max_seq_len=8192),
}
"""Common model shapes, as TransformerConfig arguments."""

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

POLICIES = [(name, policy.compare) for name, policy in CHECKPOINT_POLICIES.items()
            if policy.compare is not None]
"""The policies `estimate` compares, with their options (Policy.compare)."""

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

# command-line flag of each TransformerConfig field (and estimate/plan argument)
FLAGS = {"num_layers": "--layers", "hidden_size": "--hidden", "num_heads": "--heads",
         "num_kv_heads": "--kv-heads", "ffn_hidden_size": "--ffn", "mlp": "--mlp",
         "norm": "--norm", "dropout": "--dropout", "batch": "--batch", "seq": "--seq",
         "max_seq_len": "--seq", "budget_bytes": "--budget",
         "context_parallel": "--context-parallel"}
# the config fields the model flags set, by argparse destination
MODEL_FLAGS = {"layers": "num_layers", "hidden": "hidden_size", "heads": "num_heads",
               "kv_heads": "num_kv_heads", "ffn": "ffn_hidden_size", "mlp": "mlp",
               "norm": "norm", "dropout": "dropout"}
PLOT_BUDGETS = 10  # evenly spaced budgets the --plot frontier sweeps
MAX_LAYERS = 512
"""The most layers the CLI models: plan (its time grows as L^2 log L) answers in seconds."""
MAX_BYTES = 2**60
"""The largest budget, weights or activations (bytes) the CLI models, 1 EiB: beyond any
memory, and within torch's int64 tensor sizes, so every estimate is exact."""
NEGATIVE = re.compile(r"-\.?\d")  # a negative number, perhaps with a unit: -5GiB, -.5, -1e3


class UsageError(Exception):
    """Bad command-line input: main prints it as one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageErrors (one line, no usage block)."""

    def error(self, message):
        raise UsageError(message)


def parse_bytes(text: str) -> int:
    """Bytes from "123456" or a number and a unit ("40GiB", "1.5 gb"): B, KB, MB, GB, TB
    (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), any case. Fractions of a byte
    are dropped; ValueError unless the result is at least one byte (a negative number
    reads, and is not)."""
    match = re.fullmatch(r"\s*(-?(?:\d+(?:\.\d*)?|\.\d+))\s*([a-z]*)\s*", text,
                         re.IGNORECASE)
    if not match or match.group(2).lower() not in UNITS | {"": 1}:
        raise ValueError(f"cannot read {text!r} as bytes: expected a number, optionally with "
                         f"a unit B, KB, MB, GB, TB, KiB, MiB, GiB or TiB (e.g. 40GiB)")
    number, unit = match.groups()
    nbytes = int(Decimal(number) * UNITS.get(unit.lower(), 1))
    if nbytes < 1:
        raise ValueError(f"{text!r} is less than one byte")
    return nbytes


def _budget(text: str) -> int:
    try:
        nbytes = parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if nbytes > MAX_BYTES:
        raise argparse.ArgumentTypeError(f"{text!r} is more than 2**60 bytes (1 EiB)")
    return nbytes


def _flags(message: str) -> str:
    """A library error message with config field names replaced by their flags."""
    return re.sub(r"\b(" + "|".join(FLAGS) + r")\b", lambda m: FLAGS[m.group(1)], message)


def build_parser() -> argparse.ArgumentParser:
    """The ckpt-attn argument parser."""
    model = _Parser(add_help=False)
    shape = model.add_argument_group("model and input (flags override --preset)")
    shape.add_argument("--preset", choices=PRESETS, help="a common model shape")
    shape.add_argument("--layers", type=int, help="number of layers")
    shape.add_argument("--hidden", type=int, help="hidden size")
    shape.add_argument("--heads", type=int, help="query heads")
    shape.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    shape.add_argument("--ffn", type=int, help="MLP width (default: Llama's rule, 4x for gelu)")
    shape.add_argument("--mlp", choices=MLPS)
    shape.add_argument("--norm", choices=NORMS)
    shape.add_argument("--dropout", type=float)
    shape.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    shape.add_argument("--seq", type=int,
                       help="sequence length (default: the preset's max_seq_len, else 4096)")
    shape.add_argument("--dtype", choices=DTYPES, default="bf16", help="default bf16")
    shape.add_argument("--context-parallel", type=int, default=1, metavar="P",
                       help="ranks the sequence is sharded over (ckpt_attn.distributed); "
                            "figures are then per rank (default 1)")

    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    est = commands.add_parser("estimate", parents=[model], help="memory and recompute of "
                              "each checkpoint policy", description="Predicted activation "
                              "memory and recompute of each checkpoint policy.")
    est.add_argument("--json", action="store_true", help="print the estimates as JSON")
    est.add_argument("--plot", type=Path, metavar="FILE.png",
                     help="also plot peak memory against recompute (needs matplotlib)")
    pln = commands.add_parser("plan", parents=[model], help="the least-recompute plan that "
                              "fits a memory budget", description="The checkpoint plan with "
                              "least recompute whose predicted peak fits --budget.")
    pln.add_argument("--budget", type=_budget, required=True,
                     help="peak activation memory: bytes, or e.g. 40GiB, 1.5GB")
    bench = commands.add_parser("bench", help="benchmark the attention op, then the "
                                "checkpoint policies' trade-off", description=BENCH_HELP)
    bench.add_argument("--quick", action="store_true",
                       help="a reduced grid of each benchmark (minutes, not tens of minutes)")
    add_common_arguments(bench)
    bench.add_argument("--no-hf", action="store_true",
                       help="leave the Hugging Face Llama out of the policy trade-off")
    bench.add_argument("--only", choices=("attention", "policies"),
                       help="run one of the two benchmarks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ckpt-attn command line on argv (default sys.argv[1:]); the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(_attach_negative_values(argv))
        return {"estimate": _estimate, "plan": _plan, "bench": _bench}[args.command](args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help, or the benchmark's own parser
        return 0 if exit_.code is None else exit_.code


def _attach_negative_values(argv: list[str]) -> list[str]:
    """argv with "--flag -5GiB" as "--flag=-5GiB": argparse takes a token that starts with
    "-" and is not a plain negative number for a flag, so "expected one argument" would
    hide the value's own error (a budget less than one byte, say)."""
    attached = []
    for token in argv:
        if attached and attached[-1].startswith("--") and "=" not in attached[-1] \
                and attached[-1] != "--" and NEGATIVE.match(token):
            attached[-1] += f"={token}"
        else:
            attached.append(token)
    return attached


def model_config(args: argparse.Namespace) -> tuple[TransformerConfig, int]:
    """The TransformerConfig and sequence length the model flags describe."""
    kwargs = dict(PRESETS[args.preset]) if args.preset else {}
    kwargs |= {field: getattr(args, dest) for dest, field in MODEL_FLAGS.items()
               if getattr(args, dest) is not None}
    missing = [FLAGS[f] for f in ("num_layers", "hidden_size", "num_heads") if f not in kwargs]
    if missing:
        raise UsageError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                         f"required without --preset")
    max_seq_len = kwargs.get("max_seq_len", _default("max_seq_len"))
    seq = max_seq_len if args.seq is None else args.seq
    for flag, value in (("--batch", args.batch), ("--seq", seq),
                        ("--context-parallel", args.context_parallel)):
        if value < 1:
            raise UsageError(f"{flag} must be a positive int, got {value}")
    if seq % args.context_parallel:
        raise UsageError(f"--seq ({seq}) must be a multiple of --context-parallel "
                         f"({args.context_parallel})")
    if args.context_parallel > 1 and seq % (2 * args.context_parallel):
        raise UsageError(f"--seq ({seq}) must be a multiple of 2 * --context-parallel "
                         f"({2 * args.context_parallel}): the zigzag layout cuts the sequence "
                         f"into two chunks per rank")
    try:
        cfg = TransformerConfig(**kwargs | {"max_seq_len": max(max_seq_len, seq)})
    except (TypeError, ValueError) as error:
        raise UsageError(_flags(str(error))) from None
    if cfg.num_layers > MAX_LAYERS:
        raise UsageError(f"--layers must be at most {MAX_LAYERS}, got {cfg.num_layers}")
    check_size(cfg, args.batch, seq, DTYPES[args.dtype])
    return cfg, seq


def check_size(cfg: TransformerConfig, batch: int, seq: int, dtype: torch.dtype) -> None:
    """A UsageError if the layers' weight matrices, or the activations they keep without
    checkpointing, would take more than MAX_BYTES."""
    weights = cfg.num_layers * dtype.itemsize * cfg.hidden_size * (
        2 * cfg.hidden_size + 2 * cfg.num_kv_heads * cfg.head_dim
        + (3 if cfg.mlp == "swiglu" else 2) * cfg.ffn_hidden_size)
    activations = cfg.num_layers * sum(t.bytes for t in layer_terms(cfg, batch, seq, dtype))
    for what, nbytes, flags in (
            ("weight matrices", weights, "--layers, --hidden or --ffn"),
            ("activations without checkpointing", activations,
             "--batch, --seq, --layers, --hidden or --ffn")):
        if nbytes > MAX_BYTES:
            raise UsageError(f"the layers' {what} would take at least "
                             f"2**{nbytes.bit_length() - 1} bytes, more than 2**60 (1 EiB): "
                             f"lower {flags}")


def _default(field: str):
    return next(f.default for f in dataclasses.fields(TransformerConfig) if f.name == field)


def describe(cfg: TransformerConfig, args: argparse.Namespace, seq: int) -> str:
    """One line: the model and input the numbers are for."""
    preset = f"{args.preset} " if args.preset else ""
    return (f"config: {preset}{cfg.num_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.num_heads} heads ({cfg.num_kv_heads} kv), ffn {cfg.ffn_hidden_size}, "
            f"{cfg.mlp}, {cfg.norm}{', bias' if cfg.bias else ''}, dropout {cfg.dropout:g}; "
            f"batch {args.batch}, seq {seq}, {args.dtype}"
            + (f"; context parallel {args.context_parallel}: per rank (seq "
               f"{seq // args.context_parallel} each), peak with the ring's buffers"
               if args.context_parallel > 1 else ""))


def policy_label(policy: str, options: dict) -> str:
    """"uniform(every=2)" for estimate's policy "uniform" with every=2."""
    inner = ",".join(f"{k}={v}" for k, v in options.items())
    return f"{policy}({inner})" if inner else policy


def estimate_table(estimates: list, labels: list[str]) -> str:
    """The estimates as a table: kept, peak and naive-attention kept GiB, recompute %."""
    rows = [f"{'policy':<18} {'kept GiB':>9} {'peak GiB':>9} {'recompute %':>12} "
            f"{'naive kept GiB':>15}"]
    for label, est in zip(labels, estimates, strict=True):
        rows.append(f"{label:<18} {est.kept_bytes / GIB:9.2f} {est.peak_bytes / GIB:9.2f} "
                    f"{100 * est.recompute_overhead:12.1f} {est.naive_kept_bytes / GIB:15.2f}")
    return "\n".join(rows)


def _estimate(args) -> int:
    cfg, seq = model_config(args)
    figure_class = None
    if args.plot:
        figure_class = _matplotlib_figure()
        check_plot_path(args.plot, figure_class())
    dtype = DTYPES[args.dtype]
    try:
        estimates = [estimate(cfg, batch=args.batch, seq=seq, policy=policy, dtype=dtype,
                              context_parallel=args.context_parallel, **options)
                     for policy, options in POLICIES]
    except ValueError as error:  # what model_config could not see: a line, not a traceback
        raise UsageError(_flags(str(error))) from None
    labels = [policy_label(policy, options) for policy, options in POLICIES]
    if args.json:
        print(json.dumps([est.to_dict() | {"options": options}
                          for est, (_, options) in zip(estimates, POLICIES, strict=True)],
                         indent=2))
    else:
        print(describe(cfg, args, seq))
        print(estimate_table(estimates, labels))
    if args.plot:
        frontier = budget_frontier(cfg, args.batch, seq, dtype, estimates,
                                   args.context_parallel)
        write_plot(figure_class(), args.plot, estimates, labels, frontier,
                   describe(cfg, args, seq))
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


def _matplotlib_figure():
    """matplotlib.figure.Figure, imported lazily: a UsageError if matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'ckpt-attn[plot]'") from None
    return Figure


def check_plot_path(path: Path, figure) -> None:
    """A UsageError unless figure.savefig can write path: a file of a format matplotlib
    writes (png without a suffix), in an existing directory, that this process may write
    (tried by opening it to append; a file that was not there is removed again)."""
    if path.is_dir():
        raise UsageError(f"--plot {path} is a directory")
    if not path.parent.is_dir():
        raise UsageError(f"--plot {path}: {path.parent} is not a directory")
    suffix = path.suffix.lower().removeprefix(".")
    formats = figure.canvas.get_supported_filetypes()
    if suffix and suffix not in formats:
        raise UsageError(f"--plot {path}: matplotlib cannot write .{suffix} files, only "
                         f"{', '.join(sorted(formats))}")
    existed = path.exists()
    try:  # a read-only directory or file: found now, before anything is computed
        with path.open("ab"):
            pass
    except OSError as error:
        raise UsageError(f"--plot {path}: {error.strerror}") from None
    if not existed:
        path.unlink()


def budget_frontier(cfg, batch, seq, dtype, estimates, context_parallel: int = 1
                    ) -> list[tuple[float, float]]:
    """(peak GiB, recompute %) of plan() at budgets evenly spaced from the smallest to the
    largest peak of the estimates, and at each estimate's peak; sorted by peak, one point
    per distinct plan (per rank, with the ring's buffers, under context parallelism)."""
    ring = estimates[0].ring_buffer_bytes
    peaks = [est.peak_bytes for est in estimates]
    low, high = min(peaks), max(peaks)
    budgets = {low + (high - low) * i // (PLOT_BUDGETS - 1) for i in range(PLOT_BUDGETS)}
    step_flops = estimates[0].step_flops
    points = set()
    for budget in sorted(budgets | set(peaks)):
        try:
            best = plan(cfg, batch=batch, seq=seq, budget_bytes=budget, dtype=dtype,
                        context_parallel=context_parallel)
        except ValueError:  # below the smallest peak any plan reaches
            continue
        points.add(((best.peak_bytes + ring) / GIB, 100 * (best.recompute_flops / step_flops)))
    return sorted(points)


def write_plot(figure, path: Path, estimates, labels, frontier, title: str) -> None:
    """Write the memory-compute plot: each policy a labelled point, plans a step line."""
    points = {}  # policies with the same cost share a point and a label
    for est, label in zip(estimates, labels, strict=True):
        points.setdefault((est.peak_bytes / GIB, 100 * est.recompute_overhead), []).append(label)
    ax = figure.add_subplot()
    for (x, y), names in points.items():
        ax.scatter([x], [y], zorder=3)
        ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
    if frontier:
        ax.plot(*zip(*frontier, strict=True), drawstyle="steps-post", marker=".",
                color="gray", label="plan(budget) frontier")
        ax.legend()
    ax.set_xlabel("peak activation memory (GiB)")
    ax.set_ylabel("recompute (% of a training step's FLOPs)")
    ax.set_title(title.removeprefix("config: "), fontsize=7, wrap=True)
    ax.grid(alpha=0.3)
    try:
        figure.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as error:  # the path became unwritable since check_plot_path
        raise UsageError(f"--plot {path}: {error.strerror}") from None


def _plan(args) -> int:
    cfg, seq = model_config(args)
    dtype = DTYPES[args.dtype]
    try:
        best = plan(cfg, batch=args.batch, seq=seq, budget_bytes=args.budget, dtype=dtype,
                    context_parallel=args.context_parallel)
    except ValueError as error:
        raise UsageError(_flags(str(error))) from None
    whole = estimate(cfg, batch=args.batch, seq=seq, dtype=dtype,
                     context_parallel=args.context_parallel)
    step_flops, ring = whole.step_flops, whole.ring_buffer_bytes
    print(describe(cfg, args, seq))
    print(f"budget: {gib(args.budget)} ({args.budget} bytes)")
    print(best)
    print(f"cost: kept {gib(best.kept_bytes)}, peak {gib(best.peak_bytes + ring)}"
          + (f" (ring buffers {gib(ring)} included)" if ring else "") + ", recompute "
          f"{100 * (best.recompute_flops / step_flops):.1f}% of a training step's FLOPs")
    return 0


def _bench(args) -> int:
    """Run ckpt_attn.benchmarks' attention benchmark, then its policy trade-off (or the one
    --only names), both writing into --out."""
    from .benchmarks import bench_attention, bench_policies  # they import triton, matplotlib

    common = ["--out", str(args.out)] + (["--quick"] if args.quick else []) + (
        ["--smoke"] if args.smoke else [])
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    runs = {"attention": (bench_attention.main, common + threads),
            "policies": (bench_policies.main, common + threads
                         + (["--no-hf"] if args.no_hf else []))}
    for name in [args.only] if args.only else list(runs):
        benchmark, argv = runs[name]
        try:
            benchmark(argv)
        except OSError as error:  # making or writing the results directory
            if error.filename is None or not _related(Path(error.filename), args.out):
                raise
            raise UsageError(f"--out {args.out}: {error.strerror}") from None
    return 0


def _related(path: Path, directory: Path) -> bool:
    """Whether path is directory, inside it, or one of its parents."""
    return path == directory or directory in path.parents or path in directory.parents

