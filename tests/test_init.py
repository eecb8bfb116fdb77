"""reset_parameters on every module, and meta-device initialization.

The pattern: build on the meta device (nothing allocated), to_empty() onto a real one,
then initialize, either with model.reset_parameters() or with the generic loop over
submodules that FSDP-style code runs. reset_parameters() draws in the constructor's
order, so under the same seed it reproduces a model built on that device bit for bit;
the generic loop resets some modules more than once, so there the check is the
distribution: each parameter against the same parameter of a built model. The rotary
tables, non-persistent buffers, are recomputed by every move (to_empty included), so a
meta model that only loads a checkpoint has them too.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ckpt_attn
from ckpt_attn.modules.multihead import MultiheadAttention
from ckpt_attn.modules.transformer import (
    MLP,
    Attention,
    Norm,
    RotaryEmbedding,
    TransformerLayer,
)

CONFIGS = {
    "swiglu-rmsnorm-gqa": dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                               max_seq_len=32, backend="torch"),
    "gelu-layernorm-bias": dict(num_layers=2, hidden_size=64, num_heads=2, mlp="gelu",
                                norm="layernorm", bias=True, max_seq_len=32, backend="torch"),
}
config_param = pytest.mark.parametrize("config", list(CONFIGS))
MHA_CONFIGS = {
    "self": {},
    "nobias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "kdim-vdim": {"kdim": 12, "vdim": 20},
}


def generic_reset_loop(model: nn.Module) -> None:
    """The loop FSDP-style code runs after to_empty(): parents before children."""
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


def children_first_reset(model: nn.Module) -> None:
    """The same through model.apply, which visits children before their parent."""
    model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)


def built_and_meta(make, seed=0):
    """(a module built on the CPU under `seed`, the same module built on meta and then
    moved to the CPU with to_empty(), uninitialized)."""
    torch.manual_seed(seed)
    built = make()
    with torch.device("meta"):
        meta = make()
    assert all(p.is_meta for p in meta.parameters())
    return built, meta.to_empty(device="cpu")


def assert_same_tensors(actual: nn.Module, expected: nn.Module) -> None:
    """Every parameter and buffer (the non-persistent rotary tables included) equal."""
    expected_tensors = dict(expected.named_parameters()) | dict(expected.named_buffers())
    actual_tensors = dict(actual.named_parameters()) | dict(actual.named_buffers())
    assert actual_tensors.keys() == expected_tensors.keys()
    for name, tensor in expected_tensors.items():
        assert torch.equal(actual_tensors[name], tensor), name


def assert_same_distribution(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Two draws of one init scheme: the two-sample Kolmogorov-Smirnov statistic (largest
    gap between the empirical CDFs) below its 1e-4 significance threshold,
    2.23 * sqrt(2 / n); constant inits (norm weights 1, zero biases) equal exactly."""
    assert actual.isfinite().all(), what
    if expected.std() == 0:
        assert torch.equal(actual, expected), what
        return
    a, b = (t.flatten().double().sort().values for t in (actual, expected))
    points = torch.cat([a, b])
    gap = (torch.searchsorted(a, points, right=True) / a.numel()
           - torch.searchsorted(b, points, right=True) / b.numel()).abs().max().item()
    assert gap <= 2.23 * math.sqrt(2 / b.numel()), f"{what}: KS statistic {gap:.3f}"


def model_input(cfg):
    return torch.randn(2, 24, cfg.hidden_size)


# ---- Transformer ----

@config_param
def test_meta_init_then_reset_parameters_is_the_built_model(config):
    """to_empty() then model.reset_parameters() under the seed of a CPU build gives that
    model bit for bit: parameters, rotary tables and outputs."""
    cfg = ckpt_attn.TransformerConfig(**CONFIGS[config])
    built, model = built_and_meta(lambda: ckpt_attn.Transformer(cfg))
    torch.manual_seed(0)
    model.reset_parameters()
    assert_same_tensors(model, built)
    x = model_input(cfg)
    assert torch.equal(model(x), built(x))


@config_param
@pytest.mark.parametrize("reset", [generic_reset_loop, children_first_reset],
                         ids=["parents-first", "children-first"])
