"""install: put a plan of segments on a model's layers.

Each layer's ``forward`` is replaced by an instance attribute (the class, the
parameters and the state_dict are untouched; removing the attribute restores the
layer). The first layer of a segment runs the whole segment, under
torch.utils.checkpoint (non-reentrant, RNG state preserved) when it is recomputed.
Under torch.no_grad the segment runs with no checkpoint machinery at all.

Groups (segments of several layers) need a model that calls its layers as a plain
chain, and check it as the model runs. The first layer of a group returns, in place
of its own output (which the segment did not keep), a ChainOutput: a tensor with the
output's shape and dtype but no data, which refuses every operation. Only the next
layer of the group, called next on it with the same other arguments, takes it and
returns the next ChainOutput; the last layer returns the segment's real output. So
a model that uses an inner layer's output anywhere else (a skip connection over a
layer, collected hidden states, a layer called twice, an op between two layers) gets
a RuntimeError naming the layer, never a wrong number.

Hooks: a layer's forward hooks run once per forward, around the model's own call,
and not again when the segment is recomputed. The later layers of a group would see
theirs run twice, so groups refuse layers that have forward hooks (the first layer's
forward hooks see its ChainOutput). A layer whose forward is already an instance
attribute (another wrapper's) is refused too.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from .. import ops  # noqa: F401  (registers torch.ops.ckpt_attn)
from .policies import POLICIES, Segment
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
        run = SegmentRun(members, segment.mode, storage, segment.start)
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
    """Runs a segment's layers (model layers start, start + 1, ...) as one unit; see the
    module docstring."""

    def __init__(self, layers: list[nn.Module], mode: str, storage: str, start: int):
        self.layers, self.mode, self.storage, self.start = layers, mode, storage, start
        self.latest = None  # weak reference to the ChainOutput the next layer must take
        self.current = None  # the layer _run_layers is running

    def __call__(self, x, *args, **kwargs):
        grouped = len(self.layers) > 1
        if grouped and not isinstance(x, torch.Tensor):
            raise TypeError(f"a segment of several layers needs a tensor as the first "
                            f"argument, got {type(x).__name__}")
        if any(layer._forward_hooks or layer._forward_pre_hooks for layer in self.layers[1:]):
            raise ValueError("a checkpoint segment of several layers (uniform/sqrt/budget) "
                             "cannot run forward hooks of its later layers exactly once; "
                             "remove the hooks or use every=1")
        hidden = x if self.mode == "full" and isinstance(x, torch.Tensor) else None
        inner = []  # (shape, stride, dtype, device) of each inner layer's output
        run_layers = functools.partial(self._run_layers, inner)
        if not torch.is_grad_enabled():
            out = run_layers(x, *args, **kwargs)
        else:
            with saved_tensor_hooks(self.storage, self._excluded(), hidden):
                if self.mode == "none":
                    out = run_layers(x, *args, **kwargs)
                else:
                    context = (_SELECTIVE_CONTEXT if self.mode == "selective"
                               else noop_context_fn)
                    out = checkpoint(run_layers, x, *args, use_reentrant=False,
                                     preserve_rng_state=True, context_fn=context, **kwargs)
        if not grouped:
            return out
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"a segment of several layers needs layers that return a "
                            f"tensor, got {type(out).__name__}")
        return self._hand_over(ChainOutput(_Link.first(self, inner, out, args, kwargs)))

    def pass_through(self, position: int, x, args, kwargs):
        """A later layer of the segment, called by the model on what the layer before it
        returned: hand back the next ChainOutput, or the segment's output at the end."""
        if not isinstance(x, ChainOutput):
            raise RuntimeError(f"{self.name(position)} was called on a {type(x).__name__} "
                               f"that is not the output of {self.name(position - 1)}, but "
                               f"{self.group()} ran it on that output. {_chain_rule()}")
        link = x.link
        if link.run is not self or link.position != position - 1 or x is not self._latest():
            raise RuntimeError(x.misuse(f"as the input of {self.name(position)}"))
        if not link.same_arguments(args, kwargs):
            raise RuntimeError(f"{self.name(position)} was called with other arguments than "
                               f"{self.name(0)}, and {self.group()} ran all its layers with "
                               f"{self.name(0)}'s. {_chain_rule()}")
        if position == len(self.layers) - 1:
            self.latest = None
            return link.out
        return self._hand_over(ChainOutput(dataclasses.replace(link, position=position)))

    def name(self, position: int) -> str:
        """How errors name the layer at a position of the segment: layers[i] (Class)."""
        return f"layers[{self.start + position}] ({type(self.layers[position]).__name__})"

    def group(self) -> str:
        """How errors name the segment: its checkpoint group layers[i..j]."""
        return f"its checkpoint group layers[{self.start}..{self.start + len(self.layers) - 1}]"

    def _latest(self) -> ChainOutput | None:
        return None if self.latest is None else self.latest()

    def _hand_over(self, output: ChainOutput) -> ChainOutput:
        self.latest = weakref.ref(output)
        return output

    def _run_layers(self, inner: list, x, *args, **kwargs):
        # The first layer's hooks ran around the model's call (a recomputation must run
        # the same ops, so they do not run again); the later layers' would run here, and
        # groups refuse layers that have any.
        _ACTIVE.append(self)
        try:
            for position, layer in enumerate(self.layers):
                self.current = layer
                if position == 0:
                    x = type(layer).forward(layer, x, *args, **kwargs)
                    continue
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"a segment of several layers needs layers that return "
                                    f"a tensor; {self.name(position - 1)} returned "
                                    f"{type(x).__name__}")
                if len(inner) < position:  # recorded by the forward, not by recomputations
                    inner.append((x.shape, x.stride(), x.dtype, x.device))
                x = layer(x, *args, **kwargs)
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
        if self.position == 0 and not isinstance(x, ChainOutput):
            return run(x, *args, **kwargs)
        return run.pass_through(self.position, x, args, kwargs)


