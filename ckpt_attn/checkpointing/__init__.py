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

from torch import nn

from ..modules.transformer import Transformer
from .apply import SAVED_OPS, ChainOutput, find_layers, guard_cache, install, unwrap
from .budget import BudgetForward, planner_in_use, use_planner
from .policies import MODES, POLICIES, Option, Policy, Segment, get_policy
from .storage import STORAGES

__all__ = ["MODES", "POLICIES", "SAVED_OPS", "STORAGES", "ChainOutput", "Option", "Policy",
           "Segment", "apply_checkpointing", "find_layers", "get_policy", "use_planner"]


def apply_checkpointing(model: nn.Module, policy: str = "none", *, storage: str = "device",
                        **options) -> nn.Module:
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
            ("budget") plans with ckpt_attn.memory on the first forward of each input
            shape (in eager mode: run one step before torch.compile traces it): for
            a ckpt_attn.Transformer the final norm counts in budget_bytes; for other
            models, what runs outside the layers does not. Policies that
            group layers (Policy.groups) need the model to call its layers as a plain
            chain: any other use of an inner layer's output raises a RuntimeError
            where it happens, never a wrong number (see ckpt_attn.checkpointing.apply).
        storage: how kept tensors are stored: "device" (as saved), "cpu" (offloaded;
            pinned and asynchronous on CUDA), "int8" or "fp8" (the inputs of recomputed
            segments, quantized per row; see ckpt_attn.checkpointing.storage for the
            error), as far as the policy takes it.

    Applying a policy replaces the previous one. Under torch.no_grad the layers run
    plainly, with no checkpoint machinery. With grad enabled, recomputed layers run with
    their KV cache turned off (use_cache=False) and a warning, as under Hugging Face's
    gradient_checkpointing_enable(): a recomputation would extend the cache again.
    """
    chosen = get_policy(policy, options, storage)
    layers = find_layers(model)
    if chosen.planned:
        planner = planner_in_use()
        install(layers, [Segment(i, i + 1, "none") for i in range(len(layers))], "device")
        inner = unwrap(model)
        tail = inner.norm if isinstance(inner, Transformer) else None
        layers[0].forward = BudgetForward(layers, planner, options["budget_bytes"], storage,
                                          tail)
        recomputes = True
    else:
        segments = chosen.segments(len(layers), options)
        install(layers, segments, storage)
        recomputes = any(segment.mode != "none" for segment in segments)
    guard_cache(model, layers, recomputes)
    return model
