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

import bisect
import contextlib
import dataclasses
import itertools
import math
import operator
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

try:  # torch.distributed is optional in a torch build
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = FSDPModule = ()

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
    keep (of equal recompute, the one keeping the fewest bytes). Time: O(L^2 + P log L)
    for L layers and P points over all fronts (see _fronts).
    """
    fronts = _fronts(_Chain(costs), _floor(budget_bytes))
    # kept ascends and recompute strictly descends along a front: the last point that
    # fits has the least recompute
    fits = bisect.bisect_right(fronts[-1].kept,
                               _floor(budget_bytes) - base_bytes - base_transient)
    if not fits:
        floor = min_peak(costs, base_bytes, base_transient)
        raise ValueError(f"budget_bytes ({gib(budget_bytes)}) is below the smallest peak any "
                         f"checkpoint plan reaches, {gib(floor)} ({floor} bytes)")
    return plan_cost(costs, _plan_segments(fronts, fits - 1), base_bytes, base_transient)


def min_peak(costs: list[LayerCost], base_bytes: int = 0, base_transient: int = 0) -> int:
    """The smallest predicted peak over all plans: the least budget some plan fits, found
    by bisection, each budget checked in O(L^2)."""
    chain = _Chain(costs)
    low = 0
    high = plan_cost(costs, [Segment(i, i + 1, "full") for i in range(len(costs))],
                     base_bytes, base_transient).peak_bytes
    while low < high:
        middle = (low + high) // 2
        if _fits(chain, middle, middle - base_bytes - base_transient):
            high = middle
        else:
            low = middle + 1
    return low


class _Chain:
    """A chain's costs in the form the dynamic programs use: prefix sums, and one-layer
    segments.

    segment_cost, rearranged: a full segment of layers s..j-1 after a plan of layers
    0..s-1 that keeps k bytes with recompute r makes a plan that keeps
    k + input_bytes[s] with recompute r - forward[s] + close_flops[j], and its own
    kept bytes and transient fit a limit iff k - kept_none[s] <= limit - close_bytes[j]
    (forward, kept_none: sums of the forward FLOPs and kept bytes under "none" of the
    layers before s).
    """

    def __init__(self, costs: list[LayerCost]):
        self.costs = costs
        self.forward = list(itertools.accumulate((c.forward_flops for c in costs), initial=0))
        self.kept_none = list(itertools.accumulate((c.kept_none_bytes for c in costs),
                                                   initial=0))
        lasts = list(enumerate(costs))
        self.close_flops = [None] + [self.forward[i] + c.recompute_full_flops for i, c in lasts]
        self.close_bytes = [None] + [self.kept_none[i] + c.input_bytes + c.transient_full_bytes
                                     for i, c in lasts]

    def one_layer(self, stop: int) -> list[tuple[str, int, int, int]]:
        """(mode, kept bytes, recompute FLOPs, transient bytes) of the "none" and
        "selective" segments of layer stop - 1."""
        return [(mode, *segment_cost(self.costs, Segment(stop - 1, stop, mode)))
                for mode in ("none", "selective")]


def _fits(chain: _Chain, limit: int, final_limit: int) -> bool:
    """Whether some plan's segments all fit limit and its kept bytes fit final_limit: the
    plan keeping the fewest bytes of each prefix, among those whose segments fit, leaves
    the most room to every later segment."""
    least = [0]  # least[j]: the fewest bytes a plan of layers 0..j-1 keeps
    for stop in range(1, len(chain.costs) + 1):
        reach = limit - chain.close_bytes[stop]
        best = min((least[s] + chain.costs[s].input_bytes for s in range(stop)
                    if least[s] - chain.kept_none[s] <= reach), default=math.inf)
        for _, kept, _, transient in chain.one_layer(stop):
            if least[stop - 1] + kept + transient <= limit:
                best = min(best, least[stop - 1] + kept)
        least.append(best)
    return least[-1] <= final_limit


class _Front(NamedTuple):
    """A Pareto front of (kept bytes, recompute FLOPs) of plans of a prefix of the chain,
    kept ascending and recompute strictly descending. link[i]: (start, mode, index) of
    the last segment of point i and of the point it extends in fronts[start]."""

    kept: list[int]
    recompute: list[int]
    link: list[tuple[int, str, int] | None]


def _fronts(chain: _Chain, limit: int) -> list[_Front]:
    """fronts[j]: the Pareto front of the plans of layers 0..j-1 whose every segment fits
    limit (the bytes kept up to and by it, plus its transient).

    By _Chain's rearrangement, point i of fronts[s] is, for every j > s, one item (kept
    bytes, recompute FLOPs less close_flops[j]) that a full segment s..j-1 can end,
    alive at j iff its kept bytes less kept_none[s] are at most reach[j] =
    limit - close_bytes[j]. Each node of a segment tree over j = 1..L holds the Pareto
    front of the items alive at all of its j; at leaf j that one, shifted, merges with
    the plans whose last segment is one "none" or "selective" layer. Each item enters
    O(log L) nodes if reach decreases with j (as in a chain of equal layers), and each
    node bisects every front before it once: O(L^2 + P log L) for P points in all.
    """
    reach = [None] + [limit - close for close in chain.close_bytes[1:]]
    fronts = [_Front([0], [0], [None])]

    def items(source: int, low, high) -> list:
        """The items of fronts[source] whose kept bytes less kept_none[source] are in
        (low, high]."""
        front, offset = fronts[source], chain.kept_none[source]
        kept, forward = chain.costs[source].input_bytes, chain.forward[source]
        return [(front.kept[i] + kept, front.recompute[i] - forward, (source, "full", i))
                for i in range(bisect.bisect_right(front.kept, low + offset),
                               bisect.bisect_right(front.kept, high + offset))]

    def visit(first: int, last: int, alive: _Front, parent_first: int, parent_reach):
        """Leaves first..last, given the items alive at all j of the parent node, whose
        first leaf is parent_first and whose least reach is parent_reach."""
        node_reach = min(reach[first:last + 1])
        # items alive at all j of the parent were in it; the fronts the parent's first
        # leaves made bring their items in here first
        candidates = list(zip(*alive, strict=True))
        for source in range(first):
            candidates += items(source, parent_reach if source < parent_first else -math.inf,
                                node_reach)
        alive = _pareto(candidates)
        if first == last:
            fronts.append(_close(chain, fronts[-1], alive, first, limit))
        else:
            middle = (first + last) // 2
            visit(first, middle, alive, first, node_reach)
            visit(middle + 1, last, alive, first, node_reach)

    visit(1, len(chain.costs), _Front([], [], []), 0, -math.inf)
    return fronts


def _close(chain: _Chain, previous: _Front, alive: _Front, stop: int, limit: int) -> _Front:
    """fronts[stop]: the items alive at stop ending a full segment there, and previous
    (fronts[stop - 1]) extended by layer stop - 1 alone under "none" or "selective"."""
    candidates = []
    for mode, seg_kept, seg_recompute, transient in chain.one_layer(stop):
        # the points that leave room for this segment: a prefix of the front
        fit = bisect.bisect_right(previous.kept, limit - transient - seg_kept)
        candidates += [(previous.kept[i] + seg_kept, previous.recompute[i] + seg_recompute,
                        (stop - 1, mode, i)) for i in range(fit)]
    close_flops = chain.close_flops[stop]
    candidates += [(kept, recompute + close_flops, link)
                   for kept, recompute, link in zip(*alive, strict=True)]
    # of plans of equal cost _pareto keeps the first: one ending in a one-layer segment,
    # which leaves the full segments, and their larger transients, earlier (less is kept
    # before them)
    return _pareto(candidates)


def _floor(budget_bytes: float):
    """The most whole bytes within budget_bytes (inf stays inf): compared with sums of
    byte counts, exactly."""
    return budget_bytes if budget_bytes == math.inf else math.floor(budget_bytes)


def _pareto(candidates) -> _Front:
    """The candidates (kept, recompute, link) not dominated in (kept, recompute), one per
    distinct pair."""
    front = _Front([], [], [])
    for kept, recompute, link in sorted(candidates, key=operator.itemgetter(0, 1)):
        if not front.recompute or recompute < front.recompute[-1]:
            front.kept.append(kept)
            front.recompute.append(recompute)
            front.link.append(link)
    return front


def _plan_segments(fronts: list[_Front], index: int) -> list[Segment]:
    """The segments of point index of the last front, by its links."""
    segments, stop = [], len(fronts) - 1
    while stop:
        start, mode, index = fronts[stop].link[index]
        segments.append(Segment(start, stop, mode))
        stop = start
    return segments[::-1]


def layer_costs(layers, x: torch.Tensor, *args, **kwargs) -> list[LayerCost]:
    """Each layer's LayerCost, measured on shape-only copies (nothing is allocated), the
    first on an input like x and each next one on the previous one's output (the other
    arguments are passed to every layer). Layers with the same class, parameter shapes
    and input are measured once.

    A layer is measured on fake tensors of x's device (meta tensors if x is on meta), so
    that an op that picks its kernel by device picks as it will there: on the meta
    device, scaled_dot_product_attention falls back to its math path, which keeps the
    S x S probabilities that the fused kernel of a CPU or a GPU never makes. The inputs
    of the next layers are found on the meta device (the same shapes, faster)."""
    cache, costs = {}, []
    meta_args, meta_kwargs = _all_shape_like((args, kwargs), "meta")
    hidden = _shape_like(x, "meta")
    for layer in layers:
        signature = (type(layer), tuple(hidden.shape), hidden.dtype,
                     tuple((n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters()))
        if signature not in cache:
            with _shape_only(x.device) as device:
                cache[signature] = _measure_layer(
                    _shape_only_copy(layer, device), _shape_like(hidden, device),
                    *_all_shape_like((args, kwargs), device))
        costs.append(cache[signature])
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = _shape_only_copy(layer, "meta")(hidden, *meta_args, **meta_kwargs)
        hidden = out if isinstance(out, torch.Tensor) else hidden
    return costs


def tail_cost(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(kept bytes, transient bytes) of a module that follows the layers (a final norm),
    for an input like x, measured on shape-only copies (as layer_costs measures)."""
    with _shape_only(x.device) as device, torch.random.fork_rng(devices=[]):
        run = measure(_shape_only_copy(module, device),
                      _shape_like(x, device).requires_grad_(True))
    return run.kept_bytes, run.peak_bytes - run.kept_bytes


