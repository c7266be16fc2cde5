"""Stopping rings: GET_VRING_BASE, SET_VRING_BASE, drain, and the suspended device state.

Families: stop-drain (VU-GVB-*), rings (VU-SVB-1), suspended (VU-SUSP-*). Clauses:
vhost-user.rst (QEMU 11.1.3) "Front-end message types: GET_VRING_BASE / SET_VRING_BASE",
"Ring states", "Suspended device state", "Inflight I/O tracking". Slow-disk cases keep
requests in flight with the profile's slow I/O (50-200 ms per request).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from vhost_conformance.frontend.blk import BlkRequest
from vhost_conformance.frontend.channel import BackendHang
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.protocol import (
    U64,
    BackendRequest,
    BlkFeature,
    Config,
    FrontendRequest,
    ProtocolFeature,
    VirtioFeature,
    VringState,
    split_packed_base,
)
from vhost_conformance.frontend.virtqueue import PackedVirtqueue
from vhost_conformance.suites.clauses import (
    GET_VRING_BASE_DRAIN_QUOTE,
    GET_VRING_BASE_INFLIGHT_QUOTE,
    GET_VRING_BASE_SPLIT_QUOTE,
    GET_VRING_BASE_STOPS_QUOTE,
    MAY_SUSPEND,
    RST,
    SET_VRING_BASE_SPLIT_QUOTE,
    SUSPENDED_DMA,
    SUSPENDED_STATE_QUOTE,
    quotes,
)
from vhost_conformance.suites.drivers import (
    COMPLETES_AFTER_REPLY,
    InflightTracker,
    SessionFactory,
    Stopped,
    do_io,
    fail_on_findings,
    pending_io,
    provoke_config_change,
    restart_variant,
    slow_disk,
    split_ring,
    stop_now,
    wait_popped,
)
from vhost_conformance.suites.model import MAY, MUST, CaseFailed, CaseHang, Unsupported, case
from vhost_conformance.suites.target import BackendTarget, Capabilities

F = FrontendRequest
P = ProtocolFeature


#: Per-request latency of the slow disk, and how many requests are held in flight.
LATENCY_MS = 100
HELD = 2


def _held_stop(session: Session, tracker: InflightTracker | None = None) -> Stopped:
    """Hold :data:`HELD` reads in flight on the slow disk, then stop every ring."""
    requests = pending_io(session, HELD)
    if tracker is not None:
        tracker.submit(requests)
    wait_popped(session, 0, settle=0.1)
    return stop_now(session, requests)


def _expect_base(seen: int, expected: int, what: str, *, split: bool = False) -> None:
    """``split``: the whole 32-bit num is judged (bits 16-31 are 0 for a split ring: the
    num is the 16-bit avail index; only the packed layout puts wrap counters above it)."""
    if seen & 0xFFFF != expected & 0xFFFF:
        raise CaseFailed(f"GET_VRING_BASE num {what}", expected=expected, seen=seen)
    if split and seen >> 16:
        raise CaseFailed(f"GET_VRING_BASE num {what}, bits 16-31 (split ring)",
                         expected=f"0 (num {expected & 0xFFFF:#x})", seen=f"{seen:#x}")


# --------------------------------------------------------------------------- GET_VRING_BASE


@case(
    "VU-GVB-1", title="GET_VRING_BASE returns the next avail index", family="stop-drain",
    level=MUST, clause=f"{RST} Front-end message types: GET_VRING_BASE",
    quote=quotes(GET_VRING_BASE_STOPS_QUOTE, GET_VRING_BASE_SPLIT_QUOTE),
    requirement="After N requests were taken, GET_VRING_BASE returns N (split: 16 bits of num) "
        "and stops the ring.",
)
def test_get_vring_base_returns_next_avail_index(vhost_session: Session) -> None:
    """After N requests were taken, GET_VRING_BASE returns N and stops the ring."""
    do_io(vhost_session, 3)  # 6 requests, each completed
    n = split_ring(vhost_session).published_idx
    stopped = stop_now(vhost_session)
    _expect_base(stopped.bases[0], n, f"after {n} completed requests",
                 split=not vhost_session.packed)


@case(
    "VU-GVB-7", title="GET_VRING_BASE reply is 8 bytes", family="stop-drain", level=MUST,
    clause=f"{RST} Front-end message types: GET_VRING_BASE",
    quote=quotes(GET_VRING_BASE_STOPS_QUOTE, GET_VRING_BASE_SPLIT_QUOTE),
    requirement="The GET_VRING_BASE reply has the request's id and exactly an 8-byte vring state "
        "payload for the asked index.",
)
def test_get_vring_base_reply_is_8_bytes(vhost_session: Session, vhost_timeout: float) -> None:
    """The reply has the request's id and an 8-byte vring state for the asked index."""
    do_io(vhost_session, 1, kinds=("read",))
    channel = vhost_session.channel
    channel.send(F.GET_VRING_BASE, VringState(0, 0))
    reply = channel.recv(vhost_timeout, awaiting="GET_VRING_BASE", close_surplus_fds=True)
    vhost_session.mark_stopped()
    if reply.request != F.GET_VRING_BASE:
        raise CaseFailed("GET_VRING_BASE reply request id", expected=int(F.GET_VRING_BASE),
                         seen=reply.request)
    if len(reply.payload) != VringState.SIZE:
        raise CaseFailed("GET_VRING_BASE reply payload size", expected="8 bytes",
                         seen=f"{len(reply.payload)} bytes")
    state = VringState.decode(reply.payload)
    if state.index != 0:
        raise CaseFailed("GET_VRING_BASE reply index", expected=0, seen=state.index)
    _expect_base(state.num, 1, "after one completed request", split=not vhost_session.packed)


