"""install: put a plan of segments on a model's layers.

Each layer's ``forward`` is replaced by an instance attribute (the class, the
parameters and the state_dict are untouched; removing the attribute restores the
layer). The first layer of a segment runs the whole segment, under
torch.utils.checkpoint (non-reentrant, RNG state preserved) when it is recomputed.
Under torch.no_grad the segment runs with no checkpoint machinery at all.

Groups (segments of several layers) need a model that calls its layers as a plain
chain, and check it as the model runs. The first layer of a group returns, in place
of its own output (which the segment did not keep), a ChainOutput: an object with
the output's shape and dtype but no data, which refuses every operation. Only the
next layer of the group, called on it with the same other arguments, takes it and
returns the next ChainOutput; the last layer returns the segment's real output. So
a model that uses an inner layer's output anywhere else (a skip connection over a
layer, collected hidden states, a layer called twice, an op between two layers) gets
a RuntimeError naming the layer, never a wrong number; so does a model that calls a
later layer of a group on anything but a ChainOutput (only its segment does that).

Hooks: the model's call of each layer runs that layer's hooks once per forward.
Inside a segment, the first layer runs its own forward directly (its hooks ran around
the model's call) and every later layer is called as a module, so its hooks run in the
forward and again when the segment is recomputed. That is what FSDP2 (fully_shard)
expects of its hooks, so groups accept layers that fully_shard manages (the first layer
of a group is unsharded again before its recomputation, since its output, a
ChainOutput, carries no FSDP2 pre-backward hook). Groups refuse later layers that
have forward hooks and are not managed by fully_shard (on a managed one, any hooks
of the user's run again too). A layer whose forward is already an instance attribute
(another wrapper's) is refused too.

In-place layers: a recomputed segment keeps its input to run again from it, so a first
layer with ``inplace = True`` (nn.ReLU(inplace=True) and the like) runs on a copy made
inside the checkpointed region; a first layer that modifies its input in place without
saying so gets a RuntimeError naming it in the forward (not torch's version error in
the backward).

Keyword arguments pass to every layer unchanged (Hugging Face decoder layers take
masks, position embeddings and ids so), but for the KV cache: a recomputed layer would
extend it a second time, so with grad enabled it runs with use_cache=False and no cache,
with a warning, and the module that calls the layers (a Hugging Face base model) gets
use_cache=False in training, so it builds no cache: what Hugging Face's own gradient
checkpointing does. Under torch.no_grad (generation) caches work with every policy.

torch.compile (fullgraph) traces every policy with storage "device": nothing inside a
checkpointed region changes Python state; what a region needs (the layers, mode,
storage) is fixed when the plan is installed, the metadata of the inner outputs of a
group comes back as the region's output, and the segment's `running` flag is set
and cleared outside the region. The other storages work through saved_tensors_hooks
in eager mode, which torch.compile does not trace; under it a recomputed segment keeps
its input in the stored form inside the graph (ckpt_attn.checkpointing.storage), and
"cpu" offload of a segment that is not recomputed is refused.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from .. import ops  # noqa: F401  (registers torch.ops.ckpt_attn)
from ..distributed import attention  # noqa: F401  (registers ring_attention_forward)
from .policies import POLICIES, Segment
from .storage import offload_hooks, restored, storage_key, stored_form, stored_input_hooks

try:  # torch.distributed is optional in a torch build
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel
except ImportError:  # pragma: no cover
    FSDPModule = DistributedDataParallel = ()

# Selective checkpointing keeps these ops' outputs and recomputes everything else: the
# matmuls, our attention ops, and the fused kernels torch's scaled_dot_product_attention
# dispatches to (what Hugging Face layers run), whose (O, logsumexp) costs S x hidden to
# keep and a whole attention forward to recompute.
SAVED_OPS = frozenset({
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.ckpt_attn.attention_forward.default,
    torch.ops.ckpt_attn.ring_attention_forward.default,  # context parallelism
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_fused_attention_overrideable.default,
})


def _save_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SELECTIVE_CONTEXT = functools.partial(create_selective_checkpoint_contexts,
                                       _save_matmuls_and_attention)


def unwrap(model: nn.Module) -> nn.Module:
    """The model a DistributedDataParallel wrapper holds (``.module``), or model itself."""
    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def find_layers(model: nn.Module) -> nn.ModuleList | nn.Sequential:
    """The chain of layers a policy applies to: an nn.ModuleList or nn.Sequential given
    itself, or the ``layers`` of the model, of a DistributedDataParallel's module, or of
    a Hugging Face model's base model (``model.model.layers``)."""
    model = unwrap(model)
    if isinstance(model, (nn.ModuleList, nn.Sequential)) and len(model) > 0:
        return model
    for holder in (model, getattr(model, "base_model", None), getattr(model, "model", None)):
        layers = getattr(holder, "layers", None)
        if isinstance(layers, (nn.ModuleList, nn.Sequential)) and len(layers) > 0:
            return layers
    raise ValueError(f"model must be an nn.Sequential, an nn.ModuleList or have a non-empty "
                     f"`layers` nn.ModuleList (itself or as model.model.layers) to "
                     f"checkpoint; {type(model).__name__} has none")


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


