"""apply_checkpointing on a small Transformer (torch backend, fp32, CPU): every policy
gives the gradients of no checkpointing (dropout included, under one seed), keeps what
it promises (counted with saved_tensors_hooks and with ckpt_attn.memory.measure),
recomputes what it promises (FlopCounterMode), and storage modes shrink what is kept.
Also: nn.Sequential and other `layers` containers, kwargs, no_grad, eval, reapplying,
and every bad argument."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from saved_bytes import saved_bytes
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import ckpt_attn
from ckpt_attn import apply_checkpointing
from ckpt_attn.checkpointing import apply as apply_module
from ckpt_attn.checkpointing.policies import POLICIES
from ckpt_attn.memory import estimate, measure

LAYERS, HIDDEN, BATCH, SEQ = 4, 64, 2, 19
TOKENS = BATCH * SEQ
FP32 = 4

CASES = [("none", {}), ("full", {}), ("uniform", {"every": 2}), ("uniform", {"every": 3}),
            ("sqrt", {}), ("ratio", {"ratio": 0.5}), ("ratio", {"ratio": 1.0}),
            ("selective", {})]
POLICY_IDS = ["none", "full", "uniform2", "uniform3", "sqrt", "ratio0.5", "ratio1", "selective"]


def make_model(**overrides):
    fields = dict(num_layers=LAYERS, hidden_size=HIDDEN, num_heads=4, num_kv_heads=2,
                  backend="torch")
    torch.manual_seed(0)
    return ckpt_attn.Transformer(ckpt_attn.TransformerConfig(**(fields | overrides)))


def inputs(requires_grad=True):
    torch.manual_seed(1)
    return torch.randn(BATCH, SEQ, HIDDEN, requires_grad=requires_grad)


def step(model, x, **kwargs):
    """Output and the gradients of every parameter and of x, under a fixed seed."""
    model.zero_grad()
    x.grad = None
    torch.manual_seed(2)
    y = model(x, **kwargs)
    y.square().sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]


def assert_same_step(a, b, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=0)
    for got, want in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=0)


# --- gradients ------------------------------------------------------------------------

@pytest.mark.parametrize("policy, options", CASES, ids=POLICY_IDS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("mlp, norm", [("swiglu", "rmsnorm"), ("gelu", "layernorm")])
def test_gradients_equal_no_checkpointing(policy, options, dropout, mlp, norm):
    model = make_model(dropout=dropout, mlp=mlp, norm=norm, bias=norm == "layernorm")
    x = inputs()
    reference = step(model, x)
    apply_checkpointing(model, policy, **options)
    assert_same_step(step(model, x), reference)


def test_budget_policy_gradients_and_plan():
    model = make_model(dropout=0.1)
    x = inputs()
    reference = step(model, x)
    none_peak = measure(model, x).peak_bytes
    apply_checkpointing(model, "budget", budget_bytes=none_peak * 0.6)
    assert_same_step(step(model, x), reference)
    run = measure(model, x)
    assert run.peak_bytes <= none_peak * 0.6
    assert run.recompute_flops > 0


def test_masks_flow_through_grouped_layers():
    model = make_model(causal=False)
    x = inputs()
    keep = torch.rand(BATCH, 1, 1, SEQ) > 0.3
    keep[..., 0] = True
    reference = step(model, x, attn_mask=keep)
    apply_checkpointing(model, "uniform", every=2)
    assert_same_step(step(model, x, attn_mask=keep), reference)


def test_eval_mode_and_no_grad():
    model = make_model(dropout=0.2)
    x = inputs()
    apply_checkpointing(model, "sqrt")
    model.eval()
    with torch.no_grad():
        plain = model(x)
    # under no_grad no checkpoint machinery runs at all
    original = apply_module.checkpoint
    apply_module.checkpoint = None
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain)
    finally:
        apply_module.checkpoint = original
    apply_checkpointing(model, "none")
    torch.testing.assert_close(model(x), plain)  # eval: dropout off, deterministic


def test_reapply_replaces_and_none_removes():
    model = make_model()
    keys = set(model.state_dict())
    apply_checkpointing(model, "uniform", every=2)
    apply_checkpointing(model, "full")
    forwards = [layer.__dict__["forward"] for layer in model.layers]
    assert all(f.run.layers == [layer] for f, layer in zip(forwards, model.layers, strict=True))
    assert set(model.state_dict()) == keys
    apply_checkpointing(model, "none")
    assert all("forward" not in layer.__dict__ for layer in model.layers)


def test_sequential_and_layers_container():
    torch.manual_seed(0)
    seq = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.2))
                          for _ in range(5)])
    x = torch.randn(3, 8, requires_grad=True)
    reference = step(seq, x)
    apply_checkpointing(seq, "uniform", every=2)
    assert_same_step(step(seq, x), reference)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            for layer in self.layers:
                x = torch.relu(layer(x))  # not a plain chain: relu between layers
            return x

    stack = Stack()
    reference = step(stack, x)
    apply_checkpointing(stack, "full")  # one layer per segment: any model works
    assert_same_step(step(stack, x), reference)
    apply_checkpointing(stack, "uniform", every=3)
    with pytest.raises(RuntimeError, match="in order, each on the previous"):
        step(stack, x)


def test_forward_hooks_run_once():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    calls = []
    for index, layer in enumerate(seq):
        layer.register_forward_hook(
            lambda module, args, out, index=index: calls.append(index) or out * 2)
    x = torch.randn(3, 8, requires_grad=True)
    reference = step(seq, x)
    calls.clear()
    apply_checkpointing(seq, "full")
    assert_same_step(step(seq, x), reference)
    assert calls == [0, 1]
    apply_checkpointing(seq, "uniform", every=2)
    with pytest.raises(ValueError, match="forward hooks"):
        step(seq, x)


def test_budget_with_two_graphs_alive_and_changing_shapes():
    model = make_model(dropout=0.1)
    x1, x2 = inputs(), torch.randn(BATCH, SEQ + 6, HIDDEN, requires_grad=True)

    def two_steps():
        model.zero_grad()
        torch.manual_seed(3)
        loss = model(x1).square().sum() + model(x2).square().sum()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    reference = two_steps()
    apply_checkpointing(model, "budget", budget_bytes=measure(model, x1).peak_bytes * 0.5)
    for got, want in zip(two_steps(), reference, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_budget_on_layers_that_change_shape():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 4))
    x = torch.randn(16, 8, requires_grad=True)
    reference = step(seq, x)
    apply_checkpointing(seq, "budget", budget_bytes=10**9)
    assert_same_step(step(seq, x), reference)


def relu_stack(inplace: bool):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=inplace), nn.Linear(16, 16),
                         nn.LeakyReLU(0.1, inplace=inplace), nn.Linear(16, 4))


@pytest.mark.parametrize("policy, options", [
    ("full", {}), ("selective", {}), ("ratio", {"ratio": 0.6}), ("uniform", {"every": 2}),
    ("sqrt", {}), ("full", {"storage": "int8"})])
def test_in_place_layers_under_recomputing_policies(policy, options):
    """A layer with inplace=True (nn.ReLU(inplace=True)) that a policy recomputes runs on a
    copy of its input, which the policy keeps unmodified: the output and gradients of the
    same layers out of place under the same policy, and (but int8's rounding) of no
    policy (before: torch's "modified by an inplace operation" in the backward)."""
    model, out_of_place = relu_stack(inplace=True), relu_stack(inplace=False)
    x = torch.randn(5, 8, requires_grad=True)
    unchecked = step(model, x)
    for layers in (model, out_of_place):
        apply_checkpointing(layers, policy, **options)
    got = step(model, x)
    assert_same_step(got, step(out_of_place, x))
    if "storage" not in options:
        assert_same_step(got, unchecked)


class AddsOneInPlace(nn.Module):
    """Modifies its input in place, with no `inplace` attribute saying so."""

    def forward(self, x):
        return x.add_(1.0)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_layer_modifying_its_input_in_place_is_named(policy):
    """Without an `inplace` attribute to go by, the forward finds the input modified and
    names the layer (not torch's generic version error in the backward)."""
    model = nn.Sequential(nn.Linear(8, 8), AddsOneInPlace(), nn.Linear(8, 2))
    x = torch.randn(3, 8, requires_grad=True)
    apply_checkpointing(model, policy)
    with pytest.raises(RuntimeError, match=r"layers\[1\] \(AddsOneInPlace\) modified its "
                                           r"input in place"):
        model(x)
    apply_checkpointing(model, "none")
    model(x).sum().backward()
    with torch.no_grad():  # nothing is kept: nothing to check
        apply_checkpointing(model, policy)
        model(x)


def test_quantized_storage_leaves_integer_inputs_alone():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Embedding(1000, 8), nn.Linear(8, 1))
    ids = torch.tensor([[999, 5, 700, 3]])
    seq(ids).sum().backward()
    reference = seq[0].weight.grad.clone()
    seq.zero_grad()
    apply_checkpointing(seq, "full", storage="int8")
    seq(ids).sum().backward()
    torch.testing.assert_close(seq[0].weight.grad, reference)


def test_shared_layers_and_foreign_forwards_are_refused():
    layer = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="distinct modules"):
        apply_checkpointing(nn.Sequential(layer, layer), "full")
    wrapped = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    wrapped[0].forward = lambda x: x
    with pytest.raises(ValueError, match="instance-level forward"):
        apply_checkpointing(wrapped, "full")


