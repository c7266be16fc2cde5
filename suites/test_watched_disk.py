"""The source's host I/O after its stop, and FLUSH ordering, seen on the watched disk.

Guest memory alone cannot show a held WRITE that still reaches the storage after the
GET_VRING_BASE reply: the back-end runs on the watched disk (suites/watched.py), whose journal
records when each write reached the backing file. vhost-user.rst (QEMU 11.1.3) "Front-end
message types: GET_VRING_BASE"; SPEC-DIGEST.md 6.2 (the bit-20 series: Stefan Hajnoczi asked
that suspended host I/O be cancelled, the author's server does not really cancel).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import pytest
from vhost_conformance.frontend.accounting import Ledger
from vhost_conformance.frontend.blk import SECTOR_SIZE, BlkRequest
from vhost_conformance.frontend.migration import reconnect
from vhost_conformance.frontend.protocol import BlkFeature
from vhost_conformance.frontend.protocol import ProtocolFeature as P
from vhost_conformance.reports.model import Tier
from vhost_conformance.suites.catalogue import RST
from vhost_conformance.suites.clauses import GET_VRING_BASE_DRAIN_QUOTE, VIRTIO
from vhost_conformance.suites.drivers import (
    MakeTarget,
    SessionFactory,
    expect_status,
    pattern,
    pending_io,
    require_command,
    wait_all,
    wait_popped,
)
from vhost_conformance.suites.drivers.migration import (
    destination_target,
    harvest_until,
    migrate_to,
    sigkill_and_restart,
    submit_tracked,
)
from vhost_conformance.suites.drivers.watched import (
    HELD,
    LATENCY_MS,
    describe,
    executions,
    journaled_hold,
    late_writes,
    overlaps,
)
from vhost_conformance.suites.model import INFO, MUST, CaseFailed, Unsupported, case
from vhost_conformance.suites.target import BackendTarget, Capabilities
from vhost_conformance.suites.watched import WatchedDisk


@case(
    "VU-DISK-1", title="No disk write after a draining GET_VRING_BASE reply", family="suspended",
    level=MUST, tier=Tier.CONFORMANCE, clause=f"{RST} Front-end message types: GET_VRING_BASE",
    quote=GET_VRING_BASE_DRAIN_QUOTE,
    requirement="Without bit 20, every held WRITE reaches the disk before the GET_VRING_BASE "
        "reply (watched disk journal); none after it.",
)
def test_no_disk_write_after_a_draining_stop(
    vhost_target: BackendTarget, make_session: SessionFactory, vhost_measurements: dict[str, float]
) -> None:
    """The drain: a write completed before the reply is on the disk before it."""
    late_writes(vhost_target, make_session, vhost_measurements, bit20=False)


@case(
    "VU-DISK-2", title="No disk write after a suspending (bit 20) GET_VRING_BASE reply",
    family="suspended", level=MUST, tier=Tier.INTEROP,
    clause=f"{RST} Front-end message types: GET_VRING_BASE; Suspended device state",
    source="QEMU 11.1.3 hw/block/vhost-user-blk.c (vhost-user-blk/inflight subsection): the "
        "destination resubmits every request the source recorded in flight, so a suspended WRITE "
        "the source still executes races the destination's newer writes to the same sectors "
        "(SPEC-DIGEST.md 6.1-6.2: suspending 'typically can be done by aborting or cancelling the "
        "underlying I/O request'; the series' discussion asked for cancellation)",
    requirement="With bit 20, a WRITE suspended at the stop does not reach the disk after the "
        "GET_VRING_BASE reply.",
    requires=[P.INFLIGHT_SHMFD, P.GET_VRING_BASE_INFLIGHT],
)
def test_no_disk_write_after_a_suspending_stop(
    vhost_target: BackendTarget, make_session: SessionFactory, vhost_measurements: dict[str, float]
) -> None:
    """Bit 20: whatever the back-end suspended must not land on the disk later."""
    late_writes(vhost_target, make_session, vhost_measurements, bit20=True)


@case(
    "VU-DISK-3", title="A completed FLUSH covers every write completed before it", family="blk-io",
    level=MUST, tier=Tier.INTEROP, clause="VIRTIO 1.3 5.2.6 Device Operation (VIRTIO_BLK_T_FLUSH)",
    source="QEMU 11.1.3 hw/block/virtio-blk.c virtio_blk_handle_flush: the status is written "
        "after blk_aio_flush completed (bdrv_co_flush: fdatasync of the image), the guest's "
        "barrier for every write it saw completed before",
    requirement="Writes completed before a FLUSH was submitted reached the disk, and a flush of "
        "the disk happened after them, before the FLUSH completed (watched disk journal).",
)
def test_flush_covers_the_writes_completed_before_it(
    vhost_target: BackendTarget, make_session: SessionFactory,
    vhost_measurements: dict[str, float], vhost_measure: Callable[..., None],
) -> None:
    """Write, wait, FLUSH, wait: the journal must show the writes and then a flush, both
    before the FLUSH's completion was seen."""
    with journaled_hold(vhost_target, 20) as disk:
        session = make_session(vhost_target, model=False)
        writes = pending_io(session, HELD, kind="write", sector=256)
        expect_status(wait_all(session, writes), what="write")
        submitted = time.monotonic()
        flush = session.queues[0].blk.flush()
        session.submit(0)
        expect_status(wait_all(session, [flush]), what="flush")
        completed = time.monotonic()
        _judge_flush(disk, writes, submitted, completed, vhost_measurements)