_watcher: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None


@contextlib.contextmanager
def watch(watcher: Callable[[nn.Module], contextlib.AbstractContextManager]) -> Iterator[None]:
    """Within the block, each segment runs the forward of its first layer (which it calls
    directly, without module hooks, in the forward and in the recomputation) inside
    watcher(layer); ckpt_attn.memory.measure attributes the recomputed ops so. Set
    before the model runs, never inside a checkpointed region."""
    global _watcher
    previous, _watcher = _watcher, watcher
    try:
        yield
    finally:
        _watcher = previous


class InstalledForward:
    """Base of the forwards apply_checkpointing installs (so they can be removed)."""


class SegmentRun:
    """Runs a segment's layers (model layers start, start + 1, ...) as one unit; see the
    module docstring."""

    def __init__(self, layers: list[nn.Module], mode: str, storage: str, start: int):
        self.layers, self.mode, self.storage, self.start = layers, mode, storage, start
        self.running = False  # whether the model's call of the first layer runs it now
        # A recomputed segment keeps its input to run again from it: a first layer that
        # works in place (nn.ReLU(inplace=True) and the like) runs on a copy, made inside
        # the checkpointed region, so the kept input stays as it was.
        self.copies_input = mode != "none" and getattr(layers[0], "inplace", False) is True

    def __call__(self, x, *args, **kwargs):
        grouped = len(self.layers) > 1
        if grouped:
            self._check_group(x)
        self.running = True  # set and cleared outside the checkpointed region
        version = x._version if self._checks_version(x) else None
        try:
            out, inner = self._run(x, args, kwargs)
        finally:
            self.running = False
        if version is not None and x._version != version:
            raise RuntimeError(f"{self.name(0)} modified its input in place, and checkpoint "
                               f"policy mode {self.mode!r} keeps that input to recompute the "
                               f"layer from it in the backward; make the layer work out of "
                               f"place (or give it an `inplace = True` attribute, and it runs "
                               f"on a copy), or leave it unrecomputed (policy 'none')")
        if not grouped:
            return out
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"a segment of several layers needs layers that return a "
                            f"tensor, got {type(out).__name__}")
        return ChainOutput(_Link(self, 0, inner, out, args, kwargs))

    def pass_through(self, position: int, x, args, kwargs):
        """A later layer of the segment, called by the model on what the layer before it
        returned: hand back the next ChainOutput, or the segment's output at the end."""
        link = x.link
        if link.run is not self or link.position != position - 1:
            raise RuntimeError(x.misuse(f"as the input of {self.name(position)}"))
        if not link.same_arguments(args, kwargs):
            raise RuntimeError(f"{self.name(position)} was called with other arguments than "
                               f"{self.name(0)}, and {self.group()} ran all its layers with "
                               f"{self.name(0)}'s. {_chain_rule()}")
        if position == len(self.layers) - 1:
            return link.out
        return ChainOutput(_Link(self, position, link.inner, link.out, link.args, link.kwargs))

    def name(self, position: int) -> str:
        """How errors name the layer at a position of the segment: layers[i] (Class)."""
        return f"layers[{self.start + position}] ({type(self.layers[position]).__name__})"

    def group(self) -> str:
        """How errors name the segment: its checkpoint group layers[i..j]."""
        return f"its checkpoint group layers[{self.start}..{self.start + len(self.layers) - 1}]"

    def _check_group(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"a segment of several layers needs a tensor as the first "
                            f"argument, got {type(x).__name__}")
        for position, layer in enumerate(self.layers[1:], start=1):
            if (layer._forward_hooks or layer._forward_pre_hooks) and \
                    not isinstance(layer, FSDPModule):
                raise ValueError(f"{self.name(position)} has forward hooks, which a checkpoint "
                                 f"segment of several layers (uniform/sqrt/budget) would run "
                                 f"again when it recomputes the segment; remove them or use "
                                 f"every=1 (FSDP2's own hooks are fine)")

    def _checks_version(self, x) -> bool:
        """Whether to check that the segment leaves its input unmodified: a recomputed
        segment's tensor input, outside torch.compile's tracing."""
        return (self.mode != "none" and not self.copies_input and isinstance(x, torch.Tensor)
                and torch.is_grad_enabled() and not torch.compiler.is_compiling())

    def calls_itself(self) -> bool:
        """Whether a call of a later layer on a plain tensor comes from the segment: its
        forward, or its recomputation in the backward."""
        return self.running or torch._C._current_graph_task_id() != -1

    def _run(self, x, args, kwargs):
        if not torch.is_grad_enabled():
            return self._run_layers(x, *args, **kwargs)
        if self.mode != "none":
            kwargs = without_cache(kwargs)
        tensor = isinstance(x, torch.Tensor)
        if self.storage == "device" or (self.storage == "cpu" and tensor
                                        and x.device.type == "cpu"):
            return self._run_recorded(x, *args, **kwargs)  # (on the CPU: nothing to move)
        stores_input = self.mode == "full" and tensor and x.is_floating_point() and \
            x.dim() >= 1
        if torch.compiler.is_compiling():
            return self._run_compiled_storage(x, stores_input, args, kwargs)
        if self.storage == "cpu":
            with offload_hooks(self._excluded()):
                return self._run_recorded(x, *args, **kwargs)
        if not stores_input:  # int8/fp8 store only a recomputed segment's input
            return self._run_recorded(x, *args, **kwargs)
        stored = stored_form(x, self.storage)
        x_hat = restored(x, stored)
        with stored_input_hooks(x_hat, stored):
            return self._run_recorded(x_hat, *args, **kwargs)

    def _run_compiled_storage(self, x, stores_input: bool, args, kwargs):
        """Under torch.compile, which does not trace saved_tensors_hooks: a recomputed
        segment's input kept in its stored form inside the graph (storage.stored_form).
        What "cpu" offloads of a segment that is not recomputed (every tensor autograd
        saves) has no such form and is refused."""
        if self.storage == "cpu" and self.mode != "full":
            raise RuntimeError(f"storage='cpu' on a segment that is not recomputed (mode "
                               f"{self.mode!r}) offloads every tensor autograd saves, "
                               f"through torch.autograd.graph.saved_tensors_hooks, which "
                               f"torch.compile does not trace; under torch.compile it "
                               f"applies to recomputed segments only")
        if not stores_input:
            return self._run_recorded(x, *args, **kwargs)
        stored = stored_form(x, self.storage)
        return checkpoint(self._run_restored, x, stored, *args, use_reentrant=False,
                          preserve_rng_state=True, **kwargs)

    def _run_restored(self, x, stored, *args, **kwargs):
        """The checkpointed region of a stored input under torch.compile."""
        return self._run_layers(restored(x, stored), *args, **kwargs)

    def _run_recorded(self, x, *args, **kwargs):
        """The layers, with autograd keeping what the segment's mode says."""
        if self.mode == "none":
            return self._run_layers(x, *args, **kwargs)
        # context_fn given only for "selective" and as a module constant: torch.compile
        # recognises the default and a constant selective context, not a variable
        if self.mode == "selective":
            return checkpoint(self._run_layers, x, *args, use_reentrant=False,
                              preserve_rng_state=True, context_fn=_SELECTIVE_CONTEXT, **kwargs)
        return checkpoint(self._run_layers, x, *args, use_reentrant=False,
                          preserve_rng_state=True, **kwargs)

    def _run_layers(self, x, *args, **kwargs):
        """Run the layers in order: (the last one's output, (shape, stride, dtype, device)
        of each inner output). The body of the checkpointed region: it reads the plan and
        changes no Python state."""
        inner = []
        for position, layer in enumerate(self.layers):
            if position == 0:
                if self.copies_input and isinstance(x, torch.Tensor):
                    x = x.clone()
                x = self._run_first(layer, x, args, kwargs)
                continue
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"a segment of several layers needs layers that return a "
                                f"tensor; {self.name(position - 1)} returned "
                                f"{type(x).__name__}")
            inner.append((x.shape, x.stride(), x.dtype, x.device))
            x = layer(x, *args, **kwargs)  # its hooks run; its LayerForward runs its forward
        return x, tuple(inner)

    @staticmethod
    def _run_first(layer: nn.Module, x, args, kwargs):
        if isinstance(layer, FSDPModule) and torch.is_grad_enabled():
            # idempotent in the forward; in the recomputation it brings back parameters
            # FSDP2 resharded after the forward, which stay until the layer's backward
            layer.unshard()
        if _watcher is None:
            return type(layer).forward(layer, x, *args, **kwargs)
        with _watcher(layer):
            return type(layer).forward(layer, x, *args, **kwargs)

    def _excluded(self) -> set[int]:
        return {storage_key(t) for layer in self.layers
                for t in (*layer.parameters(), *layer.buffers())}


