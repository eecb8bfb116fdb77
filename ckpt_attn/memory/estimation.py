"""estimate(): the analytic activation-memory model of a TransformerConfig.

Every tensor a ckpt_attn.TransformerLayer keeps for its backward is a term below,
with the reason autograd keeps it; a policy keeps all of them ("none"), only the
layer's input ("full", "uniform", "sqrt": one input per group), or the matmul and
attention outputs ("selective"). Notation: T = batch * seq tokens, h = hidden, g =
kv heads * head dim, f = ffn hidden, H = heads, b = bytes per element.

The transient terms of the peak (what a segment's backward brings back, gradients
in flight) come from running one layer on the meta device (ckpt_attn.memory.
layer_costs), and the chain is combined with the same model plan_layers uses.

Under context parallelism of degree P (ckpt_attn.distributed) every term is per token
and each rank holds seq / P tokens, so a rank keeps exactly the figures of seq / P;
its peak adds the ring's buffers, alive inside attention's backward
(ckpt_attn.distributed.ring_buffer_bytes), and its attention FLOPs are those of its
queries against every key (zigzag's balanced share, 1/P of the full attention).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..checkpointing.policies import get_policy
from ..distributed.costs import ring_buffer_bytes
from ..distributed.schedule import rank_pairs
from ..modules.config import TransformerConfig
from ..modules.transformer import TransformerLayer, make_norm
from ..ops import visible_pairs
from ..validation import FLOAT_DTYPES
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
DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in FLOAT_DTYPES}
"""The dtypes estimate() and plan() take by name: "float16", "bfloat16", "float32",
"float64" (as torch names them)."""
MAX_TENSOR_BYTES = 2**63 - 1
"""torch's limit on one tensor's bytes (an int64)."""


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
    context_parallel: the degree P; every figure is then one rank's (its seq / P
    tokens), and peak_bytes includes ring_buffer_bytes, the ring's buffers during
    attention's backward (0 when P is 1).
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
    context_parallel: int = 1
    ring_buffer_bytes: int = 0


def layer_terms(cfg: TransformerConfig, batch: int, seq: int, dtype: torch.dtype,
                training: bool = True) -> list[Term]:
    """What one TransformerLayer keeps with no checkpointing, tensor by tensor (dtype: a
    floating torch.dtype or its name, as estimate takes it)."""
    dtype = check_dtype(dtype)
    tokens, b = batch * seq, dtype.itemsize
    h, g, f = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.ffn_hidden_size
    # the norms' and attention's row statistics: float32, float64 for float64
    stat_dtype = _statistics_dtype(dtype)
    stat, stat_name = stat_dtype.itemsize, str(stat_dtype).removeprefix("torch.")
    stats = stat * tokens * (1 if cfg.norm == "rmsnorm" else 2)
    stats_why = f"{stat_name} rstd per token" if cfg.norm == "rmsnorm" \
        else f"{stat_name} mean and rstd"
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
                      Term("row max and log row sum", tokens * cfg.num_heads * 2 * stat,
                           f"{stat_name}, attention backward recomputes P from them")]
            if cfg.dropout > 0 and training:
                terms.append(Term("attention dropout seed", 8,
                                  "int64, attention backward regenerates the mask from it"))
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
                          training: bool = True, keys: int | None = None) -> list[Term]:
    """The extra (or, negative, saved) bytes per layer with naive attention of seq queries
    over `keys` keys (default seq; a naive ring keeps every step's block: all keys)."""
    dtype = check_dtype(dtype)
    b, heads, tokens = dtype.itemsize, cfg.num_heads, batch * seq
    square = batch * heads * seq * (seq if keys is None else keys)
    stat = _statistics_dtype(dtype).itemsize
    terms = [Term("softmax output P", square * b, "P @ v's backward and softmax's backward"),
             Term("row statistics (not kept)", -tokens * heads * 2 * stat,
                  "naive keeps P instead")]
    if cfg.num_kv_heads != cfg.num_heads:
        repeated = 2 * tokens * (cfg.num_heads - cfg.num_kv_heads) * cfg.head_dim * b
        terms.append(Term("k, v repeated per query head", repeated, "GQA by repeat_interleave"))
    if cfg.dropout > 0 and training:
        terms += [Term("attention dropout seed (not kept)", -8, "naive keeps the mask instead"),
                  Term("dropout mask", square, "bool keep-mask"),
                  Term("dropped P", square * b, "P @ v's backward")]
    return terms


def estimate(cfg: TransformerConfig, *, batch: int, seq: int, policy: str = "none",
             dtype: torch.dtype | str = torch.bfloat16, storage: str = "device",
             context_parallel: int = 1, **policy_options) -> Estimate:
    """Predict what one training step of Transformer(cfg) keeps and peaks at (on each
    rank, under context parallelism).

    Args:
        cfg: the model's TransformerConfig.
        batch, seq: the input's batch size and (full) sequence length.
        policy, storage, **policy_options: as in ckpt_attn.apply_checkpointing
            (every=, ratio=, budget_bytes=).
        dtype: the model's and activations' dtype: torch.float16, bfloat16, float32 or
            float64, or its name ("bfloat16"; see DTYPE_NAMES).
        context_parallel: the number of ranks the sequence is sharded over
            (ckpt_attn.distributed, zigzag layout); seq must be a multiple of it, and of
            2 * context_parallel when it is more than 1.

    Bad arguments raise a ValueError or TypeError naming them.
    """
    dtype = check_dtype(dtype)
    local = _local_seq(cfg, batch, seq, context_parallel, dtype)
    chosen = get_policy(policy, policy_options, storage)
    terms = layer_terms(cfg, batch, local, dtype)
    naive = naive_attention_terms(cfg, batch, local, dtype, keys=seq)
    costs, final_norm, norm_transient = _chain(cfg, batch, local, dtype, context_parallel)
    if chosen.planned:
        segments = plan_layers(costs, policy_options["budget_bytes"], final_norm,
                               norm_transient).segments
    else:
        segments = chosen.segments(cfg.num_layers, policy_options)
    plan = plan_cost(costs, segments, final_norm, norm_transient)
    # int8/fp8: a byte per element and each token's max|row| (float32, float64 for float64)
    quantized_input = batch * local * (cfg.hidden_size + _statistics_dtype(dtype).itemsize)
    kept, peak, offloaded = _stored(plan, costs, storage, final_norm, norm_transient,
                                    quantized_input)
    ring = _ring_bytes(cfg, batch, local, dtype, context_parallel)
    step_flops = cfg.num_layers * (costs[0].forward_flops + costs[0].backward_flops)
    # naive attention under "none" keeps its S^2 terms; under "selective" the scores,
    # a matmul output (softmax and dropout are recomputed)
    scores = terms_bytes(naive[:2])
    naive_extra = sum(terms_bytes(naive) if s.mode == "none" else
                      scores if s.mode == "selective" else 0 for s in plan.segments)
    return Estimate(policy=policy, storage=storage, kept_bytes=kept, offloaded_bytes=offloaded,
                    peak_bytes=peak + ring, recompute_flops=plan.recompute_flops,
                    step_flops=step_flops,
                    recompute_overhead=plan.recompute_flops / step_flops,
                    naive_kept_bytes=plan.kept_bytes + naive_extra,
                    layer_terms=terms, naive_terms=naive, context_parallel=context_parallel,
                    ring_buffer_bytes=ring)


def check_dtype(dtype) -> torch.dtype:
    """dtype as a torch.dtype: one of FLOAT_DTYPES, given as itself or by its name
    (DTYPE_NAMES); a TypeError or ValueError naming dtype otherwise."""
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(map(repr, DTYPE_NAMES))} (or "
                             f"the torch.dtype of that name), got {dtype!r}")
        return DTYPE_NAMES[dtype]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (torch.float16, torch.bfloat16, "
                        f"torch.float32 or torch.float64) or its name, got "
                        f"{type(dtype).__name__} {dtype!r}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be a floating dtype the layers run in, torch.float16, "
                         f"torch.bfloat16, torch.float32 or torch.float64, got {dtype}")
    return dtype


