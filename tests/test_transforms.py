"""The op under torch.func's transforms, forward-mode AD and double backward: what it
cannot differentiate it refuses by name, saying what to use instead (before: torch's
"must override setup_context", zero jvp tangents without an error, and "no autograd
formula was registered" for ckpt_attn.attention_backward); what works keeps working
(vmap, create_graph=True for a first derivative). Ring attention's refusals run in
tests/context_parallel_worker.py."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

import ckpt_attn

REFUSED = "ckpt_attn.attention does not support torch.func's {} transform"


def inputs(requires_grad=False):
    torch.manual_seed(0)
    return [torch.randn(1, 2, 8, 16, dtype=torch.float64, requires_grad=requires_grad)
            for _ in range(3)]


def attend(q, k, v):
    return ckpt_attn.attention(q, k, v, causal=True, backend="torch")


@pytest.mark.parametrize("name, transform, kind", [
    ("grad", lambda f, q: torch.func.grad(lambda q: f(q).sum())(q), "grad"),
    ("vjp", lambda f, q: torch.func.vjp(f, q), "grad"),
    ("jacrev", lambda f, q: torch.func.jacrev(f)(q), "grad"),
    ("hessian", lambda f, q: torch.func.hessian(lambda q: f(q).sum())(q), "jvp"),
    ("jvp", lambda f, q: torch.func.jvp(f, (q,), (torch.ones_like(q),)), "jvp"),
    ("jacfwd", lambda f, q: torch.func.jacfwd(f)(q), "jvp"),
    ("vmap-grad", lambda f, q: torch.func.vmap(torch.func.grad(
        lambda q: f(q[None]).sum()))(q), "grad"),
])
def test_func_transforms_are_refused(name, transform, kind):
    q, k, v = inputs()
    with pytest.raises(RuntimeError, match=REFUSED.format(kind)) as error:
        transform(lambda q: attend(q, k, v), q)
    assert "torch.autograd.grad" in str(error.value)
    assert "scaled_dot_product_attention" in str(error.value)


def test_varlen_refuses_func_grad():
    q = torch.randn(8, 2, 16, dtype=torch.float64)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="attention_varlen does not support torch.func"):
        torch.func.grad(lambda q: ckpt_attn.attention_varlen(
            q, q, q, cu, cu, 5, 5, backend="torch").sum())(q)


def test_forward_mode_ad_is_refused():
    q, k, v = inputs()
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(q, torch.ones_like(q))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            attend(dual, k, v)
        # plain tensors inside a dual level are fine
        assert attend(q, k, v).shape == q.shape


def test_vmap_works():
    q, k, v = inputs()
    batched = torch.func.vmap(lambda q: attend(q[None], k, v)[0])(q[0][None].expand(3, -1,
                                                                                    -1, -1))
    torch.testing.assert_close(batched, attend(q, k, v).expand(3, -1, -1, -1))


def test_create_graph_first_derivative_then_double_backward_refused():
    q, k, v = inputs(requires_grad=True)
    plain = torch.autograd.grad(attend(q, k, v).sum(), (q, k, v))
    grads = torch.autograd.grad(attend(q, k, v).sum(), (q, k, v), create_graph=True)
    for ours, reference in zip(grads, plain, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="ckpt_attn.attention has no double backward") \
            as error:
        grads[0].pow(2).sum().backward()
    assert "scaled_dot_product_attention" in str(error.value)