@pytest.mark.parametrize("ratio, layers, recomputed", [
    (0.28, 25, 7), (0.5, 4, 2), (0.01, 4, 1), (1.0, 3, 3), (1, 3, 3), (0.7, 10, 7),
    (1e-12, 4, 1), (5e-324, 3, 1), (0.2500000001, 4, 2), (0.999999999999, 4, 4)])
def test_ratio_counts_layers_exactly(ratio, layers, recomputed):
    plan = POLICIES["ratio"].segments(layers, {"ratio": ratio})
    assert sum(segment.mode == "full" for segment in plan) == recomputed


# --- what is kept ---------------------------------------------------------------------

def layer_input_bytes(dtype_bytes=FP32) -> int:
    return TOKENS * HIDDEN * dtype_bytes


def final_norm_bytes() -> int:
    return layer_input_bytes() + TOKENS * FP32  # its input and fp32 rstd


@pytest.mark.parametrize("policy, options, kept_inputs", [
    ("full", {}, LAYERS), ("uniform", {"every": 2}, 2), ("uniform", {"every": 3}, 2),
    ("sqrt", {}, math.ceil(LAYERS / math.ceil(math.sqrt(LAYERS)))),
])
def test_recomputing_policies_keep_one_input_per_segment(policy, options, kept_inputs):
    model = make_model()
    x = inputs()
    apply_checkpointing(model, policy, **options)
    promised = kept_inputs * layer_input_bytes() + final_norm_bytes()
    assert saved_bytes(model, x) == promised
    assert measure(model, x).kept_bytes == promised