def _judge_flush(disk: WatchedDisk, writes: list[BlkRequest], submitted: float, completed: float,
                 measurements: dict[str, float]) -> None:
    journal = disk.journal()
    missing = [w for w in writes
               if not any(e.op == "write" and overlaps(e, w) and e.t1 <= submitted
                          for e in journal)]
    landed = max((e.t1 for e in journal if e.op == "write"
                  and any(overlaps(e, w) for w in writes)), default=submitted)
    flushes = [e for e in journal if e.op == "flush" and e.t0 >= min(landed, submitted)
               and e.t1 <= completed]
    measurements["flushes_before_reply"] = float(len(flushes))
    if missing:
        raise CaseFailed(
            f"{len(missing)} of {len(writes)} completed write(s) not on the disk when the FLUSH "
            "was submitted", expected="each completed write in the journal before",
            seen=f"sectors {[w.sector for w in missing]}")
    if not flushes:
        raise CaseFailed(
            "FLUSH completed with no flush of the disk after the completed writes",
            expected="an fsync/fdatasync of the disk between the writes and the FLUSH's "
            "completion", seen=describe([e for e in journal if e.op == "flush"], submitted)
            or "no flush in the journal")


@case(
    "VU-DISK-4",
    title="The stale write: after an in-flight migration the disk ends with the newer data",
    family="migration", level=MUST, tier=Tier.INTEROP,
    clause=f"{RST} Front-end message types: GET_VRING_BASE; Inflight I/O tracking",
    source="QEMU 11.1.3 hw/block/vhost-user-blk.c (vhost-user-blk/inflight subsection): the "
        "destination resubmits the WRITEs the source left in flight; the guest then owns the "
        "sectors again, and a source execution landing after its newer WRITE loses that data "
        "(SPEC-DIGEST.md 6.2)",
    requirement="WRITEs held at a bit-20 stop, resubmitted on the destination, then newer WRITEs "
        "to the same sectors completed there: the image ends with the newer data; how often each "
        "held WRITE reached the disk is measured.",
    requires=[P.INFLIGHT_SHMFD, P.GET_VRING_BASE_INFLIGHT], needs=["shared-disk"],
)
def test_the_disk_ends_with_the_newer_write(
    vhost_target: BackendTarget, vhost_target_factory: MakeTarget,
    make_session: SessionFactory, vhost_measurements: dict[str, float],
) -> None:
    """Hold 2 WRITEs, migrate with bit 20, let the destination finish them, write newer data to
    the same sectors on the destination; after the source is gone the image holds the newer
    data. A held WRITE executed twice is flagged when its last execution came after the newer
    write (it changed data)."""
    destination = destination_target(vhost_target, vhost_target_factory)
    with journaled_hold(vhost_target, LATENCY_MS) as disk, \
            journaled_hold(destination, LATENCY_MS):
        source = make_session(vhost_target, inflight_migration=True, model=False)
        ledger = Ledger()
        held = submit_tracked(source, ledger, 2, kinds=("write",), sector=1024)
        wait_popped(source, 0, settle=0.05)
        result = migrate_to(source, destination, make_session, ledger)
        timeout = make_session.timeout + LATENCY_MS / 1000
        try:
            missing = harvest_until(result.destination, ledger, held, timeout)
            blk = result.destination.queues[0].blk
            newer = [blk.write(r.sector, pattern(r.sector + 99_991, r.nsectors * SECTOR_SIZE))
                     for r in held]
            for r in newer:
                ledger.submit(r)
            result.destination.submit(0)
            unfinished = harvest_until(result.destination, ledger, newer, timeout)
            newer_done = time.monotonic()
        finally:
            result.finish(2 * LATENCY_MS / 1000)  # waits, then closes the source connection
        vhost_target.stop()  # the source back-end is gone: nothing of it can land later
        journal = disk.journal()
        image = disk.backing.read_bytes()
    counts = [executions(journal, r, hashlib.sha256(r.out_data).hexdigest()) for r in held]
    vhost_measurements["held_executed_once"] = float(counts.count(1))
    vhost_measurements["held_executed_never"] = float(counts.count(0))
    vhost_measurements["held_executed_twice_or_more"] = float(sum(1 for c in counts if c > 1))
    vhost_measurements["held_never_completed"] = float(len(missing))
    if unfinished:
        raise CaseFailed("the newer WRITEs on the destination did not complete",
                         expected="completed", seen=f"{len(unfinished)} of {len(newer)} missing")
    stale = [(old, new) for old, new in zip(held, newer, strict=True)
             if image[new.sector * SECTOR_SIZE:new.sector * SECTOR_SIZE + len(new.out_data)]
             != new.out_data]
    if stale:
        old, new = stale[0]
        late = [e for e in journal if e.op == "write" and overlaps(e, old)
                and e.sha256 == hashlib.sha256(old.out_data).hexdigest() and e.t1 > newer_done]
        raise CaseFailed(
            f"{len(stale)} of {len(newer)} sector range(s) lost the destination's newer WRITE "
            f"(held WRITEs executed {counts} time(s))",
            expected="the newer data on the image",
            seen=(f"sector {new.sector}: " + ("the held WRITE's data landed after the newer one: "
                  + describe(late, newer_done) if late else "other data")))


