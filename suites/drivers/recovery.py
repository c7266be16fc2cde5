"""Crash recovery with out-of-order completion (vhost-user.rst "Inflight I/O tracking":
"Resubmit inflight DescStateSplit entries in order of their counter value"), shared by the
in-flight, double-submission and reconnect families."""

from __future__ import annotations

import contextlib
import signal
import struct
import time
from dataclasses import dataclass

from vhost_conformance.frontend.blk import SECTOR_SIZE, BlkCompletion, BlkDriver, BlkRequest
from vhost_conformance.frontend.channel import BackendHang
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.inflight import QueueRegion
from vhost_conformance.frontend.virtqueue import Virtqueue
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


def out_of_order_recovery(vhost_target: BackendTarget, make_session: SessionFactory,
                          *, kill: bool = True) -> None:
    """Out-of-order completion before the kill, then restart: exactly the heads still in
    flight are resubmitted, in counter order, which here differs from head order.
    ``kill`` False: no kill, the front-end reconnects to the same back-end (the old
    connection closed with A and B in flight), handing it the region by SET_INFLIGHT_FD.

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
    if kill:
        require_command(vhost_target)
    with slow_disk(vhost_target, OOO_LATENCY_MS):
        session = make_session(vhost_target, model=False)
        tracker = InflightTracker(session)
        held = _hold_out_of_order(session, tracker)
        if kill:
            command = require_command(vhost_target)
            command.send_signal(signal.SIGKILL)
            command.wait_exit(5.0)
            command.start()
            make_session.reconnect(session, command)
        else:
            make_session.reconnect(session, vhost_target)
        _judge_resubmission(session, tracker, held, "kill" if kill else "reconnect")


@dataclass(frozen=True)
class _Held:
    """The four requests of the out-of-order recovery: two GET_IDs that completed, writes A
    and B held on the slow disk at the kill."""

    first: BlkRequest
    second: BlkRequest
    write_a: BlkRequest
    write_b: BlkRequest
    #: the driver that built them (the one the final GET_ID goes through, as before the kill)
    blk: BlkDriver


def _hold_out_of_order(session: Session, tracker: InflightTracker) -> _Held:
    """Submit GET_ID, A, (GET_ID completes) B, GET_ID; check the GET_IDs completed first, A and
    B are marked in flight and used->idx is 2: the state the kill must land in."""
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
    return _Held(first, second, write_a, write_b, blk)


def _judge_resubmission(session: Session, tracker: InflightTracker, held: _Held,
                        event: str = "kill") -> None:
    """After the reconnect: A and B resubmitted exactly once each, in counter order (A first),
    nothing else used, and the ring goes on from avail index 4."""
    first, second, write_a, write_b = held.first, held.second, held.write_a, held.write_b
    try:
        done = tracker.wait(0, 2, timeout=session.timeout + OOO_LATENCY_MS / 1000 * 2)
    except BackendHang as exc:
        raise CaseFailed(
            f"writes A (head {write_a.head}) and B (head {write_b.head}) in flight at the "
            f"{event}, used->idx 2 past both (the GET_IDs completed out of order)",
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
    tracker.submit([held.blk.get_id()])
    session.submit(0)
    try:
        expect_status(tracker.wait(0, 1), what="GET_ID after the resubmission")
    except BackendHang as exc:
        raise CaseFailed("a GET_ID at avail index 4 after the resubmission",
                         expected="completed", seen=str(exc)) from None


def mid_update_recovery(vhost_target: BackendTarget, make_session: SessionFactory) -> None:
    """A crash in the middle of a completion, built on purpose: after the kill the front-end
    writes into the region the state a back-end leaves when it dies between increasing
    used->idx and clearing the batch (vhost-user.rst "Inflight I/O tracking", "When
    supplying used buffers to the driver" steps 4-6: used->idx written, inflight and used_idx
    not). The restart must fix the last batch up ("If the value of used_idx does not match the
    idx value of used ring ... Clear the inflight field of DescStateSplit entries in last
    batch") and resubmit exactly the heads still in flight, nothing of that batch.

    avail: [0] write W (slow; only with slow I/O), then two GET_IDs (fast: both complete while
    W waits on the disk; two reads without slow I/O). After the kill those two become the last
    batch: inflight 1 again, linked from last_batch_head through desc.next, the region's
    used_idx 2 behind used->idx. A back-end that skips the fix-up resubmits both (completed
    twice) or loses its place in the ring; one that follows the rule resubmits W alone
    (nothing without slow I/O), and a read made available afterwards completes."""
    command = require_command(vhost_target)
    slow = contextlib.ExitStack()
    try:
        slow.enter_context(slow_disk(vhost_target, OOO_LATENCY_MS))
        held = True
    except Unsupported:
        held = False
    with slow:
        session = make_session(vhost_target, model=False)
        tracker = InflightTracker(session)
        blk = session.queues[0].blk
        writes = tracker.submit([blk.write(32, pattern(72, 8 * SECTOR_SIZE))] if held else [])
        # GET_ID does not reach the disk: fast while W waits on it; without slow I/O two reads
        # (DPDK's vhost_blk answers GET_ID with IOERR)
        ids = tracker.submit([blk.get_id(), blk.get_id()] if held
                             else [blk.read(64, 8), blk.read(72, 8)])
        session.submit(0)
        try:
            early = tracker.wait(0, 2, timeout=OOO_LATENCY_MS / 2000 if held else None)
        except BackendHang:
            if not held:
                raise
            raise Unsupported("out-of-order completion",
                              "two GET_IDs after a slow write did not complete first") from None
        if {c.tag for c in early} != {r.tag for r in ids}:
            raise Unsupported("out-of-order completion",
                              "the slow write completed before the GET_IDs")
        expect_status(early, what="GET_ID" if held else "read")
        vq = session.queues[0].vq
        used_idx = vq.used_idx_in_memory()
        queue = tracker.region().queues[0]
        held_heads = [w.head for w in writes]
        if not set(held_heads) <= set(queue.inflight_heads()):
            raise CaseFailed("heads marked in flight before the kill (write W held on the disk)",
                             expected=f"{held_heads} among them", seen=queue.inflight_heads())
        command.send_signal(signal.SIGKILL)
        command.wait_exit(5.0)
        if (used_idx - 2) & 0xFFFF or (vq.used_idx_in_memory() - used_idx) & 0xFFFF:
            raise Unsupported("out-of-order completion",
                              f"the write completed before the kill ({OOO_LATENCY_MS} ms "
                              "latency was not enough on this machine)")
        first, second, behind = _write_mid_update(session, queue, ids, early, used_idx)
        command.start()
        make_session.reconnect(session, command)
        state = (f"region after the kill: heads {first} and {second} (both completed, in the "
                 f"used ring) marked as the last batch from last_batch_head {second}, used_idx "
                 f"{behind}, used->idx {used_idx}; in flight: heads {held_heads or 'none'}")
        _judge_mid_update(session, tracker, vq, blk, writes, state, held=held)


def _write_mid_update(
    session: Session,
    queue: QueueRegion,
    ids: list[BlkRequest],
    early: list[BlkCompletion],
    used_idx: int,
) -> tuple[int, int, int]:
    """Write into the region the state of a back-end killed between used->idx and clearing
    the batch: the two completed requests ``early`` marked again as the last batch, the
    region's used_idx 2 behind ``used_idx``; (first head, second head, that used_idx)."""
    # the batch in used-ring order: first, then second (last_batch_head = second)
    by_tag = {r.tag: r.head for r in ids}
    first, second = (by_tag[c.tag] for c in early)
    region = session.inflight
    assert region is not None
    entries = {e.index: e.offset for e in queue.entries}
    behind = (used_idx - 2) & 0xFFFF
    region.map[entries[first]] = 1
    region.map[entries[second]] = 1
    struct.pack_into("<H", region.map, entries[second] + 6, first)
    struct.pack_into("<H", region.map, queue.offset + 12, second)
    struct.pack_into("<H", region.map, queue.offset + 14, behind)
    return first, second, behind


def _judge_mid_update(
    session: Session,
    tracker: InflightTracker,
    vq: Virtqueue,
    blk: BlkDriver,
    writes: list[BlkRequest],
    state: str,
    *,
    held: bool,
) -> None:
    """After the reconnect: W (when ``held``) resubmitted and completed once, nothing of the
    last batch again, and a read made available afterwards completes (``vq``: the ring as
    the case held it before the kill)."""
    try:
        done = tracker.wait(0, len(writes), timeout=session.timeout + OOO_LATENCY_MS / 1000)
    except BackendHang as exc:
        raise CaseFailed(state, expected="W resubmitted and completed after the reconnect",
                         seen=str(exc)) from None
    time.sleep(0.3)
    done += tracker.reap(0)
    violations = vq.violations
    if violations:
        raise CaseFailed(state, expected="the last batch fixed up: neither of its requests "
                         "completed again", seen=str(violations[0]))
    if [c.tag for c in done] != [w.tag for w in writes]:
        raise CaseFailed(state, expected=f"{'W completed once, ' if held else ''}nothing "
                         "else", seen=f"{len(done)} completion(s)")
    expect_status(done, what="resubmitted write")
    # the ring goes on at avail index used->idx + in flight
    tracker.submit([blk.read(80, 8)])
    session.submit(0)
    try:
        expect_status(tracker.wait(0, 1), what="read after the recovery")
    except BackendHang as exc:
        raise CaseFailed(f"a read made available after the recovery ({state})",
                         expected="completed", seen=str(exc)) from None
