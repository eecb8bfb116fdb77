"""Every checkpoint policy under torch.compile (inductor, fullgraph=True) on a tiny
ckpt_attn.Transformer (torch backend): no graph break, and the loss and every gradient
equal to the same policy in eager mode.

One model holds a Transformer per policy and is compiled once (each inductor compile
costs tens of seconds of C++ compilation on the CPU): its one graph and zero breaks,
counted by Dynamo's own counters (torch._dynamo.utils.counters: "stats"/"unique_graphs"
and "graph_break"), are every policy's. The budget policy is planned in eager mode
first (its planner cannot be traced), then compiled.

Storage "cpu" is left out: it offloads to pinned host memory on CUDA, and on the CPU
keeps tensors where they are (tests/test_checkpointing.py checks that). Storages "int8"
and "fp8" quantize inside the compiled graph (eager mode quantizes through
saved_tensors_hooks, which Dynamo does not trace): tested below, one graph, gradients
equal to eager's and int8/fp8 codes kept in place of each layer's input.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from saved_bytes import saved_tensors
from torch import nn
from torch._dynamo.utils import counters

import ckpt_attn
from ckpt_attn import apply_checkpointing

POLICIES = [("none", {}), ("full", {}), ("uniform", {"every": 2}), ("sqrt", {}),
            ("ratio", {"ratio": 0.5}), ("selective", {}), ("budget", {"budget_bytes": None})]
IDS = [name for name, _ in POLICIES]


def make_model() -> ckpt_attn.Transformer:
    torch.manual_seed(0)
    cfg = ckpt_attn.TransformerConfig(num_layers=2, hidden_size=16, num_heads=2,
                                      num_kv_heads=1, ffn_hidden_size=32, backend="torch")
    return ckpt_attn.Transformer(cfg)


def inputs() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 8, 16, requires_grad=True)


def step(model, x):
    """Loss and the gradients of every parameter and of x."""
    model.zero_grad()
    x.grad = None
    loss = model(x).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]


def options_of(policy: str, options: dict, x: torch.Tensor) -> dict:
    """The policy's options; for "budget", half way between the peaks of "full" and
    "none", so the plan mixes modes."""
    if policy != "budget":
        return options
    from ckpt_attn.memory import measure

    model = make_model()
    none_peak = measure(model, x).peak_bytes
    apply_checkpointing(model, "full")
    return {"budget_bytes": (none_peak + measure(model, x).peak_bytes) / 2}


class AllPolicies(nn.Module):
    """One model per policy, each on its own input; forward gives their losses. Compiling
    it compiles every policy in one inductor run (a C++ compile costs seconds of CPU)."""

    def __init__(self, inputs: torch.Tensor):
        super().__init__()
        self.models = nn.ModuleList(apply_checkpointing(make_model(), policy,
                                                        **options_of(policy, options, inputs))
                                    for policy, options in POLICIES)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.stack([model(x).square().mean()
                            for model, x in zip(self.models, xs, strict=True)])


def all_steps(model: AllPolicies, xs: list[torch.Tensor]):
    """Per policy: its loss, and the gradients of its parameters and of its input."""
    model.zero_grad()
    for x in xs:
        x.grad = None
    losses = model(*xs)
    losses.sum().backward()
    return [(loss.detach(), [p.grad.clone() for p in sub.parameters()] + [x.grad.clone()])
            for loss, sub, x in zip(losses, model.models, xs, strict=True)]


def test_every_policy_compiles_with_inductor_in_one_graph_equal_to_eager():
    xs = [inputs() for _ in POLICIES]
    model = AllPolicies(xs[0])
    eager = all_steps(model, xs)  # also plans "budget" for this shape
    torch._dynamo.reset()
    counters.clear()
    # one compile process: a pool of compile workers costs more than it saves here
    with torch._inductor.config.patch(compile_threads=1):
        compiled = all_steps(torch.compile(model, backend="inductor", fullgraph=True), xs)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    for name, got, want in zip(IDS, compiled, eager, strict=True):
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5, msg=name)
        for got_grad, want_grad in zip(got[1], want[1], strict=True):
            torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-5, msg=name)


def test_budget_without_an_eager_plan_asks_for_one():
    model = apply_checkpointing(make_model(), "budget", budget_bytes=2**30)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="run the model once in eager mode"):
        torch.compile(model, backend="eager", fullgraph=True)(inputs())


@pytest.mark.parametrize("policy, options, storage, code_dtype", [
    ("full", {}, "int8", torch.int8), ("full", {}, "fp8", torch.float8_e4m3fn),
    ("uniform", {"every": 2}, "int8", torch.int8)], ids=["full-int8", "full-fp8", "group-int8"])
def test_quantized_storage_compiles_in_one_graph_and_keeps_codes(policy, options, storage,
                                                                  code_dtype):
    """int8/fp8 under inductor, of one layer and of a group: one graph, loss and gradients
    equal to eager (which stores through saved_tensors_hooks), and the compiled forward
    keeps segment inputs only as codes and per-row scales: no floating tensor of the
    hidden shape."""
    x = inputs()
    model = apply_checkpointing(make_model(), policy, storage=storage, **options)
    eager = step(model, x)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    with torch._inductor.config.patch(compile_threads=1):
        got = step(compiled, x)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch.testing.assert_close(got[0], eager[0], atol=1e-6, rtol=1e-5)
    for got_grad, want_grad in zip(got[1], eager[1], strict=True):
        torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-5)

    kept = list(saved_tensors(compiled, x).values())
    hidden, rows = tuple(x.shape), x.shape[0] * x.shape[1]
    assert ("cpu", code_dtype, hidden, x.numel()) in kept, kept
    assert not [s for s in kept if s[1].is_floating_point and s[2] == hidden
                and s[1] != code_dtype], kept
    # at most: per layer its codes and scales; the final norm's row statistics
    most = len(model.layers) * (x.numel() + 4 * rows) + 4 * rows
    assert sum(nbytes for *_, nbytes in kept) <= most, kept
