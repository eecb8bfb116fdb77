"""A Llama-style Transformer on ckpt_attn.attention, readable in one sitting.

    x -> [TransformerLayer] x num_layers -> final norm
    TransformerLayer: x = x + dropout(attn(norm(x)));  x = x + dropout(mlp(norm(x)))

Attention has grouped-query heads and rotary position embeddings; the MLP is
SwiGLU or GELU; the norms are RMSNorm or LayerNorm. What autograd keeps is the
same on every device (ckpt_attn.memory predicts it byte for byte): the norms and
the residual dropout are small autograd.Functions that save exactly what a fused
kernel would (the input and fp32 row statistics; a boolean mask), where torch's
CPU versions save float copies or low-precision statistics.

Every module has reset_parameters(), which initializes its whole subtree as the
constructor does, in the constructor's order: a model built on the meta device, moved
with to_empty() and reset under a seed equals the model built directly under that seed.
Under autocast the rotary embeddings run in the activations' dtype (bfloat16 or float16
q and k, like v), and the residual stream keeps the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..ops import attention
from .config import TransformerConfig


class _NormFunction(torch.autograd.Function):
    """LayerNorm (centered) or RMSNorm over the last dim, computed in float32 (float64
    for float64 inputs).

    Saves x and the fp32 per-row statistics (rstd, and the mean when centered),
    as fused norm kernels do, on every device.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, centered):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        mean = xf.mean(-1, keepdim=True) if centered else None  # (..., 1)
        centered_x = xf - mean if centered else xf
        rstd = torch.rsqrt(centered_x.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd, *([mean] if centered else []))
        ctx.centered, ctx.has_bias = centered, bias is not None
        y = (centered_x * rstd).to(x.dtype) * weight
        return y + bias if bias is not None else y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, rstd, *mean = ctx.saved_tensors
        xf = x.to(rstd.dtype)
        x_hat = ((xf - mean[0]) if ctx.centered else xf) * rstd
        d_hat = dy.to(rstd.dtype) * weight.to(rstd.dtype)
        projection = x_hat * (d_hat * x_hat).mean(-1, keepdim=True)
        if ctx.centered:
            projection = projection + d_hat.mean(-1, keepdim=True)
        dx = rstd * (d_hat - projection)
        rows = dy.to(rstd.dtype).reshape(-1, dy.shape[-1])
        dweight = (rows * x_hat.reshape(rows.shape)).sum(0).to(weight.dtype)
        dbias = rows.sum(0).to(weight.dtype) if ctx.has_bias else None
        return dx.to(x.dtype), dweight, dbias, None, None


class Norm(nn.Module):
    """RMSNorm (Llama: x / rms(x) * weight) or LayerNorm ((x - mean) / std * weight
    + bias) over the last dim of size `dim`."""

    def __init__(self, dim: int, eps: float = 1e-5, centered: bool = False,
                 bias: bool = False):
        super().__init__()
        self.eps, self.centered = eps, centered
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """weight = 1 and bias = 0, as built."""
        self.weight.fill_(1.0)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NormFunction.apply(x, self.weight, self.bias, self.eps, self.centered)


