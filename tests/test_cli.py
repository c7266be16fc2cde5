"""The vhost-conformance command: usage errors exit 2 with one line; probe and catalogue work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vhost_conformance.cli import main


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhost_conformance.cli", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )


def _one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_no_command_is_usage_error() -> None:
    assert main([]) == 2


def test_help_on_every_command() -> None:
    for cmd in ("run", "report", "cases", "backends", "probe"):
        proc = _run(cmd, "--help")
        assert proc.returncode == 0, proc.stderr
        assert "usage: vhost-conformance " + cmd in proc.stdout


def test_unknown_backend_exit_2() -> None:
    _one_line_error(_run("run", "--backend", "no-such-backend"), "no-such-backend")


def test_backend_cmd_without_socket_placeholder_exit_2() -> None:
    _one_line_error(_run("run", "--backend-cmd", "my-server --disk {disk}"), "{socket}")


def test_unreadable_profile_exit_2(tmp_path: Path) -> None:
    _one_line_error(_run("run", "--profile", str(tmp_path / "missing.toml")), "missing.toml")


def test_invalid_profile_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("command = [unclosed\n")
    _one_line_error(_run("run", "--profile", str(bad)), "bad.toml")


def test_report_dir_under_a_file_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    _one_line_error(_run("run", "--report", str(blocker / "report")), "not writable")


def test_two_backend_options_exit_2() -> None:
    _one_line_error(_run("probe", "--backend", "reference", "--backend-cmd", "x {socket}"),
                    "only one")


def test_probe_dead_backend_exit_2() -> None:
    _one_line_error(_run("probe", "--backend-cmd", "false {socket}"), "could not be started")


def test_probe_reference_prints_features() -> None:
    proc = _run("probe", "--backend", "reference")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["protocol_features"] & (1 << 20)
    assert out["protocol_features"] & (1 << 12)
    assert "GET_VRING_BASE_INFLIGHT" in out["protocol_feature_names"]
    assert out["inflight_mmap_size"] > 0
    assert out["config"]["capacity"] > 0
    assert out["queue_num"] >= 1


def test_cases_lists_catalogue() -> None:
    proc = _run("cases", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) >= 60
    ids = {r["id"] for r in rows}
    assert "VU-GVB-3" in ids


def test_backends_lists_profiles() -> None:
    proc = _run("backends", "--json")
    assert proc.returncode == 0, proc.stderr
    names = {r["name"] for r in json.loads(proc.stdout)}
    assert {"reference", "qsd", "qsd-11.1", "dpdk-vhost-blk", "vhost-user-blk-contrib",
            "dpdk-testpmd", "virtiofsd", "passt"} <= names


def test_run_with_relative_report_and_profile_paths(tmp_path: Path) -> None:
    """`run --report rel/dir --profile rel.toml` works from the caller's directory (was pytest exit 4)."""
    from importlib import resources

    source = resources.files("vhost_conformance.suites").joinpath("profiles", "reference.toml")
    (tmp_path / "ref.toml").write_text(source.read_text())
    proc = _run("run", "--profile", "ref.toml", "--report", "out/rel", "-n", "0",
                "--no-preflight", "-k", "test_get_queue_num", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "out" / "rel" / "report.json").read_text())
    assert [c["verdict"] for c in report["cases"]] == ["pass"]
    assert not (tmp_path / "out" / "rel" / "out").exists()
