"""ckpt_attn.modules.multihead: MultiheadAttention against torch.nn.MultiheadAttention with the
same weights, and replace_attention on nn.TransformerEncoder.

Tight checks run in float64 on the torch backend: outputs, weights and the gradients of
every parameter, of query/key/value and of float masks agree with torch within 1e-10
(relative to the largest reference value). Float32 checks run the real Triton kernels
(in the interpreter on CPU, see tests/conftest.py) within 1e-5, on tiny shapes. Masks
always leave key 0 visible, since torch gives NaN for a query that sees no key (its
need_weights=True path); that case has its own test.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import DEVICE
from torch import nn

from ckpt_attn.modules import multihead
from ckpt_attn.modules.multihead import MultiheadAttention, replace_attention

F64, F32 = torch.float64, torch.float32
TIGHT, LOOSE = 1e-10, 1e-5
E, H = 16, 4

# (name, constructor kwargs, self-attention?): self-attention passes one tensor as query,
# key and value (torch's single-GEMM path); cross-attention uses L != S.
CONFIGS = [
    ("self", {}, True),
    ("cross", {}, False),
    ("self-nobias", {"bias": False}, True),
    ("self-bias_kv", {"add_bias_kv": True}, True),
    ("cross-zero_attn", {"add_zero_attn": True}, False),
    ("cross-bias_kv-zero_attn", {"add_bias_kv": True, "add_zero_attn": True}, False),
    ("kdim-vdim", {"kdim": 12, "vdim": 20}, False),
]
config_param = pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
MASKS = ["none", "kpm-bool", "kpm-float", "attn2d-bool", "attn2d-float", "attn3d-bool",
         "attn3d-float", "both-bool", "both-float", "both-mixed", "causal", "causal-kpm"]
# (need_weights, average_attn_weights)
WEIGHTS = {"fused": (False, True), "averaged": (True, True), "per-head": (True, False)}
weights_param = pytest.mark.parametrize("weights", list(WEIGHTS))


# ---- helpers ----

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only cost, and they spin when another
    process holds a core (on 2 busy cores this file took 2 minutes instead of 35 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def module_pair(dtype, backend, seed=0, **kwargs):
    """(torch's module, ours) with the same random weights, biases included."""
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, device=DEVICE, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = MultiheadAttention(E, H, device=DEVICE, dtype=dtype, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def float_mask(shape, dtype):
    """Random finite biases with some -inf, column 0 (key 0) always finite."""
    mask = torch.randn(shape, dtype=dtype, device=DEVICE)
    hidden = torch.rand(shape, device=DEVICE) < 0.3
    hidden[..., 0] = False
    return mask.masked_fill(hidden, float("-inf")).requires_grad_()


def bool_mask(shape):
    """torch's convention, True = ignore; key 0 never ignored."""
    ignore = torch.rand(shape, device=DEVICE) < 0.4
    ignore[..., 0] = False
    return ignore


def make_masks(kind, n, length, source, dtype, batched=True):
    """(key_padding_mask, attn_mask, is_causal) of the given kind, in torch's conventions.

    Float masks require grad, except the causal one, which the fused path does not read."""
    padding_shape = (n, source) if batched else (source,)
    heads_shape = (n * H, length, source) if batched else (H, length, source)
    kpm = attn = None
    is_causal = kind.startswith("causal")
    if kind in ("kpm-bool", "both-bool", "both-mixed"):
        kpm = bool_mask(padding_shape)
    if kind in ("kpm-float", "both-float", "causal-kpm"):
        kpm = float_mask(padding_shape, dtype)
    if kind in ("attn2d-bool", "both-bool"):
        attn = bool_mask((length, source))
    if kind in ("attn2d-float", "both-mixed"):
        attn = float_mask((length, source), dtype)
    if kind == "attn3d-bool":
        attn = bool_mask(heads_shape)
    if kind in ("attn3d-float", "both-float"):
        attn = float_mask(heads_shape, dtype)
    if kind == "causal":
        attn = torch.ones(length, source, dtype=torch.bool, device=DEVICE).triu(1)
    if kind == "causal-kpm":
        attn = torch.full((length, source), float("-inf"), dtype=dtype, device=DEVICE).triu(1)
    return kpm, attn, is_causal


def make_inputs(self_attention, batched, batch_first, dtype, kdim=E, vdim=E, n=2, length=7,
                source=9):
    """query, key, value leaves that require grad; one tensor for self-attention."""
    def x(seq, features):
        shape = (seq, features) if not batched else (
            (n, seq, features) if batch_first else (seq, n, features))
        return torch.randn(shape, dtype=dtype, device=DEVICE, requires_grad=True)
    if self_attention:
        query = x(length, E)
        return query, query, query
    return x(length, E), x(source, kdim), x(source, vdim)


def clones(args):
    """Fresh leaves with the same values and requires_grad, keeping `a is b` between args."""
    memo = {}
    for value in args.values():
        if isinstance(value, torch.Tensor) and id(value) not in memo:
            memo[id(value)] = value.detach().clone().requires_grad_(value.requires_grad)
    return {name: memo.get(id(value), value) for name, value in args.items()}


def run(module, args, seed=1):
    """Forward with fresh copies of args and backward of a fixed random loss.

    Returns out, weights, then the gradients of the module's parameters and of the args."""
    args = clones(args)
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out, weights = module(**args)
    generator = torch.Generator(device=DEVICE).manual_seed(2)
    loss = (out * torch.randn(out.shape, generator=generator, dtype=out.dtype,
                              device=DEVICE)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, generator=generator,
                                             dtype=weights.dtype, device=DEVICE)).sum()
    loss.backward()
    grads = {f"param {name}": p.grad for name, p in module.named_parameters()}
    grads.update({f"grad {name}": t.grad for name, t in args.items()
                  if isinstance(t, torch.Tensor) and t.requires_grad})
    return {"out": out, "weights": weights, **grads}


def assert_close(actual, expected, tol, what):
    """max |actual - expected| <= tol * max |expected| (None must match None)."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: {actual} vs {expected}"
        return
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    assert actual.dtype == expected.dtype, what
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual)), f"{what}: non-finite entries differ"
    error = (actual - expected)[finite].abs().max().item() if finite.any() else 0.0
    scale = expected[finite].abs().max().item() if finite.any() else 0.0
    assert error <= tol * scale, f"{what}: error {error:.3g}, reference max {scale:.3g}"


def assert_matches_torch(ref, ours, args, tol):
    """Same outputs, weights and gradients (parameters, inputs, float masks) as torch."""
    with warnings.catch_warnings():
        # torch warns when key_padding_mask and attn_mask have different dtypes
        warnings.filterwarnings("ignore", "Support for mismatched key_padding_mask")
        expected = run(ref, args)
    actual = run(ours, args)
    assert actual.keys() == expected.keys()
    for what in expected:
        assert_close(actual[what], expected[what], tol, what)


def forward_args(query, key, value, masks, weights):
    kpm, attn, is_causal = masks
    need_weights, average = WEIGHTS[weights]
    return {"query": query, "key": key, "value": value, "key_padding_mask": kpm,
            "attn_mask": attn, "is_causal": is_causal, "need_weights": need_weights,
            "average_attn_weights": average}


# ---- forward and backward against torch ----

@config_param
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@weights_param
@pytest.mark.parametrize("mask", MASKS)
def test_matches_torch_float64(config, batch_first, weights, mask):
    _, kwargs, self_attention = config
    ref, ours = module_pair(F64, "torch", batch_first=batch_first, **kwargs)
    query, key, value = make_inputs(self_attention, True, batch_first, F64, ours.kdim,
                                    ours.vdim)
    source = key.shape[1 if batch_first else 0]
    args = forward_args(query, key, value, make_masks(mask, 2, 7, source, F64), weights)
    assert_matches_torch(ref, ours, args, TIGHT)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[5], CONFIGS[6]],
                         ids=["self", "cross-bias_kv-zero_attn", "kdim-vdim"])
@weights_param
@pytest.mark.parametrize("mask", ["none", "kpm-bool", "kpm-float", "attn2d-float",
                                  "attn3d-bool", "causal-kpm"])
def test_unbatched_matches_torch(config, weights, mask):
    """(L, E) inputs to a batch_first module: batch_first is ignored, as in torch."""
    _, kwargs, self_attention = config
    ref, ours = module_pair(F64, "torch", batch_first=True, **kwargs)
    query, key, value = make_inputs(self_attention, False, False, F64, ours.kdim, ours.vdim)
    masks = make_masks(mask, 1, 7, key.shape[0], F64, batched=False)
    assert_matches_torch(ref, ours, forward_args(query, key, value, masks, weights), TIGHT)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[5], CONFIGS[6]],
                         ids=["self", "cross-bias_kv-zero_attn", "kdim-vdim"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("mask", ["none", "attn3d-float", "causal-kpm"])
def test_matches_torch_triton_float32(config, batch_first, mask):
    """The fused path on the real Triton kernels (interpreted on CPU), float32."""
    _, kwargs, self_attention = config
    ref, ours = module_pair(F32, "triton", batch_first=batch_first, **kwargs)
    query, key, value = make_inputs(self_attention, True, batch_first, F32, ours.kdim,
                                    ours.vdim, source=13)
    source = key.shape[1 if batch_first else 0]
    args = forward_args(query, key, value, make_masks(mask, 2, 7, source, F32), "fused")
    assert_matches_torch(ref, ours, args, LOOSE)


def test_query_without_visible_key():
    """Every key of batch entry 1 ignored: torch's fused path gives attention 0 (output =
    out_proj.bias) and so do both of ours; torch's need_weights path gives NaN, ours 0."""
    ref, ours = module_pair(F64, "torch")
    query, key, value = make_inputs(False, True, False, F64)
    kpm = torch.zeros(2, 9, dtype=torch.bool, device=DEVICE)
    kpm[1] = True
    args = forward_args(query, key, value, (kpm, None, False), "fused")
    assert_matches_torch(ref, ours, args, TIGHT)
    out, weights = ours(query, key, value, key_padding_mask=kpm)
    assert torch.equal(out[:, 1], ours.out_proj.bias.expand(7, E))
    assert torch.equal(weights[1], torch.zeros(7, 9, dtype=F64, device=DEVICE))
    assert torch.isnan(ref(query, key, value, key_padding_mask=kpm)[0][:, 1]).all()
    out.sum().backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(ours.in_proj_weight.grad).all()


