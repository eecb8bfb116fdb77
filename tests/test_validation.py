"""Bad inputs to ckpt_attn.attention raise ValueError/TypeError whose message names the
argument, what was given and what is accepted."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import DEVICE

import ckpt_attn
from ckpt_attn import backends


def qkv(b=2, hq=4, hkv=2, sq=5, sk=7, d=8, dtype=torch.float32, device="cpu"):
    return (torch.randn(b, hq, sq, d, dtype=dtype, device=device),
            torch.randn(b, hkv, sk, d, dtype=dtype, device=device),
            torch.randn(b, hkv, sk, d, dtype=dtype, device=device))


def replace(args, name, value):
    q, k, v = args
    return {"q": (value, k, v), "k": (q, value, v), "v": (q, k, value)}[name]


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("shape", [(5, 8), (4, 5, 8), (2, 4, 5, 8, 1)])
def test_not_4d(name, shape):
    args = replace(qkv(), name, torch.randn(shape))
    message = rf"^{name} must be 4-D .*got shape {re.escape(str(shape))}"
    with pytest.raises(ValueError, match=message):
        ckpt_attn.attention(*args)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_not_a_tensor(name):
    args = replace(qkv(), name, [[[[1.0]]]])
    with pytest.raises(TypeError, match=rf"^{name} must be a torch.Tensor, got list"):
        ckpt_attn.attention(*args)


def test_batch_mismatch():
    q, _, _ = qkv(b=2)
    _, k, v = qkv(b=3)
    with pytest.raises(ValueError, match=r"batch size, got 2, 3, 3"):
        ckpt_attn.attention(q, k, v)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_head_dim_mismatch(name):
    args = qkv()
    index = ["q", "k", "v"].index(name)
    bad = replace(args, name, torch.randn(*args[index].shape[:3], 16))
    expected = {"q": "16, 8, 8", "k": "8, 16, 8", "v": "8, 8, 16"}[name]
    with pytest.raises(ValueError, match=rf"q, k, v must share the head dim, got {expected}"):
        ckpt_attn.attention(*bad)


@pytest.mark.parametrize("k_shape, v_shape", [((2, 2, 7, 8), (2, 2, 6, 8)),
                                              ((2, 2, 7, 8), (2, 1, 7, 8))])
def test_kv_heads_or_seq_mismatch(k_shape, v_shape):
    q = torch.randn(2, 4, 5, 8)
    message = f"k and v must share (heads, seq), got {k_shape[1:3]} and {v_shape[1:3]}"
    with pytest.raises(ValueError, match=re.escape(message)):
        ckpt_attn.attention(q, torch.randn(k_shape), torch.randn(v_shape))


@pytest.mark.parametrize("hq, hkv", [(3, 2), (4, 3), (1, 2), (4, 0)])
def test_heads_not_a_multiple(hq, hkv):
    q, k, v = qkv(hq=hq, hkv=hkv)
    with pytest.raises(ValueError, match=rf"q heads \({hq}\) must be a multiple of k/v heads "
                                         rf"\({hkv}\)"):
        ckpt_attn.attention(q, k, v)


@pytest.mark.parametrize("d", [0, 257, 512])
def test_head_dim_out_of_range(d):
    with pytest.raises(ValueError, match=rf"head dim must be in \[1, 256\], got {d}"):
        ckpt_attn.attention(*qkv(d=d))


@pytest.mark.parametrize("d", [1, 256])
def test_head_dim_limits_are_accepted(d):
    o = ckpt_attn.attention(*qkv(d=d), backend="torch")
    assert o.shape == (2, 4, 5, d)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32, torch.float32),
                                    (torch.float32, torch.float32, torch.bfloat16)])
def test_mixed_dtypes(dtypes):
    q, k, v = (t.to(dt) for t, dt in zip(qkv(), dtypes, strict=True))
    with pytest.raises(TypeError, match=r"q, k, v must share one dtype, got "
                                        rf"{dtypes[0]}, {dtypes[1]}, {dtypes[2]}"):
        ckpt_attn.attention(q, k, v)


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8,
                                   torch.complex64])
def test_non_floating_dtype(name, dtype):
    args = qkv()
    index = ["q", "k", "v"].index(name)
    args = replace(args, name, torch.zeros(args[index].shape, dtype=dtype))
    with pytest.raises(TypeError, match=rf"^{name} must be a floating-point tensor .*got {dtype}"):
        ckpt_attn.attention(*args)


def test_unsupported_floating_dtype():
    q, k, v = (torch.zeros(t.shape, dtype=torch.float8_e4m3fn) for t in qkv())
    with pytest.raises(TypeError, match=r"dtype must be float16, bfloat16, float32.*got "
                                        r"torch.float8_e4m3fn"):
        ckpt_attn.attention(q, k, v)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_different_devices(name):
    args = qkv()
    index = ["q", "k", "v"].index(name)
    args = replace(args, name, args[index].to("meta"))
    with pytest.raises(ValueError, match=r"q, k, v must be on one device, got .*meta"):
        ckpt_attn.attention(*args)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_head_dim_not_contiguous(name):
    args = qkv()
    index = ["q", "k", "v"].index(name)
    wide = torch.randn(*args[index].shape[:3], 16)
    strided = wide[..., ::2]
    assert strided.shape == args[index].shape and strided.stride(-1) == 2
    with pytest.raises(ValueError, match=rf"^{name} must have stride\(-1\) == 1.*contiguous"):
        ckpt_attn.attention(*replace(args, name, strided))
    # the suggested fix works
    ckpt_attn.attention(*replace(args, name, strided.contiguous()), backend="torch")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scale(scale):
    with pytest.raises(ValueError, match=rf"scale must be finite, got {scale}"):
        ckpt_attn.attention(*qkv(), scale=scale)


@pytest.mark.parametrize("scale, type_name", [("0.5", "str"), (True, "bool"),
                                              (torch.tensor(0.5), "Tensor")])
def test_scale_of_wrong_type(scale, type_name):
    with pytest.raises(TypeError, match=rf"scale must be a float or None, got {type_name}"):
        ckpt_attn.attention(*qkv(), scale=scale)


@pytest.mark.parametrize("backend", ["cuda", "Triton", "flash", ""])
def test_unknown_backend(backend):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', "
                                         rf"'torch'\), got '{backend}'"):
        ckpt_attn.attention(*qkv(), backend=backend)


def test_triton_rejects_float64():
    # on DEVICE, where backend="triton" can otherwise run (CUDA, or the CPU interpreter)
    with pytest.raises(TypeError, match=r"backend='triton' supports .*got float64.*"
                                        r"backend='torch'"):
        ckpt_attn.attention(*qkv(dtype=torch.float64, device=DEVICE), backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 runs compiled on CUDA")
def test_triton_rejects_bfloat16_in_the_interpreter():
    assert backends._triton_interpreting()
    with pytest.raises(TypeError, match=r"backend='triton'.*bfloat16.*interpreter"):
        ckpt_attn.attention(*qkv(dtype=torch.bfloat16), backend="triton")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "_triton_interpreting", lambda: False)
    with pytest.raises(ValueError, match=r"backend='triton' runs on CUDA tensors.*"
                                         r"TRITON_INTERPRET=1.*got tensors on cpu"):
        ckpt_attn.attention(*qkv(device="cpu"), backend="triton")
