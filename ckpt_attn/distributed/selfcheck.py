"""A context-parallel check and benchmark row, run by torchrun on every rank:

    torchrun --nproc-per-node 2 -m ckpt_attn.distributed.selfcheck [--seq-per-rank N]

On GPUs (NCCL, bfloat16, the Triton kernels) and on the CPU (gloo, float32, the torch
backend). Every rank builds the same full-sequence q, k, v and dO, runs
context_parallel_attention on its zigzag shard and ckpt_attn.attention on the whole
sequence, and checks the project's accuracy rule against a float32 computation of the
whole sequence (float64 on the CPU): the errors of O and lse at most 2x, of dq, dk and
dv at most 3x those of single-device attention at the same precision. Rank 0 prints
one row per check (the worst rank), the timings of both, the bytes each rank sent
and, on GPUs, the peak memory of both and torch's own context parallelism (SDPA
rerouted by torch.distributed.tensor.experimental.context_parallel) on the same
inputs. The exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

from ..ops import attention
from .attention import context_parallel_attention
from .costs import ring_buffer_bytes, ring_bytes_sent
from .sharding import shard_sequence

HEADS, KV_HEADS, HEAD_DIM = 16, 4, 128
REPEATS = 5


def _timed(fn) -> float:
    """Median seconds of fn() over REPEATS runs after one warm-up, synchronized."""
    fn()
    times = []
    for _ in range(REPEATS):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _run(fn, q, k, v, do):
    """(O, lse, dq, dk, dv) of fn(q, k, v) -> (O, lse) for the loss <O, do>."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    o, lse = fn(*leaves)
    grads = torch.autograd.grad(o, leaves, do)
    return (o.detach(), lse.detach(), *grads)


def _worst(value: float) -> float:
    """The largest value over the ranks."""
    t = torch.tensor([value], dtype=torch.float64,
                     device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _torch_context_parallel(q, k, v, do, o_ours, device) -> str:
    """Torch's own CP on the same inputs (k and v repeated to q's heads for SDPA's fused
    kernels): the largest difference from our O (both zigzag shards: torch's head-tail
    load balancer gives rank r chunks r and 2P-1-r), its time and peak memory, or why it
    cannot run."""
    try:
        import torch.nn.functional as F
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        group = q.shape[1] // k.shape[1]
        buffers = [q.clone(), k.repeat_interleave(group, dim=1),
                   v.repeat_interleave(group, dim=1), do.clone()]
        outputs = []
        with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2] * 4,
                              no_restore_buffers=set(buffers)):
            def step():
                leaves = [t.detach().requires_grad_() for t in buffers[:3]]
                o = F.scaled_dot_product_attention(*leaves, is_causal=True)
                torch.autograd.grad(o, leaves, buffers[3])
                outputs[:] = [o.detach()]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = _timed(step)
            peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
        difference = _worst((outputs[0].float() - o_ours.float()).abs().max().item())
        return (f"torch context_parallel: max |O - ours| {difference:.3e}, forward+backward "
                f"{seconds * 1e3:.2f} ms, peak {peak / 2**20:.1f} MiB")
    except Exception as error:  # report, do not fail: an experimental torch API
        return f"torch context_parallel: unavailable ({type(error).__name__}: {error})"


def main(argv=None) -> int:
    """Run the check on this rank; the exit status (0: every check within the rule)."""
    parser = argparse.ArgumentParser(prog="python -m ckpt_attn.distributed.selfcheck")
    parser.add_argument("--seq-per-rank", type=int, default=None,
                        help="tokens per rank (default 8192 on GPUs, 128 on the CPU)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    local = args.seq_per_rank or (8192 if cuda else 128)
    seq = local * world
    torch.manual_seed(0)
    full = [torch.randn(1, h, seq, HEAD_DIM, device=device) for h in (HEADS, KV_HEADS,
                                                                      KV_HEADS, HEADS)]
    q, k, v, do = (t.to(dtype) for t in full)
    ours = _run(lambda *t: context_parallel_attention(*t, causal=True, return_lse=True),
                *(shard_sequence(t) for t in (q, k, v, do)))
    single = _run(lambda *t: attention(*t, causal=True, return_lse=True), q, k, v, do)
    reference_dtype = torch.float32 if cuda else torch.float64  # (the kernels: no float64)
    exact = _run(lambda *t: attention(*t, causal=True, return_lse=True),
                 *(t.to(reference_dtype) for t in full))
    failed = False
    for i, (name, factor) in enumerate([("O", 2), ("lse", 2), ("dq", 3), ("dk", 3),
                                        ("dv", 3)]):
        reference = shard_sequence(exact[i])
        err = _worst((ours[i].to(reference.dtype) - reference).abs().max().item())
        err_single = _worst((shard_sequence(single[i]).to(reference.dtype) - reference)
                            .abs().max().item())
        ok = err <= factor * err_single + 1e-6
        failed |= not ok
        if rank == 0:
            print(f"{name:>3}: context-parallel error {err:.3e}, single-device {err_single:.3e}"
                  f" ({err / max(err_single, 1e-30):.2f}x, rule {factor}x) "
                  f"{'ok' if ok else 'FAILED'}")
    shards = [shard_sequence(t) for t in (q, k, v, do)]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ms_cp = _timed(lambda: _run(lambda *t: context_parallel_attention(
        *t, causal=True, return_lse=True), *shards)) * 1e3
    peak_cp = torch.cuda.max_memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ms_single = _timed(lambda: _run(lambda *t: attention(*t, causal=True, return_lse=True),
                                    q, k, v, do)) * 1e3
    peak_single = torch.cuda.max_memory_allocated() if cuda else 0
    sent = ring_bytes_sent(1, HEADS, KV_HEADS, local, HEAD_DIM, dtype, world)
    held = ring_buffer_bytes(1, HEADS, KV_HEADS, local, HEAD_DIM, dtype, world)
    row = _torch_context_parallel(q, k, v, do, ours[0], device)
    if rank == 0:
        print(f"ranks {world}, seq {seq} ({local} per rank), {dtype}, causal, H {HEADS}/"
              f"{KV_HEADS}, D {HEAD_DIM}: forward+backward {ms_cp:.2f} ms per rank vs "
              f"{ms_single:.2f} ms for the whole sequence on one device")
        print(f"sent per rank: forward {sent.forward / 2**20:.2f} MiB, backward "
              f"{sent.backward / 2**20:.2f} MiB; ring buffers {held.backward / 2**20:.2f} MiB")
        if cuda:
            print(f"peak memory: context-parallel {peak_cp / 2**20:.1f} MiB per rank, "
                  f"single device {peak_single / 2**20:.1f} MiB (inputs included)")
        print(row)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
