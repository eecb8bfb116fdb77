"""Rows the fuzz (tests/test_fuzz.py) leaves to tests of their own: each asserts the
correct result, and those wrong today are strict xfails, so that a fix turns them into
failures until the mark is removed.

- Every visible key of a row carries the same huge bias (-1e9, -1e30, float32's min):
  in float32 the scores of that row all round to the bias, so the forward computes
  uniform attention over its visible keys, O = mean(V), lse = the bias (log S_k rounds
  away); the gradients must be those of that softmax, P = 1 / (visible keys).
- A NaN in a query row: NaN in that row's O, lse and dq, and in dk and dv of every key
  the row sees; every other result finite and accurate.
- Keys seen only by queries that see no other key (S_k = 1, say): their dk is 0, as
  naive float32 computes it exactly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from reference import (
    ATOL,
    FORWARD_FACTOR,
    GRADIENT_FACTOR,
    assert_attention_within_rule,
    assert_lse_within_rule,
    assert_within_rule,
    lse_atol,
    naive_outputs_and_grads,
    random_inputs,
    run_attention,
    visible_pairs_mask,
)

import ckpt_attn

BACKENDS = ["triton", "torch"]
FLOAT32_MIN = torch.finfo(torch.float32).min
BIASES = {"-1e9": -1e9, "-1e30": -1e30, "float32-min": FLOAT32_MIN}
SHAPE = (2, 4, 2, 37, 45, 16)  # (B, H_q, H_kv, S_q, S_k, D): GQA, ragged tiles
BIASED_ROWS = [0, 5, 31, 32, 36]  # first, inside, either side of a 32-row tile, last


def xfail(reason: str):
    """A strict xfail: the test turns into a failure once the behaviour is fixed."""
    return pytest.mark.xfail(strict=True, reason=reason)


# ---------------------------------------------------------------------------
# The same huge bias on every key of a row


MIN_ROW_LSE_WRONG = xfail(
    "lse of a row whose every key carries float32's min is -2.36e38 (-max / log2(e)), not "
    "float32's min, on both backends: the log2-domain row max is clamped to finite; O is "
    "right")


def biased_mask(bias: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B, H_q, S_q, S_k) float mask, standard normal except for `bias` on every key of
    BIASED_ROWS in every head; and the (S_q, S_k) visible pairs."""
    batch, heads_q, _, seqlen_q, seqlen_k, _ = SHAPE
    mask = torch.randn(batch, heads_q, seqlen_q, seqlen_k, device=DEVICE)
    mask[:, :, BIASED_ROWS] = bias
    return mask, visible_pairs_mask(seqlen_q, seqlen_k, causal=causal, device=DEVICE)


def uniform_row_reference(q, k, v, do, mask, visible):
    """Float64 O, lse and (dq, dk, dv) of softmax attention with the forward's P: on
    BIASED_ROWS uniform over the visible keys (lse = bias + log of their count), elsewhere
    softmax(q k^T / sqrt(D) + mask); gradients dS = P (dP - rowsum(P dP)) of that P."""
    q, k, v, do, mask = (t.detach().double() for t in (q, k, v, do, mask))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2) * scale + mask).masked_fill(~visible, float("-inf"))
    uniform = torch.zeros_like(scores).masked_fill(~visible, float("-inf"))
    scores[:, :, BIASED_ROWS] = uniform[:, :, BIASED_ROWS]
    p = torch.softmax(scores, dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    lse[:, :, BIASED_ROWS] += mask[:, :, BIASED_ROWS, 0]
    dp = do @ v.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
    dq = ds @ k * scale
    dk = (ds.transpose(-1, -2) @ q * scale).unflatten(1, (-1, group)).sum(dim=2)
    dv = (p.transpose(-1, -2) @ do).unflatten(1, (-1, group)).sum(dim=2)
    return p @ v, lse, (dq, dk, dv)


def run_biased(backend: str, bias: float, causal: bool, *, backward: bool):
    """(ours, naive float32, reference) for SHAPE with `bias` on BIASED_ROWS: each an
    (O, lse, (dq, dk, dv)) triple, ours without gradients (()) unless `backward`."""
    q, k, v, do = random_inputs(SHAPE, torch.float32, device=DEVICE)
    mask, visible = biased_mask(bias, causal)
    if backward:
        ours = run_attention(q, k, v, do, backend=backend, causal=causal, attn_mask=mask)
    else:
        ours = (*ckpt_attn.attention(q, k, v, mask, causal=causal, return_lse=True,
                                     backend=backend), ())
    naive = naive_outputs_and_grads(q, k, v, do, causal=causal, attn_mask=mask)
    return ours, naive, uniform_row_reference(q, k, v, do, mask, visible)


def forward_cases():
    """(backend, bias name), the ones wrong today marked."""
    for backend in BACKENDS:
        for name in BIASES:
            marks = MIN_ROW_LSE_WRONG if name == "float32-min" else ()
            yield pytest.param(backend, name, marks=marks, id=f"{backend}-{name}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend, bias", forward_cases())
def test_same_huge_bias_on_every_key_forward(backend, bias, causal):
    """O = mean of the visible V and lse = the bias on the biased rows; the other rows
    as usual (all under the accuracy rule)."""
    (o, lse, _), (naive_o, naive_lse, _), (ref_o, ref_lse, _) = run_biased(
        backend, BIASES[bias], causal, backward=False)
    atol = ATOL[torch.float32]
    assert_within_rule(o, naive_o, ref_o, factor=FORWARD_FACTOR, atol=atol,
                       what=f"{backend} {bias}-bias rows O")
    assert_lse_within_rule(lse, naive_lse, ref_lse, atol=max(atol, lse_atol(torch.float32,
                                                                          ref_lse)),
                           what=f"{backend} {bias}-bias rows lse")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", list(BIASES))
def test_same_huge_bias_on_every_key_gradients(backend, bias, causal):
    """dq, dk, dv are those of the softmax the forward computed (P = 1 / visible keys
    on the biased rows), under the accuracy rule."""
    (_, _, grads), (_, _, naive_grads), (_, _, ref_grads) = run_biased(
        backend, BIASES[bias], causal, backward=True)
    for name, ours, naive, ref in zip(("dq", "dk", "dv"), grads, naive_grads, ref_grads,
                                      strict=True):
        assert_within_rule(ours, naive, ref, factor=GRADIENT_FACTOR, atol=ATOL[torch.float32],
                           what=f"{backend} {bias}-bias rows {name}")


# ---------------------------------------------------------------------------
# NaN in a query row


NAN_BATCH, NAN_HEAD, NAN_ROW = 1, 1, 5


def expected_nan(shape, causal: bool):
    """Per result (O, lse, dq, dk, dv): (must be NaN, must be finite) bool masks. dk and
    dv of keys hidden from the NaN row in its (batch, kv head) are in neither: the
    backends compute them tile by tile, with or without the row."""
    batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim = shape
    group = heads_q // heads_kv
    row = torch.zeros(batch, heads_q, seqlen_q, dtype=torch.bool, device=DEVICE)
    row[NAN_BATCH, NAN_HEAD, NAN_ROW] = True
    slice_kv = torch.zeros(batch, heads_kv, seqlen_k, dtype=torch.bool, device=DEVICE)
    slice_kv[NAN_BATCH, NAN_HEAD // group] = True
    seen = visible_pairs_mask(seqlen_q, seqlen_k, causal=causal, device=DEVICE)[NAN_ROW]
    keys = slice_kv & seen
    per_row = (row[..., None].expand(-1, -1, -1, head_dim), ~row[..., None].expand(
        -1, -1, -1, head_dim))
    per_key = (keys[..., None].expand(-1, -1, -1, head_dim),
               ~slice_kv[..., None].expand(-1, -1, -1, head_dim))
    return [per_row, (row, ~row), per_row, per_key, per_key]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 2, 1, 64, 64, 16), (2, 2, 1, 37, 45, 16)],
                         ids=["full-tiles", "ragged-tiles"])
