"""Checkpoint policies as plans: which layers form a recomputed segment, and how.

A plan is a list of Segments covering layers 0..L-1 in order. A segment is
- "none": one layer, everything autograd saves is kept;
- "full": one or more consecutive layers run as one checkpoint region, keeping only
  the segment's input and recomputing the whole segment once in the backward;
- "selective": one layer under torch's selective checkpoint contexts, keeping the
  outputs of matmuls and of the attention op, recomputing the pointwise ops.
"""

from __future__ import annotations

import dataclasses
import math

POLICIES = ("none", "full", "uniform", "sqrt", "ratio", "selective", "budget")
MODES = ("none", "full", "selective")
_OPTIONS = {"uniform": {"every"}, "ratio": {"ratio"}, "budget": {"budget_bytes"}}


@dataclasses.dataclass(frozen=True)
class Segment:
    """Layers start..stop-1 under one mode ("none", "full" or "selective")."""

    start: int
    stop: int
    mode: str

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0 <= self.start < self.stop:
            raise ValueError(f"a segment needs 0 <= start < stop, got {self.start}, {self.stop}")
        if self.mode != "full" and self.stop - self.start != 1:
            raise ValueError(f"a {self.mode!r} segment holds one layer, got "
                             f"{self.start}..{self.stop - 1}")


def check_policy(policy: str, options: dict) -> None:
    """Raise if policy is unknown or options do not fit it (names the bad argument)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    allowed = _OPTIONS.get(policy, set())
    unknown = set(options) - allowed
    if unknown:
        accepted = ", ".join(sorted(allowed)) or "no options"
        raise TypeError(f"policy {policy!r} takes {accepted}; got unexpected "
                        f"{', '.join(sorted(unknown))}")
    missing = allowed - set(options)
    if missing:
        raise TypeError(f"policy {policy!r} needs {', '.join(sorted(missing))}")
    if policy == "uniform":
        every = options["every"]
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
    if policy == "ratio":
        ratio = options["ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) \
                or not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    if policy == "budget":
        budget = options["budget_bytes"]
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0 \
                or not math.isfinite(budget):
            raise ValueError(f"budget_bytes must be a positive number of bytes, got {budget!r}")


def plan_for(policy: str, num_layers: int, options: dict) -> list[Segment]:
    """The segments of a fixed policy (every policy except "budget") over num_layers."""
    check_policy(policy, options)
    if policy == "budget":
        raise ValueError("the 'budget' plan depends on the input's shape; "
                         "ckpt_attn.memory.plan makes it")
    if policy in ("none", "selective"):
        return [Segment(i, i + 1, policy) for i in range(num_layers)]
    if policy == "ratio":
        # rounded first: 0.28 * 25 is 7.000000000000001 in floating point
        recomputed = math.ceil(round(options["ratio"] * num_layers, 9))
        return [Segment(i, i + 1, "full" if i < recomputed else "none")
                for i in range(num_layers)]
    every = {"full": 1, "sqrt": math.ceil(math.sqrt(num_layers))}.get(policy)
    every = options["every"] if every is None else every
    return [Segment(i, min(i + every, num_layers), "full") for i in range(0, num_layers, every)]
