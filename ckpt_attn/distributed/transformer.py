"""apply_context_parallel: run a ckpt_attn.Transformer on sequence-sharded activations.

Everything in a TransformerLayer but attention works token by token, so once each
layer's attention is context-parallel the model runs unchanged on a shard
(B, S/P, hidden) per rank: the attention module is swapped for a
ContextParallelAttention that shares its projections and rotary tables (the same
parameters under the same names, so state_dicts and optimizers are unaffected),
rotates q and k by the shard's global positions and runs context_parallel_attention.

Parameter gradients are then each rank's share of the sum over the sequence: reduce
them over the context group, as FSDP2 or DDP do when their mesh includes that
dimension (torchtitan shards parameters over data x context flattened).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..modules.transformer import Attention
from .attention import context_parallel_attention
from .sharding import check_layout, resolve_group, shard_ranges


class ContextParallelAttention(nn.Module):
    """Attention's computation on this rank's shard of the sequence.

    Args:
        attention: the ckpt_attn.modules.transformer.Attention to take over; its
            q/k/v/o projections and rotary tables become this module's (shared).
        group: the context-parallel group (ProcessGroup, 1-D DeviceMesh or None).
        layout: how the sequence is sharded, "zigzag" or "contiguous".

    forward(x, attn_mask=None): x (B, S/P, hidden), this rank's tokens as
    shard_sequence(dim=1) gives them -> (B, S/P, hidden). attn_mask must be None
    (cfg.causal is applied in global positions).
    """

    def __init__(self, attention: Attention, group=None, layout: str = "zigzag"):
        super().__init__()
        if not isinstance(attention, Attention):
            raise TypeError(f"attention must be a ckpt_attn Attention module, got "
                            f"{type(attention).__name__}")
        self.cfg = attention.cfg
        self.q_proj, self.k_proj = attention.q_proj, attention.k_proj
        self.v_proj, self.o_proj = attention.v_proj, attention.o_proj
        self.rope = attention.rope
        self.group, self.layout = resolve_group(group), check_layout(layout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("attn_mask must be None under context parallelism (causal "
                             "masking follows cfg.causal in global positions)")
        cfg = self.cfg
        batch, local_len, _ = x.shape
        q = self.q_proj(x).view(batch, local_len, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).view(batch, local_len, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).view(batch, local_len, cfg.num_kv_heads, cfg.head_dim)
        q, k = self._rotate_by_global_position(q), self._rotate_by_global_position(k)
        o = context_parallel_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), group=self.group,
            causal=cfg.causal, dropout_p=cfg.dropout if self.training else 0.0,
            layout=self.layout, backend=cfg.backend)
        return self.o_proj(o.transpose(1, 2).reshape(batch, local_len, -1))

    def _rotate_by_global_position(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S/P, H, D) rotated by the global positions of this rank's tokens, one
        contiguous range at a time."""
        world_size = dist.get_world_size(self.group)
        seq_len = x.shape[1] * world_size
        if seq_len > self.rope.cos.shape[0]:
            raise ValueError(f"sequence length {seq_len} ({x.shape[1]} per rank x "
                             f"{world_size} ranks) exceeds max_seq_len "
                             f"{self.rope.cos.shape[0]} of the rotary tables")
        ranges = shard_ranges(seq_len, dist.get_rank(self.group), world_size, self.layout)
        parts, offset = [], 0
        for positions in ranges:
            parts.append(self.rope(x[:, offset:offset + len(positions)], start=positions.start))
            offset += len(positions)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def apply_context_parallel(model: nn.Module, group=None, layout: str = "zigzag") -> nn.Module:
    """Make every ckpt_attn Attention module of model context-parallel, in place.

    The model is then called on each rank with that rank's shard of the input,
    ``shard_sequence(x, group=group, dim=1, layout=layout)``, and returns that rank's
    shard of the output. Apply it before apply_checkpointing and before FSDP2's
    fully_shard. Parameter gradients are partial sums per rank (see the module
    docstring). Returns model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_layout(layout)
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, Attention)]
    if not targets:
        raise ValueError(f"model ({type(model).__name__}) has no ckpt_attn Attention module "
                         f"to make context-parallel")
    for parent, name, child in targets:
        setattr(parent, name, ContextParallelAttention(child, group, layout))
    return model
