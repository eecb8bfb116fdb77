"""Per-layer costs and the optimal checkpoint plan over a chain of layers.

A plan splits the chain into segments (ckpt_attn.checkpointing.Segment). Its cost
is the recompute FLOPs; its memory is

    peak = max(base + kept by all segments + base transient,
               max over segments s of (kept by segments 0..s + transient of s))

since the backward starts with what follows the layers (base: a final norm, say) and
then walks the chain from the end, freeing what later segments kept; a segment's
transient is what its own backward brings back on top of that
(recomputed activations, gradients in flight). plan_layers finds the plan with least
recompute whose peak fits a budget, exactly, by dynamic programming over the chain
(in the spirit of Chen et al. 2016 and Rotor): at every layer boundary it keeps the
Pareto front of (kept bytes, recompute FLOPs) of the feasible plans of the prefix.
"""

from __future__ import annotations

import dataclasses
from copy import deepcopy

import torch
from torch.utils._pytree import tree_map

from ..checkpointing.apply import InstalledForward, install
from ..checkpointing.policies import Segment
from .measurement import measure
from .report import Report, gib


@dataclasses.dataclass
class LayerCost(Report):
    """What one layer keeps, recomputes and brings back in the backward, per mode.

    input_bytes: its input (what "full" keeps). kept_*: bytes autograd keeps under
    "none" and "selective". forward_flops, backward_flops: without checkpointing.
    recompute_*_flops: under "full" (a
    recomputation stops after the last tensor the backward needs, so the last
    matmul of a segment is often skipped) and "selective". transient_*: peak minus
    kept in the layer's own backward under each mode.
    """

    input_bytes: int
    kept_none_bytes: int
    kept_selective_bytes: int
    forward_flops: int
    backward_flops: int
    recompute_full_flops: int
    recompute_selective_flops: int
    transient_none_bytes: int
    transient_full_bytes: int
    transient_selective_bytes: int


@dataclasses.dataclass
class Plan(Report):
    """A checkpoint plan and its predicted cost."""

    segments: list[Segment]
    kept_bytes: int
    peak_bytes: int
    recompute_flops: int

    def __str__(self) -> str:
        groups = ", ".join(f"{s.mode}[{s.start}" + (f"..{s.stop - 1}]" if s.stop - s.start > 1
                                                     else "]") for s in self.segments)
        return (f"Plan(kept {gib(self.kept_bytes)}, peak {gib(self.peak_bytes)}, recompute "
                f"{self.recompute_flops:.3e} FLOPs: {groups})")


def segment_cost(costs: list[LayerCost], segment: Segment) -> tuple[int, int, int]:
    """(kept bytes, recompute FLOPs, transient bytes) of one segment."""
    first, last = costs[segment.start], costs[segment.stop - 1]
    if segment.mode == "none":
        return first.kept_none_bytes, 0, first.transient_none_bytes
    if segment.mode == "selective":
        return (first.kept_selective_bytes, first.recompute_selective_flops,
                first.transient_selective_bytes)
    inner = costs[segment.start:segment.stop - 1]
    recompute = sum(c.forward_flops for c in inner) + last.recompute_full_flops
    # the earlier layers come back whole; the last one as measured on its own
    transient = (sum(c.kept_none_bytes for c in inner) - first.input_bytes
                 + last.input_bytes + last.transient_full_bytes) if inner \
        else last.transient_full_bytes
    return first.input_bytes, recompute, transient


def plan_cost(costs: list[LayerCost], segments: list[Segment], base_bytes: int = 0,
              base_transient: int = 0) -> Plan:
    """The predicted kept bytes, peak and recompute of a plan. base_bytes: kept after the
    layers (e.g. by a final norm), whose backward, first of all, brings base_transient."""
    kept = peak = 0
    recompute = 0
    for segment in segments:
        seg_kept, seg_recompute, transient = segment_cost(costs, segment)
        kept += seg_kept
        peak = max(peak, kept + transient)
        recompute += seg_recompute
    # the backward starts with what follows the layers; its kept bytes are freed by the
    # time the last segment's backward runs
    peak = max(peak, base_bytes + kept + base_transient)
    return Plan(list(segments), base_bytes + kept, peak, recompute)


def plan_layers(costs: list[LayerCost], budget_bytes: float, base_bytes: int = 0,
                base_transient: int = 0) -> Plan:
    """The plan with least recompute FLOPs whose predicted peak is at most budget_bytes
    (ties: least peak, see below). Raises ValueError, with the smallest reachable peak,
    if none fits.

    Exact: a dynamic program over the layer boundaries keeps the Pareto front of
    (kept bytes, recompute FLOPs) of the feasible plans of each prefix; a segment is
    feasible when the prefix's kept bytes plus its own kept bytes and transient fit.
    The least recompute is exact; the tie break by peak is among the plans the fronts
    keep (of equal recompute, the one keeping the fewest bytes).
    """
    fronts = _fronts(costs, lambda kept, seg_kept, transient, recompute, seg_recompute: (
        recompute + seg_recompute if kept + seg_kept + transient <= budget_bytes else None))
    fits = [point for point in fronts[-1]
            if base_bytes + point[0] + base_transient <= budget_bytes]
    if not fits:
        floor = min_peak(costs, base_bytes, base_transient)
        raise ValueError(f"budget_bytes ({gib(budget_bytes)}) is below the smallest peak any "
                         f"checkpoint plan reaches, {gib(floor)} ({floor} bytes)")
    plans = [plan_cost(costs, list(segments), base_bytes, base_transient)
             for _, _, segments in fits]
    return min(plans, key=lambda p: (p.recompute_flops, p.peak_bytes))


