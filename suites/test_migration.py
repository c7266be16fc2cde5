"""Live migration as QEMU 11.1.3 drives it: source stop, in-flight region through the
``vhost-user-blk/inflight`` subsection, destination start (frontend/migration.py).

Family: migration (VU-MIG-*). Clauses: vhost-user.rst (QEMU 11.1.3) "Inflight I/O tracking",
"Front-end message types: GET_VRING_BASE", "Migration". The destination is a second instance
of the back-end under test, on the same disk image when the profile says two instances can
share one (``shares_disk``). Slow-disk cases hold :data:`HELD` requests in flight for
:data:`LATENCY_MS` each. The scenario drivers below are shared with the double-submission
and reconnect families.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from vhost_conformance.frontend.accounting import AccountingFinding, Ledger
from vhost_conformance.frontend.blk import SECTOR_SIZE, BlkRequest
from vhost_conformance.frontend.channel import BackendViolation, Channel
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.memory import DirtyLog
from vhost_conformance.frontend.migration import (
    MigrationResult,
    harvest_all,
    migrate,
    prepare_destination,
)
from vhost_conformance.frontend.protocol import (
    FLAG_NEED_REPLY,
    U64,
    FrontendRequest,
    LogBase,
    ProtocolFeature,
    VirtioFeature,
)
from vhost_conformance.suites.drivers import (
    SessionFactory,
    do_io,
    pattern,
    slow_disk,
    wait_popped,
)
from vhost_conformance.suites.model import INFO, MUST, CaseFailed, case
from vhost_conformance.suites.plugin import register_trace
from vhost_conformance.suites.target import BackendTarget, CommandTarget

P = ProtocolFeature

#: Per-request latency of the slow disk and how many requests are held in flight.
LATENCY_MS = 150
HELD = 8
#: How long to watch for completions that must not come.
QUIET = 0.3


# --------------------------------------------------------------------------- drivers


def destination_target(source: BackendTarget, make: Callable[[str], BackendTarget]
                       ) -> BackendTarget:
    """A second, started instance of the back-end under test; on the source's disk image when
    the profile says two instances can share one."""
    destination = make("destination")
    if (isinstance(source, CommandTarget) and isinstance(destination, CommandTarget)
            and destination.shares_disk):
        destination.stop()
        destination.values["disk"] = source.values["disk"]
        destination.start()
    return destination


def shares_disk(target: BackendTarget) -> bool:
    """Whether what one instance wrote can be read through another (or after a restart)."""
    return bool(getattr(target, "shares_disk", False))


def submit_tracked(session: Session, ledger: Ledger, n: int, *, queue: int = 0,
                   kinds: Sequence[str] = ("write", "read"), sector: int = 0,
                   nsectors: int = 8) -> list[BlkRequest]:
    """``n`` requests on ``queue`` cycling through ``kinds``, each on its own sectors, recorded
    in ``ledger``, published and kicked."""
    blk = session.queues[queue].blk
    out = []
    for i in range(n):
        at = sector + i * nsectors
        if kinds[i % len(kinds)] == "write":
            request = blk.write(at, pattern(at + 7 * len(ledger.submitted), nsectors * SECTOR_SIZE))
        else:
            request = blk.read(at, nsectors)
        ledger.submit(request)
        out.append(request)
    session.submit(queue)
    return out


def harvest_until(session: Session, ledger: Ledger, requests: Iterable[BlkRequest],
                  timeout: float) -> list[BlkRequest]:
    """Harvest every queue until each of ``requests`` has a completion in the ledger or the
    deadline passed; returns those still without one."""
    wanted = list(requests)
    deadline = time.monotonic() + timeout
    while True:
        harvest_all(session, ledger)
        missing = [r for r in wanted if not ledger.completions.get(r.tag)]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.005)


def watch_quiet(session: Session, ledger: Ledger, seconds: float = QUIET) -> None:
    """Keep harvesting for ``seconds``: completions that must not come end up in the ledger."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        harvest_all(session, ledger)
        time.sleep(0.01)
    harvest_all(session, ledger)


def fail_on(findings: Sequence[AccountingFinding], what: str) -> None:
    """CaseFailed listing the findings (at most 8), if any."""
    if findings:
        raise CaseFailed(what, expected="no finding",
                         seen=f"{len(findings)}: " + "; ".join(str(f) for f in findings[:8]))


def fail_on_missing(missing: Sequence[BlkRequest], ledger: Ledger, where: str,
                    timeout: float) -> None:
    """CaseFailed naming the requests that did not complete before the deadline."""
    if missing:
        raise CaseFailed(
            f"{len(missing)} request(s) not completed on {where} within {timeout:g} s",
            expected="every request completed once",
            seen="; ".join(ledger.submitted[r.tag].describe() for r in missing[:6]))