# ---- how masks reach the fused op ----

@pytest.mark.parametrize("mask, expected", [
    ("kpm-bool", ((2, 1, 1, 9), torch.bool, False)),
    ("kpm-float", ((2, 1, 1, 9), F64, False)),
    ("attn2d-bool", ((7, 9), torch.bool, False)),
    ("attn3d-float", ((2, H, 7, 9), F64, False)),
    ("both-bool", ((2, 1, 7, 9), torch.bool, False)),
    ("causal", (None, None, True)),
    ("causal-kpm", ((2, 1, 1, 9), F64, True)),
])
def test_masks_reach_the_op_unexpanded(monkeypatch, mask, expected):
    """A key padding mask goes in as (N, 1, 1, S), is_causal as causal=True with no dense
    mask, and masks are broadcast together, never expanded over heads."""
    seen, real = [], multihead.attention

    def spy(q, k, v, attn_mask, dropout_p, causal, **kwargs):
        seen.append((None if attn_mask is None else tuple(attn_mask.shape),
                     None if attn_mask is None else attn_mask.dtype, causal))
        return real(q, k, v, attn_mask, dropout_p, causal, **kwargs)

    monkeypatch.setattr(multihead, "attention", spy)
    ref, ours = module_pair(F64, "torch")
    query, key, value = make_inputs(False, True, False, F64)
    args = forward_args(query, key, value, make_masks(mask, 2, 7, 9, F64), "fused")
    assert_matches_torch(ref, ours, args, TIGHT)
    assert seen == [expected]