@pytest.mark.parametrize("policy, options", CASES, ids=POLICY_IDS)
def test_kept_bytes_match_the_estimate(policy, options):
    model = make_model(dropout=0.1)
    x = inputs()
    apply_checkpointing(model, policy, **options)
    predicted = estimate(model.cfg, batch=BATCH, seq=SEQ, policy=policy, dtype=torch.float32,
                         **options).kept_bytes
    assert measure(model, x).kept_bytes == predicted
    if policy != "selective":  # selective's kept outputs live in torch's cache, not hooks
        assert saved_bytes(model, x) == predicted


def test_selective_keeps_matmul_and_attention_outputs():
    model = make_model()
    cfg = model.cfg
    apply_checkpointing(model, "selective")
    kv = cfg.num_kv_heads * cfg.head_dim
    per_token = (HIDDEN  # layer input
                 + HIDDEN + 2 * kv + HIDDEN  # q, k, v, o_proj outputs
                 + 2 * cfg.ffn_hidden_size + HIDDEN  # gate, up, down outputs
                 + HIDDEN)  # attention output o
    per_layer = (TOKENS * per_token * FP32
                 + TOKENS * cfg.num_heads * 2 * FP32)  # + row max and log row sum
    assert measure(model, inputs()).kept_bytes == LAYERS * per_layer + final_norm_bytes()


