"""The "budget" policy: a plan per input shape, made on the first forward.

The plan comes from a planner, which this package does not define: planning needs
the memory model (ckpt_attn.memory measures the layers' costs and runs the planner),
and ckpt_attn.memory is built on this package, not the other way round. So the
planner is injected: ckpt_attn.memory hands its plan_chain to use_planner when it is
imported (as importing ckpt_attn does), and apply_checkpointing gives the planner
in use to each BudgetForward it installs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _disable_current_modes

from .apply import InstalledForward, install, running

Planner = Callable[..., object]
"""planner(layers, x, args, kwargs, *, budget_bytes, tail) -> a plan whose `segments` (a
list of Segments covering the layers) have the least recompute among the plans whose
predicted peak fits budget_bytes, for layers called on an input like x (the other
arguments, args and kwargs, passed to every layer) followed by the module tail (or
None); ValueError if none fits."""

_planner: Planner | None = None


def use_planner(planner: Planner) -> None:
    """Make planner the one the "budget" policy plans with (ckpt_attn.memory does so
    with ckpt_attn.memory.plan_chain when imported)."""
    global _planner
    if not callable(planner):
        raise TypeError(f"planner must be callable, got {type(planner).__name__}")
    _planner = planner


def planner_in_use() -> Planner:
    """The planner use_planner was given; RuntimeError if none was."""
    if _planner is None:
        raise RuntimeError("policy 'budget' plans with the memory model; import "
                           "ckpt_attn.memory (importing ckpt_attn does) to provide its planner")
    return _planner


class BudgetForward(InstalledForward):
    """Installed on the first layer: plans for the input's shape, installs, runs.

    planner (see Planner) is called once per (shape, dtype, device) of the first
    layer's input, with `tail`, the module after the layers (a Transformer's final
    norm), if given. Planning runs outside any active dispatch mode (a measure() or
    FlopCounterMode around the model sees only the step itself).
    """

    def __init__(self, layers, planner: Planner, budget_bytes: float, storage: str,
                 tail=None):
        self.layers, self.planner, self.budget_bytes = layers, planner, budget_bytes
        self.storage, self.tail = storage, tail
        self.plans = {}
        self.head = None

    def __call__(self, x, *args, **kwargs):
        first = self.layers[0]
        if running(first):
            return type(first).forward(first, x, *args, **kwargs)
        if torch.is_grad_enabled():
            key = (tuple(x.shape), x.dtype, x.device)
            if key not in self.plans:
                with _disable_current_modes():
                    self.plans[key] = self.planner(self.layers, x, args, kwargs,
                                                   budget_bytes=self.budget_bytes,
                                                   tail=self.tail).segments
            install(self.layers, self.plans[key], self.storage)
            self.head = first.__dict__.get("forward")
            first.forward = self
        if self.head is None:
            return type(first).forward(first, x, *args, **kwargs)
        return self.head(x, *args, **kwargs)