def migrate_to(source: Session, destination: BackendTarget, make_session: SessionFactory,
               ledger: Ledger) -> MigrationResult:
    """Prepare the destination device (realized before switch-over, as QEMU does), then
    :func:`migrate`. The destination session is closed with the case's other sessions; the
    caller must call ``finish`` on the result."""
    channel = Channel(destination.connect_socket(make_session.timeout))
    register_trace(make_session.request, channel.trace)
    prepared = prepare_destination(source, channel)
    make_session.sessions.append(prepared)
    return migrate(source, prepared, ledger=ledger)


@contextlib.contextmanager
def slow_pair(source: BackendTarget, destination: BackendTarget) -> Iterator[None]:
    """Both instances with the slow disk."""
    with slow_disk(source, LATENCY_MS), slow_disk(destination, LATENCY_MS):
        yield


def read_back(session: Session, ledger: Ledger, requests: Iterable[BlkRequest]) -> None:
    """Read every written range of ``requests`` through ``session`` (checked against the
    model: mismatches become ledger findings)."""
    reads = []
    blk = session.queues[0].blk
    for r in requests:
        if r.type == 1:  # VIRTIO_BLK_T_OUT
            read = blk.read(r.sector, r.nsectors)
            ledger.submit(read)
            reads.append(read)
    session.submit(0)
    fail_on_missing(harvest_until(session, ledger, reads, session.timeout), ledger,
                    "the read-back", session.timeout)


def held_migration(
    vhost_target: BackendTarget,
    vhost_target_factory: Callable[[str], BackendTarget],
    make_session: SessionFactory,
    *,
    kinds: Sequence[str] = ("write", "read"),
    inflight_migration: bool = True,
    measurements: dict[str, float] | None = None,
) -> tuple[MigrationResult, Ledger, list[BlkRequest]]:
    """Slow disk on source and destination, :data:`HELD` requests in flight, migration; every
    held request harvested, extras watched for, the suspended-state comparison done. Requests
    that never complete fail the case, naming what the source wrote after its reply (a
    completion there is one the destination never sees). Data is not judged: a profile's slow
    variant need not keep data (qemu-storage-daemon's is a null driver). Returns the result,
    the ledger and the held requests."""
    destination = destination_target(vhost_target, vhost_target_factory)
    with slow_pair(vhost_target, destination):
        source = make_session(vhost_target, inflight_migration=inflight_migration, model=False)
        ledger = Ledger()
        held = submit_tracked(source, ledger, HELD, kinds=kinds)
        wait_popped(source, 0, settle=LATENCY_MS / 2000)
        result = migrate_to(source, destination, make_session, ledger)
        timeout = make_session.timeout + LATENCY_MS / 1000
        try:
            missing = harvest_until(result.destination, ledger, held, timeout)
            watch_quiet(result.destination, ledger)
        finally:
            result.finish(2 * LATENCY_MS / 1000)
        if measurements is not None:
            measurements["stop_ms"] = result.stop.stop_latency * 1e3
            measurements["downtime_ms"] = result.downtime.total * 1e3
            measurements["completed_on_source"] = float(result.completed_on_source_after_stop)
            measurements["completed_on_destination"] = float(
                ledger.summary().completed_per_hop.get("destination", 0))
            measurements["never_completed"] = float(len(missing))
        if missing:
            late = [f for f in result.suspended_findings if f.kind.startswith("suspended")]
            raise CaseFailed(
                f"{len(missing)} of {HELD} held request(s) never completed across the migration "
                f"(GET_VRING_BASE took {result.stop.stop_latency * 1e3:.1f} ms, bit 20 "
                f"{'negotiated' if result.stop.suspend_allowed else 'not negotiated'}; after "
                f"its reply the source " + ("wrote: " + "; ".join(str(f) for f in late[:3])
                                          if late else "wrote nothing") + ")",
                expected="each completed once, on the source before its reply or on the "
                "destination",
                seen="; ".join(ledger.submitted[r.tag].describe() for r in missing[:4]))
    return result, ledger, held


# --------------------------------------------------------------------------- cases


