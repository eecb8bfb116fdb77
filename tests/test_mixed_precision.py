"""Autocast through the op, MultiheadAttention and the Transformer, and float32 masks with
low-precision queries.

The op follows SDPA, which is on autocast's lower-precision list: inside a region, q, k
and v (floating point, not float64) are cast to the region's dtype, and the backends then
run with autocast off (their float32 arithmetic stays float32). So an autocast call equals,
bit for bit, the same call on inputs cast by hand. A float mask may be float32 whatever
q's dtype (SDPA accepts that too); it is added to the scores unrounded.

Model-level checks use the team's accuracy rule against a float64 reference: the error of
our model under autocast may be at most 2x (3x for gradients) that of the same model
under autocast with PyTorch's own attention (SDPA for the Transformer,
nn.MultiheadAttention for the drop-in), plus bfloat16's small atol.

On the CPU, bfloat16 runs on the torch backend (the Triton interpreter cannot do bfloat16
dots); the CUDA tests (float16 and bfloat16 autocast on the kernels) are marked gpu.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from reference import (
    ATOL,
    FORWARD_FACTOR,
    GRADIENT_FACTOR,
    assert_attention_within_rule,
    assert_within_rule,
)
from torch import nn

import ckpt_attn
from ckpt_attn.modules import transformer
from ckpt_attn.modules.multihead import MultiheadAttention
from ckpt_attn.modules.transformer import RotaryEmbedding

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def qkv(dtype=F32, device="cpu", shape=(2, 4, 2, 19, 23, 16)):
    """q, k, v leaves requiring grad (GQA: 4 query heads, 2 kv heads) and an upstream dO."""
    b, hq, hkv, sq, sk, d = shape
    q = torch.randn(b, hq, sq, d, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(b, hkv, sk, d, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(b, hkv, sk, d, dtype=dtype, device=device, requires_grad=True)
    do = torch.randn(b, hq, sq, d, dtype=dtype, device=device)
    return q, k, v, do


def cast_leaves(tensors, dtype):
    """Detached copies in dtype, requiring grad."""
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def grads_of(output, inputs, grad_output):
    """The gradients of <output, grad_output> with respect to inputs."""
    return torch.autograd.grad(output, inputs, grad_output.to(output.dtype))


# ---- the op ----

@pytest.mark.parametrize("backward_in_region", [False, True], ids=["bwd-after", "bwd-inside"])
def test_op_under_autocast_is_the_op_on_cast_inputs(backward_in_region):
    """float32 q, k, v under bfloat16 autocast: O in bfloat16 like SDPA's, lse float32, and
    every bit equal to the call on inputs cast by hand, gradients (float32, through the
    casts) included, even when backward runs inside the region."""
    q, k, v, do = qkv()
    with torch.autocast("cpu", dtype=BF16):
        o, lse = ckpt_attn.attention(q, k, v, causal=True, return_lse=True)
        expected_dtype = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).dtype
        if backward_in_region:
            grads = grads_of(o, (q, k, v), do)
    if not backward_in_region:
        grads = grads_of(o, (q, k, v), do)
    assert o.dtype == expected_dtype == BF16 and lse.dtype == F32

    leaves = cast_leaves((q, k, v), BF16)
    o_ref, lse_ref = ckpt_attn.attention(*leaves, causal=True, return_lse=True)
    grads_ref = grads_of(o_ref, leaves, do)
    assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)
    for name, grad, grad_ref in zip("qkv", grads, grads_ref, strict=True):
        assert grad.dtype == F32, name
        assert torch.equal(grad, grad_ref.float()), name


def test_op_under_autocast_takes_mixed_dtypes_as_sdpa_does():
    """Under autocast q, k, v may differ in dtype (autocast casts them all, as for SDPA);
    float64 is left alone, also as autocast leaves it, and outside a region a mix is
    refused."""
    q, k, v, _ = qkv()
    v16 = v.detach().to(BF16)
    with torch.autocast("cpu", dtype=BF16):
        o = ckpt_attn.attention(q, k, v16)
        assert F.scaled_dot_product_attention(q, k, v16, enable_gqa=True).dtype == o.dtype == BF16
        q64, k64, v64 = (t.detach().double() for t in (q, k, v))
        assert ckpt_attn.attention(q64, k64, v64).dtype == F64
    assert torch.equal(o, ckpt_attn.attention(*(t.detach().to(BF16) for t in (q, k, v))))
    with pytest.raises(TypeError, match="q, k, v must share one dtype"):
        ckpt_attn.attention(q, k, v16)


def test_autocast_of_another_device_type_changes_nothing():
    """Autocast is per device type: a CPU region leaves meta tensors (shapes through the
    op's fake implementation) in their dtype."""
    q, k, v = (t.detach().to("meta") for t in qkv()[:3])
    with torch.autocast("cpu", dtype=BF16):
        o = ckpt_attn.attention(q, k, v)
    assert o.device.type == "meta" and o.dtype == F32


def test_varlen_under_autocast_is_the_op_on_cast_inputs():
    """attention_varlen casts the packed q, k, v the same way."""
    q, k, v = (torch.randn(11, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    with torch.autocast("cpu", dtype=BF16):
        o = ckpt_attn.attention_varlen(q, k, v, cu, cu, 7, 7, causal=True)
    expected = ckpt_attn.attention_varlen(q.to(BF16), k.to(BF16), v.to(BF16), cu, cu, 7, 7,
                                          causal=True)
    assert o.dtype == BF16 and torch.equal(o, expected)


def test_op_under_autocast_compiles_to_the_eager_result():
    """torch.compile (inductor, fullgraph) over an autocast region around the op: one
    graph, the eager result bit for bit, gradients included."""
    q, k, v, do = qkv()

    def step(q, k, v):
        with torch.autocast("cpu", dtype=BF16):
            return ckpt_attn.attention(q, k, v, causal=True)

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    o = compiled(q, k, v)
    grads = grads_of(o, (q, k, v), do)
    o_eager = step(q, k, v)
    assert counter.frame_count == 1
    assert torch.equal(o, o_eager)
    for grad, grad_eager in zip(grads, grads_of(o_eager, (q, k, v), do), strict=True):
        assert torch.equal(grad, grad_eager)


# ---- float32 masks with low-precision q ----

@pytest.mark.parametrize("dtype, backend", [(F16, "torch"), (F16, "triton"), (BF16, "torch")],
                         ids=["fp16-torch", "fp16-triton", "bf16-torch"])
def test_float32_mask_is_added_unrounded(dtype, backend):
    """A float32 mask with float16/bfloat16 q is accepted, as SDPA accepts it. With values
    q's dtype holds exactly it gives the very result of that mask in q's dtype (O, dq, dk,
    dv, and its own gradient, float32, equal to the low-precision one before rounding);
    with any values it meets the accuracy rule, where the naive baseline rounds the mask."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, do = qkv(dtype, device)
    exact = torch.randint(-8, 3, (4, 19, 23), device=device).float() / 4  # quarters
    exact[..., 0] = 0.0
    results = {}
    for mask_dtype in (F32, dtype):
        mask = exact.to(mask_dtype).requires_grad_()
        o = ckpt_attn.attention(q, k, v, mask, backend=backend)
        results[mask_dtype] = (o, *grads_of(o, (q, k, v, mask), do))
    ours, theirs = results[F32], results[dtype]
    assert ours[-1].dtype == F32
    for name, a, b in zip(("O", "dq", "dk", "dv"), ours[:4], theirs[:4], strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(ours[-1].to(dtype), theirs[-1])

    bias = torch.randn(4, 19, 23, device=device)  # not representable in q's dtype
    o = ckpt_attn.attention(q, k, v, bias, backend=backend)
    assert_attention_within_rule(o, grads_of(o, (q, k, v), do), q, k, v, do, attn_mask=bias,
                                 label=f"fp32 mask {dtype} {backend}")


def test_float32_mask_under_autocast_reaches_the_op_as_is():
    """Under autocast a float32 mask is not cast: backward keeps the caller's tensor (no
    copy) and its gradient is float32. A float16 mask under bfloat16 autocast is cast (the
    op takes bfloat16 with bfloat16 q); a float64 one is refused, as SDPA refuses it."""
    q, k, v, do = qkv()
    bias = torch.randn(4, 19, 23, requires_grad=True)
    saved = []
    with torch.autocast("cpu", dtype=BF16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            o = ckpt_attn.attention(q, k, v, bias)
        (dbias,) = grads_of(o, (bias,), do)
        half = ckpt_attn.attention(q, k, v, bias.detach().half())
        with pytest.raises(TypeError, match="attn_mask must be bool, float32 or q's dtype"):
            ckpt_attn.attention(q, k, v, bias.detach().double())
    assert [t for t in saved if t.data_ptr() == bias.data_ptr() and t.dtype == F32]
    assert dbias.dtype == F32
    cast = [t.detach().to(BF16) for t in (q, k, v, bias.half())]
    assert torch.equal(half, ckpt_attn.attention(*cast))


def test_other_mask_dtypes_are_refused_as_sdpa_refuses_them():
    """float16 with bfloat16 q, float64 with float32 q: a TypeError naming attn_mask."""
    q, k, v, _ = qkv(BF16)
    for mask in (torch.zeros(19, 23, dtype=F16), torch.zeros(19, 23, dtype=F64)):
        with pytest.raises(TypeError, match=rf"attn_mask .* got {mask.dtype}"):
            ckpt_attn.attention(q, k, v, mask)
        with pytest.raises(RuntimeError, match="attn_mask dtype"):
            F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)


# ---- the Transformer ----

def sdpa_attention(q, k, v, attn_mask=None, dropout_p=0.0, causal=False, **_):
    """PyTorch's own attention with ckpt_attn.attention's arguments: the baseline."""
    if causal and attn_mask is not None:  # SDPA takes one or the other
        visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool,
                             device=q.device).tril()
        attn_mask = (attn_mask & visible if attn_mask.dtype == torch.bool
                     else attn_mask.masked_fill(~visible, float("-inf")))
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal=causal,
                                          enable_gqa=True)


def finite_outputs_and_grads(module, out, input_name, x):
    """{"out", input_name, "d <parameter>"} after a backward, each checked present and finite."""
    named = {"out": out, input_name: x.grad}
    named.update((f"d {name}", p.grad) for name, p in module.named_parameters())
    for name, t in named.items():
        assert t is not None and t.isfinite().all(), name
    return named


def model_outputs(model, x, mask, grad_output, *, autocast=None):
    """The model's output, and the gradients of <output, grad_output> for every parameter
    and for x, all in float64 for comparison."""
    x = x.detach().requires_grad_()
    model.zero_grad(set_to_none=True)
    if autocast is None:
        out = model(x, mask)
    else:
        with torch.autocast(x.device.type, dtype=autocast):
            out = model(x, mask)
    assert out.isfinite().all()
    (out * grad_output.to(out.dtype)).sum().backward()
    return finite_outputs_and_grads(model, out, "dx", x)


def assert_transformer_autocast_within_rule(monkeypatch, device, dtype, label):
    """Transformer (fp32 parameters, GQA, causal plus a float32 bias mask) under autocast
    against the float64 model, SDPA under the same autocast being the baseline."""
    cfg = ckpt_attn.TransformerConfig(num_layers=2, hidden_size=64, num_heads=4,
                                      num_kv_heads=2, max_seq_len=32)
    model = ckpt_attn.Transformer(cfg).to(device)
    x = torch.randn(2, 24, 64, device=device)
    mask = torch.randn(2, 1, 24, 24, device=device)  # float32 bias for every layer
    grad_output = torch.randn(2, 24, 64, device=device)

    reference = model_outputs(copy.deepcopy(model).double(), x.double(), mask.double(),
                              grad_output.double())
    ours = model_outputs(model, x, mask, grad_output, autocast=dtype)
    assert ours["out"].dtype == F32  # the residual stream and the final norm stay float32
    monkeypatch.setattr(transformer, "attention", sdpa_attention)
    baseline = model_outputs(model, x, mask, grad_output, autocast=dtype)
    for name in reference:
        factor = FORWARD_FACTOR if name == "out" else GRADIENT_FACTOR
        assert_within_rule(ours[name], baseline[name], reference[name], factor=factor,
                           atol=ATOL[dtype], what=f"{label} {name}")


def test_transformer_under_cpu_autocast_bf16(monkeypatch):
    assert_transformer_autocast_within_rule(monkeypatch, "cpu", BF16, "transformer cpu bf16")


def test_rotary_runs_in_the_activation_dtype():
    """float32 tables applied to bfloat16 activations give bfloat16 (no promotion of q and
    k past v), rotated by the tables rounded to bfloat16."""
    rope = RotaryEmbedding(8, 16, 10000.0)
    x = torch.randn(2, 16, 3, 8, dtype=BF16)
    first, second = x.chunk(2, dim=-1)
    expected = x * rope.cos.to(BF16) + torch.cat([-second, first], -1) * rope.sin.to(BF16)
    assert rope.cos.dtype == F32 and torch.equal(rope(x), expected)


# ---- MultiheadAttention ----

def mha_outputs(module, query, kpm, attn_mask, grad_output, *, autocast, need_weights):
    """Output and gradients (parameters, query) of self-attention, in a dict."""
    query = query.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    with torch.autocast(query.device.type, dtype=autocast, enabled=autocast is not None):
        out, _ = module(query, query, query, key_padding_mask=kpm, attn_mask=attn_mask,
                        need_weights=need_weights)
    (out * grad_output.to(out.dtype)).sum().backward()
    return finite_outputs_and_grads(module, out, "dquery", query)


def assert_mha_autocast_within_rule(device, dtype, need_weights, label):
    """Our drop-in under autocast against float64 nn.MultiheadAttention, torch's module
    under the same autocast being the baseline; a bool key padding mask and a float32
    attn_mask."""
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(32, 4, batch_first=True, device=device)
    ours = MultiheadAttention(32, 4, batch_first=True, device=device)
    ours.load_state_dict(theirs.state_dict())
    query = torch.randn(2, 13, 32, device=device)
    kpm = torch.zeros(2, 13, dtype=torch.bool, device=device)
    kpm[1, 9:] = True
    attn_mask = torch.randn(13, 13, device=device)
    grad_output = torch.randn(2, 13, 32, device=device)

    reference = mha_outputs(copy.deepcopy(theirs).double(), query.double(), kpm,
                            attn_mask.double(), grad_output.double(), autocast=None,
                            need_weights=need_weights)
    baseline = mha_outputs(theirs, query, kpm, attn_mask, grad_output, autocast=dtype,
                           need_weights=need_weights)
    result = mha_outputs(ours, query, kpm, attn_mask, grad_output, autocast=dtype,
                         need_weights=need_weights)
    assert result["out"].dtype == baseline["out"].dtype == dtype
    for name in reference:
        factor = FORWARD_FACTOR if name == "out" else GRADIENT_FACTOR
        assert_within_rule(result[name], baseline[name], reference[name], factor=factor,
                           atol=ATOL[dtype], what=f"{label} {name}")


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
def test_multihead_under_cpu_autocast_bf16(need_weights):
    assert_mha_autocast_within_rule("cpu", BF16, need_weights,
                                    f"mha cpu bf16 need_weights={need_weights}")


@pytest.mark.gpu
@needs_cuda
# ---- CUDA: float16 and bfloat16 autocast on the kernels ----

@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_op_under_autocast_is_the_op_on_cast_inputs(dtype, backend):
    q, k, v, do = qkv(device="cuda", shape=(2, 8, 2, 300, 333, 64))
    with torch.autocast("cuda", dtype=dtype):
        o = ckpt_attn.attention(q, k, v, causal=True, backend=backend)
    grads = grads_of(o, (q, k, v), do)
    leaves = cast_leaves((q, k, v), dtype)
    o_ref = ckpt_attn.attention(*leaves, causal=True, backend=backend)
    assert o.dtype == dtype and torch.equal(o, o_ref)
    for grad, grad_ref in zip(grads, grads_of(o_ref, leaves, do), strict=True):
        assert grad.dtype == F32 and torch.equal(grad, grad_ref.float())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_cuda_transformer_under_autocast(monkeypatch, dtype):
    assert_transformer_autocast_within_rule(monkeypatch, "cuda", dtype,
                                            f"transformer cuda {dtype}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
def test_cuda_multihead_under_autocast(dtype, need_weights):
    assert_mha_autocast_within_rule("cuda", dtype, need_weights,
                                    f"mha cuda {dtype} need_weights={need_weights}")