# --- what is recomputed ---------------------------------------------------------------

def flops(model, x):
    model.zero_grad()
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops(), counter.get_flop_counts()["Global"]


def test_full_recomputes_one_forward():
    model = make_model(dropout=0.1)  # dropout after the MLP: no early stop inside a layer
    x = inputs()
    base, _ = flops(model, x)
    forward = measure(model, x).forward_flops
    apply_checkpointing(model, "full")
    extra = flops(model, x)[0] - base
    assert extra == forward


def test_full_recompute_stops_after_the_last_needed_tensor():
    model = make_model()
    x = inputs()
    base, _ = flops(model, x)
    forward = measure(model, x).forward_flops
    apply_checkpointing(model, "full")
    # without dropout the down projection's output is not needed by any backward
    down_proj = 2 * TOKENS * model.cfg.ffn_hidden_size * HIDDEN
    assert flops(model, x)[0] - base == forward - LAYERS * down_proj


def test_selective_recomputes_no_matmul():
    model = make_model(dropout=0.1)
    x = inputs()
    base, base_ops = flops(model, x)
    apply_checkpointing(model, "selective")
    total, ops = flops(model, x)
    assert total == base and ops == base_ops
    assert measure(model, x).recompute_flops == 0


# --- storage modes --------------------------------------------------------------------

def rounded_like_storage(x: torch.Tensor, storage: str) -> torch.Tensor:
    """x rounded per row as int8/fp8 storage keeps it, its gradient passed straight to
    x: the input each recomputed layer runs on (written out here, independently of
    ckpt_attn.checkpointing.storage)."""
    top, dtype = {"int8": (127.0, torch.int8), "fp8": (448.0, torch.float8_e4m3fn)}[storage]
    row_max = x.detach().abs().amax(-1, keepdim=True)
    codes = x.detach() / torch.where(row_max == 0, 1, row_max) * top
    codes = (codes.round() if storage == "int8" else codes).to(dtype)
    return x + (codes.float() / top * row_max - x).detach()


class SeesItsInput(nn.Module):
    """The identity, keeping a copy of the input it ran on."""

    def forward(self, x):
        self.seen = x.detach().clone()
        return x * 1.0


MAGNITUDES = [1.0, 1e10, 1e-10, 1e-30, 1e-35, 1e-38, 2e-40, 1e-44, 1e-300, 1e300, 6e-8,
              1e-5, 6e4, 3e38]


