"""The op under torch.compile and torch.export.

- The fake implementations equal the real ones in shape, dtype and strides on both
  backends (torch.library.opcheck over the contract's cases).
- Inductor with fullgraph=True makes one graph, no break, of attention forward and
  backward (dropout, masks, GQA, strided views, return_lse, packed sequences), of a
  Transformer and of a MultiheadAttention, with eager's gradients.
- Dropout draws its seed from torch's generator as eager does: compiled code and an
  exported program drop the very pairs eager drops after the same torch.manual_seed,
  and draw fresh ones on every call.
- Meta and fake tensors take the fake path whatever backend is named.

Inductor on the CPU compiles C++, which is slow: the shapes are tiny and each compiled
function serves several assertions.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import ckpt_attn
from ckpt_attn import backends
from ckpt_attn.memory import measure

OPS = torch.ops.ckpt_attn
BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def compiled_with_counter(fn):
    """fn compiled by inductor with fullgraph=True, and the counter of dynamo's graphs."""
    counter = CompileCounterWithBackend("inductor")
    return torch.compile(fn, backend=counter, fullgraph=True), counter


def assert_one_graph_no_break(counter) -> None:
    assert counter.frame_count == 1
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0


def leaf(*shape, device=DEVICE):
    return torch.randn(*shape, device=device, requires_grad=True)


def grads_of(fn, inputs, seed):
    """(fn's loss, its gradients) with torch.manual_seed(seed) drawn just before."""
    torch.manual_seed(seed)
    loss = fn(*inputs)
    return loss, torch.autograd.grad(loss, inputs)


# ---------------------------------------------------------------------------
# torch.compile (inductor, fullgraph) of the op


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_path_of_the_op_compiles_to_one_graph_with_eager_gradients(backend):
    """Strided (B, S, H, D) views, GQA, a float mask with grad, dropout and return_lse;
    a bool mask with causal and a window; packed sequences with dropout: one graph,
    eager's output and gradients after the same torch.manual_seed (so the same dropout
    masks), and a fresh mask on the next call."""
    cu_seqlens = torch.tensor([0, 5, 13], dtype=torch.int32, device=DEVICE)
    visible = torch.rand(2, 1, 1, 11, device=DEVICE) > 0.2
    visible[..., 0] = True

    def step(x, keys, values, bias, packed_q, packed_kv):
        q, k, v = x.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        o, lse = ckpt_attn.attention(q, k, v, bias, dropout_p=0.3, return_lse=True,
                                     backend=backend)
        o_masked = ckpt_attn.attention(q, k, v, visible, causal=True, window=(3, 0),
                                       backend=backend)
        o_packed = ckpt_attn.attention_varlen(packed_q, packed_kv, packed_kv, cu_seqlens,
                                              cu_seqlens, 8, 8, causal=True, dropout_p=0.2,
                                              backend=backend)
        return (o * o_masked).sum() + lse.sum() + o_packed.square().sum()

    inputs = (leaf(2, 9, 4, 16), leaf(2, 11, 2, 16), leaf(2, 11, 2, 16), leaf(1, 4, 9, 11),
              leaf(13, 4, 16), leaf(13, 2, 16))
    compiled, counter = compiled_with_counter(step)
    loss, grads = grads_of(compiled, inputs, seed=11)
    expected_loss, expected_grads = grads_of(step, inputs, seed=11)
    assert_one_graph_no_break(counter)
    torch.testing.assert_close(loss, expected_loss)
    for name, got, expected in zip(("x", "k", "v", "bias", "packed q", "packed kv"), grads,
                                   expected_grads, strict=True):
        torch.testing.assert_close(got, expected, msg=lambda m, name=name: f"{name}: {m}")
    torch.manual_seed(11)
    assert torch.equal(compiled(*inputs), loss)  # the same masks after the same seed
    assert not torch.equal(compiled(*inputs), loss)  # the next call draws new ones
    assert counter.frame_count == 1


