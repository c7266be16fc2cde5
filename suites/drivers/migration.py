"""Shared helpers of the migration, reconnect, double-submission and device-state families (moved
from test_migration.py): destination targets, tracked submission and harvest, the held migration."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from vhost_conformance.frontend.accounting import AccountingFinding, Ledger
from vhost_conformance.frontend.blk import SECTOR_SIZE, BlkRequest
from vhost_conformance.frontend.channel import Channel
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.migration import (
    MigrationResult,
    harvest_all,
    migrate,
    prepare_destination,
)
from vhost_conformance.suites.drivers import (
    SessionFactory,
    pattern,
    slow_disk,
    wait_popped,
)
from vhost_conformance.suites.model import CaseFailed
from vhost_conformance.suites.plugin import register_trace
from vhost_conformance.suites.target import BackendTarget, CommandTarget

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


def sigkill_and_restart(target: CommandTarget, session: Session) -> Channel:
    """SIGKILL the back-end, wait for its death, start a new instance and connect to it: the
    new channel records into the session's wire trace (give it to ``reconnect``)."""
    target.send_signal(signal.SIGKILL)
    if target.wait_exit(session.timeout) is None:
        raise CaseFailed("the back-end after SIGKILL", expected="dead", seen="still running")
    target.start()
    return Channel(target.connect_socket(session.timeout), trace=session.channel.trace)


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
    profile: str = "qemu-11.1",
) -> tuple[MigrationResult, Ledger, list[BlkRequest]]:
    """Slow disk on source and destination, :data:`HELD` requests in flight, migration; every
    held request harvested, extras watched for, the suspended-state comparison done. Requests
    that never complete fail the case, naming what the source wrote after its reply (a
    completion there is one the destination never sees). Data is not judged: a profile's slow
    variant need not keep data (qemu-storage-daemon's is a null driver). Returns the result,
    the ledger and the held requests. ``profile``: the front-end profile of both sides
    (``qemu-next``: the switch-over sends GET_VRING_BASE_SKIP_DRAIN where bit 23 was agreed)."""
    destination = destination_target(vhost_target, vhost_target_factory)
    with slow_pair(vhost_target, destination):
        source = make_session(vhost_target, inflight_migration=inflight_migration, model=False,
                              profile=profile)
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
