"""The qemu tier (suites/test_qemu.py) runs only when asked: the default collection leaves the
VU-QEMU-* cases out, ``--vhost-qemu`` (``vhost-conformance run --qemu``) brings them in, and
``--vhost-case VU-QEMU-n`` alone selects one. Collection only: no QEMU is started here (the
cases themselves run in tests/test_mutations.py and the tier's own runs)."""

from __future__ import annotations

import json
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
    [((), 0), (("--vhost-qemu",), 9), (("--vhost-case", "VU-QEMU-4"), 1)],
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


@pytest.mark.peer("qemu-11.1")
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "qsd-11.1"])
def test_fidelity_against_real_qemu(tmp_path: pathlib.Path, backend: str) -> None:
    """VU-QEMU-1 (one guest boot, ~15 s): the guest passes and the emulated connect, start,
    I/O and stop sequence equals QEMU 11.1.3's on the same back-end (0 differences)."""
    from vhost_conformance.peers.provision import PeerUnavailable, peer_path

    for name in ("qemu-system-x86_64-11.1", "guest-kernel", "guest-initrd",
                 *(["qsd-11.1"] if backend == "qsd-11.1" else [])):  # fmt: skip
        try:
            peer_path(name)
        except PeerUnavailable as exc:
            pytest.skip(str(exc))
    report = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "vhost_conformance.cli", "run", "--backend", backend,
         "--case", "VU-QEMU-1", "-n", "0", "--report", str(report)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    data = json.loads((report / "report.json").read_text())
    (result,) = data["cases"]
    assert result["verdict"] == "pass", (result["reason"], proc.stdout[-2000:])
    measured = result["measurements"]
    assert measured["fidelity_boot_differences"] == 0 and measured["fidelity_boot_messages"] > 30
    assert any(e["name"] == "GET_VRING_BASE" for e in result["trace"]), "QEMU's trace reported"
