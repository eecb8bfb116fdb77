"""Checkpoint groups (policies that run several layers as one segment) on models that
are not a plain chain: every use of an inner layer's output outside the chain (a skip
connection, collected hidden states, a layer called twice, hidden states returned
from forward, a forward hook rewriting an output) raises a RuntimeError naming the
layer and the per-layer policies, never gives a wrong number; plain chains keep the
gradients of no checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ckpt_attn
from ckpt_attn import apply_checkpointing
from ckpt_attn.checkpointing import ChainOutput, Segment, budget
from ckpt_attn.memory import Plan

WIDTH = 8
GROUPS = [("uniform", {"every": 2}), ("uniform", {"every": 3}), ("sqrt", {}),
          ("budget", {"budget_bytes": 10**9})]
GROUP_IDS = ["uniform2", "uniform3", "sqrt", "budget"]
PER_LAYER = [("full", {}), ("ratio", {"ratio": 0.5}), ("selective", {})]


class Stack(nn.Module):
    """Three linear layers in `layers`, called by `wiring(layers, x)`."""

    def __init__(self, wiring):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(),
                                                  nn.Dropout(0.1)) for _ in range(3))
        self.wiring = wiring

    def forward(self, x):
        return self.wiring(self.layers, x)


def skip_connection(layers, x):
    h1 = layers[0](x)
    h2 = layers[1](h1)
    return layers[2](h2) + h1


def collected_hidden_states(layers, x):
    hidden = []
    for layer in layers:
        x = layer(x)
        hidden.append(x)
    return torch.stack(hidden).sum(0)


def layer_called_twice(layers, x):
    return layers[2](layers[1](layers[1](layers[0](x))))


def first_layer_twice(layers, x):
    return layers[2](layers[1](layers[0](layers[0](x))))


def returns_hidden_states(layers, x):
    hidden = []
    for layer in layers:
        x = layer(x)
        hidden.append(x)
    return x, hidden


def loss_of(output):
    """The loss a training step takes: of the output, or of every hidden state."""
    if isinstance(output, tuple):
        out, hidden = output
        return out.square().sum() + sum(h.square().sum() for h in hidden)
    return output.square().sum()


def step(model, x):
    model.zero_grad()
    x.grad = None
    torch.manual_seed(2)
    loss = loss_of(model(x))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]


def inputs():
    torch.manual_seed(1)
    return torch.randn(4, WIDTH, requires_grad=True)


@pytest.fixture(autouse=True)
def grouping_planner():
    """The budget policy's planner, swapped for one that groups every layer (a real plan
    for these tiny layers keeps everything); restored afterwards."""
    real = budget.planner_in_use()
    budget.use_planner(lambda layers, x, args, kwargs, *, budget_bytes, tail: Plan(
        [Segment(0, len(layers), "full")], 0, 0, 0))
    yield
    budget.use_planner(real)


WIRINGS = [skip_connection, collected_hidden_states, layer_called_twice, first_layer_twice,
           returns_hidden_states]


@pytest.mark.parametrize("wiring", WIRINGS, ids=lambda w: w.__name__)
@pytest.mark.parametrize("policy, options", GROUPS, ids=GROUP_IDS)
def test_groups_refuse_models_that_are_not_a_chain(wiring, policy, options):
    model = Stack(wiring)
    x = inputs()
    step(model, x)  # runs without checkpointing
    apply_checkpointing(model, policy, **options)
    with pytest.raises(RuntimeError, match=r"layers\[\d\] \(Sequential\).*per-layer policy "
                                            r"\('none', 'full', 'selective', 'ratio'\)"):
        step(model, x)


@pytest.mark.parametrize("wiring", WIRINGS, ids=lambda w: w.__name__)
def test_groups_refuse_under_no_grad_too(wiring):
    model = Stack(wiring)
    apply_checkpointing(model, "uniform", every=3)
    with torch.no_grad(), pytest.raises(RuntimeError, match="outside its checkpoint group|"
                                                           "not the output of"):
        loss_of(model(inputs()))


def assert_same_step(got, reference):
    """The loss and every gradient of `step` equal the reference's."""
    torch.testing.assert_close(got[0], reference[0], atol=1e-6, rtol=0)
    for a, b in zip(got[1], reference[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("wiring", WIRINGS, ids=lambda w: w.__name__)
@pytest.mark.parametrize("policy, options", PER_LAYER, ids=[p for p, _ in PER_LAYER])
def test_per_layer_policies_run_any_wiring_exactly(wiring, policy, options):
    model = Stack(wiring)
    x = inputs()
    reference = step(model, x)
    apply_checkpointing(model, policy, **options)
    assert_same_step(step(model, x), reference)


def test_skip_connection_error_names_the_layer_and_its_use():
    model = Stack(skip_connection)
    apply_checkpointing(model, "uniform", every=3)
    with pytest.raises(RuntimeError, match=r"^the output of layers\[0\] \(Sequential\) was used "
                                           r"\(add\) outside its checkpoint group "
                                           r"layers\[0\.\.2\]"):
        model(inputs())


def test_hidden_states_returned_unused_change_nothing_and_refuse_any_read():
    model = Stack(returns_hidden_states)
    x = inputs()
    torch.manual_seed(2)
    want = model(x)[0]
    apply_checkpointing(model, "uniform", every=3)
    torch.manual_seed(2)
    out, hidden = model(x)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    assert hidden[2] is out and all(isinstance(h, ChainOutput) for h in hidden[:2])
    assert hidden[0].shape == out.shape and hidden[0].dtype == out.dtype
    assert "placeholder for the output of layers[0]" in repr(hidden[0])
    for read in (lambda h: h.sum(), lambda h: h.tolist(), lambda h: h + 1, lambda h: h[0],
                 lambda h: h.detach(), lambda h: h.clone(), lambda h: torch.cat([h, out])):
        with pytest.raises(RuntimeError, match=r"output of layers\[1\]"):
            read(hidden[1])


def test_a_forward_hook_rewriting_the_first_layers_output_is_refused():
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH))
    model[0].register_forward_hook(lambda module, args, out: out * 2)
    apply_checkpointing(model, "uniform", every=2)
    with pytest.raises(RuntimeError, match=r"output of layers\[0\] \(Linear\) was used \(mul\)"):
        model(inputs())


