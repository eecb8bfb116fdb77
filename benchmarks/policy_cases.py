"""What bench_policies runs: the models, chosen by device, and the cases on them.

Three families of cases, each timed against its own "none":
- "eager": a ckpt_attn.Transformer under every checkpoint policy and storage mode;
- "compiled": the same model under torch.compile (inductor, fullgraph): policy "none"
  with torch's own recompute planner (torch._functorch.config.activation_memory_budget)
  swept over its range, and some of our policies with torch's default budget (1.0);
- "hf": a Llama built from a transformers config (no download), under Hugging Face's
  gradient_checkpointing_enable() and under apply_checkpointing.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

import ckpt_attn

FAMILIES = ("eager", "compiled", "hf")
HF_GRADIENT_CHECKPOINTING = "hf-gc"  # the HF case's "policy": HF's own checkpointing


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The benchmark's model and step: a Transformer of num_layers x hidden_size
    (ffn_hidden_size from Llama's rule unless given), batch x seq tokens per step."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    batch: int
    seq: int
    dtype: torch.dtype
    ffn_hidden_size: int | None = None
    budget_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)  # of [least peak, none's peak]
    torch_budgets: tuple[float, ...] = (1.0, 0.5, 0.2, 0.0)
    compiled_policies: tuple[str, ...] = ("full", "sqrt", "budget")
    rounds: int = 5  # interleaved timing rounds

    def config(self) -> ckpt_attn.TransformerConfig:
        """The TransformerConfig of these shapes (torch backend on the CPU)."""
        return ckpt_attn.TransformerConfig(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            ffn_hidden_size=self.ffn_hidden_size, max_seq_len=max(self.seq, 4096),
            backend="auto" if torch.cuda.is_available() else "torch")

    @property
    def tokens(self) -> int:
        """Tokens per step."""
        return self.batch * self.seq


# About a second per step on two CPU cores (fp32, the torch backend).
CPU_SHAPES = Shapes(num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=8, batch=1,
                    seq=512, dtype=torch.float32)
QUICK_CPU_SHAPES = dataclasses.replace(CPU_SHAPES, num_layers=4, seq=256,
                                       budget_fractions=(0.5,), torch_budgets=(1.0, 0.0),
                                       compiled_policies=("full",), rounds=3)
# Llama-3.2-1B's layers (16 x 2048, SwiGLU 8192, 32 heads, 8 kv heads: 0.97B parameters
# without embeddings) in bf16, 16k tokens per step.
GPU_SHAPES = Shapes(num_layers=16, hidden_size=2048, num_heads=32, num_kv_heads=8,
                    ffn_hidden_size=8192, batch=4, seq=4096, dtype=torch.bfloat16)
QUICK_GPU_SHAPES = dataclasses.replace(GPU_SHAPES, budget_fractions=(0.5,),
                                       torch_budgets=(1.0, 0.0), compiled_policies=(),
                                       rounds=3)
# --smoke: every family at the smallest shapes, one round (seconds; the figures mean nothing)
SMOKE_SHAPES = Shapes(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, batch=1,
                      seq=32, dtype=torch.float32, budget_fractions=(0.5,),
                      torch_budgets=(1.0, 0.0), compiled_policies=(), rounds=1)


def shapes_for(device: torch.device, quick: bool, smoke: bool = False) -> Shapes:
    """GPU_SHAPES on CUDA, CPU_SHAPES otherwise (their quick variants if quick), or
    SMOKE_SHAPES on either if smoke."""
    if smoke:
        return SMOKE_SHAPES
    if device.type == "cuda":
        return QUICK_GPU_SHAPES if quick else GPU_SHAPES
    return QUICK_CPU_SHAPES if quick else CPU_SHAPES


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration to measure.

    family: "eager", "compiled" or "hf". policy and options: as apply_checkpointing takes
    them (policy HF_GRADIENT_CHECKPOINTING: HF's gradient_checkpointing_enable()).
    memory_budget: torch's activation_memory_budget (compiled only; 1.0 is torch's
    default).
    """

    family: str
    policy: str
    options: tuple[tuple[str, float], ...] = ()
    storage: str = "device"
    memory_budget: float = 1.0
    note: str = ""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")

    @property
    def label(self) -> str:
        """A short unique name: policy, options, storage, torch's budget."""
        parts = [self.policy, *(f"{k}={_option(k, v)}" for k, v in self.options)]
        if self.storage != "device":
            parts.append(self.storage)
        if self.family == "compiled":
            parts.append(f"torch budget {self.memory_budget:g}")
        if self.note:
            parts.append(f"({self.note})")
        return " ".join(parts)

    @property
    def is_baseline(self) -> bool:
        """Whether this is its family's "none", which the others are timed against."""
        return (self.policy == "none" and self.storage == "device"
                and self.memory_budget == 1.0)


