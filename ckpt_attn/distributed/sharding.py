"""Which tokens of a sequence each rank holds under context parallelism, and moving a
full-sequence tensor to its shards and back.

A sequence of length S over a group of P ranks is cut into equal chunks:

- "zigzag": 2P chunks; rank r holds chunks r and 2P-1-r, in that order. Under a
  causal mask an early chunk sees few keys and a late one many, so every rank gets
  the same amount of attention work.
- "contiguous": P chunks; rank r holds chunk r.

A shard always lists its tokens in increasing global position.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout) -> str:
    """layout itself if it is one of LAYOUTS, else ValueError naming the argument."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def resolve_group(group) -> dist.ProcessGroup:
    """The process group of `group`: a ProcessGroup, a 1-D DeviceMesh (its group), or
    None for the default (world) group; ValueError if torch.distributed is not set up."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("context parallelism needs torch.distributed initialized "
                         "(torch.distributed.init_process_group) before it runs")
    if group is None:
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    if hasattr(group, "get_group") and hasattr(group, "ndim"):  # a DeviceMesh
        if group.ndim != 1:
            raise ValueError(f"group must be a 1-D DeviceMesh (the context dimension, e.g. "
                             f"mesh['context']), got a {group.ndim}-D one")
        return group.get_group()
    raise TypeError(f"group must be a ProcessGroup, a 1-D DeviceMesh or None, got "
                    f"{type(group).__name__}")


def chunk_count(world_size: int, layout: str) -> int:
    """How many equal chunks a sequence is cut into: 2P for zigzag, P for contiguous."""
    return 2 * world_size if check_layout(layout) == "zigzag" else world_size


def check_divisible(seq_len: int, world_size: int, layout: str, what: str = "sequence") -> int:
    """The chunk length, or ValueError naming the length and the world size when the
    length does not divide into chunk_count(world_size, layout) equal chunks."""
    chunks = chunk_count(world_size, layout)
    if seq_len % chunks:
        raise ValueError(
            f"{what} length {seq_len} does not divide over a world size of {world_size} "
            f"with layout {layout!r}: it must be a multiple of {chunks}"
            + (" (2 chunks per rank)" if layout == "zigzag" else ""))
    return seq_len // chunks


def shard_ranges(seq_len: int, rank: int, world_size: int, layout: str = "zigzag"
                 ) -> list[range]:
    """The global positions rank holds, as increasing ranges (two for zigzag, one for
    contiguous) of a sequence of seq_len tokens."""
    chunk = check_divisible(seq_len, world_size, layout)
    owned = [rank, 2 * world_size - 1 - rank] if layout == "zigzag" else [rank]
    return [range(c * chunk, (c + 1) * chunk) for c in owned]


def shard_positions(seq_len: int, rank: int, world_size: int, layout: str = "zigzag", *,
                    device=None) -> torch.Tensor:
    """The global positions (int64, increasing) of rank's seq_len / world_size tokens."""
    return torch.cat([torch.arange(r.start, r.stop, device=device)
                      for r in shard_ranges(seq_len, rank, world_size, layout)])


def shard_sequence(x: torch.Tensor, *, group=None, dim: int = 2,
                   layout: str = "zigzag") -> torch.Tensor:
    """This rank's part of a full-sequence tensor x (the same on every rank), along dim.

    Args:
        x: the full tensor; x.shape[dim] is the sequence length S.
        group: the context-parallel group (ProcessGroup, 1-D DeviceMesh, or None: world).
        dim: the sequence dimension (2 for (B, H, S, D), 1 for (B, S, hidden)).
        layout: "zigzag" or "contiguous" (see the module docstring).

    Returns a new tensor (a copy, so the full one can be freed) with S / P tokens
    along dim. ValueError names S and the world size when S does not divide.
    """
    group = resolve_group(group)
    dim = _check_dim(x, dim)
    parts = [x.narrow(dim, r.start, len(r)) for r in
             shard_ranges(x.shape[dim], dist.get_rank(group), dist.get_world_size(group),
                          layout)]
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def unshard_sequence(x_local: torch.Tensor, *, group=None, dim: int = 2,
                     layout: str = "zigzag") -> torch.Tensor:
    """The full-sequence tensor from every rank's shard along dim (an all-gather over the
    group, the chunks put back in order); every rank gets the whole tensor.

    Not differentiable (for outputs, checks and logging); the result does not require
    grad.
    """
    group = resolve_group(group)
    dim = _check_dim(x_local, dim)
    world = dist.get_world_size(group)
    local_len = x_local.shape[dim]
    check_divisible(local_len * world, world, layout, what="full sequence")
    gathered = [torch.empty_like(x_local, memory_format=torch.contiguous_format)
                for _ in range(world)]
    dist.all_gather(gathered, x_local.contiguous(), group=group)
    full_len = local_len * world
    pieces = {}
    for rank, shard in enumerate(gathered):
        offset = 0
        for r in shard_ranges(full_len, rank, world, layout):
            pieces[r.start] = shard.narrow(dim, offset, len(r))
            offset += len(r)
    return torch.cat([pieces[start] for start in sorted(pieces)], dim=dim)


def _check_dim(x: torch.Tensor, dim) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for a tensor of "
                         f"shape {tuple(x.shape)}, got {dim!r}")
    return dim % x.dim()