class LayerForward(InstalledForward):
    """The forward a plan installs on a layer. The first layer of a segment runs the
    segment. A later layer, called by the model, takes the ChainOutput of the layer
    before it and passes it on; called by its segment, it runs its own forward."""

    def __init__(self, run: SegmentRun, position: int):
        self.run, self.position = run, position

    def __call__(self, x, *args, **kwargs):
        run, position = self.run, self.position
        if isinstance(x, ChainOutput):
            return run.pass_through(position, x, args, kwargs)
        if position == 0:
            return run(x, *args, **kwargs)
        if not run.calls_itself():
            raise RuntimeError(f"{run.name(position)} was called on a {type(x).__name__} "
                               f"that is not the output of {run.name(position - 1)}, but "
                               f"{run.group()} ran it on that output. {_chain_rule()}")
        layer = run.layers[position]
        return type(layer).forward(layer, x, *args, **kwargs)


class _Link:
    """What a ChainOutput stands for: the output of layer `position` of a segment run;
    with the metadata of its layers' inner outputs, its real output, and the other
    arguments its layers ran with."""

    def __init__(self, run: SegmentRun, position: int, inner: tuple, out: torch.Tensor,
                 args: tuple, kwargs: dict):
        self.run, self.position, self.inner, self.out = run, position, inner, out
        self.args, self.kwargs = args, kwargs

    def same_arguments(self, args, kwargs) -> bool:
        """Whether args and kwargs are those the segment ran its layers with: the same
        structure, the same tensors, equal other values (e.g. one tuple of position
        embeddings passed to every layer)."""
        return _same(self.args, args) and _same(self.kwargs, kwargs)