@case(
    "VU-DISK-5", title="Executions per held WRITE across a kill and reconnect (measured)",
    family="reconnect", level=INFO, tier=Tier.INTEROP, clause=f"{RST} Inflight I/O tracking",
    source="QEMU 11.1.3 hw/block/vhost-user-blk.c vhost_user_blk_connect: after the back-end "
        "died, the reconnect hands the kept in-flight region back and the back-end resubmits what "
        "it marks (QEMU-TRACES (d))",
    requirement="SIGKILL of the back-end with WRITEs held on the watched disk, restart, QEMU's "
        "reconnect: how often each held WRITE reached the disk (once, twice, never), and how many "
        "completed for the guest.",
)
def test_executions_across_a_kill_and_reconnect(
    vhost_target: BackendTarget, make_session: SessionFactory, vhost_measurements: dict[str, float]
) -> None:
    """Measured, never judged (VU-RECON-2 judges the completions): a WRITE the filesystem was
    still holding when the process died still lands once (the kernel had it); one the back-end
    had not issued lands only if the reconnect resubmits it; a resubmitted one that had
    already landed lands twice (same data: harmless here, nothing newer was written)."""
    target = require_command(vhost_target)
    with journaled_hold(target, LATENCY_MS) as disk:
        s = make_session(target, model=False)
        ledger = Ledger()
        held = submit_tracked(s, ledger, HELD, kinds=("write",), sector=2048)
        wait_popped(s, 0, settle=LATENCY_MS / 2000)
        channel = sigkill_and_restart(target, s)
        reconnect(s, channel, ledger=ledger, hop="restart")
        missing = harvest_until(s, ledger, held, s.timeout + LATENCY_MS / 1000)
        time.sleep(2 * LATENCY_MS / 1000)
        journal = disk.journal()
    counts = [executions(journal, r, hashlib.sha256(r.out_data).hexdigest()) for r in held]
    vhost_measurements["held_executed_once"] = float(counts.count(1))
    vhost_measurements["held_executed_never"] = float(counts.count(0))
    vhost_measurements["held_executed_twice_or_more"] = float(sum(1 for c in counts if c > 1))
    vhost_measurements["held_completed_for_the_guest"] = float(len(held) - len(missing))


#: VU-DISK-6's two ways to a write-through device (VIRTIO 1.3 5.2.6.2 "a write becomes
#: stable once it is completed and ..." conditions 1 and 2)
STABLE_MODES = ("no-flush", "writeback-0")
STABLE_WRITES = 4