@case(
    "VU-GVB-8", title="A second GET_VRING_BASE and a restart agree", family="stop-drain",
    level=MUST, clause=f"{RST} Front-end message types: GET_VRING_BASE / SET_VRING_BASE",
    quote=quotes(
        "Rings are started with VHOST_USER_SET_VRING_KICK (or VHOST_USER_VRING_KICK if "
        "VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS is negotiated) and stopped with "
        "VHOST_USER_GET_VRING_BASE.",
        GET_VRING_BASE_SPLIT_QUOTE,
    ),
    requirement="A second GET_VRING_BASE returns the same index, and after SET_VRING_BASE with it "
        "and a restart I/O resumes at that slot.",
)
def test_second_get_vring_base_and_restart_agree(vhost_session: Session) -> None:
    """A second GET_VRING_BASE returns the same index; SET_VRING_BASE with it resumes there."""
    do_io(vhost_session, 2)
    first = stop_now(vhost_session).bases[0]
    second = vhost_session.get_vring_base(0)
    if second != first:
        raise CaseFailed("second GET_VRING_BASE on a stopped ring", expected=first, seen=second)
    vhost_session.start(vring_bases=[first])
    done = do_io(vhost_session, 1, kinds=("read",), sector=4000)
    used = vhost_session.queues[0].vq.used_idx_in_memory()
    if used != (first + len(done)) & 0xFFFF:
        raise CaseFailed("used->idx after a restart at the returned base",
                         expected=first + len(done), seen=used)


