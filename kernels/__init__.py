"""Triton kernels for fused attention and their launchers (tensors in, tensors out).

No autograd and no nn here: ckpt_attn.ops wraps these launchers in a custom op.
"""

from .backward import attention_backward
from .forward import attention_forward

__all__ = ["attention_backward", "attention_forward"]
