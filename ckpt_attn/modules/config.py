"""TransformerConfig: the shape of a Llama-style Transformer, checked on construction."""

from __future__ import annotations

import dataclasses
import math

from ..backends import BACKENDS
from ..validation import MAX_HEAD_DIM

MLPS = ("swiglu", "gelu")
NORMS = ("rmsnorm", "layernorm")


@dataclasses.dataclass
class TransformerConfig:
    """Shape and options of ckpt_attn.Transformer and TransformerLayer.

    Args:
        num_layers: number of TransformerLayers.
        hidden_size: model width; (B, S, hidden_size) in and out.
        num_heads: query heads; must divide hidden_size. head_dim = hidden_size /
            num_heads must be even (rotary embeddings) and at most 256.
        num_kv_heads: key/value heads (GQA/MQA); must divide num_heads. Default:
            num_heads.
        ffn_hidden_size: MLP width. Default: Llama's rule for "swiglu" (8/3 hidden,
            rounded up to a multiple of 256: 11008 for hidden 4096), 4 hidden for "gelu".
        mlp: "swiglu" (silu(x W_gate) * x W_up, then W_down) or "gelu" (tanh GELU).
        norm: "rmsnorm" or "layernorm"; pre-norm before attention and MLP, and final.
        dropout: probability for attention weights and both residual branches
            (training mode only).
        causal: causal self-attention.
        bias: biases in every linear layer (and LayerNorm).
        max_seq_len: longest sequence the rotary tables cover.
        rope_theta: rotary embedding base.
        norm_eps: epsilon of the norms.
        backend: attention backend, "auto", "triton" or "torch" (see ckpt_attn.attention).
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int | None = None
    ffn_hidden_size: int | None = None
    mlp: str = "swiglu"
    norm: str = "rmsnorm"
    dropout: float = 0.0
    causal: bool = True
    bias: bool = False
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    backend: str = "auto"

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_heads", "max_seq_len"):
            _check_positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size "
                             f"({self.hidden_size})")
        if self.head_dim % 2 or self.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"hidden_size / num_heads (head dim) must be even and at most "
                             f"{MAX_HEAD_DIM}, got {self.head_dim}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        _check_positive_int("num_kv_heads", self.num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads "
                             f"({self.num_heads})")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp must be one of {MLPS}, got {self.mlp!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = default_ffn_hidden_size(self.hidden_size, self.mlp)
        _check_positive_int("ffn_hidden_size", self.ffn_hidden_size)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        for name in ("causal", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def head_dim(self) -> int:
        """hidden_size / num_heads."""
        return self.hidden_size // self.num_heads


def default_ffn_hidden_size(hidden_size: int, mlp: str) -> int:
    """Llama's SwiGLU width (8/3 hidden, up to a multiple of 256), or 4 hidden for GELU."""
    if mlp == "gelu":
        return 4 * hidden_size
    return 256 * math.ceil(int(8 * hidden_size / 3) / 256)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