@contextlib.contextmanager
def _shape_only(device: torch.device) -> Iterator[torch.device | str]:
    """The device to make shape-only tensors on for a measurement on `device`: that
    device, inside a FakeTensorMode (other tensors a layer holds, outside its parameters
    and buffers, are converted on use; an active one is reused), or "meta" for the meta
    device."""
    if device.type == "meta":
        yield "meta"
    elif detect_fake_mode() is not None:
        yield device
    else:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield device


def _shape_only_copy(layer: torch.nn.Module, device) -> torch.nn.Module:
    """A copy of layer whose parameters and buffers are shape-only tensors on device
    (_shape_like) with their full shapes (an FSDP2-sharded parameter's global shape),
    without hooks, FSDP2's class or any forward a policy installed. Modules are copied
    one by one (not with deepcopy, which FSDP2 modules refuse); other attributes are
    shared with the original, and a module that appears twice inside layer is copied
    once."""
    copies = {}

    def copy(module: torch.nn.Module) -> torch.nn.Module:
        if id(module) in copies:
            return copies[id(module)]
        clone = object.__new__(_unsharded_class(module))
        copies[id(module)] = clone
        state = dict(module.__dict__)
        if isinstance(state.get("forward"), InstalledForward):
            del state["forward"]
        for name, value in state.items():
            if name.endswith("_hooks") or name.endswith("_hooks_with_kwargs") \
                    or name.endswith("_hooks_always_called"):
                state[name] = type(value)()  # no hooks (FSDP2's included)
        state["_parameters"] = {name: None if p is None else torch.nn.Parameter(
            _shape_like(p, device), p.requires_grad) for name, p in module._parameters.items()}
        state["_buffers"] = {name: None if b is None else _shape_like(b, device)
                             for name, b in module._buffers.items()}
        state["_modules"] = {name: None if m is None else copy(m)
                             for name, m in module._modules.items()}
        clone.__dict__.update(state)
        return clone

    return copy(layer)


