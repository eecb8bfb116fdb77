"""Every checkpoint policy under torch.compile (inductor, fullgraph=True) on a tiny
ckpt_attn.Transformer (torch backend): no graph break, and the loss and every gradient
equal to the same policy in eager mode.

One model holds a Transformer per policy and is compiled once (each inductor compile
costs tens of seconds of C++ compilation on the CPU): its one graph and zero breaks,
counted by Dynamo's own counters (torch._dynamo.utils.counters: "stats"/"unique_graphs"
and "graph_break"), are every policy's. The budget policy is planned in eager mode
first there; below, a Transformer's budget plan is made from its shape while Dynamo
traces the first compiled call, and another model's at apply time (example_inputs=).

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


def compiled_step(model, x, backend: str = "inductor"):
    """model compiled with fullgraph=True from a fresh Dynamo state, and its step(),
    asserting it traced one graph with no breaks: (compiled model, step result)."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    # one compile process: a pool of compile workers costs more than it saves here
    with torch._inductor.config.patch(compile_threads=1):
        got = step(compiled, x)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    return compiled, got


def assert_same_step(got, want, msg=None):
    """Loss and every gradient of two step() results agree (atol 1e-6, rtol 1e-5)."""
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5, msg=msg)
    for got_grad, want_grad in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-5, msg=msg)


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
        assert_same_step(got, want, msg=name)


def budget_of(model: nn.Module, x: torch.Tensor) -> float:
    """A budget half way between the peaks of "full" and "none" on x, so the plan mixes
    modes (model is left with no policy)."""
    from ckpt_attn.memory import measure

    none_peak = measure(apply_checkpointing(model, "none"), x).peak_bytes
    full_peak = measure(apply_checkpointing(model, "full"), x).peak_bytes
    apply_checkpointing(model, "none")
    return (none_peak + full_peak) / 2


def wider_model(num_layers: int = 3) -> ckpt_attn.Transformer:
    torch.manual_seed(0)
    cfg = ckpt_attn.TransformerConfig(num_layers=num_layers, hidden_size=64, num_heads=4,
                                      num_kv_heads=2, ffn_hidden_size=128, backend="torch")
    return ckpt_attn.Transformer(cfg)


def test_budget_transformer_compiles_on_its_first_call():
    """No eager step first: the plan for the input's shape is made while Dynamo traces,
    from the closed-form costs; one graph, no breaks, eager's loss and gradients, and
    the plan's kept bytes are what the estimate predicts."""
    from ckpt_attn.memory import estimate, measure

    torch.manual_seed(1)
    x = torch.randn(2, 32, 64, requires_grad=True)
    budget = budget_of(wider_model(), x)
    compiled_model = apply_checkpointing(wider_model(), "budget", budget_bytes=budget)
    eager_model = apply_checkpointing(wider_model(), "budget", budget_bytes=budget)
    compiled, got = compiled_step(compiled_model, x)
    eager = step(eager_model, x)
    assert_same_step(got, eager)
    plans = [m.layers[0].forward.plans for m in (compiled_model, eager_model)]
    assert plans[0] == plans[1] and len(plans[0]) == 1
    modes = {segment.mode for segment in next(iter(plans[0].values()))}
    assert len(modes) > 1, modes  # the budget mixes modes
    predicted = estimate(compiled_model.cfg, batch=2, seq=32, policy="budget",
                         budget_bytes=budget, dtype=torch.float32)
    assert measure(eager_model, x).kept_bytes == predicted.kept_bytes
    # the next call runs the same graph: no recompilation
    counters.clear()
    step(compiled, x)
    assert counters["stats"]["unique_graphs"] == 0


def test_budget_transformer_plans_each_new_shape_while_tracing():
    """With static shapes, each new shape's first compiled call plans that shape (the
    plan eager mode makes for it) and gives eager's loss and gradients."""
    compiled_model = apply_checkpointing(wider_model(), "budget", budget_bytes=7e5)
    eager_model = apply_checkpointing(wider_model(), "budget", budget_bytes=7e5)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="eager", fullgraph=True, dynamic=False)
    for seq in (32, 48):
        torch.manual_seed(seq)
        x = torch.randn(2, seq, 64, requires_grad=True)
        assert_same_step(step(compiled, x), step(eager_model, x), msg=f"seq {seq}")
    plans = compiled_model.layers[0].forward.plans
    assert plans == eager_model.layers[0].forward.plans and len(plans) == 2
    assert len({tuple(plan) for plan in plans.values()}) == 2  # each shape its own plan


def test_budget_transformer_outside_the_closed_form_asks_for_a_plan():
    """Eval mode with dropout: the closed form does not cover it, and measuring cannot
    be traced, so the first compiled call asks for an eager forward or example_inputs."""
    torch.manual_seed(0)
    cfg = ckpt_attn.TransformerConfig(num_layers=2, hidden_size=64, num_heads=4,
                                      num_kv_heads=2, ffn_hidden_size=128, dropout=0.1,
                                      backend="torch")
    model = apply_checkpointing(ckpt_attn.Transformer(cfg).eval(), "budget",
                                budget_bytes=2**30)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="closed-form costs do not cover"):
        torch.compile(model, backend="eager", fullgraph=True)(
            torch.randn(2, 32, 64, requires_grad=True))


class Stack(nn.Module):
    """Layers in a `layers` ModuleList and a final linear: not a ckpt_attn.Transformer,
    so its budget plan is measured, in eager mode."""

    def __init__(self):
        super().__init__()
        self.layers = wider_model(2).layers
        self.head = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_budget_of_other_models_plans_on_example_inputs_for_compile():
    torch.manual_seed(1)
    x = torch.randn(2, 32, 64, requires_grad=True)
    budget = budget_of(Stack(), x)
    model = apply_checkpointing(Stack(), "budget", budget_bytes=budget,
                                example_inputs=(x.detach(),))
    eager_model = apply_checkpointing(Stack(), "budget", budget_bytes=budget)
    assert len(model.layers[0].forward.plans) == 1  # planned at apply time
    _, got = compiled_step(model, x, backend="aot_eager")
    eager = step(eager_model, x)
    assert model.layers[0].forward.plans == eager_model.layers[0].forward.plans
    assert_same_step(got, eager)
    # a shape it has no plan for: the clear error, not a wrong plan
    with pytest.raises(RuntimeError, match="example_inputs="):
        torch.compile(model, backend="eager", fullgraph=True, dynamic=False)(
            torch.randn(2, 40, 64, requires_grad=True))


def test_budget_without_a_plan_asks_for_one():
    model = apply_checkpointing(Stack(), "budget", budget_bytes=2**30)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="run the model once in eager mode"):
        torch.compile(model, backend="eager", fullgraph=True)(
            torch.randn(2, 32, 64, requires_grad=True))


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
    compiled, got = compiled_step(model, x)
    assert_same_step(got, eager)

    kept = list(saved_tensors(compiled, x).values())
    hidden, rows = tuple(x.shape), x.shape[0] * x.shape[1]
    assert ("cpu", code_dtype, hidden, x.numel()) in kept, kept
    assert not [s for s in kept if s[1].is_floating_point and s[2] == hidden
                and s[1] != code_dtype], kept
    # at most: per layer its codes and scales; the final norm's row statistics
    most = len(model.layers) * (x.numel() + 4 * rows) + 4 * rows
    assert sum(nbytes for *_, nbytes in kept) <= most, kept
