"""Smoke tests of benchmarks/bench_attention.py: the CPU path at tiny sizes, exact saved bytes,
and the CUDA path's bookkeeping with the GPU timing replaced by fixed numbers."""

import csv

import pytest
import torch

from benchmarks import bench_attention as bench

TINY = {"batch": 1, "heads": 2, "head_dim": 16}


def test_saved_bytes_are_the_formula_for_ckpt_attn_and_include_the_softmax_for_naive():
    for row in bench.saved_bytes_table((32, 48), **TINY):
        tokens = 1 * 2 * row.seqlen
        assert row.formula == 4 * tokens * 16 * 4 + tokens * 4  # q, k, v, O fp32 + fp32 lse
        assert row.ckpt_attn == row.formula
        assert row.softmax == 1 * 2 * row.seqlen * row.seqlen * 4
        assert row.naive >= row.softmax


def test_saved_bytes_counts_each_storage_once():
    x = torch.randn(4, 8, requires_grad=True)
    # x * x saves x twice, x.t() * x.t() a view of it twice: one 128-byte storage.
    assert bench.saved_bytes(lambda t: (t * t).sum() + (t.t() * t.t()).sum(), x) == 4 * 8 * 4
    # exp saves its output, a second storage.
    assert bench.saved_bytes(lambda t: (t * t).exp(), x) == 2 * 4 * 8 * 4


def test_cpu_run_writes_its_tables(tmp_path):
    sizes = bench.CpuSizes(timing_seqlens=(32,), saved_seqlens=(32,), flop_seqlen=32,
                           budget_s=0.01, **TINY)
    report = bench.run_cpu(tmp_path, sizes)
    assert (tmp_path / "cpu_results.md").read_text() == report
    assert "needs a CUDA GPU" in report
    timings = bench.cpu_timings((32,), budget_s=0.01, **TINY)
    assert [(t.causal, t.mode) for t in timings] == [
        (False, "fwd"), (False, "fwd_bwd"), (True, "fwd"), (True, "fwd_bwd")]
    assert all(t.ckpt_attn_ms > 0 and t.sdpa_ms > 0 for t in timings)


def test_flop_counts_of_naive_attention_are_three_forwards():
    forward = bench.attention_flops(1, 2, 32, 16, causal=False, mode="fwd")
    assert forward == 4 * 1 * 2 * 32 * 32 * 16
    assert bench.attention_flops(1, 2, 32, 16, causal=True, mode="fwd_bwd") == forward / 2 * 3.5
    for row in bench.flop_count_table(32, **TINY):
        assert row.naive == 3 * forward  # dense matmuls, backward 2x, whatever the mask


def test_cuda_bookkeeping_with_fixed_times(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    assert bench.gpu_shape(4096, 128) == (4, 16)

    def fixed_times(provider, mode, dtype, head_dim, causal, seqlen):
        if provider == "sdpa-cudnn":
            return None, "RuntimeError: no kernel"
        return [{"ckpt_attn": 1.0, "sdpa-flash": 0.5}.get(provider, 2.0)] * 3, ""

    monkeypatch.setattr(bench, "gpu_time_ms", fixed_times)
    benchmarks = bench.gpu_benchmarks(quick=True)
    assert {b.args["dtype"] for b in benchmarks} == {"bf16"}
    results = bench.run_gpu_throughput(tmp_path, benchmarks)
    points = len(benchmarks) * len(bench.QUICK_GPU_SEQLENS) * len(bench.PROVIDERS)
    assert len(results) == points
    with (tmp_path / "gpu_throughput.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == points
    rows = bench.summary_rows(results)
    assert len(rows) == len(benchmarks) * len(bench.QUICK_GPU_SEQLENS)
    assert all(row[3].endswith("(sdpa-flash)") and row[4] == "0.50" for row in rows)
    assert "RuntimeError: no kernel" in bench.throughput_report(results)