def test_transformer_and_multihead_attention_train_under_inductor():
    """The torch backend under inductor (the issue's stride failure: dk, dv of strided k, v
    came back contiguous): a training step's gradients equal eager's."""
    torch.manual_seed(0)
    cfg = ckpt_attn.TransformerConfig(num_layers=1, hidden_size=32, num_heads=4,
                                      num_kv_heads=2, mlp="gelu", max_seq_len=16,
                                      backend="torch")
    model = ckpt_attn.Transformer(cfg).to(DEVICE)
    mha = ckpt_attn.MultiheadAttention(32, 4, batch_first=True, backend="torch").to(DEVICE)

    def step(x):
        hidden = model(x)
        attended, _ = mha(hidden, hidden, hidden, need_weights=False)
        return attended.square().mean()

    x = leaf(2, 10, 32)
    parameters = [x, *model.parameters(), *mha.parameters()]
    compiled, counter = compiled_with_counter(step)
    loss = compiled(x)
    grads = torch.autograd.grad(loss, parameters)
    expected_loss = step(x)
    expected = torch.autograd.grad(expected_loss, parameters)
    assert_one_graph_no_break(counter)
    torch.testing.assert_close(loss, expected_loss)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------
# torch.export


class DropoutAttention(torch.nn.Module):
    """Attention with dropout, the module torch.export exports."""

    def forward(self, q, k, v):
        return ckpt_attn.attention(q, k, v, dropout_p=0.4, causal=True, backend="torch")


def test_export_with_dropout_draws_as_eager():
    q, k, v = (torch.randn(1, 2, 7, 8, device=DEVICE) for _ in range(3))
    module = DropoutAttention()
    exported = torch.export.export(module, (q, k, v))
    targets = {node.target for node in exported.graph.nodes}
    assert {OPS.dropout_seed.default, OPS.attention_forward.default} <= targets
    run = exported.module()
    torch.manual_seed(5)
    got = run(q, k, v)
    torch.manual_seed(5)
    assert torch.equal(got, module(q, k, v))
    assert not torch.equal(run(q, k, v), got)


# ---------------------------------------------------------------------------
# Fake implementations equal the real ones (torch.library.opcheck)


def strided(*shape):
    """A (B, H, S, D) view of a (B, S, H, D) tensor, as x.transpose(1, 2) gives."""
    b, h, s, d = shape
    return torch.randn(b, s, h, d, device=DEVICE).transpose(1, 2)


def seed_tensor():
    return ckpt_attn.ops.draw_dropout_seed(DEVICE)


# name: (q, k, v, mask, causal, window, dropout_p, dropout_origin, packed, with_dlse)
CASES = {
    "strided-gqa-causal": lambda: (strided(2, 4, 9, 16), strided(2, 2, 11, 16),
                                   strided(2, 2, 11, 16), None, True, (-1, -1), 0.0, None,
                                   None, False),
    "bool-mask-window": lambda: (strided(2, 2, 9, 16), strided(2, 2, 9, 16),
                                 strided(2, 2, 9, 16),
                                 torch.rand(2, 1, 9, 9, device=DEVICE) > 0.3, False, (2, 1),
                                 0.0, None, None, False),
    # a float mask laid out transposed: its gradient must come back in that layout
    "float-mask-grad": lambda: (strided(1, 4, 9, 16), strided(1, 2, 12, 16),
                                strided(1, 2, 12, 16),
                                torch.randn(4, 12, 9, device=DEVICE).mT, False, (-1, -1), 0.0,
                                None, None, False),
    "dropout-lse": lambda: (strided(2, 2, 9, 16), strided(2, 2, 10, 16), strided(2, 2, 10, 16),
                            None, True, (-1, -1), 0.3, None, None, True),
    "dropout-origin": lambda: (strided(1, 2, 9, 16), strided(1, 2, 10, 16),
                               strided(1, 2, 10, 16), None, False, (-1, -1), 0.3,
                               [4, 6, 20, 30], None, False),
    "packed": lambda: (strided(1, 4, 13, 16), strided(1, 2, 13, 16), strided(1, 2, 13, 16),
                       None, True, (-1, -1), 0.2, None,
                       torch.tensor([0, 5, 13], dtype=torch.int32, device=DEVICE), False),
}


