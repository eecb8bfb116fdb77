"""The ckpt-attn command line (ckpt_attn.cli): estimate, plan and bench, and its errors."""

import importlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reference import visible_pairs_mask

from ckpt_attn import cli
from ckpt_attn.cli import main, parse_bytes
from ckpt_attn.memory import estimate, plan
from ckpt_attn.memory.report import GIB, gib
from ckpt_attn.modules.config import TransformerConfig
from ckpt_attn.ops import visible_pairs

SMALL = ["--layers", "3", "--hidden", "128", "--heads", "4", "--batch", "2", "--seq", "256"]
SMALL_CFG = TransformerConfig(num_layers=3, hidden_size=128, num_heads=4)  # max_seq_len 4096
LABELS = ["none", "full", "sqrt", "selective", "uniform(every=2)", "ratio(ratio=0.5)"]


def run(capsys, *argv):
    """main(argv) in-process: (exit status, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code, out, err, *fragments):
    """Exit status 2, nothing on stdout, one line on stderr naming each fragment."""
    assert code == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("ckpt-attn: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def table_rows(out):
    """{policy label: the other cells} of the table estimate prints."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("policy "))
    return {cells[0]: cells[1:] for cells in (line.split() for line in lines[start + 1:])
            if cells and cells[0] in LABELS}


def expected_estimates(cfg, batch, seq, dtype=torch.bfloat16):
    return [estimate(cfg, batch=batch, seq=seq, policy=policy, dtype=dtype, **options)
            for policy, options in cli.POLICIES]


def test_estimate_table_of_a_preset_has_every_policy_with_estimates_numbers(capsys):
    code, out, err = run(capsys, "estimate", "--preset", "llama-7b")
    assert code == 0 and err == ""
    config_line = out.splitlines()[0]
    assert config_line == ("config: llama-7b 32 layers, hidden 4096, 32 heads (32 kv), "
                           "ffn 11008, swiglu, rmsnorm, dropout 0; batch 1, seq 4096, bf16")
    cfg = TransformerConfig(num_layers=32, hidden_size=4096, num_heads=32,
                            ffn_hidden_size=11008)
    rows = table_rows(out)
    assert list(rows) == LABELS
    for label, est in zip(LABELS, expected_estimates(cfg, 1, 4096), strict=True):
        assert rows[label] == [f"{est.kept_bytes / GIB:.2f}", f"{est.peak_bytes / GIB:.2f}",
                               f"{100 * est.recompute_overhead:.1f}",
                               f"{est.naive_kept_bytes / GIB:.2f}"]
    assert rows["none"][2] == "0.0"
    assert float(rows["full"][1]) < float(rows["none"][1])  # full checkpointing saves memory


def model_config(*argv):
    args = cli.build_parser().parse_args(["estimate", *argv])
    return cli.model_config(args)


def test_explicit_flags_override_the_preset_and_max_seq_len_covers_seq():
    cfg, seq = model_config("--preset", "llama-3-8b", "--layers", "2", "--hidden", "512",
                            "--heads", "16", "--dropout", "0.1")
    assert cfg == TransformerConfig(num_layers=2, hidden_size=512, num_heads=16, num_kv_heads=8,
                                    ffn_hidden_size=14336, dropout=0.1, rope_theta=500000.0,
                                    max_seq_len=8192)
    assert seq == 8192  # the preset's max_seq_len
    cfg, seq = model_config("--preset", "gpt2", "--mlp", "swiglu", "--norm", "rmsnorm",
                            "--kv-heads", "4", "--ffn", "1000", "--seq", "3000")
    assert cfg == TransformerConfig(num_layers=12, hidden_size=768, num_heads=12, num_kv_heads=4,
                                    ffn_hidden_size=1000, mlp="swiglu", norm="rmsnorm",
                                    bias=True, max_seq_len=3000)
    assert seq == 3000
    cfg, seq = model_config(*SMALL)
    assert cfg == SMALL_CFG and seq == 256
    assert model_config("--layers", "1", "--hidden", "64", "--heads", "2")[1] == 4096


