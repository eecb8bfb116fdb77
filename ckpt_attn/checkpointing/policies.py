"""The checkpoint policies, each defined once: POLICIES maps a name to its Policy.

A policy turns a chain of layers into a plan: a list of Segments covering layers
0..L-1 in order. A segment is
- "none": one layer, everything autograd saves is kept;
- "full": one or more consecutive layers run as one checkpoint region, keeping only
  the segment's input and recomputing the whole segment once in the backward;
- "selective": one layer under torch's selective checkpoint contexts, keeping the
  outputs of matmuls and of the attention op, recomputing the pointwise ops.

apply_checkpointing, ckpt_attn.memory.estimate / plan and the command line all read
POLICIES: the names, the options and their checks, the storages each policy takes
and its segments come from here only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from fractions import Fraction

from .storage import STORAGES

MODES = ("none", "full", "selective")


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


@dataclasses.dataclass(frozen=True)
class Option:
    """A policy's keyword option: its name, the rule its value must follow (for errors:
    "<name> must be <rule>") and the test of that rule."""

    name: str
    rule: str
    accepts: Callable[[object], bool]

    def check(self, value) -> None:
        """Raise ValueError, naming the option, unless value follows the rule."""
        if not self.accepts(value):
            raise ValueError(f"{self.name} must be {self.rule}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Policy:
    """One checkpoint policy.

    name: what apply_checkpointing, estimate and the CLI call it. keeps: what autograd
    keeps under it. options: its keyword options, all required. storages: the storage
    modes it takes, and storage_rule: why it takes no others. chain(num_layers,
    options): its segments; None for a policy planned per input shape ("budget").
    groups: whether it may run several layers as one segment (which needs a model
    that calls its layers as a plain chain). compare: the options `ckpt-attn estimate`
    shows it with; None to leave it out of that table.
    """

    name: str
    keeps: str
    chain: Callable[[int, dict], list[Segment]] | None
    options: tuple[Option, ...] = ()
    storages: tuple[str, ...] = STORAGES
    storage_rule: str = ""
    groups: bool = False
    compare: dict | None = dataclasses.field(default_factory=dict)

    @property
    def planned(self) -> bool:
        """Whether its segments depend on the input (planned from measured costs)."""
        return self.chain is None

    def check(self, options: dict, storage: str = "device") -> None:
        """Raise, naming the argument, unless options and storage fit this policy."""
        names = {option.name for option in self.options}
        unknown = set(options) - names
        if unknown:
            accepted = ", ".join(sorted(names)) or "no options"
            raise TypeError(f"policy {self.name!r} takes {accepted}; got unexpected "
                            f"{', '.join(sorted(unknown))}")
        missing = names - set(options)
        if missing:
            raise TypeError(f"policy {self.name!r} needs {', '.join(sorted(missing))}")
        for option in self.options:
            option.check(options[option.name])
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        if storage not in self.storages:
            raise ValueError(f"storage={storage!r} does not apply to policy {self.name!r}: "
                             f"{self.storage_rule}; it takes storage "
                             f"{' or '.join(map(repr, self.storages))}")

    def segments(self, num_layers: int, options: dict) -> list[Segment]:
        """Its plan over a chain of num_layers layers (not for a planned policy)."""
        if self.planned:
            raise ValueError(f"the {self.name!r} plan depends on the input's shape; "
                             f"ckpt_attn.memory.plan makes it")
        self.check(options)
        return self.chain(num_layers, options)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _per_layer(mode: str) -> Callable[[int, dict], list[Segment]]:
    return lambda num_layers, options: [Segment(i, i + 1, mode) for i in range(num_layers)]


def _groups(num_layers: int, every: int) -> list[Segment]:
    return [Segment(i, min(i + every, num_layers), "full") for i in range(0, num_layers, every)]


def _ratio(num_layers: int, options: dict) -> list[Segment]:
    # ratio as the decimal it was written as (0.28 is 7/25, so 0.28 * 25 is 7, not the
    # float product 7.000000000000001), exactly: a tiny ratio still recomputes one layer
    recomputed = math.ceil(Fraction(repr(options["ratio"])) * num_layers)
    return [Segment(i, i + 1, "full" if i < recomputed else "none") for i in range(num_layers)]


_RECOMPUTES_NOTHING = ("policy 'none' recomputes nothing, and int8/fp8 quantize the inputs "
                       "of recomputed layers")

POLICIES: dict[str, Policy] = {policy.name: policy for policy in (
    Policy("none", "everything (no checkpointing; removes an earlier policy)",
           _per_layer("none"), storages=("device", "cpu"), storage_rule=_RECOMPUTES_NOTHING),
    Policy("full", "each layer's input; each layer recomputed once in the backward",
           _per_layer("full")),
    Policy("sqrt", 'the input of each group of ceil(sqrt(L)) layers ("uniform" with that '
                   "every)",
           lambda num_layers, options: _groups(num_layers, math.ceil(math.sqrt(num_layers))),
           groups=True),
    Policy("selective", "per layer, the outputs of matmuls and of the attention op (o, lse; "
                        "ours or the fused kernel of torch's scaled_dot_product_attention) "
                        "through torch's selective checkpoint contexts; the pointwise ops "
                        "(norms, rotary, activations, dropout) are recomputed, no matmul is",
           _per_layer("selective"), storages=("device",),
           storage_rule="its kept tensors live in torch's selective-checkpoint cache"),
    Policy("uniform", "the input of each group of `every` layers, each group recomputed once",
           lambda num_layers, options: _groups(num_layers, options["every"]),
           options=(Option("every", "an int >= 1", lambda value: isinstance(value, int)
                           and not isinstance(value, bool) and value >= 1),),
           groups=True, compare={"every": 2}),
    Policy("ratio", '"full" on the first ceil(ratio * L) layers, "none" on the rest', _ratio,
           options=(Option("ratio", "in (0, 1]",
                           lambda value: _is_number(value) and 0.0 < value <= 1.0),),
           compare={"ratio": 0.5}),
    Policy("budget", "the plan with the least recompute whose predicted peak activation "
                     "memory fits budget_bytes, planned on the first forward of each input "
                     "shape from the layers' costs measured on shape-only (fake) copies",
           None, options=(Option("budget_bytes", "a positive number of bytes",
                                 lambda value: _is_number(value) and 0 < value < math.inf),),
           groups=True, compare=None),
)}


def get_policy(name: str, options: dict, storage: str = "device") -> Policy:
    """The Policy called name, after checking options and storage against it (errors name
    the bad argument)."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {name!r}")
    policy = POLICIES[name]
    policy.check(options, storage)
    return policy
