"""One rank of the context-parallel tests: joins a gloo group of 4 ranks on 127.0.0.1 and
runs every case with context parallelism over all 4 ranks, then over 2 (ranks {0, 1}
and {2, 3}, two subgroups at once), each against the single-process computation on
the full sequence (which every rank also computes, the shapes being tiny).

tests/test_context_parallel.py spawns the ranks once and asserts on what they report:
for each (group size, case), "ok" and its figures, or the failure. A rank stops at its
first failure (its peers would wait on it), and reports it.
"""

from __future__ import annotations

import copy
import datetime
import os
import time
import traceback

import torch

if not torch.cuda.is_available():  # before ckpt_attn imports triton, as conftest does
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
from reference import (  # noqa: E402
    ATOL,
    FORWARD_FACTOR,
    GRADIENT_FACTOR,
    assert_lse_within_rule,
    assert_within_rule,
    lse_atol,
    max_error,
    naive_outputs_and_grads,
)

import ckpt_attn  # noqa: E402
from ckpt_attn import Transformer, TransformerConfig, apply_checkpointing, memory  # noqa: E402
from ckpt_attn.distributed import (  # noqa: E402
    apply_context_parallel,
    context_parallel_attention,
    ring_bytes_sent,
    shard_sequence,
    unshard_sequence,
)

COLLECTIVE_TIMEOUT_S = 60  # a peer that died makes the others fail, not hang forever

# (name, layout, causal, (B, H_q, H_kv, D), backend, bshd, with dlse): attention cases
ATTENTION_CASES = [
    ("zigzag-causal-mha", "zigzag", True, (2, 4, 4, 16), "torch", False, True),
    ("zigzag-causal-gqa-d13", "zigzag", True, (2, 4, 2, 13), "torch", False, True),
    ("zigzag-full-mqa-d13", "zigzag", False, (1, 4, 1, 13), "torch", True, False),
    ("contiguous-causal-gqa-d13", "contiguous", True, (2, 4, 2, 13), "torch", True, True),
    ("contiguous-full-mha", "contiguous", False, (1, 2, 2, 16), "torch", False, True),
]
TRITON_CASE = ("zigzag-causal-gqa-triton", "zigzag", True, (1, 4, 2, 16), "triton", False,
               True)
POLICIES = ("none", "full", "selective")
# an argument, and what rank r passes for it (ranks 0 and 1 of a group always differ)
DISAGREEMENTS = {
    "causal": lambda rank: {"causal": rank % 2 == 0},
    "dropout_p": lambda rank: {"dropout_p": 0.1 if rank == 0 else 0.0},
    "scale": lambda rank: {"scale": 0.5 if rank == 1 else None},
    "q.shape": lambda rank: {"heads": 2 if rank == 1 else 4},
}


def case_names(world_size: int) -> list[str]:
    """The cases a world size runs, in order."""
    names = ["shard-unshard", "indivisible-length"]
    names += [c[0] for c in attention_cases(world_size)]
    names += ["dropout-zigzag", "dropout-contiguous", "deterministic", "bytes-sent"]
    names += [f"disagree-{argument}" for argument in DISAGREEMENTS]
    names += ["no-double-backward", "no-func-grad"]
    names += [f"transformer-zigzag-{p}" for p in POLICIES] + ["transformer-contiguous-none"]
    names += [f"memory-{p}" for p in POLICIES]
    if world_size == WORLD_SIZE:
        names.append("fsdp2-data-x-context")
    return names


def attention_cases(world_size: int) -> list[tuple]:
    """Attention cases of a world size (the interpreted Triton case at 2 ranks only)."""
    return ATTENTION_CASES + ([TRITON_CASE] if world_size == 2 else [])


WORLD_SIZE = 4
GROUP_SIZES = (4, 2)


def seq_len(world_size: int) -> int:
    """A full length with 3 tokens per zigzag chunk: every layout divides it."""
    return 6 * world_size


