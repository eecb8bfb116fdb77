"""attn_mask and sliding windows, for both backends: accuracy, rows that see no key, no
copies of the mask, what autograd saves, a float mask's gradient with -inf entries and
windows, the torch backend's cost and memory, and bad arguments.

Every accuracy check is the rule of tests/reference.py against the float64 reference,
which applies the mask and window exactly as ckpt_attn.attention documents: a boolean
mask says which pairs may attend (True, SDPA's convention), a float mask in q's dtype
is added to the scaled scores, and window=(left, right) lets query i see keys
i - left .. i + right (-1 unbounded), combined with causal (j <= i). A query row that
sees no key gives O = 0, lse = -inf and zero gradients. Each check uses the loss
<O, dO> + <lse, dlse> and compares O, lse (-inf exactly where the reference has it) and
dq, dk, dv. backend="triton" runs the real kernels in the Triton interpreter on CPU
(tests/conftest.py), so sequence lengths stay short and are rarely multiples of its
32-wide tiles; bfloat16 is checked on the torch backend only (the interpreter cannot
run it).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from reference import (
    ATOL,
    GRADIENT_FACTOR,
    assert_attention_within_rule,
    assert_within_rule,
    naive_attention,
    random_inputs,
    run_attention,
)
from torch.utils._python_dispatch import TorchDispatchMode

import ckpt_attn
from ckpt_attn.backends import chunked, fused_cpu
from ckpt_attn.ops import lse_from_stats

# Rows with no visible key: the interpreter evaluates log2(l) = log2(0) = -inf in numpy
# before the kernel replaces it (lse = -inf), and numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")

FP16 = (torch.float16, ATOL[torch.float16])
BF16 = (torch.bfloat16, ATOL[torch.bfloat16])
FP32 = (torch.float32, ATOL[torch.float32])

# (backend, dtype, atol): the kernels in float16 and float32, the torch backend in
# all three dtypes.
CONFIGS = [("triton", *FP16), ("triton", *FP32),
           ("torch", *FP16), ("torch", *BF16), ("torch", *FP32)]
CONFIG_IDS = ["triton-fp16", "triton-fp32", "torch-fp16", "torch-bf16", "torch-fp32"]
backend_dtype = pytest.mark.parametrize("backend, dtype, atol", CONFIGS, ids=CONFIG_IDS)
BACKENDS = ["triton", "torch"]

NEG_INF = float("-inf")


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def one_key_atol(dtype, atol):
    """atol where every query row sees at most one key (window (0, 0), S_k = 1).

    Naive PyTorch then gets dq and dk exactly 0 (or nearly: the softmax of one
    score is 1 and its backward cancels), leaving the rule an atol-only bound,
    while both backends' delta = rowsum(dO * O) cancels dP = dO . v only to a
    float32 rounding (~1e-6 at these sizes; see sweep_atol in
    test_attention_kernels.py). That is far below the fp16/bf16 atol, not float32's.
    """
    return 1e-5 if dtype == torch.float32 else atol


def check(backend, dtype, atol, shape, *, mask_fn=None, causal=False, window=None,
          category):
    """Run attention with the mask mask_fn(dtype) (or none) and the window, check
    everything against the reference, and check that rows seeing no key give exactly
    0 for O and dq. Returns (q, k, v, mask, o, lse, grads)."""
    q, k, v, do = random_inputs(shape, dtype, device=DEVICE)
    mask = mask_fn(dtype) if mask_fn is not None else None
    dlse = torch.randn(q.shape[:3], device=DEVICE)
    o, lse, grads = run_attention(q, k, v, do, backend=backend, causal=causal, dlse=dlse,
                                  attn_mask=mask, window=window)
    assert_attention_within_rule(o, grads, q, k, v, do, causal=causal, lse=lse, dlse=dlse,
                                 atol=atol, attn_mask=mask, window=window,
                                 label=f"{backend} {dtype_name(dtype)} {category}")
    empty = torch.isneginf(lse)
    assert torch.equal(o[empty], torch.zeros_like(o[empty])), "O of a row that sees no key"
    assert torch.equal(grads[0][empty], torch.zeros_like(grads[0][empty])), "dq of such a row"
    return q, k, v, mask, o, lse, grads


def to_mask_dtype(mask, dtype):
    """A float mask in q's dtype; a boolean one as it is."""
    return mask if mask.dtype == torch.bool else mask.to(dtype)