class ScaledLinear(nn.Linear):
    def forward(self, x, scale):
        return super().forward(x) * scale


class PerLayerScales(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(ScaledLinear(WIDTH, WIDTH) for _ in range(2))

    def forward(self, x, scales):
        for layer, scale in zip(self.layers, scales, strict=True):
            x = layer(x, scale)
        return x


def test_other_arguments_must_be_the_first_layers():
    model = PerLayerScales()
    apply_checkpointing(model, "uniform", every=2)
    model(inputs(), [1.0, 1.0])
    with pytest.raises(RuntimeError, match=r"layers\[1\] \(ScaledLinear\) was called with "
                                           r"other arguments than layers\[0\]"):
        model(inputs(), [1.0, 2.0])


def test_plain_chains_keep_working():
    torch.manual_seed(0)
    shapes = nn.Sequential(nn.Linear(WIDTH, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))
    cfg = ckpt_attn.TransformerConfig(num_layers=4, hidden_size=32, num_heads=4,
                                      dropout=0.1, backend="torch")
    transformer = ckpt_attn.Transformer(cfg)
    for model, x in ((shapes, inputs()), (transformer, torch.randn(2, 5, 32,
                                                                   requires_grad=True))):
        reference = step(model, x)
        for policy, options in GROUPS:
            apply_checkpointing(model, policy, **options)
            assert_same_step(step(model, x), reference)


def test_shape_queries_between_the_layers_of_a_chain_are_allowed():
    class Checked(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(WIDTH, 16), nn.Linear(16, 3)])

        def forward(self, x):
            h = self.layers[0](x)
            assert h.shape == (4, 16) and h.dim() == 2 and h.dtype == torch.float32
            return self.layers[1](h)

    model = Checked()
    x = inputs()
    reference = step(model, x)
    apply_checkpointing(model, "uniform", every=2)
    got = step(model, x)
    for a, b in zip(got[1], reference[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
