"""Benchmark ckpt_attn.attention against torch's scaled_dot_product_attention (SDPA).

Run as ``python -m ckpt_attn.benchmarks.bench_attention [--quick] [--out DIR]``.

With CUDA: forward and forward+backward TFLOP/s of ckpt_attn (backend="triton")
against SDPA restricted to each of its backends (FLASH_ATTENTION,
EFFICIENT_ATTENTION, CUDNN_ATTENTION, MATH) on FlashAttention-2's grid: B * S =
16384 tokens and H * D = 2048, S from 512 to 16384, full and causal attention.
Two masked variants run at bf16, D=128, S from 2048 to 16384: "padded" (a
boolean key-padding mask, batch b keeping the first S - (b % 4 + 1) * S // 8 keys)
and "window" (causal sliding window of 256 keys; SDPA gets the equivalent S x S
boolean mask). FLOPs follow FlashAttention-2's convention (4*B*H*D per computed
(query, key) pair forward, backward = 2.5x forward), counting all S*S pairs for
full and padded attention and only the visible pairs for causal and window;
times are triton.testing.do_bench medians, with L2 flushed before every call.
Also the peak memory of forward+backward, ckpt_attn against naive attention.

Without CUDA, what a CPU can say: (1) wall-clock ratios of the torch backend to
SDPA on the CPU, timed interleaved in one run; (2) the exact bytes autograd keeps
for backward, ckpt_attn vs SDPA vs naive attention vs the q+k+v+O+row-statistics formula;
(3) what torch.utils.flop_counter.FlopCounterMode counts. GPU throughput needs a
CUDA GPU.

Results go under --out (default ./ckpt-attn-results): with CUDA summary.md,
gpu_throughput.csv, gpu_throughput.md and gpu_memory.md (plus perf_report's
per-plot CSV and PNG files when pandas and matplotlib are installed); without
CUDA cpu_results.md and cpu_results.png (with matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ckpt_attn
from ckpt_attn.ops import visible_pairs

from . import add_common_arguments, apply_threads
from .attention_plot import write_cpu_plot

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd_bwd")
MIB = 2**20
# Masking of the attention compared: none, causal, a boolean key-padding mask, or a
# causal sliding window (see variant_mask).
VARIANTS = ("full", "causal", "padded", "window")
MASKED_VARIANTS = ("padded", "window")  # the ones where SDPA and naive get a boolean mask
WINDOW_KEYS = 256  # keys a query sees in the "window" variant, itself included
WINDOW = (WINDOW_KEYS - 1, 0)  # ckpt_attn's window=(left, right), with causal=True

# ------------------------------------------------------------------ shared pieces


def causal_variant(causal: bool) -> str:
    """The variant of plain attention, causal or not (the CPU path's masking axis)."""
    return "causal" if causal else "full"


def variant_mask(variant: str, batch: int, seqlen: int, device: str) -> torch.Tensor | None:
    """The boolean attn_mask (True = may attend) that SDPA and naive get, None if unmasked.

    "padded": (B, 1, 1, S), batch b keeps its first S - (b % 4 + 1) * S // 8 keys
    (0 to 37.5% padding); ckpt_attn gets the same mask. "window": (S, S), query i
    sees keys i - 255 .. i (tril & band), what ckpt_attn computes with causal=True,
    window=(255, 0) and no mask. "full" and "causal": None.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "padded":
        kept = seqlen - (torch.arange(batch, device=device) % 4 + 1) * seqlen // 8
        keys = torch.arange(seqlen, device=device)
        return (keys < kept[:, None]).view(batch, 1, 1, seqlen)
    if variant == "window":
        ones = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device)
        return ones.tril() & ones.triu(-WINDOW[0])
    return None


def attention_flops(batch: int, heads: int, seqlen: int, head_dim: int, variant: str,
                    mode: str) -> float:
    """FLOPs of one call by FlashAttention-2's convention.

    4*B*H*D per (query, key) pair for the forward (two matmuls); the backward
    counts 2.5x the forward, so mode "fwd_bwd" is 3.5x the forward. "full" and
    "padded" count all S*S pairs (the kernels compute the padded ones too);
    "causal" and "window" only the visible ones (ckpt_attn.ops.visible_pairs), so
    causal is FlashAttention-2's halving counted up to the diagonal and a window's
    TFLOP/s counts useful work only.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "causal":
        pairs = visible_pairs(seqlen, seqlen, True)
    elif variant == "window":
        pairs = visible_pairs(seqlen, seqlen, True, WINDOW)
    else:
        pairs = seqlen * seqlen
    forward = 4.0 * batch * heads * pairs * head_dim
    return forward * (3.5 if mode == "fwd_bwd" else 1.0)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in plain torch ops and q's dtype; it stores S x S matrices.

    mask: None or boolean, broadcastable to the scores, True = may attend.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        hidden = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def random_qkv(batch: int, heads: int, seqlen: int, head_dim: int, dtype: torch.dtype,
               device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three independent standard-normal (B, H, S, D) tensors that require grad."""
    return tuple(
        torch.randn(batch, heads, seqlen, head_dim, dtype=dtype, device=device,
                    requires_grad=True)
        for _ in range(3)
    )


def implementations(variant: str, device: str,
                    mask: torch.Tensor | None = None) -> dict[str, Callable]:
    """The attention functions compared, name -> f(q, k, v) -> O.

    ckpt_attn runs its Triton backend on CUDA and its torch backend on the CPU;
    "sdpa" is SDPA with whichever backend torch picks (or is restricted to).
    mask is variant_mask(variant, ...) for the problem: None for "full" and
    "causal", required for "padded" (every implementation gets it as attn_mask)
    and "window" (SDPA and naive get it; ckpt_attn runs causal=True, window=(255, 0)).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if (mask is not None) != (variant in MASKED_VARIANTS):
        raise ValueError(f"variant {variant!r} takes "
                         f"{'a mask' if variant in MASKED_VARIANTS else 'no mask'}")
    backend = "triton" if torch.device(device).type == "cuda" else "torch"
    causal = variant in ("causal", "window")
    ours = {"attn_mask": mask if variant == "padded" else None, "causal": causal,
            "window": WINDOW if variant == "window" else None, "backend": backend}
    sdpa_causal = variant == "causal"  # SDPA refuses attn_mask together with is_causal
    return {
        "ckpt_attn": lambda q, k, v: ckpt_attn.attention(q, k, v, **ours),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                               is_causal=sdpa_causal),
        "naive": lambda q, k, v: naive_attention(q, k, v, sdpa_causal, mask),
    }


def timed_step(attn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mode: str) -> Callable[[], None]:
    """One timed call of attn: the forward under no_grad, or forward + backward.

    The backward goes through torch.autograd.grad, so no .grad accumulates
    between calls.
    """
    if mode == "fwd":
        def step():
            with torch.no_grad():
                attn(q, k, v)
    else:
        grad_out = torch.randn_like(q)

        def step():
            torch.autograd.grad(attn(q, k, v), (q, k, v), grad_out)
    return step


def saved_bytes(fn: Callable, *inputs: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one call fn(*inputs).

    A saved_tensors_hooks pack hook sees every tensor saved for backward; the
    bytes of the distinct storages behind them are summed (a view counts its
    whole storage, once), nn.Parameters excluded. Inputs count: q, k and v are
    kept by every attention implementation.
    """
    saved = []

    def pack(tensor):
        saved.append(tensor)  # also keeps each storage alive, so no address is reused
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*inputs)
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in saved
        if not isinstance(t, torch.nn.Parameter)
    }
    return sum(storages.values())


def formula_bytes(q: torch.Tensor) -> int:
    """Bytes of q, k, v and O (each shaped like q here) plus two float32 row statistics
    (row max and log row sum) per query row."""
    return 4 * q.numel() * q.element_size() + q[..., 0].numel() * 2 * 4


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> str:
    """One line naming the machine and the versions measured."""
    if torch.cuda.is_available():
        import triton

        return (f"{torch.cuda.get_device_name()}, torch {torch.__version__} "
                f"(CUDA {torch.version.cuda}), triton {triton.__version__}")
    return (f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


# ------------------------------------------------------------------------- CPU


@dataclass(frozen=True)
class CpuSizes:
    """Problem sizes of the CPU run: (B, H, S, D) float32 tensors."""

    timing_seqlens: tuple[int, ...] = (256, 512, 1024, 2048)
    saved_seqlens: tuple[int, ...] = (1024, 2048, 4096)
    flop_seqlen: int = 512
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    budget_s: float = 2.0  # wall-clock per timed problem, both implementations together


QUICK_CPU_SIZES = CpuSizes(timing_seqlens=(256, 512, 1024), saved_seqlens=(1024, 2048),
                           budget_s=1.0)
SMOKE_CPU_SIZES = CpuSizes(timing_seqlens=(128,), saved_seqlens=(256,), flop_seqlen=128,
                           budget_s=0.2)
"""--smoke: seconds, to check the benchmark runs and writes its files (CI does)."""


@dataclass(frozen=True)
class CpuTiming:
    """Median wall-clock ms of ckpt_attn (torch backend) and SDPA on one CPU problem."""

    seqlen: int
    causal: bool
    mode: str
    ckpt_attn_ms: float
    sdpa_ms: float
    rounds: int

    @property
    def ratio(self) -> float:
        """ckpt_attn time / SDPA time; above 1 means ckpt_attn is slower."""
        return self.ckpt_attn_ms / self.sdpa_ms


def interleaved_medians(fns: Sequence[Callable[[], None]], budget_s: float, min_rounds: int = 3,
                        max_rounds: int = 25) -> tuple[list[float], int]:
    """Median wall-clock ms of each fn, and the number of rounds timed.

    One warm-up call of each sets the number of rounds so that the timing takes
    about budget_s. A round calls every fn once, in reversed order every other
    round, so a drift in machine speed hits all of them alike.
    """
    start = time.perf_counter()
    for fn in fns:
        fn()
    warm_up = time.perf_counter() - start
    rounds = max(min_rounds, min(max_rounds, int(budget_s / warm_up)))
    samples: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for round_index in range(rounds):
        for i in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fns[i]()
            samples[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(s) for s in samples], rounds


def cpu_timings(seqlens: Sequence[int], *, batch: int, heads: int, head_dim: int,
                budget_s: float) -> list[CpuTiming]:
    """ckpt_attn (backend="torch") vs SDPA on float32 CPU tensors: causal off/on, fwd, fwd+bwd."""
    results = []
    for seqlen in seqlens:
        q, k, v = random_qkv(batch, heads, seqlen, head_dim, torch.float32, "cpu")
        for causal in (False, True):
            impls = implementations(causal_variant(causal), "cpu")
            for mode in MODES:
                steps = [timed_step(impls[name], q, k, v, mode) for name in ("ckpt_attn", "sdpa")]
                (ours, sdpa), rounds = interleaved_medians(steps, budget_s)
                results.append(CpuTiming(seqlen, causal, mode, ours, sdpa, rounds))
                print(f"  S={seqlen:5d} causal={causal!s:5} {mode:7s} ckpt_attn {ours:9.2f} ms"
                      f"  sdpa {sdpa:9.2f} ms  ratio {ours / sdpa:6.2f}  ({rounds} rounds)",
                      flush=True)
    return results


@dataclass(frozen=True)
class SavedBytes:
    """Bytes kept for backward by one attention call, per implementation, and references."""

    seqlen: int
    causal: bool
    ckpt_attn: int
    sdpa: int
    naive: int
    formula: int  # q + k + v + O + row statistics (2 fp32 per query row)
    softmax: int  # one B x H x S x S matrix in the inputs' dtype


def saved_bytes_table(seqlens: Sequence[int], *, batch: int, heads: int, head_dim: int,
                      dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[SavedBytes]:
    """Exact saved bytes of ckpt_attn, SDPA and naive attention, causal off and on."""
    rows = []
    for seqlen in seqlens:
        q, k, v = random_qkv(batch, heads, seqlen, head_dim, dtype, device)
        softmax = batch * heads * seqlen * seqlen * q.element_size()
        for causal in (False, True):
            counted = {name: saved_bytes(fn, q, k, v)
                       for name, fn in implementations(causal_variant(causal),
                                                       device).items()}
            rows.append(SavedBytes(seqlen, causal, counted["ckpt_attn"], counted["sdpa"],
                                   counted["naive"], formula_bytes(q), softmax))
    return rows


@dataclass(frozen=True)
class FlopCount:
    """Forward+backward FLOPs: FlashAttention-2's convention and what FlopCounterMode counts."""

    causal: bool
    convention: float
    ckpt_attn: int
    sdpa: int
    naive: int


def counted_flops(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """FLOPs that FlopCounterMode records for forward + backward of fn(q, k, v)."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return counter.get_total_flops()


def flop_count_table(seqlen: int, *, batch: int, heads: int, head_dim: int) -> list[FlopCount]:
    """FlopCounterMode's forward+backward counts on float32 CPU tensors, causal off and on."""
    q, k, v = random_qkv(batch, heads, seqlen, head_dim, torch.float32, "cpu")
    rows = []
    for causal in (False, True):
        counted = {name: counted_flops(fn, q, k, v)
                   for name, fn in implementations(causal_variant(causal), "cpu").items()}
        convention = attention_flops(batch, heads, seqlen, head_dim, causal_variant(causal),
                                     "fwd_bwd")
        rows.append(FlopCount(causal, convention, counted["ckpt_attn"], counted["sdpa"],
                              counted["naive"]))
    return rows


def cpu_report(sizes: CpuSizes, timings: list[CpuTiming], saved: list[SavedBytes],
               flops: list[FlopCount]) -> str:
    """The CPU results as markdown."""
    shape = f"B={sizes.batch}, H={sizes.heads}, D={sizes.head_dim}, float32"
    timing_rows = [
        (t.seqlen, t.causal, t.mode, f"{t.ckpt_attn_ms:.2f}", f"{t.sdpa_ms:.2f}",
         f"{t.ratio:.2f}", t.rounds)
        for t in timings
    ]
    saved_rows = [
        (s.seqlen, s.causal, f"{s.ckpt_attn:,}", f"{s.sdpa:,}", f"{s.naive:,}", f"{s.formula:,}",
         f"{s.softmax:,}", s.ckpt_attn == s.formula, f"{s.naive / s.ckpt_attn:.1f}x")
        for s in saved
    ]
    flop_rows = [
        (f.causal, f"{f.convention:,.0f}", f"{f.ckpt_attn:,}", f"{f.sdpa:,}", f"{f.naive:,}")
        for f in flops
    ]
    return "\n".join([
        "# ckpt_attn on the CPU",
        "",
        environment(),
        "",
        "**GPU throughput (TFLOP/s) needs a CUDA GPU.** Nothing below measures the Triton "
        "kernels: on a CUDA machine `python -m ckpt_attn.benchmarks.bench_attention [--quick]` "
        "benchmarks them against every SDPA backend.",
        "",
        f"## Wall-clock, ckpt_attn (backend=\"torch\") vs SDPA on the CPU ({shape})",
        "",
        "Median ms over interleaved rounds in one run (each round calls both, in "
        "alternating order, so a machine busy with other work slows both alike; on such a "
        "machine run it with `--threads 1`: with several threads every op waits for its "
        "slowest thread, and ckpt_attn's backward, many ops where SDPA's is one, then "
        "swings by up to 10x); fwd runs "
        "under no_grad, fwd_bwd is forward + torch.autograd.grad. ratio = ckpt_attn / SDPA "
        "(above 1: slower). The forward of these calls runs torch's own CPU "
        "flash-attention kernel (what SDPA runs here) with ckpt_attn's checks and row "
        "statistics around it; the backward is ckpt_attn's chunked PyTorch one, since the "
        "kernel's backward misses the accuracy rule (see ckpt_attn/backends/fused_cpu.py). "
        "Forwards the kernel does not cover (dropout, windows, rows with one huge bias on "
        "every key) are chunked too.",
        "",
        markdown_table(("S", "causal", "pass", "ckpt_attn ms", "SDPA ms", "ratio", "rounds"),
                       timing_rows),
        "",
        f"## Bytes kept for backward by one attention call ({shape})",
        "",
        "Exact: the distinct storages that autograd's saved_tensors_hooks see, q, k, v "
        "included. naive is softmax(q k^T / sqrt(D)) v in plain torch ops (causal adds a "
        "bool S x S mask). The last column is naive / ckpt_attn.",
        "",
        markdown_table(("S", "causal", "ckpt_attn", "SDPA", "naive", "q+k+v+O+stats",
                        "one S x S", "ckpt_attn = formula", "naive / ckpt_attn"), saved_rows),
        "",
        f"## FLOPs counted by FlopCounterMode, forward + backward (S={sizes.flop_seqlen}, {shape})",
        "",
        "convention: FlashAttention-2's count (backward = 2.5x forward), causal counting "
        "the S(S+1)/2 pairs up to the diagonal. ckpt_attn registers flop formulas for its "
        "custom ops (the same count); FlopCounterMode has no formula for SDPA's CPU kernel; "
        "naive's matmuls are counted in full even when causal, and its backward is 2x its "
        "forward since it recomputes nothing.",
        "",
        markdown_table(("causal", "convention", "ckpt_attn", "SDPA (CPU)", "naive"), flop_rows),
        "",
    ])


def run_cpu(out_dir: Path, sizes: CpuSizes) -> str:
    """Run the CPU benchmarks, print them and write out_dir/cpu_results.md; returns the text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"No CUDA device: CPU benchmarks only ({environment()}).")
    print("GPU throughput numbers (TFLOP/s) need a CUDA GPU.\n")
    dims = {"batch": sizes.batch, "heads": sizes.heads, "head_dim": sizes.head_dim}
    print("Timing ckpt_attn (backend='torch') against SDPA:", flush=True)
    timings = cpu_timings(sizes.timing_seqlens, budget_s=sizes.budget_s, **dims)
    saved = saved_bytes_table(sizes.saved_seqlens, **dims)
    flops = flop_count_table(sizes.flop_seqlen, **dims)
    report = cpu_report(sizes, timings, saved, flops)
    if write_cpu_plot(timings, saved, out_dir / "cpu_results.png"):
        report += "\n![time against SDPA and bytes kept](cpu_results.png)\n"
    (out_dir / "cpu_results.md").write_text(report)
    print("\n" + report)
    return report


# ------------------------------------------------------------------------ CUDA

SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
PROVIDERS = ("ckpt_attn", *SDPA_BACKENDS)
STYLES = [("red", "-"), ("blue", "-"), ("green", "-"), ("orange", "-"), ("gray", "--")]
TOKENS = 16384  # B * S, as in FlashAttention-2's benchmark
MODEL_DIM = 2048  # H * D
MATH_MAX_SEQLEN = 4096  # SDPA's math backend stores S x S matrices: skipped above this
GPU_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)  # full and causal
QUICK_GPU_SEQLENS = (1024, 4096, 16384)
MASKED_SEQLENS = (2048, 4096, 8192, 16384)  # padded and window, bf16 and D=128 only
QUICK_MASKED_SEQLENS = (4096, 16384)
MASKED_PROBLEM = {"dtype": "bf16", "head_dim": 128}
MEMORY_PROBLEM = {"seqlen": 4096, "head_dim": 128, "dtype": "bf16", "variant": "full"}


def gpu_shape(seqlen: int, head_dim: int) -> tuple[int, int]:
    """(batch, heads) with B * S = TOKENS and H * D = MODEL_DIM."""
    return TOKENS // seqlen, MODEL_DIM // head_dim


def config_name(mode: str, dtype: str, head_dim: int, variant: str) -> str:
    """Name of one benchmark (one plot): pass, dtype, head dim, masking variant."""
    return f"attention-{mode}-{dtype}-d{head_dim}-{variant}"


def gpu_problems(quick: bool) -> list[tuple[str, int, str, tuple[int, ...]]]:
    """(dtype, D, variant, sequence lengths) of each benchmarked problem family.

    Full and causal over the whole grid; padded and window at bf16, D=128 only.
    """
    dtypes = ("bf16",) if quick else ("bf16", "fp16")
    seqlens = QUICK_GPU_SEQLENS if quick else GPU_SEQLENS
    masked_seqlens = QUICK_MASKED_SEQLENS if quick else MASKED_SEQLENS
    problems = [(dtype, head_dim, variant, seqlens)
                for dtype in dtypes for head_dim in (128, 64) for variant in ("full", "causal")]
    problems += [(MASKED_PROBLEM["dtype"], MASKED_PROBLEM["head_dim"], variant, masked_seqlens)
                 for variant in MASKED_VARIANTS]
    return problems


def gpu_benchmarks(quick: bool) -> list:
    """The triton.testing.Benchmark grid: one per (pass, dtype, D, variant), S on the x axis."""
    import triton.testing

    return [
        triton.testing.Benchmark(
            x_names=["seqlen"], x_vals=list(seqlens), line_arg="provider",
            line_vals=list(PROVIDERS), line_names=list(PROVIDERS), styles=STYLES,
            xlabel="sequence length (B * S = 16384, H * D = 2048)", ylabel="TFLOP/s",
            x_log=True, plot_name=config_name(mode, dtype, head_dim, variant),
            args={"mode": mode, "dtype": dtype, "head_dim": head_dim, "variant": variant},
        )
        for dtype, head_dim, variant, seqlens in gpu_problems(quick)
        for mode in MODES
    ]


def gpu_time_ms(provider: str, mode: str, dtype: str, head_dim: int, variant: str,
                seqlen: int) -> tuple[list[float] | None, str]:
    """([median, 20th, 80th percentile] ms, "") of one problem, or (None, why it did not run).

    SDPA providers run with SDPA restricted to their one backend; a backend
    that cannot take the problem (it raises: flash takes no attn_mask, so no
    padded or window point) or runs out of memory is skipped.
    """
    import triton.testing

    if provider == "sdpa-math" and seqlen > MATH_MAX_SEQLEN:
        return None, f"skipped above S={MATH_MAX_SEQLEN} (stores S x S)"
    batch, heads = gpu_shape(seqlen, head_dim)
    q, k, v = random_qkv(batch, heads, seqlen, head_dim, DTYPES[dtype], "cuda")
    impls = implementations(variant, "cuda", variant_mask(variant, batch, seqlen, "cuda"))
    if provider == "ckpt_attn":
        attn, restrict = impls["ckpt_attn"], contextlib.nullcontext()
    else:
        attn, restrict = impls["sdpa"], sdpa_kernel(SDPA_BACKENDS[provider])
    try:
        with restrict, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA warns why a backend cannot run, then raises
            times = triton.testing.do_bench(timed_step(attn, q, k, v, mode),
                                            quantiles=[0.5, 0.2, 0.8])
    except Exception as error:  # any failure skips this one point, not the whole run
        first_line = (str(error).strip().splitlines() or [""])[0]
        return None, f"{type(error).__name__}: {first_line[:150]}"
    return list(times), ""


@dataclass(frozen=True)
class GpuResult:
    """One measured point: problem, provider, median ms and TFLOP/s (NaN when skipped)."""

    mode: str
    dtype: str
    head_dim: int
    variant: str
    seqlen: int
    batch: int
    heads: int
    provider: str
    ms: float
    tflops: float
    note: str


def run_gpu_throughput(out_dir: Path, benchmarks: list) -> list[GpuResult]:
    """Measure every point of the benchmarks with triton.testing.perf_report.

    Points are appended to out_dir/gpu_throughput.csv as they are measured.
    perf_report's own CSV and PNG files need pandas and matplotlib; without
    them the same points are measured without its plots.
    """
    import triton.testing

    results: list[GpuResult] = []
    with (out_dir / "gpu_throughput.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f.name for f in fields(GpuResult)])

        @triton.testing.perf_report(benchmarks)
        def attention_tflops(seqlen, provider, mode, dtype, head_dim, variant):
            """TFLOP/s at the median, 80th- and 20th-percentile times (NaN when skipped)."""
            times, note = gpu_time_ms(provider, mode, dtype, head_dim, variant, seqlen)
            batch, heads = gpu_shape(seqlen, head_dim)
            flops = attention_flops(batch, heads, seqlen, head_dim, variant, mode)
            tflops = [flops / ms / 1e9 for ms in times] if times else [math.nan] * 3
            result = GpuResult(mode, dtype, head_dim, variant, seqlen, batch, heads, provider,
                               times[0] if times else math.nan, tflops[0], note)
            results.append(result)
            writer.writerow(astuple(result))
            handle.flush()
            print(f"  {config_name(mode, dtype, head_dim, variant)} S={seqlen:5d} "
                  f"{provider:15s} {tflops[0]:7.1f} TFLOP/s {note}", flush=True)
            return tflops[0], tflops[2], tflops[1]

        if all(importlib.util.find_spec(m) for m in ("pandas", "matplotlib")):
            attention_tflops.run(save_path=str(out_dir), print_data=True)
        else:
            print("pandas or matplotlib missing: no perf_report plots, the tables follow.")
            for bench in benchmarks:
                for seqlen in bench.x_vals:
                    for provider in bench.line_vals:
                        attention_tflops.fn(seqlen=seqlen, provider=provider, **bench.args)
    return results


def _tflops_cell(result: GpuResult) -> str:
    return f"{result.tflops:.1f}" if result.note == "" else "-"


VARIANTS_TEXT = (
    "Variants: full; causal; padded = a boolean key-padding mask of shape (B, 1, 1, S), "
    "batch b keeping its first S - (b % 4 + 1) * S // 8 keys (12.5 to 50% padding), "
    "given to ckpt_attn and SDPA as attn_mask; window = causal "
    f"sliding window of {WINDOW_KEYS} keys, ckpt_attn with causal=True, window={WINDOW}, "
    "SDPA with the equivalent boolean S x S attn_mask (its flash backend takes no mask). "
    "FLOPs: full and padded count all S*S pairs (the kernels compute the padded ones "
    "too); causal and window count only the visible pairs (ckpt_attn.ops.visible_pairs), "
    "so window TFLOP/s is useful work only, although SDPA's masked backends compute all "
    "S*S pairs."
)


def throughput_report(results: list[GpuResult]) -> str:
    """gpu_throughput.md: one TFLOP/s table per (pass, dtype, D, variant), S down the rows."""
    sections = ["# Attention TFLOP/s", "", environment(), "",
                "FlashAttention-2's FLOP convention; median of triton.testing.do_bench. "
                "B * S = 16384, H * D = 2048. '-': did not run (notes below each table).", "",
                VARIANTS_TEXT, ""]
    by_config: dict[str, dict[int, dict[str, GpuResult]]] = {}
    for r in results:
        name = config_name(r.mode, r.dtype, r.head_dim, r.variant)
        by_config.setdefault(name, {}).setdefault(r.seqlen, {})[r.provider] = r
    for name, by_seqlen in by_config.items():
        rows = [(seqlen, *(_tflops_cell(row[p]) for p in PROVIDERS))
                for seqlen, row in by_seqlen.items()]
        notes = sorted({f"- {p}: {row[p].note}" for row in by_seqlen.values()
                        for p in PROVIDERS if row[p].note})
        sections += [f"## {name}", "", markdown_table(("S", *PROVIDERS), rows), "", *notes, ""]
    return "\n".join(sections)


def summary_rows(results: list[GpuResult]) -> list[tuple]:
    """(config, S, ckpt_attn TFLOP/s, best SDPA TFLOP/s and backend, ratio) per problem."""
    problems: dict[tuple, dict[str, GpuResult]] = {}
    for r in results:
        key = (config_name(r.mode, r.dtype, r.head_dim, r.variant), r.seqlen)
        problems.setdefault(key, {})[r.provider] = r
    rows = []
    for (name, seqlen), by_provider in problems.items():
        ours = by_provider["ckpt_attn"]
        ran = [r for p, r in by_provider.items() if p != "ckpt_attn" and not r.note]
        best = max(ran, key=lambda r: r.tflops, default=None)
        best_cell = f"{best.tflops:.1f} ({best.provider})" if best else "-"
        ratio = f"{ours.tflops / best.tflops:.2f}" if best and not ours.note else "-"
        rows.append((name, seqlen, _tflops_cell(ours), best_cell, ratio))
    return rows


@dataclass(frozen=True)
class PeakMemory:
    """Memory of one forward+backward: CUDA peak above the inputs, and bytes saved for backward."""

    implementation: str
    peak_bytes: int
    saved_bytes: int


def gpu_peak_memory(seqlen: int, head_dim: int, dtype: str, variant: str) -> list[PeakMemory]:
    """torch.cuda.max_memory_allocated of forward+backward for ckpt_attn, SDPA and naive."""
    batch, heads = gpu_shape(seqlen, head_dim)
    q, k, v = random_qkv(batch, heads, seqlen, head_dim, DTYPES[dtype], "cuda")
    mask = variant_mask(variant, batch, seqlen, "cuda")
    rows = []
    for name, attn in implementations(variant, "cuda", mask).items():
        step = timed_step(attn, q, k, v, "fwd_bwd")
        step()  # compiles the kernels once, outside the measurement
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        rows.append(PeakMemory(name, peak, saved_bytes(attn, q, k, v)))
    return rows


def memory_report(rows: list[PeakMemory]) -> str:
    """The peak-memory table as markdown."""
    p = MEMORY_PROBLEM
    batch, heads = gpu_shape(p["seqlen"], p["head_dim"])
    table = markdown_table(
        ("implementation", "peak MiB above inputs (fwd+bwd)", "saved for backward MiB"),
        [(r.implementation, f"{r.peak_bytes / MIB:,.1f}", f"{r.saved_bytes / MIB:,.1f}")
         for r in rows],
    )
    return "\n".join([
        f"## Peak memory, B={batch} H={heads} S={p['seqlen']} D={p['head_dim']} {p['dtype']} "
        f"{p['variant']}",
        "",
        "torch.cuda.max_memory_allocated during forward + backward (gradients included), "
        "minus what was allocated before (inputs, output gradient). sdpa: the backend torch "
        "picks; naive: softmax(q k^T / sqrt(D)) v in plain torch ops.",
        "",
        table,
        "",
    ])


def run_gpu(out_dir: Path, quick: bool) -> str:
    """Run the CUDA benchmarks and write their tables and summary.md; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"CUDA benchmarks ({environment()}){' --quick' if quick else ''}:", flush=True)
    results = run_gpu_throughput(out_dir, gpu_benchmarks(quick))
    (out_dir / "gpu_throughput.md").write_text(throughput_report(results))
    summary = "\n".join([
        "# ckpt_attn vs SDPA", "", environment(), "",
        "TFLOP/s by FlashAttention-2's convention, median of triton.testing.do_bench; best "
        "SDPA is the fastest of its backends that ran; ratio = ckpt_attn / best SDPA. "
        "Every backend per point: gpu_throughput.md.",
        "",
        VARIANTS_TEXT,
        "",
        markdown_table(("config", "S", "ckpt_attn TFLOP/s", "best SDPA TFLOP/s", "ratio"),
                       summary_rows(results)),
        "",
    ])
    # Written now and again below, so the throughput survives a failure of the memory run.
    (out_dir / "summary.md").write_text(summary)
    memory = memory_report(gpu_peak_memory(**MEMORY_PROBLEM))
    (out_dir / "gpu_memory.md").write_text(memory)
    summary += "\n" + memory
    (out_dir / "summary.md").write_text(summary)
    print("\n" + summary)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the arguments, run the CUDA or else the CPU benchmarks, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a reduced grid (CUDA: bf16 only, S 1024/4096/16384; padded "
                             "and window at S 4096/16384)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_threads(args)
    torch.manual_seed(0)
    start = time.perf_counter()
    if torch.cuda.is_available():
        run_gpu(args.out, args.quick or args.smoke)
    else:
        run_cpu(args.out, SMOKE_CPU_SIZES if args.smoke else
                QUICK_CPU_SIZES if args.quick else CpuSizes())
    print(f"\nDone in {time.perf_counter() - start:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