def _sharder(group):
    """shard_sequence over group, as _shard(x, layout, dim=2)."""
    return lambda x, layout, dim=2: shard_sequence(x, group=group, dim=dim, layout=layout)


def check_shard_unshard(group):
    world_size, _shard = dist.get_world_size(group), _sharder(group)
    torch.manual_seed(0)  # the same full tensor on every rank
    full = torch.randn(2, 3, seq_len(world_size), 5)
    for layout in ("zigzag", "contiguous"):
        for dim in (2, -2):
            local = _shard(full, layout, dim)
            assert local.shape[2] == seq_len(world_size) // world_size
            assert torch.equal(unshard_sequence(local, group=group, dim=dim, layout=layout),
                               full)
    rank = dist.get_rank(group)
    chunk = seq_len(world_size) // (2 * world_size)
    zigzag = _shard(full, "zigzag")
    assert torch.equal(zigzag[:, :, :chunk], full[:, :, rank * chunk:(rank + 1) * chunk])
    last = 2 * world_size - 1 - rank
    assert torch.equal(zigzag[:, :, chunk:], full[:, :, last * chunk:(last + 1) * chunk])
    return {}


def check_indivisible_length(group):
    world_size = dist.get_world_size(group)
    bad = seq_len(world_size) + 2  # even, not a multiple of 2P for P >= 2
    try:
        shard_sequence(torch.zeros(1, 1, bad, 4), group=group, layout="zigzag")
    except ValueError as error:
        message = str(error)
        assert str(bad) in message and f"world size of {world_size}" in message, message
        return {}
    raise AssertionError("an indivisible length was sharded")


def check_attention(group, layout, causal, dims, backend, bshd, with_dlse):
    world_size, _shard = dist.get_world_size(group), _sharder(group)
    batch, heads, kv_heads, head_dim = dims
    seq = seq_len(world_size)
    torch.manual_seed(1)  # the same full tensors on every rank

    def rand(h):
        if bshd:
            return torch.randn(batch, seq, h, head_dim).transpose(1, 2)
        return torch.randn(batch, h, seq, head_dim)

    q, k, v = rand(heads), rand(kv_heads), rand(kv_heads)
    do = torch.randn(batch, heads, seq, head_dim)
    dlse = torch.randn(batch, heads, seq) if with_dlse else None
    ref = naive_outputs_and_grads(q, k, v, do, causal=causal, dlse=dlse, dtype=torch.float64)
    naive = naive_outputs_and_grads(q, k, v, do, causal=causal, dlse=dlse)
    single = ckpt_attn.attention(*(t.clone().requires_grad_() for t in (q, k, v)),
                                 causal=causal, return_lse=True, backend=backend)

    local = [_shard(t, layout).requires_grad_() for t in (q, k, v)]
    if bshd:  # shard a (B, S, H, D) tensor and pass its transposed view
        local = [_shard(t.transpose(1, 2), layout, dim=1).transpose(1, 2).requires_grad_()
                 for t in (q, k, v)]
    o, lse = context_parallel_attention(*local, group=group, causal=causal, layout=layout,
                                        return_lse=True, backend=backend)
    outputs, grad_outputs = [o], [_shard(do, layout)]
    if with_dlse:
        outputs.append(lse)
        grad_outputs.append(_shard(dlse, layout))
    grads = torch.autograd.grad(outputs, local, grad_outputs)

    atol = ATOL[q.dtype]
    label = f"cp{world_size} {layout} causal={causal}"
    assert_within_rule(o, _shard(naive[0], layout), _shard(ref[0], layout),
                       factor=FORWARD_FACTOR, atol=atol, what=f"{label} O")
    ref_lse = _shard(ref[1], layout)
    assert_lse_within_rule(lse, _shard(naive[1], layout), ref_lse,
                           atol=max(atol, lse_atol(q.dtype, ref_lse)), what=f"{label} lse")
    figures = {"o_err": max_error(o, _shard(ref[0], layout)),
               "o_naive_err": max_error(_shard(naive[0], layout), _shard(ref[0], layout)),
               "o_vs_single": max_error(o, _shard(single[0].detach(), layout)),
               "lse_vs_single": max_error(lse, _shard(single[1].detach(), layout))}
    for name, ours, naive_grad, ref_grad in zip(("dq", "dk", "dv"), grads, naive[2], ref[2],
                                                strict=True):
        assert_within_rule(ours, _shard(naive_grad, layout), _shard(ref_grad, layout),
                           factor=GRADIENT_FACTOR, atol=atol, what=f"{label} {name}")
        figures[f"{name}_err"] = max_error(ours, _shard(ref_grad, layout))
        figures[f"{name}_naive_err"] = max_error(_shard(naive_grad, layout),
                                                 _shard(ref_grad, layout))
    return figures


