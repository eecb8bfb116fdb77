"""Smoke tests of benchmarks/bench_attention.py: the CPU path at tiny sizes, exact saved bytes,
and the CUDA path's bookkeeping with the GPU timing replaced by fixed numbers."""

import csv

import pytest
import torch

from ckpt_attn.benchmarks import bench_attention as bench
from ckpt_attn.ops import visible_pairs

TINY = {"batch": 1, "heads": 2, "head_dim": 16}


def test_saved_bytes_are_the_formula_for_ckpt_attn_and_include_the_softmax_for_naive():
    for row in bench.saved_bytes_table((32, 48), **TINY):
        tokens = 1 * 2 * row.seqlen
        # q, k, v, O fp32 + two fp32 row statistics
        assert row.formula == 4 * tokens * 16 * 4 + tokens * 2 * 4
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
    forward = bench.attention_flops(1, 2, 32, 16, variant="full", mode="fwd")
    assert forward == 4 * 1 * 2 * 32 * 32 * 16
    # causal: FlashAttention-2's halving, counted up to the diagonal (32 * 33 / 2 pairs).
    causal = bench.attention_flops(1, 2, 32, 16, variant="causal", mode="fwd_bwd")
    assert causal == 4 * 1 * 2 * (32 * 33 // 2) * 16 * 3.5
    for row in bench.flop_count_table(32, **TINY):
        assert row.naive == 3 * forward  # dense matmuls, backward 2x, whatever the mask
        assert row.ckpt_attn == row.convention  # ckpt_attn's formulas count the same pairs


def test_flops_of_the_masked_variants():
    # padded counts every pair, the kernel computes them; window only the visible ones.
    full = bench.attention_flops(4, 16, 4096, 128, "full", "fwd")
    assert full == 4.0 * 4 * 16 * 4096**2 * 128
    assert bench.attention_flops(4, 16, 4096, 128, "padded", "fwd") == full
    pairs = sum(min(i + 1, bench.WINDOW_KEYS) for i in range(4096))
    assert pairs == visible_pairs(4096, 4096, True, (255, 0))
    assert bench.attention_flops(4, 16, 4096, 128, "window", "fwd_bwd") == (
        4.0 * 4 * 16 * pairs * 128 * 3.5)
    with pytest.raises(ValueError, match="variant"):
        bench.attention_flops(1, 1, 8, 8, "sliding", "fwd")


def test_variant_masks_on_the_cpu():
    assert bench.variant_mask("full", 4, 64, "cpu") is None
    assert bench.variant_mask("causal", 4, 64, "cpu") is None
    padded = bench.variant_mask("padded", 6, 64, "cpu")
    assert padded.shape == (6, 1, 1, 64) and padded.dtype == torch.bool
    kept = padded.sum(-1).flatten().tolist()
    assert kept == [56, 48, 40, 32, 56, 48]  # S - (b % 4 + 1) * S // 8
    for b, count in enumerate(kept):  # the first `count` keys, then padding
        assert padded[b, 0, 0, :count].all() and not padded[b, 0, 0, count:].any()
    window = bench.variant_mask("window", 1, 600, "cpu")
    assert window.shape == (600, 600) and window.dtype == torch.bool
    query, key = torch.meshgrid(torch.arange(600), torch.arange(600), indexing="ij")
    assert torch.equal(window, (key <= query) & (key > query - bench.WINDOW_KEYS))
    assert int(window.sum()) == visible_pairs(600, 600, True, bench.WINDOW)


@pytest.mark.parametrize("variant", bench.VARIANTS)
def test_implementations_agree_on_every_variant(variant):
    """ckpt_attn (torch backend), SDPA and naive compute the same attention per variant,
    forward and backward; S exceeds the window, so the window cuts."""
    batch, heads, seqlen, head_dim = 4, 2, 320, 16
    q, k, v = bench.random_qkv(batch, heads, seqlen, head_dim, torch.float64, "cpu")
    mask = bench.variant_mask(variant, batch, seqlen, "cpu")
    grad_out = torch.randn_like(q)
    outputs = {}
    for name, attn in bench.implementations(variant, "cpu", mask).items():
        out = attn(q, k, v)
        outputs[name] = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
    for name in ("sdpa", "naive"):
        for ours, theirs in zip(outputs["ckpt_attn"], outputs[name], strict=True):
            torch.testing.assert_close(ours, theirs)
    if variant != "full":  # the masking changes the result
        unmasked = bench.implementations("full", "cpu")["naive"](q, k, v)
        assert not torch.allclose(outputs["naive"][0], unmasked)


def test_implementations_check_the_mask_against_the_variant():
    with pytest.raises(ValueError, match="takes a mask"):
        bench.implementations("padded", "cpu")
    with pytest.raises(ValueError, match="takes no mask"):
        bench.implementations("causal", "cpu", torch.ones(1, 1, 1, 8, dtype=torch.bool))


def test_gpu_grid_adds_the_masked_variants_at_bf16_d128():
    pytest.importorskip("triton")
    for quick, seqlens, masked in ((True, bench.QUICK_GPU_SEQLENS, bench.QUICK_MASKED_SEQLENS),
                                   (False, bench.GPU_SEQLENS, bench.MASKED_SEQLENS)):
        benchmarks = bench.gpu_benchmarks(quick)
        dtypes = ("bf16",) if quick else ("bf16", "fp16")
        expected = {(mode, dtype, head_dim, variant, seqlens)
                    for mode in bench.MODES for dtype in dtypes for head_dim in (128, 64)
                    for variant in ("full", "causal")}
        expected |= {(mode, "bf16", 128, variant, masked)
                     for mode in bench.MODES for variant in ("padded", "window")}
        got = [(b.args["mode"], b.args["dtype"], b.args["head_dim"], b.args["variant"],
                tuple(b.x_vals)) for b in benchmarks]
        assert len(got) == len(set(got)) and set(got) == expected
        assert len({b.plot_name for b in benchmarks}) == len(benchmarks)
    # the quick grid's points are points of the full grid, so their results compare
    assert set(bench.QUICK_GPU_SEQLENS) <= set(bench.GPU_SEQLENS)
    assert set(bench.QUICK_MASKED_SEQLENS) <= set(bench.MASKED_SEQLENS)


def test_cuda_bookkeeping_with_fixed_times(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    assert bench.gpu_shape(4096, 128) == (4, 16)

    def fixed_times(provider, mode, dtype, head_dim, variant, seqlen):
        assert variant in bench.VARIANTS
        if provider == "sdpa-cudnn":
            return None, "RuntimeError: no kernel"
        if provider == "sdpa-flash" and variant in bench.MASKED_VARIANTS:
            return None, "RuntimeError: No available kernel. Aborting execution."
        return [{"ckpt_attn": 1.0, "sdpa-flash": 0.5}.get(provider, 2.0)] * 3, ""

    monkeypatch.setattr(bench, "gpu_time_ms", fixed_times)
    benchmarks = bench.gpu_benchmarks(quick=True)
    assert {b.args["dtype"] for b in benchmarks} == {"bf16"}
    assert {b.args["variant"] for b in benchmarks} == set(bench.VARIANTS)
    results = bench.run_gpu_throughput(tmp_path, benchmarks)
    problems = sum(len(b.x_vals) for b in benchmarks)
    assert problems == 8 * len(bench.QUICK_GPU_SEQLENS) + 4 * len(bench.QUICK_MASKED_SEQLENS)
    points = problems * len(bench.PROVIDERS)
    assert len(results) == points
    with (tmp_path / "gpu_throughput.csv").open() as handle:
        rows_csv = list(csv.DictReader(handle))
    assert len(rows_csv) == points
    assert {row["variant"] for row in rows_csv} == set(bench.VARIANTS)
    # TFLOP/s = the variant's FLOPs / time: ckpt_attn takes 1 ms everywhere.
    for r in results:
        if r.provider == "ckpt_attn":
            assert r.variant in bench.VARIANTS and r.ms == 1.0
            flops = bench.attention_flops(r.batch, r.heads, r.seqlen, r.head_dim, r.variant,
                                          r.mode)
            assert r.tflops == pytest.approx(flops / 1e9)
    window = next(r for r in results if r.variant == "window" and r.provider == "ckpt_attn"
                  and r.seqlen == 16384 and r.mode == "fwd")
    full = next(r for r in results if r.variant == "full" and r.provider == "ckpt_attn"
                and r.seqlen == 16384 and r.mode == "fwd" and r.head_dim == 128)
    assert window.tflops == pytest.approx(full.tflops * visible_pairs(16384, 16384, True, (255, 0))
                                          / 16384**2)
    rows = bench.summary_rows(results)
    assert len(rows) == problems
    for name, _, _, best, ratio in rows:
        if name.endswith(("-padded", "-window")):  # flash refuses masks: efficient/math win
            assert best.endswith("(sdpa-efficient)") and ratio == "2.00"
        else:
            assert best.endswith("(sdpa-flash)") and ratio == "0.50"
    assert {name.rsplit("-", 1)[1] for name, *_ in rows} == set(bench.VARIANTS)
    report = bench.throughput_report(results)
    assert "RuntimeError: no kernel" in report and "No available kernel" in report
    assert "## attention-fwd_bwd-bf16-d128-window" in report
    assert "## attention-fwd-bf16-d128-padded" in report
    assert "only the visible pairs" in report
