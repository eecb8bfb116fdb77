"""memory.estimate, memory.plan and the CLI under context parallelism: per-rank figures.

What they predict is checked against memory.measure on real ranks in
tests/test_context_parallel.py (kept bytes, FLOPs and peak, exactly); here, that the
per-rank figures are those of seq / P tokens plus the ring's stated buffers and FLOPs.
"""

import json

import pytest
import torch

from ckpt_attn import Transformer, apply_checkpointing
from ckpt_attn.cli import main
from ckpt_attn.distributed import ring_buffer_bytes
from ckpt_attn.memory import estimate, measure, plan
from ckpt_attn.modules.config import TransformerConfig

CFG = TransformerConfig(num_layers=3, hidden_size=128, num_heads=4, num_kv_heads=2,
                        max_seq_len=4096)
POLICIES = [("none", {}), ("full", {}), ("selective", {}), ("uniform", {"every": 2})]


@pytest.mark.parametrize(("policy", "options"), POLICIES)
def test_per_rank_estimate_is_the_shards_plus_the_ring(policy, options):
    """P ranks: kept is that of seq / P exactly, the peak adds the ring's backward buffers,
    and the attention FLOPs are the rank's queries against every key (1/P of the whole
    causal attention, zigzag's balanced share)."""
    seq, ranks, batch = 1024, 4, 2
    per_rank = estimate(CFG, batch=batch, seq=seq, policy=policy, context_parallel=ranks,
                        **options)
    shard = estimate(CFG, batch=batch, seq=seq // ranks, policy=policy, **options)
    whole = estimate(CFG, batch=batch, seq=seq, policy=policy, **options)
    ring = ring_buffer_bytes(batch, 4, 2, seq // ranks, 32, torch.bfloat16, ranks).backward
    assert per_rank.kept_bytes == shard.kept_bytes
    assert per_rank.kept_bytes * ranks == whole.kept_bytes
    assert (per_rank.ring_buffer_bytes, per_rank.context_parallel) == (ring, ranks)
    assert per_rank.peak_bytes == shard.peak_bytes + ring
    # attention FLOPs per layer (forward 4 B H D pairs, backward 2.5 times that)
    attention = lambda pairs: 3.5 * 4 * batch * 4 * 32 * pairs
    local = seq // ranks
    expected = shard.step_flops + CFG.num_layers * attention(
        seq * (seq + 1) // 2 // ranks - local * (local + 1) // 2)
    assert per_rank.step_flops == expected
    linear = whole.step_flops - CFG.num_layers * attention(seq * (seq + 1) // 2)
    assert per_rank.step_flops * ranks == whole.step_flops  # every term splits evenly
    assert linear > 0


@pytest.mark.parametrize(("policy", "options"), POLICIES)
def test_one_rank_is_what_a_single_device_measures(policy, options):
    """context_parallel=1: no ring buffers, and kept, peak and FLOPs are what
    memory.measure finds on one device running the model."""
    with torch.device("meta"):
        model = Transformer(CFG).to(torch.bfloat16)
    apply_checkpointing(model, policy, **options)
    run = measure(model, torch.empty(2, 256, 128, device="meta", dtype=torch.bfloat16))
    one = estimate(CFG, batch=2, seq=256, policy=policy, context_parallel=1, **options)
    assert (one.ring_buffer_bytes, one.context_parallel) == (0, 1)
    assert (one.kept_bytes, one.peak_bytes) == (run.kept_bytes, run.peak_bytes)
    assert (one.recompute_flops, one.step_flops) == (
        run.recompute_flops, run.total_flops - run.recompute_flops)


def test_naive_ring_keeps_each_step_block():
    """naive_kept_bytes under P ranks: the probabilities of the shard's queries against
    every key (P blocks of (S/P)^2), P times less than one device's S^2."""
    whole = estimate(CFG, batch=1, seq=512, policy="none")
    per_rank = estimate(CFG, batch=1, seq=512, policy="none", context_parallel=4)
    square = lambda queries: CFG.num_layers * 4 * queries * 512 * 2  # bf16 P
    assert whole.naive_kept_bytes - whole.kept_bytes - square(512) == 4 * (
        per_rank.naive_kept_bytes - per_rank.kept_bytes - square(128))


@pytest.mark.parametrize(("value", "message"), [
    (3, "seq \\(1024\\) must be a multiple of context_parallel \\(3\\)"),
    (1024, "seq \\(1024\\) must be a multiple of 2 \\* context_parallel \\(2048\\)"),
    (0, "context_parallel must be a positive int, got 0"),
    (True, "context_parallel must be a positive int, got True"),
])
def test_bad_degree_is_refused(value, message):
    with pytest.raises(ValueError, match=message):
        estimate(CFG, batch=1, seq=1024, context_parallel=value)


def test_plan_fits_the_budget_with_the_ring():
    """A per-rank plan leaves room for the ring's buffers in the budget; a budget the
    ring's buffers alone fill is refused."""
    none = estimate(CFG, batch=1, seq=1024, policy="none", context_parallel=4)
    ring = none.ring_buffer_bytes
    for budget in (none.peak_bytes, none.peak_bytes * 3 // 4, none.peak_bytes // 2):
        best = plan(CFG, batch=1, seq=1024, budget_bytes=budget, context_parallel=4)
        assert best.peak_bytes + ring <= budget
    with pytest.raises(ValueError):
        plan(CFG, batch=1, seq=1024, budget_bytes=ring, context_parallel=4)


def test_cli_reports_per_rank_figures(capsys):
    args = ["--layers", "3", "--hidden", "128", "--heads", "4", "--kv-heads", "2",
            "--seq", "1024"]
    assert main(["estimate", *args, "--context-parallel", "4", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    expected = estimate(CFG, batch=1, seq=1024, policy="none", context_parallel=4)
    assert entries[0]["kept_bytes"] == expected.kept_bytes
    assert entries[0]["ring_buffer_bytes"] == expected.ring_buffer_bytes > 0
    assert main(["estimate", *args, "--context-parallel", "4"]) == 0
    assert "context parallel 4: per rank (seq 256 each)" in capsys.readouterr().out
    assert main(["plan", *args, "--context-parallel", "4", "--budget", "1GiB"]) == 0
    assert "ring buffers" in capsys.readouterr().out


@pytest.mark.parametrize(("degree", "message"), [
    ("3", "--seq (1024) must be a multiple of --context-parallel (3)"),
    ("1024", "--seq (1024) must be a multiple of 2 * --context-parallel (2048)"),
    ("0", "--context-parallel must be a positive int, got 0"),
])
def test_cli_refuses_a_bad_degree(capsys, degree, message):
    args = ["estimate", "--layers", "3", "--hidden", "128", "--heads", "4", "--seq", "1024",
            "--context-parallel", degree]
    assert main(args) == 2
    assert message in capsys.readouterr().err