def test_estimate_with_flags_over_a_preset_prints_that_models_numbers(capsys):
    code, out, _ = run(capsys, "estimate", "--preset", "llama-3-8b", "--layers", "2",
                       "--hidden", "256", "--heads", "8", "--ffn", "512", "--seq", "128")
    assert code == 0
    assert out.splitlines()[0] == ("config: llama-3-8b 2 layers, hidden 256, 8 heads (8 kv), "
                                   "ffn 512, swiglu, rmsnorm, dropout 0; batch 1, seq 128, bf16")
    cfg = TransformerConfig(num_layers=2, hidden_size=256, num_heads=8, num_kv_heads=8,
                            ffn_hidden_size=512, rope_theta=500000.0, max_seq_len=8192)
    rows = table_rows(out)
    for label, est in zip(LABELS, expected_estimates(cfg, 1, 128), strict=True):
        assert rows[label][:2] == [f"{est.kept_bytes / GIB:.2f}", f"{est.peak_bytes / GIB:.2f}"]


def test_json_is_the_estimates_to_dict(capsys):
    code, out, err = run(capsys, "estimate", *SMALL, "--mlp", "gelu", "--norm", "layernorm",
                         "--dropout", "0.1", "--kv-heads", "2", "--dtype", "fp32", "--json")
    assert code == 0 and err == ""
    entries = json.loads(out)
    cfg = TransformerConfig(num_layers=3, hidden_size=128, num_heads=4, num_kv_heads=2,
                            mlp="gelu", norm="layernorm", dropout=0.1)
    expected = expected_estimates(cfg, 2, 256, torch.float32)
    assert [e["policy"] for e in entries] == [p for p, _ in cli.POLICIES]
    for entry, est, (_, options) in zip(entries, expected, cli.POLICIES, strict=True):
        assert entry == est.to_dict() | {"options": options}
        assert entry["layer_terms"] and entry["layer_terms"][0]["bytes"] > 0


def test_plot_writes_a_png_with_the_budget_frontier(capsys, tmp_path, monkeypatch):
    frontiers = []
    frontier = cli.budget_frontier
    monkeypatch.setattr(cli, "budget_frontier",
                        lambda *a: frontiers.append(frontier(*a)) or frontiers[-1])
    path = tmp_path / "pareto.png"
    code, out, _ = run(capsys, "estimate", *SMALL, "--plot", str(path))
    assert code == 0
    assert f"wrote {path}" in out
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    # the frontier: plans at budgets up to the largest policy peak, each policy's peak
    # among them; more memory, less recompute; no worse than any policy at its own peak;
    # no recompute at the largest ("none" fits)
    estimates = expected_estimates(SMALL_CFG, 2, 256)
    (points,) = frontiers
    peaks, overheads = zip(*points, strict=True)
    assert len(points) >= 2 and list(peaks) == sorted(peaks)
    assert list(overheads) == sorted(overheads, reverse=True)
    for est in estimates:
        assert min(o for p, o in points if p <= est.peak_bytes / GIB) \
            <= 100 * est.recompute_overhead
    assert peaks[-1] <= max(e.peak_bytes for e in estimates) / GIB and overheads[-1] == 0


def test_plot_without_matplotlib_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    path = tmp_path / "pareto.png"
    assert_usage_error(*run(capsys, "estimate", *SMALL, "--plot", str(path)),
                       "--plot", "matplotlib")
    assert not path.exists()


def test_plan_prints_the_plan_and_its_cost_within_the_budget(capsys):
    none, full = (estimate(SMALL_CFG, batch=2, seq=256, policy=p) for p in ("none", "full"))
    budget = (none.peak_bytes + full.peak_bytes) // 2
    code, out, err = run(capsys, "plan", *SMALL, "--budget", str(budget))
    assert code == 0 and err == ""
    best = plan(SMALL_CFG, batch=2, seq=256, budget_bytes=budget)
    assert best.peak_bytes <= budget
    assert any(s.mode != "none" for s in best.segments)
    overhead = 100 * (best.recompute_flops / none.step_flops)
    assert out.splitlines()[1:] == [
        f"budget: {gib(budget)} ({budget} bytes)",
        str(best),
        f"cost: kept {gib(best.kept_bytes)}, peak {gib(best.peak_bytes)}, "
        f"recompute {overhead:.1f}% of a training step's FLOPs"]
    for segment in best.segments:
        assert f"{segment.mode}[{segment.start}" in out


def test_plan_with_a_budget_in_units(capsys):
    code, out, _ = run(capsys, "plan", *SMALL, "--budget", "1.5gib")
    assert code == 0
    assert "budget: 1.50 GiB (1610612736 bytes)" in out
    assert out.rstrip().endswith("recompute 0.0% of a training step's FLOPs")


