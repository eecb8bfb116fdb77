"""bench_policies' results: policies.csv (every row), policies.md (the tables and what
they say) and policies.png (step time and recompute against kept memory).

The matched-memory comparison: three memory levels at 25%, 50% and 75% of the way from
the least activation memory any case kept to what "none" keeps (allocator_kept: the
bytes held between forward and backward, the one figure that is exact for eager and
compiled code alike; the allocator's peak also holds the parameter gradients made so
far, which at the CPU shapes are as large as the activations and flatten every
checkpointed case's peak to the same value); at each, per planner, the case with the
least recompute FLOPs among those that fit, and its step time.

The chapter's arithmetic: with a fraction c of the layers checkpointed, a step costs
F(3 + c) instead of 3F, an overhead of c/3 (33% for full checkpointing).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import os
import platform
from pathlib import Path

import torch

MIB = 2**20
LEVELS = (0.25, 0.5, 0.75)


def write_results(rows: list, context: dict, out_dir: Path) -> str:
    """Write policies.csv, policies.png (if matplotlib is installed) and policies.md
    under out_dir; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "policies.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, [f.name for f in dataclasses.fields(rows[0])])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(row) for row in rows)
    plotted = write_plot(rows, context, out_dir / "policies.png")
    text = markdown(rows, context, plotted)
    (out_dir / "policies.md").write_text(text)
    return text


# ------------------------------------------------------------------------ grouping

def planners(rows: list) -> dict[str, list]:
    """The cases each planner can choose from, per model: our policies in eager mode
    (device storage) and compiled, torch's solver (compiled "none" at each budget), and
    on the HF Llama, HF's checkpointing and our policies."""
    ok = [r for r in rows if not r.error or r.error.startswith("estimate:")]
    return {
        "ours, eager": [r for r in ok if r.family == "eager" and r.storage == "device"],
        "ours, compiled": [r for r in ok if r.family == "compiled" and r.policy != "none"],
        "torch's solver": [r for r in ok if r.family == "compiled" and r.policy == "none"],
        "HF gradient_checkpointing": [r for r in ok if r.family == "hf"
                                      and r.policy in ("none", "hf-gc")],
        "ours on the HF Llama": [r for r in ok if r.family == "hf" and r.policy != "hf-gc"],
    }


def baseline(rows: list, family: str):
    """The family's "none" row (the one its step ratios are relative to), or None."""
    return next((r for r in rows if r.family == family and r.policy == "none"
                 and r.storage == "device" and r.memory_budget == 1.0 and not r.error), None)


def memory_levels(rows: list, family: str, candidates: list) -> list[float]:
    """The matched levels for the model of `family`: LEVELS of the way from the least
    allocator_kept among candidates to the family's none's."""
    top = baseline(rows, family)
    kept = [r.allocator_kept for r in candidates if r.allocator_kept is not None]
    if top is None or not kept:
        return []
    low = min(kept)
    return [low + f * (top.allocator_kept - low) for f in LEVELS]


def best_within(candidates: list, level: float):
    """The case with the least recompute FLOPs (then the fastest) whose allocator_kept
    fits level, or None."""
    fitting = [r for r in candidates if r.allocator_kept is not None
               and r.allocator_kept <= level and r.recompute_flops is not None
               and r.step_ms is not None]
    return min(fitting, key=lambda r: (r.recompute_flops, r.step_ms), default=None)


def step_flops(rows: list, family: str) -> int | None:
    """Forward + backward FLOPs without recompute of the family's model."""
    source = baseline(rows, "hf" if family == "hf" else "eager")
    return None if source is None else source.step_flops


# ------------------------------------------------------------------------ markdown

