"""The wrappers scripts/provision-peers writes in $CACHE/bin, and the script itself."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
from vhost_conformance.peers.process import spawn
from vhost_conformance.peers.provision import PeerUnavailable, cache_dir, peer_path

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "provision-peers"

pytestmark = pytest.mark.peer("qemu-11.1")


def _trixie_run() -> pathlib.Path:
    try:
        return peer_path("trixie-run")
    except PeerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def outside_tmp() -> Iterator[pathlib.Path]:
    """A directory not under /tmp or /run (so not bound into the root by default)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="vc-wrap-test-", dir=pathlib.Path.home()))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _run(argv: list[str], cwd: pathlib.Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, f"{argv}: exit {done.returncode}: {done.stderr}"
    return done.stdout


def test_root_is_debian_13_and_keeps_the_working_directory(outside_tmp: pathlib.Path) -> None:
    run = _trixie_run()
    assert _run([str(run), "cat", "/etc/debian_version"], outside_tmp).startswith("13.")
    assert _run([str(run), "pwd"], outside_tmp).strip() == str(outside_tmp)
    (outside_tmp / "marker").write_text("seen from the root\n")
    assert _run([str(run), "cat", "marker"], outside_tmp) == "seen from the root\n"


def test_vc_binds_and_tmp_are_shared(outside_tmp: pathlib.Path, tmp_path: pathlib.Path) -> None:
    run = _trixie_run()
    other = outside_tmp / "other"
    other.mkdir()
    (other / "f").write_text("bound\n")
    (tmp_path / "t").write_text("tmp\n")
    env = {**os.environ, "VC_BINDS": f"/nonexistent-dir:{other}"}
    assert (
        _run([str(run), "cat", str(other / "f"), str(tmp_path / "t")], pathlib.Path("/"), env)
        == "bound\ntmp\n"
    )
    # Written inside, seen outside: the same files, not copies.
    _run([str(run), "sh", "-c", f"echo back > {other / 'g'}"], pathlib.Path("/"), env)
    assert (other / "g").read_text() == "back\n"


def test_nothing_stays_mounted() -> None:
    run = _trixie_run()
    _run([str(run), "true"], pathlib.Path("/"))
    root = str(cache_dir() / "trixie-root")
    assert root not in pathlib.Path("/proc/self/mountinfo").read_text()


def test_signals_reach_the_real_binary(tmp_path: pathlib.Path) -> None:
    run = _trixie_run()
    with spawn([str(run), "sleep", "300"], tmp_path / "sleep.log") as child:
        deadline = time.monotonic() + 10
        exe = ""
        while time.monotonic() < deadline:
            exe = os.readlink(f"/proc/{child.pid}/exe")
            if exe.endswith("/sleep"):
                break
            time.sleep(0.02)
        # The wrapper exec'd all the way: its PID is the root's sleep.
        assert exe == str(cache_dir() / "trixie-root" / "usr/bin/sleep")
        os.kill(child.pid, signal.SIGTERM)
        assert child.wait(5) == -signal.SIGTERM


def test_provision_peers_rejects_unknown_names() -> None:
    done = subprocess.run(
        [str(SCRIPT), "--only", "qsd,bogus"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "unknown peer 'bogus'" in done.stderr


def all_peers() -> list[str]:
    """The peers scripts/provision-peers provisions, in its order (its ALL_PEERS array)."""
    found = re.search(r"^ALL_PEERS=\(([^)]*)\)", SCRIPT.read_text(), re.MULTILINE)
    assert found, f"no ALL_PEERS=(...) line in {SCRIPT}"
    return found.group(1).split()


def test_provision_peers_is_fast_when_cached() -> None:
    """A second run rebuilds nothing: every stamp stays as it was."""
    if os.geteuid() != 0:
        pytest.skip("scripts/provision-peers runs as root")
    stamps = cache_dir() / "stamps"
    stamped = ["qsd", "dpdk-vhost-blk", "trixie-root", "contrib-blk", "guest"]
    if not all((stamps / name).exists() for name in stamped):
        pytest.skip(f"not every peer is provisioned in {cache_dir()}: run scripts/provision-peers")
    before = {name: (stamps / name).stat().st_mtime_ns for name in stamped}
    done = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == all_peers()
    assert all(": ok (" in line for line in lines), lines
    assert {name: (stamps / name).stat().st_mtime_ns for name in stamped} == before
