"""The policy registry (ckpt_attn.checkpointing.POLICIES) is the one definition every
consumer reads: apply_checkpointing, ckpt_attn.memory.estimate and the command line
accept exactly its policies, options and storages. And the packages import one way:
modules <- checkpointing <- memory <- cli, checked statically (every import,
function-level ones included) and at run time (sys.modules in a fresh interpreter)."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import ckpt_attn
from ckpt_attn import apply_checkpointing, cli
from ckpt_attn.checkpointing import POLICIES, STORAGES
from ckpt_attn.memory import estimate

PACKAGE = Path(ckpt_attn.__file__).resolve().parent
CFG = ckpt_attn.TransformerConfig(num_layers=3, hidden_size=32, num_heads=4, backend="torch")
BUDGET = {"budget_bytes": 10**9}


def options_of(policy):
    return BUDGET if policy.planned else policy.compare


def meta_model():
    with torch.device("meta"):
        return ckpt_attn.Transformer(CFG)


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_is_accepted_everywhere_with_exactly_its_storages(name):
    policy = POLICIES[name]
    assert policy.name == name
    for storage in STORAGES:
        if storage in policy.storages:
            apply_checkpointing(meta_model(), name, storage=storage, **options_of(policy))
            estimate(CFG, batch=1, seq=8, policy=name, storage=storage, dtype=torch.float32,
                     **options_of(policy))
            continue
        message = re.escape(f"storage={storage!r} does not apply to policy {name!r}")
        with pytest.raises(ValueError, match=message):
            apply_checkpointing(meta_model(), name, storage=storage, **options_of(policy))
        with pytest.raises(ValueError, match=message):
            estimate(CFG, batch=1, seq=8, policy=name, storage=storage, **options_of(policy))


def test_the_cli_compares_every_fixed_policy_and_plans_the_planned_one():
    compared = dict(cli.POLICIES)
    assert set(compared) == {name for name, p in POLICIES.items() if p.compare is not None}
    assert {name for name, p in POLICIES.items() if p.compare is None} == {"budget"}
    for name, options in compared.items():
        assert options == POLICIES[name].compare
        POLICIES[name].check(options)


@pytest.mark.parametrize("name", list(POLICIES))
def test_options_are_checked_by_name(name):
    policy = POLICIES[name]
    for option in policy.options:
        with pytest.raises(ValueError, match=re.escape(f"{option.name} must be {option.rule}")):
            apply_checkpointing(meta_model(), name, **(options_of(policy) | {option.name: -1}))
        with pytest.raises(TypeError, match=f"policy {name!r} needs {option.name}"):
            estimate(CFG, batch=1, seq=8, policy=name)
    with pytest.raises(TypeError, match="got unexpected bogus"):
        apply_checkpointing(meta_model(), name, bogus=1, **options_of(policy))


@pytest.mark.parametrize("name", [n for n, p in POLICIES.items() if not p.planned])
def test_fixed_segments_cover_the_chain_and_group_only_if_declared(name):
    policy = POLICIES[name]
    grouped = False
    for num_layers in range(1, 10):
        segments = policy.segments(num_layers, policy.compare)
        assert [s.start for s in segments] == [0] + [s.stop for s in segments[:-1]]
        assert segments[-1].stop == num_layers
        grouped |= any(s.stop - s.start > 1 for s in segments)
    assert grouped == policy.groups


def test_the_planned_policy_has_no_fixed_segments():
    with pytest.raises(ValueError, match="depends on the input's shape"):
        POLICIES["budget"].segments(4, BUDGET)


# --- import direction -----------------------------------------------------------------

LAYERS = {"checkpointing": 1, "memory": 2, "cli": 3, "__init__": 4, "__main__": 4}
"""Rank of each part of ckpt_attn; anything else (modules, ops, backends, ...) is 0.
A module may import only from parts of its own rank or lower."""


def part(module: str) -> str:
    """The part of ckpt_attn a dotted module name (ckpt_attn.x.y) belongs to."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def imports_of(path: Path) -> list[str]:
    """Every ckpt_attn module the file imports, at module level or inside functions."""
    package = list(path.relative_to(PACKAGE.parent).parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names += [f"{module}.{alias.name}" if is_module(f"{module}.{alias.name}")
                      else module for alias in node.names]
    return [name for name in names if name.split(".")[0] == "ckpt_attn"]


def is_module(name: str) -> bool:
    """Whether a dotted ckpt_attn name is a module or package (not an attribute)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent is a module, not a package
        return False


def test_imports_run_one_way_statically():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = "ckpt_attn." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        rank = LAYERS.get(part(source), 0)
        wrong += [f"{source} imports {target}" for target in imports_of(path)
                  if LAYERS.get(part(target), 0) > rank]
    assert wrong == []


RUNTIME_CHECK = textwrap.dedent("""
    import importlib.util, sys, types
    # the package without its __init__ (which imports everything), to see what the
    # subpackages themselves import
    package = types.ModuleType("ckpt_attn")
    package.__path__ = importlib.util.find_spec("ckpt_attn").submodule_search_locations
    sys.modules["ckpt_attn"] = package

    import torch
    from ckpt_attn.checkpointing import apply_checkpointing
    assert "ckpt_attn.memory" not in sys.modules and "ckpt_attn.cli" not in sys.modules
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    try:
        apply_checkpointing(model, "budget", budget_bytes=10**9)
    except RuntimeError as error:
        assert "import ckpt_attn.memory" in str(error), error
    else:
        raise AssertionError("budget without a planner was accepted")

    import ckpt_attn.memory
    assert "ckpt_attn.cli" not in sys.modules
    apply_checkpointing(model, "budget", budget_bytes=10**9)
    model(torch.randn(2, 4, requires_grad=True)).sum().backward()
    print("ok")
""")


def test_imports_run_one_way_at_run_time():
    result = subprocess.run([sys.executable, "-c", RUNTIME_CHECK], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_planner_must_be_callable():
    from ckpt_attn.checkpointing import use_planner

    with pytest.raises(TypeError, match="planner must be callable"):
        use_planner(None)


def test_every_policy_name_is_in_the_bad_policy_error():
    with pytest.raises(ValueError, match=", ".join(POLICIES)):
        apply_checkpointing(nn.Sequential(nn.Linear(2, 2)), "nope")
