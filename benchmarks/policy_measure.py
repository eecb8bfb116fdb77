"""How bench_policies measures one training step, whatever runs it (eager policies,
torch.compile, Hugging Face).

- Step time: the median of interleaved repetitions (interleaved_rounds), so a drift in
  machine speed hits every case alike.
- Allocator memory: what the allocator holds after the forward (kept) and at most during
  forward + backward (peak), above what it held before the step. Steps start from no
  parameter gradients (zero_grad's default), so the peak counts the gradients made so
  far, eager and compiled alike (a compiled backward returns its graph's gradients
  together, eager accumulates them one by one). On CUDA from
  torch.cuda.memory_allocated / max_memory_allocated; on the CPU from the profiler's
  allocation events (profile_memory=True), the one view of the CPU allocator that sees
  inside compiled code too.
- FLOPs of compiled code: torch.compile skips its compiled frames while a
  TorchDispatchMode such as FlopCounterMode is active, so GraphFlops counts the FLOPs
  of the graphs inductor compiles instead (a post-grad pass reading FlopCounterMode's
  formulas), forward and backward graphs together.
- compiled(): a torch.compile of its own, so that compilations made under different
  torch._functorch.config.activation_memory_budget values live side by side.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import types
from collections.abc import Callable

import torch
from torch._inductor import config as inductor_config
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import flop_registry

__all__ = ["AllocatorMemory", "CompiledStep", "GraphFlops", "allocator_memory",
           "interleaved_rounds"]

_BACKWARD_MARK = "bench_policies.backward"


@dataclasses.dataclass(frozen=True)
class AllocatorMemory:
    """Bytes the allocator held above the step's start: after the forward, and at most."""

    kept_bytes: int
    peak_bytes: int


def allocator_memory(forward: Callable[[], torch.Tensor], device: torch.device
                     ) -> AllocatorMemory:
    """Run loss = forward() and loss.backward() once and read the allocator.

    forward returns a scalar loss; its kept bytes include what autograd keeps for the
    backward (and the loss); the peak includes the gradients the backward makes.
    """
    if device.type == "cuda":
        return _cuda_memory(forward)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = forward()
        with record_function(_BACKWARD_MARK):
            loss.backward()
        del loss
    events = prof.profiler.kineto_results.events()
    backward_start = next(e.start_ns() for e in events if e.name() == _BACKWARD_MARK)
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    kept = None
    for start, nbytes in changes:  # nbytes: positive for an allocation, negative for a free
        if kept is None and start >= backward_start:
            kept = live
        live += nbytes
        peak = max(peak, live)
    return AllocatorMemory(live if kept is None else kept, peak)


def _cuda_memory(forward: Callable[[], torch.Tensor]) -> AllocatorMemory:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = forward()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - base
    loss.backward()
    del loss
    torch.cuda.synchronize()
    return AllocatorMemory(kept, torch.cuda.max_memory_allocated() - base)


class GraphFlops:
    """FLOPs of the graphs inductor compiles while this counter is installed.

        counter = GraphFlops()
        with counter.installed():
            compiled_step()  # compiles forward and backward graphs
        counter.total

    A post-grad pass adds, per node, the FlopCounterMode formula of its op (ops without
    one count 0, as in FlopCounterMode), from the shapes the graph carries. The FX graph
    cache is off meanwhile: a cached graph would skip the pass.
    """

    def __init__(self):
        self.graphs: list[int] = []

    @property
    def total(self) -> int:
        """FLOPs of every graph counted so far (forward and backward)."""
        return sum(self.graphs)

    def installed(self):
        """Context in which inductor runs the counting pass on every graph it compiles."""
        return inductor_config.patch(post_grad_custom_post_pass=self._count,
                                     fx_graph_cache=False)

    def _count(self, graph: torch.fx.Graph) -> None:
        total = 0
        for node in graph.nodes:
            packet = getattr(node.target, "_overloadpacket", None)
            formula = flop_registry.get(packet) if node.op == "call_function" else None
            if formula is None:
                continue
            value = lambda a: a.meta["val"] if isinstance(a, torch.fx.Node) else a
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), value)
            total += formula(*args, **kwargs, out_val=node.meta["val"])
        self.graphs.append(int(total))


class CompiledStep:
    """fn compiled with torch.compile under torch's activation_memory_budget.

    Dynamo caches compilations per code object and does not guard on
    torch._functorch.config, so two compilations of one function under different
    budgets would share one entry. Each CompiledStep compiles a copy of fn with a code
    object of its own, under its budget, on its first call (the call that compiles and
    runs forward and backward: warm_up), counting the compiled graphs' FLOPs in
    counter; later calls reuse that compilation under any config.
    """

    def __init__(self, fn: Callable, name: str, memory_budget: float, counter: GraphFlops):
        code = fn.__code__.replace(co_name=name)
        copy = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        self.fn = torch.compile(copy, fullgraph=True)
        self.memory_budget, self.counter = memory_budget, counter

    def warm_up(self, *args) -> None:
        """Compile (forward and backward graphs) and run one step under the budget."""
        with torch._functorch.config.patch(activation_memory_budget=self.memory_budget), \
                self.counter.installed():
            self.fn(*args).backward()

    def __call__(self, *args):
        return self.fn(*args)


def interleaved_rounds(steps: list[Callable[[], None]], rounds: int, progress=None
                       ) -> list[float]:
    """Median wall-clock ms of each step over `rounds` rounds; a round runs every step
    once, in reversed order every other round. progress: a tqdm bar to advance by one
    per round, or None."""
    samples: list[list[float]] = [[] for _ in steps]
    order = list(range(len(steps)))
    for round_index in range(rounds):
        for i in order if round_index % 2 == 0 else order[::-1]:
            _synchronize()
            start = time.perf_counter()
            steps[i]()
            _synchronize()
            samples[i].append((time.perf_counter() - start) * 1e3)
        if progress is not None:
            progress.update(1)
    return [statistics.median(s) for s in samples]


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
