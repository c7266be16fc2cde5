"""Reconnect and crash recovery: a new connection after the front-end leaves or the back-end
dies, QEMU's reconnect sequence (QEMU-TRACES (d): SET_INFLIGHT_FD with the kept region, no
GET_INFLIGHT_FD, SET_VRING_BASE = used idx), the QEMU 7.2 order, RESET_OWNER.

Family: reconnect (VU-RECON-*, VU-RST-1). Clauses: vhost-user.rst (QEMU 11.1.3)
"Communication", "Inflight I/O tracking", "Ring states", "Front-end message types:
RESET_OWNER". Crash cases read the region the front-end holds right after the death (the
oracle) and account per request tag (frontend/accounting.py).
"""

from __future__ import annotations

import contextlib
import signal
import time

from vhost_conformance.frontend.accounting import Ledger
from vhost_conformance.frontend.channel import BackendHang
from vhost_conformance.frontend.migration import reconnect, stop_like_qemu
from vhost_conformance.frontend.protocol import U64, FrontendRequest, ProtocolFeature
from vhost_conformance.reports.model import Tier
from vhost_conformance.suites.clauses import (
    INFLIGHT_RESUBMIT_QUOTE,
    INFLIGHT_TRACKING_QUOTE,
    RST,
    SET_INFLIGHT_FD_QUOTE,
    quotes,
)
from vhost_conformance.suites.drivers import (
    SessionFactory,
    close_session,
    do_io,
    expect_status,
    require_command,
    wait_all,
    wait_popped,
)
from vhost_conformance.suites.drivers.migration import (
    HELD,
    LATENCY_MS,
    fail_on,
    fail_on_missing,
    harvest_until,
    sigkill_and_restart,
    submit_tracked,
    watch_quiet,
)
from vhost_conformance.suites.drivers.recovery import out_of_order_recovery
from vhost_conformance.suites.model import MUST, SHOULD, CaseFailed, CaseNonStrict, case
from vhost_conformance.suites.target import BackendTarget, SlowIoUnsupported

F = FrontendRequest
P = ProtocolFeature


def _alive_and_serving(target: BackendTarget, make_session: SessionFactory, what: str) -> None:
    """The back-end is alive and a fresh connection does I/O (write, read, verify)."""
    if not target.alive():
        raise CaseFailed(f"the back-end after {what}", expected="alive",
                         seen=f"exited with status {target.exit_status()}; "
                         f"log: {target.log_tail(5)}")
    s = make_session(target)
    do_io(s, 2, sector=2048)
    stop_like_qemu(s)