def test_meta_init_then_reset_loop_has_the_built_distribution(config, reset):
    """The generic loops (every submodule with reset_parameters) give each parameter the
    built model's distribution, norm weights exactly 1, the rotary tables exactly, and a
    finite output; before the reset the norm weights are not 1 (to_empty leaves memory
    uninitialized), so the check sees what the reset does."""
    cfg = ckpt_attn.TransformerConfig(**CONFIGS[config])
    built, model = built_and_meta(lambda: ckpt_attn.Transformer(cfg))
    torch.manual_seed(1)
    reset(model)
    expected = dict(built.named_parameters())
    for name, parameter in model.named_parameters():
        assert_same_distribution(parameter.detach(), expected[name].detach(), name)
    for name, buffer in built.named_buffers():
        assert torch.equal(model.get_buffer(name), buffer), name
    assert model(model_input(cfg)).isfinite().all()


def test_rotary_tables_are_recomputed_by_to_empty():
    """A meta model given a checkpoint (to_empty, then load_state_dict, no reset) has the
    rotary tables, which are not in the state_dict, and computes what the source model
    computes; .to(dtype) gives the float32 tables rounded, as before."""
    cfg = ckpt_attn.TransformerConfig(**CONFIGS["swiglu-rmsnorm-gqa"])
    built, model = built_and_meta(lambda: ckpt_attn.Transformer(cfg))
    assert "rope.cos" not in built.state_dict()
    model.load_state_dict(built.state_dict())
    assert_same_tensors(model, built)
    x = model_input(cfg)
    assert torch.equal(model(x), built(x))
    tables = built.rope.cos.clone()
    assert torch.equal(built.to(torch.bfloat16).rope.cos, tables.to(torch.bfloat16))


# ---- each module's reset_parameters ----

def small_cfg(**overrides):
    return ckpt_attn.TransformerConfig(**(CONFIGS["gelu-layernorm-bias"] | overrides))


MODULES = {
    "Norm-rms": lambda: Norm(16),
    "Norm-layer-bias": lambda: Norm(16, centered=True, bias=True),
    "RotaryEmbedding": lambda: RotaryEmbedding(8, 16, 10000.0),
    "Attention": lambda: Attention(small_cfg(), RotaryEmbedding(32, 32, 10000.0)),
    "MLP-swiglu": lambda: MLP(small_cfg(mlp="swiglu")),
    "MLP-gelu": lambda: MLP(small_cfg()),
    "TransformerLayer": lambda: TransformerLayer(small_cfg()),
    "Transformer": lambda: ckpt_attn.Transformer(small_cfg()),
} | {f"MultiheadAttention-{name}": (lambda kwargs=kwargs: MultiheadAttention(16, 4, **kwargs))
     for name, kwargs in MHA_CONFIGS.items()}


@pytest.mark.parametrize("name", list(MODULES))
def test_reset_parameters_rebuilds_the_module(name):
    """Every module's reset_parameters() overwrites all it holds (everything set to NaN
    first) with what its constructor gives under the same seed, bit for bit."""
    torch.manual_seed(3)
    built = MODULES[name]()
    module = MODULES[name]()
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.fill_(float("nan"))
    torch.manual_seed(3)
    module.reset_parameters()
    assert_same_tensors(module, built)


@pytest.mark.parametrize("config", list(MHA_CONFIGS))
def test_multihead_meta_init_then_reset_is_the_built_module(config):
    """MultiheadAttention on meta, to_empty(), reset_parameters(): torch's own module under
    the same seed (nn.MultiheadAttention has no public reset_parameters, so the generic
    loop cannot initialize it); resetting children first keeps the distribution too."""
    kwargs = MHA_CONFIGS[config]
    torch.manual_seed(0)
    torch_module = nn.MultiheadAttention(16, 4, **kwargs)
    built, module = built_and_meta(lambda: MultiheadAttention(16, 4, **kwargs))
    torch.manual_seed(0)
    module.reset_parameters()
    assert_same_tensors(module, built)
    assert_same_tensors(module, torch_module)

    children_first_reset(module)
    for name, parameter in built.named_parameters():
        assert_same_distribution(module.get_parameter(name).detach(), parameter.detach(), name)