@pytest.mark.parametrize("storage", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                   torch.float64])
def test_quantized_storage_error_bound_at_every_magnitude(storage, dtype):
    """The documented per-element bound (ckpt_attn.checkpointing.storage) on rows of any
    magnitude the dtype holds, subnormal ones included, up to one unit in the last
    place of the row's max (the rounding to x's dtype); a row of zeros stays zeros.
    (Rows whose max was below about 1e-30 came back as zeros.)"""
    torch.manual_seed(0)
    info = torch.finfo(dtype)
    rows = [m for m in MAGNITUDES if info.smallest_normal * info.eps <= m <= info.max]
    row_max = torch.tensor(rows, dtype=torch.float64)[:, None]
    x = (torch.rand(len(rows), 48, dtype=torch.float64) * 2 - 1) * row_max
    x[:, :1] = row_max
    x = torch.cat([x.to(dtype), torch.zeros(1, 48, dtype=dtype)])
    model = nn.Sequential(SeesItsInput(), nn.Identity())
    apply_checkpointing(model, "full", storage=storage)
    model(x.requires_grad_(True))
    got, x = model[0].seen.double(), x.detach().double()
    row_max = x.abs().amax(-1, keepdim=True)
    ulp = torch.nextafter(row_max.to(dtype), torch.tensor(math.inf, dtype=dtype)).double() \
        - row_max
    bound = row_max / 254 if storage == "int8" else x.abs() / 16 + row_max / 448 * 2**-9
    assert ((got - x).abs() <= bound + ulp).all(), (got - x).abs().div(bound + ulp).amax(-1)
    assert (got[-1] == 0).all()


@pytest.mark.parametrize("storage, shrink, error", [("int8", 3.5, 0.03), ("fp8", 3.5, 0.1)])
def test_quantized_storage(storage, shrink, error):
    """int8/fp8 under "full": a byte per element and a scale per row kept per layer; the
    output and the gradients are exactly those of the model whose layers run on their
    input rounded as stored; the output within `error` (of its largest value) of the
    model without rounding."""
    model = make_model(hidden_size=128)
    x = inputs(requires_grad=False).repeat(1, 1, 2)
    exact = step(model, x.requires_grad_())[0]
    handles = [layer.register_forward_pre_hook(
        lambda _, args: (rounded_like_storage(args[0], storage), *args[1:]))
        for layer in model.layers]
    reference = step(model, x)
    for handle in handles:
        handle.remove()
    x.requires_grad_(False)
    apply_checkpointing(model, "full")
    final = 128 * TOKENS * FP32 + TOKENS * FP32
    device_kept = measure(model, x).kept_bytes - final
    apply_checkpointing(model, "full", storage=storage)
    quantized_kept = measure(model, x).kept_bytes - final
    assert quantized_kept == LAYERS * TOKENS * (128 + FP32)  # a byte per element, a scale
    assert device_kept / quantized_kept > shrink
    got = step(model, x.requires_grad_())
    assert_same_step(got, reference)
    assert (got[0] - exact).abs().max() <= error * exact.abs().max()


def test_cpu_storage_on_cpu_is_exact():
    model = make_model(dropout=0.1)
    x = inputs()
    reference = step(model, x)
    for policy in ("none", "full", "sqrt"):
        apply_checkpointing(model, policy, storage="cpu")
        assert_same_step(step(model, x), reference)


# --- bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("policy, options, error, match", [
    ("every_other", {}, ValueError, "none, full, sqrt, selective, uniform, ratio, budget"),
    ("uniform", {"every": 0}, ValueError, "every must be an int >= 1"),
    ("uniform", {"every": 1.5}, ValueError, "every"),
    ("uniform", {}, TypeError, "needs every"),
    ("ratio", {"ratio": 0.0}, ValueError, r"ratio must be in \(0, 1\]"),
    ("ratio", {"ratio": 1.5}, ValueError, "ratio"),
    ("full", {"every": 2}, TypeError, "unexpected every"),
    ("budget", {"budget_bytes": -1}, ValueError, "budget_bytes"),
    ("full", {"storage": "disk"}, ValueError, "storage must be one of"),
    ("none", {"storage": "int8"}, ValueError, "recomputes nothing"),
    ("selective", {"storage": "cpu"}, ValueError, "selective"),
])
def test_bad_arguments(policy, options, error, match):
    with pytest.raises(error, match=match):
        apply_checkpointing(make_model(), policy, **options)


