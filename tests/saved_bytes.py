"""The independent count the memory tests check against: the unique storages autograd
saves during a module's forward, seen by saved_tensors_hooks, parameters and buffers
excluded."""

from __future__ import annotations

import torch


def saved_tensors(module: torch.nn.Module, *args, **kwargs) -> dict[int, tuple]:
    """The distinct storages autograd saves while module(*args, **kwargs) runs (a
    compiled forward included: it saves through ctx.save_for_backward), by storage key:
    (device type, dtype, shape, storage bytes) of the first tensor saved on each."""
    state = {t.untyped_storage()._cdata for t in (*module.parameters(), *module.buffers())}
    saved = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in state and key not in saved:
            saved[key] = (t.device.type, t.dtype, tuple(t.shape), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*args, **kwargs)
    return saved


def saved_bytes(module: torch.nn.Module, *args, **kwargs) -> int:
    """Bytes of the distinct storages autograd saves while module(*args, **kwargs) runs."""
    return sum(nbytes for *_, nbytes in saved_tensors(module, *args, **kwargs).values())
