"""Benchmark the checkpoint policies' trade-off: step time against activation memory.

Run as ``python -m ckpt_attn.benchmarks.bench_policies [--quick] [--out DIR] [--no-hf]``.

For a ckpt_attn.Transformer (shapes chosen by device, benchmarks.policy_cases): every
checkpoint policy and storage mode in eager mode; torch.compile with torch's own
recompute planner (activation_memory_budget) swept over its range and with some of
our policies; and a Hugging Face Llama under HF's own activation checkpointing and
under apply_checkpointing. Per case: step time (median of interleaved rounds, as a
ratio to its family's "none"), kept and peak activation bytes from
ckpt_attn.memory.measure beside ckpt_attn.memory.estimate (eager), the allocator's
kept and peak bytes (every case, compiled ones included), and recompute FLOPs
(measured beside estimated). A case that fails records its error and the others go
on.

Results under --out (default ./ckpt-attn-results): policies.md, policies.csv and
policies.png (see benchmarks.policy_report).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import torch

from ckpt_attn import apply_checkpointing
from ckpt_attn.checkpointing import POLICIES, Segment
from ckpt_attn.memory import estimate, layer_costs, measure, min_peak, plan_cost, tail_cost
from ckpt_attn.memory.planner import plan_layers

from . import add_common_arguments, apply_threads
from .policy_cases import (
    HF_GRADIENT_CHECKPOINTING,
    Case,
    Shapes,
    hf_cases,
    hf_model,
    our_cases,
    our_model,
    shapes_for,
    sharing_copy,
)
from .policy_measure import CompiledStep, GraphFlops, allocator_memory, interleaved_rounds
from .policy_report import write_results


@dataclasses.dataclass
class PolicyRow:
    """What one case measured (None: not measured or not applicable).

    step_ratio: step time over its family's "none"; eager_ratio: over eager "none".
    kept_bytes, peak_bytes: ckpt_attn.memory.measure (eager and hf cases); *_estimate:
    ckpt_attn.memory's prediction (estimate() for the Transformer, the planner's cost
    model for the HF layers). allocator_kept, allocator_peak: the allocator above the
    step's start (benchmarks.policy_measure). recompute_flops: measured (compiled cases:
    the compiled graphs' FLOPs less those of compiled "none" under torch's default);
    step_flops: forward + backward without recompute. checkpointed: the fraction of
    layers in recomputed segments (the chapter's c). error: why the case failed.
    """

    family: str
    label: str
    policy: str
    storage: str
    memory_budget: float
    step_ms: float | None = None
    step_ratio: float | None = None
    eager_ratio: float | None = None
    kept_bytes: int | None = None
    kept_estimate: int | None = None
    peak_bytes: int | None = None
    peak_estimate: int | None = None
    allocator_kept: int | None = None
    allocator_peak: int | None = None
    recompute_flops: int | None = None
    recompute_estimate: int | None = None
    step_flops: int | None = None
    checkpointed: float | None = None
    error: str = ""


class CaseRun:
    """A case made runnable: its own copy of the model (parameters shared), its policy
    applied, compiled if its family says so; loss() runs one forward to a scalar."""

    def __init__(self, case: Case, model: torch.nn.Module, x: torch.Tensor,
                 graph_flops: GraphFlops):
        self.case, self.x = case, x
        self.hf = case.family == "hf"
        self.model = sharing_copy(model)
        if case.policy == HF_GRADIENT_CHECKPOINTING:
            _hf_checkpointing(self.model, dict(case.options))
        elif case.policy != "none" or case.storage != "device":
            apply_checkpointing(self.model, case.policy, storage=case.storage,
                                **dict(case.options))
        self.forward = _loss_function(self.model, self.hf)
        if case.family == "compiled":
            name = "loss_" + "".join(c if c.isalnum() else "_" for c in case.label)
            self.forward = CompiledStep(self.forward, name, case.memory_budget, graph_flops)

    def loss(self) -> torch.Tensor:
        """One forward: the scalar loss."""
        return self.forward(self.x)

    def clear_gradients(self) -> None:
        """Set the parameters' gradients to None, as zero_grad() does."""
        for p in self.model.parameters():
            p.grad = None

    def step(self) -> None:
        """One training step: forward and backward, from no gradients."""
        self.clear_gradients()
        self.loss().backward()

    def warm_up(self) -> None:
        """Compile (compiled cases) and plan (budget) with a first step."""
        if self.case.policy == "budget":  # plans eagerly (a compiled case compiles the plan)
            _loss_function(self.model, self.hf)(self.x).backward()
        if isinstance(self.forward, CompiledStep):
            self.forward.warm_up(self.x)

    def checkpointed(self) -> float | None:
        """The fraction of layers its plan recomputes (None for torch's own planner)."""
        case, layers = self.case, self.model.layers
        if case.family == "compiled" and case.policy == "none":
            return None
        if case.policy == HF_GRADIENT_CHECKPOINTING:
            segments = _hf_segments(len(layers), dict(case.options))
        elif POLICIES[case.policy].planned:
            plans = getattr(layers[0].__dict__.get("forward"), "plans", None)
            if not plans:
                return None
            segments = next(iter(plans.values()))
        else:
            segments = POLICIES[case.policy].segments(len(layers), dict(case.options))
        return sum(s.stop - s.start for s in segments if s.mode == "full") / len(layers)

    def measured(self):
        """ckpt_attn.memory.measure of one step (eager models only)."""
        if self.hf:
            return measure(self.model, inputs_embeds=self.x)
        return measure(self.model, self.x)


def _hf_checkpointing(model, options: dict) -> None:
    """Hugging Face's own activation checkpointing, non-reentrant (transformers 5:
    activation_checkpointing_enable, which takes every_n_layers; 4.x:
    gradient_checkpointing_enable)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs, **options)
    elif options:
        raise TypeError(f"this transformers has no activation_checkpointing_enable to take "
                        f"{options}")
    else:
        model.gradient_checkpointing_enable(kwargs)


def _hf_segments(num_layers: int, options: dict) -> list[Segment]:
    """HF's checkpointing as segments: layer i recomputed when i % every_n_layers == 0."""
    every = options.get("every_n_layers", 1)
    return [Segment(i, i + 1, "full" if i % every == 0 else "none") for i in range(num_layers)]


def _loss_function(model: torch.nn.Module, hf: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    def loss(x):
        out = model(inputs_embeds=x).last_hidden_state if hf else model(x)
        return out.float().square().mean()
    return loss


def run(shapes: Shapes, device: torch.device, *, hf: bool = True, progress: bool = True
        ) -> tuple[list[PolicyRow], dict]:
    """Measure every case; returns the rows and the context the report needs (shapes,
    budgets)."""
    x = torch.randn(shapes.batch, shapes.seq, shapes.hidden_size, device=device,
                    dtype=shapes.dtype)
    model = our_model(shapes, device)
    budgets = _our_budgets(model, x, shapes)
    runs = _prepare(our_cases(shapes, budgets, device), model, x, shapes, progress)
    context = {"shapes": shapes, "device": device, "budgets": budgets}
    if hf:
        try:
            llama = hf_model(shapes, device)
        except ImportError as error:
            context["hf_error"] = f"{type(error).__name__}: {error}"
        else:
            hf_budgets, layer_cost_model = _hf_budgets(llama, x)
            context["hf_budgets"] = hf_budgets
            runs += _prepare(hf_cases(hf_budgets), llama, x, shapes, progress,
                             layer_cost_model)
    _time(runs, shapes.rounds, progress)
    return [row for _, row in runs], context


def _our_budgets(model, x, shapes: Shapes) -> list[int]:
    """The budgets at shapes.budget_fractions of [least reachable peak, none's peak], as
    the "budget" policy's planner sees the model."""
    costs = layer_costs(model.layers, x)
    base = tail_cost(model.norm, x)
    lowest = min_peak(costs, *base)
    # none on every layer (plan_layers(inf) would pick "selective", whose recompute has
    # no matmul FLOPs, so the planner's model counts it as free)
    highest = plan_cost(costs, POLICIES["none"].segments(len(costs), {}), *base).peak_bytes
    return [int(lowest + f * (highest - lowest)) for f in shapes.budget_fractions]


def _hf_budgets(llama, x):
    """For the HF Llama: budgets at its HF-checkpointed peak (from measure; or the
    planner's least reachable peak, if that is higher) and halfway from there to none's,
    and a function giving the planner's (kept, peak, recompute) prediction for a case."""
    peaks = {policy: CaseRun(Case("hf", policy), llama, x, GraphFlops()).measured().peak_bytes
             for policy in ("none", HF_GRADIENT_CHECKPOINTING)}
    predict, floor = _layer_cost_model(llama, x)
    low = max(peaks[HF_GRADIENT_CHECKPOINTING], floor)
    return [int(low), int((low + peaks["none"]) / 2)], predict


def _layer_cost_model(llama, x):
    """(predict, floor): predict(case) -> (kept, peak, recompute) of the planner's cost
    model for the HF Llama's layers, called with the arguments the model passes them;
    floor: the least peak the planner reaches."""
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("call", (args[1:], kwargs))

    handle = llama.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            llama(inputs_embeds=x)
    finally:
        handle.remove()
    args, kwargs = captured["call"]
    costs = layer_costs(llama.layers, x, *args, **kwargs)
    base = tail_cost(llama.norm, x)
    count = len(llama.layers)

    def predict(case: Case):
        if case.policy == "budget":
            chosen = plan_layers(costs, dict(case.options)["budget_bytes"], *base)
        elif case.policy == HF_GRADIENT_CHECKPOINTING:
            chosen = plan_cost(costs, _hf_segments(count, dict(case.options)), *base)
        else:
            chosen = plan_cost(costs, POLICIES[case.policy].segments(count, {}), *base)
        return chosen.kept_bytes, chosen.peak_bytes, chosen.recompute_flops
    return predict, min_peak(costs, *base)


def _prepare(cases: list[Case], model, x, shapes: Shapes, progress: bool,
             hf_cost_model=None) -> list[tuple[CaseRun | None, PolicyRow]]:
    """Build, warm up and measure each case (memory and FLOPs; timing comes later)."""
    runs = []
    zero_point = {}  # family -> FLOPs of its "none" step (compiled: of its graphs)
    bar = _bar(len(cases), "preparing cases", progress)
    for case in cases:
        if bar is not None:
            bar.set_postfix_str(case.label)
        row = PolicyRow(case.family, case.label, case.policy, case.storage,
                        case.memory_budget)
        graph_flops = GraphFlops()
        try:
            case_run = CaseRun(case, model, x, graph_flops)
            case_run.warm_up()
            _measure_case(case_run, row, graph_flops, zero_point, shapes, hf_cost_model)
        except Exception as error:  # a failing case is a result: its error is recorded
            row.error = f"{type(error).__name__}: {_first_line(error)}"
            case_run = None
        runs.append((case_run, row))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return runs


def _measure_case(case_run: CaseRun, row: PolicyRow, graph_flops: GraphFlops,
                  zero_point: dict, shapes: Shapes, hf_cost_model) -> None:
    case = case_run.case
    row.checkpointed = case_run.checkpointed()
    case_run.clear_gradients()
    memory = allocator_memory(case_run.loss, case_run.x.device)
    row.allocator_kept, row.allocator_peak = memory.kept_bytes, memory.peak_bytes
    if case.family == "compiled":
        if case.is_baseline:
            zero_point["compiled"] = graph_flops.total
        if "compiled" in zero_point:
            row.recompute_flops = graph_flops.total - zero_point["compiled"]
    else:
        run = case_run.measured()
        row.kept_bytes, row.peak_bytes = run.kept_bytes, run.peak_bytes
        row.recompute_flops = run.recompute_flops
        row.step_flops = run.total_flops - run.recompute_flops
    if case.family == "hf":
        try:
            row.kept_estimate, row.peak_estimate, row.recompute_estimate = hf_cost_model(case)
        except Exception as error:  # the planner's model of HF layers may not apply
            row.error = f"estimate: {type(error).__name__}: {_first_line(error)}"
    elif not (case.family == "compiled" and case.policy == "none"):
        predicted = estimate(shapes.config(), batch=shapes.batch, seq=shapes.seq,
                             policy=case.policy, dtype=shapes.dtype, storage=case.storage,
                             **dict(case.options))
        row.kept_estimate, row.peak_estimate = predicted.kept_bytes, predicted.peak_bytes
        row.recompute_estimate = predicted.recompute_flops
        row.step_flops = row.step_flops or predicted.step_flops


def _time(runs: list[tuple[CaseRun | None, PolicyRow]], rounds: int, progress: bool) -> None:
    """Time every case that ran, interleaved, and fill in the ratios."""
    timed = [(case_run, row) for case_run, row in runs if case_run is not None]
    bar = _bar(rounds, f"timing {len(timed)} cases", progress)
    medians = interleaved_rounds([case_run.step for case_run, _ in timed], rounds, bar)
    if bar is not None:
        bar.close()
    for (_, row), ms in zip(timed, medians, strict=True):
        row.step_ms = ms
    baselines = {case_run.case.family: row.step_ms for case_run, row in timed
                 if case_run.case.is_baseline}
    for case_run, row in timed:
        family = case_run.case.family
        if family in baselines:
            row.step_ratio = row.step_ms / baselines[family]
        if "eager" in baselines and family != "hf":
            row.eager_ratio = row.step_ms / baselines["eager"]


def _bar(total: int, description: str, enabled: bool):
    """A tqdm progress bar, or None if disabled or tqdm is not installed (it comes with
    transformers; a GPU machine without network may lack both)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=description, leave=False)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the arguments, run the benchmark for the device, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer cases and rounds (make gpu-check)")
    parser.add_argument("--no-hf", action="store_true",
                        help="leave out the Hugging Face Llama")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_threads(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = shapes_for(device, args.quick, args.smoke)
    start = time.perf_counter()
    rows, context = run(shapes, device, hf=not args.no_hf)
    context["seconds"] = time.perf_counter() - start
    context["load"] = os.getloadavg()[1]  # the last 5 minutes
    write_results(rows, context, args.out)
    print(f"Done in {context['seconds']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
