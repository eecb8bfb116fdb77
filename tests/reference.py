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


def naive_attention(q, k, v, causal=False, scale=None):
    """softmax(q k^T * scale) v in the inputs' dtype, GQA by repeating k and v."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    return torch.matmul(torch.softmax(scores, dim=-1), v), lse


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def error_ratio(ours, naive, reference, atol) -> float:
    """ours' error over (naive's error + atol): the rule asks for <= FACTOR."""
    return max_error(ours, reference) / (max_error(naive, reference) + atol)