def markdown(rows: list, context: dict, plotted: bool) -> str:
    """policies.md: setup, the tables, the matched-memory comparison, the chapter check."""
    shapes = context["shapes"]
    cfg = shapes.config()
    parts = [
        "# Checkpoint policies: step time against activation memory", "",
        f"{_environment(context['device'])}. Written by `ckpt-attn bench` (bench_policies)"
        f" in {context.get('seconds', 0):.0f} s{_load(context)}.", "",
        f"Model: ckpt_attn.Transformer, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_heads} heads ({cfg.num_kv_heads} kv), SwiGLU {cfg.ffn_hidden_size}, "
        f"{str(shapes.dtype).removeprefix('torch.')}, batch {shapes.batch} x {shapes.seq} "
        f"tokens, attention backend {cfg.backend}. HF: transformers' LlamaModel with the "
        "same layer shapes (its default attention, run on inputs_embeds).", "",
        "How it is measured: step = forward + backward of a mean-square loss; time = median "
        f"of {shapes.rounds} interleaved rounds of every case in one run, as a ratio to the "
        "family's `none` (x none) and to eager `none` (x eager). `measure` = "
        "ckpt_attn.memory.measure (activation bytes autograd keeps, and the peak during the "
        "backward); `est.` = ckpt_attn.memory's prediction beside it. `alloc.` = the "
        "allocator above the step's start (CPU: the profiler's allocation events; CUDA: "
        "max_memory_allocated), steps starting from no parameter gradients, so the peak "
        "counts the gradients made so far; the one figure that sees inside compiled code. "
        "Recompute "
        "FLOPs count matmuls and attention (FlopCounterMode's formulas; pointwise ops count "
        "0), as % of the step's FLOPs without recompute; for compiled cases, from the graphs "
        "inductor compiled, less those of compiled `none` under torch's default budget.", "",
    ]
    if plotted:
        parts += ["![step time and recompute against kept memory](policies.png)", ""]
    for family, title in (("eager", "Every policy, eager"),
                          ("compiled", "torch.compile: torch's solver and our policies"),
                          ("hf", "Hugging Face Llama")):
        family_rows = [r for r in rows if r.family == family]
        if family_rows:
            parts += [f"## {title}", "", _policy_table(family_rows, rows, family), ""]
    if "hf_error" in context:
        parts += [f"Hugging Face cases not run: {context['hf_error']}", ""]
    parts += _matched_section(rows)
    parts += _chapter_section(rows)
    return "\n".join(parts)


def _policy_table(family_rows: list, rows: list, family: str) -> str:
    total = step_flops(rows, family)
    header = ("case", "x none", "x eager", "kept MiB measure / est.",
              "peak MiB measure / est.", "alloc. kept / peak MiB", "recompute % measure / est.",
              "error")
    lines = []
    for r in family_rows:
        lines.append((
            r.label, _num(r.step_ratio), _num(r.eager_ratio),
            _pair(r.kept_bytes, r.kept_estimate, MIB), _pair(r.peak_bytes, r.peak_estimate, MIB),
            _pair(r.allocator_kept, r.allocator_peak, MIB),
            _pair(_percent(r.recompute_flops, total), _percent(r.recompute_estimate, total), 1),
            r.error.replace("|", "/"),
        ))
    return table(header, lines)


def _matched_section(rows: list) -> list[str]:
    groups = planners(rows)
    lines, verdicts = [], []
    for family, names in (("eager", ("ours, eager", "ours, compiled", "torch's solver")),
                          ("hf", ("HF gradient_checkpointing", "ours on the HF Llama"))):
        model = "Transformer" if family == "eager" else "HF Llama"
        everything = [r for name in names for r in groups[name]]
        total = step_flops(rows, family)
        for share, level in zip(LEVELS, memory_levels(rows, family, everything), strict=False):
            chosen = {name: best_within(groups[name], level) for name in names}
            verdicts.append(_verdict(model, level, chosen, total))
            for name in names:
                best = chosen[name]
                if best is None:
                    lines.append((model, f"{level / MIB:,.1f} ({share:.0%})", name,
                                  "nothing fits", "", "", "", ""))
                    continue
                lines.append((model, f"{level / MIB:,.1f} ({share:.0%})", name, best.label,
                              _pair(best.allocator_kept, best.allocator_peak, MIB),
                              _num(_percent(best.recompute_flops, total), 1),
                              _num(best.step_ratio), _num(best.eager_ratio)))
    if not lines:
        return []
    return ["## At matched memory", "",
            "Levels: 25/50/75% of the way from the least activation memory any case kept "
            "(allocator, between forward and backward) to what `none` keeps. Per planner, the "
            "case that fits with the least recompute FLOPs (then the fastest). Matched on "
            "kept bytes, not the allocator's peak: the peak also holds the parameter "
            "gradients made so far (all of them by the end of the backward), as large as "
            "the activations at these shapes, so every checkpointed case peaks alike.", "",
            table(("model", "kept level MiB", "planner", "case", "alloc. kept / peak MiB",
                   "recompute %",
                   "x none", "x eager"), lines), "", *verdicts, "", SOLVER_NOTE, ""]