def test_plan_below_the_smallest_peak_prints_the_minimum(capsys):
    code, out, err = run(capsys, "plan", *SMALL, "--budget", "1KiB")
    assert_usage_error(code, out, err, "--budget", "smallest peak")
    floor = int(re.search(r"\((\d+) bytes\)", err).group(1))
    assert run(capsys, "plan", *SMALL, "--budget", str(floor))[0] == 0
    assert_usage_error(*run(capsys, "plan", *SMALL, "--budget", str(floor - 1)), "--budget")


@pytest.mark.parametrize("text, nbytes", [
    ("123456", 123456), ("1B", 1), ("1b", 1), ("1KB", 1000), ("1kb", 1000), ("1KiB", 1024),
    ("0.5kib", 512), (".5KB", 500), ("2 MB", 2_000_000), ("3MiB", 3 * 2**20),
    ("1.1GB", 1_100_000_000), ("7gb", 7 * 10**9), ("40GiB", 40 * 2**30),
    ("1.5GiB", 1_610_612_736), ("40GIB", 40 * 2**30), ("1TB", 10**12), ("2tib", 2 * 2**40),
    ("1.", 1), ("1.9B", 1), (" 8 GiB ", 8 * 2**30),
])
def test_parse_bytes(text, nbytes):
    assert parse_bytes(text) == nbytes


@pytest.mark.parametrize("text", [
    "", " ", "GiB", "abc", "-1GiB", "+1GiB", "1e9", "1.5.2GB", "40G", "40Gi", "40 GiBs", "0",
    "0GiB", "0.1B", "nan", "inf", "1,000", "1 000", "GiB40", "1_000",
])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


BAD_MODEL = [
    (["--layers", "0"], "--layers must be a positive int, got 0"),
    (["--layers", "-2"], "--layers must be a positive int, got -2"),
    (["--layers", "x"], "--layers"),
    (["--hidden", "0"], "--hidden must be a positive int, got 0"),
    (["--hidden", "-128"], "--hidden must be a positive int, got -128"),
    (["--heads", "0"], "--heads must be a positive int, got 0"),
    (["--heads", "-4"], "--heads must be a positive int, got -4"),
    (["--heads", "5"], "--heads (5) must divide --hidden (128)"),
    (["--hidden", "1024", "--heads", "2"],
     "--hidden / --heads (head dim) must be even and at most 256, got 512"),
    (["--kv-heads", "3"], "--kv-heads (3) must divide --heads (4)"),
    (["--kv-heads", "0"], "--kv-heads must be a positive int, got 0"),
    (["--ffn", "0"], "--ffn must be a positive int, got 0"),
    (["--ffn", "-1"], "--ffn must be a positive int, got -1"),
    (["--batch", "0"], "--batch must be a positive int, got 0"),
    (["--batch", "-1"], "--batch must be a positive int, got -1"),
    (["--seq", "0"], "--seq must be a positive int, got 0"),
    (["--seq", "-256"], "--seq must be a positive int, got -256"),
    (["--dropout", "1"], "--dropout must be a float in [0, 1), got 1.0"),
    (["--dropout", "-0.1"], "--dropout must be a float in [0, 1), got -0.1"),
    (["--dropout", "nan"], "--dropout"),
    (["--mlp", "relu"], "--mlp"),
    (["--dtype", "fp64"], "--dtype"),
    (["--preset", "gpt5"], "--preset"),
]


@pytest.mark.parametrize("command", ["estimate", "plan"])
@pytest.mark.parametrize("flags, message", BAD_MODEL)
def test_bad_model_flags_exit_2_with_one_line_naming_the_flag(capsys, command, flags, message):
    budget = ["--budget", "1GiB"] if command == "plan" else []
    assert_usage_error(*run(capsys, command, *SMALL, *flags, *budget), message)


@pytest.mark.parametrize("argv, message", [
    (["estimate", "--hidden", "128", "--heads", "4"], "--layers is required without --preset"),
    (["estimate", "--heads", "4"], "--layers, --hidden are required without --preset"),
    (["estimate", "--preset", "llama-3-8b", "--heads", "12", "--hidden", "768"],
     "--kv-heads (8) must divide --heads (12)"),
    (["estimate", "--preset", "gpt2", "--hidden", "770"], "--heads (12) must divide --hidden"),
    (["estimate", *SMALL, "extra"], "unrecognized arguments: extra"),
    (["plan", *SMALL], "--budget"),
    (["plan", *SMALL, "--budget", "40G"], "--budget"),
    (["plan", *SMALL, "--budget", "-1GiB"], "--budget"),
    (["plan", *SMALL, "--budget", "0"], "--budget"),
    (["plan", *SMALL, "--budget", "0.5B"], "--budget"),
    (["frobnicate"], "frobnicate"),
    ([], "COMMAND"),
])
def test_other_bad_input_exits_2_with_one_line(capsys, argv, message):
    assert_usage_error(*run(capsys, *argv), message)