@case("VU-MIG-3", level=MUST)
def test_destination_resubmits_inflight_requests(
    vhost_target: BackendTarget,
    vhost_target_factory: Callable[[str], BackendTarget],
    make_session: SessionFactory,
    vhost_measurements: dict[str, float],
) -> None:
    """A destination given the migrated region (SET_INFLIGHT_FD) and the migrated
    SET_VRING_BASE completes every suspended request, once."""
    result, ledger, _ = held_migration(vhost_target, vhost_target_factory, make_session,
                                       kinds=("read",), measurements=vhost_measurements)
    fail_on([f for f in ledger.findings() if f.kind != "status"],
            "requests held across the migration")
    sent = [e.name for e in result.destination.channel.trace.entries()
            if e.direction == "fe->be"]
    if result.vmstate is None or "GET_INFLIGHT_FD" in sent:
        raise CaseFailed("the destination start", expected="SET_INFLIGHT_FD with the migrated "
                         "region and no GET_INFLIGHT_FD", seen=", ".join(sent[-20:]))


@case("VU-MIG-4", level=MUST)
def test_source_region_equals_model(
    vhost_target: BackendTarget,
    vhost_target_factory: Callable[[str], BackendTarget],
    make_session: SessionFactory,
) -> None:
    """After a GET_VRING_BASE that did not drain, the region marks exactly the requests still
    outstanding (a back-end that drained has nothing outstanding and passes)."""
    result, _, _ = held_migration(vhost_target, vhost_target_factory, make_session,
                                  kinds=("read",))
    if result.region_at_stop is None:
        raise CaseFailed("the source's in-flight region after the stop",
                         expected="a region that parses", seen="none or unparsable")
    fail_on(result.region_findings, "the source's region after GET_VRING_BASE")


@case("VU-MIG-5", level=MUST)
def test_drained_migration_keeps_data(
    vhost_target: BackendTarget,
    vhost_target_factory: Callable[[str], BackendTarget],
    make_session: SessionFactory,
) -> None:
    """Data written through the source (completed, and in flight at the drained stop) reads
    back through the destination on the same disk."""
    destination = destination_target(vhost_target, vhost_target_factory)
    source = make_session(vhost_target, inflight_migration=False)
    ledger = Ledger(source.model)
    done = submit_tracked(source, ledger, HELD, kinds=("write",))
    fail_on_missing(harvest_until(source, ledger, done, source.timeout), ledger, "the source",
                    source.timeout)
    in_flight = submit_tracked(source, ledger, HELD, kinds=("write",), sector=HELD * 8)
    result = migrate_to(source, destination, make_session, ledger)
    try:
        if result.stop.suspend_allowed:
            raise CaseFailed("bit 20 negotiation", expected="not negotiated (drain)",
                             seen="negotiated")
        fail_on_missing(harvest_until(result.destination, ledger, in_flight, source.timeout),
                        ledger, "source or destination", source.timeout)
    finally:
        result.finish(0.0)
    read_back(result.destination, ledger, done + in_flight)
    fail_on(ledger.findings(), "writes read back through the destination")


@case("VU-MIG-8", level=INFO)
def test_stop_latency_and_downtime_drain_vs_no_drain(
    vhost_target: BackendTarget,
    vhost_target_factory: Callable[[str], BackendTarget],
    make_session: SessionFactory,
    vhost_measurements: dict[str, float],
    vhost_measure: Callable[..., None],
) -> None:
    """Measures the GET_VRING_BASE round trip and the downtime (stop, transfer, start) of a
    migration with requests held on the slow disk, draining and (with bit 20) suspending.

    INFO: measured, never judged. Held requests that never complete (``never_completed``)
    or accounting findings (``findings``) are recorded as figures; the MUST cases that own
    those behaviours (VU-GVB-3 for a stop without drain, VU-SUSP-1 for writes after the
    reply, VU-MIG-3 for the destination) report them."""
    modes = [False]
    if make_session.capabilities.offers(P.GET_VRING_BASE_INFLIGHT) and \
            make_session.capabilities.offers(P.INFLIGHT_SHMFD):
        modes.append(True)
    for bit20 in modes:
        figures: dict[str, float] = {}
        findings = 0
        try:
            _, ledger, _ = held_migration(vhost_target, vhost_target_factory, make_session,
                                          kinds=("read",), inflight_migration=bit20,
                                          measurements=figures)
            findings = len([f for f in ledger.findings() if f.kind != "status"])
        except CaseFailed:
            if "stop_ms" not in figures:  # not measured at all: nothing to report
                raise
        name = "no_drain" if bit20 else "drain"
        figures["findings"] = float(findings)
        for key, value in figures.items():
            vhost_measurements[f"{name}.{key}"] = value
        mode = name.replace("_", "-")
        vhost_measure("stop_latency_ms", figures["stop_ms"], mode=mode,
                      disk_latency_ms=LATENCY_MS, inflight=HELD)
        vhost_measure("migration_downtime_ms", figures["downtime_ms"], mode=mode, inflight=HELD)
    if vhost_measurements.get("no_drain.stop_ms"):
        vhost_measurements["stop_ratio_drain_over_no_drain"] = (
            vhost_measurements["drain.stop_ms"] / vhost_measurements["no_drain.stop_ms"])


