"""The qemu tier (suites/test_qemu.py) runs only when asked: the default collection leaves the
VU-QEMU-* cases out, ``--vhost-qemu`` (``vhost-conformance run --qemu``) brings them in, and
``--vhost-case VU-QEMU-n`` alone selects one. Collection only: no QEMU is started here (the
cases themselves run in tests/test_mutations.py and the tier's own runs)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest


def _collected(tmp_path: pathlib.Path, *options: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "--pyargs", "vhost_conformance.suites.test_qemu", "vhost_conformance.suites.test_reset",
         "-o", "addopts=", "--rootdir", str(tmp_path), *options],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode in (0, 5), proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


@pytest.mark.parametrize(
    ("options", "qemu_cases"),
    [((), 0), (("--vhost-qemu",), 6), (("--vhost-case", "VU-QEMU-4"), 1)],
    ids=["default", "qemu", "one-case"],
)
def test_qemu_tier_runs_only_when_asked(
    tmp_path: pathlib.Path, options: tuple[str, ...], qemu_cases: int
) -> None:
    """The VU-QEMU cases collected with each option set (test_reset's case as a control)."""
    items = _collected(tmp_path, *options)
    assert sum("::test_qemu_" in item for item in items) == qemu_cases, items
    if not options or options == ("--vhost-qemu",):
        assert any("::test_reset_device" in item for item in items), items
