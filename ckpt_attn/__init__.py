"""ckpt-attn: attention that never stores S x S, and checkpoint policies on top.

Public API:
    attention(q, k, v, *, causal=False, scale=None, return_lse=False, backend="auto")
"""

from .ops import attention

__all__ = ["attention"]
__version__ = "0.1.0"
