"""What tools/client_hf.py and tools/client_torch_mha.py share: run a client's own test
suite under pytest, record every test's outcome, print the tally and the failures."""

from __future__ import annotations

import collections
import json

import pytest


class Outcomes:
    """pytest plugin: the outcome of every test (a failing setup or teardown counts)."""

    def __init__(self):
        self.by_test = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            if report.outcome == "skipped" and hasattr(report, "wasxfail"):
                outcome = "xfailed"
            else:
                outcome = report.outcome
            if self.by_test.get(report.nodeid) != "failed":
                self.by_test[report.nodeid] = outcome


def split_pytest_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the script's own arguments, those after `--`, which go to pytest)."""
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def run_suite(paths: list[str], pytest_args: list[str], label: str,
              outcomes_file: str | None) -> int:
    """Run the tests at paths; print the tally and each failure under label; write
    {test id: outcome} as JSON to outcomes_file if given. Returns pytest's exit code."""
    outcomes = Outcomes()
    code = pytest.main([*paths, "-q", "-p", "no:cacheprovider", *pytest_args],
                       plugins=[outcomes])
    tally = collections.Counter(outcomes.by_test.values())
    print(f"\n== {label}: {len(outcomes.by_test)} tests: "
          + ", ".join(f"{n} {outcome}" for outcome, n in sorted(tally.items())))
    for test, outcome in sorted(outcomes.by_test.items()):
        if outcome == "failed":
            print(f"FAILED {test}")
    if outcomes_file:
        with open(outcomes_file, "w") as f:
            json.dump(outcomes.by_test, f, indent=1, sort_keys=True)
    return int(code)
