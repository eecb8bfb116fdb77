"""The README's measured tables are the committed results, row for row.

Each table under "## Measured" is read back from the results file the benchmark wrote
(benchmarks/results/cpu_results.md, policies.md), so a rerun that changes a figure fails
here until the README says the same.
"""

import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# README policy table's case names -> policies.md's "Every policy, eager" case names
POLICY_CASES = {"none": "none", "full": "full", "uniform every=2": "uniform every=2",
                "sqrt": "sqrt", "ratio 0.5": "ratio ratio=0.5", "selective": "selective",
                "budget 67 MiB": "budget budget_bytes=67.3MiB", "full, int8 storage": "full int8"}


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """The cells of each row of the markdown table whose header starts with header_start."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def section(text: str, heading: str) -> str:
    """The text of the section under heading, up to the next heading of its level."""
    level = heading.split()[0]
    body = text.split(heading + "\n", 1)[1]
    return re.split(rf"^{level} ", body, maxsplit=1, flags=re.MULTILINE)[0]


@pytest.fixture(scope="module")
def measured() -> str:
    return section((ROOT / "README.md").read_text(), "## Measured")


def test_saved_bytes_table_is_cpu_results(measured):
    readme = table_rows(measured, "| S | ckpt_attn")
    results = {row[0]: row for row in table_rows((RESULTS / "cpu_results.md").read_text(),
                                                 "| S | causal | ckpt_attn")
               if row[1] == "False"}
    assert readme
    for seqlen, ckpt_attn, naive, ratio in readme:
        row = results[seqlen]
        assert (ckpt_attn, naive, ratio) == (row[2], row[4], row[8]), seqlen


def test_policy_table_is_policies_md(measured):
    readme = table_rows(measured, "| policy | step time x none")
    results = {row[0]: row for row in table_rows((RESULTS / "policies.md").read_text(),
                                                 "| case | x none | x eager")}
    assert [row[0] for row in readme] == list(POLICY_CASES)
    for name, time, kept, peak, recompute in readme:
        row = results[POLICY_CASES[name]]
        assert time == str(Decimal(row[1]).quantize(Decimal("0.01"), ROUND_HALF_UP)), name
        assert (kept, peak) == (row[3].split(" / ")[0], row[4].split(" / ")[0]), name
        measured_recompute = row[6].split(" / ")[0]
        assert recompute.split()[0] == ("0" if float(measured_recompute) == 0
                                        else measured_recompute), name