def _unsharded_class(module: torch.nn.Module) -> type:
    """The module's class without FSDP2's (fully_shard makes an FSDP<Class> subclass)."""
    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def _shape_like(t: torch.Tensor, device) -> torch.Tensor:
    """An empty tensor like t on device (meta, or a real device inside _shape_only's
    FakeTensorMode: a fake tensor): its strides as empty_like keeps them; for a
    distributed tensor (an FSDP2-sharded parameter), its global shape."""
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    if isinstance(data, DTensor):
        return torch.empty(data.shape, dtype=data.dtype, device=device)
    return torch.empty_like(data, device=device)


def _all_shape_like(tree, device):
    """tree with every tensor in it replaced by _shape_like(tensor, device)."""
    return tree_map(lambda t: _shape_like(t, device) if isinstance(t, torch.Tensor) else t,
                    tree)


class _Bound(torch.nn.Module):
    """layer(x, *args, **kwargs) as a module of x alone. measure() counts what it makes
    of its inputs (it clones them) as the model's; the other arguments (a mask, Hugging
    Face's rotary position embeddings) are made once outside the layers and shared by
    all of them, so they are not one layer's cost."""

    def __init__(self, layer: torch.nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.layer, self.args, self.kwargs = layer, args, kwargs

    def forward(self, x: torch.Tensor):
        return self.layer(x, *self.args, **self.kwargs)


def _measure_layer(copy, x, args, kwargs) -> LayerCost:
    """Measure a shape-only copy under each mode, on a shape-only x (args, kwargs too)."""
    chain = torch.nn.ModuleList([copy])
    runs = {}
    with torch.random.fork_rng(devices=[]):  # dropout seeds: leave the caller's stream
        for mode in ("none", "full", "selective"):
            install(chain, [Segment(0, 1, mode)], "device")
            runs[mode] = measure(_Bound(copy, args, kwargs), x.requires_grad_(True))
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