def test_fused_path_stores_no_score_matrix():
    """need_weights=False saves nothing of shape (..., L, S) for backward (a key padding
    mask goes in as (N, 1, 1, S)); the need_weights path does, which shows the check works."""
    length, source = 24, 40
    _, ours = module_pair(F64, "torch")
    query, key, value = make_inputs(False, True, False, F64, length=length, source=source)
    kpm = bool_mask((2, source))

    def saved_shapes(need_weights):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ours(query, key, value, key_padding_mask=kpm, need_weights=need_weights)
        return shapes

    fused = saved_shapes(False)
    assert fused and not [s for s in fused if s[-2:] == (length, source)], fused
    assert [s for s in saved_shapes(True) if s[-2:] == (length, source)]


# ---- parameters, state_dict, attributes ----

@config_param
def test_same_parameters_init_and_state_dict(config):
    _, kwargs, _ = config
    torch.manual_seed(5)
    ref = nn.MultiheadAttention(E, H, **kwargs)
    torch.manual_seed(5)
    ours = MultiheadAttention(E, H, **kwargs)
    assert isinstance(ours, nn.MultiheadAttention)
    theirs, mine = ref.state_dict(), ours.state_dict()
    assert list(mine) == list(theirs)
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name
    for name in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout",
                 "batch_first", "head_dim", "add_zero_attn"):
        assert getattr(ours, name) == getattr(ref, name), name
    # loading both ways
    other_ref, other_ours = module_pair(F32, "auto", seed=6, **kwargs)
    ref.load_state_dict(other_ours.state_dict())
    ours.load_state_dict(other_ref.state_dict())
    for name, value in other_ref.state_dict().items():
        assert torch.equal(ref.state_dict()[name], value)
        assert torch.equal(ours.state_dict()[name], value)


