"""TransformerConfig validation and the Transformer's forward: shapes, causality, GQA,
masks flowing into the layers, the rotary tables, RMSNorm's hand-written backward and
what one layer keeps for its backward (byte for byte, as ckpt_attn.memory predicts)."""

from __future__ import annotations

import pytest
import torch
from saved_bytes import saved_bytes

import ckpt_attn
from ckpt_attn.memory import layer_terms
from ckpt_attn.modules.transformer import Norm, RotaryEmbedding, dropout

HIDDEN, HEADS = 32, 4


def config(**overrides):
    fields = dict(num_layers=2, hidden_size=HIDDEN, num_heads=HEADS, num_kv_heads=2,
                  backend="torch")
    return ckpt_attn.TransformerConfig(**(fields | overrides))


def test_config_defaults():
    cfg = ckpt_attn.TransformerConfig(num_layers=32, hidden_size=4096, num_heads=32)
    assert (cfg.num_kv_heads, cfg.ffn_hidden_size, cfg.head_dim) == (32, 11008, 128)
    assert config(mlp="gelu").ffn_hidden_size == 4 * HIDDEN


@pytest.mark.parametrize("overrides, match", [
    (dict(num_layers=0), "num_layers"),
    (dict(hidden_size=-4), "hidden_size"),
    (dict(num_heads=5), "num_heads"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(hidden_size=36, num_heads=12, num_kv_heads=12), "head dim"),
    (dict(ffn_hidden_size=0), "ffn_hidden_size"),
    (dict(mlp="relu"), "mlp"),
    (dict(norm="batchnorm"), "norm"),
    (dict(dropout=1.0), "dropout"),
    (dict(causal=1), "causal"),
    (dict(rope_theta=0), "rope_theta"),
    (dict(backend="cuda"), "backend"),
    (dict(max_seq_len=0), "max_seq_len"),
])
def test_config_rejects(overrides, match):
    with pytest.raises((ValueError, TypeError), match=match):
        config(**overrides)


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_forward_shape_and_causality(mlp, norm, kv_heads):
    model = ckpt_attn.Transformer(config(mlp=mlp, norm=norm, num_kv_heads=kv_heads,
                                         bias=norm == "layernorm"))
    x = torch.randn(2, 11, HIDDEN)
    y = model(x)
    assert y.shape == x.shape
    # causal: changing the last token leaves every earlier position unchanged
    x2 = x.clone()
    x2[:, -1] += torch.randn(2, HIDDEN)
    torch.testing.assert_close(model(x2)[:, :-1], y[:, :-1])
    assert not torch.allclose(model(x2)[:, -1], y[:, -1])


def test_attn_mask_flows_into_every_layer():
    model = ckpt_attn.Transformer(config(causal=False))
    x = torch.randn(2, 9, HIDDEN)
    keep = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    keep[:, ..., 6:] = False  # padding keys
    y = model(x, attn_mask=keep)
    # the padded keys' values do not reach the other positions
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 3, HIDDEN)
    torch.testing.assert_close(model(x2, attn_mask=keep)[:, :6], y[:, :6])


def test_layer_alone_and_shared_rotary_tables():
    cfg = config()
    layer = ckpt_attn.TransformerLayer(cfg)
    assert layer(torch.randn(1, 5, HIDDEN)).shape == (1, 5, HIDDEN)
    model = ckpt_attn.Transformer(cfg)
    assert all(layer.attn.rope is model.rope for layer in model.layers)
    assert not any("rope" in key for key in model.state_dict())


def test_rotary_matches_complex_rotation():
    rope = RotaryEmbedding(8, 16, 10000.0)
    x = torch.randn(2, 16, 3, 8, dtype=torch.float64)
    rope = rope.double()
    angles = torch.outer(torch.arange(16.0), 10000.0 ** (-torch.arange(0, 8, 2.0) / 8))
    pairs = torch.complex(x[..., :4], x[..., 4:]) * torch.polar(
        torch.ones_like(angles), angles)[None, :, None, :].to(torch.complex128)
    torch.testing.assert_close(rope(x), torch.cat([pairs.real, pairs.imag], dim=-1))


def test_rotary_tables_after_meta_init_and_to_empty():
    reference = ckpt_attn.Transformer(config())
    with torch.device("meta"):
        model = ckpt_attn.Transformer(config())
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    model.apply(lambda m: hasattr(m, "reset_parameters") and isinstance(m, RotaryEmbedding)
                and m.reset_parameters())
    x = torch.randn(2, 9, HIDDEN)
    torch.testing.assert_close(model(x), reference(x), atol=0, rtol=0)


def test_sequence_longer_than_rotary_tables():
    model = ckpt_attn.Transformer(config(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randn(1, 9, HIDDEN))


def test_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match="x must be"):
        ckpt_attn.Transformer(config())(torch.randn(2, 5, HIDDEN + 1))
    with pytest.raises(TypeError, match="cfg"):
        ckpt_attn.Transformer({"num_layers": 2})


@pytest.mark.parametrize("centered, bias", [(False, False), (True, False), (True, True)])
def test_norm_matches_torch_and_gradcheck(centered, bias):
    norm = Norm(12, centered=centered, bias=bias).double()
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))
    assert torch.autograd.gradcheck(lambda w: Norm.forward(norm, x), (norm.weight,))
    if centered:
        ref = torch.nn.functional.layer_norm(x, (12,), norm.weight, norm.bias, norm.eps)
    else:
        ref = torch.nn.functional.rms_norm(x, (12,), norm.weight, norm.eps)
    torch.testing.assert_close(norm(x), ref)


def test_norm_on_one_dimensional_input_and_no_double_backward():
    norm = Norm(6, centered=True, bias=True).double()
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))
    # no second derivative (rather than a silently wrong one): the gradient is a constant
    (grad,) = torch.autograd.grad(norm(x).sum(), x, create_graph=True)
    assert not grad.requires_grad


def test_residual_dropout_rate_in_bfloat16():
    x = torch.ones(1000, 1000, dtype=torch.bfloat16)
    torch.manual_seed(0)
    kept = (dropout(x, 0.001, True) != 0).float().mean().item()
    assert abs((1 - kept) - 0.001) < 0.0003  # bf16 uniforms would drop ~3x as many


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_saves_exactly_the_documented_terms(mlp, norm, dropout, dtype):
    cfg = config(mlp=mlp, norm=norm, dropout=dropout, bias=norm == "layernorm")
    layer = ckpt_attn.TransformerLayer(cfg).to(dtype)
    x = torch.randn(2, 7, HIDDEN, dtype=dtype, requires_grad=True)
    assert saved_bytes(layer, x) == sum(t.bytes for t in layer_terms(cfg, 2, 7, dtype))
