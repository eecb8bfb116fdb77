"""The contract of ckpt_attn.attention beyond accuracy: what autograd saves, the fake
(meta) implementation, empty problems, unusual upstream gradients, backend
choice, fp64 gradcheck and the torch backend's memory bound."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from reference import assert_attention_within_rule, naive_outputs_and_grads
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import ckpt_attn
from ckpt_attn import backends, kernels
from ckpt_attn.backends import chunked

BACKENDS = ["triton", "torch"]


def qkv(b, hq, hkv, sq, sk, d, *, dtype=torch.float32, device=DEVICE, layout="bhsd"):
    def rand(heads, seq):
        if layout == "bshd":
            x = torch.randn(b, seq, heads, d, dtype=dtype, device=device).transpose(1, 2)
        else:
            x = torch.randn(b, heads, seq, d, dtype=dtype, device=device)
        return x.requires_grad_()

    return rand(hq, sq), rand(hkv, sk), rand(hkv, sk)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same memory seen the same way: no copy was made."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


# ---------------------------------------------------------------------------
# What autograd keeps


def saved_by_attention(backend, *args, **kwargs):
    """(output of ckpt_attn.attention, the tensors autograd saved, the indices unpacked)."""
    packed, unpacked = [], []

    def pack(t):
        packed.append(t)
        return len(packed) - 1

    def unpack(index):
        unpacked.append(index)
        return packed[index]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = ckpt_attn.attention(*args, backend=backend, **kwargs)
    return out, packed, unpacked


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_saves_exactly_q_k_v_o_and_row_statistics(backend, layout):
    q, k, v = qkv(2, 4, 2, 37, 45, 24, layout=layout)
    (o, lse), packed, unpacked = saved_by_attention(backend, q, k, v, causal=True,
                                                    return_lse=True)
    assert len(packed) == 5, [tuple(t.shape) for t in packed]
    for name, tensor in {"q": q, "k": k, "v": v, "O": o}.items():
        matches = [i for i, t in enumerate(packed) if same_tensor(t, tensor)]
        assert len(matches) == 1, f"{name} saved {len(matches)} times (as a copy?)"
    # the fifth: fp32 (row max, log2 row sum) per query row, whose sum is lse / ln 2
    (stats,) = [t for t in packed if not any(same_tensor(t, x) for x in (q, k, v, o))]
    assert stats.shape == (*lse.shape, 2) and stats.dtype == torch.float32
    assert torch.equal(lse, ckpt_attn.ops.lse_from_stats(stats))
    (o.sum() + lse.sum()).backward()
    assert sorted(unpacked) == [0, 1, 2, 3, 4]
    assert q.grad is not None and k.grad is not None and v.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_the_statistics_even_when_lse_is_not_returned(backend):
    q, k, v = qkv(1, 2, 1, 20, 30, 16)
    o, packed, _ = saved_by_attention(backend, q, k, v)
    assert len(packed) == 5
    for tensor in (q, k, v, o):
        assert sum(same_tensor(t, tensor) for t in packed) == 1
    (stats,) = [t for t in packed if not any(same_tensor(t, x) for x in (q, k, v, o))]
    _, expected_lse = ckpt_attn.attention(q, k, v, return_lse=True, backend=backend)
    assert stats.dtype == torch.float32 and stats.shape == (1, 2, 20, 2)
    assert torch.equal(ckpt_attn.ops.lse_from_stats(stats), expected_lse)


# ---------------------------------------------------------------------------
# Fake / meta implementation

FAKE_SHAPES = [
    # (b, hq, hkv, sq, sk, d): MHA self-attention, GQA cross-attention both ways, MQA
    (2, 4, 4, 10, 10, 64),
    (2, 8, 2, 10, 33, 40),
    (1, 6, 3, 129, 5, 256),
    (3, 4, 1, 1, 17, 1),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", FAKE_SHAPES)
def test_meta_tensors(shape, dtype):
    b, hq, hkv, sq, sk, d = shape
    q, k, v = qkv(*shape, dtype=dtype, device="meta")
    o, lse = ckpt_attn.attention(q, k, v, causal=True, return_lse=True)
    assert o.device.type == "meta" and lse.device.type == "meta"
    assert o.shape == (b, hq, sq, d) and o.dtype == dtype
    assert lse.shape == (b, hq, sq) and lse.dtype == torch.float32
    (o.sum() + lse.sum()).backward()
    for t in (q, k, v):
        assert t.grad.device.type == "meta"
        assert t.grad.shape == t.shape and t.grad.dtype == dtype


def test_meta_output_keeps_q_layout():
    q, k, v = qkv(2, 4, 2, 10, 12, 32, device="meta", layout="bshd")
    o = ckpt_attn.attention(q, k, v, backend="torch")
    assert o.stride() == q.stride()


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("shape", FAKE_SHAPES[1:3])
def test_fake_tensor_mode(backend, shape):
    b, hq, hkv, sq, sk, d = shape
    real = qkv(*shape, dtype=torch.float16)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        q, k, v = (mode.from_tensor(t).requires_grad_() for t in real)
        o, lse = ckpt_attn.attention(q, k, v, return_lse=True, backend=backend)
        assert isinstance(o, FakeTensor) and isinstance(lse, FakeTensor)
        assert o.shape == (b, hq, sq, d) and o.dtype == torch.float16
        assert o.device == real[0].device
        assert lse.shape == (b, hq, sq) and lse.dtype == torch.float32
        dq, dk, dv = torch.autograd.grad((o, lse), (q, k, v),
                                         (torch.ones_like(o), torch.ones_like(lse)))
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
        assert dq.dtype == dk.dtype == dv.dtype == torch.float16


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_matches_real_metadata(backend):
    """The fake implementation predicts the real outputs' shapes, dtypes and strides."""
    real = qkv(2, 4, 2, 21, 13, 24, layout="bshd")
    o_real, lse_real = ckpt_attn.attention(*real, return_lse=True, backend=backend)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in real]
        o_fake, lse_fake = ckpt_attn.attention(*fake, return_lse=True, backend=backend)
    for f, r in ((o_fake, o_real), (lse_fake, lse_real)):
        assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride())