# ---------------------------------------------------------------------------
# Key padding: a (B, 1, 1, S_k) boolean mask, one row of keys per batch


def key_padding_mask(batch, seqlen_k):
    """batch 0 right-padded, batch 1 every key masked, batch 2 left-padded with holes."""
    assert batch == 3
    mask = torch.ones(batch, 1, 1, seqlen_k, dtype=torch.bool, device=DEVICE)
    mask[0, ..., 50:] = False
    mask[1] = False
    mask[2, ..., :20] = False
    mask[2, ..., 30:seqlen_k:7] = False
    return mask


@backend_dtype
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_padding_mask(backend, dtype, atol, causal):
    shape = (3, 2, 1, 70, 83, 32)
    _, _, _, _, o, lse, grads = check(backend, dtype, atol, shape, causal=causal,
                                      mask_fn=lambda _: key_padding_mask(3, 83),
                                      category="masked")
    # batch 1 sees nothing: O and every gradient exactly 0, lse -inf
    assert bool(torch.isneginf(lse[1]).all())
    for name, t in zip(("O", "dq", "dk", "dv"), (o, *grads), strict=True):
        assert torch.equal(t[1], torch.zeros_like(t[1])), f"{name} of the fully masked batch"
    # the other batches see keys, except (causal, left padding) queries 0..19 of batch 2
    expected_empty = torch.zeros_like(lse[0], dtype=torch.bool)
    assert torch.equal(torch.isneginf(lse[0]), expected_empty)
    if causal:
        expected_empty[:, :20] = True
    assert torch.equal(torch.isneginf(lse[2]), expected_empty)
    # keys masked in every batch row are never read into dk, dv
    for batch in (0, 2):
        hidden = ~key_padding_mask(3, 83)[batch, 0, 0]
        assert torch.equal(grads[1][batch][:, hidden], torch.zeros_like(grads[1][batch][:, hidden]))
        assert torch.equal(grads[2][batch][:, hidden], torch.zeros_like(grads[2][batch][:, hidden]))


# ---------------------------------------------------------------------------
# Float masks: a per-head bias, ALiBi


@backend_dtype
def test_per_head_float_bias_causal(backend, dtype, atol):
    """(1, H_q, S_q, S_k) bias with causal, GQA; two rows of one head are -inf throughout
    (a float mask can hide a whole row too)."""
    b, hq, hkv, s, d = 2, 4, 2, 77, 40

    def bias(dtype):
        bias = 2 * torch.randn(1, hq, s, s, device=DEVICE)
        bias[0, 1, [5, 60]] = NEG_INF
        return bias.to(dtype)

    _, _, _, _, _, lse, _ = check(backend, dtype, atol, (b, hq, hkv, s, s, d), mask_fn=bias,
                                  causal=True, category="masked")
    empty = torch.zeros(b, hq, s, dtype=torch.bool)
    empty[:, 1, [5, 60]] = True
    assert torch.equal(torch.isneginf(lse).cpu(), empty)


