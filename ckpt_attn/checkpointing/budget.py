"""The "budget" policy: a plan per input shape, made on the first forward (or before).

The plan comes from a planner, which this package does not define: planning needs
the memory model (ckpt_attn.memory measures the layers' costs and runs the planner),
and ckpt_attn.memory is built on this package, not the other way round. So the
planner is injected: ckpt_attn.memory hands its plan_chain to use_planner when it is
imported (as importing ckpt_attn does), and apply_checkpointing gives the planner
in use to each BudgetForward it installs.

Under torch.compile a plan must exist before the traced code runs the layers. It does
when an eager forward (or apply_checkpointing's example_inputs=) planned that shape;
for a model whose plan follows from the input's shape alone (a ckpt_attn.Transformer:
the memory model's costs are closed-form), BudgetForward plans while Dynamo traces,
in a function Dynamo runs as Python instead of tracing it
(torch.compiler.assume_constant_result): it installs the plan, and the traced code
then reads the installed forwards, so the graph holds the plan's segments and no
planning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes

from .apply import InstalledForward, install

Planner = Callable[..., object]
"""planner(layers, x, args, kwargs, *, budget_bytes, tail[, from_shape]) -> a plan
whose `segments` (a list of Segments covering the layers) have the least recompute among
the plans whose predicted peak fits budget_bytes, for layers called on an input like x
(the other arguments, args and kwargs, passed to every layer) followed by the module
tail (or None); ValueError if none fits. from_shape=True: x is a fake tensor and args,
kwargs are left out (planning while Dynamo traces), so the planner costs the layers from
x's shape, dtype and device alone, or raises a RuntimeError if it cannot."""

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
    plan. With plans_from_shapes (a ckpt_attn.Transformer, whose costs the planner
    finds from the shape alone), a shape with no plan yet is planned while Dynamo
    traces, on a fake input of that shape (see the module docstring; static shapes
    only: Dynamo refuses a dynamic shape as an argument of that planning call);
    otherwise it raises a RuntimeError asking for one eager forward of that shape
    first, or for example_inputs of that shape at apply time (plan_for).
    """

    def __init__(self, layers, planner: Planner, budget_bytes: float, storage: str,
                 tail=None, plans_from_shapes: bool = False):
        self.layers, self.planner, self.budget_bytes = layers, planner, budget_bytes
        self.storage, self.tail, self.plans_from_shapes = storage, tail, plans_from_shapes
        self.plans = {}
        self.installed = None  # the (shape, dtype, device) whose plan is installed
        self.head = None  # the forward that plan put on the first layer (None: its own)

    def __call__(self, x, *args, **kwargs):
        if torch.is_grad_enabled():
            key = (tuple(x.shape), x.dtype, x.device)
            if torch.compiler.is_compiling() and self.plans_from_shapes:
                _install_while_tracing(self, *key)
            elif key != self.installed:
                self._install(key, x, args, kwargs)
        if self.head is None:
            first = self.layers[0]
            return type(first).forward(first, x, *args, **kwargs)
        return self.head(x, *args, **kwargs)

    def plan_for(self, x, args: tuple, kwargs: dict) -> None:
        """Plan for the first layer's input x (and the other arguments the model passes
        to the layers) and install that plan, in eager mode: what the first forward of
        x's shape does, ahead of it (apply_checkpointing's example_inputs)."""
        self._install((tuple(x.shape), x.dtype, x.device), x, args, kwargs)

    def _install(self, key, x, args, kwargs) -> None:
        if torch.compiler.is_compiling():
            raise RuntimeError(f"policy 'budget' has no plan for an input of shape {key[0]}, "
                               f"{key[1]} on {key[2]}: planning measures the layers and "
                               f"cannot be traced; run the model once in eager mode, with "
                               f"grad enabled, on that shape before torch.compile traces it, "
                               f"or pass inputs of that shape to apply_checkpointing as "
                               f"example_inputs=")
        self._plan_and_install(key, x, args, kwargs)

    def _plan_and_install(self, key, x, args, kwargs, from_shape: bool = False) -> None:
        if key not in self.plans:
            # from_shape given only when true: a planner for eager planning need not take it
            shape_only = {"from_shape": True} if from_shape else {}
            with _disable_current_modes():
                self.plans[key] = self.planner(self.layers, x, args, kwargs,
                                               budget_bytes=self.budget_bytes,
                                               tail=self.tail, **shape_only).segments
        first = self.layers[0]
        install(self.layers, self.plans[key], self.storage)
        self.head = first.__dict__.get("forward")
        first.forward = self
        self.installed = key


@torch.compiler.assume_constant_result
def _install_while_tracing(budget: BudgetForward, shape: tuple, dtype: torch.dtype,
                           device: torch.device) -> bool:
    """Install budget's plan for an input of this shape, dtype and device. Dynamo runs
    it as Python when it traces a call (its arguments are constants, budget guarded by
    identity) and leaves it out of the graph; the traced code after it reads the
    installed forwards."""
    key = (shape, dtype, device)
    if key != budget.installed:
        with FakeTensorMode():
            x = torch.empty(shape, dtype=dtype, device=device)
        budget._plan_and_install(key, x, (), {}, from_shape=True)
    return True
