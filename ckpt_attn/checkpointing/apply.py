"""apply_checkpointing: put a plan of segments on a model's layers.

Each layer's ``forward`` is replaced by an instance attribute (the class, the
parameters and the state_dict are untouched; removing the attribute restores the
layer). The first layer of a segment runs the whole segment, under
torch.utils.checkpoint (non-reentrant, RNG state preserved) when it is recomputed;
the segment's other layers, when the model calls them, check that they receive the
segment's output and the same arguments, and pass it through. Under torch.no_grad
the segment runs with no checkpoint machinery at all.

Hooks: a layer's forward hooks run once per forward, around the model's own call,
and not again when the segment is recomputed. The later layers of a group would see
theirs run twice, so groups refuse layers that have forward hooks. A layer whose
forward is already an instance attribute (another wrapper's) is refused too.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from .. import ops  # noqa: F401  (registers torch.ops.ckpt_attn)
from .policies import Segment
from .storage import saved_tensor_hooks, storage_key

# Selective checkpointing keeps these ops' outputs and recomputes everything else.
SAVED_OPS = frozenset({
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.ckpt_attn.attention_forward.default,
})


def _save_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SELECTIVE_CONTEXT = functools.partial(create_selective_checkpoint_contexts,
                                       _save_matmuls_and_attention)


def find_layers(model: nn.Module) -> nn.ModuleList | nn.Sequential:
    """The chain of layers a policy applies to: ``model.layers``, or an nn.Sequential."""
    layers = getattr(model, "layers", None)
    if isinstance(layers, (nn.ModuleList, nn.Sequential)) and len(layers) > 0:
        return layers
    if isinstance(model, nn.Sequential) and len(model) > 0:
        return model
    raise ValueError(f"model must be an nn.Sequential or have a non-empty `layers` "
                     f"nn.ModuleList to checkpoint; {type(model).__name__} has neither")


def install(layers, plan: list[Segment], storage: str) -> None:
    """Replace the layers' forwards with the plan's (after removing any earlier plan)."""
    if len({id(layer) for layer in layers}) < len(layers):
        raise ValueError("the model's layers must be distinct modules to checkpoint them "
                         "(one module object appears twice, as in shared-weight stacks)")
    remove(layers)
    for layer in layers:
        if "forward" in layer.__dict__:
            raise ValueError(f"{type(layer).__name__} already has an instance-level forward "
                             f"(another wrapper's); apply_checkpointing would bypass it")
    for segment in plan:
        members = [layers[i] for i in range(segment.start, segment.stop)]
        if segment.mode == "none" and storage == "device":
            continue
        run = SegmentRun(members, segment.mode, storage)
        for position, layer in enumerate(members):
            layer.forward = LayerForward(run, position)


def remove(layers) -> None:
    """Restore every layer's own forward."""
    for layer in layers:
        if isinstance(layer.__dict__.get("forward"), InstalledForward):
            del layer.forward


_ACTIVE: list[SegmentRun] = []  # segments running their layers now, innermost last


def current_layer() -> nn.Module | None:
    """The layer a segment is running right now (in its forward or its recomputation)."""
    return _ACTIVE[-1].current if _ACTIVE else None


def running(layer: nn.Module) -> bool:
    """Whether layer is being run by its segment right now (so it runs its own forward)."""
    return bool(_ACTIVE) and any(layer is member for member in _ACTIVE[-1].layers)


class InstalledForward:
    """Base of the forwards apply_checkpointing installs (so they can be removed)."""