def alibi_bias(heads, seqlen_q, seqlen_k):
    """(H, S_q, S_k), 3-D so it is left-padded to (1, H, S_q, S_k): slope_h * -|i - j|
    with ALiBi's geometric slopes 2^(-8 (h + 1) / H)."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1, device=DEVICE) / heads)
    distance = (torch.arange(seqlen_q, device=DEVICE)[:, None]
                - torch.arange(seqlen_k, device=DEVICE)[None, :]).abs()
    return slopes[:, None, None] * -distance


@backend_dtype
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_alibi_bias(backend, dtype, atol, causal):
    b, hq, hkv, sq, sk, d = 1, 4, 4, 90, 101, 32
    check(backend, dtype, atol, (b, hq, hkv, sq, sk, d), causal=causal,
          mask_fn=lambda dtype: alibi_bias(hq, sq, sk).to(dtype), category="masked")


# ---------------------------------------------------------------------------
# A full boolean mask, GQA and MQA


@backend_dtype
@pytest.mark.parametrize("heads_kv, causal", [(2, False), (1, True)], ids=["gqa", "mqa-causal"])
def test_full_bool_mask(backend, dtype, atol, heads_kv, causal):
    """(B, H_q, S_q, S_k) random mask: some rows see nothing, one key is hidden from
    everyone (so dk and dv of that key are exactly 0)."""
    b, hq, sq, sk, d = 2, 4, 67, 90, 24
    mask = torch.rand(b, hq, sq, sk, device=DEVICE) < 0.6
    mask[0, 1, 10] = False
    mask[1, 3, 40:45] = False
    mask[1, 0, 66] = False
    mask[..., 7] = False
    _, _, _, _, _, lse, grads = check(backend, dtype, atol, (b, hq, heads_kv, sq, sk, d),
                                      mask_fn=lambda _: mask, causal=causal,
                                      category="masked")
    for row in ((0, 1, 10), (1, 3, 40), (1, 3, 44), (1, 0, 66)):
        assert lse[row] == NEG_INF, row
    for name, grad in zip(("dk", "dv"), grads[1:], strict=True):
        assert torch.equal(grad[:, :, 7], torch.zeros_like(grad[:, :, 7])), name


# ---------------------------------------------------------------------------
# Broadcast masks: the caller's tensor (or a stride-0 view of it), never copied

B, HQ, HKV, SQ, SK, D = 2, 4, 2, 50, 61, 32


def broadcast_mask(kind):
    """The caller's mask (not yet expanded) and whether the case is causal."""
    if kind == "qk-bool":  # (S_q, S_k), some rows fully masked, with causal
        mask = torch.rand(SQ, SK, device=DEVICE) < 0.7
        mask[[3, 31]] = False
        return mask, True
    if kind == "k-float":  # (S_k,): a float key-padding mask with -inf keys
        mask = torch.randn(SK, device=DEVICE)
        mask[[0, 17, 60]] = NEG_INF
        return mask, False
    if kind == "b1qk-bool":  # (B, 1, S_q, S_k)
        mask = torch.rand(B, 1, SQ, SK, device=DEVICE) < 0.5
        mask[1, 0, 7] = False
        return mask, False
    if kind == "1h1k-float":  # (1, H_q, 1, S_k): per-head key bias
        return 3 * torch.randn(1, HQ, 1, SK, device=DEVICE), True
    raise AssertionError(kind)


def is_the_callers_mask(saved, mask, target):
    """saved is the caller's mask itself, or a view of it expanded to `target` (stride 0
    on the broadcast dims): the same storage either way, never a copy."""
    if saved.dtype != mask.dtype or saved.data_ptr() != mask.data_ptr():
        return False
    if saved.shape == mask.shape:
        return saved.stride() == mask.stride()
    if saved.shape != target:
        return False
    padded = mask[(None,) * (4 - mask.dim())]
    return all(saved.stride(dim) == (0 if padded.shape[dim] == 1 else padded.stride(dim))
               for dim in range(4) if target[dim] > 1)


@backend_dtype
@pytest.mark.parametrize("kind", ["qk-bool", "k-float", "b1qk-bool", "1h1k-float"])
def test_broadcast_masks(backend, dtype, atol, kind):
    mask, causal = broadcast_mask(kind)
    mask = to_mask_dtype(mask, dtype)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        check(backend, dtype, atol, (B, HQ, HKV, SQ, SK, D), mask_fn=lambda _: mask,
              causal=causal, category="masked")
    # autograd keeps the caller's mask (or a stride-0 view of it), not a copy
    saved = [t for t in packed if t.dtype == mask.dtype and t.data_ptr() == mask.data_ptr()]
    assert len(saved) == 1, [(tuple(t.shape), t.dtype) for t in packed]
    assert is_the_callers_mask(saved[0], mask, (B, HQ, SQ, SK)), (saved[0].shape,
                                                                  saved[0].stride())


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_mask(backend):
    """A transposed mask (stride(-1) != 1) is read through its strides as well."""
    q, k, v, do = random_inputs((1, 2, 2, 40, 45, 16), torch.float32, device=DEVICE)
    mask = (torch.rand(1, 2, 45, 40, device=DEVICE) < 0.6).transpose(-1, -2)
    assert mask.stride(-1) != 1
    o, lse, grads = run_attention(q, k, v, do, backend=backend, causal=False, attn_mask=mask)
    assert_attention_within_rule(o, grads, q, k, v, do, lse=lse, attn_mask=mask,
                                 label=f"{backend} float32 masked")