# ---- dropout ----

@weights_param
def test_eval_mode_turns_dropout_off(weights):
    ref, ours = module_pair(F64, "torch", dropout=0.5)
    ref.eval()
    ours.eval()
    query, key, value = make_inputs(False, True, False, F64)
    masks = make_masks("kpm-bool", 2, 7, 9, F64)
    assert_matches_torch(ref, ours, forward_args(query, key, value, masks, weights), TIGHT)


@pytest.mark.parametrize("backend, dtype", [("torch", F64), ("triton", F32)])
def test_fused_dropout_in_training_is_reproducible(backend, dtype):
    """Train mode, need_weights=False: dropout changes the output, the same seed repeats it,
    another seed does not."""
    _, ours = module_pair(dtype, backend, dropout=0.3)
    _, plain = module_pair(dtype, backend, dropout=0.0)
    query, key, value = make_inputs(False, True, False, dtype)
    kpm = bool_mask((2, 9))

    def output(seed, module=ours):
        torch.manual_seed(seed)
        return module(query, key, value, key_padding_mask=kpm, need_weights=False)[0]

    first = output(1)
    assert torch.equal(first, output(1))
    assert not torch.allclose(first, output(2))
    assert not torch.allclose(first, output(1, plain))


def test_weights_path_dropout_matches_torch():
    """need_weights=True drops the weights as torch does: with the same seed, the same
    output, the same (dropped) weights and gradients."""
    ref, ours = module_pair(F64, "torch", dropout=0.3)
    query, key, value = make_inputs(False, True, False, F64)
    masks = make_masks("both-bool", 2, 7, 9, F64)
    assert_matches_torch(ref, ours, forward_args(query, key, value, masks, "per-head"), TIGHT)
    weights = run(ours, forward_args(query, key, value, masks, "per-head"))["weights"]
    masked = (masks[1] | masks[0][:, None, :]).sum() * H  # zero weights without dropout
    assert (weights == 0).sum() > masked


# ---- replace_attention ----

def encoder(dtype):
    layer = nn.TransformerEncoderLayer(E, 2, dim_feedforward=32, dropout=0.0,
                                       batch_first=True, device=DEVICE, dtype=dtype)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


@pytest.mark.parametrize("mode", ["train", "eval", "eval-no_grad"])
@pytest.mark.parametrize("backend, dtype, tol", [("torch", F64, TIGHT), ("auto", F32, LOOSE)],
                         ids=["torch-float64", "auto-float32"])
