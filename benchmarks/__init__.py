"""Benchmarks of ckpt_attn: run `python -m benchmarks.bench_attention [--quick] [--out DIR]`."""