def test_help(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert all(command in out for command in ("estimate", "plan", "bench"))
    code, out, _ = run(capsys, "estimate", "--help")
    assert code == 0 and "--preset" in out and "--plot" in out


def test_bench_runs_the_attention_benchmark_then_the_policies_with_its_arguments(capsys,
                                                                                 bench):
    code, out, _ = run(capsys, "bench", "--help")
    assert code == 0 and all(flag in out for flag in ("--quick", "--out", "--only"))
    assert bench == []  # --help ran nothing
    assert run(capsys, "bench", "--quick", "--out", "somewhere", "--threads", "1",
               "--no-hf")[0] == 0
    assert bench == [
        ("attention", ["--out", "somewhere", "--quick", "--threads", "1"]),
        ("policies", ["--out", "somewhere", "--quick", "--threads", "1", "--no-hf"])]
    bench.clear()
    assert run(capsys, "bench", "--only", "policies")[0] == 0
    assert run(capsys, "bench", "--smoke", "--only", "attention")[0] == 0
    assert bench == [("policies", ["--out", "ckpt-attn-results"]),
                     ("attention", ["--out", "ckpt-attn-results", "--smoke"])]


def test_python_m_ckpt_attn_exit_status_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ckpt_attn", "estimate", "--preset", "llama-3-8b",
         "--kv-heads", "5"], capture_output=True, text=True, cwd=tmp_path,
        timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "ckpt-attn: error: --kv-heads (5) must divide --heads (32)\n"


