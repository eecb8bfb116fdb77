"""estimate(): the analytic activation-memory model of a TransformerConfig.

Every tensor a ckpt_attn.TransformerLayer keeps for its backward is a term below,
with the reason autograd keeps it; a policy keeps all of them ("none"), only the
layer's input ("full", "uniform", "sqrt": one input per group), or the matmul and
attention outputs ("selective"). Notation: T = batch * seq tokens, h = hidden, g =
kv heads * head dim, f = ffn hidden, H = heads, b = bytes per element.

The transient terms of the peak (what a segment's backward brings back, gradients
in flight) come from running one layer on the meta device (ckpt_attn.memory.
layer_costs), and the chain is combined with the same model plan_layers uses.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..checkpointing.policies import get_policy
from ..modules.config import TransformerConfig
from ..modules.transformer import TransformerLayer, make_norm
from .planner import (
    LayerCost,
    Plan,
    layer_costs,
    plan_cost,
    plan_layers,
    segment_cost,
    tail_cost,
)
from .report import Report

NAIVE_SAVES = "what naive attention (softmax(q k^T) v in PyTorch) would keep instead"


@dataclasses.dataclass
class Term(Report):
    """One tensor a layer keeps: its name, bytes (per layer), and why autograd keeps it."""

    name: str
    bytes: int
    why: str


@dataclasses.dataclass
class Estimate(Report):
    """The predicted memory and compute of one training step under a policy.

    kept_bytes: on the device between forward and backward; offloaded_bytes: in host
    memory (storage="cpu"); peak_bytes: on the device during the backward.
    recompute_flops and step_flops (forward + backward without recompute);
    recompute_overhead = recompute_flops / step_flops. naive_kept_bytes: what the same
    policy keeps with naive attention (S^2 terms). layer_terms: what one layer keeps
    under "none"; naive_terms: the attention terms naive attention changes.
    """

    policy: str
    storage: str
    kept_bytes: int
    offloaded_bytes: int
    peak_bytes: int
    recompute_flops: int
    step_flops: int
    recompute_overhead: float
    naive_kept_bytes: int
    layer_terms: list[Term]
    naive_terms: list[Term]


def layer_terms(cfg: TransformerConfig, batch: int, seq: int, dtype: torch.dtype,
                training: bool = True) -> list[Term]:
    """What one TransformerLayer keeps with no checkpointing, tensor by tensor."""
    tokens, b = batch * seq, dtype.itemsize
    h, g, f = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.ffn_hidden_size
    stats = 4 * tokens * (1 if cfg.norm == "rmsnorm" else 2)
    stats_why = "fp32 rstd per token" if cfg.norm == "rmsnorm" else "fp32 mean and rstd"
    terms = []
    for where, next_op in (("attn", "q/k/v projections"), ("mlp", "MLP input projections")):
        terms += [Term(f"{where}_norm input", tokens * h * b, "the norm's backward"),
                  Term(f"{where}_norm stats", stats, stats_why),
                  Term(f"{where}_norm output", tokens * h * b,
                       f"the {next_op}' weight gradients")]
        if where == "attn":
            terms += [Term("q after rotary", tokens * h * b, "attention backward"),
                      Term("k after rotary", tokens * g * b, "attention backward"),
                      Term("v", tokens * g * b, "attention backward"),
                      Term("attention output o", tokens * h * b,
                           "attention backward, o_proj weight gradient"),
                      Term("row max and log row sum", tokens * cfg.num_heads * 2 * 4,
                           "fp32, attention backward recomputes P from them")]
        else:
            terms += _mlp_terms(cfg, tokens * f * b)
        if cfg.dropout > 0 and training:
            terms.append(Term(f"{where} residual dropout mask", tokens * h, "bool keep-mask"))
    return terms


def _mlp_terms(cfg: TransformerConfig, size: int) -> list[Term]:
    if cfg.mlp == "swiglu":
        return [Term("gate", size, "silu's backward"),
                Term("silu(gate)", size, "the product's backward"),
                Term("up", size, "the product's backward"),
                Term("silu(gate) * up", size, "down_proj weight gradient")]
    return [Term("up", size, "gelu's backward"),
            Term("gelu(up)", size, "down_proj weight gradient")]


def naive_attention_terms(cfg: TransformerConfig, batch: int, seq: int, dtype: torch.dtype,
                          training: bool = True) -> list[Term]:
    """The extra (or, negative, saved) bytes per layer with naive attention."""
    b, heads, tokens = dtype.itemsize, cfg.num_heads, batch * seq
    square = batch * heads * seq * seq
    terms = [Term("softmax output P", square * b, "P @ v's backward and softmax's backward"),
             Term("row statistics (not kept)", -tokens * heads * 2 * 4,
                  "naive keeps P instead")]
    if cfg.num_kv_heads != cfg.num_heads:
        repeated = 2 * tokens * (cfg.num_heads - cfg.num_kv_heads) * cfg.head_dim * b
        terms.append(Term("k, v repeated per query head", repeated, "GQA by repeat_interleave"))
    if cfg.dropout > 0 and training:
        terms += [Term("dropout mask", square, "bool keep-mask"),
                  Term("dropped P", square * b, "P @ v's backward")]
    return terms


def estimate(cfg: TransformerConfig, *, batch: int, seq: int, policy: str = "none",
             dtype: torch.dtype = torch.bfloat16, storage: str = "device",
             **policy_options) -> Estimate:
    """Predict what one training step of Transformer(cfg) keeps and peaks at.

    Args:
        cfg: the model's TransformerConfig.
        batch, seq: the input's batch size and sequence length.
        policy, storage, **policy_options: as in ckpt_attn.apply_checkpointing
            (every=, ratio=, budget_bytes=).
        dtype: the model's and activations' dtype.
    """
    if not isinstance(cfg, TransformerConfig):
        raise TypeError(f"cfg must be a TransformerConfig, got {type(cfg).__name__}")
    for name, value in (("batch", batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if seq > cfg.max_seq_len:
        raise ValueError(f"seq ({seq}) exceeds cfg.max_seq_len ({cfg.max_seq_len})")
    chosen = get_policy(policy, policy_options, storage)
    terms = layer_terms(cfg, batch, seq, dtype)
    naive = naive_attention_terms(cfg, batch, seq, dtype)
    costs, final_norm, norm_transient = _chain(cfg, batch, seq, dtype)
    if chosen.planned:
        segments = plan_layers(costs, policy_options["budget_bytes"], final_norm,
                               norm_transient).segments
    else:
        segments = chosen.segments(cfg.num_layers, policy_options)
    plan = plan_cost(costs, segments, final_norm, norm_transient)
    # int8/fp8: a byte per element and an fp32 scale per token
    quantized_input = batch * seq * (cfg.hidden_size + 4)
    kept, peak, offloaded = _stored(plan, costs, storage, final_norm, quantized_input)
    step_flops = cfg.num_layers * (costs[0].forward_flops + costs[0].backward_flops)
    # naive attention under "none" keeps its S^2 terms; under "selective" the scores,
    # a matmul output (softmax and dropout are recomputed)
    scores = terms_bytes(naive[:2])
    naive_extra = sum(terms_bytes(naive) if s.mode == "none" else
                      scores if s.mode == "selective" else 0 for s in plan.segments)
    return Estimate(policy=policy, storage=storage, kept_bytes=kept, offloaded_bytes=offloaded,
                    peak_bytes=peak, recompute_flops=plan.recompute_flops,
                    step_flops=step_flops,
                    recompute_overhead=plan.recompute_flops / step_flops,
                    naive_kept_bytes=plan.kept_bytes + naive_extra,
                    layer_terms=terms, naive_terms=naive)


def _stored(plan, costs: list[LayerCost], storage: str, base: int,
            quantized_input: int) -> tuple[int, int, int]:
    """(kept on device, peak on device, offloaded) of a plan under a storage mode."""
    transient = plan.peak_bytes - plan.kept_bytes
    if storage == "device":
        return plan.kept_bytes, plan.peak_bytes, 0
    if storage == "cpu":
        # everything the layers keep is in host memory; each segment's share comes back
        # to the device for its backward
        largest = max(segment_cost(costs, s)[0] for s in plan.segments)
        return base, base + largest + transient, plan.kept_bytes - base
    # int8 / fp8: a recomputed segment keeps its input quantized; the dequantized input
    # is rebuilt on the device when the segment is recomputed
    recomputed = [s for s in plan.segments if s.mode == "full"]
    input_bytes = costs[0].input_bytes
    kept = plan.kept_bytes - len(recomputed) * (input_bytes - quantized_input)
    return kept, kept + transient + (input_bytes if recomputed else 0), 0


def terms_bytes(terms: list[Term]) -> int:
    """Total bytes of a list of terms."""
    return sum(t.bytes for t in terms)


def _chain(cfg: TransformerConfig, batch: int, seq: int, dtype: torch.dtype):
    """([LayerCost] * num_layers, final norm kept bytes, final norm transient bytes)."""
    cost, norm_transient = _measured(tuple(dataclasses.astuple(cfg)), batch, seq, dtype)
    terms = layer_terms(cfg, batch, seq, dtype)
    cost = dataclasses.replace(cost, kept_none_bytes=terms_bytes(terms))
    return [cost] * cfg.num_layers, terms_bytes(terms[:2]), norm_transient


@functools.lru_cache(maxsize=64)
def _measured(cfg_fields: tuple, batch: int, seq: int, dtype: torch.dtype):
    """One layer's LayerCost and the final norm's transient, measured on the meta device
    (cached: every policy of one configuration shares them)."""
    cfg = TransformerConfig(*cfg_fields)
    with torch.device("meta"):
        layer = TransformerLayer(cfg).to(dtype)
        norm = make_norm(cfg).to(dtype)
    x = torch.empty(batch, seq, cfg.hidden_size, device="meta", dtype=dtype)
    return layer_costs([layer], x)[0], tail_cost(norm, x)[1]


def plan(cfg: TransformerConfig, *, batch: int, seq: int, budget_bytes: float,
         dtype: torch.dtype = torch.bfloat16) -> Plan:
    """The checkpoint plan for Transformer(cfg) with least recompute FLOPs whose predicted
    peak fits budget_bytes (see plan_layers); ValueError with the minimum if none does."""
    estimate(cfg, batch=batch, seq=seq, dtype=dtype)  # checks the arguments
    get_policy("budget", {"budget_bytes": budget_bytes})
    costs, final_norm, norm_transient = _chain(cfg, batch, seq, dtype)
    return plan_layers(costs, budget_bytes, final_norm, norm_transient)


def plan_chain(layers, x: torch.Tensor, args: tuple = (), kwargs: dict | None = None, *,
               budget_bytes: float, tail: torch.nn.Module | None = None) -> Plan:
    """The plan with least recompute FLOPs whose predicted peak fits budget_bytes for a
    model's chain of layers, called on an input like x (args and kwargs passed to every
    layer) and followed by tail (a final norm, say) if given; the layers' costs are
    measured on meta copies (layer_costs, tail_cost). The "budget" policy plans with it
    (ckpt_attn.checkpointing.use_planner)."""
    costs = layer_costs(layers, x, *args, **(kwargs or {}))
    base, base_transient = tail_cost(tail, x) if tail is not None else (0, 0)
    return plan_layers(costs, budget_bytes, base, base_transient)
