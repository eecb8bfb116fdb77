"""torch's own fused CPU attention for the torch backend's forward, where it applies.

aten's flash attention for the CPU (`_scaled_dot_product_flash_attention_for_cpu`, what
scaled_dot_product_attention runs on a CPU) never holds S x S either and returns the
logsumexp with O. The torch backend (chunked.py) hands it the forwards it covers:

- CPU tensors in float32 or float64, no dropout (ours draws a Philox stream of its own),
  no window hiding a pair, no packed sequences (chunked.py runs those one by one and so
  reaches this module once per sequence that has queries and keys);
- masks: bool (converted to 0 / -inf on the mask's own, unexpanded shape, as SDPA
  converts them) or float; causal top-left, as ours;
- GQA when the installed torch's kernel maps query heads to key heads (probed once,
  without reading outside a tensor); otherwise those calls stay on the chunked path;
- a finite q (the kernel can turn a NaN in q into a number; a NaN in k makes the lse NaN
  and one in v makes O NaN, as they must), and rows whose lse stays within LSE_LIMIT or
  that see no key: a row whose keys all carry one huge bias has an lse in which
  log(S_k) rounds away, where the chunked path keeps the row max and log2 sum apart.

Anything else returns None, and the caller runs the chunked forward. The backward stays
chunked: the kernel's backward recomputes P = exp(S - lse) from its float32 lse, summed
through an approximate exp (exp_u20), and takes delta = rowsum(dO * O); on fuzzed
problems that cost up to 5.5x naive float32's dk error (2.6e-6 against 4.7e-7), and 6x
on another even when handed the chunked forward's lse, outside the accuracy rule. The
chunked backward recomputes P = softmax(S) from the scores, so it never reads the lse
kept here.
"""

from __future__ import annotations

import functools

import torch

LOG2E = 1.4426950408889634
# |lse| beyond which log(S_k) may round away next to the row's scores (ulp(1024) = 2^-13):
# such calls take the chunked path, whose statistics lose nothing there.
LSE_LIMIT = 1024.0
DTYPES = (torch.float32, torch.float64)


def covers(q: torch.Tensor, k: torch.Tensor, causal: bool, window: tuple[int, int],
           dropout_p: float) -> bool:
    """Whether a forward's static description is one the fused kernel runs (its values are
    checked again by attention_forward)."""
    return (q.device.type == "cpu" and q.dtype in DTYPES and dropout_p == 0
            and _window_hides_nothing(window, q.shape[2], k.shape[2], causal)
            and q.numel() > 0 and k.numel() > 0  # (a packed sequence may have no keys:
            # the kernel divides by their count, SIGFPE)
            and (q.shape[1] == k.shape[1] or _kernel_maps_gqa()))


def _window_hides_nothing(window: tuple[int, int], seqlen_q: int, seqlen_k: int,
                          causal: bool) -> bool:
    """Whether window = (left, right) hides no pair that causal does not: query i sees keys
    i - left .. i + right (-1 unbounded), so a left side of S_q - 1 or more, a right side
    of S_k - 1 or more, or any right side under causal leaves every pair as it was (the op
    clamps huge sides to the lengths; the result must not depend on how large they were)."""
    left, right = window
    return ((left < 0 or left >= seqlen_q - 1)
            and (right < 0 or right >= seqlen_k - 1 or causal))


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      scale: float, mask: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(O, row statistics) as chunked.attention_forward returns them, the statistics being
    [lse * log2(e), 0] (so that lse = (s0 + s1) * ln 2) and -inf for rows without keys; or
    None when the inputs or the resulting lse are outside what the kernel gets right."""
    if not bool(torch.isfinite(q.sum())) or _has_nan(mask):
        return None  # (an overflowing sum of finite values only costs the chunked path)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=_kernel_mask(mask, q.dtype), scale=scale)
    empty = _rows_without_keys(mask, causal, q.shape[2])
    if not bool(((lse.abs() <= LSE_LIMIT) | empty).all()):  # NaN included
        return None
    if bool(empty.any()):
        o = o.masked_fill(empty[..., None], 0.0)
    log2_lse = (lse * LOG2E).to(q.dtype)
    stats = torch.stack([log2_lse, torch.zeros_like(log2_lse)], dim=-1)
    return o, stats.masked_fill(empty[..., None], float("-inf"))


def _has_nan(mask: torch.Tensor | None) -> bool:
    """Whether a float mask holds a NaN (the kernel would not propagate it)."""
    if mask is None or mask.dtype == torch.bool:
        return False
    return bool(torch.isnan(_unexpanded(mask)).any())


def _unexpanded(mask: torch.Tensor) -> torch.Tensor:
    """The caller's mask behind a (B, H_q, S_q, S_k) expanded view: size 1 where the view
    has stride 0 (one view, no copy, and no larger view on the way)."""
    sizes = [1 if stride == 0 else size for size, stride in zip(mask.shape, mask.stride(),
                                                               strict=True)]
    return mask.as_strided(sizes, mask.stride(), mask.storage_offset())


def _kernel_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The mask as the kernel takes it: additive, in q's dtype, broadcast dims of size 1,
    keys at stride 1 (the kernel reads a row of keys as one run)."""
    if mask is None:
        return None
    mask = _unexpanded(mask)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
    if mask.shape[-1] > 1 and mask.stride(-1) != 1:
        mask = mask.contiguous()
    return mask.to(dtype)


def _rows_without_keys(mask: torch.Tensor | None, causal: bool, seqlen_q: int) -> torch.Tensor:
    """Bool, broadcasting to (B, H_q, S_q): the query rows that see no key. Causal rows see
    keys 0..i, so a row is empty when the mask lets none through or its first lies past i."""
    if mask is None:  # every row sees key 0
        return torch.zeros(seqlen_q, dtype=torch.bool)
    mask = _unexpanded(mask)
    visible = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    no_key = ~visible.any(dim=-1)
    if not causal:
        return no_key
    first = visible.to(torch.uint8).argmax(dim=-1)  # argmax: the first maximal entry
    return no_key | (first > torch.arange(seqlen_q))


@functools.cache
def _kernel_maps_gqa() -> bool:
    """Whether the kernel serves fewer key/value heads than query heads (torch's CPU flash
    attention gained it in 2025). Probed on one query row per head, 2 query heads over 1
    key head whose storage holds a second head after it: a kernel that maps query head 1
    to key head 0 returns v's head 0, one that does not reads the second head (never
    memory outside a tensor)."""
    storage = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)  # (B, H, S, D): head 0, "head 1"
    key_value = storage[:, :1]
    try:
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            torch.ones(1, 2, 1, 1), key_value, key_value)
    except RuntimeError:  # a kernel that refuses the head counts
        return False
    return bool((out == 1.0).all())