@case("VU-MIG-6", level=MUST, requires=[P.LOG_SHMFD])
def test_set_log_base_is_answered(
    vhost_session: Session, vhost_measurements: dict[str, float]
) -> None:
    """SET_LOG_BASE (16-byte {mmap_size, mmap_offset}, one memfd) on a started device gets its
    u64 reply before the deadline, and the device keeps serving I/O afterwards.

    vhost-user.rst "SET_LOG_BASE": with LOG_SHMFD the back-end replies once the log is mapped;
    the message's "reply payload" is given as "N/A", so only the reply itself (its request
    id, before the deadline) is judged: an empty reply (DPDK's) is as good as a u64. QEMU
    11.1.3 (vhost_user_set_log_base) reads the reply and checks only its request id."""
    s = vhost_session
    log = DirtyLog.for_memory(s.memory)
    try:
        started = time.monotonic()
        try:
            reply = s.call(FrontendRequest.SET_LOG_BASE, LogBase(log.mmap_size, 0),
                           fds=[log.fd])
        except BackendViolation as exc:
            if "size" not in exc.what:
                raise CaseFailed(f"SET_LOG_BASE {exc.what}", expected=exc.expected,
                                 seen=exc.seen) from None
            # the payload is N/A in the spec: a reply of another size is recorded, not judged
            vhost_measurements["reply_bytes"] = float(str(exc.seen).split()[0])
            reply = None
        else:
            if reply is None:
                raise CaseFailed("SET_LOG_BASE with LOG_SHMFD negotiated", expected="a reply",
                                 seen="nothing expected by the channel (LOG_SHMFD not "
                                 "negotiated?)")
            vhost_measurements["reply_bytes"] = float(len(reply.payload))
            if len(reply.payload) == 8:
                vhost_measurements["reply_value"] = float(U64.decode(reply.payload).value)
        vhost_measurements["reply_ms"] = round((time.monotonic() - started) * 1e3, 3)
        if reply is not None and reply.fds:
            raise CaseFailed("fds on the SET_LOG_BASE reply", expected=0, seen=len(reply.fds))
        do_io(s, 1, sector=4096)
    finally:
        log.close()


#: The messages of QEMU 11.1.3's logging start, in order (QEMU-TRACES.md correction 3, (e)).
_LOG_START = ("SET_LOG_BASE", "SET_FEATURES", "SET_VRING_ADDR")


@case("VU-MIG-7", level=MUST, requires=[P.LOG_SHMFD, P.REPLY_ACK, VirtioFeature.LOG_ALL])
def test_qemu_11_1_migration_sequence(vhost_session: Session) -> None:
    """In a running session with I/O done, QEMU 11.1.3's logging start: SET_LOG_BASE (+memfd,
    u64 reply), SET_FEATURES(+LOG_ALL) [NEED_REPLY], SET_VRING_ADDR(F_LOG, log_guest_addr)
    [NEED_REPLY] per queue; each is answered with flags 0x5 (a nonzero ack is a fail), and
    writes and reads still complete with the right data."""
    s = vhost_session
    do_io(s, 1)
    trace = s.channel.trace
    mark = len(trace.entries())
    log = DirtyLog.for_memory(s.memory)
    try:
        s.set_log_base(log.fd, log.mmap_size)
        entries = trace.entries()[mark:]
        sent = [e for e in entries if e.direction == "fe->be"]
        replies = [e for e in entries if e.direction == "be->fe"]
        names = tuple(e.name for e in sent)
        expected = _LOG_START[:2] + ("SET_VRING_ADDR",) * len(s.queues)
        if names != expected:
            raise CaseFailed("our own logging start (front-end)", expected=", ".join(expected),
                             seen=", ".join(names))
        for e in sent[1:]:
            if not e.flags & FLAG_NEED_REPLY:
                raise CaseFailed(f"{e.name} sent as QEMU 11.1.3 does",
                                 expected="NEED_REPLY set", seen=f"flags {e.flags:#x}")
        answered = [e.name for e in replies]
        if answered != list(names):
            raise CaseFailed("replies to the logging start (one each, in order)",
                             expected=", ".join(names), seen=", ".join(answered) or "none")
        # what the log says is VU-LOG-1's; here the device must keep working
        do_io(s, 2, sector=1024)
    finally:
        log.close()