# ---------------------------------------------------------------------------
# SDPA's conventions, independently of tests/reference.py


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_same_as_sdpa(backend, kind):
    """Boolean True = may attend, float = added to the scaled scores, as SDPA does
    (the mask hides no whole row here, where SDPA would give NaN)."""
    q, k, v, _ = random_inputs((2, 4, 4, 37, 52, 16), torch.float32, device=DEVICE)
    if kind == "bool":
        mask = torch.rand(2, 1, 37, 52, device=DEVICE) < 0.5
        mask[..., 0] = True
    else:
        mask = torch.randn(2, 1, 37, 52, device=DEVICE)
    ours = ckpt_attn.attention(q, k, v, mask, scale=0.3, backend=backend)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                scale=0.3)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Sliding windows

WINDOW_CASES = {
    # id: (window, causal, shape); shape (b, hq, hkv, sq, sk, d)
    "(0,0)": ((0, 0), False, (1, 2, 2, 70, 70, 32)),
    "(3,5)": ((3, 5), False, (2, 2, 1, 70, 70, 32)),
    "(3,5)-causal": ((3, 5), True, (2, 2, 1, 70, 70, 32)),
    "(16,-1)": ((16, -1), False, (1, 2, 2, 100, 100, 24)),
    "(16,-1)-causal": ((16, -1), True, (1, 2, 2, 100, 100, 24)),
    "(-1,7)": ((-1, 7), False, (1, 4, 2, 70, 70, 32)),
    "(-1,7)-causal": ((-1, 7), True, (1, 4, 2, 70, 70, 32)),
    "larger-than-S": ((200, 300), False, (1, 2, 1, 70, 83, 32)),
    "larger-than-S-causal": ((500, 0), True, (1, 2, 1, 83, 70, 32)),
    # S_q < S_k: query i sees keys i - 10 .. i
    "sq<sk-(10,20)-causal": ((10, 20), True, (1, 2, 1, 45, 100, 32)),
    # S_q > S_k: queries from 53 on see no key (their window starts past S_k)
    "sq>sk-(8,0)": ((8, 0), False, (1, 2, 1, 100, 45, 32)),
    "sq<sk-(0,40)": ((0, 40), False, (1, 2, 2, 33, 130, 16)),
}


@backend_dtype
@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_windows(backend, dtype, atol, case):
    window, causal, shape = WINDOW_CASES[case]
    if window == (0, 0):
        atol = one_key_atol(dtype, atol)
    _, _, _, _, _, lse, _ = check(backend, dtype, atol, shape, causal=causal, window=window,
                                  category="windowed")
    if case == "sq>sk-(8,0)":
        assert bool(torch.isneginf(lse[..., 53:]).all())
        assert not torch.isneginf(lse[..., :53]).any()
    else:
        assert not torch.isneginf(lse).any()