SOLVER_NOTE = (
    "What each planner can choose. torch's solver works on the joint graph of the whole "
    "compiled step and decides per tensor: it can keep a layer's matmul outputs and drop "
    "the pointwise results, or recompute one matmul and keep the rest, and its budget is "
    "a fraction of its own estimate of activation memory, not bytes. Our planner decides "
    "per layer among none, selective (pointwise only) and full segments (one layer or a "
    "group); between selective's peak and full's it recomputes whole layers, every matmul "
    "up to the last tensor the backward needs. It takes a budget in bytes and lands at or "
    "under it, by measure's count. Compiled, our checkpointed regions go through "
    "inductor's partitioner too, so what a policy recomputes compiled can differ from "
    "the eager count the estimate gives (the compiled rows show both).")


def _verdict(model: str, level: float, chosen: dict, total) -> str:
    """One line: at this level, which planner recomputes least and which steps fastest
    (step time relative to eager none; the HF Llama's cases to HF none)."""
    found = {name: row for name, row in chosen.items() if row is not None}
    if not found:
        return f"- {model}, {level / MIB:,.1f} MiB: no planner fits."
    least = min(found, key=lambda name: found[name].recompute_flops)
    fastest = min(found, key=lambda name: found[name].eager_ratio or found[name].step_ratio)
    row = found[fastest]
    return (f"- {model}, {level / MIB:,.1f} MiB: least recompute: {least} "
            f"({_num(_percent(found[least].recompute_flops, total), 1)}% of the step); "
            f"fastest: {fastest} ({_num(row.eager_ratio or row.step_ratio)}).")


def _chapter_section(rows: list) -> list[str]:
    lines, notes = [], []
    for r in rows:
        if r.family == "compiled" or r.storage != "device" or r.error or r.checkpointed is None:
            continue
        total = step_flops(rows, r.family)
        flop_ratio = None if total is None or r.recompute_flops is None \
            else 1 + r.recompute_flops / total
        lines.append((f"{r.family}: {r.label}", _num(r.checkpointed), _num(1 + r.checkpointed / 3),
                      _num(flop_ratio), _num(r.step_ratio)))
    if not lines:
        return []
    full = next((r for r in rows if r.family == "eager" and r.policy == "full"
                 and r.storage == "device" and not r.error), None)
    selective = next((r for r in rows if r.family == "eager" and r.policy == "selective"
                      and not r.error), None)
    none = baseline(rows, "eager")
    if full is not None and none is not None and none.step_flops:
        share = full.recompute_flops / none.step_flops
        notes.append(
            f"- full: the chapter predicts 1.333. FLOPs give {1 + share:.3f}: the recompute "
            f"is {share:.1%} of the step, "
            "less than a third because (1) non-reentrant checkpointing stops recomputing "
            "after the last tensor the backward needs, so each layer's last matmul (the MLP "
            "down projection) is not rerun, and (2) the attention backward recomputes the "
            "score tiles inside the kernel (its backward is 2.5x its forward, not 2x), so the "
            "step is more than 3F while the checkpoint recompute adds nothing for it. "
            f"Measured time: {_num(full.step_ratio)}; time is not FLOPs: the recomputed "
            "pointwise ops (norms, rotary, SiLU) and the attention forward are "
            "memory-bound or run below matmul speed, which moves the time ratio away from "
            "the FLOP ratio.")
    if selective is not None and none is not None:
        notes.append(
            f"- selective: ours keeps matmul and attention outputs and recomputes only "
            f"pointwise ops: 0 recompute FLOPs, peak "
            f"{_ratio(selective.peak_bytes, none.peak_bytes)} of none's, measured time "
            f"{_num(selective.step_ratio)}. The chapter's "
            "\"selective\" checkpoints every other layer (c = 0.5, 16.7%, half the memory), a "
            "different policy: that is our ratio=0.5. Korthikanti et al. report 2-4% for "
            "this kind of selective recompute on GPUs.")
    sqrt = next((r for r in rows if r.family == "eager" and r.policy == "sqrt"
                 and not r.error), None)
    if sqrt is not None:
        notes.append(
            f"- sqrt: the chapter's diagram puts it at 3.33F (11%), but every layer sits in "
            f"a recomputed group (c = 1), so it costs what full costs: measured "
            f"{_num(sqrt.step_ratio)}; what it saves over full is not memory either "
            "(one input per group, but a whole group's activations live during its "
            "backward).")
    return ["## The chapter's arithmetic, checked", "",
            "c: fraction of layers in recomputed segments. Chapter: 1 + c/3. FLOPs: 1 + "
            "measured recompute / step FLOPs. Time: measured step ratio to `none`.", "",
            table(("case", "c", "chapter", "FLOPs", "time"), lines), "", *notes, ""]


# ------------------------------------------------------------------------ plot

