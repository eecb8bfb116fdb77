"""measure(): what one training step really keeps, recomputes and peaks at.

A TorchDispatchMode records every storage that an op creates (views share their
base's storage) together with a weak reference to it, so after the forward the
storages still alive are exactly what autograd keeps for the backward: whatever
holds them (saved tensors, checkpoint inputs, selective-checkpoint caches, offload
buffers). During the backward the same records give the live activation bytes
after every op, recomputed tensors and gradients in flight included, parameter
gradients excluded. FLOPs come from the formulas torch's FlopCounterMode uses (its
registry, where ckpt_attn's attention ops are registered too), split into forward,
backward and recompute (a forward op run by the backward). FlopCounterMode itself is
not used: its module tracking hooks the autograd graph in reference cycles that
keep tensors alive until the garbage collector runs, which would inflate the peak.

The model's tensor inputs are cloned inside the recording, so an input autograd
keeps counts, and the output is reduced to a scalar loss and dropped, so only what
autograd holds remains. Works on real tensors, on the meta device and under
FakeTensorMode (nothing is allocated there).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import is_fake
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import flop_registry

from ..checkpointing.apply import find_layers, watch
from .report import Report

OTHER = -1  # the scope of tensors created outside the model's layers


@dataclasses.dataclass
class LayerMeasurement(Report):
    """One layer's share: the bytes it created that autograd keeps, and its FLOPs."""

    index: int
    kept_bytes: int
    forward_flops: int
    recompute_flops: int


@dataclasses.dataclass
class Measurement(Report):
    """One forward and backward, measured.

    kept_bytes: activation bytes autograd keeps between forward and backward on the
        inputs' device (unique storages; parameters and buffers excluded).
    peak_bytes: the most activation bytes alive at once during the backward
        (kept tensors, recomputed ones, gradients in flight; parameter gradients
        excluded).
    forward_flops, backward_flops: FlopCounterMode totals; backward includes
        recompute_flops, the forward ops the backward ran again.
    layers: per layer of the model's chain (empty if it has none); a tensor belongs to
        the layer that created it. other_kept_bytes: created outside the layers
        (cloned inputs, the final norm).
    offloaded_bytes: kept in host memory when the inputs are on another device
        (storage="cpu").
    cuda_max_allocated: torch.cuda.max_memory_allocated over the step, on CUDA.
    """

    kept_bytes: int
    peak_bytes: int
    forward_flops: int
    backward_flops: int
    recompute_flops: int
    layers: list[LayerMeasurement]
    other_kept_bytes: int
    offloaded_bytes: int = 0
    cuda_max_allocated: int | None = None

    @property
    def total_flops(self) -> int:
        """Forward plus backward (recompute included)."""
        return self.forward_flops + self.backward_flops