def test_console_script(tmp_path):
    script = shutil.which("ckpt-attn", path=os.path.dirname(sys.executable)) \
        or shutil.which("ckpt-attn")
    if script is None:
        pytest.skip("the ckpt-attn console script is not installed")
    result = subprocess.run([script, "estimate", *SMALL], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert list(table_rows(result.stdout)) == LABELS


# --- hardening: absurd flags, huge models and long sequences answer in seconds --------

INT_FLAGS = ["--layers", "--hidden", "--heads", "--kv-heads", "--ffn", "--batch", "--seq"]


@pytest.mark.parametrize("command", ["estimate", "plan"])
@pytest.mark.parametrize("flag", INT_FLAGS)
@pytest.mark.parametrize("value", ["1e12", "1.5", "abc", "", "-1e3", "-.5", "0x10"])
def test_non_int_values_of_int_flags_name_the_flag(capsys, command, flag, value):
    budget = ["--budget", "1GiB"] if command == "plan" else []
    assert_usage_error(*run(capsys, command, *SMALL, *budget, flag, value),
                       f"argument {flag}: invalid int value")


@pytest.mark.parametrize("argv", [["--budget", "-5GiB"], ["--budget=-5GiB"],
                                  ["--budget", "-0.5"], ["--budget", "-.5KiB"],
                                  ["--budget", "-0"]])
def test_negative_budgets_are_read_and_refused(capsys, argv):
    assert_usage_error(*run(capsys, "plan", *SMALL, *argv), "argument --budget: ",
                       "is less than one byte")


def test_budgets_beyond_any_memory_are_refused(capsys):
    assert_usage_error(*run(capsys, "plan", *SMALL, "--budget", "2000000TiB"),
                       "argument --budget: '2000000TiB' is more than 2**60 bytes")
    assert run(capsys, "plan", *SMALL, "--budget", str(2**60))[0] == 0


@pytest.mark.parametrize("argv, message", [
    (["--layers", "2", "--hidden", str(2**40), "--heads", str(2**32)],
     "weight matrices would take at least 2**85 bytes, more than 2**60"),
    (["--preset", "gpt2", "--ffn", str(2**64)], "weight matrices"),
    (["--preset", "gpt2", "--batch", str(10**12)],
     "activations without checkpointing would take at least 2**68 bytes"),
    (["--preset", "gpt2", "--seq", str(2**64)], "lower --batch, --seq"),
    (["--preset", "llama-70b", "--seq", str(10**11)], "more than 2**60 (1 EiB)"),
    (["--preset", "gpt2", "--layers", str(2**64)], f"--layers must be at most 512, got {2**64}"),
    (["--preset", "gpt2", "--layers", "513"], "--layers must be at most 512, got 513"),
    (["--preset", "gpt2", "--hidden", str(2**64)], "--heads (12) must divide --hidden"),
    (["--preset", "gpt2", "--heads", str(2**64)], f"--heads ({2**64}) must divide"),
    (["--preset", "gpt2", "--kv-heads", str(2**40)], f"--kv-heads ({2**40}) must divide"),
    (["--preset", "gpt2", "--dropout", "1e400"], "--dropout must be a float in [0, 1), got inf"),
])
@pytest.mark.parametrize("command", ["estimate", "plan"])
def test_models_beyond_any_memory_are_refused_with_the_bound(capsys, command, argv, message):
    budget = ["--budget", "1GiB"] if command == "plan" else []
    start = time.perf_counter()
    assert_usage_error(*run(capsys, command, *argv, *budget), message)
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("command", ["estimate", "plan"])
@pytest.mark.parametrize("flag", [*INT_FLAGS, "--dropout", "--mlp", "--norm", "--dtype",
                                  "--preset", "--budget", "--plot"])
@pytest.mark.parametrize("value", ["-1", "0", str(2**40), str(2**64), "1.5", "abc", "-5GiB"])
def test_every_flag_answers_absurd_values_with_a_result_or_one_line(capsys, tmp_path, command,
                                                                    flag, value):
    budget = ["--budget", "1GiB"] if command == "plan" and flag != "--budget" else []
    value = str(tmp_path / f"{value}.png") if flag == "--plot" else value
    start = time.perf_counter()
    code, out, err = run(capsys, command, *SMALL, *budget, flag, value)
    assert code in (0, 2)
    if code == 2:
        assert_usage_error(code, out, err)
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("path, message", [
    ("/etc/hostname/pareto.png", "/etc/hostname is not a directory"),
    ("missing/pareto.png", "missing is not a directory"),
    (".", ". is a directory"),
    ("pareto.foo", "matplotlib cannot write .foo files, only"),
])
def test_plot_paths_that_cannot_be_written_are_refused_first(capsys, tmp_path, monkeypatch,
                                                             path, message):
    if path.startswith("/etc/hostname") and not Path("/etc/hostname").is_file():
        path, message = "/dev/null/pareto.png", "/dev/null is not a directory"
    monkeypatch.chdir(tmp_path)
    assert_usage_error(*run(capsys, "estimate", *SMALL, "--plot", path), "--plot", message)


@pytest.fixture
def bench(monkeypatch):
    """The benchmarks' main functions replaced by a recorder that makes the results folder
    (what they do first): the list of (benchmark, argv) they were called with."""
    from ckpt_attn.benchmarks import bench_attention, bench_policies

    calls = []

    def recorder(name):
        def main(argv):
            calls.append((name, argv))
            Path(argv[argv.index("--out") + 1]).mkdir(parents=True, exist_ok=True)
        return main

    monkeypatch.setattr(bench_attention, "main", recorder("attention"))
    monkeypatch.setattr(bench_policies, "main", recorder("policies"))
    return calls


def test_bench_out_that_cannot_be_a_folder_is_one_line(capsys, tmp_path, bench):
    regular = tmp_path / "file"
    regular.write_text("")
    assert_usage_error(*run(capsys, "bench", "--quick", "--out", str(regular / "x")),
                       f"--out {regular / 'x'}: Not a directory")
    assert_usage_error(*run(capsys, "bench", "--out", str(regular)), f"--out {regular}: ")
    assert run(capsys, "bench", "--quick", "--out", str(tmp_path / "results"))[0] == 0
    assert (tmp_path / "results").is_dir()


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments: --bogus"), (["extra"], "unrecognized arguments"),
    (["--quick=1"], "argument --quick"), (["--out"], "argument --out: expected one argument"),
    (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["--threads", "-2"], "argument --threads: must be at least 1, got -2"),
    (["--only", "fuzz"], "argument --only: invalid choice: 'fuzz'"),
])
def test_bad_bench_arguments_are_one_line_before_it_runs(capsys, bench, argv, message):
    assert_usage_error(*run(capsys, "bench", *argv), message)
    assert bench == []