@case(
    "VU-GVB-10", title="Packed GET_VRING_BASE carries both indices", family="stop-drain",
    level=MUST, clause=f"{RST} Front-end message types: GET_VRING_BASE / SET_VRING_BASE (packed)",
    quote=quotes(
        "For a packed virtqueue, neither index is explicitly available to read from memory, "
        "so both indices (as maintained by the device) are returned.",
        "For a packed virtqueue, both indices are supplied, as they are not explicitly "
        "available in memory.",
    ),
    requirement="With RING_PACKED, GET_VRING_BASE returns the avail and used indices and both "
        "wrap counters (different halves while requests are suspended with bit 20), and "
        "SET_VRING_BASE with both, at a position after a wrap, restarts the ring there.",
    requires=[VirtioFeature.RING_PACKED],
)
def test_packed_get_vring_base_carries_both_indices(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """With RING_PACKED, GET_VRING_BASE returns both indices and both wrap counters: after
    the ring wrapped (wrap counters 0), and, with bit 20 and slow I/O, with two requests
    suspended (the used half behind the avail half); the ring restarted at the returned
    position (SET_VRING_BASE with both indices) carries I/O again."""
    # no in-flight region here: a back-end restores its indices from a region when it has one,
    # and the restart is to show that SET_VRING_BASE's own value is used
    session = make_session(vhost_target, packed=True, inflight_migration=False,
                           strip_protocol=[P.INFLIGHT_SHMFD])
    vq = session.queues[0].vq
    assert isinstance(vq, PackedVirtqueue)
    rounds = 0
    try:
        # until both wrap counters flipped (how many rounds depends on the descriptor layout)
        while (vq.avail_wrap_counter or vq.used_wrap_counter) and rounds <= vq.size:
            do_io(session, 1, sector=8 * (rounds % 64))
            rounds += 1
        do_io(session, 1)  # and off index 0
        rounds += 1
    except BackendHang as exc:
        # no I/O on a packed ring at all: VU-RING-9's behaviour, counted there
        raise CaseHang(f"packed-ring I/O before the stop did not complete: {exc}",
                       behaviour="no-io-on-packed-ring") from None
    base = stop_now(session).bases[0]
    _expect_packed_base(vq, base, f"after {2 * rounds} requests (the ring wrapped)")
    session.start(vring_bases=[base])
    try:
        do_io(session, 1, sector=2048)
    except BackendHang as exc:
        raise CaseFailed(f"I/O after SET_VRING_BASE {base:#x} (packed, both wrap counters 0)",
                         expected="completed at the restarted position", seen=str(exc)) from None
    session.stop()
    if not (make_session.capabilities.offers(P.INFLIGHT_SHMFD)
            and make_session.capabilities.offers(P.GET_VRING_BASE_INFLIGHT)):
        return
    try:
        context = slow_disk(vhost_target, LATENCY_MS)
        context.__enter__()
    except Unsupported:
        return
    try:
        _packed_suspended_base(vhost_target, make_session)
    finally:
        context.__exit__(None, None, None)


def _expect_packed_base(vq: PackedVirtqueue, base: int, what: str) -> None:
    """The base must be the driver-side model's (avail idx, wrap, used idx, wrap)."""
    expected = (vq.next_avail_idx, bool(vq.avail_wrap_counter), vq.last_used_idx,
                bool(vq.used_wrap_counter))
    seen = split_packed_base(base)
    if seen != expected:
        raise CaseFailed(f"packed GET_VRING_BASE (avail idx, avail wrap, used idx, used wrap) "
                         f"{what}", expected=expected, seen=seen)


def _packed_suspended_base(vhost_target: BackendTarget, make_session: SessionFactory) -> None:
    """Bit 20: two reads held on the slow disk and marked in the region, stop: the used half
    stays where the completions stopped (a back-end that drained shows them completed, and its
    used half is judged after reaping them); restart there: both complete, once."""
    session = make_session(vhost_target, packed=True, inflight_migration=True, model=False)
    tracker = InflightTracker(session)
    do_io(session, 1)  # the ring off its initial position
    requests = tracker.submit(pending_io(session, HELD, sector=512))
    deadline = time.monotonic() + 1.0
    while len(tracker.region().queues[0].inflight_heads()) < HELD:
        if time.monotonic() > deadline:
            return  # not both taken in time on this machine: nothing to judge
        time.sleep(0.01)
    stopped = stop_now(session, requests)
    tracker.reap(0)  # completions written before the reply (a back-end that drained)
    vq = session.queues[0].vq
    assert isinstance(vq, PackedVirtqueue)
    outstanding = HELD - len(tracker.completions)
    _expect_packed_base(vq, stopped.bases[0],
                        f"with {outstanding} of {HELD} held reads still in flight at the reply")
    session.start(vring_bases=stopped.bases)
    try:
        tracker.wait(0, outstanding, timeout=session.timeout + LATENCY_MS * HELD / 1000)
    except BackendHang as exc:
        raise CaseFailed(f"the {outstanding} suspended read(s) after SET_VRING_BASE "
                         f"{stopped.bases[0]:#x} (packed) and the restart",
                         expected="resubmitted from the region and completed",
                         seen=str(exc)) from None
    time.sleep(0.1)
    if tracker.reap(0) or vq.violations:
        raise CaseFailed("used ring after the restart", expected="each held read once",
                         seen=str(vq.violations[0]) if vq.violations else "more completions")


@case(
    "VU-GVB-11", title="Stop order of QEMU 11.1.3", family="stop-drain", level=MUST,
    clause=f"{RST} Ring states",
    quote=quotes(GET_VRING_BASE_STOPS_QUOTE,
                 "Signal the back-end to enable or disable corresponding vring."),
    requirement="SET_VRING_ENABLE 0 then GET_VRING_BASE num 0, as QEMU 11.1.3 stops a device, is "
        "answered for every ring.",
)
def test_qemu_stop_order_is_answered_for_every_ring(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, make_session: SessionFactory
) -> None:
    """SET_VRING_ENABLE 0 then GET_VRING_BASE num 0 is answered for every ring, each with its
    own ring's index: with MQ two queues (the back-end restarted with two where the profile
    can do that) carry different numbers of requests."""
    queues = 1
    if not vhost_capabilities.missing([P.MQ, BlkFeature.MQ]):
        queues = 2
        if (vhost_capabilities.queue_num or 1) < 2:
            try:
                restart_variant(vhost_target, queues=2)
            except Unsupported:
                queues = 1
    session = make_session(vhost_target, num_queues=queues)
    for index in range(queues):
        do_io(session, 1 + 2 * index, queue=index, sector=512 * index)
    expected = [split_ring(session, index).published_idx for index in range(queues)]
    bases = session.stop()
    for index, (seen, want) in enumerate(zip(bases, expected, strict=True)):
        _expect_base(seen, want, f"of queue {index}")


@case(
    "VU-SVB-1", title="SET_VRING_BASE sets only the next avail index", family="rings", level=MUST,
    clause=f"{RST} Front-end message types: SET_VRING_BASE", quote=SET_VRING_BASE_SPLIT_QUOTE,
    requirement="After SET_VRING_BASE n the back-end takes the next request from avail slot n and "
        "continues used->idx from guest memory.",
)
def test_set_vring_base_sets_only_next_avail_index(vhost_session: Session) -> None:
    """After SET_VRING_BASE n the back-end takes slot n next and continues used->idx."""
    session = vhost_session
    do_io(session, 1)  # 2 requests: avail 2, used 2
    base = stop_now(session).bases[0]
    q = session.queues[0]
    vq = q.vq
    used_gpa = split_ring(session).used_gpa
    skipped = q.blk.read(100, 1)  # avail slot base: taken as done elsewhere (a migration)
    taken = q.blk.read(200, 1)  # avail slot base + 1
    vq.publish()
    # As if slot base had completed on a source: used->idx base + 1 in guest memory and
    # SET_VRING_BASE base + 1 (consistent, as QEMU sends them: an in-flight region agrees)
    session.memory.write(used_gpa + 2, ((base + 1) & 0xFFFF).to_bytes(2, "little"))
    session.start(vring_bases=[base + 1])
    session.kick(0)
    deadline = time.monotonic() + session.timeout
    while vq.used_idx_in_memory() == (base + 1) & 0xFFFF and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.1)
    used = vq.used_idx_in_memory()
    if used != (base + 2) & 0xFFFF:
        raise CaseFailed(
            f"used->idx after SET_VRING_BASE {base + 1} with used->idx {base + 1} in memory "
            "and one request available at that slot",
            expected=base + 2, seen=used)
    slot = (base + 1) % vq.size
    head = int.from_bytes(session.memory.read(used_gpa + 4 + 8 * slot, 4), "little")
    if head != taken.head:
        raise CaseFailed(f"used ring slot {slot}: the head completed",
                         expected=f"{taken.head} (the request at avail slot {base + 1})",
                         seen=f"{head} (head {skipped.head} is the skipped one)")
    q.blk.abandon(skipped.tag)
    q.blk.abandon(taken.tag)
    session.mark_stopped()  # the driver's used index no longer matches: no clean stop