class _Recorder(TorchDispatchMode):
    """Records created storages and attributes FLOPs to (phase, layer)."""

    def __init__(self, known: set[int], device_type: str):
        super().__init__()
        self.known = known  # storage keys that are never recorded (parameters, buffers)
        self.device_type = device_type  # where the step runs; other storages are offloaded
        self.storages = {}  # key -> (weak ref, bytes, scope, on the step's device)
        self.ignored = set()  # storage keys of parameter gradients
        self.layer_index = {}  # id(layer module) -> its index in the chain
        self.scopes = [OTHER]  # one entry per module forward running now
        self.flops = {}  # (phase, scope) -> flops
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        flops = formula(*args, **kwargs, out_val=out) if formula else 0
        in_backward = torch._C._current_graph_task_id() != -1
        # A forward op run by the backward is a recomputation: it runs inside a module's
        # forward, or with grad enabled (autograd.Functions run their forward without).
        recomputing = len(self.scopes) > 1 or torch.is_grad_enabled()
        phase = ("recompute" if recomputing else "backward") if in_backward else "forward"
        key = (phase, self.scope())
        self.flops[key] = self.flops.get(key, 0) + flops
        # a storage is new unless an input has it (views, in-place ops, parameters)
        inputs = self.known | {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                               if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self._record(t)
        if in_backward:
            self.peak = max(self.peak, self.live_bytes())
        return out

    def scope(self) -> int:
        """The layer that owns what is created now: the innermost layer whose forward
        runs."""
        return self.scopes[-1]

    @contextlib.contextmanager
    def running(self, layer) -> Iterator[None]:
        """A checkpoint segment runs its first layer's forward directly (no module hooks
        mark it, in its recomputation in particular): scope it like a module call."""
        self.enter_module(layer)
        try:
            yield
        finally:
            self.leave_module()

    def enter_module(self, module, *_) -> None:
        """A module's forward starts (a global forward pre-hook): what it creates belongs
        to it if it is one of the layers, else to the enclosing scope."""
        self.scopes.append(self.layer_index.get(id(module), self.scopes[-1]))

    def leave_module(self, *_) -> None:
        """A module's forward ends (a global forward hook)."""
        self.scopes.pop()

    def _record(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.storages:
            self.storages[key] = (StorageWeakRef(storage), storage.nbytes(), self.scope(),
                                  t.device.type == self.device_type)

    def live_bytes(self, scope: int | None = None, on_device: bool = True) -> int:
        """Bytes of recorded storages alive now (dead ones are dropped), of one scope,
        on the step's device (or elsewhere)."""
        for key in [k for k, (ref, *_) in self.storages.items() if ref.expired()]:
            del self.storages[key]
        return sum(size for key, (_, size, owner, local) in self.storages.items()
                   if key not in self.ignored and scope in (None, owner)
                   and local == on_device)


def measure(model: torch.nn.Module, *inputs, **kwargs) -> Measurement:
    """Run model(*inputs, **kwargs) forward and backward once and measure it.

    The loss is the sum of the floating-point outputs, whose gradient is materialized
    in the output's dtype as a real loss would make it. Parameter gradients are
    accumulated as in a training step and then restored to what they were.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        layers = list(find_layers(model))
    except ValueError:
        layers = []
    params = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in params]
    tensors = [t for t in tree_leaves((inputs, kwargs)) if isinstance(t, torch.Tensor)]
    recorder = _Recorder(_state_storages(model), tensors[0].device.type if tensors else "cpu")
    handles = [p.register_post_accumulate_grad_hook(
        lambda p: recorder.ignored.add(p.grad.untyped_storage()._cdata)) for p in params]
    recorder.layer_index = {id(layer): index for index, layer in enumerate(layers)}
    handles.append(register_module_forward_pre_hook(recorder.enter_module))
    handles.append(register_module_forward_hook(recorder.leave_module, always_call=True))
    cuda = any(t.is_cuda for t in tensors)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        with recorder, watch(recorder.running):
            loss = _forward_loss(model, inputs, kwargs)
            kept = recorder.live_bytes() - _bytes(loss)
            per_layer_kept = [recorder.live_bytes(i) for i in range(len(layers))]
            other_kept = recorder.live_bytes(OTHER) - _bytes(loss)
            offloaded = recorder.live_bytes(on_device=False)
            recorder.peak = kept
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, grad in zip(params, saved_grads, strict=True):
            p.grad = grad
    flops = recorder.flops
    phase_total = lambda phase: sum(v for (p, _), v in flops.items() if p == phase)
    return Measurement(
        kept_bytes=kept,
        peak_bytes=recorder.peak - _bytes(loss),
        forward_flops=phase_total("forward"),
        backward_flops=phase_total("backward") + phase_total("recompute"),
        recompute_flops=phase_total("recompute"),
        layers=[LayerMeasurement(i, per_layer_kept[i], flops.get(("forward", i), 0),
                                 flops.get(("recompute", i), 0)) for i in range(len(layers))],
        other_kept_bytes=other_kept,
        offloaded_bytes=offloaded,
        cuda_max_allocated=torch.cuda.max_memory_allocated() if cuda else None,
    )


def _forward_loss(model, inputs, kwargs) -> torch.Tensor:
    """The summed floating outputs of model on clones of the inputs (only autograd keeps
    the clones, and anything else, alive afterwards)."""
    def clone(x):
        if not isinstance(x, torch.Tensor):
            return x
        copy = x.detach().clone().requires_grad_(x.requires_grad)
        if copy.requires_grad:
            # the input's gradient is handed back, like a layer's to the one before it
            copy.register_post_accumulate_grad_hook(lambda t: setattr(t, "grad", None))
        return copy

    args, kw = tree_map(clone, (inputs, kwargs))
    outputs = [t for t in tree_leaves(model(*args, **kw))
               if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not outputs:
        raise ValueError("model's output has no floating-point tensor that requires grad; "
                         "nothing to measure")
    # "* 1.0" makes the backward materialize the output's gradient in its own dtype, as
    # a loss head or a following layer would (a bare sum() passes an expanded scalar)
    return sum((t * 1.0).float().sum() for t in outputs)


def _state_storages(model: torch.nn.Module) -> set[int]:
    """Storage keys of the model's parameters and buffers, and of their fake copies when
    a FakeTensorMode converts real ones on the fly (it memoizes the conversion)."""
    state = [*model.parameters(), *model.buffers()]
    fake_mode = detect_fake_mode()
    if fake_mode is not None:
        state += [fake_mode.from_tensor(t) for t in state if not is_fake(t)]
    return {t.untyped_storage()._cdata for t in state}


def _bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()
