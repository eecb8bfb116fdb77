"""nn.Modules built on ckpt_attn.attention: a drop-in nn.MultiheadAttention and a
Llama-style Transformer with its config."""

from .config import TransformerConfig
from .multihead import MultiheadAttention, replace_attention
from .transformer import Transformer, TransformerLayer

__all__ = ["MultiheadAttention", "Transformer", "TransformerConfig", "TransformerLayer",
           "replace_attention"]