# --------------------------------------------------------------------------- drain


@case(
    "VU-GVB-3", title="GET_VRING_BASE drains in-flight I/O", family="stop-drain", level=MUST,
    clause=f"{RST} Front-end message types: GET_VRING_BASE", quote=GET_VRING_BASE_DRAIN_QUOTE,
    requirement="Without bit 20 negotiated, the reply comes only after every request taken from "
        "the ring has completed.",
    needs=["slow-io"],
)
def test_get_vring_base_drains_in_flight_io(
    vhost_target: BackendTarget, make_session: SessionFactory, vhost_measurements: dict[str, float],
    vhost_measure: Callable[..., None],
) -> None:
    """Without bit 20, the reply comes only after every taken request has completed: the
    held requests are submitted half a disk latency apart, so the last completion comes
    after the first one and used->idx at the moment of the reply must show it."""
    with slow_disk(vhost_target, LATENCY_MS):
        session = make_session(vhost_target, inflight_migration=False, model=False)
        requests = pending_io(session, 1)
        time.sleep(LATENCY_MS / 2000)
        requests += pending_io(session, HELD - 1, sector=8)
        wait_popped(session, 0, settle=0.05)
        stopped = stop_now(session, requests)
        vhost_measurements["stop_latency_ms"] = round(stopped.elapsed * 1000, 3)
        vhost_measure("stop_latency_ms", stopped.elapsed * 1000, mode="drain",
                      disk_latency_ms=LATENCY_MS, inflight=HELD)
        popped = stopped.bases[0]
        if stopped.used_idx_at_reply[0] != popped:
            raise CaseFailed(
                f"used->idx when GET_VRING_BASE answered (stop took "
                f"{stopped.elapsed * 1000:.0f} ms, disk latency {LATENCY_MS} ms)",
                expected=f"{popped} (every taken request completed)",
                seen=stopped.used_idx_at_reply[0],
                behaviour=COMPLETES_AFTER_REPLY,
            )
        if popped == 0:
            raise CaseFailed("GET_VRING_BASE num with requests published and kicked",
                             expected=f"1..{HELD} (the back-end took them)", seen=0)


