"""The checkout never shadows an installed package, and the wheel ships what the CLI runs.

The repository keeps the user's layout: kernels/ and benchmarks/ at the top, installed as
ckpt_attn.kernels and ckpt_attn.benchmarks. A top-level folder that reached sys.path
ahead of site-packages would hide PyPI packages of the same name (Hugging Face's
`kernels`, which transformers imports), so nothing the project runs puts the root there.
"""

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the checkout (or unpacked sdist)
PACKAGES = sorted(path.parent.name for path in ROOT.glob("*/__init__.py"))
"""The checkout's top-level folders that are Python packages."""


def installed(name: str) -> bool:
    """Whether a distribution of that name is installed (not a folder of the checkout)."""
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_the_checkout_has_the_users_layout():
    assert {"ckpt_attn", "kernels", "benchmarks"} <= set(PACKAGES)


@pytest.mark.parametrize("name", [name for name in PACKAGES if name != "ckpt_attn"])
def test_no_folder_of_the_checkout_is_importable_by_its_own_name(name):
    """In this pytest process (as `make test` starts it) kernels/ or benchmarks/ is found
    as the installed package of that name, or not at all; never as the folder."""
    spec = importlib.util.find_spec(name)
    origin = None if spec is None else Path(spec.origin or next(iter(
        spec.submodule_search_locations))).resolve()
    assert origin is None or ROOT / name not in [origin, *origin.parents], (
        f"{name!r} resolves to the checkout's {name}/ ({origin}): the repository root is on "
        f"sys.path ({sys.path[:3]}...); run `make test`, or pytest with PYTHONSAFEPATH=1")


def makefile_environment() -> dict[str, str]:
    """The variables the Makefile exports to every command it runs."""
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(r"^export (\w+) := (\S+)$", text, re.MULTILINE))


def test_a_python_the_makefile_starts_at_the_root_imports_the_installed_kernels():
    """`python -c` / `-m` from the root, with the Makefile's environment, as its bench,
    codegen and pytest commands start: transformers' hub_kernels imports, and `kernels` is
    the installed package when one is installed."""
    environment = makefile_environment()
    assert environment.get("PYTHONSAFEPATH") == "1"
    code = ("import importlib.util, sys\n"
            "import transformers.integrations.hub_kernels\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec.origin if spec else None)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300,
                            env=os.environ | environment)
    assert result.returncode == 0, result.stderr[-2000:]
    origin = result.stdout.strip().splitlines()[-1]
    if installed("kernels"):
        assert origin != "None", "the installed kernels package is not found"
        assert not Path(origin).resolve().is_relative_to(ROOT / "kernels"), origin
    else:
        assert origin == "None"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel `pip wheel` builds from the checkout."""
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                             "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = out.glob("ckpt_attn-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_ships_the_benchmarks_and_kernels_inside_ckpt_attn(wheel):
    names = set(wheel.namelist())
    for module in ("__init__", "bench_attention", "bench_policies", "policy_cases",
                   "policy_measure", "policy_report", "codegen", "tune"):
        assert f"ckpt_attn/benchmarks/{module}.py" in names
    for module in ("__init__", "forward", "backward", "launch_config", "masking"):
        assert f"ckpt_attn/kernels/{module}.py" in names
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(
        ".dist-info")}
    assert tops == {"ckpt_attn"}, tops  # no top-level kernels/, benchmarks/ or tests/
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "ckpt-attn = ckpt_attn.cli:main" in wheel.read(entry_points).decode()
    assert "ckpt_attn/py.typed" in names


def test_the_wheel_carries_its_license_and_classifiers(wheel):
    names = wheel.namelist()
    metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License: Apache-2.0" in metadata
    assert "Classifier: Programming Language :: Python :: 3.10" in metadata
    assert "Classifier: Typing :: Typed" in metadata
    # the torch backend serves CPU-only installs: triton only through the extra
    triton = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: triton")]
    assert triton and all('extra == "triton"' in line or 'extra == "test"' in line
                          for line in triton), triton
    (license_file,) = [n for n in names if n.endswith("LICENSE")]
    assert b"Apache License" in wheel.read(license_file)


def test_without_triton_the_torch_backend_serves_and_triton_is_refused_by_name():
    """A CPU-only install has no triton (it is an extra): ckpt_attn imports, attention
    runs on the torch backend, and backend='triton' says which extra brings it."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, ckpt_attn\n"
            "q = torch.randn(1, 2, 33, 16, requires_grad=True)\n"
            "ckpt_attn.attention(q, q, q, causal=True).sum().backward()\n"
            "assert q.grad is not None\n"
            "try:\n"
            "    ckpt_attn.attention(q, q, q, backend='triton')\n"
            "except ValueError as error:\n"
            "    print(error)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pip install 'ckpt-attn[triton]'" in result.stdout