def check_dropout(group, layout):
    """Dropout drops the very pairs attention() drops on the full sequence after the same
    torch.manual_seed: float64 outputs, lse and gradients equal but for the sums' order."""
    world_size, _shard = dist.get_world_size(group), _sharder(group)
    seq = seq_len(world_size)
    torch.manual_seed(6)
    q, k, v = (torch.randn(2, h, seq, 8, dtype=torch.float64) for h in (4, 2, 2))
    do, dlse = torch.randn(2, 4, seq, 8, dtype=torch.float64), torch.randn(2, 4, seq)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(7)
    o, lse = ckpt_attn.attention(*full, dropout_p=0.3, causal=True, return_lse=True,
                                 backend="torch")
    grads = torch.autograd.grad((o, lse), full, (do, dlse.double()))
    plain = ckpt_attn.attention(q, k, v, causal=True, backend="torch")
    assert max_error(o, plain) > 0.1, "dropout dropped nothing"

    local = [_shard(t, layout).requires_grad_() for t in (q, k, v)]
    torch.manual_seed(7)
    o_cp, lse_cp = context_parallel_attention(*local, group=group, dropout_p=0.3, causal=True,
                                              layout=layout, return_lse=True,
                                              backend="torch")
    grads_cp = torch.autograd.grad((o_cp, lse_cp), local,
                                   (_shard(do, layout), _shard(dlse.double(), layout)))
    errors = {"o": _relative(o_cp, _shard(o.detach(), layout)),
              "lse": _relative(lse_cp, _shard(lse.detach(), layout))}
    for name, ours, whole in zip(("dq", "dk", "dv"), grads_cp, grads, strict=True):
        errors[name] = _relative(ours, _shard(whole, layout))
    worst = max(errors.values())
    assert worst < 1e-12, f"largest relative error {worst:.3e}: {errors}"
    return {"worst_relative_error": worst}


def _cp_step(group, layout="zigzag", seed=2):
    torch.manual_seed(seed)
    seq, _shard = seq_len(dist.get_world_size(group)), _sharder(group)
    q, k, v = (_shard(torch.randn(2, h, seq, 8), layout).requires_grad_() for h in (4, 2, 2))
    o = context_parallel_attention(q, k, v, group=group, causal=True, layout=layout,
                                   backend="torch")
    return torch.autograd.grad(o, (q, k, v), _shard(torch.randn(2, 4, seq, 8), layout))