@pytest.mark.parametrize("module", ["bench_attention", "bench_policies"])
def test_bench_has_every_option_of_each_benchmark(capsys, module):
    """Each benchmark's own options (its --help) are options of `ckpt-attn bench`."""
    benchmark = importlib.import_module(f"ckpt_attn.benchmarks.{module}")
    with pytest.raises(SystemExit):
        benchmark.main(["--help"])
    options = set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))
    code, out, _ = run(capsys, "bench", "--help")
    assert code == 0 and options and options <= set(re.findall(r"--[a-z][a-z-]*", out))


def visible_pairs_by_rows(seqlen_q, seqlen_k, causal, window):
    """visible_pairs, row by row: query i sees keys max(i - left, 0) .. min(S_k - 1,
    i + right, i if causal), a side below 0 unbounded (ckpt_attn's former loop)."""
    left, right = window
    pairs = 0
    for row in range(seqlen_q):
        first = max(row - left, 0) if left >= 0 else 0
        last = seqlen_k - 1
        if right >= 0:
            last = min(last, row + right)
        if causal:
            last = min(last, row)
        pairs += max(last - first + 1, 0)
    return pairs


def test_visible_pairs_closed_form_counts_every_small_case_as_row_by_row():
    sides = [-1, 0, 1, 2, 5, 20]
    for seqlen_q, seqlen_k, causal, left, right in itertools.product(
            range(13), range(13), [False, True], sides, sides):
        assert visible_pairs(seqlen_q, seqlen_k, causal, (left, right)) \
            == visible_pairs_by_rows(seqlen_q, seqlen_k, causal, (left, right)), \
            (seqlen_q, seqlen_k, causal, left, right)
        # the mask the kernel tests use: causal top-left aligned
        mask = visible_pairs_mask(seqlen_q, seqlen_k, causal=causal, window=(left, right))
        assert visible_pairs(seqlen_q, seqlen_k, causal, (left, right)) == int(mask.sum())


def test_visible_pairs_of_long_sequences_is_exact_and_instant():
    start = time.perf_counter()
    seqlen = 10**11
    assert visible_pairs(seqlen, seqlen, False) == seqlen**2
    assert visible_pairs(seqlen, seqlen, True) == seqlen * (seqlen + 1) // 2
    assert visible_pairs(seqlen, seqlen, True, (255, 0)) == 256 * seqlen - 255 * 256 // 2
    assert visible_pairs(seqlen, 2 * seqlen, False, (-1, 0)) == seqlen * (seqlen + 1) // 2
    assert time.perf_counter() - start < 1


def test_estimate_of_a_long_sequence_answers_in_seconds(tmp_path):
    def estimate_seq(*argv):
        return subprocess.run([sys.executable, "-m", "ckpt_attn", "estimate", *argv,
                               "--seq", str(10**11), "--json"], capture_output=True,
                              text=True, cwd=tmp_path, timeout=120)

    result = estimate_seq("--preset", "gpt2")
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)
    assert entries[0]["policy"] == "none" and entries[0]["peak_bytes"] <= 2**60
    result = estimate_seq("--preset", "llama-70b")  # beyond any memory
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "2**60" in result.stderr


@pytest.mark.parametrize("command", [["estimate"], ["plan", "--budget", "1GiB"]])
def test_context_parallel_degree_the_zigzag_cannot_cut(capsys, command):
    """--seq 16 over 16 ranks: a multiple of the degree, not of zigzag's two chunks per
    rank (was a traceback from the ring's schedule, exit 1)."""
    assert_usage_error(*run(capsys, *command, "--layers", "2", "--hidden", "64", "--heads",
                            "4", "--seq", "16", "--context-parallel", "16"),
                       "--seq (16) must be a multiple of 2 * --context-parallel (32)")


def test_plot_into_a_read_only_directory(capsys, tmp_path):
    """Refused before anything is computed, in one line (was a traceback from savefig,
    exit 1, after the table). As root, permission bits do not bind: sysfs refuses every
    new file, root's too."""
    pytest.importorskip("matplotlib")
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    if os.geteuid() == 0:
        directory = Path("/sys")
    path = directory / "pareto.png"
    assert_usage_error(*run(capsys, "estimate", *SMALL, "--plot", str(path)), "--plot",
                       str(path), "Permission denied")
    assert not path.exists()
