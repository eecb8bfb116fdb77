"""Every Python block of README.md runs as written: in a fresh process, from an empty
folder, with nothing but its own imports.

A block preceded by `<!-- readme-test: cuda -->` needs a CUDA GPU (marked gpu: make
gpu-check runs it); one preceded by `<!-- readme-test: torchrun N FILE -->` is saved as
FILE and started on N ranks (gloo on the CPU), as its first line tells a user to.
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<marker>[^>]*?) -->\n)?```python\n(?P<code>.*?)```",
                   re.DOTALL)
TIMEOUT_S = 600


def blocks() -> list:
    """One pytest param per Python block: (code, marker), its id the heading above it."""
    text = README.read_text()
    params, seen = [], {}
    for match in BLOCK.finditer(text):
        heading = re.findall(r"^#+ (.+)$", text[:match.start()], re.MULTILINE)[-1]
        name = re.sub(r"\W+", "-", heading.lower()).strip("-")
        seen[name] = seen.get(name, 0) + 1
        marker = match["marker"] or ""
        marks = [pytest.mark.gpu] if marker == "cuda" else []
        params.append(pytest.param(match["code"], marker, marks=marks,
                                   id=f"{name}-{seen[name]}"))
    return params


def test_the_readme_has_python_blocks():
    assert len(blocks()) >= 7


@pytest.mark.parametrize("code, marker", blocks())
def test_readme_block_runs_as_written(code, marker, tmp_path):
    if marker == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA: make gpu-check runs it")
    if marker.startswith("torchrun"):
        _, ranks, name = marker.split()
        (tmp_path / name).write_text(code)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", ranks, name]
    else:
        assert marker in ("", "cuda"), f"unknown readme-test marker {marker!r}"
        command = [sys.executable, "-c", code]
    returncode, output = run_bounded(command, tmp_path)
    assert returncode == 0, output[-4000:]


def run_bounded(command: list[str], cwd: Path) -> tuple[int, str]:
    """Run command in its own process group; kill the whole group past TIMEOUT_S."""
    # as a user runs it: not under the Triton interpreter that conftest.py sets for the tests
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {
        "PYTHONSAFEPATH": "1"}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return -signal.SIGKILL, f"timed out after {TIMEOUT_S} s\n{output}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, output