def check_disagreement(group, argument):
    """Ranks passing different values of one argument: every rank raises a ValueError
    naming it, before any transfer of the ring (a transfer left unpaired would hang the
    ranks until the collective timeout), and the group works afterwards."""
    rank, seq = dist.get_rank(group), seq_len(dist.get_world_size(group))
    options = DISAGREEMENTS[argument](rank)
    heads = options.pop("heads", 4)
    q, k, v = (torch.randn(2, h, seq // dist.get_world_size(group), 8, requires_grad=True)
               for h in (heads, 2, 2))
    start = time.perf_counter()
    try:
        context_parallel_attention(q, k, v, group=group, backend="torch",
                                   **{"causal": True} | options)
    except ValueError as error:
        message = str(error)
        assert f"disagree on {argument}" in message and "rank 1:" in message, message
    else:
        raise AssertionError(f"ranks disagreeing on {argument} were not refused")
    seconds = time.perf_counter() - start
    assert seconds < COLLECTIVE_TIMEOUT_S / 2, f"refused only after {seconds:.1f} s"
    _cp_step(group)  # the ring still pairs up
    return {"refused_in_s": seconds}


def check_no_double_backward(group):
    """create_graph=True works; the gradient of that gradient is refused by name."""
    q, k, v = _cp_inputs(group)
    o = context_parallel_attention(q, k, v, group=group, causal=True, backend="torch")
    (dq,) = torch.autograd.grad(o.sum(), q, create_graph=True)
    try:
        dq.sum().backward()
    except RuntimeError as error:
        message = str(error)
        assert "context_parallel_attention has no double backward" in message, message
        assert "scaled_dot_product_attention" in message, message
        return {}
    raise AssertionError("a double backward through ring attention was not refused")


def check_no_func_grad(group):
    """torch.func.grad over ring attention is refused by name, before any transfer."""
    q, k, v = _cp_inputs(group)
    try:
        torch.func.grad(lambda q: context_parallel_attention(
            q, k, v, group=group, causal=True, backend="torch").sum())(q.detach())
    except RuntimeError as error:
        message = str(error)
        assert "context_parallel_attention does not support torch.func's grad" in message, \
            message
        return {}
    raise AssertionError("torch.func.grad over ring attention was not refused")


def _cp_inputs(group):
    torch.manual_seed(3)
    local = seq_len(dist.get_world_size(group)) // dist.get_world_size(group)
    return [torch.randn(1, h, local, 8, requires_grad=True) for h in (2, 2, 2)]


def check_deterministic(group):
    first, second = _cp_step(group), _cp_step(group)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b), "backward is not bitwise reproducible"
    return {}


def check_bytes_sent(group):
    """Bytes handed to batch_isend_irecv's sends in one forward and one backward."""
    sent = {"forward": 0, "backward": 0}
    phase = ["forward"]
    original = dist.batch_isend_irecv

    def counting(p2p_ops):
        sent[phase[0]] += sum(op.tensor.numel() * op.tensor.element_size() for op in p2p_ops
                              if op.op is dist.isend)
        return original(p2p_ops)

    world_size = dist.get_world_size(group)
    torch.manual_seed(3)
    local_len = seq_len(world_size) // world_size
    q, k, v = (torch.randn(2, h, local_len, 8, requires_grad=True) for h in (4, 2, 2))
    dist.batch_isend_irecv = counting
    try:
        o = context_parallel_attention(q, k, v, group=group, causal=True, backend="torch")
        phase[0] = "backward"
        o.sum().backward()
    finally:
        dist.batch_isend_irecv = original
    expected = ring_bytes_sent(2, 4, 2, local_len, 8, torch.float32, world_size)
    assert (sent["forward"], sent["backward"]) == (expected.forward, expected.backward), (
        sent, expected)
    return {"sent_forward": sent["forward"], "sent_backward": sent["backward"]}


def _model_config(world_size):
    return TransformerConfig(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                             ffn_hidden_size=48, max_seq_len=seq_len(world_size),
                             backend="torch")