@backend_dtype
def test_window_and_key_padding(backend, dtype, atol):
    """window (4, 0), causal, with batch 0's keys 0..19 and batch 1's keys 60.. masked:
    queries 0..19 of batch 0 and 64..69 of batch 1 see nothing."""
    mask = torch.ones(2, 1, 1, 70, dtype=torch.bool, device=DEVICE)
    mask[0, ..., :20] = False
    mask[1, ..., 60:] = False
    _, _, _, _, _, lse, _ = check(backend, dtype, atol, (2, 2, 1, 70, 70, 32), causal=True,
                                  window=(4, 0), mask_fn=lambda _: mask, category="windowed")
    empty = torch.zeros(2, 2, 70, dtype=torch.bool)
    empty[0, :, :20] = True
    empty[1, :, 64:] = True
    assert torch.equal(torch.isneginf(lse).cpu(), empty)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_unbounded_window_is_no_window(backend, causal):
    """window=(-1, -1) is exactly window=None: the same bits, forward and backward."""
    q, k, v, do = random_inputs((1, 2, 1, 50, 61, 32), torch.float16, device=DEVICE)
    dlse = torch.randn(q.shape[:3], device=DEVICE)
    plain = run_attention(q, k, v, do, backend=backend, causal=causal, dlse=dlse)
    windowed = run_attention(q, k, v, do, backend=backend, causal=causal, dlse=dlse,
                             window=(-1, -1))
    for name, a, b in zip(("O", "lse", "dq", "dk", "dv"), (*plain[:2], *plain[2]),
                          (*windowed[:2], *windowed[2]), strict=True):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------
# Odd lengths, a single query, a single key


def random_key_padding(batch, seqlen_k, *, empty_batch=None):
    mask = torch.rand(batch, 1, 1, seqlen_k, device=DEVICE) < 0.7
    mask[..., 0] = True
    if empty_batch is not None:
        mask[empty_batch] = False
    return mask


ODD_CASES = {
    # id: (shape, causal, window, mask_fn)
    "sq1-key-padding": ((2, 2, 1, 1, 77, 32), False, None,
                        lambda _: random_key_padding(2, 77, empty_batch=1)),
    "sq1-causal-window": ((1, 2, 2, 1, 77, 32), True, (3, 0), None),
    "sk1-bool": ((1, 4, 2, 77, 1, 16), False, None,
                 lambda _: torch.rand(1, 4, 77, 1, device=DEVICE) < 0.5),
    "sq1-sk1-masked": ((2, 2, 1, 1, 1, 8), False, None,
                       lambda _: torch.tensor([True, False], device=DEVICE)[:, None, None, None]),
    "odd-window-bias": ((2, 2, 2, 33, 65, 48), False, (5, 9),
                        lambda dtype: torch.randn(2, 1, 33, 65, device=DEVICE).to(dtype)),
    "odd-causal-bool": ((1, 3, 1, 97, 31, 40), True, None,
                        lambda _: torch.rand(1, 3, 97, 31, device=DEVICE) < 0.6),
    "odd-window-padding": ((1, 2, 1, 95, 63, 24), True, (10, -1),
                           lambda _: random_key_padding(1, 63)),
}


@backend_dtype
@pytest.mark.parametrize("case", list(ODD_CASES))
def test_odd_lengths(backend, dtype, atol, case):
    shape, causal, window, mask_fn = ODD_CASES[case]
    if shape[4] == 1:
        atol = one_key_atol(dtype, atol)
    check(backend, dtype, atol, shape, causal=causal, window=window, mask_fn=mask_fn,
          category="windowed" if window else "masked")


# ---------------------------------------------------------------------------
# What autograd keeps


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["key-padding", "qk-float"])
def test_saves_q_k_v_o_statistics_and_the_mask(backend, kind):
    b, hq, hkv, sq, sk, d = 2, 4, 2, 37, 45, 24
    q, k, v, _ = random_inputs((b, hq, hkv, sq, sk, d), torch.float32, device=DEVICE)
    if kind == "key-padding":
        mask = random_key_padding(b, sk)
    else:
        mask = torch.randn(sq, sk, device=DEVICE)
    packed, unpacked = [], []

    def pack(t):
        packed.append(t)
        return len(packed) - 1

    def unpack(index):
        unpacked.append(index)
        return packed[index]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        o, lse = ckpt_attn.attention(q, k, v, mask, causal=True, window=(9, 3), return_lse=True,
                                     backend=backend)
    assert len(packed) == 6, [(tuple(t.shape), t.dtype) for t in packed]
    for name, tensor in {"q": q, "k": k, "v": v, "O": o}.items():
        matches = [i for i, t in enumerate(packed) if same_tensor(t, tensor)]
        assert len(matches) == 1, f"{name} saved {len(matches)} times (as a copy?)"
    statistics = [t for t in packed if t.shape == (b, hq, sq, 2)]
    assert len(statistics) == 1 and torch.equal(lse_from_stats(statistics[0]), lse)
    matches = [t for t in packed if is_the_callers_mask(t, mask, (b, hq, sq, sk))]
    assert len(matches) == 1, "the mask is saved as a copy"
    (o.sum() + lse.clamp(min=-1e4).sum()).backward()
    assert sorted(unpacked) == list(range(6))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_meta_tensors_with_mask(backend):
    """The fake implementation takes a mask and a window (shapes propagate on meta)."""
    q, k, v, _ = random_inputs((2, 4, 2, 10, 12, 16), torch.float16, device="meta")
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool, device="meta")
    o, lse = ckpt_attn.attention(q, k, v, mask, causal=True, window=(3, 0), return_lse=True,
                                 backend=backend)
    assert o.shape == q.shape and o.device.type == "meta"
    assert lse.shape == (2, 4, 10) and lse.dtype == torch.float32
    (o.sum() + lse.sum()).backward()
    assert k.grad.shape == k.shape and k.grad.device.type == "meta"


