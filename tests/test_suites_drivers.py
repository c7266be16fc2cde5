"""Tests of the suites' I/O drivers (suites/drivers.py) against the reference back-end, run as
the suite runs it (a TargetFactory with the ``reference`` profile), and of the fixtures as a
plugin module loaded into a vendor's own test run (pytester)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vhost_conformance.frontend.blk import SECTOR_SIZE, BlkStatus
from vhost_conformance.frontend.channel import BackendHang
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.protocol import BlkFeature, ProtocolFeature
from vhost_conformance.suites.drivers import (
    InflightTracker,
    IoError,
    do_io,
    expect_status,
    io_at,
    kick_and_enable,
    open_session,
    partial_start,
    pattern,
    pending_io,
    restart_variant,
    slow_disk,
    stop_now,
    wait_all,
    write_read_verify,
)
from vhost_conformance.suites.model import Unsupported
from vhost_conformance.suites.target import CommandTarget, TargetFactory, load_profile

pytest_plugins = ["pytester"]

TIMEOUT = 5.0


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[TargetFactory]:
    made = TargetFactory(profile=load_profile("reference"), rundir=tmp_path / "run")
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def target(factory: TargetFactory) -> CommandTarget:
    started = factory.new("drivers")
    assert isinstance(started, CommandTarget)
    started.start()
    return started


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.simple(8 << 20) as guest:
        yield guest


def _session(target: CommandTarget, memory: GuestMemory, **options: object) -> Session:
    return open_session(target, timeout=TIMEOUT, memory=memory, **options)  # type: ignore[arg-type]


def test_pattern_differs_per_seed_and_sector() -> None:
    a, b = pattern(1, 4 * SECTOR_SIZE), pattern(2, 4 * SECTOR_SIZE)
    assert len(a) == 4 * SECTOR_SIZE and a != b
    sectors = {a[i : i + SECTOR_SIZE] for i in range(0, len(a), SECTOR_SIZE)}
    assert len(sectors) == 4
    assert pattern(1, 100) == a[:100]


def test_session_io_and_stop(target: CommandTarget, memory: GuestMemory) -> None:
    session = _session(target, memory)
    try:
        assert session.started and session.model is not None
        assert session.model.size_bytes == 64 << 20  # from the config capacity
        done = do_io(session, 3, kinds=("write", "read", "flush"))
        assert [c.request.type for c in done[:3]] == [1, 0, 4]
        write_read_verify(session, 100, pattern(5, 3 * SECTOR_SIZE), segments=3)
        requests = pending_io(session, 4, kind="write", sector=500)
        assert [c.tag for c in wait_all(session, list(reversed(requests)))] == [
            r.tag for r in reversed(requests)
        ]
        published = session.queues[0].vq.published_idx  # type: ignore[attr-defined]
        stopped = stop_now(session)
        assert stopped.bases == [published]
        assert stopped.used_idx_at_reply == [published]
        assert not session.started
    finally:
        session.close()


def test_inflight_tracker_matches_the_region(target: CommandTarget, memory: GuestMemory) -> None:
    session = _session(target, memory)
    try:
        tracker = InflightTracker(session)  # before any I/O: it models the whole ring
        tracked = tracker.submit(pending_io(session, 3))
        assert len(tracker.wait(0, 3)) == len(tracked)
        assert tracker.findings([3]) == []
        # a region that says something else is found out
        region = session.inflight
        assert region is not None
        region.map[16 + 16 * tracked[0].head] = 1  # desc[head].inflight of a completed head
        findings = tracker.findings([3])
        assert [f.rule for f in findings] == ["must-not-be-inflight"]
    finally:
        session.close()


def test_wait_all_keeps_other_completions(target: CommandTarget, memory: GuestMemory) -> None:
    session = _session(target, memory)
    try:
        first, second = pending_io(session, 2)
        time.sleep(0.2)
        assert [c.tag for c in wait_all(session, [second])] == [second.tag]
        # the first one was reaped meanwhile: it is still handed out, once
        assert [c.tag for c in wait_all(session, [first])] == [first.tag]
    finally:
        session.close()


def test_wait_all_raises_backend_hang_on_a_stopped_ring(
    target: CommandTarget, memory: GuestMemory
) -> None:
    session = _session(target, memory)
    try:
        stop_now(session)
        (late,) = pending_io(session, 1)
        session.kick(0)
        started = time.monotonic()
        with pytest.raises(BackendHang, match="1 of 1 requests not completed"):
            wait_all(session, [late], timeout=0.3)
        assert time.monotonic() - started < 2
    finally:
        session.close()


def test_expect_status_names_the_request(target: CommandTarget, memory: GuestMemory) -> None:
    session = _session(target, memory)
    try:
        blk = session.queues[0].blk
        blk.model = None
        request = blk.raw(0x7E, in_len=SECTOR_SIZE)
        session.submit(0)
        done = wait_all(session, [request])
        assert done[0].status == BlkStatus.UNSUPP
        with pytest.raises(IoError, match=r"type 126.*expected OK \(0\), seen UNSUPP \(2\)"):
            expect_status(done, what="odd request")
        expect_status(done, BlkStatus.UNSUPP)
    finally:
        session.close()


def test_partial_start_then_kick(target: CommandTarget, memory: GuestMemory) -> None:
    session = _session(target, memory, start=False)
    try:
        partial_start(session)
        request = session.queues[0].blk.read(0, 8)
        session.queues[0].vq.publish()
        time.sleep(0.2)
        assert session.queues[0].vq.used_idx_in_memory() == 0  # not started yet
        kick_and_enable(session)
        assert session.started
        expect_status(wait_all(session, [request]))
    finally:
        session.close()


def test_io_at_uses_the_given_buffers(target: CommandTarget) -> None:
    with GuestMemory.simple(8 << 20, 2, mmap_offset=0x3000) as memory:
        session = _session(target, memory)
        try:
            low, high = memory.regions
            data = pattern(9, 4096)
            memory.write(high.guest_phys_addr + 0x1000, data)
            assert io_at(session, "write", 40, high.guest_phys_addr + 0x1000, 4096,
                         scratch_gpa=high.guest_phys_addr) == 0
            target_gpa = low.guest_phys_addr + low.memory_size - 8192
            assert io_at(session, "read", 40, target_gpa, 4096,
                         scratch_gpa=high.guest_phys_addr + 0x3000) == 0
            assert memory.read(target_gpa, 4096) == data
        finally:
            session.close()


def test_strip_protocol_sends_set_mem_table(target: CommandTarget, memory: GuestMemory) -> None:
    from vhost_conformance.frontend import sequences

    before = sequences.QEMU_PROTOCOL_MASK
    session = _session(target, memory, strip_protocol=[ProtocolFeature.CONFIGURE_MEM_SLOTS])
    try:
        assert before == sequences.QEMU_PROTOCOL_MASK  # restored
        assert not session.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        names = [e.name for e in session.channel.trace.entries()]
        assert "SET_MEM_TABLE" in names and "ADD_MEM_REG" not in names
        do_io(session, 1)
    finally:
        session.close()


def test_restart_variant_read_only_and_queues(target: CommandTarget, memory: GuestMemory) -> None:
    restart_variant(target, read_only=True, queues=2)
    assert "--read-only" in (target.profile.command or "")
    session = _session(target, memory, num_queues=2)
    try:
        assert session.negotiated.features >> BlkFeature.RO & 1
        assert session.negotiated.queue_num == 2
    finally:
        session.close()


def test_restart_variant_of_an_unknown_command(target: CommandTarget) -> None:
    target.profile = dataclasses.replace(target.profile, command="/bin/true {socket}")
    with pytest.raises(Unsupported, match=r"a read-only device.*no way to configure it"):
        restart_variant(target, read_only=True)


def test_restart_variant_of_qsd_edits_the_export() -> None:
    profile = load_profile("qsd")
    target = CommandTarget(profile, Path("/tmp/vc-never-started"))
    target.restart = lambda: ""  # type: ignore[method-assign]
    restart_variant(target, read_only=True, queues=4)
    assert "writable=off,num-queues=4" in (target.profile.command or "")
    assert "writable=off,num-queues=4" in (target.profile.slow_io.command or "")


def test_slow_disk_drains_and_stops_the_target(target: CommandTarget, memory: GuestMemory) -> None:
    starts = []
    original = target.start

    def counting_start() -> str:
        starts.append(time.monotonic())
        return original()

    target.start = counting_start  # type: ignore[method-assign]
    with slow_disk(target, 150):
        session = _session(target, memory, inflight_migration=False, model=False)
        try:
            submitted = time.monotonic()
            pending_io(session, 1)
            time.sleep(0.05)
            stopped = stop_now(session)
            # drained: the reply waited for the slow request (150 ms from its submission)
            assert time.monotonic() - submitted >= 0.14
            assert stopped.used_idx_at_reply == stopped.bases == [1]
        finally:
            session.close()
    assert len(starts) == 1  # entering restarted it once; leaving did not start it again
    assert target.alive()
    assert "--latency 150" not in " ".join(target.argv() or [])  # the next start is normal


def test_slow_disk_unsupported_names_the_reason(tmp_path: Path) -> None:
    made = TargetFactory(profile=load_profile("dpdk-vhost-blk"), rundir=tmp_path / "d")
    try:
        target = made.new("slow")
        with pytest.raises(Unsupported, match="no latency knob"), slow_disk(target, 100):
            raise AssertionError("never entered")
    finally:
        made.close()


VENDOR_IO_CASE = """
import pytest
from vhost_conformance.suites.drivers import do_io, stop_now
from vhost_conformance.suites.model import MUST, CaseFailed, case