def _option(name: str, value) -> str:
    return f"{value / 2**20:.1f}MiB" if name == "budget_bytes" else f"{value:g}"


def our_cases(shapes: Shapes, budgets: list[int], device: torch.device) -> list[Case]:
    """Eager: every policy (budget at each of `budgets` bytes), int8/fp8 storage of
    "full" (and cpu offload on CUDA). Compiled: torch's budgets with policy none, and
    shapes.compiled_policies with torch's default (budget: the middle of `budgets`)."""
    eager = [Case("eager", "none"), Case("eager", "full"),
             Case("eager", "uniform", (("every", 2),)), Case("eager", "sqrt"),
             Case("eager", "ratio", (("ratio", 0.5),)), Case("eager", "selective")]
    eager += [Case("eager", "budget", (("budget_bytes", b),)) for b in budgets]
    eager += [Case("eager", "full", storage=s) for s in ("int8", "fp8")]
    if device.type == "cuda":
        eager += [Case("eager", "none", storage="cpu"), Case("eager", "full", storage="cpu")]
    compiled = [Case("compiled", "none", memory_budget=b) for b in shapes.torch_budgets]
    middle = budgets[len(budgets) // 2]
    compiled += [Case("compiled", p, (("budget_bytes", middle),) if p == "budget" else ())
                 for p in shapes.compiled_policies]
    return eager + compiled


def hf_cases(budgets: list[int]) -> list[Case]:
    """HF's own checkpointing (every layer, every other layer) against ours (full, sqrt,
    budget at each of `budgets`) on the Llama's decoder layers."""
    cases = [Case("hf", "none"), Case("hf", HF_GRADIENT_CHECKPOINTING),
             Case("hf", HF_GRADIENT_CHECKPOINTING, (("every_n_layers", 2),)),
             Case("hf", "full"), Case("hf", "sqrt")]
    return cases + [Case("hf", "budget", (("budget_bytes", b),)) for b in budgets]


def our_model(shapes: Shapes, device: torch.device) -> ckpt_attn.Transformer:
    """The benchmark's Transformer, seeded, in shapes.dtype on device."""
    torch.manual_seed(0)
    return ckpt_attn.Transformer(shapes.config()).to(device=device, dtype=shapes.dtype)


def hf_model(shapes: Shapes, device: torch.device):
    """A Llama (transformers' LlamaModel, no embedding lookup: it runs on inputs_embeds)
    with the layer shapes of shapes.config(), in training mode. Raises ImportError
    without transformers."""
    from transformers import LlamaConfig, LlamaModel

    cfg = shapes.config()
    hf_cfg = LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, vocab_size=128,
                         max_position_embeddings=cfg.max_seq_len, use_cache=False)
    torch.manual_seed(0)
    return LlamaModel(hf_cfg).to(device=device, dtype=shapes.dtype).train()


def sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of model that shares its parameters and buffers (its own modules, so a
    policy applied to it leaves the original alone)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)