def min_peak(costs: list[LayerCost], base_bytes: int = 0, base_transient: int = 0) -> int:
    """The smallest predicted peak over all plans."""
    fronts = _fronts(costs, lambda kept, seg_kept, transient, peak, seg_recompute: max(
        peak, kept + seg_kept + transient))
    return min(max(peak, base_bytes + kept + base_transient) for kept, peak, _ in fronts[-1])


def _fronts(costs, extend):
    """fronts[j]: the Pareto front of (kept bytes, score, segments) over plans of layers
    0..j-1, where extend(kept, seg_kept, transient, score, seg_recompute) gives the score
    after one more segment, or None if that segment is not allowed."""
    options = _segment_options(costs)
    fronts = [[(0, 0, ())]] + [[] for _ in costs]
    for stop in range(1, len(costs) + 1):
        candidates = []
        for segment, (seg_kept, seg_recompute, transient) in options[stop - 1]:
            for kept, score, segments in fronts[segment.start]:
                new_score = extend(kept, seg_kept, transient, score, seg_recompute)
                if new_score is not None:
                    candidates.append((kept + seg_kept, new_score, segments + (segment,)))
        fronts[stop] = _pareto(candidates)
    return fronts


def _segment_options(costs):
    """For each last layer j, every segment ending at j with its cost."""
    options = []
    for last in range(len(costs)):
        segments = [Segment(last, last + 1, "none"), Segment(last, last + 1, "selective")]
        segments += [Segment(start, last + 1, "full") for start in range(last + 1)]
        options.append([(s, segment_cost(costs, s)) for s in segments])
    return options


def _pareto(points):
    """Points not dominated in (kept, recompute), one per distinct pair."""
    front, best_recompute = [], None
    for point in sorted(points, key=lambda p: (p[0], p[1])):
        if best_recompute is None or point[1] < best_recompute:
            front.append(point)
            best_recompute = point[1]
    return front


def layer_costs(layers, x: torch.Tensor, *args, **kwargs) -> list[LayerCost]:
    """Each layer's LayerCost, measured on meta copies (nothing is allocated), the first
    on an input like x and each next one on the previous one's output (the other
    arguments are passed to every layer). Layers with the same class, parameter shapes
    and input are measured once."""
    cache, costs = {}, []
    margs, mkwargs = tree_map(lambda t: _meta(t) if isinstance(t, torch.Tensor) else t,
                              (args, kwargs))
    hidden = _meta(x)
    for layer in layers:
        copy = _meta_copy(layer)
        signature = (type(layer), tuple(hidden.shape), hidden.dtype,
                     tuple((n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters()))
        if signature not in cache:
            cache[signature] = _measure_layer(copy, hidden, margs, mkwargs)
        costs.append(cache[signature])
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = copy(hidden, *margs, **mkwargs)
        hidden = out if isinstance(out, torch.Tensor) else hidden
    return costs


def tail_cost(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(kept bytes, transient bytes) of a module that follows the layers (a final norm),
    for an input like x, measured on the meta device."""
    with torch.random.fork_rng(devices=[]):
        run = measure(_meta_copy(module), _meta(x).requires_grad_(True))
    return run.kept_bytes, run.peak_bytes - run.kept_bytes


def _meta_copy(layer: torch.nn.Module) -> torch.nn.Module:
    """A copy of layer whose parameters and buffers are on the meta device (nothing is
    allocated), without any forward a policy installed."""
    memo = {id(p): torch.nn.Parameter(_meta(p), p.requires_grad) for p in layer.parameters()}
    memo |= {id(b): _meta(b) for b in layer.buffers()}
    # an installed forward refers to other layers: stand a placeholder in, not a copy
    memo |= {id(m.forward): _PLACEHOLDER for m in layer.modules()
             if isinstance(m.__dict__.get("forward"), InstalledForward)}
    copy = deepcopy(layer, memo)
    for module in copy.modules():
        if isinstance(module.__dict__.get("forward"), InstalledForward):
            del module.forward
    return copy


_PLACEHOLDER = InstalledForward()


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


def _measure_layer(copy, x, args, kwargs) -> LayerCost:
    """Measure a meta copy under each mode, on meta x (args, kwargs on meta too)."""
    chain = torch.nn.ModuleList([copy])
    runs = {}
    with torch.random.fork_rng(devices=[]):  # dropout seeds: leave the caller's stream
        for mode in ("none", "full", "selective"):
            install(chain, [Segment(0, 1, mode)], "device")
            runs[mode] = measure(copy, x.requires_grad_(True), *args, **kwargs)
    input_bytes = x.numel() * x.element_size()
    none, full, selective = runs["none"], runs["full"], runs["selective"]
    return LayerCost(
        input_bytes=input_bytes,
        kept_none_bytes=none.kept_bytes,
        kept_selective_bytes=selective.kept_bytes,
        forward_flops=none.forward_flops,
        backward_flops=none.backward_flops,
        recompute_full_flops=full.recompute_flops,
        recompute_selective_flops=selective.recompute_flops,
        transient_none_bytes=none.peak_bytes - none.kept_bytes,
        transient_full_bytes=full.peak_bytes - full.kept_bytes,
        transient_selective_bytes=selective.peak_bytes - selective.kept_bytes,
    )