def op_arguments(case: str, backend: str):
    """(forward op arguments, backward op arguments) of a case, run for real."""
    q, k, v, mask, causal, window, dropout_p, origin, packed, with_dlse = CASES[case]()
    seed = seed_tensor() if dropout_p > 0 else None
    cu, max_len = (packed, 8) if packed is not None else (None, 0)
    forward = (q, k, v, mask, causal, 0.25, *window, dropout_p, seed, origin, cu, cu, max_len,
               max_len, backend)
    o, stats = OPS.attention_forward(*forward)
    dlse = torch.randn(stats.shape[:3], device=DEVICE) if with_dlse else None
    backward = (torch.randn_like(o), dlse, q, k, v, o, stats, mask, causal, 0.25, *window,
                dropout_p, seed, origin, cu, cu, max_len, max_len,
                mask is not None and mask.is_floating_point(), backend)
    return forward, backward


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_implementations_match_the_real_ones(backend, case):
    """opcheck: schema, fake vs real (shapes, dtypes, strides) of both ops, and the
    forward's registered autograd."""
    forward, backward = op_arguments(case, backend)
    torch.library.opcheck(OPS.attention_backward, backward, test_utils="test_faketensor")
    q, k, v, mask = forward[:4]
    differentiable = [q, k, v] + ([mask] if mask is not None and mask.is_floating_point() else [])
    for t in differentiable:
        t.requires_grad_()
    torch.library.opcheck(OPS.attention_forward, forward,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_gradients_keep_their_inputs_layout():
    """The contract opcheck relies on, read directly: dq, dk, dv (and a float mask's
    gradient) have their inputs' strides on both backends."""
    for backend in BACKENDS:
        forward, backward = op_arguments("float-mask-grad", backend)
        grads = OPS.attention_backward(*backward)
        for name, grad, t in zip(("dq", "dk", "dv", "dmask"), grads, (*forward[:4],),
                                 strict=True):
            assert grad.stride() == t.stride(), f"{backend} {name}"
        o, _ = OPS.attention_forward(*forward)
        assert o.stride() == forward[0].stride()


def test_aot_dispatch_of_the_op_with_dynamic_shapes():
    """opcheck's AOT autograd check (forward and backward traced, dynamic shapes), on the
    case with the most arguments."""
    forward, _ = op_arguments("float-mask-grad", "torch")
    for t in forward[:4]:
        t.requires_grad_()
    torch.library.opcheck(OPS.attention_forward, forward,
                          test_utils="test_aot_dispatch_dynamic")


def test_dropout_arguments_of_the_op_are_checked():
    forward, _ = op_arguments("dropout-lse", "torch")
    with pytest.raises(ValueError, match="seed must be a one-element integer tensor"):
        OPS.attention_forward(*forward[:9], None, *forward[10:])
    with pytest.raises(ValueError, match="seed must be a one-element integer tensor"):
        OPS.attention_forward(*forward[:9], torch.tensor([1.0]), *forward[10:])
    with pytest.raises(ValueError, match="dropout_origin .* inside"):
        OPS.attention_forward(*forward[:10], [2, 0, 10, 10], *forward[11:])
    q, k, v = forward[:3]
    with pytest.raises(TypeError, match="_dropout_origin must be None or four ints"):
        ckpt_attn.attention(q, k, v, _dropout_origin=(0, 0, 9))


# ---------------------------------------------------------------------------
# Meta and fake tensors take the fake path whatever backend is named


def test_meta_and_fake_tensors_serve_any_backend(monkeypatch):
    """backend="triton" with meta and fake tensors runs the fake implementations, forward
    and backward, also where Triton could not run on the CPU; real CPU tensors are still
    refused there. memory.measure runs a meta model built for Triton."""
    monkeypatch.setattr(backends, "_triton_interpreting", lambda: False)
    q, k, v = (leaf(2, h, 9, 16, device="meta") for h in (4, 2, 2))
    o, lse = ckpt_attn.attention(q, k, v, dropout_p=0.1, return_lse=True, backend="triton")
    (o.sum() + lse.sum()).backward()
    assert o.device.type == "meta" and lse.shape == (2, 4, 9)
    assert [t.grad.shape for t in (q, k, v)] == [t.shape for t in (q, k, v)]
    with FakeTensorMode():
        fake = torch.empty(2, 9, 4, 16).transpose(1, 2)
        out = ckpt_attn.attention(fake, fake, fake, causal=True, backend="triton")
        assert out.shape == fake.shape and out.stride() == fake.stride()
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors"):
        ckpt_attn.attention(*(torch.randn(1, 1, 4, 8) for _ in range(3)), backend="triton")

    cfg = ckpt_attn.TransformerConfig(num_layers=2, hidden_size=32, num_heads=4,
                                      backend="triton")
    with torch.device("meta"):
        model = ckpt_attn.Transformer(cfg)
    run = measure(model, torch.empty(2, 12, 32, device="meta"))
    assert run.kept_bytes > 0