@dataclasses.dataclass
class _Link:
    """What a ChainOutput stands for: the output of layer `position` of a segment run;
    with the shapes of its layers' outputs, its real output, and the other arguments its
    layers ran with (tensors by weak reference)."""

    run: SegmentRun
    position: int
    inner: list
    out: torch.Tensor
    args: list
    kwargs: dict

    @classmethod
    def first(cls, run: SegmentRun, inner: list, out: torch.Tensor, args, kwargs) -> _Link:
        """The link of the segment's first layer's output."""
        return cls(run, 0, inner, out, [_reference(a) for a in args],
                   {name: _reference(a) for name, a in kwargs.items()})

    def same_arguments(self, args, kwargs) -> bool:
        """Whether args and kwargs are those the segment ran its layers with."""
        return (len(args) == len(self.args) and kwargs.keys() == self.kwargs.keys()
                and all(_same(ref, a) for ref, a in zip(self.args, args, strict=True))
                and all(_same(self.kwargs[name], a) for name, a in kwargs.items()))


class ChainOutput(torch.Tensor):
    """Stands for the output of an inner layer of a checkpoint group, which the group
    computed but did not keep: it has that output's shape, stride, dtype and device
    (requires_grad False), no data, and refuses every other use with a RuntimeError;
    only the group's next layer takes it (see the module docstring)."""

    _METADATA = frozenset({torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__,
                           torch.Tensor.device.__get__, torch.Tensor.ndim.__get__,
                           torch.Tensor.requires_grad.__get__, torch.Tensor.size,
                           torch.Tensor.dim, torch.Tensor.stride})

    @staticmethod
    def __new__(cls, link: _Link):
        shape, stride, dtype, device = link.inner[link.position]
        output = torch.Tensor._make_wrapper_subclass(cls, shape, strides=stride, dtype=dtype,
                                                     device=device, requires_grad=False)
        output.link = link
        return output

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in cls._METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        raise RuntimeError(_misuse(args, kwargs, getattr(func, "__name__", repr(func))))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(_misuse(args, kwargs or {}, str(func)))

    def misuse(self, how: str) -> str:
        """The error for using this placeholder `how`."""
        run, position = self.link.run, self.link.position
        return (f"the output of {run.name(position)} was used ({how}) outside "
                f"{run.group()}: the group ran as one segment and kept no such tensor; only "
                f"{run.name(position + 1)}, called once on it right after "
                f"{run.name(position)}, may take it. {_chain_rule()}")

    def __repr__(self) -> str:
        run, position = self.link.run, self.link.position
        return (f"ChainOutput(placeholder for the output of {run.name(position)}, "
                f"shape={tuple(self.shape)}, dtype={self.dtype})")


def _misuse(args, kwargs, how: str) -> str:
    output = next((t for t in tree_leaves((args, kwargs)) if isinstance(t, ChainOutput)), None)
    return output.misuse(how) if output is not None else f"a ChainOutput was used ({how})"


def _chain_rule() -> str:
    """What groups need, and the policies that work without it (from POLICIES)."""
    grouping = ", ".join(repr(name) for name, p in POLICIES.items() if p.groups)
    per_layer = ", ".join(repr(name) for name, p in POLICIES.items() if not p.groups)
    return (f"A checkpoint group (policies {grouping}) runs its layers as one segment, so "
            f"the model must call them in order, each on the previous layer's output, with "
            f"the same other arguments, and use no inner layer's output elsewhere (skip "
            f"connections, collected hidden states); for such a model use a per-layer "
            f"policy ({per_layer}).")


def _reference(value):
    return weakref.ref(value) if isinstance(value, torch.Tensor) else value


def _same(reference, value) -> bool:
    if isinstance(reference, weakref.ref):
        return reference() is value
    return reference is value or (not isinstance(value, torch.Tensor) and reference == value)
