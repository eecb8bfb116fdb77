"""Activation memory: measured (measure), predicted (estimate) and planned (plan)."""

from .estimation import Estimate, Term, estimate, layer_terms, naive_attention_terms, plan
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
    "plan_cost", "plan_layers", "tail_cost",
]