@pytest.mark.parametrize("where", ["row", "one-entry"])
def test_nan_in_a_query_row_propagates(backend, causal, shape, where):
    """A NaN in q (a whole row, or one entry of it) gives NaN in that row's O, lse and dq
    and in dk, dv of the keys it sees; everything else stays finite and accurate."""
    q, k, v, do = random_inputs(shape, torch.float32, device=DEVICE)
    with torch.no_grad():
        if where == "row":
            q[NAN_BATCH, NAN_HEAD, NAN_ROW] = float("nan")
        else:
            q[NAN_BATCH, NAN_HEAD, NAN_ROW, 0] = float("nan")
    o, lse, grads = run_attention(q, k, v, do, backend=backend, causal=causal)
    naive_o, naive_lse, naive_grads = naive_outputs_and_grads(q, k, v, do, causal=causal)
    ref_o, ref_lse, ref_grads = naive_outputs_and_grads(q, k, v, do, causal=causal,
                                                        dtype=torch.float64)
    results = zip(("O", "lse", "dq", "dk", "dv"), (o, lse, *grads),
                  (naive_o, naive_lse, *naive_grads), (ref_o, ref_lse, *ref_grads),
                  expected_nan(shape, causal), strict=True)
    for name, ours, naive, ref, (nan, finite) in results:
        missing = int((~ours[nan].isnan()).sum())
        assert not missing, f"{name}: {missing} of {int(nan.sum())} entries are not NaN"
        assert ours[finite].isfinite().all(), f"{name}: non-finite where it must be finite"
        factor, atol = GRADIENT_FACTOR, ATOL[torch.float32]
        if name in ("O", "lse"):
            factor = FORWARD_FACTOR
        if name == "lse":
            atol = max(atol, lse_atol(torch.float32, ref_lse[finite]))
        assert_within_rule(ours[finite], naive[finite], ref[finite], factor=factor, atol=atol,
                           what=f"{backend} NaN-row {name} elsewhere")


# ---------------------------------------------------------------------------
# Keys seen only by queries that see nothing else


@pytest.mark.parametrize("seqlen_k, window", [(1, None), (64, (0, 0))],
                         ids=["one-key", "diagonal-window"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_seen_by_one_key_rows_only(backend, seqlen_k, window):
    """Every query sees one key: P = 1 there, so dS = P (dP - rowsum(P dP)) = 0 and dq =
    dk = 0 exactly in naive float32; ours must be within the rule of that (the Triton
    kernels take dS = dlse where the recomputed P is 1, the torch backend sums delta =
    rowsum(P dP) from the whole row)."""
    q, k, v, do = random_inputs((2, 4, 2, 64, seqlen_k, 32), torch.float32, device=DEVICE)
    o, lse, grads = run_attention(q, k, v, do, backend=backend, causal=False, window=window)
    assert_attention_within_rule(o, grads, q, k, v, do, lse=lse, window=window,
                                 label=f"{backend} one-key rows")