def check_transformer(group, layout, policy):
    """A 2-layer float64 Transformer under CP and a checkpoint policy against the same
    model in one process: loss, input and parameter gradients."""
    world_size, _shard = dist.get_world_size(group), _sharder(group)
    torch.manual_seed(4)
    single = Transformer(_model_config(world_size)).double()
    parallel = apply_context_parallel(copy.deepcopy(single), group, layout=layout)
    apply_checkpointing(parallel, policy)
    x = torch.randn(2, seq_len(world_size), 32, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, seq_len(world_size), 32, dtype=torch.float64)
    loss = (single(x) * weight).sum()
    loss.backward()

    x_local = _shard(x.detach(), layout, dim=1).requires_grad_()
    local_loss = (parallel(x_local) * _shard(weight, layout, dim=1)).sum()
    local_loss.backward()
    total = local_loss.detach().clone()
    dist.all_reduce(total, group=group)
    errors = {"loss": abs(total.item() - loss.item()) / abs(loss.item()),
              "dx": _relative(x_local.grad, _shard(x.grad, layout, dim=1))}
    for (name, p_single), p_parallel in zip(single.named_parameters(), parallel.parameters(),
                                            strict=True):
        grad = p_parallel.grad.clone()
        dist.all_reduce(grad, group=group)  # each rank holds its tokens' share of the sum
        errors[name] = _relative(grad, p_single.grad)
    worst = max(errors.values())
    # float64: only the order of the sums differs
    assert worst < 1e-12, f"largest relative error {worst:.3e}: {errors}"
    return {"worst_relative_error": worst}