@case("VU-VENDORIO-1", title="I/O then stop", family="blk-io", level=MUST,
      clause="VIRTIO 1.3 Block Device", requirement="Writes read back; the stop says 4.")
def test_io(vhost_session):
    do_io(vhost_session, 2)
    assert stop_now(vhost_session).bases == [4]


@case("VU-VENDORIO-3", title="QEMU 7.2 order, packed", family="rings", level=MUST,
      clause="vhost-user.rst Ring states", requirement="Works with the 7.2 order.")
@pytest.mark.vhost_session(profile="qemu-7.2", packed=True, regions=2)
def test_marker(vhost_session):
    assert vhost_session.profile.name == "qemu-7.2" and vhost_session.packed
    assert len(vhost_session.memory.regions) == 2
    do_io(vhost_session, 1)


@case("VU-VENDORIO-2", title="fails after I/O", family="blk-io", level=MUST,
      clause="VIRTIO 1.3 Block Device", requirement="Fails, to show its trace.")
def test_fails(vhost_session):
    do_io(vhost_session, 1)
    raise CaseFailed("on purpose")
"""


def test_fixtures_work_as_a_plugin_module(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_vendor_io=VENDOR_IO_CASE)
    report = pytester.path / "report"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "vhost_conformance.suites.drivers",
        "--vhost-backend=reference", f"--vhost-report={report}", "--strict-markers",
        timeout=120,
    )
    result.assert_outcomes(passed=2, failed=1)
    data = json.loads((report / "report.json").read_text())
    verdicts = {c["id"]: c for c in data["cases"]}
    assert verdicts["VU-VENDORIO-1"]["verdict"] == "pass"
    failed = verdicts["VU-VENDORIO-2"]
    assert failed["verdict"] == "fail"
    # the session's wire trace was registered: the whole start sequence is in it
    text = json.dumps(failed["trace"])
    for name in ("SET_VRING_KICK", "SET_VRING_ENABLE", "GET_INFLIGHT_FD"):
        assert name in text