class _DropoutFunction(torch.autograd.Function):
    """Inverted dropout that saves a boolean keep-mask (1 byte per element)."""

    @staticmethod
    def forward(ctx, x, p):
        keep = torch.rand_like(x, dtype=torch.float32) >= p  # fp32: exact rate in bf16
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, dy):
        (keep,) = ctx.saved_tensors
        return dy * keep * ctx.scale, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Residual dropout: the identity unless training with p > 0."""
    if not training or p == 0.0:
        return x
    return _DropoutFunction.apply(x, p)


def make_norm(cfg: TransformerConfig) -> Norm:
    """The config's norm over hidden_size (LayerNorm has a bias when cfg.bias)."""
    layernorm = cfg.norm == "layernorm"
    return Norm(cfg.hidden_size, cfg.norm_eps, centered=layernorm, bias=layernorm and cfg.bias)


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (rotate-half form) for positions 0..max_seq_len-1.

    The cos/sin tables are non-persistent buffers (not in the state_dict), computed in
    float32 and then kept in the module's dtype (they follow .to()), shared by every layer
    of a Transformer. forward() applies them in x's dtype: under autocast the activations
    are bfloat16 or float16 while the tables stay float32. Every move or conversion
    (.to(), to_empty()) recomputes them, so a model initialized on the meta device and then
    given a checkpoint with load_state_dict() has real tables; so does reset_parameters().
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, 1, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, 1, head_dim), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)compute the tables in float32, stored in the buffers' dtype and device."""
        device = self.cos.device
        dims = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        positions = torch.arange(self.max_seq_len, dtype=torch.float32, device=device)
        angles = torch.outer(positions, self.theta ** (-dims / self.head_dim))
        angles = torch.cat([angles, angles], dim=-1)[:, None, :]  # (S_max, 1, D)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def _apply(self, fn, recurse=True):
        """nn.Module._apply (behind .to(), .cuda(), to_empty() and the like), then the
        tables recomputed in their new dtype and device. They are derived values:
        to_empty() leaves them uninitialized, load_state_dict() does not fill
        non-persistent buffers, and a Transformer's shared tables are reached once per
        layer, so the recomputation follows every call."""
        super()._apply(fn, recurse)
        self.reset_parameters()
        return self

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rotate x, (B, S, H, D), by its positions start .. start + S - 1, in x's dtype."""
        stop = start + x.shape[1]
        if stop > self.cos.shape[0]:
            raise ValueError(f"position {stop - 1} (sequence length {stop}) exceeds "
                             f"max_seq_len {self.cos.shape[0]} of the rotary tables")
        cos, sin = self.cos[start:stop].to(x.dtype), self.sin[start:stop].to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        rotated = torch.cat([-second, first], dim=-1)
        return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings, through ckpt_attn.attention."""

    def __init__(self, cfg: TransformerConfig, rope: RotaryEmbedding):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.bias)
        self.rope = rope

    def reset_parameters(self) -> None:
        """Initialize the projections as built (nn.Linear's init) and recompute the rotary
        tables."""
        _reset_children(self)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, cfg.num_heads, cfg.head_dim)  # (B, S, H, D)
        k = self.k_proj(x).view(batch, seq_len, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).view(batch, seq_len, cfg.num_kv_heads, cfg.head_dim)
        q, k = self.rope(q), self.rope(k)
        # (B, S, H, D) -> (B, H, S, D) views; O comes back in q's layout
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask,
                      dropout_p=cfg.dropout if self.training else 0.0, causal=cfg.causal,
                      backend=cfg.backend)
        return self.o_proj(o.transpose(1, 2).reshape(batch, seq_len, -1))  # (B, S, hidden)


class MLP(nn.Module):
    """SwiGLU, down(silu(gate(x)) * up(x)), or GELU, down(gelu(up(x)))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.bias)

    def reset_parameters(self) -> None:
        """Initialize the projections as built (nn.Linear's init)."""
        _reset_children(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, S, ffn)
        else:
            hidden = F.gelu(self.up_proj(x), approximate="tanh")
        return self.down_proj(hidden)


class TransformerLayer(nn.Module):
    """A pre-norm block: attention then MLP, each on a residual branch with dropout.

    Args:
        cfg: the model's TransformerConfig.
        rope: rotary tables to share with other layers; a new RotaryEmbedding if None.

    forward(x, attn_mask=None): x (B, S, hidden) -> (B, S, hidden). attn_mask follows
    ckpt_attn.attention (bool True = may attend, float added), broadcastable to
    (B, num_heads, S, S), combined with cfg.causal.
    """

    def __init__(self, cfg: TransformerConfig, rope: RotaryEmbedding | None = None):
        super().__init__()
        if rope is None:
            rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.cfg = cfg
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, rope)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def reset_parameters(self) -> None:
        """Initialize every parameter and the rotary tables as built."""
        _reset_children(self)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        p = self.cfg.dropout
        x = x + dropout(self.attn(self.attn_norm(x), attn_mask), p, self.training)
        return x + dropout(self.mlp(self.mlp_norm(x)), p, self.training)


class Transformer(nn.Module):
    """A stack of cfg.num_layers TransformerLayers (in ``self.layers``) and a final norm.

    forward(x, attn_mask=None): (B, S, hidden) -> (B, S, hidden); attn_mask as in
    TransformerLayer, passed to every layer. Checkpoint policies go on top with
    ckpt_attn.apply_checkpointing(model, policy).
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if not isinstance(cfg, TransformerConfig):
            raise TypeError(f"cfg must be a TransformerConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleList(TransformerLayer(cfg, self.rope)
                                    for _ in range(cfg.num_layers))
        self.norm = make_norm(cfg)

    def reset_parameters(self) -> None:
        """Initialize every parameter and the rotary tables as built: after
        ``with torch.device("meta"): model = Transformer(cfg)`` and
        ``model.to_empty(device=...)``, and under the same torch.manual_seed, this gives
        the very values a model built on that device has."""
        _reset_children(self)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"x must be (batch, seq, {self.cfg.hidden_size}), got "
                             f"{tuple(x.shape)}")
        for layer in self.layers:
            x = layer(x, attn_mask=attn_mask)
        return self.norm(x)


def _reset_children(module: nn.Module) -> None:
    """reset_parameters() of each child, in the order the constructor built them (so the
    random draws come in the constructor's order); a child without its own
    reset_parameters (an nn.ModuleList) is looked into. A module shared by several
    parents (the rotary tables) is reset by each, which recomputes the same values."""
    for child in module.children():
        if hasattr(child, "reset_parameters"):
            child.reset_parameters()
        else:
            _reset_children(child)