@case(
    "VU-GVB-4", title="With bit 20 in-flight I/O may be suspended", family="stop-drain", level=MAY,
    clause=f"{RST} Front-end message types: GET_VRING_BASE; Inflight I/O tracking",
    quote=GET_VRING_BASE_INFLIGHT_QUOTE,
    requirement="With bit 20 negotiated, a back-end that replies before its requests complete "
        "marks exactly those heads in flight in the region.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD, ProtocolFeature.GET_VRING_BASE_INFLIGHT],
    needs=["slow-io"], ambiguity=MAY_SUSPEND,
)
def test_bit_20_suspend_marks_exactly_the_outstanding_heads(
    vhost_target: BackendTarget, make_session: SessionFactory, vhost_measurements: dict[str, float],
    vhost_measure: Callable[..., None],
) -> None:
    """With bit 20, a reply before completion marks exactly those heads in the region."""
    with slow_disk(vhost_target, LATENCY_MS):
        session = make_session(vhost_target, inflight_migration=True, model=False)
        tracker = InflightTracker(session)
        stopped = _held_stop(session, tracker)
        vhost_measurements["stop_latency_ms"] = round(stopped.elapsed * 1000, 3)
        vhost_measure("stop_latency_ms", stopped.elapsed * 1000, mode="no-drain",
                      disk_latency_ms=LATENCY_MS, inflight=HELD)
        tracker.reap(0)
        try:
            fail_on_findings(tracker.findings(stopped.bases), "in-flight region after the stop")
        except CaseFailed as exc:
            # the findings are MUST-level (a GET_VRING_BASE answering the used index, a mark
            # left on a completed head): a MAY case seeing them fails the gate as a MUST
            raise CaseFailed(exc.reason, finding_level=MUST) from None


