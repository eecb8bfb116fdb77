"""Activation checkpoint policies over a model's chain of layers.

    apply_checkpointing(model, "sqrt")
    apply_checkpointing(model, "uniform", every=2, storage="int8")
    apply_checkpointing(model, "budget", budget_bytes=40 * 2**30)
    apply_checkpointing(model, "none")  # removes any policy

Each policy is defined once, in POLICIES (policies.py); apply_checkpointing,
ckpt_attn.memory and the command line read it there.

Everything is non-reentrant torch.utils.checkpoint with the RNG state preserved.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules.transformer import Transformer
from .apply import SAVED_OPS, ChainOutput, find_layers, guard_cache, install, unwrap
from .budget import BudgetForward, planner_in_use, use_planner
from .policies import MODES, POLICIES, Option, Policy, Segment, get_policy
from .storage import STORAGES

__all__ = ["MODES", "POLICIES", "SAVED_OPS", "STORAGES", "ChainOutput", "Option", "Policy",
           "Segment", "apply_checkpointing", "find_layers", "get_policy", "use_planner"]


def apply_checkpointing(model: nn.Module, policy: str = "none", *, storage: str = "device",
                        example_inputs: tuple | None = None, **options) -> nn.Module:
    """Put a checkpoint policy on the layers of `model` (in place) and return it.

    Args:
        model: a ckpt_attn.Transformer, any module with a `layers` nn.ModuleList (each
            layer called on the previous one's output; a Hugging Face model's
            ``model.model.layers`` is found too), an nn.Sequential or nn.ModuleList, or
            a DistributedDataParallel holding one of these. Other arguments the model
            passes to its layers (masks, position embeddings) reach them unchanged.
        policy: a name in POLICIES ("none" removes an earlier policy); its Policy says
            what autograd keeps under it, the options it needs (as keywords: every=,
            ratio=, budget_bytes=) and the storages it takes. A planned policy
            ("budget") plans with ckpt_attn.memory for each input shape: on its first
            forward, or here for the shape of example_inputs. For a
            ckpt_attn.Transformer the plan follows from the shape (closed-form costs),
            so torch.compile (fullgraph=True; static shapes, dynamic=False for several)
            plans a new shape while it traces (a RuntimeError where the closed form does
            not cover the layers as they are: autocast, eval mode with dropout, replaced
            or sharded modules); other models are measured, in eager mode, so under
            torch.compile a shape with no plan (from an eager forward or example_inputs)
            raises a RuntimeError. For a ckpt_attn.Transformer the final norm counts in
            budget_bytes; for other
            models, what runs outside the layers does not. Policies that
            group layers (Policy.groups) need the model to call its layers as a plain
            chain: any other use of an inner layer's output raises a RuntimeError
            where it happens, never a wrong number (see ckpt_attn.checkpointing.apply).
        storage: how kept tensors are stored: "device" (as saved), "cpu" (offloaded;
            pinned and asynchronous on CUDA), "int8" or "fp8" (the inputs of recomputed
            segments, quantized per row; see ckpt_attn.checkpointing.storage for the
            error), as far as the policy takes it.
        example_inputs: for a planned policy, a tuple of positional arguments of
            `model` to plan for now: the model runs on them under torch.no_grad up to
            its first layer, and the plan for that layer's input is made and installed
            (what the first forward of that shape would do), so that a torch.compile of
            the model traces it without an eager step first.

    Applying a policy replaces the previous one. Under torch.no_grad the layers run
    plainly, with no checkpoint machinery. With grad enabled, recomputed layers run with
    their KV cache turned off (use_cache=False) and a warning, as under Hugging Face's
    gradient_checkpointing_enable(): a recomputation would extend the cache again.
    """
    chosen = get_policy(policy, options, storage)
    if example_inputs is not None and not chosen.planned:
        raise ValueError(f"example_inputs is taken by a planned policy ("
                         f"{', '.join(repr(n) for n, p in POLICIES.items() if p.planned)}), "
                         f"not by policy {policy!r}")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of the model's positional "
                        f"arguments, got {type(example_inputs).__name__}")
    layers = find_layers(model)
    if chosen.planned:
        planner = planner_in_use()
        install(layers, [Segment(i, i + 1, "none") for i in range(len(layers))], "device")
        inner = unwrap(model)
        transformer = isinstance(inner, Transformer)
        budget = BudgetForward(layers, planner, options["budget_bytes"], storage,
                               inner.norm if transformer else None,
                               plans_from_shapes=transformer)
        layers[0].forward = budget
        if example_inputs is not None:
            budget.plan_for(*_first_layer_call(model, layers[0], example_inputs))
        recomputes = True
    else:
        segments = chosen.segments(len(layers), options)
        install(layers, segments, storage)
        recomputes = any(segment.mode != "none" for segment in segments)
    guard_cache(model, layers, recomputes)
    return model


class _Reached(Exception):
    """Raised by _first_layer_call's hook to stop the model at its first layer."""


def _first_layer_call(model: nn.Module, first: nn.Module, example_inputs: tuple):
    """(x, args, kwargs) the model calls its first layer with on example_inputs, found by
    running the model under torch.no_grad up to that call."""
    arguments = []

    def reached(module, args, kwargs):
        if not args:
            raise ValueError(f"example_inputs: {type(unwrap(model)).__name__} called its "
                             f"first layer with keyword arguments only; the budget policy "
                             f"plans for the layer's first positional argument")
        arguments.append((args[0], args[1:], kwargs))
        raise _Reached

    handle = first.register_forward_pre_hook(reached, with_kwargs=True)
    try:
        with torch.no_grad():
            model(*example_inputs)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not arguments:
        raise ValueError(f"example_inputs: {type(unwrap(model)).__name__} called on them "
                         f"returned without calling its first layer, so there is no input "
                         f"to plan for")
    return arguments[0]