def test_budget_below_every_plan_names_the_minimum():
    model = make_model()
    apply_checkpointing(model, "budget", budget_bytes=1000)
    with pytest.raises(ValueError, match=r"below the smallest peak .* \(\d+ bytes\)"):
        model(inputs())


@pytest.mark.parametrize("overrides", [{}, {"mlp": "gelu", "norm": "layernorm", "bias": True,
                                        "dropout": 0.1}], ids=["swiglu", "gelu-dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_budget_plans_a_transformer_in_closed_form_as_measured(overrides, dtype):
    """The budget policy's planner costs a Transformer's layers in closed form (from the
    shape alone) and picks exactly the plan the measured costs give, at budgets from the
    least reachable peak to no checkpointing."""
    from ckpt_attn.memory import min_peak, plan, plan_chain, plan_layers
    from ckpt_attn.memory.estimation import transformer_config
    from ckpt_attn.memory.planner import layer_costs, tail_cost

    model = make_model(**overrides).to(dtype)
    for batch, seq in ((1, 32), (2, 48), (3, 64)):
        x = torch.randn(batch, seq, HIDDEN, dtype=dtype)
        assert transformer_config(model.layers, x, (), {"attn_mask": None},
                                  model.norm) == model.cfg
        costs = layer_costs(model.layers, x, attn_mask=None)
        base, base_transient = tail_cost(model.norm, x)
        low = min_peak(costs, base, base_transient)
        high = plan_layers(costs, math.inf, base, base_transient).peak_bytes
        for fraction in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
            budget = low + fraction * (high - low)
            measured = plan_layers(costs, budget, base, base_transient)
            closed_form = plan_chain(model.layers, x, (), {"attn_mask": None},
                                     budget_bytes=budget, tail=model.norm)
            assert closed_form == measured, (batch, seq, fraction)
            assert plan(model.cfg, batch=batch, seq=seq, budget_bytes=budget,
                        dtype=dtype) == measured


def test_budget_measures_what_the_closed_form_does_not_cover():
    """Eval mode with dropout, autocast, a replaced submodule, other layer arguments,
    parameters of another dtype: measured, not closed-form."""
    from ckpt_attn.memory.estimation import transformer_config

    model, x = make_model(dropout=0.1), inputs()

    def config(**changes):
        case = dict(layers=model.layers, x=x, args=(), kwargs={}, tail=model.norm) | changes
        return transformer_config(**case)

    assert config() == model.cfg
    assert config(kwargs={"attn_mask": torch.ones(1, dtype=torch.bool)}) == model.cfg
    assert config(tail=None) is None
    assert config(args=(None,)) is None
    assert config(kwargs={"scale": 2.0}) is None
    assert config(x=x.double()) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert config() is None
    model.eval()
    assert config() is None
    model.train()
    model.layers[1].mlp = nn.Identity()
    assert config() is None


def test_budget_plans_on_example_inputs_at_apply_time():
    model, x = make_model(), inputs()
    reference = step(model, x)
    budget = measure(model, x).peak_bytes * 0.6
    apply_checkpointing(model, "budget", budget_bytes=budget, example_inputs=(x,))
    plans = model.layers[0].forward.plans
    assert list(plans) == [((BATCH, SEQ, HIDDEN), torch.float32, torch.device("cpu"))]
    assert_same_step(step(model, x), reference)
    assert model.layers[0].forward.plans is plans and len(plans) == 1
    assert measure(model, x).peak_bytes <= budget


@pytest.mark.parametrize("policy, example_inputs, error, match", [
    ("full", (torch.zeros(1),), ValueError, "example_inputs is taken by a planned policy"),
    ("budget", [torch.zeros(1)], TypeError, "example_inputs must be a tuple")])
def test_bad_example_inputs(policy, example_inputs, error, match):
    options = {"budget_bytes": 2**30} if policy == "budget" else {}
    with pytest.raises(error, match=match):
        apply_checkpointing(make_model(), policy, example_inputs=example_inputs, **options)


def test_example_inputs_that_never_reach_the_first_layer():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="example_inputs: Skips called on them"):
        apply_checkpointing(Skips(), "budget", budget_bytes=2**30,
                            example_inputs=(torch.zeros(1, 4),))


def test_example_inputs_need_a_positional_layer_input():
    class ByKeyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(input=x)
            return x

    model = ByKeyword()
    with pytest.raises(ValueError, match="example_inputs: ByKeyword called its first layer "
                                         "with keyword arguments only"):
        apply_checkpointing(model, "budget", budget_bytes=2**30,
                            example_inputs=(torch.zeros(1, 4),))
    assert not model.layers[0]._forward_pre_hooks  # the hook that stops the model is gone


def test_model_without_layers():
    with pytest.raises(ValueError, match="no.*layers|neither"):
        apply_checkpointing(nn.Linear(4, 4), "full")


# --- Hugging Face decoder layers -------------------------------------------------------

HF_POLICIES = [("full", {}), ("uniform", {"every": 2}), ("sqrt", {}), ("ratio", {"ratio": 0.5}),
               ("selective", {}), ("budget", {"budget_bytes": None})]


@pytest.fixture(scope="module")
def llama():
    """A tiny Llama (4 decoder layers, GQA, sdpa), a padded batch, the step's keyword
    arguments and the step's logits and gradients without checkpointing."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32,
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 7))
    padding = torch.ones(2, 7, dtype=torch.long)
    padding[1, :2] = 0  # left padding: the layers get a 4-D mask, not None
    kwargs = dict(input_ids=ids, attention_mask=padding, use_cache=False)
    return model, kwargs, hf_step(model, kwargs)


def hf_step(model, kwargs):
    """Logits and every parameter's gradient of one language-modelling step."""
    model.zero_grad()
    out = model(**kwargs, labels=kwargs["input_ids"])
    out.loss.backward()
    return out.logits.detach(), [p.grad.clone() for p in model.parameters()]


def layer_keyword_bytes(model, kwargs) -> int:
    """Bytes of the distinct tensors the decoder layers get as keyword arguments."""
    storages = {}

    def collect(module, args, layer_kwargs):
        for t in tree_leaves(layer_kwargs):
            if isinstance(t, torch.Tensor):
                storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()

    handle = model.model.layers[0].register_forward_pre_hook(collect, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        handle.remove()
    return sum(storages.values())


@pytest.mark.parametrize("target", ["model", "layers"])
@pytest.mark.parametrize("policy, options", HF_POLICIES, ids=[p for p, _ in HF_POLICIES])
def test_hugging_face_layers_take_every_policy(llama, target, policy, options):
    model, kwargs, reference = llama
    if policy == "budget":
        options = {"budget_bytes": 0.7 * measure(model, **kwargs).peak_bytes}
    try:
        apply_checkpointing(model if target == "model" else model.model.layers, policy,
                            **options)
        assert_same_step(hf_step(model, kwargs), reference, atol=1e-6)
        if policy == "budget":
            assert measure(model, **kwargs).peak_bytes <= options["budget_bytes"]
    finally:
        apply_checkpointing(model, "none")


class OpCalls(TorchDispatchMode):
    """Counts the calls of one op."""

    def __init__(self, op):
        super().__init__()
        self.op, self.calls = op, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func == self.op
        return func(*args, **(kwargs or {}))


def test_hugging_face_selective_keeps_the_attention_kernel_output(llama):
    """selective keeps what torch's fused attention kernel returns (as it keeps our
    op's): the backward reruns no attention forward."""
    model, kwargs, reference = llama
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    try:
        apply_checkpointing(model, "selective")
        with OpCalls(kernel) as calls:
            got = hf_step(model, kwargs)
        assert calls.calls == len(model.model.layers)  # the forward's, none recomputed
        assert_same_step(got, reference, atol=1e-6)
    finally:
        apply_checkpointing(model, "none")


def test_hugging_face_measure(llama):
    model, kwargs, _ = llama
    none = measure(model, **kwargs)
    assert none.kept_bytes == saved_bytes(model, **kwargs) and none.recompute_flops == 0
    assert len(none.layers) == 4 and all(layer.kept_bytes > 0 for layer in none.layers)
    try:
        apply_checkpointing(model, "full")
        full = measure(model, **kwargs)
        # torch.utils.checkpoint holds the layers' keyword arguments (mask, position
        # embeddings and ids) itself, where saved_tensors_hooks do not see them
        kept = saved_bytes(model, **kwargs) + layer_keyword_bytes(model, kwargs)
        assert full.kept_bytes == kept < none.kept_bytes
        assert sum(layer.recompute_flops for layer in full.layers) == full.recompute_flops > 0
    finally:
        apply_checkpointing(model, "none")


def hf_checkpointing(model):
    """HF's own enable/disable of its checkpointing: activation_checkpointing_enable/
    _disable, which transformers 5.2x calls what gradient_checkpointing_enable was."""
    if hasattr(model, "activation_checkpointing_enable"):
        return model.activation_checkpointing_enable, model.activation_checkpointing_disable
    return model.gradient_checkpointing_enable, model.gradient_checkpointing_disable


def cache_step(model, kwargs, cache):
    """One training step as HF users call it (use_cache from the config, True), with a
    KV cache given or not: (logits, gradients, past_key_values, the cache's length, the
    warnings raised)."""
    model.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(**kwargs, labels=kwargs["input_ids"], **(
            {"cache": cache, "use_cache": True} if cache is not None else {}))
        out.loss.backward()
    return (out.logits.detach(), [p.grad.clone() for p in model.parameters()],
            out.past_key_values, None if cache is None else cache.get_seq_length(),
            [str(w.message) for w in caught])


@pytest.mark.parametrize("policy, options", HF_POLICIES[:5], ids=[p for p, _ in HF_POLICIES[:5]])
@pytest.mark.parametrize("given_cache", [False, True], ids=["config-cache", "given-cache"])
def test_hugging_face_cache_in_training_is_turned_off_as_hf_checkpointing_does(
        llama, policy, options, given_cache):
    """model(input_ids=...) in training, use_cache defaulting to the config's True (or a
    DynamicCache given): HF's gradient_checkpointing_enable() turns the cache off with a
    warning, builds none and leaves a given one empty; so does every recomputing policy."""
    from transformers import DynamicCache

    model, kwargs, _ = llama
    kwargs = {k: v for k, v in kwargs.items() if k != "use_cache"}
    assert model.config.use_cache
    model.train()
    enable, disable = hf_checkpointing(model)
    try:
        enable({"use_reentrant": False})
        hf = cache_step(model, kwargs, DynamicCache() if given_cache else None)
        disable()
        apply_checkpointing(model, policy, **options)
        ours = cache_step(model, kwargs, DynamicCache() if given_cache else None)
    finally:
        disable()
        apply_checkpointing(model, "none")
    assert_same_step(ours[:2], hf[:2], atol=1e-6)
    if given_cache:  # returned as given, and left as it was: 0 tokens
        assert ours[3] == hf[3] == 0
        assert ours[2].get_seq_length() == hf[2].get_seq_length() == 0
    else:  # none built, none returned
        assert ours[2] is None and hf[2] is None
    assert ours[4] and all("use_cache=False" in w or "cache=None" in w for w in ours[4])
    with torch.no_grad():  # generation: nothing is recomputed, the cache fills
        apply_checkpointing(model, policy, **options)
        try:
            cache = DynamicCache()
            model(**kwargs, cache=cache, use_cache=True)
            assert cache.get_seq_length() == kwargs["input_ids"].shape[1]
        finally:
            apply_checkpointing(model, "none")