# ---------------------------------------------------------------------------
# Empty problems


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("b, sq, sk", [(0, 5, 7), (2, 0, 7), (2, 5, 0), (0, 0, 0), (2, 0, 0)])
def test_empty_problems(backend, causal, b, sq, sk):
    q, k, v = qkv(b, 4, 2, sq, sk, 8)
    o, lse = ckpt_attn.attention(q, k, v, causal=causal, return_lse=True, backend=backend)
    assert o.shape == (b, 4, sq, 8) and o.dtype == q.dtype
    assert lse.shape == (b, 4, sq) and lse.dtype == torch.float32
    if sk == 0:
        # nothing to attend to: O = 0 and lse = -inf, never NaN
        assert torch.equal(o, torch.zeros_like(o))
        assert bool(torch.isneginf(lse).all())
    dq, dk, dv = torch.autograd.grad((o, lse), (q, k, v),
                                     (torch.randn_like(o), torch.randn_like(lse)))
    for grad, x in ((dq, q), (dk, k), (dv, v)):
        assert grad.shape == x.shape and grad.dtype == x.dtype
        assert torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_keys_sum_backward(backend):
    """S_k = 0 with the expanded (stride-0) gradient of o.sum() and a used lse."""
    q, k, v = qkv(2, 2, 2, 3, 0, 16)
    o, lse = ckpt_attn.attention(q, k, v, return_lse=True, backend=backend)
    (o.sum() + lse.clamp(min=-1.0).sum()).backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    assert k.grad.shape == k.shape and v.grad.shape == v.shape


# ---------------------------------------------------------------------------
# Upstream gradients with unusual strides


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_backward_expanded_gradient(backend):
    """o.sum().backward() hands the op an expanded gradient whose strides are all 0."""
    q, k, v = qkv(2, 4, 2, 33, 47, 16)
    o = ckpt_attn.attention(q, k, v, causal=True, backend=backend)
    o.sum().backward()
    ones = torch.ones_like(o)
    assert_attention_within_rule(o.detach(), (q.grad, k.grad, v.grad), q, k, v, ones,
                                 causal=True, label=f"{backend} float32 o.sum()")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_broadcast_over_sequence(backend):
    """A gradient that is stride 0 along the sequence but dense in the head dim."""
    q, k, v = qkv(1, 2, 1, 40, 29, 16)
    o = ckpt_attn.attention(q, k, v, causal=True, backend=backend)
    weight = torch.randn(1, 2, 16, device=DEVICE)
    (o.sum(dim=2) * weight).sum().backward()
    do = weight[:, :, None, :].expand_as(o)
    assert_attention_within_rule(o.detach(), (q.grad, k.grad, v.grad), q, k, v, do,
                                 causal=True, label=f"{backend} float32 seq-broadcast dO")


# ---------------------------------------------------------------------------
# Backend choice


def test_auto_picks_triton_where_it_runs(monkeypatch):
    if DEVICE == "cpu":
        assert backends._triton_interpreting(), "conftest sets TRITON_INTERPRET=1 without CUDA"
    q = torch.randn(1, 2, 9, 16, device=DEVICE)
    assert backends.resolve_backend("auto", q) == "triton"
    assert backends.resolve_backend("auto", q.half()) == "triton"
    assert backends.resolve_backend("auto", q.double()) == "torch"

    calls = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(kernels, "attention_forward",
                        spy("triton", kernels.attention_forward))
    monkeypatch.setattr(chunked, "attention_forward", spy("torch", chunked.attention_forward))
    ckpt_attn.attention(q, q, q)
    assert calls == ["triton"]
    ckpt_attn.attention(q.double(), q.double(), q.double())
    assert calls == ["triton", "torch"]


def test_auto_bfloat16():
    """bf16: triton on CUDA; the interpreter miscomputes bf16 dots, so torch on the CPU."""
    q = torch.randn(1, 2, 9, 16, device=DEVICE, dtype=torch.bfloat16)
    expected = "triton" if q.is_cuda else "torch"
    assert backends.resolve_backend("auto", q) == expected