# --------------------------------------------------------------------------- suspended


@case(
    "VU-GVB-5", title="Suspended device: no writes, no signals, still answers", family="stop-drain",
    level=MUST, clause=f"{RST} Suspended device state", quote=SUSPENDED_STATE_QUOTE,
    requirement="Once every ring is stopped, the back-end writes no guest memory, signals "
        "nothing, and still answers front-end messages.",
)
def test_suspended_device_writes_nothing_and_answers(
    vhost_session: Session, vhost_timeout: float
) -> None:
    """Once every ring is stopped: no guest memory writes, no signals, messages answered."""
    session = vhost_session
    do_io(session, 2)
    stopped = stop_now(session)
    # a request made available and kicked on the stopped ring must not be touched
    late = session.queues[0].blk.read(300, 8)
    session.queues[0].vq.publish()
    snapshot = session.memory.snapshot()
    session.kick(0)
    time.sleep(0.2)
    changed = session.memory.diff(snapshot)
    if changed:
        raise CaseFailed(
            "guest memory while suspended",
            expected="unchanged",
            seen=f"{len(changed)} range(s) written, first at GPA {changed[0][0]:#x} "
            f"({changed[0][1]} bytes)",
        )
    if session.drain_call(0):
        raise CaseFailed("call eventfd while suspended", expected="not signalled", seen="signalled")
    _still_answers(session, stopped.bases[0], vhost_timeout)
    session.queues[0].blk.abandon(late.tag)


def _still_answers(session: Session, base: int, timeout: float) -> None:
    """GET_FEATURES, GET_CONFIG (when negotiated) and GET_VRING_BASE get their replies."""
    reply = session.call(F.GET_FEATURES)
    if reply is None or len(reply.payload) != 8:
        raise CaseFailed("GET_FEATURES while suspended", expected="an 8-byte reply", seen=reply)
    if session.has_protocol(P.CONFIG):
        session.call(F.GET_CONFIG, Config.request(0, 8))
    again = session.get_vring_base(0)
    _expect_base(again, base, "asked again while suspended")