def test_replace_attention_in_transformer_encoder(mode, backend, dtype, tol):
    """Same outputs and gradients as the original encoder, with a causal mask and a key
    padding mask. train and eval run our modules (counted by a hook); eval under no_grad
    takes TransformerEncoderLayer's fast path, which reads the (same) weights itself."""
    torch.manual_seed(3)
    original = encoder(dtype).train(mode == "train")
    replaced = replace_attention(copy.deepcopy(original), backend=backend)
    for layer in replaced.layers:
        assert type(layer.self_attn) is MultiheadAttention
        assert layer.self_attn.training == (mode == "train")
        assert layer.self_attn.backend == backend
    src = torch.randn(3, 11, E, dtype=dtype, device=DEVICE)
    padding = torch.zeros(3, 11, dtype=torch.bool, device=DEVICE)
    padding[0, 8:], padding[2, 5:] = True, True
    causal = torch.ones(11, 11, dtype=torch.bool, device=DEVICE).triu(1)  # True = ignore
    args = {"src": src, "mask": causal, "src_key_padding_mask": padding, "is_causal": True}
    if mode == "eval-no_grad":
        with torch.no_grad():
            assert_close(replaced(**args), original(**args), tol, "output")
        return
    calls = []
    for layer in replaced.layers:
        layer.self_attn.register_forward_hook(lambda *_: calls.append(1))
    expected = run_encoder(original, args)
    actual = run_encoder(replaced, args)
    assert len(calls) == 2
    assert actual.keys() == expected.keys()
    for what in expected:
        assert_close(actual[what], expected[what], tol, what)


def run_encoder(model, args):
    out = model(**args)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(4),
                             dtype=out.dtype).to(DEVICE))
    return {"out": out, **{name: p.grad for name, p in model.named_parameters()}}


def test_replace_attention_keeps_parameters_and_skips_ours():
    torch.manual_seed(0)
    shared = nn.MultiheadAttention(E, H, kdim=12, dropout=0.1, batch_first=True).eval()
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared),
                           "c": MultiheadAttention(E, H)})
    old_params = list(shared.parameters())
    ours_before = model["c"]
    assert replace_attention(model) is model
    new = model["a"]
    assert type(new) is MultiheadAttention and model["b"][0] is new
    assert all(p is q for p, q in zip(new.parameters(), old_params, strict=True))
    assert (new.kdim, new.dropout, new.batch_first, new.training) == (12, 0.1, True, False)
    assert model["c"] is ours_before
    assert replace_attention(model)["a"] is new
    single = replace_attention(nn.MultiheadAttention(E, H))
    assert type(single) is MultiheadAttention


# ---- bad arguments ----

@pytest.mark.parametrize("kwargs, error, name", [
    ({"embed_dim": 0}, ValueError, "embed_dim"),
    ({"num_heads": 0}, ValueError, "num_heads"),
    ({"num_heads": 3}, ValueError, "divisible by num_heads"),
    ({"kdim": 0}, ValueError, "kdim"),
    ({"vdim": 2.5}, ValueError, "vdim"),
    ({"dropout": 1.0}, ValueError, "dropout"),
    ({"dropout": -0.1}, ValueError, "dropout"),
    ({"backend": "cuda"}, ValueError, "backend"),
])
def test_bad_constructor_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        MultiheadAttention(**{"embed_dim": E, "num_heads": H, **kwargs})


@pytest.mark.parametrize("change, error, name", [
    ({"query": torch.randn(1, 7, 2, E)}, ValueError, "query"),
    ({"key": torch.randn(9, 2, E + 1)}, ValueError, "key"),
    ({"value": torch.randn(8, 2, E)}, ValueError, "key and value"),
    ({"key": torch.randn(9, 3, E), "value": torch.randn(9, 3, E)}, ValueError, "batch size"),
    ({"key_padding_mask": torch.zeros(2, 8, dtype=torch.bool)}, ValueError,
     "key_padding_mask"),
    ({"key_padding_mask": torch.zeros(2, 9, dtype=torch.int64)}, TypeError,
     "key_padding_mask"),
    ({"attn_mask": torch.zeros(7, 8, dtype=torch.bool)}, ValueError, "attn_mask"),
    ({"attn_mask": torch.zeros(H, 7, 9, dtype=torch.bool)}, ValueError, "attn_mask"),
    ({"is_causal": True}, ValueError, "attn_mask"),
    ({"query": [1.0]}, TypeError, "query"),
])
def test_bad_forward_arguments(change, error, name):
    ours = MultiheadAttention(E, H)
    args = {"query": torch.randn(7, 2, E), "key": torch.randn(9, 2, E),
            "value": torch.randn(9, 2, E), **change}
    with pytest.raises(error, match=name):
        ours(**args)


