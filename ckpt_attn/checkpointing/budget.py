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

from .apply import InstalledForward, install

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
    norm), if given; the plan is installed when the shape changes. Planning runs in
    eager PyTorch, outside any active dispatch mode (a measure() or FlopCounterMode
    around the model sees only the step itself). torch.compile traces the installed
    plan; a shape with no plan yet under torch.compile raises a RuntimeError asking for
    one eager forward of that shape first (the planner cannot be traced).
    """

    def __init__(self, layers, planner: Planner, budget_bytes: float, storage: str,
                 tail=None):
        self.layers, self.planner, self.budget_bytes = layers, planner, budget_bytes
        self.storage, self.tail = storage, tail
        self.plans = {}
        self.installed = None  # the (shape, dtype, device) whose plan is installed
        self.head = None  # the forward that plan put on the first layer (None: its own)

    def __call__(self, x, *args, **kwargs):
        if torch.is_grad_enabled():
            key = (tuple(x.shape), x.dtype, x.device)
            if key != self.installed:
                self._install(key, x, args, kwargs)
        if self.head is None:
            first = self.layers[0]
            return type(first).forward(first, x, *args, **kwargs)
        return self.head(x, *args, **kwargs)

    def _install(self, key, x, args, kwargs) -> None:
        if torch.compiler.is_compiling():
            raise RuntimeError(f"policy 'budget' has no plan for an input of shape {key[0]}, "
                               f"{key[1]} on {key[2]}: planning measures the layers and "
                               f"cannot be traced; run the model once in eager mode, with "
                               f"grad enabled, on that shape before torch.compile traces it")
        if key not in self.plans:
            with _disable_current_modes():
                self.plans[key] = self.planner(self.layers, x, args, kwargs,
                                               budget_bytes=self.budget_bytes,
                                               tail=self.tail).segments
        first = self.layers[0]
        install(self.layers, self.plans[key], self.storage)
        self.head = first.__dict__.get("forward")
        first.forward = self
        self.installed = key
