"""The independent count the memory tests check against: the unique storages autograd
saves during a module's forward, seen by saved_tensors_hooks, parameters and buffers
excluded."""

from __future__ import annotations

import torch


def saved_bytes(module: torch.nn.Module, *args, **kwargs) -> int:
    """Bytes of the distinct storages autograd saves while module(*args, **kwargs) runs."""
    state = {t.untyped_storage()._cdata for t in (*module.parameters(), *module.buffers())}
    saved = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in state:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*args, **kwargs)
    return sum(saved.values())
