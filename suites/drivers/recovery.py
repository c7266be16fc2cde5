"""Crash recovery with out-of-order completion (vhost-user.rst "Inflight I/O tracking":
"Resubmit inflight DescStateSplit entries in order of their counter value"), shared by the
in-flight, double-submission and reconnect families."""

from __future__ import annotations

import signal
import time

from vhost_conformance.frontend.blk import SECTOR_SIZE
from vhost_conformance.frontend.channel import BackendHang
from vhost_conformance.suites.drivers import (
    InflightTracker,
    SessionFactory,
    expect_status,
    pattern,
    require_command,
    slow_disk,
)
from vhost_conformance.suites.model import CaseFailed, Unsupported
from vhost_conformance.suites.target import BackendTarget

#: Latency of the writes held across the kill in the out-of-order recovery: long enough that
#: the GET_IDs around them complete, and the kill lands, well before they do.
OOO_LATENCY_MS = 700


def out_of_order_recovery(vhost_target: BackendTarget, make_session: SessionFactory) -> None:
    """Out-of-order completion before the kill, then restart: exactly the heads still in
    flight are resubmitted, in counter order, which here differs from head order.

    avail: [0] GET_ID (fast), [1] write A (slow), [2] write B (slow), [3] GET_ID (fast).
    GET_ID does not reach the disk (qemu-storage-daemon, reference back-end), so both complete
    while A and B wait on the disk: used->idx is 2 and has passed A and B. B is added after the
    first GET_ID completed and takes that GET_ID's descriptors: head(B) < head(A), while
    counter(A) < counter(B). The reconnect sends SET_VRING_BASE = used->idx (2), as QEMU does
    after a crash, so a back-end that ignores the region pops avail[2] and avail[3] again
    (B twice, the second GET_ID twice, A never). Resubmission order is judged by the order of
    A's and B's used entries: both have the same latency, so a back-end that resubmits in
    counter order completes A first.
    """
    require_command(vhost_target)
    with slow_disk(vhost_target, OOO_LATENCY_MS):
        session = make_session(vhost_target, model=False)
        tracker = InflightTracker(session)
        blk = session.queues[0].blk
        first = tracker.submit([blk.get_id()])[0]
        write_a = tracker.submit([blk.write(0, pattern(70, 8 * SECTOR_SIZE))])[0]
        session.submit(0)
        early = tracker.wait(0, 1, timeout=OOO_LATENCY_MS / 2000)
        if [c.tag for c in early] != [first.tag]:
            raise Unsupported("out-of-order completion",
                              "the GET_ID after a slow write did not complete first")
        write_b = tracker.submit([blk.write(16, pattern(71, 8 * SECTOR_SIZE))])[0]
        second = tracker.submit([blk.get_id()])[0]
        session.submit(0)
        late_id = tracker.wait(0, 1, timeout=OOO_LATENCY_MS / 2000)
        if [c.tag for c in late_id] != [second.tag]:
            raise Unsupported("out-of-order completion",
                              "the GET_ID after two slow writes did not complete first")
        expect_status(early + late_id, what="GET_ID")
        if not write_b.head < write_a.head:
            raise RuntimeError(f"front-end head layout: B {write_b.head} !< A {write_a.head}")
        marked = tracker.region().queues[0].inflight_heads()
        held = {write_a.head, write_b.head}
        if not held <= set(marked):
            raise CaseFailed(
                "heads marked in flight before the kill (writes A, B held on the disk)",
                expected=f"{sorted(held)} among them", seen=marked,
            )
        if (session.queues[0].vq.used_idx_in_memory() - 2) & 0xFFFF:
            raise Unsupported("out-of-order completion",
                              f"the writes completed before the kill ({OOO_LATENCY_MS} ms "
                              "latency was not enough on this machine)")
        command = require_command(vhost_target)
        command.send_signal(signal.SIGKILL)
        command.wait_exit(5.0)
        command.start()
        make_session.reconnect(session, command)
        try:
            done = tracker.wait(0, 2, timeout=session.timeout + OOO_LATENCY_MS / 1000 * 2)
        except BackendHang as exc:
            raise CaseFailed(
                f"writes A (head {write_a.head}) and B (head {write_b.head}) in flight at the "
                "kill, used->idx 2 past both (the GET_IDs completed out of order)",
                expected="both resubmitted and completed after the reconnect", seen=str(exc),
            ) from None
        order = [c.tag for c in done]
        violations = session.queues[0].vq.violations
        if violations:
            raise CaseFailed("used ring after the resubmission",
                             expected="each in-flight head exactly once, no completed head "
                             "again", seen=str(violations[0]))
        if set(order) != {write_a.tag, write_b.tag}:
            names = {first.tag: "GET_ID#1", second.tag: "GET_ID#2", write_a.tag: "A",
                     write_b.tag: "B"}
            raise CaseFailed("used entries after the reconnect",
                             expected="A and B once each",
                             seen=[names.get(t, t) for t in order])
        expect_status(done, what="resubmitted write")
        if order != [write_a.tag, write_b.tag]:
            raise CaseFailed(
                "order of the resubmitted writes' used entries (same latency each)",
                expected=f"A (counter 1, head {write_a.head}) then B (counter 2, head "
                f"{write_b.head}): counter order",
                seen="B then A: head order",
            )
        time.sleep(0.2)
        extra = tracker.reap(0)
        if extra or session.queues[0].vq.violations:
            raise CaseFailed("used entries after A and B completed",
                             expected="none", seen=f"{len(extra)} more")
        # the ring goes on from avail index 4: a back-end that kept a wrong last_avail_idx
        # pops an old slot again, or nothing
        tracker.submit([blk.get_id()])
        session.submit(0)
        try:
            expect_status(tracker.wait(0, 1), what="GET_ID after the resubmission")
        except BackendHang as exc:
            raise CaseFailed("a GET_ID at avail index 4 after the resubmission",
                             expected="completed", seen=str(exc)) from None
