"""ckpt_attn.memory: estimate() against measure() on a grid of configurations and every
policy (meta device), measure() against an independent saved_tensors_hooks count and
under FakeTensorMode, the 7B stack measured in seconds, the naive-attention terms
against a measured naive layer, the planner against brute force, and a budget plan
measured within its budget."""

from __future__ import annotations

import itertools
import random
import time

import pytest
import torch
from saved_bytes import saved_bytes
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import ckpt_attn
from ckpt_attn import apply_checkpointing
from ckpt_attn.checkpointing import Segment
from ckpt_attn.memory import (
    LayerCost,
    estimate,
    layer_costs,
    measure,
    min_peak,
    plan,
    plan_cost,
    plan_layers,
)
from ckpt_attn.memory.planner import segment_cost
from ckpt_attn.modules import transformer

POLICIES = [("none", {}), ("full", {}), ("uniform", {"every": 2}), ("sqrt", {}),
            ("ratio", {"ratio": 0.4}), ("selective", {})]
GRID = list(itertools.product(["swiglu", "gelu"], ["rmsnorm", "layernorm"], [0.0, 0.1], [4, 1],
                              [torch.float32, torch.bfloat16]))
WORST = {}  # the largest relative disagreement seen, per quantity (printed by the last test)


def meta_model(cfg, dtype):
    with torch.device("meta"):
        return ckpt_attn.Transformer(cfg).to(dtype)


def agree(what, predicted, measured):
    error = abs(predicted - measured) / max(measured, 1)
    WORST[what] = max(WORST.get(what, 0.0), error)
    assert error <= 0.01, f"{what}: estimate {predicted} vs measure {measured}"


@pytest.mark.parametrize("mlp, norm, dropout, kv_heads, dtype", GRID,
                         ids=["-".join(map(str, c)).replace("torch.", "") for c in GRID])
def test_estimate_agrees_with_measure(mlp, norm, dropout, kv_heads, dtype):
    cfg = ckpt_attn.TransformerConfig(num_layers=5, hidden_size=128, num_heads=4,
                                      num_kv_heads=kv_heads, mlp=mlp, norm=norm, dropout=dropout,
                                      bias=norm == "layernorm")
    model = meta_model(cfg, dtype)
    x = torch.empty(2, 96, 128, device="meta", dtype=dtype)
    for policy, options in POLICIES:
        apply_checkpointing(model, policy, **options)
        run = measure(model, x)
        predicted = estimate(cfg, batch=2, seq=96, policy=policy, dtype=dtype, **options)
        agree("kept", predicted.kept_bytes, run.kept_bytes)
        agree("peak", predicted.peak_bytes, run.peak_bytes)
        agree("recompute", predicted.recompute_flops, run.recompute_flops)
        agree("step", predicted.step_flops, run.total_flops - run.recompute_flops)


@pytest.mark.parametrize("storage", ["int8", "fp8"])
@pytest.mark.parametrize("policy, options", [("full", {}), ("sqrt", {})])
def test_estimate_quantized_storage(storage, policy, options):
    cfg = ckpt_attn.TransformerConfig(num_layers=4, hidden_size=128, num_heads=4)
    model = meta_model(cfg, torch.bfloat16)
    apply_checkpointing(model, policy, storage=storage, **options)
    run = measure(model, torch.empty(2, 64, 128, device="meta", dtype=torch.bfloat16))
    predicted = estimate(cfg, batch=2, seq=64, policy=policy, storage=storage, **options)
    agree("kept", predicted.kept_bytes, run.kept_bytes)
    agree("peak", predicted.peak_bytes, run.peak_bytes)


def assert_exact(cfg, dtype, policy, storage="device", batch=2, seq=64, **options):
    """estimate() equals measure() to the byte (and FLOP) for Transformer(cfg)."""
    model = meta_model(cfg, dtype)
    apply_checkpointing(model, policy, storage=storage, **options)
    run = measure(model, torch.empty(batch, seq, cfg.hidden_size, device="meta", dtype=dtype))
    predicted = estimate(cfg, batch=batch, seq=seq, policy=policy, storage=storage,
                         dtype=dtype, **options)
    assert (predicted.kept_bytes, predicted.peak_bytes, predicted.recompute_flops) == \
        (run.kept_bytes, run.peak_bytes, run.recompute_flops), (policy, storage, options)


