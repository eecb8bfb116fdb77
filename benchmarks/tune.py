"""Measure the launch table's candidates on the GPU at hand and keep the fastest (`make tune`).

For each kernel (forward, dQ, dK/dV) and head dim it times the op with one
candidate forced for that kernel (the others at their first choice), by
triton.testing.do_bench on FlashAttention-2's grid point B * S = 16384
tokens, H * D = 2048, S = 4096, bf16, averaged over causal and not. The
candidates are the table's own plus a small grid around them; one that does
not fit the device (OutOfResources) is skipped. The fastest go to
kernels/tuned/sm_<arch>.json, which kernels/launch_config.py puts first from
then on; every time measured is kept in the file too.

    python -m ckpt_attn.benchmarks.tune [--head-dim 64 128 256] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch
import triton
from triton.runtime.errors import OutOfResources

from ckpt_attn.kernels import backward, forward, launch_config
from ckpt_attn.kernels.launch_config import KERNELS, TUNED_DIR, LaunchConfig

TOKENS, WIDTH, SEQLEN = 16384, 2048, 4096


def search_space(kernel: str, arch: int, block_d: int, quick: bool) -> list[LaunchConfig]:
    """The table's candidates, then (unless quick) a grid of tiles, warps and stages."""
    listed = launch_config.candidates(kernel, arch, block_d, element_size=2)
    if quick:
        return listed
    grid = [LaunchConfig(m, n, w, s) for m, n, w, s in
            itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (2, 3))]
    return listed + [c for c in grid if c not in listed]


def time_config(kernel: str, config: LaunchConfig, head_dim: int) -> float | None:
    """Median ms of the pass that runs `kernel` (forward, or the whole backward) with
    `config` forced for it, averaged over causal and not; None if it does not fit."""
    heads, batch = WIDTH // head_dim, TOKENS // SEQLEN
    q, k, v, do = (torch.randn(batch, heads, SEQLEN, head_dim, device="cuda",
                               dtype=torch.bfloat16) for _ in range(4))
    scale = head_dim**-0.5
    original = launch_config.candidates

    def forced(name, *args, **kwargs):  # the plain (unmasked) kernels are the ones timed
        return [config] if name == kernel else original(name, *args, **kwargs)

    launch_config.candidates = forced
    launch_config._chosen.clear()
    try:
        times = []
        for causal in (False, True):
            o, lse = forward.attention_forward(q, k, v, causal, scale)
            if kernel == "fwd":
                def run(causal=causal):
                    forward.attention_forward(q, k, v, causal, scale)
            else:
                def run(causal=causal, o=o, lse=lse):
                    backward.attention_backward(do, None, q, k, v, o, lse, causal, scale)
            times.append(triton.testing.do_bench(run, warmup=10, rep=50))
        return statistics.mean(times)
    except OutOfResources:
        return None
    finally:
        launch_config.candidates = original
        launch_config._chosen.clear()


def main() -> None:
    """Tune every kernel and head dim; write kernels/tuned/sm_<arch>.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--quick", action="store_true", help="only the table's candidates")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("make tune needs a CUDA GPU: it measures the kernels")
    arch = launch_config.current_arch()
    best, measured = {}, {}
    for kernel, head_dim in itertools.product(KERNELS, args.head_dim):
        block_d = launch_config.padded_head_dim(head_dim)
        timings = {}
        for config in search_space(kernel, arch, block_d, args.quick):
            ms = time_config(kernel, config, head_dim)
            if ms is not None:
                timings[config] = ms
                print(f"{kernel} D={head_dim} {config}: {ms:.3f} ms", flush=True)
        fastest = min(timings, key=timings.get)
        best.setdefault(kernel, {})[str(block_d)] = list(vars(fastest).values())
        measured.setdefault(kernel, {})[str(block_d)] = [
            [*vars(c).values(), round(ms, 4)] for c, ms in sorted(timings.items(),
                                                                   key=lambda item: item[1])]
    TUNED_DIR.mkdir(exist_ok=True)
    path = TUNED_DIR / f"sm_{arch}.json"
    path.write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "shape": {"tokens": TOKENS, "width": WIDTH,
                                                "seqlen": SEQLEN, "dtype": "bf16"},
        "best": best,
        "measured_ms": measured,  # [BLOCK_M, BLOCK_N, warps, stages, ms], fastest first
    }, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