class ChainOutput:
    """Stands for the output of an inner layer of a checkpoint group, which the group
    computed but did not keep: it answers shape, size(), stride(), dim(), ndim, dtype,
    device and requires_grad (False) like that output, and refuses every other use (a
    torch function, a method, an operator) with a RuntimeError; only the group's next
    layer takes it (see the module docstring). It is a plain Python object, so that
    torch.compile traces groups too."""

    requires_grad = False

    def __init__(self, link: _Link):
        self.link = link
        self.shape, self._stride, self.dtype, self.device = link.inner[link.position]
        self.ndim = len(self.shape)

    def size(self, dim: int | None = None):
        """The output's size (of dimension dim)."""
        return self.shape if dim is None else self.shape[dim]

    def stride(self, dim: int | None = None):
        """The output's strides (of dimension dim)."""
        return self._stride if dim is None else self._stride[dim]

    def dim(self) -> int:
        """The output's number of dimensions."""
        return self.ndim

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(_misuse(args, kwargs or {}, getattr(func, "__name__", repr(func))))

    def __getattr__(self, name: str):
        if name.startswith("__"):  # protocols probed by Python (copy, pickle): absent
            raise AttributeError(name)
        raise RuntimeError(self.misuse(name))

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


def _refuse(name: str):
    def refuse(self, *args, **kwargs):
        raise RuntimeError(self.misuse(name.strip("_")))
    refuse.__name__ = name
    return refuse


