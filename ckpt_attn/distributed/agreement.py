"""check_same_arguments: every rank of a group must call a collective op with the same
arguments, or the ranks' collectives no longer pair up (a rank with dropout broadcasts
a seed its peers never receive: both hang) or pair up wrongly (a causal rank and a
non-causal one exchange blocks of different problems: wrong gradients, no error).

One all_gather of a small float64 fingerprint of the arguments (numbers as
themselves, other values by a CRC-32 of their repr) finds a disagreement before the
op's first collective; all ranks then see it, gather the arguments themselves (only
on that path) and raise the same ValueError naming the argument and each rank's value.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist


def check_same_arguments(op: str, arguments: dict[str, object], group: dist.ProcessGroup,
                         device: torch.device) -> None:
    """Raise ValueError, on every rank of group alike, unless every rank passed equal
    `arguments` (name -> value: a number, a bool, a string, a torch.dtype, or a tuple of
    them such as a shape) to `op`. The fingerprint travels on `device` (the op's
    tensors' device, which the group's backend serves)."""
    names = list(arguments)
    mine = torch.tensor([_code(arguments[name]) for name in names], dtype=torch.float64,
                        device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()
    differing = [name for i, name in enumerate(names) if not (table[:, i] == table[0, i]).all()]
    if not differing:
        return
    values = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, {name: arguments[name] for name in differing}, group=group)
    name = differing[0]
    per_rank = ", ".join(f"rank {rank}: {_shown(value[name])}"
                         for rank, value in enumerate(values))
    raise ValueError(f"{op}: the ranks of the group disagree on {name} ({per_rank}); every "
                     f"rank must pass the same {name}, or the ring's transfers pair up "
                     f"wrongly or never complete")


def _code(value) -> float:
    """A number standing for value: itself for numbers and bools (exact up to 2**53),
    else a CRC-32 of its repr (a tuple's repr covers its items)."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    return float(zlib.crc32(repr(value).encode()))


def _shown(value) -> str:
    return repr(tuple(value)) if isinstance(value, torch.Size) else repr(value)