@pytest.mark.parametrize("storage", ["int8", "fp8"])
@pytest.mark.parametrize("layers, policy, options", [
    (4, "ratio", {"ratio": 0.5}), (6, "budget", {"budget_bytes": None}),
    (4, "uniform", {"every": 3}), (5, "sqrt", {}), (3, "ratio", {"ratio": 1e-12}),
])
def test_quantized_storage_is_exact_on_mixed_and_unequal_plans(storage, layers, policy,
                                                                options):
    """The dequantized input comes back in its own segment's backward: the peak walks the
    segments (it was off by +32,768 bytes with "none" segments after the recomputed
    ones, and -15,872 with groups of unequal length)."""
    cfg = ckpt_attn.TransformerConfig(num_layers=layers, hidden_size=128, num_heads=4)
    if policy == "budget":  # half the peak of "none"
        options = {"budget_bytes": estimate(cfg, batch=2, seq=64).peak_bytes // 2}
    assert_exact(cfg, torch.bfloat16, policy, storage, **options)


@pytest.mark.parametrize("policy, storage", [("none", "device"), ("full", "device"),
                                             ("selective", "device"), ("full", "int8"),
                                             ("sqrt", "fp8")])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_float64_statistics_are_float64(policy, storage, norm):
    """The norms' and attention's row statistics of float64 activations are float64, and
    so is the row maximum int8/fp8 keep per token."""
    cfg = ckpt_attn.TransformerConfig(num_layers=4, hidden_size=128, num_heads=4, norm=norm)
    assert_exact(cfg, torch.float64, policy, storage)


def test_estimate_budget_policy_agrees_with_measure():
    cfg = ckpt_attn.TransformerConfig(num_layers=6, hidden_size=128, num_heads=4)
    model = meta_model(cfg, torch.bfloat16)
    x = torch.empty(2, 64, 128, device="meta", dtype=torch.bfloat16)
    none = estimate(cfg, batch=2, seq=64, policy="none")
    budget = none.peak_bytes // 2
    apply_checkpointing(model, "budget", budget_bytes=budget)
    run = measure(model, x)
    predicted = estimate(cfg, batch=2, seq=64, policy="budget", budget_bytes=budget)
    assert run.peak_bytes <= budget
    agree("peak", predicted.peak_bytes, run.peak_bytes)
    agree("recompute", predicted.recompute_flops, run.recompute_flops)


def test_cpu_offload_estimate_moves_kept_bytes_to_host():
    cfg = ckpt_attn.TransformerConfig(num_layers=4, hidden_size=128, num_heads=4)
    device = estimate(cfg, batch=2, seq=64, policy="none")
    offload = estimate(cfg, batch=2, seq=64, policy="none", storage="cpu")
    final_norm = 2 * 64 * 128 * 2 + 2 * 64 * 4
    assert offload.kept_bytes == final_norm
    assert offload.offloaded_bytes == device.kept_bytes - final_norm
    assert offload.peak_bytes < device.peak_bytes


# --- measure itself -------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["none", "full", "sqrt", "ratio"])
def test_measure_matches_saved_tensors_hooks(policy):
    torch.manual_seed(0)
    cfg = ckpt_attn.TransformerConfig(num_layers=4, hidden_size=64, num_heads=4, dropout=0.1,
                                      backend="torch")
    model = ckpt_attn.Transformer(cfg)
    apply_checkpointing(model, policy, **({"ratio": 0.5} if policy == "ratio" else {}))
    x = torch.randn(2, 17, 64, requires_grad=True)
    assert measure(model, x).kept_bytes == saved_bytes(model, x)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    apply_checkpointing(mlp, policy, **({"ratio": 0.5} if policy == "ratio" else {}))
    z = torch.randn(5, 16)
    assert measure(mlp, z).kept_bytes == saved_bytes(mlp, z)


def test_measure_flops_match_flop_counter_mode():
    torch.manual_seed(0)
    cfg = ckpt_attn.TransformerConfig(num_layers=3, hidden_size=64, num_heads=4, backend="torch")
    model = apply_checkpointing(ckpt_attn.Transformer(cfg), "full")
    x = torch.randn(2, 17, 64)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    run = measure(model, x)
    assert run.total_flops == counter.get_total_flops()
    assert [layer.forward_flops for layer in run.layers] == [run.forward_flops // 3] * 3
    assert sum(layer.recompute_flops for layer in run.layers) == run.recompute_flops


def test_measure_restores_gradients_and_works_under_fake_tensors():
    cfg = ckpt_attn.TransformerConfig(num_layers=2, hidden_size=64, num_heads=4, backend="torch")
    model = ckpt_attn.Transformer(cfg)
    x = torch.randn(2, 9, 64)
    assert all(p.grad is None for p in model.parameters())
    real = measure(model, x)
    assert all(p.grad is None for p in model.parameters())
    with FakeTensorMode():
        fake_model = ckpt_attn.Transformer(cfg)
        fake = measure(fake_model, torch.empty(2, 9, 64))
    assert (fake.kept_bytes, fake.peak_bytes, fake.total_flops) == \
        (real.kept_bytes, real.peak_bytes, real.total_flops)


def test_7b_stack_on_the_meta_device_in_seconds():
    cfg = ckpt_attn.TransformerConfig(num_layers=32, hidden_size=4096, num_heads=32)
    model = meta_model(cfg, torch.bfloat16)
    start = time.perf_counter()
    run = measure(model, torch.empty(4, 2048, 4096, device="meta", dtype=torch.bfloat16))
    assert time.perf_counter() - start < 60
    predicted = estimate(cfg, batch=4, seq=2048, policy="none")
    assert (run.kept_bytes, run.peak_bytes) == (predicted.kept_bytes, predicted.peak_bytes)
    assert run.kept_bytes == 40_401_666_048  # 37.63 GiB


def test_measure_bad_input():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        measure(lambda x: x, torch.randn(2))
    with pytest.raises(ValueError, match="requires grad"):
        measure(torch.nn.Identity(), torch.randn(2))


# --- naive attention, for comparison --------------------------------------------------

def naive_attention(q, k, v, attn_mask=None, dropout_p=0.0, causal=False, backend=None):
    """softmax(q k^T / sqrt(D)) v in plain PyTorch, GQA by repeat_interleave."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        seq = q.shape[2]
        scores = scores + torch.full((seq, seq), float("-inf"), dtype=q.dtype,
                                     device=q.device).triu(1)
    probs = transformer.dropout(scores.softmax(-1), dropout_p, dropout_p > 0)
    return probs @ v


@pytest.mark.parametrize("policy", ["none", "selective", "sqrt"])
@pytest.mark.parametrize("kv_heads, dropout", [(4, 0.0), (2, 0.1)])
def test_naive_attention_terms_match_a_measured_naive_layer(monkeypatch, policy, kv_heads,
                                                            dropout):
    cfg = ckpt_attn.TransformerConfig(num_layers=2, hidden_size=64, num_heads=4,
                                      num_kv_heads=kv_heads, dropout=dropout)
    model = apply_checkpointing(meta_model(cfg, torch.bfloat16), policy)
    predicted = estimate(cfg, batch=2, seq=48, policy=policy).naive_kept_bytes
    monkeypatch.setattr(transformer, "attention", naive_attention)
    run = measure(model, torch.empty(2, 48, 64, device="meta", dtype=torch.bfloat16))
    assert run.kept_bytes == predicted


# --- the planner ----------------------------------------------------------------------

def all_plans(n, start=0):
    """Every plan of layers start..n-1."""
    if start == n:
        yield []
        return
    for stop in range(start + 1, n + 1):
        modes = ["none", "selective", "full"] if stop - start == 1 else ["full"]
        for mode in modes:
            for rest in all_plans(n, stop):
                yield [Segment(start, stop, mode), *rest]


def random_costs(rng, n):
    costs = []
    for _ in range(n):
        input_bytes = rng.randint(1, 10)
        kept_none = input_bytes + rng.randint(10, 60)
        forward = rng.randint(10, 100)
        costs.append(LayerCost(
            input_bytes=input_bytes, kept_none_bytes=kept_none,
            kept_selective_bytes=rng.randint(input_bytes, kept_none),
            forward_flops=forward, backward_flops=2 * forward,
            recompute_full_flops=rng.randint(forward // 2, forward),
            recompute_selective_flops=rng.randint(0, forward // 4),
            transient_none_bytes=rng.randint(1, 20), transient_full_bytes=rng.randint(20, 80),
            transient_selective_bytes=rng.randint(5, 40)))
    return costs


@pytest.mark.parametrize("seed", range(12))
def test_planner_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 6)
    costs = random_costs(rng, n)
    base, base_transient = rng.randint(0, 20), rng.randint(0, 30)
    plans = [plan_cost(costs, p, base, base_transient) for p in all_plans(n)]
    assert min_peak(costs, base, base_transient) == min(p.peak_bytes for p in plans)
    lowest, highest = min(p.peak_bytes for p in plans), max(p.peak_bytes for p in plans)
    for budget in sorted({lowest, highest, *rng.sample(range(lowest, highest + 1),
                                                      min(5, highest - lowest + 1))}):
        fitting = [p for p in plans if p.peak_bytes <= budget]
        best = min(fitting, key=lambda p: (p.recompute_flops, p.peak_bytes))
        chosen = plan_layers(costs, budget, base, base_transient)
        # least recompute is exact; among equal-recompute plans the peak is not minimized
        assert chosen.recompute_flops == best.recompute_flops
        assert chosen.peak_bytes <= budget
    with pytest.raises(ValueError, match=f"smallest peak.*\\({lowest} bytes\\)"):
        plan_layers(costs, lowest - 1, base, base_transient)


def test_planner_is_fast_on_a_deep_heterogeneous_chain():
    costs = random_costs(random.Random(0), 80)
    start = time.perf_counter()
    floor = min_peak(costs)
    chosen = plan_layers(costs, floor * 1.5)
    assert chosen.peak_bytes <= floor * 1.5
    assert time.perf_counter() - start < 30


def least_recompute(costs, budget, base, base_transient):
    """The least recompute of a plan that fits budget, or None: a dynamic program over
    every kept byte count of every prefix (no Pareto pruning), each segment costed by
    segment_cost."""
    plans = [{0: 0}]  # per prefix: kept bytes -> least recompute of its plans that fit
    for stop in range(1, len(costs) + 1):
        best = {}
        for start in range(stop):
            for mode in ["none", "selective", "full"] if stop - start == 1 else ["full"]:
                seg_kept, seg_recompute, transient = segment_cost(costs,
                                                                  Segment(start, stop, mode))
                for kept, recompute in plans[start].items():
                    total = recompute + seg_recompute
                    if kept + seg_kept + transient <= budget \
                            and total < best.get(kept + seg_kept, total + 1):
                        best[kept + seg_kept] = total
        plans.append(best)
    return min((recompute for kept, recompute in plans[-1].items()
                if base + kept + base_transient <= budget), default=None)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("equal_layers", [False, True])
def test_planner_matches_an_exhaustive_program_on_longer_chains(seed, equal_layers):
    rng = random.Random(seed)
    n = rng.randint(7, 40)
    costs = [random_costs(rng, 1)[0]] * n if equal_layers else random_costs(rng, n)
    base, base_transient = rng.randint(0, 20), rng.randint(0, 30)
    floor = min_peak(costs, base, base_transient)
    assert least_recompute(costs, floor, base, base_transient) is not None
    assert least_recompute(costs, floor - 1, base, base_transient) is None
    ceiling = plan_cost(costs, [Segment(i, i + 1, "none") for i in range(n)], base,
                        base_transient).peak_bytes
    for budget in sorted({floor, ceiling, *rng.sample(range(floor, ceiling + 1), 6)}):
        chosen = plan_layers(costs, budget, base, base_transient)
        assert chosen.recompute_flops == least_recompute(costs, budget, base, base_transient)
        assert chosen.peak_bytes <= budget


def test_planner_plans_256_layers_in_bounded_time():
    cfg = ckpt_attn.TransformerConfig(num_layers=256, hidden_size=8192, num_heads=64,
                                      num_kv_heads=8, ffn_hidden_size=28672)
    none, full = (estimate(cfg, batch=1, seq=4096, policy=p) for p in ("none", "full"))
    start = time.perf_counter()
    for fraction in (0.1, 0.3, 0.6, 1.0):
        budget = int(full.peak_bytes + fraction * (none.peak_bytes - full.peak_bytes))
        assert plan(cfg, batch=1, seq=4096, budget_bytes=budget).peak_bytes <= budget
    with pytest.raises(ValueError, match="smallest peak"):
        plan(cfg, batch=1, seq=4096, budget_bytes=2**30)
    assert time.perf_counter() - start < 60


def test_budget_plan_fits_when_measured():
    torch.manual_seed(0)
    cfg = ckpt_attn.TransformerConfig(num_layers=6, hidden_size=64, num_heads=4, dropout=0.1,
                                      backend="torch")
    model = ckpt_attn.Transformer(cfg)
    x = torch.randn(2, 33, 64)
    costs = layer_costs(model.layers, x)
    floor, ceiling = min_peak(costs), measure(model, x).peak_bytes
    recomputes = []
    for fraction in (0.0, 0.3, 0.6, 1.0):
        budget = int(floor + fraction * (ceiling - floor)) + 50_000  # the final norm's share
        apply_checkpointing(model, "budget", budget_bytes=budget)
        run = measure(model, x)
        assert run.peak_bytes <= budget
        recomputes.append(run.recompute_flops)
    assert recomputes == sorted(recomputes, reverse=True) and recomputes[-1] == 0


def test_plan_for_a_config_and_reports():
    cfg = ckpt_attn.TransformerConfig(num_layers=32, hidden_size=4096, num_heads=32)
    chosen = plan(cfg, batch=4, seq=2048, budget_bytes=8 * 2**30)
    assert chosen.peak_bytes <= 8 * 2**30 and chosen.recompute_flops > 0
    assert "GiB" in str(chosen) and "full[0]" in str(chosen)
    assert chosen.to_dict()["segments"][0] == {"start": 0, "stop": 1, "mode": "full"}
    predicted = estimate(cfg, batch=4, seq=2048, policy="full")
    assert "kept_bytes=2.06 GiB" in str(predicted)
    assert predicted.to_dict()["layer_terms"][0]["name"] == "attn_norm input"
    with pytest.raises(ValueError, match="budget_bytes"):
        plan(cfg, batch=4, seq=2048, budget_bytes=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch=0, seq=8), "batch"), (dict(batch=1, seq=10**6), "max_seq_len"),
    (dict(batch=1, seq=8, storage="disk"), "storage"),
    (dict(batch=1, seq=8, policy="nope"), "policy"),
    (dict(batch=1, seq=8, storage="int8"), "does not apply"),
    (dict(batch=1, seq=8, dtype=torch.int8), "dtype must be a floating dtype"),
    (dict(batch=1, seq=8, dtype=torch.complex64), "dtype must be a floating dtype"),
    (dict(batch=1, seq=8, dtype="bf16"), "dtype must be one of 'float16', 'bfloat16'"),
    (dict(batch=10**30, seq=8), r"batch \(10{30}\) \* seq \(8\) is too large"),
])
def test_estimate_bad_input(kwargs, match):
    cfg = ckpt_attn.TransformerConfig(num_layers=2, hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match=match):
        estimate(cfg, **kwargs)
    if "dtype" in kwargs:
        with pytest.raises(ValueError, match=match):
            plan(cfg, batch=1, seq=8, budget_bytes=2**30, dtype=kwargs["dtype"])


@pytest.mark.parametrize("dtype", [None, 16, torch.float32.itemsize * 1.0])
def test_estimate_dtype_of_another_type(dtype):
    cfg = ckpt_attn.TransformerConfig(num_layers=2, hidden_size=64, num_heads=4)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        estimate(cfg, batch=1, seq=8, dtype=dtype)


def test_estimate_takes_a_dtype_by_name():
    cfg = ckpt_attn.TransformerConfig(num_layers=2, hidden_size=64, num_heads=4)
    for name, dtype in (("bfloat16", torch.bfloat16), ("float64", torch.float64)):
        assert estimate(cfg, batch=1, seq=8, dtype=name, policy="full") == \
            estimate(cfg, batch=1, seq=8, dtype=dtype, policy="full")
        assert plan(cfg, batch=1, seq=8, budget_bytes=2**30, dtype=name) == \
            plan(cfg, batch=1, seq=8, budget_bytes=2**30, dtype=dtype)


def test_estimate_answers_up_to_the_largest_tensor():
    """Up to the largest batch whose activations torch can hold, an answer; beyond it, a
    ValueError naming batch (not torch's C++ overflow)."""
    cfg = ckpt_attn.TransformerConfig(num_layers=2, hidden_size=64, num_heads=4)
    largest = 2**63 // (8 * 256 * 4)  # batch * seq * ffn float32 elements
    assert estimate(cfg, batch=largest - 1, seq=8, policy="full").peak_bytes > 2**63
    with pytest.raises(ValueError, match="batch"):
        estimate(cfg, batch=largest, seq=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_measure_reports_allocator_peak():
    cfg = ckpt_attn.TransformerConfig(num_layers=2, hidden_size=256, num_heads=4)
    model = ckpt_attn.Transformer(cfg).cuda().to(torch.bfloat16)
    run = measure(model, torch.randn(2, 256, 256, device="cuda", dtype=torch.bfloat16))
    assert run.cuda_max_allocated >= run.peak_bytes


def test_largest_disagreement_seen():
    """Prints the largest estimate/measure disagreement of this run (all within 1%)."""
    print({what: f"{error:.4%}" for what, error in WORST.items()})
    assert all(error <= 0.01 for error in WORST.values())


class RefusesDeepcopy(torch.nn.Sequential):
    """Like an FSDP2-sharded module: copy.deepcopy raises."""

    def __deepcopy__(self, memo):
        raise RuntimeError("does not support deepcopy")


def test_budget_plans_layers_that_refuse_deepcopy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(RefusesDeepcopy(torch.nn.Linear(16, 64), torch.nn.GELU(),
                                                  torch.nn.Linear(64, 16)) for _ in range(4)))
    x = torch.randn(8, 16, requires_grad=True)
    none_peak = measure(model, x).peak_bytes
    reference = torch.autograd.grad(model(x).sum(), [x, *model.parameters()])
    apply_checkpointing(model, "budget", budget_bytes=0.7 * none_peak)
    got = torch.autograd.grad(model(x).sum(), [x, *model.parameters()])
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    run = measure(model, x)
    assert run.peak_bytes <= 0.7 * none_peak and run.recompute_flops > 0


class SdpaLayer(torch.nn.Module):
    """A residual attention layer on torch's scaled_dot_product_attention, its input
    scaled by a tensor the model makes once and passes to every layer (as Hugging Face
    passes rotary position embeddings)."""

    def __init__(self, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)

    def forward(self, x, position_scale):
        batch, seq, hidden = x.shape
        q, k, v = (self.qkv(x * position_scale)  # (B, S, 3 * hidden)
                   .view(batch, seq, 3, self.heads, -1).permute(2, 0, 3, 1, 4))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + o.transpose(1, 2).reshape(batch, seq, hidden)  # (B, S, hidden)


class SdpaStack(torch.nn.Module):
    def __init__(self, num_layers: int = 3):
        super().__init__()
        self.layers = torch.nn.ModuleList(SdpaLayer() for _ in range(num_layers))

    def forward(self, x, position_scale):
        for layer in self.layers:
            x = layer(x, position_scale)
        return x


def test_layer_costs_of_sdpa_layers_match_what_they_keep():
    """The planner's per-layer kept bytes equal what each layer keeps when it runs: on
    the CPU, scaled_dot_product_attention runs a fused kernel that keeps no S x S
    probabilities (the meta device's math path would), and an argument every layer
    shares is not one layer's cost."""
    torch.manual_seed(0)
    model = SdpaStack()
    x, position_scale = torch.randn(2, 64, 32), torch.randn(2, 64, 32)
    run = measure(model, x, position_scale)
    costs = layer_costs(model.layers, x, position_scale)
    # measure gives a layer's input to the layer (or caller) that made it; a LayerCost
    # counts what the layer keeps of its input too (here all of it, for x * scale)
    assert [c.kept_none_bytes for c in costs] == [m.kept_bytes + c.input_bytes
                                                  for c, m in zip(costs, run.layers, strict=True)]
    probabilities = 2 * 4 * 64 * 64 * 4  # (B, H, S, S) fp32
    assert costs[0].kept_none_bytes < probabilities
