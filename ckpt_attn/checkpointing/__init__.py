"""Activation checkpoint policies over a model's chain of layers.

    apply_checkpointing(model, "sqrt")
    apply_checkpointing(model, "uniform", every=2, storage="int8")
    apply_checkpointing(model, "budget", budget_bytes=40 * 2**30)
    apply_checkpointing(model, "none")  # removes any policy

Everything is non-reentrant torch.utils.checkpoint with the RNG state preserved.
"""

from __future__ import annotations

from torch import nn

from ..modules.transformer import Transformer
from .apply import SAVED_OPS, find_layers, install
from .budget import BudgetForward
from .policies import MODES, POLICIES, Segment, check_policy, plan_for
from .storage import STORAGES

__all__ = ["MODES", "POLICIES", "SAVED_OPS", "STORAGES", "Segment", "apply_checkpointing",
           "find_layers"]


def apply_checkpointing(model: nn.Module, policy: str = "none", *, storage: str = "device",
                        **options) -> nn.Module:
    """Put a checkpoint policy on the layers of `model` (in place) and return it.

    Args:
        model: a ckpt_attn.Transformer, any module with a `layers` nn.ModuleList (each
            layer called on the previous one's output), or an nn.Sequential.
        policy: what autograd keeps between forward and backward:
            "none": everything (no checkpointing; removes an earlier policy);
            "full": each layer's input, each layer recomputed once in the backward;
            "uniform" (every=k): the input of each group of k layers, each group
                recomputed once;
            "sqrt": "uniform" with k = ceil(sqrt(num_layers));
            "ratio" (ratio=c): "full" on the first ceil(c * num_layers) layers, "none"
                on the rest;
            "selective": per layer, the outputs of matmuls and of the attention op
                (o, lse) through torch's selective checkpoint contexts; the pointwise
                ops (norms, rotary, activations, dropout) are recomputed, no matmul is;
            "budget" (budget_bytes=M): the plan with the least recompute whose peak
                activation memory fits M bytes (ckpt_attn.memory.plan_layers), made on
                the first forward for each input shape from the layers' costs measured
                on the meta device. For a ckpt_attn.Transformer the final norm counts
                too; for other models, what runs outside the layers is not in M.
        storage: how kept tensors are stored: "device" (as saved), "cpu" (offloaded;
            pinned and asynchronous on CUDA), "int8" or "fp8" (the inputs of recomputed
            segments, quantized per row; see ckpt_attn.checkpointing.storage for the
            error). int8/fp8 need a policy that recomputes; "selective" keeps its
            tensors in torch's own cache, so it takes "device" only.

    Applying a policy replaces the previous one. Under torch.no_grad the layers run
    plainly, with no checkpoint machinery.
    """
    check_policy(policy, options)
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    if storage != "device" and policy == "selective":
        raise ValueError(f"storage={storage!r} does not apply to policy 'selective', whose "
                         f"kept tensors live in torch's selective-checkpoint cache; use "
                         f"storage='device'")
    if storage in ("int8", "fp8") and policy == "none":
        raise ValueError(f"storage={storage!r} quantizes the inputs of recomputed layers; "
                         f"policy 'none' recomputes nothing (use storage='cpu')")
    layers = find_layers(model)
    if policy == "budget":
        install(layers, [Segment(i, i + 1, "none") for i in range(len(layers))], "device")
        tail = getattr(model, "norm", None) if isinstance(model, Transformer) else None
        layers[0].forward = BudgetForward(layers, options["budget_bytes"], storage, tail)
    else:
        install(layers, plan_for(policy, len(layers), options), storage)
    return model