@case(
    "VU-SUSP-1", title="No guest memory writes while suspended", family="suspended", level=MUST,
    clause=f"{RST} Suspended device state", quote=SUSPENDED_STATE_QUOTE,
    requirement="Guest memory snapshotted at the last GET_VRING_BASE reply is unchanged after the "
        "slow disk's latency has passed.",
    needs=["slow-io"],
)
def test_no_guest_memory_writes_while_suspended(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """Guest memory snapshotted at the last reply is unchanged after the disk latency."""
    with slow_disk(vhost_target, LATENCY_MS):
        session = make_session(vhost_target, model=False)
        stopped = _held_stop(session)
        time.sleep(LATENCY_MS * HELD / 1000 + 0.1)
        changed = session.memory.diff(stopped.snapshot)
        # requests still outstanding at the reply, completed later: VU-GVB-3's behaviour
        late = stopped.used_idx_at_reply[0] != stopped.bases[0]
        if changed:
            raise CaseFailed(
                f"guest memory {LATENCY_MS * HELD + 100} ms after the last GET_VRING_BASE reply",
                expected="unchanged",
                seen=f"{len(changed)} range(s) written, first at GPA {changed[0][0]:#x} "
                f"({changed[0][1]} bytes){_whose(session, changed[0][0], stopped.requests)}",
                behaviour=COMPLETES_AFTER_REPLY if late else None,
            )


def _whose(session: Session, gpa: int, requests: list[BlkRequest]) -> str:
    vq = session.queues[0].vq
    for r in requests:
        for buf, n in r.data_bufs:
            if buf <= gpa < buf + n:
                return f": the data buffer of request {r.tag} (head {r.head})"
        if r.status_gpa is not None and r.status_gpa == gpa:
            return f": the status byte of request {r.tag} (head {r.head})"
    used_gpa = getattr(vq, "used_gpa", None)
    if isinstance(used_gpa, int) and used_gpa <= gpa < used_gpa + 6 + 8 * vq.size:
        return ": the used ring"
    return ""


@case(
    "VU-SUSP-2", title="No call signals while suspended", family="suspended", level=MUST,
    clause=f"{RST} Suspended device state", quote=SUSPENDED_STATE_QUOTE,
    requirement="No call eventfd is signalled after the last GET_VRING_BASE reply.",
    needs=["slow-io"],
)
def test_no_call_signals_while_suspended(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """No call eventfd is signalled after the last GET_VRING_BASE reply."""
    with slow_disk(vhost_target, LATENCY_MS):
        session = make_session(vhost_target, model=False)
        _held_stop(session)
        time.sleep(LATENCY_MS * HELD / 1000 + 0.1)
        signals = session.drain_call(0)
        if signals:
            raise CaseFailed("call eventfd after the last GET_VRING_BASE reply",
                             expected="not signalled", seen=f"signalled ({signals})")


@case(
    "VU-SUSP-3", title="No back-end channel messages while suspended", family="suspended",
    level=MUST, clause=f"{RST} Suspended device state", quote=SUSPENDED_STATE_QUOTE,
    requirement="Nothing arrives on the back-end channel after the last GET_VRING_BASE reply, "
        "also when the disk is resized (which makes a running back-end send "
        "BACKEND_CONFIG_CHANGE_MSG).",
    requires=[ProtocolFeature.BACKEND_REQ],
)
def test_no_backend_messages_while_suspended(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """Nothing arrives on the back-end channel after the last GET_VRING_BASE reply.

    A blk back-end sends a message of its own only on a config change: the disk image grows
    and the profile's ``resize_signal`` tells the back-end, once while running (a
    BACKEND_CONFIG_CHANGE_MSG must come: else the suite has no way to provoke a message and
    the case ends unsupported, after the checks it could make) and once suspended (nothing
    may come, as for a request kicked on the stopped ring)."""
    session = make_session(vhost_target)
    do_io(session, 2)
    channel = session.backend_channel
    if channel is None:
        raise CaseFailed("back-end channel", expected="set up by SET_BACKEND_REQ_FD", seen="none")
    why = provoke_config_change(vhost_target) if session.has_protocol(P.CONFIG) else (
        "CONFIG (protocol bit 9) not negotiated: no BACKEND_CONFIG_CHANGE_MSG")
    if why is None:
        deadline = time.monotonic() + 2.0
        while not [m for m in channel.messages() if m.request == BackendRequest.CONFIG_CHANGE_MSG]:
            if time.monotonic() > deadline:
                why = "a disk resize while running brought no BACKEND_CONFIG_CHANGE_MSG in 2 s"
                break
            time.sleep(0.01)
    stop_now(session)
    before = len(channel.messages())
    late = session.queues[0].blk.read(300, 8)
    session.submit(0)
    session.kick(0)
    if why is None:
        provoke_config_change(vhost_target)
    time.sleep(0.3)
    after = channel.messages()[before:]
    if after:
        raise CaseFailed(
            "back-end channel while suspended" + (" (after a disk resize)" if why is None
                                                   else ""),
            expected="no message",
            seen=", ".join(BackendRequest(m.request).name
                           if m.request in BackendRequest._value2member_map_ else str(m.request)
                           for m in after),
        )
    session.queues[0].blk.abandon(late.tag)
    if why is not None:
        raise Unsupported("a way to provoke a back-end message (a disk resize)", why)


@case(
    "VU-SUSP-4", title="Front-end messages answered while suspended", family="suspended",
    level=MUST, clause=f"{RST} Suspended device state", quote=SUSPENDED_STATE_QUOTE,
    requirement="While suspended, GET_FEATURES, GET_CONFIG and GET_VRING_BASE are still answered.",
)
def test_messages_answered_while_suspended(vhost_session: Session, vhost_timeout: float) -> None:
    """While suspended, GET_FEATURES, GET_CONFIG and GET_VRING_BASE are still answered."""
    do_io(vhost_session, 1)
    stopped = stop_now(vhost_session)
    _still_answers(vhost_session, stopped.bases[0], vhost_timeout)


@case(
    "VU-SUSP-5", title="No late DMA after a no-drain stop", family="suspended", level=MUST,
    clause=f"{RST} Suspended device state", quote=SUSPENDED_STATE_QUOTE,
    requirement="With bit 20, data buffers of requests left in flight are not written after the "
        "GET_VRING_BASE reply.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD, ProtocolFeature.GET_VRING_BASE_INFLIGHT],
    needs=["slow-io"], ambiguity=SUSPENDED_DMA,
)
def test_no_late_dma_after_a_no_drain_stop(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """With bit 20, buffers of requests left in flight are not written after the reply."""
    with slow_disk(vhost_target, LATENCY_MS):
        session = make_session(vhost_target, inflight_migration=True, model=False)
        stopped = _held_stop(session)
        time.sleep(LATENCY_MS * HELD / 1000 + 0.1)
        buffers = [(gpa, n) for r in stopped.requests for gpa, n in r.data_bufs]
        buffers += [(r.status_gpa, 1) for r in stopped.requests if r.status_gpa is not None]
        changed = session.memory.diff(stopped.snapshot)
        hit = [
            (g, n)
            for g, n in changed
            if any(b <= g < b + bn or g <= b < g + n for b, bn in buffers)
        ]
        if hit:
            raise CaseFailed("data buffers of requests left in flight by the stop",
                             expected="not written after the GET_VRING_BASE reply",
                             seen=f"written at GPA {hit[0][0]:#x} ({hit[0][1]} bytes)")


@case(
    "VU-GVB-9", title="Late completions after GET_VRING_BASE are silent", family="stop-drain",
    level=MUST, clause=f"{RST} Suspended device state", quote=SUSPENDED_STATE_QUOTE,
    requirement="Completions of I/O still running when the ring stopped write nothing and signal "
        "nothing, even after the call fd was closed.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD, ProtocolFeature.GET_VRING_BASE_INFLIGHT],
    needs=["slow-io"], ambiguity=SUSPENDED_DMA,
)
def test_late_completions_are_silent(
    vhost_target: BackendTarget, make_session: SessionFactory, vhost_timeout: float
) -> None:
    """Late completions write nothing and signal nothing, even with the call fd replaced."""
    with slow_disk(vhost_target, LATENCY_MS):
        session = make_session(vhost_target, inflight_migration=True, model=False)
        stopped = _held_stop(session)
        # QEMU unbinds its guest notifiers after the stop: hand the back-end a new call fd
        # and close ours of the old one
        fresh = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        q = session.queues[0]
        old, q.call_fd = q.call_fd, fresh
        session.call(F.SET_VRING_CALL, U64(0), fds=[fresh], need_reply=session.reply_ack)
        time.sleep(LATENCY_MS * HELD / 1000 + 0.1)
        # stop_now drained the old call fd right after the reply: any count now came later
        try:
            late_calls = os.eventfd_read(old)
        except BlockingIOError:
            late_calls = 0
        finally:
            os.close(old)
        if late_calls:
            raise CaseFailed("old call eventfd after the GET_VRING_BASE reply",
                             expected="not signalled", seen=f"signalled ({late_calls})")
        changed = session.memory.diff(stopped.snapshot)
        if changed:
            raise CaseFailed("guest memory after late completions", expected="unchanged",
                             seen=f"written at GPA {changed[0][0]:#x} ({changed[0][1]} bytes)")
        if session.drain_call(0):
            raise CaseFailed("call eventfd after late completions", expected="not signalled",
                             seen="signalled")
        _still_answers(session, stopped.bases[0], vhost_timeout)