def _statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the norms' and attention's row statistics: float32, float64 for
    float64 activations."""
    return torch.promote_types(dtype, torch.float32)


def _local_seq(cfg: TransformerConfig, batch: int, seq: int, context_parallel: int,
               dtype: torch.dtype) -> int:
    """Check estimate's shape arguments; the tokens per rank, seq / context_parallel."""
    if not isinstance(cfg, TransformerConfig):
        raise TypeError(f"cfg must be a TransformerConfig, got {type(cfg).__name__}")
    for name, value in (("batch", batch), ("seq", seq), ("context_parallel", context_parallel)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if seq > cfg.max_seq_len:
        raise ValueError(f"seq ({seq}) exceeds cfg.max_seq_len ({cfg.max_seq_len})")
    if seq % context_parallel:
        raise ValueError(f"seq ({seq}) must be a multiple of context_parallel "
                         f"({context_parallel}): each rank holds seq / context_parallel tokens")
    if context_parallel > 1 and seq % (2 * context_parallel):
        raise ValueError(f"seq ({seq}) must be a multiple of 2 * context_parallel "
                         f"({2 * context_parallel}): the zigzag layout cuts the sequence into "
                         f"two chunks per rank")
    # the widest activation a layer makes, in its widest dtype (the norms compute in
    # float32 or float64), must be one torch tensor
    width = max(cfg.hidden_size, cfg.ffn_hidden_size)
    widest = batch * seq * width * _statistics_dtype(dtype).itemsize
    if widest > MAX_TENSOR_BYTES:
        raise ValueError(f"batch ({batch}) * seq ({seq}) is too large: a layer's activation "
                         f"of batch * seq * {width} elements would take {widest} bytes, more "
                         f"than one torch tensor holds (2**63 - 1)")
    return seq // context_parallel


def _ring_bytes(cfg: TransformerConfig, batch: int, local: int, dtype: torch.dtype,
                context_parallel: int) -> int:
    """The ring's buffers in attention's backward on one rank; 0 without a ring."""
    if context_parallel == 1:
        return 0
    return ring_buffer_bytes(batch, cfg.num_heads, cfg.num_kv_heads, local, cfg.head_dim,
                             dtype, context_parallel).backward


def _stored(plan, costs: list[LayerCost], storage: str, base: int, base_transient: int,
            quantized_input: int) -> tuple[int, int, int]:
    """(kept on device, peak on device, offloaded) of a plan under a storage mode."""
    if storage == "device":
        return plan.kept_bytes, plan.peak_bytes, 0
    if storage == "cpu":
        # everything the layers keep is in host memory; each segment's share comes back
        # to the device for its backward
        transient = plan.peak_bytes - plan.kept_bytes
        largest = max(segment_cost(costs, s)[0] for s in plan.segments)
        return base, base + largest + transient, plan.kept_bytes - base
    # int8 / fp8: a recomputed segment keeps its input quantized, and the dequantized
    # input is rebuilt on the device for its recomputation, on top of what its backward
    # brings back: plan_cost's walk with those two changes
    kept = peak = 0
    for segment in plan.segments:
        seg_kept, _, transient = segment_cost(costs, segment)
        if segment.mode == "full":
            seg_kept, transient = quantized_input, transient + seg_kept
        kept += seg_kept
        peak = max(peak, kept + transient)
    return base + kept, max(peak, base + kept + base_transient), 0


def terms_bytes(terms: list[Term]) -> int:
    """Total bytes of a list of terms."""
    return sum(t.bytes for t in terms)


def _chain(cfg: TransformerConfig, batch: int, seq: int, dtype: torch.dtype,
           context_parallel: int = 1):
    """([LayerCost] * num_layers, final norm kept bytes, final norm transient bytes), for
    seq tokens per rank of context_parallel ranks."""
    cost, norm_transient = _measured(tuple(dataclasses.astuple(cfg)), batch, seq, dtype)
    terms = layer_terms(cfg, batch, seq, dtype)
    # a rank's attention sees every key of the full sequence, not only its own
    extra = _ring_extra_pairs(cfg, seq, context_parallel) * 2 * 2 * batch * cfg.num_heads \
        * cfg.head_dim
    cost = dataclasses.replace(cost, kept_none_bytes=terms_bytes(terms),
                               forward_flops=cost.forward_flops + extra,
                               backward_flops=cost.backward_flops + 5 * extra // 2,
                               recompute_full_flops=cost.recompute_full_flops + extra)
    return [cost] * cfg.num_layers, terms_bytes(terms[:2]), norm_transient


def _ring_extra_pairs(cfg: TransformerConfig, local: int, context_parallel: int) -> int:
    """The (query, key) pairs a rank of the ring computes (zigzag: the same on every rank)
    beyond those of attention over its own local tokens."""
    if context_parallel == 1:
        return 0
    ring = rank_pairs(0, context_parallel, local, cfg.causal, "zigzag")
    return ring - visible_pairs(local, local, cfg.causal)


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
         dtype: torch.dtype | str = torch.bfloat16, context_parallel: int = 1) -> Plan:
    """The checkpoint plan for Transformer(cfg) with least recompute FLOPs whose predicted
    peak fits budget_bytes (see plan_layers); ValueError with the minimum if none does.
    Under context parallelism the plan is one rank's, the budget also holding the ring's
    buffers (the plan's own peak_bytes leaves them out). The arguments are checked as
    estimate checks them (dtype: a torch.dtype or its name)."""
    dtype = check_dtype(dtype)
    estimate(cfg, batch=batch, seq=seq, dtype=dtype, context_parallel=context_parallel)
    get_policy("budget", {"budget_bytes": budget_bytes})
    local = seq // context_parallel
    costs, final_norm, norm_transient = _chain(cfg, batch, local, dtype, context_parallel)
    ring = _ring_bytes(cfg, batch, local, dtype, context_parallel)
    return plan_layers(costs, budget_bytes - ring, final_norm, norm_transient)


