"""The float64 reference and the accuracy rule shared by the kernel tests.

Rule (flash-attention's, see shared REFERENCES): the error of our result
against a float64 reference must be at most FACTOR x the error of the same
computation done naively in plain PyTorch at the input precision, plus a small
atol: FACTOR is 2 for outputs, 3 for gradients.
"""

from __future__ import annotations

import torch

FORWARD_FACTOR = 2.0
GRADIENT_FACTOR = 3.0
ATOL = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 1e-6}


def visible_pairs_mask(seqlen_q, seqlen_k, *, causal=False, window=None, device=None):
    """(S_q, S_k) bool: the pairs causal (top-left, j <= i) and window=(left, right)
    (i - left <= j <= i + right, -1 unbounded) let query i see key j."""
    query = torch.arange(seqlen_q, device=device)[:, None]
    key = torch.arange(seqlen_k, device=device)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if causal:
        visible &= key <= query
    if window is not None:
        left, right = window
        if left >= 0:
            visible &= key >= query - left
        if right >= 0:
            visible &= key <= query + right
    return visible


def naive_attention(q, k, v, causal=False, scale=None, *, attn_mask=None, window=None):
    """softmax(q k^T * scale + mask) v in the inputs' dtype, GQA by repeating k and v.

    attn_mask broadcasts to (B, H_q, S_q, S_k) as in SDPA: bool (True = may
    attend) or float in q's dtype (added to the scaled scores; converted to the
    computation's dtype, which is exact for float64). window=(left, right) lets
    query i see keys i - left .. i + right, -1 unbounded. A row with no visible
    key (every score -inf) gives O = 0, lse = -inf and zero gradients: only those
    rows are replaced, so any other NaN still shows.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores = scores + attn_mask.to(scores.dtype)
    hidden = None
    if causal or window is not None:
        hidden = ~visible_pairs_mask(q.shape[2], k.shape[2], causal=causal, window=window,
                                     device=q.device)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        hidden = ~attn_mask if hidden is None else hidden | ~attn_mask
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    # Rows with no visible key: softmax and logsumexp (and their backward) would give
    # NaN, so those rows, and only those, are computed on zeros and then replaced.
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    if empty.any():
        scores = scores.masked_fill(empty, 0.0)
    # float32 at least (float64 stays float64, so the reference lse is exact)
    lse = torch.logsumexp(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    p = torch.softmax(scores, dim=-1)
    if empty.any():
        lse = lse.masked_fill(empty[..., 0], float("-inf"))
        p = p.masked_fill(empty, 0.0)
    return torch.matmul(p, v), lse


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# Largest error / naive-error ratio seen per check, printed at the end of the run.
OBSERVED_RATIOS: dict[str, float] = {}


def assert_within_rule(ours, naive, reference, *, factor: float, atol: float, what: str) -> None:
    """Assert max|ours - ref| <= factor * max|naive - ref| + atol, and record the ratio."""
    assert not torch.isnan(ours).any(), f"{what}: NaN in result"
    err, err_naive = max_error(ours, reference), max_error(naive, reference)
    ratio = err / max(err_naive, atol)
    OBSERVED_RATIOS[what] = max(OBSERVED_RATIOS.get(what, 0.0), ratio)
    assert err <= factor * err_naive + atol, (
        f"{what}: error {err:.3e} > {factor} x naive error {err_naive:.3e} + atol {atol:.0e}"
    )


def naive_outputs_and_grads(q, k, v, do, *, causal=False, scale=None, dlse=None, dtype=None,
                            attn_mask=None, window=None):
    """naive_attention's O, lse and (dq, dk, dv), all computed in `dtype` (default q's).

    The gradients are those of the loss <O, do>, plus <lse, dlse> when dlse is
    given. With dtype=torch.float64 this is the reference; with the inputs'
    dtype it is the naive PyTorch computation the rule compares against.
    """
    dtype = q.dtype if dtype is None else dtype
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    if attn_mask is not None:
        attn_mask = attn_mask.detach()
        if attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(dtype)
    o, lse = naive_attention(*leaves, causal=causal, scale=scale, attn_mask=attn_mask,
                             window=window)
    outputs, grad_outputs = [o], [do.to(dtype)]
    if dlse is not None:
        outputs.append(lse)
        # rows with lse = -inf have no gradient path; a finite dlse there changes nothing
        grad_outputs.append(dlse.to(lse.dtype))
    grads = torch.autograd.grad(outputs, leaves, grad_outputs)
    return o.detach(), lse.detach(), grads


def lse_atol(dtype: torch.dtype, reference_lse: torch.Tensor) -> float:
    """atol for the float32 logsumexp: the input dtype's ATOL, but never below two
    float32 ulps of the largest |lse| (its storage rounding, whatever the input dtype)."""
    finite = reference_lse[torch.isfinite(reference_lse)]
    biggest = finite.abs().max().item() if finite.numel() else 0.0
    return max(ATOL[dtype], 2 * torch.finfo(torch.float32).eps * biggest)


def assert_lse_within_rule(lse, naive_lse, ref_lse, *, atol: float, what: str) -> None:
    """lse under the rule on the rows that see a key; -inf exactly on those that see none
    (where the reference is -inf), and never NaN or +inf."""
    assert not torch.isnan(lse).any(), f"{what}: NaN in result"
    assert not torch.isposinf(lse).any(), f"{what}: +inf in result"
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), (
        f"{what}: -inf at {int(torch.isneginf(lse).sum())} rows, reference at "
        f"{int(empty.sum())} (mismatch at {int((torch.isneginf(lse) != empty).sum())})"
    )
    assert torch.equal(torch.isneginf(naive_lse), empty), f"{what}: naive baseline -inf rows"
    if empty.any():
        lse, naive_lse, ref_lse = lse[~empty], naive_lse[~empty], ref_lse[~empty]
    assert_within_rule(lse, naive_lse, ref_lse, factor=FORWARD_FACTOR, atol=atol, what=what)


def assert_attention_within_rule(o, grads, q, k, v, do, *, causal=False, scale=None, lse=None,
                                 dlse=None, atol: float | None = None, label: str,
                                 attn_mask=None, window=None) -> None:
    """Check O (and lse when given) and the (dq, dk, dv) `grads` of our attention on
    q, k, v against the float64 reference under the rule, naive PyTorch at q's dtype
    being the baseline. `grads` are for the loss <O, do> (+ <lse, dlse>); atol
    defaults to ATOL[q.dtype]. attn_mask and window as in ckpt_attn.attention; rows
    that see no key must have lse = -inf exactly where the reference has it."""
    dtype = q.dtype
    kwargs = dict(causal=causal, scale=scale, dlse=dlse, attn_mask=attn_mask, window=window)
    ref_o, ref_lse, ref_grads = naive_outputs_and_grads(q, k, v, do, dtype=torch.float64,
                                                        **kwargs)
    naive_o, naive_lse, naive_grads = naive_outputs_and_grads(q, k, v, do, **kwargs)
    assert o.shape == ref_o.shape and o.dtype == dtype, (o.shape, o.dtype)
    atol = ATOL[dtype] if atol is None else atol
    assert_within_rule(o, naive_o, ref_o, factor=FORWARD_FACTOR, atol=atol, what=f"{label} O")
    if lse is not None:
        assert lse.shape == ref_lse.shape and lse.dtype == torch.float32, (lse.shape, lse.dtype)
        assert_lse_within_rule(lse, naive_lse, ref_lse, atol=max(atol, lse_atol(dtype, ref_lse)),
                               what=f"{label} lse")
    for name, ours, naive, ref in zip(("dq", "dk", "dv"), grads, naive_grads, ref_grads,
                                      strict=True):
        assert ours.shape == ref.shape and ours.dtype == dtype, (name, ours.shape, ours.dtype)
        assert_within_rule(ours, naive, ref, factor=GRADIENT_FACTOR, atol=atol,
                           what=f"{label} {name}")


def random_inputs(shape, dtype, *, device, layout: str = "bhsd"):
    """Random q, k, v (requiring grad) and an upstream gradient dO.

    shape is (batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim). layout
    "bshd" builds each of q, k, v as a (B, S, H, D) tensor passed as
    .transpose(1, 2), the non-contiguous view attention() must accept as is.
    """
    b, hq, hkv, sq, sk, d = shape

    def rand(heads, seq):
        if layout == "bshd":
            return torch.randn(b, seq, heads, d, dtype=dtype, device=device).transpose(1, 2)
        return torch.randn(b, heads, seq, d, dtype=dtype, device=device)

    q, k, v = rand(hq, sq), rand(hkv, sk), rand(hkv, sk)
    do = torch.randn(b, hq, sq, d, dtype=dtype, device=device)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def run_attention(q, k, v, do, *, backend, causal, scale=None, dlse=None, attn_mask=None,
                  window=None):
    """O, lse and (dq, dk, dv) of ckpt_attn.attention for the loss <O, do> (+ <lse, dlse>)."""
    import ckpt_attn

    o, lse = ckpt_attn.attention(q, k, v, attn_mask, causal=causal, scale=scale, window=window,
                                 return_lse=True, backend=backend)
    outputs, grad_outputs = [o], [do]
    if dlse is not None:
        outputs.append(lse)
        grad_outputs.append(dlse)
    grads = torch.autograd.grad(outputs, (q, k, v), grad_outputs)
    return o.detach(), lse.detach(), grads