@pytest.mark.parametrize("name", ["is_causal", "need_weights", "average_attn_weights"])
@pytest.mark.parametrize("value, type_name", [
    (torch.tensor([True, False]), "torch.Tensor"), (torch.tensor(True), "torch.Tensor"),
    (1, "int"), (None, "NoneType"),
], ids=["tensor", "0-d-tensor", "int", "None"])
def test_flags_must_be_bool(name, value, type_name):
    """A non-bool flag is a TypeError naming it, never "Boolean value of Tensor ... is
    ambiguous" (torch passes Python bools, nn.Transformer* layers included)."""
    ours = MultiheadAttention(E, H)
    x = torch.randn(7, 2, E)
    causal_mask = torch.ones(7, 7, dtype=torch.bool).triu(1)
    with pytest.raises(TypeError, match=rf"^{name} must be a bool, got {type_name}$"):
        ours(x, x, x, attn_mask=causal_mask, **{name: value})


# ---- torch's conventions, as PyTorch's own tests hold them (tools/client_torch_mha.py) ----

def _bad_call(module_type, kwargs, args):
    """Build module_type(**kwargs) and call it on args; the exception raised, or None."""
    try:
        module = module_type(**{"embed_dim": 4, "num_heads": 4, **kwargs})
        module(*args[:3], **args[3] if len(args) > 3 else {})
    except Exception as error:  # noqa: BLE001 - the exception is the outcome under test
        return error
    return None


Q3, Q2 = torch.randn(4, 4, 4), torch.randn(4, 4)


@pytest.mark.parametrize("kwargs, args", [
    ({"num_heads": 3}, ()),
    ({}, (Q3, torch.randn(4, 4), Q3)),
    ({}, (Q3, Q3, torch.randn(4, 4))),
    ({}, (Q3, Q3, Q3, {"key_padding_mask": torch.tensor([False, False, True, True])})),
    ({}, (Q3, Q3, Q3, {"attn_mask": torch.tensor([False, False, True, True])})),
    ({}, (Q2, torch.randn(4, 4, 4), Q2)),
    ({}, (Q2, Q2, torch.randn(4, 4, 4))),
    ({}, (Q2, Q2, Q2, {"key_padding_mask": torch.zeros(1, 8, dtype=torch.bool)})),
    ({}, (Q2, Q2, Q2, {"attn_mask": torch.zeros(5, 4, 4, dtype=torch.bool)})),
    ({}, (torch.randn(1, 4, 4, 4),) * 3),
    ({}, (torch.randn(4, 4, 8),) * 3),
    ({}, (Q3, torch.randn(4, 4, 6), torch.randn(4, 4, 6))),
    ({"kdim": 6}, (Q3, Q3, Q3)),
    ({"vdim": 6}, (Q3, Q3, Q3)),
    ({}, (Q3, torch.randn(5, 4, 4), Q3)),
    ({}, (Q3, torch.randn(4, 3, 4), torch.randn(4, 3, 4))),
    ({}, (Q3, Q3, Q3, {"key_padding_mask": torch.zeros(7, 5, dtype=torch.bool)})),
    ({}, (Q3, Q3, Q3, {"key_padding_mask": torch.zeros(4, 4, dtype=torch.uint8)})),
    ({}, (Q3, Q3, Q3, {"attn_mask": torch.zeros(5, 5, dtype=torch.bool)})),
    ({}, (Q3, Q3, Q3, {"attn_mask": torch.zeros(4, 4, 4, dtype=torch.bool)})),
    ({}, (Q3, Q3, Q3, {"is_causal": True})),
    ({}, (Q3, Q3, Q3, {"attn_mask": torch.zeros(5, 5, dtype=torch.bool), "is_causal": True,
                       "key_padding_mask": torch.zeros(4, 4, dtype=torch.bool)})),
], ids=["heads-divide", "batched-2d-key", "batched-2d-value", "batched-1d-kpm",
        "batched-1d-attn", "unbatched-3d-key", "unbatched-3d-value", "unbatched-2d-kpm",
        "unbatched-attn3d-shape", "4d-query", "query-features", "key-features",
        "kdim-features", "vdim-features", "key-value-seq", "key-batch", "kpm-shape",
        "kpm-uint8", "attn2d-shape", "attn3d-shape", "causal-no-mask", "causal-kpm-read-mask"])