@case(
    "VU-RECON-1", title="A new connection after the front-end leaves", family="reconnect",
    level=SHOULD, tier=Tier.INTEROP, clause=f"{RST} Communication",
    source="QEMU-TRACES.md (d) reconnect; hw/block/vhost-user-blk.c (reconnect on "
        "CHR_EVENT_CLOSED/OPENED): the spec says only “An optional reconnection mechanism can be "
        "implemented.”",
    requirement="After the front-end closes the socket, the back-end accepts a new connection and "
        "reaches a working state.",
    ambiguity="not stated; QEMU 11.1.3 reconnects (reconnect-ms) and relies on it",
)
def test_new_connection_after_the_front_end_leaves(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """After the front-end stops the device and closes the socket, a new connection (a full
    QEMU init, GET_CONFIG included) reaches a working state."""
    s = make_session(vhost_target)
    do_io(s, 2)
    close_session(s)
    time.sleep(0.05)
    _alive_and_serving(vhost_target, make_session, "the front-end left")


@case(
    "VU-RECON-2", title="Reconnect with SET_VRING_BASE = used idx", family="reconnect",
    level=SHOULD, clause=f"{RST} Inflight I/O tracking",
    quote=quotes(INFLIGHT_TRACKING_QUOTE, SET_INFLIGHT_FD_QUOTE, INFLIGHT_RESUBMIT_QUOTE),
    requirement="After a crash, a new back-end given the old region and SET_VRING_BASE = "
        "used->idx (QEMU's fallback) resubmits and completes what was pending.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD], needs=["command"],
)
def test_reconnect_after_crash_resubmits_pending(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """SIGKILL with requests outstanding (popped and held on the slow disk when the profile has
    one; else made available to a SIGSTOPped back-end), restart, QEMU's reconnect: every
    pending request completes, those the region marked included, none twice."""
    target = require_command(vhost_target)
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(target.slow_io(LATENCY_MS))
        slow = True
    except SlowIoUnsupported:
        slow = False
    with stack:
        s = make_session(target)
        ledger = Ledger(s.model)
        if not slow:
            target.send_signal(signal.SIGSTOP)
        held = submit_tracked(s, ledger, HELD)
        if slow:
            wait_popped(s, 0, settle=LATENCY_MS / 2000)
        channel = sigkill_and_restart(target, s)
        entries_before = len(s.channel.trace.entries())
        rec = reconnect(s, channel, ledger=ledger, hop="restart")
        timeout = s.timeout + LATENCY_MS / 1000
        fail_on_missing(harvest_until(s, ledger, held, timeout), ledger,
                        "the reconnected back-end", timeout)
        watch_quiet(s, ledger)
        fail_on(ledger.findings(), "pending requests across a crash and reconnect")
        sent = [e for e in s.channel.trace.entries()[entries_before:] if e.direction == "fe->be"]
        bases = [e.payload for e in sent if e.name == "SET_VRING_BASE"]
        if bases and bases[0] != {"index": 0, "num": rec.vring_bases[0]}:
            raise CaseFailed("the reconnect's SET_VRING_BASE (our own sequence)",
                             expected=rec.vring_bases[0], seen=bases[0])
    if slow:
        # out-of-order completion before the kill: used->idx passes the heads in flight
        out_of_order_recovery(target, make_session)


@case(
    "VU-RECON-3", title="QEMU 7.2 message order", family="reconnect", level=MUST, tier=Tier.INTEROP,
    clause=f"{RST} Ring states",
    source="QEMU-TRACES.md corrections and the qemu-7.2 profile (suites/profiles, "
        "frontend/sequences.py SEQUENCES[\"qemu-7.2\"]): the start and stop order QEMU 7.2 sends, "
        "which the spec does not fix",
    requirement="The start and stop sequences of QEMU 7.2 (profile qemu-7.2) work like those of "
        "11.1.",
)
def test_qemu_7_2_message_order(vhost_target: BackendTarget, make_session: SessionFactory) -> None:
    """The start and stop sequences of QEMU 7.2 (no injected kick, no STATUS messages) carry
    I/O, a stop and a restart at the returned base like those of 11.1."""
    # a front-end that sends no GET_STATUS/SET_STATUS does not negotiate STATUS either (a
    # back-end may rightly wait for DRIVER_OK once STATUS is negotiated: DPDK does)
    s = make_session(vhost_target, profile="qemu-7.2", strip_protocol=[P.STATUS])
    do_io(s, 2)
    stop = stop_like_qemu(s)
    s.start(vring_bases=stop.vring_bases)
    do_io(s, 2, sector=512)
    stop_like_qemu(s)


@case(
    "VU-RECON-4", title="Front-end vanishes mid-request", family="reconnect", level=MUST,
    tier=Tier.ROBUSTNESS, clause=f"{RST} Communication",
    requirement="Closing the socket with requests in flight leaves the back-end alive and able to "
        "serve a new connection.",
)
def test_front_end_vanishes_mid_request(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """Closing the socket with requests in flight (held on the slow disk when the profile has
    one) leaves the back-end alive and able to serve a new connection."""
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(vhost_target.slow_io(LATENCY_MS))
        slow = True
    except SlowIoUnsupported:
        slow = False
    with stack:
        s = make_session(vhost_target)
        ledger = Ledger(s.model)
        submit_tracked(s, ledger, HELD)
        if slow:
            wait_popped(s, 0, settle=LATENCY_MS / 2000)
        s.close()  # no stop: the front-end is gone
        time.sleep(LATENCY_MS / 1000 + 0.1)
        _alive_and_serving(vhost_target, make_session, "the front-end vanished mid-request")


@case(
    "VU-RST-1", title="RESET_OWNER is harmless", family="reconnect", level=SHOULD,
    clause=f"{RST} Front-end message types: RESET_OWNER",
    quote="It is recommended that back-ends either ignore this message, or use it to disable all "
        "rings.",
    requirement="RESET_OWNER on a running ring is ignored (a request then made available "
        "completes correctly) or disables all rings (it is not served); the back-end stays alive "
        "and answers.",
)
def test_reset_owner_is_harmless(vhost_target: BackendTarget, make_session: SessionFactory) -> None:
    """RESET_OWNER on a started device is ignored or disables the rings: a read made
    available after it is served correctly or not at all; the back-end stays alive, still
    answers GET_FEATURES, and serves a new connection."""
    s = make_session(vhost_target)
    do_io(s, 4)
    vq = s.queues[0].vq
    earlier = len(vq.violations)
    s.call(F.RESET_OWNER, need_reply=s.reply_ack)
    probe = s.queues[0].blk.read(0, 8)
    s.submit(0)
    try:
        done = wait_all(s, [probe], timeout=0.5)
    except BackendHang:
        done = []  # the rings were disabled: allowed
    # a used len over the writable bytes is VU-RING-17's behaviour, judged there
    later = [v for v in vq.violations[earlier:] if "used len" not in str(v)]
    if done or later:
        try:
            expect_status(done, what="read after RESET_OWNER")
            if later:
                raise CaseFailed("used ring after RESET_OWNER", expected="no violation",
                                 seen=str(later[0]))
        except CaseFailed as exc:
            raise CaseNonStrict("RESET_OWNER on a running ring neither was ignored nor "
                                f"disabled the rings: {exc.reason}") from None
    try:
        reply = s.call(F.GET_FEATURES)
    except Exception as exc:
        raise CaseFailed("GET_FEATURES after RESET_OWNER", expected="an answer",
                         seen=f"{type(exc).__name__}: {exc}") from None
    if reply is None or U64.decode(reply.payload).value != s.negotiated.features:
        raise CaseFailed("GET_FEATURES after RESET_OWNER", expected=hex(s.negotiated.features),
                         seen=None if reply is None else hex(U64.decode(reply.payload).value))
    close_session(s, stop=False)
    _alive_and_serving(vhost_target, make_session, "RESET_OWNER")
