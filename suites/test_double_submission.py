"""Double submission: every request completes exactly once across stop/restart, in-flight
migration and a crash, and nothing already completed is completed again (TEST-IDEAS "double
submission"; frontend/accounting.py keeps the ledger per request tag).

Family: double-submission (VU-DBL-*). Clauses: vhost-user.rst (QEMU 11.1.3) "Front-end
message types: GET_VRING_BASE / SET_VRING_BASE", "Inflight I/O tracking". A completion the
source writes after its last GET_VRING_BASE reply lands in RAM the destination no longer uses:
the suspended-state comparison is what reveals it, so in-flight migration cases count a
used-ring or status-byte write after the reply as a completion on the source.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from vhost_conformance.frontend.accounting import AccountingFinding, Ledger
from vhost_conformance.frontend.migration import harvest_all, reconnect, stop_like_qemu
from vhost_conformance.frontend.protocol import ProtocolFeature
from vhost_conformance.suites.clauses import (
    GET_VRING_BASE_DRAIN_QUOTE,
    INFLIGHT_MIGRATION_QUOTE,
    INFLIGHT_TRACKING_QUOTE,
    INFLIGHT_USED_IDX_QUOTE,
    RST,
    SET_INFLIGHT_FD_QUOTE,
    quotes,
)
from vhost_conformance.suites.drivers import (
    MakeTarget,
    SessionFactory,
    require_command,
    slow_disk,
    wait_popped,
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
    sigkill_and_restart,
    submit_tracked,
    watch_quiet,
)
from vhost_conformance.suites.drivers.recovery import mid_update_recovery, out_of_order_recovery
from vhost_conformance.suites.model import MUST, SHOULD, CaseFailed, Unsupported, case
from vhost_conformance.suites.target import BackendTarget, SlowIoUnsupported


def _completion_evidence(findings: list[AccountingFinding]) -> list[AccountingFinding]:
    """Suspended-state writes to a used ring, descriptor ring or status byte: a completion the
    source made after its reply."""
    marks = ("used ring", "descriptor ring", "status byte")
    return [f for f in findings if f.kind == "suspended-write"
            and any(m in f.where for m in marks)]


@contextlib.contextmanager
def _maybe_slow(target: BackendTarget) -> Iterator[bool]:
    """The slow disk when the profile has one (True), else the plain back-end (False)."""
    try:
        context = target.slow_io(LATENCY_MS)
        context.__enter__()
    except SlowIoUnsupported:
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(Exception):
            context.__exit__(None, None, None)


@case(
    "VU-DBL-1", title="No double completion across stop and restart", family="double-submission",
    level=MUST, clause=f"{RST} Front-end message types: GET_VRING_BASE / SET_VRING_BASE",
    quote=GET_VRING_BASE_DRAIN_QUOTE,
    requirement="Across GET_VRING_BASE, SET_VRING_BASE and restart on one back-end, every request "
        "tag completes exactly once.",
)
def test_no_double_completion_across_stop_and_restart(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """Requests in flight at GET_VRING_BASE (drained, or suspended with bit 20) and the
    restart at the returned base: each request tag completes exactly once."""
    with _maybe_slow(vhost_target) as slow:
        # a profile's slow variant need not keep data: judge data only without it
        s = make_session(vhost_target, model=not slow)
        ledger = Ledger(s.model)
        held = submit_tracked(s, ledger, HELD)
        if slow:
            wait_popped(s, 0, settle=LATENCY_MS / 2000)
        stop = stop_like_qemu(s)
        harvest_all(s, ledger)  # what completed before the reply
        s.start(vring_bases=stop.vring_bases)
        timeout = s.timeout + LATENCY_MS / 1000
        fail_on_missing(harvest_until(s, ledger, held, timeout), ledger, "the restarted ring",
                        timeout)
        more = submit_tracked(s, ledger, HELD, sector=HELD * 8)
        fail_on_missing(harvest_until(s, ledger, more, timeout), ledger, "the restarted ring",
                        timeout)
        watch_quiet(s, ledger)
        fail_on(ledger.findings(), "requests across GET_VRING_BASE and a restart")


@case(
    "VU-DBL-2", title="Exactly once across in-flight migration", family="double-submission",
    level=MUST, clause=f"{RST} Inflight I/O tracking", quote=INFLIGHT_MIGRATION_QUOTE,
    requirement="With bit 20, each request completes exactly once across source and destination: "
        "never on both.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD, ProtocolFeature.GET_VRING_BASE_INFLIGHT],
    needs=["slow-io"],
)
def test_exactly_once_across_inflight_migration(
    vhost_target: BackendTarget, vhost_target_factory: MakeTarget, make_session: SessionFactory,
    vhost_measurements: dict[str, float]
) -> None:
    """With bit 20, writes and reads held on the slow disk complete exactly once over source
    and destination, never on both (a used-ring or status write by the source after its reply
    counts as a completion there)."""
    result, ledger, _ = held_migration(vhost_target, vhost_target_factory, make_session,
                                       measurements=vhost_measurements)
    findings = ledger.findings() + _completion_evidence(result.suspended_findings)
    fail_on(findings, "requests held across an in-flight migration")


@case(
    "VU-DBL-3", title="Exactly once across a crash", family="double-submission", level=SHOULD,
    clause=f"{RST} Inflight I/O tracking",
    quote=quotes(INFLIGHT_TRACKING_QUOTE, SET_INFLIGHT_FD_QUOTE, INFLIGHT_USED_IDX_QUOTE),
    requirement="Killing the back-end with K requests outstanding, restarting and reconnecting "
        "completes each of them exactly once.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD], needs=["command", "slow-io"],
)
def test_exactly_once_across_a_crash(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """SIGKILL with requests held on the slow disk, restart, reconnect with the kept region
    and SET_VRING_BASE = used idx: each request completes exactly once; also when requests
    completed out of order before the kill (used->idx past the heads in flight)."""
    target = require_command(vhost_target)
    with slow_disk(target, LATENCY_MS):
        s = make_session(target, model=False)
        ledger = Ledger()
        held = submit_tracked(s, ledger, HELD)
        wait_popped(s, 0, settle=LATENCY_MS / 2000)
        channel = sigkill_and_restart(target, s)
        rec = reconnect(s, channel, ledger=ledger, hop="restart")
        timeout = s.timeout + LATENCY_MS / 1000
        fail_on_missing(harvest_until(s, ledger, held, timeout), ledger, "the restarted back-end",
                        timeout)
        watch_quiet(s, ledger)
        findings = ledger.findings()
        if findings:
            marked = ", ".join(str(h) for h in rec.oracle_heads[0]) or "none"
            fail_on(findings, f"requests across a SIGKILL (heads marked in the region after the "
                    f"kill: {marked})")
    # the same across a crash after out-of-order completion (used->idx past in-flight heads):
    # exactly the heads still in flight complete again, once, in counter order
    out_of_order_recovery(target, make_session)


@case(
    "VU-DBL-4", title="Completed requests are not resubmitted", family="double-submission",
    level=SHOULD, clause=f"{RST} Inflight I/O tracking",
    quote=quotes(INFLIGHT_TRACKING_QUOTE, INFLIGHT_USED_IDX_QUOTE),
    requirement="A request already in the used ring on the source is not completed again on the "
        "destination or after a reconnect.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD],
)
def test_completed_requests_are_not_resubmitted(
    vhost_target: BackendTarget, vhost_target_factory: MakeTarget, make_session: SessionFactory,
    vhost_measurements: dict[str, float]
) -> None:
    """Requests the source completed into the used ring (not yet seen by the driver) are not
    completed again by the destination after a migration; nor after a reconnect when the
    back-end died between publishing them in used->idx and clearing them in the region (the
    crash mid-update built on purpose: the last batch must be fixed up, where the suite runs
    the back-end itself; ``mid_update_checked`` 0 when it could not)."""
    destination = destination_target(vhost_target, vhost_target_factory)
    s = make_session(vhost_target)
    ledger = Ledger(s.model)
    done = submit_tracked(s, ledger, HELD)
    vq = s.queues[0].vq
    deadline = time.monotonic() + s.timeout
    while (vq.used_idx_in_memory() - vq.used_idx) & 0xFFFF < HELD:
        if time.monotonic() > deadline:
            raise CaseFailed("completions before the migration", expected=f"{HELD} used entries",
                             seen=f"{(vq.used_idx_in_memory() - vq.used_idx) & 0xFFFF}")
        time.sleep(0.002)
    result = migrate_to(s, destination, make_session, ledger)
    try:
        fail_on_missing(harvest_until(result.destination, ledger, done, s.timeout), ledger,
                        "source or destination", s.timeout)
        watch_quiet(result.destination, ledger, 0.5)
    finally:
        result.finish(0.0)
    fail_on(ledger.findings(), "requests completed on the source before the migration")
    try:
        mid_update_recovery(vhost_target, make_session)
    except Unsupported:
        vhost_measurements["mid_update_checked"] = 0.0
    else:
        vhost_measurements["mid_update_checked"] = 1.0