def plan_chain(layers, x: torch.Tensor, args: tuple = (), kwargs: dict | None = None, *,
               budget_bytes: float, tail: torch.nn.Module | None = None,
               from_shape: bool = False) -> Plan:
    """The plan with least recompute FLOPs whose predicted peak fits budget_bytes for a
    model's chain of layers, called on an input like x (args and kwargs passed to every
    layer) and followed by tail (a final norm, say) if given. The "budget" policy plans
    with it (ckpt_attn.checkpointing.use_planner).

    The layers and final norm of a ckpt_attn.Transformer (transformer_config) are costed
    by the closed-form model plan() uses, from x's shape and dtype alone (so x may be a
    fake tensor); other layers are measured on shape-only copies (layer_costs,
    tail_cost). Both give the same costs for a Transformer. from_shape=True (the budget
    policy planning while Dynamo traces) takes the closed form only: a RuntimeError if
    it does not apply."""
    kwargs = kwargs or {}
    cfg = transformer_config(layers, x, args, kwargs, tail)
    if cfg is not None:
        costs, base, base_transient = _chain(cfg, x.shape[0], x.shape[1], x.dtype)
        return plan_layers(costs, budget_bytes, base, base_transient)
    if from_shape:
        raise RuntimeError(f"policy 'budget' has no plan for an input of shape "
                           f"{tuple(x.shape)}, {x.dtype} on {x.device}, and the closed-form "
                           f"costs do not cover these layers as they are (see "
                           f"ckpt_attn.memory.estimation.transformer_config: autocast, eval "
                           f"mode with dropout, replaced or sharded modules), so they would "
                           f"be measured, which cannot be traced; run the model once in "
                           f"eager mode, with grad enabled, on that shape before "
                           f"torch.compile traces it, or pass inputs of that shape to "
                           f"apply_checkpointing as example_inputs=")
    costs = layer_costs(layers, x, *args, **kwargs)
    base, base_transient = tail_cost(tail, x) if tail is not None else (0, 0)
    return plan_layers(costs, budget_bytes, base, base_transient)


