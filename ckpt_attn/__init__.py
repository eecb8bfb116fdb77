"""ckpt-attn: attention that never stores S x S, and checkpoint policies on top.

Public API:
    attention(q, k, v, attn_mask=None, dropout_p=0.0, causal=False, *, scale=None,
              window=None, return_lse=False, backend="auto")
    attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     causal=False, scale=None, dropout_p=0.0, window=None, backend="auto")
    MultiheadAttention, replace_attention(model)      drop-in for nn.MultiheadAttention
    TransformerConfig, TransformerLayer, Transformer  a Llama-style model
    apply_checkpointing(model, policy, *, storage="device", **options)
    ckpt_attn.memory: measure, estimate, plan
"""

from . import memory
from .checkpointing import apply_checkpointing
from .modules import (
    MultiheadAttention,
    Transformer,
    TransformerConfig,
    TransformerLayer,
    replace_attention,
)
from .ops import attention, attention_varlen

__all__ = ["MultiheadAttention", "Transformer", "TransformerConfig", "TransformerLayer",
           "apply_checkpointing", "attention", "attention_varlen", "memory",
           "replace_attention"]
__version__ = "0.1.0"
