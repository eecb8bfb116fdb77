"""Plumbing of benchmarks/bench_policies.py at tiny shapes: every eager policy row has
measured bytes that agree with the estimate, torch's solver rows exist for every
budget, HF's checkpointing and ours recompute alike, and the results are written.
No timing is asserted."""

import csv

import pytest
import torch

from ckpt_attn.benchmarks import bench_policies
from ckpt_attn.benchmarks.policy_cases import SMOKE_SHAPES
from ckpt_attn.benchmarks.policy_measure import allocator_memory
from ckpt_attn.benchmarks.policy_report import write_results
from ckpt_attn.checkpointing import POLICIES

TINY = SMOKE_SHAPES


def agree(predicted, measured):
    assert predicted is not None and measured is not None
    assert abs(predicted - measured) <= 0.01 * max(measured, 1), (predicted, measured)


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("transformers")
    return bench_policies.run(TINY, torch.device("cpu"), progress=False)


def test_every_policy_runs_eagerly_and_its_bytes_agree_with_the_estimate(results):
    rows, _ = results
    eager = [r for r in rows if r.family == "eager"]
    assert {r.policy for r in eager} == set(POLICIES)
    assert {r.storage for r in eager} == {"device", "int8", "fp8"}
    for row in eager:
        assert not row.error, row
        agree(row.kept_estimate, row.kept_bytes)
        agree(row.peak_estimate, row.peak_bytes)
        agree(row.recompute_estimate, row.recompute_flops)
        assert row.allocator_peak >= row.allocator_kept > 0
        assert row.step_ms > 0 and row.step_ratio > 0
    none = next(r for r in eager if r.policy == "none")
    full = next(r for r in eager if r.policy == "full" and r.storage == "device")
    for row in eager:  # each ratio is its measured time over none's
        assert row.step_ratio == pytest.approx(row.step_ms / none.step_ms, rel=1e-9)
    assert none.checkpointed == 0.0 and full.checkpointed == 1.0
    assert full.peak_bytes < none.peak_bytes and full.recompute_flops > 0


def test_torch_solver_rows_exist_for_every_budget(results):
    rows, _ = results
    solver = [r for r in rows if r.family == "compiled" and r.policy == "none"]
    assert [r.memory_budget for r in solver] == list(TINY.torch_budgets)
    for row in solver:
        # a compiled case that fails records why; one that runs has every figure
        assert row.error or (row.allocator_peak > 0 and row.recompute_flops is not None
                             and row.step_ms > 0)
    default, lowest = solver
    if not default.error:
        assert default.recompute_flops == 0  # the zero point of the compiled family
    if not (default.error or lowest.error):
        assert lowest.allocator_kept <= default.allocator_kept


def test_hf_checkpointing_and_ours_recompute_the_same(results):
    rows, context = results
    hf = {r.label: r for r in rows if r.family == "hf"}
    assert {"none", "hf-gc", "full", "sqrt"} <= set(hf)
    assert len(context["hf_budgets"]) == 2
    for row in hf.values():
        assert not row.error or row.error.startswith(("estimate:", "ValueError: budget_bytes"))
    assert hf["hf-gc"].recompute_flops == hf["full"].recompute_flops > 0
    assert hf["hf-gc"].kept_bytes == hf["full"].kept_bytes < hf["none"].kept_bytes


def test_results_are_written(results, tmp_path):
    rows, context = results
    text = write_results(rows, dict(context, seconds=1.0), tmp_path)
    assert (tmp_path / "policies.md").read_text() == text
    for section in ("## Every policy, eager", "## torch.compile", "## Hugging Face Llama",
                    "## At matched memory", "## The chapter's arithmetic"):
        assert section in text
    with (tmp_path / "policies.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    assert (tmp_path / "policies.png").stat().st_size > 0


def test_allocator_memory_sees_what_autograd_keeps():
    x = torch.randn(2**18, requires_grad=True)  # 1 MiB
    memory = allocator_memory(lambda: x.exp().sum(), torch.device("cpu"))
    # exp keeps its 1 MiB output; the backward adds the gradient of exp's input
    assert 2**20 <= memory.kept_bytes < 2**20 + 1024
    assert memory.peak_bytes >= 2 * 2**20
