"""The "budget" policy: a plan per input shape, made on the first forward."""

from __future__ import annotations

import torch

from .apply import InstalledForward, install


class BudgetForward(InstalledForward):
    """Installed on the first layer: plans for the input's shape, installs, runs.

    The layers' costs are measured once per (shape, dtype, device) of the first
    layer's input, on fake tensors (ckpt_attn.memory.layer_costs), and
    ckpt_attn.memory.plan_layers picks the plan with least recompute whose
    predicted peak fits the budget.
    """

    def __init__(self, layers, budget_bytes: float, storage: str):
        self.layers, self.budget_bytes, self.storage = layers, budget_bytes, storage
        self.plans = {}
        self.head = None

    def __call__(self, x, *args, **kwargs):
        first = self.layers[0]
        if self.head is not None and self.head.run.running:
            return self.head(x, *args, **kwargs)
        if torch.is_grad_enabled():
            from ..memory import layer_costs, plan_layers

            key = (tuple(x.shape), x.dtype, x.device)
            if key not in self.plans:
                costs = layer_costs(self.layers, x, *args, **kwargs)
                self.plans[key] = plan_layers(costs, self.budget_bytes).segments
            install(self.layers, self.plans[key], self.storage)
            self.head = first.__dict__.get("forward")
            first.forward = self
        if self.head is None:
            return type(first).forward(first, x, *args, **kwargs)
        return self.head(x, *args, **kwargs)