def check_fsdp2_data_by_context(group):
    """A 2-D mesh (data 2 x context 2): CP over "context", FSDP2 (fully_shard) over all
    4 ranks, "full" checkpointing; each data rank runs its half of the batch. The
    gradients, reduced by FSDP2 (averaged over the 4 ranks), times 4, are the
    single-process model's on the whole batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("data", "context"))
    everyone = init_device_mesh("cpu", (WORLD_SIZE,))
    torch.manual_seed(8)
    single = Transformer(_model_config(2)).double()
    parallel = apply_context_parallel(copy.deepcopy(single), mesh["context"])
    apply_checkpointing(parallel, "full")
    for layer in parallel.layers:
        fully_shard(layer, mesh=everyone)
    fully_shard(parallel, mesh=everyone)
    x = torch.randn(4, seq_len(2), 32, dtype=torch.float64)
    single(x).sum().backward()
    data_rank = mesh["data"].get_local_rank()
    mine = shard_sequence(x[2 * data_rank:2 * data_rank + 2], group=mesh["context"], dim=1)
    parallel(mine).sum().backward()
    errors = {name: _relative(p_parallel.grad.full_tensor() * WORLD_SIZE, p_single.grad)
              for (name, p_single), p_parallel in zip(single.named_parameters(),
                                                      parallel.parameters(), strict=True)}
    worst = max(errors.values())
    assert worst < 1e-12, f"largest relative error {worst:.3e}: {errors}"
    return {"worst_relative_error": worst}


def _relative(ours, reference):
    return max_error(ours, reference) / max(reference.abs().max().item(), 1e-300)


def check_memory(group, policy):
    """Per-rank kept bytes and FLOPs under CP against one process, with memory.measure."""
    world_size, _shard = dist.get_world_size(group), _sharder(group)
    torch.manual_seed(5)
    single = Transformer(_model_config(world_size))
    parallel = apply_context_parallel(copy.deepcopy(single), group)
    for model in (single, parallel):
        apply_checkpointing(model, policy)
    x = torch.randn(2, seq_len(world_size), 32)
    whole = memory.measure(single, x)
    ours = memory.measure(parallel, _shard(x, "zigzag", dim=1))
    kept = torch.tensor([ours.kept_bytes, ours.peak_bytes, ours.forward_flops,
                         ours.backward_flops, ours.recompute_flops], dtype=torch.float64)
    every = [torch.zeros_like(kept) for _ in range(world_size)]
    dist.all_gather(every, kept, group=group)
    assert all(int(e[0]) == ours.kept_bytes for e in every), "ranks keep different bytes"
    assert ours.kept_bytes * world_size == whole.kept_bytes, (ours.kept_bytes,
                                                              whole.kept_bytes)
    flops = sum(every)
    assert (int(flops[2]), int(flops[3]), int(flops[4])) == (
        whole.forward_flops, whole.backward_flops, whole.recompute_flops), (flops, whole)
    predicted = memory.estimate(_model_config(world_size), batch=2, seq=seq_len(world_size),
                                policy=policy, dtype=torch.float32,
                                context_parallel=world_size)
    assert predicted.kept_bytes == ours.kept_bytes, (predicted.kept_bytes, ours.kept_bytes)
    # measure sees ops whole: its peak is the estimate's without the ring's inner buffers
    assert predicted.peak_bytes - predicted.ring_buffer_bytes == ours.peak_bytes, (
        predicted.peak_bytes, predicted.ring_buffer_bytes, ours.peak_bytes)
    assert predicted.step_flops == ours.forward_flops + ours.backward_flops \
        - ours.recompute_flops, (predicted.step_flops, ours)
    assert predicted.recompute_flops == ours.recompute_flops, (predicted, ours)
    return {"kept_per_rank": ours.kept_bytes, "kept_single": whole.kept_bytes,
            "peak_per_rank": ours.peak_bytes, "peak_single": whole.peak_bytes,
            "predicted_peak_per_rank": predicted.peak_bytes,
            "ring_buffer_bytes": predicted.ring_buffer_bytes,
            "forward_flops_per_rank": [int(e[2]) for e in every]}


def _cases(group):
    world_size = dist.get_world_size(group)
    cases = [("shard-unshard", lambda: check_shard_unshard(group)),
             ("indivisible-length", lambda: check_indivisible_length(group))]
    for name, *spec in attention_cases(world_size):
        cases.append((name, lambda spec=spec: check_attention(group, *spec)))
    cases += [("dropout-zigzag", lambda: check_dropout(group, "zigzag")),
              ("dropout-contiguous", lambda: check_dropout(group, "contiguous")),
              ("deterministic", lambda: check_deterministic(group)),
              ("bytes-sent", lambda: check_bytes_sent(group))]
    cases += [(f"disagree-{argument}", lambda a=argument: check_disagreement(group, a))
              for argument in DISAGREEMENTS]
    cases += [("no-double-backward", lambda: check_no_double_backward(group)),
              ("no-func-grad", lambda: check_no_func_grad(group))]
    for policy in POLICIES:
        cases.append((f"transformer-zigzag-{policy}",
                      lambda p=policy: check_transformer(group, "zigzag", p)))
    cases.append(("transformer-contiguous-none",
                  lambda: check_transformer(group, "contiguous", "none")))
    for policy in POLICIES:
        cases.append((f"memory-{policy}", lambda p=policy: check_memory(group, p)))
    if world_size == WORLD_SIZE:
        cases.append(("fsdp2-data-x-context", lambda: check_fsdp2_data_by_context(group)))
    assert [name for name, _ in cases] == case_names(world_size)
    return cases


def _groups(rank: int) -> list[dist.ProcessGroup]:
    """This rank's group of each size in GROUP_SIZES (every rank creates every subgroup,
    as new_group requires)."""
    mine = []
    for size in GROUP_SIZES:
        if size == WORLD_SIZE:
            mine.append(dist.group.WORLD)
            continue
        for first in range(0, WORLD_SIZE, size):
            group = dist.new_group(list(range(first, first + size)))
            if first <= rank < first + size:
                mine.append(group)
    return mine


def run(rank: int, port: int, results) -> None:
    """Entry point of a spawned rank: put (rank, {(group size, case): ("ok", figures) or
    ("failed", traceback)}) on the `results` queue, stopping at the first failure."""
    torch.set_num_threads(1)
    outcome = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORLD_SIZE,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        for group in _groups(rank):
            size = dist.get_world_size(group)
            for name, case in _cases(group):
                try:
                    start = time.perf_counter()
                    figures = case()
                    outcome[size, name] = ("ok", figures
                                           | {"seconds": time.perf_counter() - start})
                except Exception:
                    outcome[size, name] = ("failed", traceback.format_exc())
                    raise
    except Exception:
        outcome.setdefault((0, "setup"), ("failed", traceback.format_exc()))
    finally:
        results.put((rank, outcome))
        if dist.is_initialized():
            dist.destroy_process_group()
