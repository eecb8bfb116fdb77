"""Property test: estimate() equals measure() to the byte and the FLOP, on plans drawn by
hypothesis (meta device: nothing is allocated).

Drawn: the layer count (1..6), the policy and its options (uniform's every in 1..L,
ratio in (0, 1], budget anywhere from the least reachable peak to the peak of "none"),
every storage the policy takes but "cpu" (on the meta device nothing moves to the
host, so measure cannot see an offload), the dtype (float16, bfloat16, float32,
float64), and the model (SwiGLU or GELU, RMSNorm or LayerNorm, dropout 0 or 0.1, 4, 2 or
1 kv heads of 4). GRID_SIZE counts the cases, a budget counted once per layer count,
dtype, storage and model: 18,432 (some give the same segments: uniform with every=1
is full).

`make test` draws DEFAULT_EXAMPLES of them; CKPT_ATTN_MEMORY_EXAMPLES=N draws N.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt_attn
from ckpt_attn import apply_checkpointing
from ckpt_attn.checkpointing import POLICIES
from ckpt_attn.memory import estimate, layer_costs, measure, min_peak, tail_cost

DEFAULT_EXAMPLES = 8
MAX_LAYERS = 6
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MODELS = [dict(mlp=mlp, norm=norm, dropout=dropout, num_kv_heads=kv_heads)
          for mlp in ("swiglu", "gelu") for norm in ("rmsnorm", "layernorm")
          for dropout in (0.0, 0.1) for kv_heads in (4, 2, 1)]
BATCH, SEQ, HIDDEN = 2, 24, 64


def storages(policy: str) -> list[str]:
    """The storages the property draws for a policy: all it takes but "cpu"."""
    return [storage for storage in POLICIES[policy].storages if storage != "cpu"]


def plans(num_layers: int) -> int:
    """The distinct (policy, options) plans of num_layers layers: every of uniform in
    1..L, ratio's ceil(ratio * L) in 1..L, a budget once."""
    varied = {"uniform": num_layers, "ratio": num_layers}
    return sum(varied.get(name, 1) * len(storages(name)) for name in POLICIES)


GRID_SIZE = sum(plans(layers) for layers in range(1, MAX_LAYERS + 1)) * len(DTYPES) \
    * len(MODELS)


def examples() -> int:
    """Plans drawn: DEFAULT_EXAMPLES, or CKPT_ATTN_MEMORY_EXAMPLES when set."""
    return int(os.environ.get("CKPT_ATTN_MEMORY_EXAMPLES", DEFAULT_EXAMPLES))


@st.composite
def cases(draw):
    """(model, cfg, dtype, policy, storage, options) for one plan."""
    num_layers = draw(st.integers(1, MAX_LAYERS))
    cfg = ckpt_attn.TransformerConfig(num_layers=num_layers, hidden_size=HIDDEN, num_heads=4,
                                      bias=True, **draw(st.sampled_from(MODELS)))
    dtype = draw(st.sampled_from(DTYPES))
    policy = draw(st.sampled_from(sorted(POLICIES)))
    storage = draw(st.sampled_from(storages(policy)))
    options = {}
    if policy == "uniform":
        options["every"] = draw(st.integers(1, num_layers))
    elif policy == "ratio":
        options["ratio"] = draw(st.floats(0.0, 1.0, exclude_min=True))
    with torch.device("meta"):
        model = ckpt_attn.Transformer(cfg).to(dtype)
    if policy == "budget":
        x = torch.empty(BATCH, SEQ, HIDDEN, device="meta", dtype=dtype)
        low = min_peak(layer_costs(model.layers, x), *tail_cost(model.norm, x))
        high = estimate(cfg, batch=BATCH, seq=SEQ, dtype=dtype).peak_bytes
        options["budget_bytes"] = draw(st.integers(low, max(low, high)))
    return model, cfg, dtype, policy, storage, options


def test_grid_size():
    assert GRID_SIZE == 18_432


@settings(max_examples=examples(), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_estimate_equals_measure(case):
    model, cfg, dtype, policy, storage, options = case
    apply_checkpointing(model, policy, storage=storage, **options)
    run = measure(model, torch.empty(BATCH, SEQ, HIDDEN, device="meta", dtype=dtype))
    predicted = estimate(cfg, batch=BATCH, seq=SEQ, policy=policy, storage=storage,
                         dtype=dtype, **options)
    assert predicted.kept_bytes == run.kept_bytes
    assert predicted.peak_bytes == run.peak_bytes
    assert predicted.recompute_flops == run.recompute_flops
    assert predicted.step_flops == run.total_flops - run.recompute_flops