def test_bad_arguments_raise_what_torch_raises(kwargs, args):
    """Each bad argument raises what torch raises (AssertionError or RuntimeError, with
    torch's message for the dims checks PyTorch's tests match), and ckpt_attn's ValueError /
    TypeError: code written for either catches it. nn.Transformer's tests tell the two apart
    (a wrong key_padding_mask must not be a RuntimeError), so the other kind must not match."""
    theirs = _bad_call(nn.MultiheadAttention, kwargs, args)
    ours = _bad_call(MultiheadAttention, kwargs, args)
    assert theirs is not None and ours is not None, (theirs, ours)
    for kind in (AssertionError, RuntimeError):
        assert isinstance(ours, kind) == isinstance(theirs, kind), (kind, theirs, ours)
    assert isinstance(ours, (ValueError, TypeError)), ours
    if "expected `" in str(theirs) or "query should be" in str(theirs):
        assert str(theirs) in str(ours)


def test_transformer_bad_masks_raise_what_torch_raises():
    """nn.Transformer around the drop-in: a wrong src_mask is a RuntimeError, a wrong
    src_key_padding_mask an AssertionError and not a RuntimeError, as with torch's class
    (PyTorch's test_transformer_args_check)."""
    torch.manual_seed(0)
    model = replace_attention(nn.Transformer(16, 4, 1, 1, 32, dropout=0.0))
    src, tgt = torch.randn(7, 3, 16), torch.randn(5, 3, 16)
    with pytest.raises(RuntimeError, match="attn_mask"):
        model(src, tgt, src_mask=model.generate_square_subsequent_mask(8))
    with pytest.raises(AssertionError, match="key_padding_mask") as caught:
        model(src, tgt, src_key_padding_mask=torch.zeros(7, 8, dtype=torch.bool))
    assert not isinstance(caught.value, RuntimeError)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_is_causal_mask_not_read_is_not_checked(batched):
    """is_causal with need_weights=False and no key_padding_mask: torch does not read
    attn_mask (SDPA's is_causal replaces it), so a mask of the wrong size is not an error
    (PyTorch's is_causal_kernels passes one); the output is torch's."""
    ref, ours = module_pair(F64, "torch")
    query = torch.randn((1, 2, E) if batched else (1, E), dtype=F64, device=DEVICE)
    wrong_size = nn.Transformer.generate_square_subsequent_mask(2, device=DEVICE, dtype=F64)
    args = {"query": query, "key": query, "value": query, "attn_mask": wrong_size,
            "need_weights": False, "is_causal": True}
    expected, _ = ref(**args)
    actual, _ = ours(**args)
    assert_close(actual, expected, TIGHT, "out")


def test_torch_jit_script_is_refused_with_what_to_do():
    """torch.jit.script of the drop-in, alone or inside a layer after replace_attention,
    raises a RuntimeError (as TorchScript does for what it cannot compile) naming what to do,
    not a frontend error from inside forward()."""
    layer = replace_attention(nn.TransformerEncoderLayer(E, H, 32, batch_first=True))
    for module in (MultiheadAttention(E, H, kdim=8, vdim=8), layer):
        with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile .*"
                                               r"replace_attention.*torch\.compile"):
            torch.jit.script(module)


def nested(lengths, features, dtype, layout=torch.strided, seed=0):
    """A NestedTensor (N, L_i, features) of random values."""
    generator = torch.Generator().manual_seed(seed)
    return torch.nested.nested_tensor(
        [torch.randn(n, features, generator=generator, dtype=dtype) for n in lengths],
        layout=layout, device=DEVICE)


