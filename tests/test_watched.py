"""The watched disk (suites/watched.py): O_DIRECT, latency, journal, and no mount outliving a run."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vhost_conformance.suites import watched
from vhost_conformance.suites.watched import WatchedDisk

pytestmark = pytest.mark.skipif(watched.unavailable() is not None,
                                reason=f"watched disk: {watched.unavailable()}")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[WatchedDisk]:
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(1 << 20)
    with watched.watched(backing, tmp_path / "mnt", latency_ms=0) as d:
        yield d
    assert not d.mounted


def aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    return buf


def test_o_direct_write_read_flush_discard_are_journaled(disk: WatchedDisk) -> None:
    data = b"\xa5" * 4096
    fd = os.open(disk.path, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [aligned(data)], 8192) == 4096
        os.fdatasync(fd)
        back = mmap.mmap(-1, 4096)
        assert os.preadv(fd, [back], 8192) == 4096
        assert bytes(back) == data
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        assert libc.fallocate(fd, 0x02 | 0x01, 8192, 4096) == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)
    ops = [(e.op, e.offset, e.length) for e in disk.journal()]
    assert ops == [("write", 8192, 4096), ("flush", 0, 0), ("discard", 8192, 4096)]
    write = disk.journal()[0]
    assert write.sha256 == hashlib.sha256(data).hexdigest()
    assert write.pid == os.getpid()
    assert disk.backing.read_bytes()[8192:12288] == b"\0" * 4096  # the hole reached the file


def test_latency_is_real_for_reads_writes_and_flushes(disk: WatchedDisk) -> None:
    disk.set_latency(60)
    fd = os.open(disk.path, os.O_RDWR | os.O_DIRECT)
    try:
        for action in (lambda: os.pwritev(fd, [aligned(b"x" * 4096)], 0),
                       lambda: os.preadv(fd, [mmap.mmap(-1, 4096)], 0),
                       lambda: os.fsync(fd)):
            started = time.monotonic()
            action()
            # a lower bound only: a loaded machine may take longer, never shorter
            assert time.monotonic() - started >= 0.055
    finally:
        os.close(fd)
    write, flush = disk.journal()
    assert write.t1 - write.t0 >= 0.055 and flush.t1 - flush.t0 >= 0.055


def test_no_watched_mount_outlives_a_suite_killed_mid_case(tmp_path: Path) -> None:
    """A suite killed with SIGKILL while a case runs on the watched disk (its filesystem
    process killed too, the worst case): the next run detaches the stale mount and starts
    clean."""
    profile = tmp_path / "ref-watched.toml"
    text = (ROOT / "suites" / "profiles" / "reference.toml").read_text()
    profile.write_text(text.replace('args = "--latency {latency_ms}"', 'via = "disk"')
                       .replace('prestart = 2', 'prestart = 0'))
    suite = subprocess.Popen(
        [sys.executable, "-m", "pytest", "--pyargs", "vhost_conformance.suites",
         f"--vhost-profile={profile}", "-k", "test_get_vring_base_drains_in_flight_io",
         "-p", "no:cacheprovider", "-q", f"--basetemp={tmp_path / 'run'}"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not [p for p, owner in watched.watched_mounts() if owner == suite.pid]:
            assert suite.poll() is None, "the suite ended before it mounted the watched disk"
            assert time.monotonic() < deadline, "the suite never mounted the watched disk"
            time.sleep(0.02)
        point = next(p for p, owner in watched.watched_mounts() if owner == suite.pid)
        fs = subprocess.run(["pgrep", "-f", f"suites.watched .*--mount {point}"],
                            capture_output=True, text=True, check=False).stdout.split()
        for pid in fs:  # the filesystem process too: nothing left to unmount it
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        # the suite's back-ends run in sessions of their own: end them by id with the suite
        children = _descendants(suite.pid)
        os.kill(suite.pid, signal.SIGKILL)
        suite.wait(10)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(suite.pid, signal.SIGKILL)  # the suite's own back-end children
        if suite.poll() is None:
            suite.kill()
            suite.wait(10)
    # left behind: a mount nobody serves (its owner and its filesystem process are dead)
    assert point in [p for p, _ in watched.watched_mounts()]
    # the next run: a mount starts by detaching stale mounts of dead owners
    backing = tmp_path / "next.img"
    backing.write_bytes(b"\0" * 4096)
    with watched.watched(backing, tmp_path / "next"):
        assert point not in [p for p, _ in watched.watched_mounts()]
    assert not [p for p, owner in watched.watched_mounts() if owner == suite.pid]


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_a_missing_binding_is_a_reason_not_a_crash(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["mfusepy"] = None  # import fails like a missing libfuse3
        from vhost_conformance.suites import watched
        print(watched.unavailable())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert "libfuse3" in out and "provision-peers --only fuse" in out


def test_drain_and_inflight_families_run_on_the_watched_disk_without_the_knob(
    tmp_path: Path,
) -> None:
    """The reference profile with its --latency knob removed: the drain, in-flight and
    migration cases hold their requests in the watched disk instead, run and pass."""
    text = (ROOT / "suites" / "profiles" / "reference.toml").read_text()
    knobless = text.replace('[slow_io]\nargs = "--latency {latency_ms}"\n', "")
    assert "--latency" not in knobless
    profile = tmp_path / "knobless.toml"
    profile.write_text(knobless)
    cases = ("VU-GVB-3", "VU-GVB-4", "VU-SUSP-1", "VU-INF-7", "VU-MIG-3", "VU-DISK-1",
             "VU-DISK-2")
    args = [sys.executable, "-m", "vhost_conformance.cli", "run", "--profile", str(profile),
            "--no-preflight", "-n", "0", "--report", str(tmp_path / "report")]
    for case_id in cases:
        args += ["--case", case_id]
    subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    verdicts = {c["id"]: c["verdict"] for c in data["cases"]}
    assert verdicts == dict.fromkeys(cases, "pass"), verdicts
    assert not watched.watched_mounts() or all(
        owner != os.getpid() for _, owner in watched.watched_mounts())