def transformer_config(layers, x: torch.Tensor, args: tuple, kwargs: dict,
                       tail: torch.nn.Module | None) -> TransformerConfig | None:
    """The TransformerConfig whose closed-form costs are exactly those of `layers` called
    on an input like x (with args, kwargs) and followed by tail, or None: layers built as
    TransformerLayer(cfg) builds them (the same module classes, plain parameters of x's
    dtype, none replaced by context parallelism, FSDP2 or tensor parallelism), in training
    mode unless cfg.dropout is 0, called with at most an attn_mask (which changes no
    cost) and followed by the final norm make_norm(cfg) builds, on an x of shape
    (batch, seq <= cfg.max_seq_len, hidden) outside autocast."""
    cfg = getattr(layers[0], "cfg", None) if len(layers) else None
    if not isinstance(cfg, TransformerConfig) or args or set(kwargs) - {"attn_mask"} \
            or x.dim() != 3 or x.shape[1] > cfg.max_seq_len or x.shape[2] != cfg.hidden_size \
            or x.dtype not in FLOAT_DTYPES or _autocast(x.device.type):
        return None
    layer_form, norm_form = _built_form(tuple(dataclasses.astuple(cfg)), x.dtype)
    if tail is None or _form(tail, x.dtype) != norm_form:
        return None
    for layer in layers:
        if type(layer) is not TransformerLayer or layer.cfg != cfg \
                or _form(layer, x.dtype) != layer_form:
            return None
        if cfg.dropout > 0 and not all(module.training for module in layer.modules()):
            return None
    return cfg


def _autocast(device_type: str) -> bool:
    """Whether autocast is on for the device type (never on one it does not serve: meta)."""
    return torch.amp.is_autocast_available(device_type) and \
        torch.is_autocast_enabled(device_type)


def _form(module: torch.nn.Module, dtype: torch.dtype):
    """What the closed-form model assumes of a module: its submodules' names and classes,
    and its parameters' names and shapes, or None if a parameter is not a plain tensor of
    dtype."""
    parameters = []
    for name, p in module.named_parameters():
        if type(p.data) is not torch.Tensor or p.dtype != dtype:
            return None
        parameters.append((name, tuple(p.shape)))
    return ([(name, type(m)) for name, m in module.named_modules()], parameters)


@functools.lru_cache(maxsize=64)
def _built_form(cfg_fields: tuple, dtype: torch.dtype):
    """_form of TransformerLayer(cfg) and of make_norm(cfg) as built, in dtype."""
    cfg = TransformerConfig(*cfg_fields)
    with torch.device("meta"):
        layer = TransformerLayer(cfg).to(dtype)
        norm = make_norm(cfg).to(dtype)
    return _form(layer, dtype), _form(norm, dtype)