@pytest.mark.parametrize("weights", ["fused", "averaged", "per-head"])
def test_nested_self_attention_matches_torchs_fast_path(weights):
    """A NestedTensor (eval, no grad, batch_first), which torch serves on its fast path:
    the same nested output and the same padded weights (0 for padding)."""
    ref, ours = module_pair(F64, "torch", batch_first=True)
    ref.eval()
    ours.eval()
    x = nested([3, 5, 1], E, F64)
    need_weights, average = WEIGHTS[weights]
    with torch.no_grad():
        expected, expected_weights = ref(x, x, x, need_weights=need_weights,
                                         average_attn_weights=average)
        actual, actual_weights = ours(x, x, x, need_weights=need_weights,
                                      average_attn_weights=average)
    assert actual.is_nested and actual.layout == torch.strided
    for a, b in zip(actual.unbind(), expected.unbind(), strict=True):
        assert_close(a, b, TIGHT, "out")
    assert_close(actual_weights, expected_weights, TIGHT, "weights")


def test_nested_tensors_from_transformer_encoder():
    """nn.TransformerEncoder(enable_nested_tensor=True) in inference turns a left-aligned
    padded batch into a NestedTensor; a layer that cannot take its own fast path (here: a
    hook on self_attn) hands it to self_attn, as torch's class takes it."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True, dtype=F64,
                                       device=DEVICE)
    original = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    replaced = replace_attention(copy.deepcopy(original))
    seen = []
    for model in (original, replaced):
        for encoder_layer in model.layers:
            encoder_layer.self_attn.register_forward_hook(
                lambda module, args, out: seen.append((type(module), args[0].is_nested)))
    src = torch.randn(3, 6, E, dtype=F64, device=DEVICE)
    padding = torch.zeros(3, 6, dtype=torch.bool, device=DEVICE)
    padding[0, 4:], padding[2, 1:] = True, True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The PyTorch API of nested tensors")
        expected = original(src, src_key_padding_mask=padding)
        actual = replaced(src, src_key_padding_mask=padding)
    assert seen == [(nn.MultiheadAttention, True)] * 2 + [(MultiheadAttention, True)] * 2
    assert_close(actual, expected, TIGHT, "out")


def test_nested_cross_attention_jagged_matches_each_sequence():
    """Jagged NestedTensors of other lengths for key and value, bias_kv and the zero key
    (torch 2.13 refuses these): each output sequence is torch's unbatched attention of that
    sequence."""
    ref, ours = module_pair(F64, "torch", batch_first=True, add_bias_kv=True,
                            add_zero_attn=True, kdim=12)
    query = nested([3, 5], E, F64, torch.jagged, seed=1)
    key = nested([4, 2], 12, F64, torch.jagged, seed=2)
    value = nested([4, 2], E, F64, torch.jagged, seed=3)
    out, _ = ours(query, key, value, need_weights=False)
    assert out.is_nested and out.layout == torch.jagged
    for o, q, k, v in zip(out.unbind(), query.unbind(), key.unbind(), value.unbind(),
                          strict=True):
        assert_close(o, ref(q, k, v, need_weights=False)[0], TIGHT, "out")


def test_nested_tensor_torch_refuses_is_its_assertion_error():
    """Where torch refuses a NestedTensor (an empty one has no 3 dims, as
    TransformerEncoderLayer gets in PyTorch's test_TransformerEncoderLayer_empty), the error
    is torch's AssertionError with its message; an empty sequence in a batch gives an empty
    output, as torch's layer does."""
    torch.manual_seed(0)
    original = nn.TransformerEncoderLayer(E, H, 32, batch_first=True, dtype=F64,
                                          device=DEVICE).eval()
    replaced = replace_attention(copy.deepcopy(original))
    empty = torch.nested.nested_tensor([], dtype=F64, device=DEVICE)
    with torch.no_grad():
        for layer in (original, replaced):
            with pytest.raises(AssertionError, match="MultiheadAttention does not support "
                                                     "NestedTensor outside of its fast path"):
                layer(empty)
        one_empty = torch.nested.nested_tensor([torch.rand(0, E, dtype=F64)], device=DEVICE)
        assert [t.shape for t in replaced(one_empty).unbind()] == [(0, E)]
    ours = MultiheadAttention(E, H, batch_first=False)
    x = nested([2, 3], E, torch.float32)
    with pytest.raises(AssertionError, match="batch_first was not True"):
        ours(x, x, x)
    with pytest.raises(ValueError, match="key_padding_mask are not supported"):
        MultiheadAttention(E, H, batch_first=True)(
            x, x, x, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
