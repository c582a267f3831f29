"""The package's static checks run with the suite, so a clean clone's CI enforces them as it
enforces the tests: ruff's rules and format, and mypy's types over the whole package, its
tests and its benchmarks (both configured in pyproject.toml). ``make lint`` runs the same
commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _clean(*command: str) -> None:
    """Run ``python -m <command>`` in the repository root; fail with its report."""
    done = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}{done.stderr}"


def test_ruff_rules_and_format() -> None:
    _clean("ruff", "check", "service", "tests", "bench")
    _clean("ruff", "format", "--check", "service", "tests", "bench")


@pytest.mark.slow
def test_mypy_checks_the_package_its_tests_and_benchmarks() -> None:
    _clean("mypy", "service/gruserve", "tests", "bench")