def test_auto_without_interpreter_on_cpu_is_torch(monkeypatch):
    monkeypatch.setattr(backends, "_triton_interpreting", lambda: False)
    q = torch.randn(1, 2, 9, 16, device="cpu")
    assert backends.resolve_backend("auto", q) == "torch"
    assert backends.resolve_backend("torch", q) == "torch"


# ---------------------------------------------------------------------------
# fp64 gradcheck of the torch backend


@pytest.mark.parametrize("chunk", [128, 2])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(1, 2, 1, 3, 5, 4), (2, 4, 2, 5, 3, 3), (1, 1, 1, 1, 1, 2)])
def test_gradcheck_torch_backend(monkeypatch, shape, causal, chunk):
    monkeypatch.setattr(chunked, "CHUNK", chunk)
    q, k, v = qkv(*shape, dtype=torch.float64, device="cpu")
    fn = lambda q, k, v: ckpt_attn.attention(q, k, v, causal=causal, scale=0.7, backend="torch")
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_torch_backend_lse(causal):
    """lse is float32 even for float64 inputs, so its finite differences need a large eps."""
    q, k, v = qkv(1, 2, 1, 4, 5, 3, dtype=torch.float64, device="cpu")

    def fn(q, k, v):
        o, lse = ckpt_attn.attention(q, k, v, causal=causal, return_lse=True, backend="torch")
        return o, lse.double()

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_float64_torch_backend_is_accurate():
    """float64 on the torch backend: O, lse and the gradients to float64 precision (the
    lse it saves, and recomputes P from, is float64 too)."""
    q, k, v = qkv(1, 4, 2, 150, 170, 32, dtype=torch.float64, device="cpu")
    do = torch.randn_like(q)
    o, lse = ckpt_attn.attention(q, k, v, causal=True, backend="torch", return_lse=True)
    assert lse.dtype == torch.float64
    grads = torch.autograd.grad(o, (q, k, v), do)
    ref_o, _, ref_grads = naive_outputs_and_grads(q, k, v, do, causal=True)
    assert (o - ref_o).abs().max() < 1e-12
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert (grad - ref).abs().max() < 1e-12 * ref.abs().max()


# ---------------------------------------------------------------------------
# Memory: the torch backend never holds an S_q x S_k tensor


class LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_torch_backend_never_allocates_sq_by_sk(monkeypatch, causal):
    b, hq, hkv, s, d = 1, 2, 1, 2048, 16
    # The ops inside a custom op are invisible to a mode entered outside it, so the
    # backend functions are wrapped to run under the recording mode.
    recorder = LargestTensor()

    def recorded(fn):
        def wrapped(*args, **kwargs):
            with recorder:
                return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(chunked, "attention_forward", recorded(chunked.attention_forward))
    monkeypatch.setattr(chunked, "attention_backward", recorded(chunked.attention_backward))
    q, k, v = qkv(b, hq, hkv, s, s, d, device="cpu")
    o, lse = ckpt_attn.attention(q, k, v, causal=causal, return_lse=True, backend="torch")
    forward_ops = recorder.ops
    (o.sum() + lse.sum()).backward()
    assert forward_ops > 0 and recorder.ops > forward_ops, "the backend did not run recorded"
    bound = chunked.CHUNK * s * hq * b
    assert b * hq * s * s > bound  # the bound does rule out a full score matrix
    assert recorder.largest <= bound, f"{recorder.largest} elements > {bound}"
    assert torch.isfinite(q.grad).all()


def test_memory_recorder_sees_a_full_score_matrix():
    """The recorder above would catch a naive implementation."""
    from reference import naive_attention

    q = torch.randn(1, 2, 300, 16)
    with LargestTensor() as recorder:
        naive_attention(q, q, q)
    assert recorder.largest >= 2 * 300 * 300


# ---------------------------------------------------------------------------
# Tracing: FLOP formulas and torch.compile


@pytest.mark.parametrize("sq, causal, pairs", [(40, False, 40 * 60), (40, True, 40 * 41 // 2),
                                               (100, True, 60 * 61 // 2 + 40 * 60)])
def test_flop_counter_sees_the_custom_ops(sq, causal, pairs):
    """FlopCounterMode counts 4 B H D per visible (query, key) pair forward, 10 backward."""
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = qkv(2, 4, 2, sq, 60, 32)
    with FlopCounterMode(display=False) as counter:
        ckpt_attn.attention(q, k, v, causal=causal, backend="torch").sum().backward()
    assert counter.get_total_flops() == (4 + 10) * 2 * 4 * 32 * pairs


def test_torch_compile_fullgraph_matches_eager():
    """The op traces without graph breaks and compiled gradients equal eager ones."""
    q, k, v = qkv(1, 4, 2, 33, 45, 16)

    def loss(q, k, v):
        o, lse = ckpt_attn.attention(q, k, v, causal=True, return_lse=True, backend="torch")
        return o.square().sum() + lse.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    expected = torch.autograd.grad(loss(q, k, v), (q, k, v))
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
