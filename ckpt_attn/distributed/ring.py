"""The ring transport: each rank sends a tensor to the next rank of the group and
receives the previous rank's, with torch.distributed's point-to-point operations
(batch_isend_irecv: NCCL on GPUs, gloo on the CPU).

A transfer is started before the computation that does not need it and waited for
after, so the next block travels while the current one is computed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Transfer:
    """A started exchange: wait() blocks until this rank's send and receive are done and
    returns the received tensor (the sent one may then be reused)."""

    def __init__(self, works: list, received: torch.Tensor):
        self._works, self._received = works, received

    def wait(self) -> torch.Tensor:
        """The tensor received from the previous rank."""
        for work in self._works:
            work.wait()
        return self._received


class Ring:
    """The ring of a process group: rank r sends to r + 1 and receives from r - 1 (mod P).

    Every rank must start its transfers in the same order, as the ring attention does.
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        # P2POp takes global ranks
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world_size)
        self.previous = dist.get_global_rank(group, (self.rank - 1) % self.world_size)

    def start(self, tensor: torch.Tensor) -> Transfer:
        """Send tensor (contiguous) to the next rank and receive a tensor like it from the
        previous one, asynchronously. A ring of one rank hands the tensor back."""
        if self.world_size == 1:
            return Transfer([], tensor)
        received = torch.empty_like(tensor)
        works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor, self.next, self.group),
            dist.P2POp(dist.irecv, received, self.previous, self.group),
        ])
        return Transfer(works, received)