@case(
    "VU-DISK-6", title="Stable writes: without a cache to flush, a completed WRITE is on the disk",
    family="blk-io", level=MUST, tier=Tier.CONFORMANCE,
    clause=f"{VIRTIO} 5.2.6.2 Block Device: Device Operation: Device Requirements",
    quote="If the device is backed by persistent storage, the device MUST ensure that stable "
        "writes are committed to it, before reporting completion of the write (cases 1 and 2) or "
        "the flush (case 3).",
    requirement="Case 1 (FLUSH offered, neither FLUSH nor CONFIG_WCE negotiated) and case 2 "
        "(CONFIG_WCE negotiated, writeback 0 by SET_CONFIG): each WRITE reaches the disk and a "
        "flush of the disk follows it before its completion is seen (watched disk journal).",
    ambiguity="the spec's cases: 1 \"neither VIRTIO_BLK_F_CONFIG_WCE nor VIRTIO_BLK_F_FLUSH "
    "feature were negotiated, but VIRTIO_BLK_F_FLUSH was offered by the device\"; 2 "
    "\"VIRTIO_BLK_F_CONFIG_WCE was negotiated and the writeback field in configuration space "
    "was 0\". Committed is read as: written and flushed (fsync/fdatasync of the image, or an "
    "O_SYNC/O_DSYNC write, which the kernel follows with a flush the journal sees). A Linux "
    "guest acks FLUSH whenever offered, so case 1 is a driver QEMU passes on, not Linux's",
    requires=[BlkFeature.FLUSH],
)
@pytest.mark.parametrize("mode", STABLE_MODES)
def test_stable_writes_are_committed_before_completion(
    vhost_target: BackendTarget, make_session: SessionFactory,
    vhost_capabilities: Capabilities, vhost_measurements: dict[str, float], mode: str,
) -> None:
    """One WRITE at a time: its journal entry and then a flush, both before its completion."""
    features_off = 0
    if mode == "no-flush":
        features_off = (1 << BlkFeature.FLUSH) | (1 << BlkFeature.CONFIG_WCE)
    else:
        missing = vhost_capabilities.missing([BlkFeature.CONFIG_WCE, P.CONFIG])
        if missing:
            raise Unsupported(missing, "writeback 0 is set through SET_CONFIG of wce")
    with journaled_hold(vhost_target, 20) as disk:
        session = make_session(vhost_target, model=False, start=False)
        session.start(features=session.driver_features() & ~features_off)
        if mode == "writeback-0":
            session.set_writeback(0)
        blk = session.queues[0].blk
        done: list[tuple[BlkRequest, float]] = []
        for i in range(STABLE_WRITES):
            write = blk.write(2048 + 16 * i, pattern(7_001 + i, 8 * SECTOR_SIZE))
            session.submit(0)
            expect_status(wait_all(session, [write]), what="write")
            done.append((write, time.monotonic()))
        _judge_stable(disk, done, vhost_measurements)


def _judge_stable(disk: WatchedDisk, done: list[tuple[BlkRequest, float]],
                  measurements: dict[str, float]) -> None:  # fmt: skip
    journal = disk.journal()
    unstable: list[str] = []
    for write, completed in done:
        landed = [e for e in journal if e.op == "write" and overlaps(e, write)
                  and e.t1 <= completed]  # fmt: skip
        if not landed:
            unstable.append(f"sector {write.sector}: not on the disk at its completion")
            continue
        last = max(e.t1 for e in landed)
        # the flush must begin once the write reached the file (a flush running alongside it
        # need not cover it) and end before the completion was seen
        flushed = [e for e in journal if e.op == "flush" and e.t0 >= last - 1e-4
                   and e.t1 <= completed]  # fmt: skip
        if not flushed:
            after = [e for e in journal if e.op == "flush" and e.t0 >= last - 1e-4]
            when = (f"the next flush arrived {(after[0].t0 - completed) * 1e3:+.1f} ms and "
                    f"returned {(after[0].t1 - completed) * 1e3:+.1f} ms from the completion; "
                    f"the write returned {(last - completed) * 1e3:+.1f} ms"
                    if after else "no flush after it at all")  # fmt: skip
            unstable.append(f"sector {write.sector}: written, not flushed before its "
                            f"completion ({when})")  # fmt: skip
    measurements["unstable_writes"] = float(len(unstable))
    if unstable:
        first = done[0][1]
        shown = [*unstable, "journal (ms from the first completion): " + ", ".join(
            f"{e.op} {e.offset // 512} {(e.t0 - first) * 1e3:+.1f}..{(e.t1 - first) * 1e3:+.1f}"
            for e in journal if e.op in ("write", "flush"))
            + "; completions " + ", ".join(f"{(t - first) * 1e3:+.1f}" for _, t in done)]
        raise CaseFailed(
            f"{len(unstable)} of {len(done)} completed WRITE(s) not committed to the disk when "
            "their completion was reported", expected="each written and flushed before its "
            "completion", seen="; ".join(shown))
