"""Context parallelism: one sequence sharded over the ranks of a torch.distributed group,
attention computed as ring attention through ckpt_attn's op (its row statistics merge
the partial outputs forward and recompute the full softmax backward).

Public API:
    shard_sequence(x, *, group=None, dim=2, layout="zigzag")
    unshard_sequence(x_local, *, group=None, dim=2, layout="zigzag")
    shard_positions(seq_len, rank, world_size, layout="zigzag")
    context_parallel_attention(q, k, v, *, group=None, causal=False, scale=None,
                               dropout_p=0.0, layout="zigzag", return_lse=False,
                               backend="auto")
    apply_context_parallel(model, group=None, layout="zigzag")
    ring_buffer_bytes(...), ring_bytes_sent(...)      what the ring adds, exactly

A check and benchmark row on 2+ GPUs (or CPU ranks):
    torchrun --nproc-per-node 2 -m ckpt_attn.distributed.selfcheck
"""

from .attention import context_parallel_attention
from .costs import ring_buffer_bytes, ring_bytes_sent
from .sharding import LAYOUTS, shard_positions, shard_sequence, unshard_sequence
from .transformer import ContextParallelAttention, apply_context_parallel

__all__ = ["LAYOUTS", "ContextParallelAttention", "apply_context_parallel",
           "context_parallel_attention", "ring_buffer_bytes", "ring_bytes_sent",
           "shard_positions", "shard_sequence", "unshard_sequence"]
