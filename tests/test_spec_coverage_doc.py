"""docs/SPEC-COVERAGE.md is what scripts/spec-coverage writes from the catalogue, the knobs
and tests/test_mutations.py (rerun the script after changing any of them)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

TOP = pathlib.Path(__file__).resolve().parents[1]


def test_spec_coverage_doc_is_current() -> None:
    """``scripts/spec-coverage --check`` finds no difference."""
    proc = subprocess.run([sys.executable, str(TOP / "scripts" / "spec-coverage"), "--check"],
                          capture_output=True, text=True, timeout=120, cwd=TOP)
    assert proc.returncode == 0, proc.stderr[-2000:]
