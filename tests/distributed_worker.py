"""One rank of tests/test_distributed.py: every checkpoint policy under DDP and FSDP2,
applied before and after the wrapper, trained for a few steps on this rank's half of a
global batch and compared with one process training on the whole batch.

Run as ``python distributed_worker.py RANK WORLD_SIZE STORE_PORT OUT_DIR``: it joins the
gloo group through the TCPStore the parent holds on 127.0.0.1:STORE_PORT, runs every
case, writes ``OUT_DIR/rank<RANK>.json`` ({case: {"loss", "grads", "params"}: the
largest absolute differences from the one-process run, and "recomputed_layers": how
many layers the backward ran again}, or {"error": traceback}),
frees the models, destroys the group and leaves with os._exit, so that no gloo thread
or destructor left behind can keep the process alive or abort it at interpreter exit.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import ckpt_attn
from ckpt_attn import apply_checkpointing
from ckpt_attn.memory import measure

COLLECTIVE_TIMEOUT_S = 60
STEPS = 3
LR = 0.05
GLOBAL_BATCH, SEQ, HIDDEN = 4, 6, 32
POLICIES = {"none": {}, "full": {}, "uniform": {"every": 2}, "sqrt": {}, "ratio": {"ratio": 0.5},
            "selective": {}, "budget": {}}
WRAPPERS = ("ddp", "fsdp2")
ORDERS = ("policy-then-wrap", "wrap-then-policy")


def case_names() -> list[str]:
    """Every case a rank runs: wrapper/order/policy."""
    return [f"{wrapper}/{order}/{policy}" for wrapper in WRAPPERS for order in ORDERS
            for policy in POLICIES]


def make_model() -> ckpt_attn.Transformer:
    """The same tiny Transformer on every rank (4 layers, so sqrt groups 2 of them)."""
    torch.manual_seed(0)
    cfg = ckpt_attn.TransformerConfig(num_layers=4, hidden_size=HIDDEN, num_heads=4,
                                      num_kv_heads=2, backend="torch")
    return ckpt_attn.Transformer(cfg)


def global_batch(step: int) -> torch.Tensor:
    """The global batch of a step, the same on every rank."""
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, SEQ, HIDDEN, generator=generator)


def loss_of(model, x: torch.Tensor) -> torch.Tensor:
    """Mean square of the output: the global batch's loss is the mean of the ranks'."""
    return model(x).square().mean()


def reference_run() -> tuple[list, list, dict]:
    """One process on the whole batch, no checkpointing: per step the loss and the
    gradients, and the parameters after the last step."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], []
    for step in range(STEPS):
        loss = loss_of(model, global_batch(step))
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        optimizer.step()
        optimizer.zero_grad()
    return losses, grads, {name: p.detach().clone() for name, p in model.named_parameters()}


def budget_options(rank_batch: torch.Tensor) -> dict:
    """A budget between the peaks of "full" and "none" for this rank's input, so the plan
    mixes modes."""
    model = make_model()
    none_peak = measure(model, rank_batch).peak_bytes
    apply_checkpointing(model, "full")
    full_peak = measure(model, rank_batch).peak_bytes
    return {"budget_bytes": (none_peak + full_peak) / 2}


def wrap(model, wrapper: str):
    """model under DDP, or under FSDP2 (each layer, then the root, sharded)."""
    if wrapper == "ddp":
        return DistributedDataParallel(model)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter or gradient."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def run_case(wrapper: str, order: str, policy: str, options: dict, reference) -> dict:
    """Train the case for STEPS steps on this rank's half of each global batch; the
    largest differences from the reference."""
    ref_losses, ref_grads, ref_params = reference
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    if order == "policy-then-wrap":
        apply_checkpointing(model, policy, **options)
        model = wrap(model, wrapper)
    else:
        model = wrap(model, wrapper)
        apply_checkpointing(model, policy, **options)
    inner = model.module if wrapper == "ddp" else model
    named = list(inner.named_parameters())
    optimizer = torch.optim.SGD([p for _, p in named], lr=LR)
    worst = {"loss": 0.0, "grads": 0.0, "params": 0.0}
    recomputed = set()  # layers whose MLP ran again in a backward: the policy at work

    def note_recomputation(index: int) -> None:
        if torch._C._current_graph_task_id() != -1:
            recomputed.add(index)

    for index, layer in enumerate(inner.layers):
        layer.mlp.register_forward_pre_hook(lambda *_, i=index: note_recomputation(i))
    for step in range(STEPS):
        loss = loss_of(model, global_batch(step).chunk(world)[rank])
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        worst["loss"] = max(worst["loss"], (mean_loss - ref_losses[step]).abs().item())
        for name, p in named:
            difference = (full(p.grad) - ref_grads[step][name]).abs().max().item()
            worst["grads"] = max(worst["grads"], difference)
        optimizer.step()
        optimizer.zero_grad()
    for name, p in named:
        difference = (full(p.detach()) - ref_params[name]).abs().max().item()
        worst["params"] = max(worst["params"], difference)
    worst["recomputed_layers"] = len(recomputed)
    return worst


def main(rank: int, world: int, port: int, out_dir: str) -> None:
    """Run every case and write this rank's results (see the module docstring)."""
    torch.set_num_threads(1)
    results = {}
    try:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                              timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        reference = reference_run()
        options = dict(POLICIES, budget=budget_options(global_batch(0).chunk(world)[rank]))
        for name in case_names():
            wrapper, order, policy = name.split("/")
            results[name] = run_case(wrapper, order, policy, options[policy], reference)
        dist.barrier()  # every rank is done with collectives before any leaves
    except Exception:
        results["error"] = traceback.format_exc()
    finally:
        path = os.path.join(out_dir, f"rank{rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(results, f)
        os.replace(path + ".tmp", path)
        # free every DDP/FSDP2 object that still holds the group before destroying it:
        # destroying a gloo group that a live DDP reducer holds sometimes aborts the
        # process ("terminate called without an active exception")
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