# ---------------------------------------------------------------------------
# The gradient of a float mask that requires grad (dS summed over its broadcast dims)


def reference_mask_grad(q, k, v, do, dlse, mask, dtype, **kwargs):
    """d<O, dO> + <lse, dlse> / d mask of naive attention computed in `dtype`."""
    leaves = [t.detach().to(dtype) for t in (q, k, v)]
    bias = mask.detach().to(dtype).requires_grad_()
    o, lse = naive_attention(*leaves, attn_mask=bias, **kwargs)
    (grad,) = torch.autograd.grad((o, lse), bias, (do.to(dtype), dlse.to(lse.dtype)))
    return grad


MASK_GRAD_CASES = {
    # id: (mask shape, causal, window); shape (2, 4, 2, 45, 61, 32). The shapes are
    # covered by tests/test_bias_grad.py; these add -inf entries, a window and dlse.
    "1hqk-causal": ((1, 4, 45, 61), True, None),
    "k-window": ((61,), False, (6, 3)),
}


@backend_dtype
@pytest.mark.parametrize("case", list(MASK_GRAD_CASES))
def test_float_mask_gradient(backend, dtype, atol, case):
    mask_shape, causal, window = MASK_GRAD_CASES[case]
    q, k, v, do = random_inputs((2, 4, 2, 45, 61, 32), dtype, device=DEVICE)
    bias = torch.randn(mask_shape, device=DEVICE)
    if case == "1hqk-causal":
        bias[0, 2, 30] = NEG_INF  # a row that sees nothing: zero gradient there
        bias[0, 1, :, 5] = NEG_INF
    bias = bias.to(dtype).requires_grad_()
    dlse = torch.randn(q.shape[:3], device=DEVICE)
    o, lse = ckpt_attn.attention(q, k, v, bias, causal=causal, window=window, return_lse=True,
                                 backend=backend)
    *grads, dbias = torch.autograd.grad((o, lse), (q, k, v, bias), (do, dlse))
    label = f"{backend} {dtype_name(dtype)} mask-grad"
    assert_attention_within_rule(o.detach(), grads, q, k, v, do, causal=causal, lse=lse.detach(),
                                 dlse=dlse, atol=atol, attn_mask=bias, window=window,
                                 label=label)
    assert dbias.shape == bias.shape and dbias.dtype == dtype
    kwargs = dict(causal=causal, window=window)
    reference = reference_mask_grad(q, k, v, do, dlse, bias, torch.float64, **kwargs)
    naive = reference_mask_grad(q, k, v, do, dlse, bias, dtype, **kwargs)
    assert_within_rule(dbias, naive, reference, factor=GRADIENT_FACTOR, atol=atol,
                       what=f"{label} dmask")
    if case == "1hqk-causal":
        assert torch.equal(dbias[0, 2, 30], torch.zeros_like(dbias[0, 2, 30]))
        assert torch.equal(dbias[0, 1, :, 5], torch.zeros_like(dbias[0, 1, :, 5]))


# ---------------------------------------------------------------------------
# The torch backend's cost and memory with a window or a mask


class LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def run_recorded(monkeypatch, mode, fn):
    """fn() with the torch backend's functions running under `mode` (the ops inside a
    custom op are invisible to a mode entered outside it, as in test_attention_contract)."""

    def recorded(impl):
        def wrapped(*args, **kwargs):
            with mode:
                return impl(*args, **kwargs)

        return wrapped

    with monkeypatch.context() as patch:
        patch.setattr(chunked, "attention_forward", recorded(chunked.attention_forward))
        patch.setattr(chunked, "attention_backward", recorded(chunked.attention_backward))
        return fn()


MATMULS = {torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.matmul}  # any overload (out=)


class MatmulFlops(TorchDispatchMode):
    """Counts 2 * M * N * K (times the batch) for every matmul an op runs."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in MATMULS:
            self.flops += 2 * out.numel() * args[0].shape[-1]
        return out


def torch_backend_matmul_flops(monkeypatch, seqlen, **kwargs):
    """Matmul FLOPs of one forward + backward of the torch backend's chunked path (B=1,
    H=2, D=16); forwards it covers would otherwise run torch's fused CPU kernel, one op
    no matmul counter sees."""
    monkeypatch.setattr(fused_cpu, "covers", lambda *args: False)
    counter = MatmulFlops()
    q, k, v = (torch.randn(1, 2, seqlen, 16, requires_grad=True) for _ in range(3))
    run_recorded(monkeypatch, counter,
                 lambda: ckpt_attn.attention(q, k, v, backend="torch", **kwargs).sum().backward())
    return counter.flops


def chunked_pairs(seqlen, left):
    """(query, key) pairs the torch backend computes with causal and window (left, 0):
    each CHUNK-row query chunk [start, stop) multiplies keys max(0, start - left) .. stop."""
    return sum((min(start + chunked.CHUNK, seqlen) - start)
               * (min(start + chunked.CHUNK, seqlen) - (max(0, start - left) if left >= 0 else 0))
               for start in range(0, seqlen, chunked.CHUNK))


def test_window_cost_scales_with_the_window(monkeypatch):
    """Matmul FLOPs of window (32, 0) against full causal attention.

    The torch backend skips keys per CHUNK-row query chunk (128), so a chunk still
    multiplies CHUNK + 32 keys: at S = 1024 that is 0.271 of the causal cost (not
    the per-row 33 / 512.5), at S = 2048 0.145. What "scales with the window" means
    here: the windowed cost is linear in S (doubling S doubles it) while the causal
    cost quadruples, and each is exactly 7 matmuls (2 forward, 5 backward) over the
    pairs the chunks touch.
    """
    flops_per_pair = 7 * 2 * 2 * 16  # 7 matmuls, 2 flops per multiply-add, H = 2, D = 16
    costs = {}
    for seqlen in (1024, 2048):
        causal = torch_backend_matmul_flops(monkeypatch, seqlen, causal=True)
        windowed = torch_backend_matmul_flops(monkeypatch, seqlen, causal=True, window=(32, 0))
        assert causal == flops_per_pair * chunked_pairs(seqlen, -1)
        assert windowed == flops_per_pair * chunked_pairs(seqlen, 32)
        costs[seqlen] = causal, windowed
    assert costs[1024][1] < 0.28 * costs[1024][0]
    assert costs[2048][1] < 0.25 * costs[2048][0]
    assert costs[2048][1] < 2.1 * costs[1024][1]
    assert costs[2048][0] > 3.5 * costs[1024][0]
    # window (32, 0) without causal computes the same pairs
    assert torch_backend_matmul_flops(monkeypatch, 1024, window=(32, 0)) == costs[1024][1]


@pytest.mark.parametrize("kind", ["key-padding", "k-float"])
def test_torch_backend_reads_the_mask_chunk_by_chunk(monkeypatch, kind):
    """A broadcast mask is never expanded to (B, H_q, S_q, S_k) by the torch backend."""
    b, hq, s = 2, 2, 1024
    q, k, v = (torch.randn(b, hq, s, 16, requires_grad=True) for _ in range(3))
    if kind == "key-padding":
        mask = torch.rand(b, 1, 1, s) < 0.8
    else:
        mask = torch.randn(s).requires_grad_()
    recorder = LargestTensor()

    def run():
        o = ckpt_attn.attention(q, k, v, mask, causal=True, backend="torch")
        o.sum().backward()

    run_recorded(monkeypatch, recorder, run)
    bound = chunked.CHUNK * s * hq * b
    assert b * hq * s * s > bound
    assert 0 < recorder.largest <= bound, f"{recorder.largest} elements > {bound}"


# ---------------------------------------------------------------------------
# Bad arguments: each message names the argument


def small_qkv(dtype=torch.float32, device=DEVICE):
    q, k, v, _ = random_inputs((2, 4, 2, 5, 7, 8), dtype, device=device)
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(6, 7), (5, 8), (5,), (3, 1, 1, 7), (2, 3, 5, 7), (2, 5, 7)],
                         ids=["sq+1", "sk+1", "1d-of-sq", "batch3", "heads3", "3d-heads2"])
def test_mask_shape_that_does_not_broadcast(backend, shape):
    q, k, v = small_qkv()
    with pytest.raises(ValueError, match="attn_mask"):
        ckpt_attn.attention(q, k, v, torch.ones(shape, dtype=torch.bool, device=DEVICE),
                            backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_with_more_than_4_dims(backend):
    q, k, v = small_qkv()
    mask = torch.ones(1, 2, 4, 5, 7, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="attn_mask"):
        ckpt_attn.attention(q, k, v, mask, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_dtype, mask_dtype", [(torch.float32, torch.int64),
                                                 (torch.float32, torch.float64),
                                                 (torch.float32, torch.float16),
                                                 (torch.float16, torch.bfloat16),
                                                 (torch.float16, torch.uint8)])
def test_mask_dtype_other_than_bool_float32_or_q_dtype(backend, q_dtype, mask_dtype):
    # float32 masks with float16 q are accepted, as SDPA accepts them: test_mixed_precision
    q, k, v = small_qkv(q_dtype)
    mask = torch.ones(5, 7, device=DEVICE).to(mask_dtype)
    with pytest.raises(TypeError, match="attn_mask"):
        ckpt_attn.attention(q, k, v, mask, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_not_a_tensor(backend):
    q, k, v = small_qkv()
    with pytest.raises(TypeError, match="attn_mask"):
        ckpt_attn.attention(q, k, v, [[True] * 7] * 5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_on_another_device(backend):
    q, k, v = small_qkv()
    mask = torch.ones(5, 7, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="attn_mask"):
        ckpt_attn.attention(q, k, v, mask, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(-2, 0), (0, -2), (-5, -5)])
def test_window_below_minus_one(backend, window):
    q, k, v = small_qkv()
    with pytest.raises(ValueError, match="window"):
        ckpt_attn.attention(q, k, v, window=window, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(1,), (1, 2, 3), (1.5, 2), (1, 2.0), (True, 2), True, 3,
                                    "ab", (None, 1)],
                         ids=["len1", "len3", "float", "float2", "bool-item", "bool", "int",
                              "str", "none-item"])
def test_window_not_a_pair_of_ints(backend, window):
    q, k, v = small_qkv()
    with pytest.raises(TypeError, match="window"):
        ckpt_attn.attention(q, k, v, window=window, backend=backend)


def test_naive_reference_zeroes_only_rows_without_keys():
    """The reference replaces rows that see no key by 0 and keeps any other NaN."""
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    mask = torch.tensor([[True, True], [False, False], [True, False]])
    o, lse = naive_attention(q, q[:, :, :2], q[:, :, :2], attn_mask=mask)
    assert torch.equal(o[0, 0, 1], torch.zeros(4, dtype=torch.float64))
    assert lse[0, 0, 1] == NEG_INF and torch.isfinite(lse[0, 0, [0, 2]]).all()
    poisoned = q.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    o, _ = naive_attention(poisoned, q[:, :, :2], q[:, :, :2], attn_mask=mask)
    assert torch.isnan(o[0, 0, 0]).all() and torch.equal(o[0, 0, 1], torch.zeros_like(o[0, 0, 1]))