for _operator in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and",
                  "or", "xor", "lshift", "rshift"):
    for _name in (f"__{_operator}__", f"__r{_operator}__", f"__i{_operator}__"):
        setattr(ChainOutput, _name, _refuse(_name))
for _name in ("__neg__", "__pos__", "__abs__", "__invert__", "__getitem__", "__setitem__",
              "__len__", "__iter__", "__bool__", "__float__", "__int__", "__index__",
              "__complex__", "__array__", "__lt__", "__le__", "__gt__", "__ge__"):
    setattr(ChainOutput, _name, _refuse(_name))


def _misuse(args, kwargs, how: str) -> str:
    output = next((t for t in tree_leaves((args, kwargs)) if isinstance(t, ChainOutput)), None)
    return output.misuse(how) if output is not None else f"a ChainOutput was used ({how})"


_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")
_CACHE_WARNING = ("caching is incompatible with a checkpoint policy that recomputes layers (the "
                  "recomputation would extend the KV cache again): setting {} for this "
                  "training step, as Hugging Face's gradient checkpointing does; under "
                  "torch.no_grad caches work with every policy")


def without_cache(kwargs: dict) -> dict:
    """A recomputed layer's keyword arguments with its KV cache turned off (use_cache=False,
    each cache argument None), with a warning if there was one to turn off."""
    turned_off = {"use_cache": False} if kwargs.get("use_cache") else {}
    turned_off |= {name: None for name in _CACHE_ARGUMENTS if kwargs.get(name) is not None}
    if not turned_off:
        return kwargs
    warnings.warn(_CACHE_WARNING.format(", ".join(f"{k}={v}" for k, v in turned_off.items())),
                  stacklevel=4)
    return kwargs | turned_off


_CACHE_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""The forward pre-hook guard_cache put on each module, by module."""


def guard_cache(model: nn.Module, layers, recomputes: bool) -> None:
    """While a policy that recomputes is on `layers`, the module of `model` that holds them
    gets use_cache=False in training with grad enabled, when its forward takes use_cache
    (a Hugging Face base model): it then builds no cache and returns past_key_values=None,
    as under Hugging Face's gradient checkpointing. Replaces an earlier guard;
    recomputes=False only removes it."""
    holder = next((module for module in unwrap(model).modules()
                   if any(child is layers for child in module.children())), None)
    if holder is None:
        return
    handle = _CACHE_GUARDS.pop(holder, None)
    if handle is not None:
        handle.remove()
    if recomputes and "use_cache" in inspect.signature(holder.forward).parameters:
        _CACHE_GUARDS[holder] = holder.register_forward_pre_hook(_cache_off_in_training,
                                                                 with_kwargs=True)


def _cache_off_in_training(module: nn.Module, args, kwargs):
    if not (module.training and torch.is_grad_enabled()) or kwargs.get("use_cache") is False:
        return None
    if not (kwargs.get("use_cache") or getattr(getattr(module, "config", None), "use_cache",
                                               False)):
        return None
    warnings.warn(_CACHE_WARNING.format("use_cache=False"), stacklevel=3)
    return args, kwargs | {"use_cache": False}


def _chain_rule() -> str:
    """What groups need, and the policies that work without it (from POLICIES)."""
    grouping = ", ".join(repr(name) for name, p in POLICIES.items() if p.groups)
    per_layer = ", ".join(repr(name) for name, p in POLICIES.items() if not p.groups)
    return (f"A checkpoint group (policies {grouping}) runs its layers as one segment, so "
            f"the model must call them in order, each on the previous layer's output, with "
            f"the same other arguments, and use no inner layer's output elsewhere (skip "
            f"connections, collected hidden states); for such a model use a per-layer "
            f"policy ({per_layer}).")


def _same(reference, value) -> bool:
    """Tensors (and other objects) by identity, containers item by item, other values by
    equality."""
    if reference is value:
        return True
    if isinstance(reference, torch.Tensor) or isinstance(value, torch.Tensor):
        return False
    if isinstance(reference, (tuple, list)):
        return (type(reference) is type(value) and len(reference) == len(value)
                and all(_same(a, b) for a, b in zip(reference, value, strict=True)))
    if isinstance(reference, dict):
        return (isinstance(value, dict) and reference.keys() == value.keys()
                and all(_same(reference[key], value[key]) for key in reference))
    return type(reference) is type(value) and reference == value
