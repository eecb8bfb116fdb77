"""The layer library on CUDA (run by make gpu-check): a bf16 Transformer on the Triton
kernels under every policy, CPU offload, and the memory model against a real step."""

from __future__ import annotations

import pytest
import torch
from saved_bytes import saved_tensors

import ckpt_attn
from ckpt_attn.memory import estimate, measure

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CFG = dict(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2, dropout=0.1)
BATCH, SEQ = 2, 300


def model_and_input():
    torch.manual_seed(0)
    cfg = ckpt_attn.TransformerConfig(**CFG)
    model = ckpt_attn.Transformer(cfg).cuda().to(torch.bfloat16)
    x = torch.randn(BATCH, SEQ, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return model, x


def step(model, x):
    model.zero_grad()
    x.grad = None
    torch.manual_seed(1)
    model(x).float().square().sum().backward()
    return [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]


@pytest.mark.parametrize("policy, options", [("full", {}), ("sqrt", {}), ("selective", {}),
                                             ("full", {"storage": "cpu"}),
                                             ("none", {"storage": "cpu"})])
def test_policies_reproduce_the_gradients_exactly(policy, options):
    # the kernels' backward is deterministic, so recomputation reproduces every bit
    model, x = model_and_input()
    reference = step(model, x)
    ckpt_attn.apply_checkpointing(model, policy, **options)
    for got, want in zip(step(model, x), reference, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("policy", ["none", "full", "sqrt", "selective"])
def test_estimate_matches_a_real_cuda_step(policy):
    model, x = model_and_input()
    ckpt_attn.apply_checkpointing(model, policy)
    run = measure(model, x)
    predicted = estimate(model.cfg, batch=BATCH, seq=SEQ, policy=policy)
    assert (run.kept_bytes, run.peak_bytes) == (predicted.kept_bytes, predicted.peak_bytes)
    assert run.cuda_max_allocated >= run.peak_bytes


def test_cpu_offload_moves_kept_bytes_to_host():
    model, x = model_and_input()
    ckpt_attn.apply_checkpointing(model, "none", storage="cpu")
    run = measure(model, x)
    predicted = estimate(model.cfg, batch=BATCH, seq=SEQ, policy="none", storage="cpu")
    assert run.kept_bytes == predicted.kept_bytes  # only the final norm stays on the GPU
    assert run.offloaded_bytes == predicted.offloaded_bytes


@pytest.mark.parametrize("storage, stored_dtype, stored_device",
                         [("cpu", torch.float32, "cpu"), ("int8", torch.int8, "cuda")])
def test_compiled_storage_keeps_the_stored_form(storage, stored_dtype, stored_device):
    """full with cpu/int8 storage under torch.compile (fp32, inductor, the Triton
    kernels): eager's gradients, and what the compiled forward saves holds each
    recomputed layer's input as a host copy or int8 codes."""
    torch.manual_seed(0)
    model = ckpt_attn.Transformer(ckpt_attn.TransformerConfig(**(CFG | {"dropout": 0.0})))
    model = model.cuda()
    x = torch.randn(BATCH, SEQ, 256, device="cuda", requires_grad=True)
    ckpt_attn.apply_checkpointing(model, "full", storage=storage)
    eager = step(model, x)
    compiled = torch.compile(model, fullgraph=True)
    for got, want in zip(step(compiled, x), eager, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    saved = [kept[:3] for kept in saved_tensors(compiled, x).values()]
    hidden = (BATCH, SEQ, 256)
    assert (stored_device, stored_dtype, hidden) in saved, saved
    # at most the final norm's input, which no policy recomputes
    assert saved.count(("cuda", torch.float32, hidden)) <= 1, saved