def chapter_points(num_layers: int) -> list[tuple[str, float, float]]:
    """(name, peak as a fraction of none's, step ratio) as the chapter claims them:
    memory in layer units (none L, 50% 0.5L + sqrt(L), sqrt 2 sqrt(L), full 1),
    time from its Pareto diagram (3F, 3.5F, 3.33F, 4F) and its every-other-layer
    "selective" (half the memory, c = 0.5)."""
    root = math.sqrt(num_layers)
    return [("none", 1.0, 1.0), ("50%", (0.5 * num_layers + root) / num_layers, 3.5 / 3),
            ("sqrt", 2 * root / num_layers, 3.33 / 3), ("full", 1 / num_layers, 4 / 3),
            ("selective", 0.5, 3.5 / 3)]


PLANNER_MARKERS = {"ours, eager": "o", "ours, compiled": "s", "torch's solver": "^",
                   "HF gradient_checkpointing": "D", "ours on the HF Llama": "v"}
POLICY_MARKERS = "os^Dv<>pPX*hH8d"
CHAPTER_MARKERS = "x+123"


def write_plot(rows: list, context: dict, path: Path) -> bool:
    """Three panels, every one against the bytes kept between forward and backward (the
    allocator's): our eager policies' step time, each case its own marker; every
    planner's step time; every planner's recompute, with the chapter's claims. Each
    marker is in a legend, no point is labelled in place. False (and nothing written)
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ours, time, recompute) = plt.subplots(1, 3, figsize=(19, 6.5))
    eager = [r for r in planners(rows)["ours, eager"] + [
        r for r in rows if r.family == "eager" and r.storage != "device" and not r.error]
        if r.allocator_kept is not None and r.step_ratio]
    for r, marker in zip(eager, itertools.cycle(POLICY_MARKERS)):
        ours.scatter([r.allocator_kept / MIB], [r.step_ratio], marker=marker, s=45,
                     label=r.label)
    ours.set(title="Our policies, eager (ckpt_attn.Transformer)", ylabel="step time / none")
    ours.legend(fontsize=7, ncol=2)
    for name, group in planners(rows).items():
        shown = [r for r in group if r.allocator_kept is not None]
        timed = [r for r in shown if r.eager_ratio or r.step_ratio]
        time.scatter([r.allocator_kept / MIB for r in timed],
                     [r.eager_ratio or r.step_ratio for r in timed],
                     marker=PLANNER_MARKERS[name], s=45, label=name)
        counted = [(r.allocator_kept / MIB, _percent_of_step(rows, r)) for r in shown]
        counted = [(x, y) for x, y in counted if y is not None]
        if counted:
            recompute.scatter(*zip(*counted, strict=True), marker=PLANNER_MARKERS[name], s=45,
                              label=name)
    time.set(title="Every planner: step time",
             ylabel="step time / none (Transformer: eager none; HF Llama: HF none)")
    time.legend(fontsize=8)
    none = baseline(rows, "eager")
    if none is not None and none.allocator_kept:
        for (name, f, t), marker in zip(chapter_points(context["shapes"].num_layers),
                                        CHAPTER_MARKERS, strict=True):
            recompute.scatter([f * none.allocator_kept / MIB], [100 * (t - 1)],
                              marker=marker, color="black", s=70, label=f"chapter: {name}")
    recompute.set(title="Every planner: recompute",
                  ylabel="recompute, % of the step's FLOPs without it")
    recompute.legend(fontsize=8)
    for ax in (ours, time, recompute):
        ax.set_xlabel("kept between forward and backward, MiB (allocator)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _percent_of_step(rows: list, row) -> float | None:
    total = step_flops(rows, row.family)
    if row.recompute_flops is None or not total:
        return None
    return 100 * row.recompute_flops / total


# ------------------------------------------------------------------------ formatting

def table(headers, lines) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(cell) for cell in line) + " |" for line in lines]
    return "\n".join(out)


def _environment(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
            f"threads, torch {torch.__version__}")


def _load(context: dict) -> str:
    if "load" not in context:
        return ""
    return (f"; load average {context['load']:.1f} on {os.cpu_count()} cores during it "
            "(other processes share the machine: above the core count, time ratios are noisy)")


def _num(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _pair(first, second, unit) -> str:
    scale = (lambda v: "-" if v is None else f"{v / unit:,.1f}")
    return f"{scale(first)} / {scale(second)}"


def _percent(flops, total):
    return None if flops is None or not total else 100.0 * flops / total


def _ratio(part, whole) -> str:
    return "-" if part is None or not whole else f"{part / whole:.0%}"
