"""Activation memory: measured (measure), predicted (estimate) and planned (plan).

Built on ckpt_attn.checkpointing, never imported by it: importing this package hands
plan_chain to the "budget" checkpoint policy (ckpt_attn.checkpointing.use_planner).
"""

from ..checkpointing import use_planner
from .estimation import (
    Estimate,
    Term,
    estimate,
    layer_terms,
    naive_attention_terms,
    plan,
    plan_chain,
)
from .measurement import LayerMeasurement, Measurement, measure
from .planner import (
    LayerCost,
    Plan,
    layer_costs,
    min_peak,
    plan_cost,
    plan_layers,
    tail_cost,
)

__all__ = [
    "Estimate", "LayerCost", "LayerMeasurement", "Measurement", "Plan", "Term", "estimate",
    "layer_costs", "layer_terms", "measure", "min_peak", "naive_attention_terms", "plan",
    "plan_chain", "plan_cost", "plan_layers", "tail_cost",
]

use_planner(plan_chain)  # the "budget" checkpoint policy plans with this memory model