class SegmentRun:
    """Runs a segment's layers as one unit; see the module docstring."""

    def __init__(self, layers: list[nn.Module], mode: str, storage: str):
        self.layers, self.mode, self.storage = layers, mode, storage
        self.pending = None  # what the segment's later layers must receive next
        self.current = None  # the layer _run_layers is running

    def __call__(self, x, *args, **kwargs):
        if len(self.layers) > 1 and not isinstance(x, torch.Tensor):
            raise TypeError(f"a segment of several layers needs a tensor as the first "
                            f"argument, got {type(x).__name__}")
        if any(layer._forward_hooks or layer._forward_pre_hooks for layer in self.layers[1:]):
            raise ValueError("a checkpoint segment of several layers (uniform/sqrt/budget) "
                             "cannot run forward hooks of its later layers exactly once; "
                             "remove the hooks or use every=1")
        hidden = x if self.mode == "full" and isinstance(x, torch.Tensor) else None
        if not torch.is_grad_enabled():
            out = self._run_layers(x, *args, **kwargs)
        else:
            with saved_tensor_hooks(self.storage, self._excluded(), hidden):
                if self.mode == "none":
                    out = self._run_layers(x, *args, **kwargs)
                else:
                    context = (_SELECTIVE_CONTEXT if self.mode == "selective"
                               else noop_context_fn)
                    out = checkpoint(self._run_layers, x, *args, use_reentrant=False,
                                     preserve_rng_state=True, context_fn=context, **kwargs)
        if len(self.layers) > 1:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"a segment of several layers needs layers that return a "
                                f"tensor, got {type(out).__name__}")
            self.pending = _Expected(out, args, kwargs)
        return out

    def pass_through(self, position: int, x, args, kwargs):
        """A later layer of the segment, called by the model: return the segment's output."""
        expected = self.pending
        if expected is None or not expected.matches(position, x, args, kwargs):
            raise RuntimeError(
                "a checkpoint segment of several layers (uniform/sqrt/budget) runs its layers "
                "together, so the model must call them in order, each on the previous "
                "layer's output, with the same other arguments; call apply_checkpointing "
                "with every=1 for models that do not")
        if position == len(self.layers) - 1:
            self.pending = None
        else:
            expected.position += 1
        return x

    def _run_layers(self, x, *args, **kwargs):
        # The first layer's hooks ran around the model's call (a recomputation must run
        # the same ops, so they do not run again); the later layers' would run here, and
        # groups refuse layers that have any.
        _ACTIVE.append(self)
        try:
            for position, layer in enumerate(self.layers):
                self.current = layer
                x = layer(x, *args, **kwargs) if position else \
                    type(layer).forward(layer, x, *args, **kwargs)
        finally:
            _ACTIVE.pop()
        return x

    def _excluded(self) -> set[int]:
        return {storage_key(t) for layer in self.layers
                for t in (*layer.parameters(), *layer.buffers())}


class LayerForward(InstalledForward):
    """The forward a plan installs on a layer: the layer's own forward while its segment
    runs; otherwise position 0 runs the segment and the later positions pass through."""

    def __init__(self, run: SegmentRun, position: int):
        self.run, self.position = run, position

    def __call__(self, x, *args, **kwargs):
        run = self.run
        layer = run.layers[self.position]
        if running(layer):
            return type(layer).forward(layer, x, *args, **kwargs)
        if self.position == 0:
            return run(x, *args, **kwargs)
        return run.pass_through(self.position, x, args, kwargs)


class _Expected:
    """The output and arguments a segment's later layers must be called with."""

    def __init__(self, out, args, kwargs):
        self.position = 1
        self.out = weakref.ref(out)
        self.args = [_reference(a) for a in args]
        self.kwargs = {name: _reference(a) for name, a in kwargs.items()}

    def matches(self, position, x, args, kwargs) -> bool:
        return (position == self.position and x is self.out()
                and len(args) == len(self.args) and kwargs.keys() == self.kwargs.keys()
                and all(_same(ref, a) for ref, a in zip(self.args, args, strict=True))
                and all(_same(self.kwargs[name], a) for name, a in kwargs.items()))


def _reference(value):
    return weakref.ref(value) if isinstance(value, torch.Tensor) else value


def _same(reference, value) -> bool:
    if isinstance(reference, weakref.ref):
        return reference() is value
    return reference is value or (not isinstance(value, torch.Tensor) and reference == value)

