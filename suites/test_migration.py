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

import time
from collections.abc import Callable

from vhost_conformance.frontend.accounting import Ledger
from vhost_conformance.frontend.channel import BackendViolation
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.memory import DirtyLog
from vhost_conformance.frontend.protocol import (
    FLAG_NEED_REPLY,
    U64,
    FrontendRequest,
    LogBase,
    ProtocolFeature,
    VirtioFeature,
)
from vhost_conformance.reports.model import Tier
from vhost_conformance.suites.clauses import (
    GET_VRING_BASE_DRAIN_QUOTE,
    GET_VRING_BASE_INFLIGHT_QUOTE,
    INFLIGHT_MIGRATION_QUOTE,
    MAY_SUSPEND,
    MIGRATION_LOG_QUOTE,
    RST,
    quotes,
)
from vhost_conformance.suites.drivers import (
    MakeTarget,
    SessionFactory,
    do_io,
)
from vhost_conformance.suites.drivers.migration import (
    HELD,
    LATENCY_MS,
    destination_target,
    fail_on,
    fail_on_missing,
    harvest_until,
    held_migration,
    migrate_to,
    read_back,
    submit_tracked,
)
from vhost_conformance.suites.model import INFO, MUST, CaseFailed, case
from vhost_conformance.suites.target import BackendTarget

P = ProtocolFeature

#: Per-request latency of the slow disk and how many requests are held in flight.
@case(
    "VU-MIG-3", title="Destination resubmits the migrated in-flight requests", family="migration",
    level=MUST, clause=f"{RST} Inflight I/O tracking; Front-end message types: GET_VRING_BASE",
    quote=INFLIGHT_MIGRATION_QUOTE,
    requirement="A destination given the migrated region by SET_INFLIGHT_FD and the migrated "
        "SET_VRING_BASE completes every suspended request once.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD, ProtocolFeature.GET_VRING_BASE_INFLIGHT],
    needs=["slow-io"],
)
def test_destination_resubmits_inflight_requests(
    vhost_target: BackendTarget, vhost_target_factory: MakeTarget, make_session: SessionFactory,
    vhost_measurements: dict[str, float]
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


@case(
    "VU-MIG-4", title="Source region equals the front-end's model", family="migration", level=MUST,
    clause=f"{RST} Inflight I/O tracking",
    quote=quotes(GET_VRING_BASE_DRAIN_QUOTE, GET_VRING_BASE_INFLIGHT_QUOTE),
    requirement="After a no-drain GET_VRING_BASE, the region's bytes equal the front-end's model "
        "of what is in flight.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD, ProtocolFeature.GET_VRING_BASE_INFLIGHT],
    needs=["slow-io"], ambiguity=MAY_SUSPEND,
)
def test_source_region_equals_model(
    vhost_target: BackendTarget, vhost_target_factory: MakeTarget, make_session: SessionFactory
) -> None:
    """After a GET_VRING_BASE that did not drain, the region marks exactly the requests still
    outstanding (a back-end that drained has nothing outstanding and passes)."""
    result, _, _ = held_migration(vhost_target, vhost_target_factory, make_session,
                                  kinds=("read",))
    if result.region_at_stop is None:
        raise CaseFailed("the source's in-flight region after the stop",
                         expected="a region that parses", seen="none or unparsable")
    fail_on(result.region_findings, "the source's region after GET_VRING_BASE")


@case(
    "VU-MIG-5", title="Drain migration keeps the data", family="migration", level=MUST,
    clause=f"{RST} Migration", quote=GET_VRING_BASE_DRAIN_QUOTE,
    requirement="Data written through the source before a drained stop reads back through a "
        "destination on the same disk.",
    needs=["shared-disk"],
)
def test_drained_migration_keeps_data(
    vhost_target: BackendTarget, vhost_target_factory: MakeTarget, make_session: SessionFactory
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


@case(
    "VU-MIG-8", title="Stop latency and downtime, drain vs no-drain", family="migration",
    level=INFO, tier=Tier.INTEROP, clause=f"{RST} Front-end message types: GET_VRING_BASE",
    source="QEMU-TRACES.md (b) and (e): the stop sequence and in-flight migration QEMU 11.1.3 "
        "runs (inflight-migration=on/off); measured, not judged",
    requirement="Measured, not judged: the GET_VRING_BASE round trip and the migration downtime "
        "with requests held on a slow disk, draining and (with bit 20) suspending; every held "
        "request still completes once.",
    needs=["slow-io"],
)
def test_stop_latency_and_downtime_drain_vs_no_drain(
    vhost_target: BackendTarget, vhost_target_factory: MakeTarget, make_session: SessionFactory,
    vhost_measurements: dict[str, float], vhost_measure: Callable[..., None]
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


@case(
    "VU-MIG-6", title="SET_LOG_BASE is answered", family="migration", level=MUST,
    clause=f"{RST} Front-end message types: SET_LOG_BASE", quote=MIGRATION_LOG_QUOTE,
    requirement="With LOG_SHMFD, SET_LOG_BASE with the 16-byte log description and one fd gets "
        "its reply (payload N/A in the spec: any size) before the deadline.",
    requires=[ProtocolFeature.LOG_SHMFD],
)
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


@case(
    "VU-MIG-7", title="Migration sequence of QEMU 11.1.3", family="migration", level=MUST,
    clause=f"{RST} Migration",
    quote="While processing the rings (whether they are enabled or not), the back-end must "
        "support changing some configuration aspects on the fly.",
    requirement="SET_LOG_BASE, SET_FEATURES(+LOG_ALL) and SET_VRING_ADDR(F_LOG) mid-session, as "
        "QEMU 11.1.3 sends them with NEED_REPLY, are each acked and I/O continues.",
    requires=[ProtocolFeature.LOG_SHMFD, ProtocolFeature.REPLY_ACK, VirtioFeature.LOG_ALL],
)
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
        # with STATUS, QEMU 11.1.3 re-adds FEATURES_OK after SET_FEATURES: a GET_STATUS
        # (proxy trace of VU-QEMU-7; the fidelity check holds the two against each other)
        status = ("GET_STATUS",) if s.profile.use_status and s.has_protocol(
            ProtocolFeature.STATUS) else ()  # fmt: skip
        expected = _LOG_START[:2] + status + ("SET_VRING_ADDR",) * len(s.queues)
        if names != expected:
            raise CaseFailed("our own logging start (front-end)", expected=", ".join(expected),
                             seen=", ".join(names))
        for e in sent[1:]:
            if e.name == "GET_STATUS":
                continue  # a defined reply, no NEED_REPLY (QEMU sends flags 0x1)
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
