"""In-flight I/O tracking: the shared region's layout, its content during I/O, and the
resubmission after a back-end restart.

Family: inflight (VU-INF-*). Clauses: vhost-user.rst (QEMU 11.1.3) "Inflight I/O tracking",
"Front-end message types: GET_INFLIGHT_FD / SET_INFLIGHT_FD". The region is parsed, validated
and compared with the front-end's model by ``frontend/inflight.py``; GET_INFLIGHT_FD and
SET_INFLIGHT_FD carry QEMU 11.1.3's 24-byte payload (QEMU-TRACES.md correction 1).
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import time

from vhost_conformance.frontend.blk import SECTOR_SIZE, BlkRequest
from vhost_conformance.frontend.channel import BackendError, BackendHang, Channel
from vhost_conformance.frontend.device import InflightHandle, Session
from vhost_conformance.frontend.inflight import (
    minimal_queue_bytes,
    parse_region,
    validate_region,
)
from vhost_conformance.frontend.protocol import (
    BlkFeature,
    FrontendRequest,
    Inflight,
    ProtocolFeature,
    VirtioFeature,
    has,
)
from vhost_conformance.frontend.virtqueue import SplitVirtqueue
from vhost_conformance.reports.model import Tier
from vhost_conformance.suites.clauses import (
    INFLIGHT_24,
    INFLIGHT_RESUBMIT_QUOTE,
    INFLIGHT_TRACKING_QUOTE,
    INFLIGHT_USED_IDX_QUOTE,
    RST,
    SET_INFLIGHT_FD_QUOTE,
    quotes,
)
from vhost_conformance.suites.drivers import (
    InflightTracker,
    SessionFactory,
    do_io,
    expect_status,
    fail_on_findings,
    fd_count,
    pattern,
    require_command,
    restart_variant,
    slow_disk,
    split_ring,
    wait_all,
    wait_popped,
)
from vhost_conformance.suites.drivers.recovery import mid_update_recovery, out_of_order_recovery
from vhost_conformance.suites.model import MUST, SHOULD, CaseFailed, Unsupported, case
from vhost_conformance.suites.target import BackendTarget, Capabilities, CommandTarget

F = FrontendRequest
P = ProtocolFeature

#: Per-request latency that keeps requests in flight while the case looks at the region.
LATENCY_MS = 200


def _region_view(session: Session) -> InflightHandle:
    if session.inflight is None:
        raise CaseFailed("in-flight region after start", expected="one from GET_INFLIGHT_FD",
                         seen="none (mmap_size 0)")
    return session.inflight


def _popped_index(session: Session) -> int | None:
    """The back-end's last_avail_idx when EVENT_IDX shows it (split), else None."""
    vq = session.queues[0].vq
    if not isinstance(vq, SplitVirtqueue) or not has(session.negotiated.acked_features,
                                                     VirtioFeature.RING_EVENT_IDX):
        return None
    event = vq.avail_event
    return event if event == vq.published_idx else None


@case(
    "VU-INF-1", title="GET_INFLIGHT_FD returns a region", family="inflight", level=MUST,
    clause=f"{RST} Front-end message types: GET_INFLIGHT_FD",
    quote="To solve this problem, the back-end need to allocate an extra buffer to store this "
        "information of inflight descriptors and share it with front-end for persistent.\n"
        "The shared buffer will be used to track inflight I/O by back-end.",
    requirement="GET_INFLIGHT_FD returns one fd with an mmap_size of at least num_queues x (16 + "
        "16 x queue_size) (split), or size 0 and no fd.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD], ambiguity=INFLIGHT_24,
)
def test_get_inflight_fd_returns_a_region(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """GET_INFLIGHT_FD returns one fd and a large enough mmap_size, or size 0 and no fd."""
    session = make_session(vhost_target, start=False)
    session.set_features(session.driver_features())
    reply = session.call(F.GET_INFLIGHT_FD, Inflight(0, 0, 1, 128))
    assert reply is not None
    fds = list(reply.fds)
    try:
        info = Inflight.decode(reply.payload)
        if info.mmap_size == 0:
            if fds:
                raise CaseFailed("GET_INFLIGHT_FD reply with mmap_size 0", expected="no fd",
                                 seen=f"{len(fds)} fds")
            return
        if len(fds) != 1:
            raise CaseFailed("GET_INFLIGHT_FD reply fds", expected=1, seen=len(fds))
        need = minimal_queue_bytes(128, session.packed)
        if info.mmap_size < need:
            raise CaseFailed("GET_INFLIGHT_FD mmap_size for 1 queue of 128",
                             expected=f">= {need}", seen=info.mmap_size)
        if (info.num_queues, info.queue_size) not in ((1, 128), (0, 0)):
            raise CaseFailed("GET_INFLIGHT_FD reply num_queues/queue_size",
                             expected="1/128 (as asked)",
                             seen=f"{info.num_queues}/{info.queue_size}")
    finally:
        for fd in fds:
            os.close(fd)


@case(
    "VU-INF-2", title="SET_INFLIGHT_FD as QEMU sends it", family="inflight", level=MUST,
    clause=f"{RST} Front-end message types: SET_INFLIGHT_FD", quote=SET_INFLIGHT_FD_QUOTE,
    requirement="SET_INFLIGHT_FD with one fd and QEMU 11.1.3's 24-byte payload is accepted and "
        "the region used.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD], ambiguity=INFLIGHT_24,
)
def test_set_inflight_fd_as_qemu_sends_it(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """SET_INFLIGHT_FD with one fd and 24 bytes is accepted and the region is used."""
    session = make_session(vhost_target, start=False)
    session.set_features(session.driver_features())
    offered = session.get_inflight_fd()
    if offered is None:
        raise CaseFailed("GET_INFLIGHT_FD mmap_size", expected="non-zero", seen=0)
    # a region of the front-end's own (as on a migration destination, QEMU-TRACES (e))
    ours = InflightHandle.from_bytes(bytes(offered.mmap_size), 1, session.queue_size)
    offered.close()
    session.inflight = None
    session.start(inflight=ours)
    do_io(session, 1)
    parsed = parse_region(ours.read(), num_queues=1, queue_size=session.queue_size,
                          packed=session.packed)
    if parsed.queues[0].version != 1:
        raise CaseFailed("version of the region given by SET_INFLIGHT_FD after I/O",
                         expected=1, seen=parsed.queues[0].version)


@case(
    "VU-INF-4", title="Fresh regions are initialised to version 1", family="inflight", level=MUST,
    clause=f"{RST} Inflight I/O tracking", quote="The version of this region. It's 1 currently.",
    requirement="A zeroed region (version 0) is set to version 1 with desc_num = queue size once "
        "the ring starts.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD],
)
def test_fresh_region_is_initialised(vhost_session: Session) -> None:
    """A zeroed region is set to version 1 with desc_num = queue size once the ring starts."""
    do_io(vhost_session, 1, kinds=("read",))
    tracker = InflightTracker(vhost_session)
    for queue in tracker.region().queues:
        if (queue.version, queue.desc_num) != (1, vhost_session.queue_size):
            raise CaseFailed(f"queue {queue.queue} region header (version, desc_num)",
                             expected=(1, vhost_session.queue_size),
                             seen=(queue.version, queue.desc_num))


@case(
    "VU-INF-6", title="Per-queue region layout", family="inflight", level=MUST,
    clause=f"{RST} Inflight I/O tracking",
    quote="The size of DescStateSplit array. It's equal to the virtqueue size.",
    requirement="Each queue's header has version 1 and desc_num equal to the queue size, at a "
        "stride of mmap_size / num_queues.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD],
    ambiguity="the spec does not fix the per-queue stride (64-byte aligned in some back-ends, 16 "
        "+ 16 x Q in others): we derive it from mmap_size / num_queues",
)
def test_per_queue_region_layout(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, make_session: SessionFactory
) -> None:
    """Each queue's header has version 1 and desc_num = queue size at mmap_size / queues."""
    queues = 1
    if not vhost_capabilities.missing([P.MQ, BlkFeature.MQ]):
        queues = 2
        if (vhost_capabilities.queue_num or 1) < 2:
            restart_variant(vhost_target, queues=2)
    session = make_session(vhost_target, num_queues=queues)
    for index in range(queues):
        do_io(session, 1, queue=index, kinds=("read",))
    region = _region_view(session)
    if region.mmap_size % queues:
        raise CaseFailed(f"mmap_size for {queues} queues", expected=f"a multiple of {queues}",
                         seen=region.mmap_size)
    parsed = InflightTracker(session).region()
    findings = validate_region(parsed)
    for queue in parsed.queues:
        if queue.version != 1:
            raise CaseFailed(f"queue {queue.queue} version at byte {queue.offset + 8} (stride "
                             f"{parsed.stride})", expected=1, seen=queue.version)
    fail_on_findings(findings, "region layout")


@case(
    "VU-INF-7", title="Region follows every pop and completion", family="inflight", level=SHOULD,
    clause=f"{RST} Inflight I/O tracking", quote=INFLIGHT_TRACKING_QUOTE,
    requirement="inflight is 1 with a fresh counter for each taken head and 0 after its "
        "completion; used_idx follows used->idx.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD],
)
def test_region_follows_pops_and_completions(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """inflight is 1 for each taken head and 0 after completion; used_idx follows.

    Without slow I/O (DPDK's RAM disk) only the state after the completions is checked."""
    slow = contextlib.ExitStack()
    try:
        slow.enter_context(slow_disk(vhost_target, LATENCY_MS))
        held = True
    except Unsupported:
        held = False
    with slow:
        session = make_session(vhost_target, model=False)
        tracker = InflightTracker(session)
        blk = session.queues[0].blk
        tracker.submit([blk.read(8 * i, 8) for i in range(3)])
        session.submit(0)
        if held:
            wait_popped(session, 0, settle=0.1)
            popped = _popped_index(session)
            fail_on_findings(tracker.findings([popped]), "region while 3 reads are in flight")
        tracker.wait(0, 3)
        published = split_ring(session).published_idx
        fail_on_findings(tracker.findings([published]), "region after every read completed")
        queue = tracker.region().queues[0]
        used = session.queues[0].vq.used_idx_in_memory()
        if not queue.packed and getattr(queue, "used_idx", used) != used:
            raise CaseFailed("region used_idx after the completions", expected=used,
                             seen=getattr(queue, "used_idx", None))


def _kill_and_reconnect(target: BackendTarget, make_session: SessionFactory,
                        session: Session) -> None:
    """SIGKILL the back-end, start it again on the same disk, reconnect as QEMU does."""
    command = require_command(target)
    command.send_signal(signal.SIGKILL)
    command.wait_exit(5.0)
    command.start()
    make_session.reconnect(session, command)


def _resubmission(vhost_target: BackendTarget, make_session: SessionFactory, n: int,
                  *, packed: bool = False) -> None:
    """Hold ``n`` writes in flight, kill the back-end, reconnect: each completes once."""
    require_command(vhost_target)
    with slow_disk(vhost_target, 200):
        session = make_session(vhost_target, model=False, packed=packed)
        tracker = InflightTracker(session)
        blk = session.queues[0].blk
        requests: list[BlkRequest] = [blk.write(16 * i, pattern(60 + i, 8 * SECTOR_SIZE))
                                      for i in range(n)]
        tracker.submit(requests)
        session.submit(0)
        wait_popped(session, 0, settle=0.15)
        parsed = tracker.region()
        marked = parsed.queues[0].inflight_heads()
        heads = [r.head for r in requests]
        if not set(marked) <= set(heads) or not marked:
            raise CaseFailed("heads marked in flight before the kill",
                             expected=f"a non-empty subset of {heads}", seen=marked)
        _kill_and_reconnect(vhost_target, make_session, session)
        try:
            done = wait_all(session, requests, timeout=session.timeout + n * 0.2)
        except BackendHang as exc:
            # the back-end answers its messages but lost requests the region marked
            raise CaseFailed(
                f"requests marked in flight (heads {marked}) when the back-end was killed",
                expected="resubmitted and completed after the reconnect", seen=str(exc),
            ) from None
        expect_status(done, what="resubmitted write")
        violations = session.queues[0].vq.violations
        if violations:
            raise CaseFailed("used ring after the resubmission",
                             expected="each head exactly once", seen=str(violations[0]))
        time.sleep(0.3)
        late = session.queues[0].vq.reap()
        if late:
            raise CaseFailed("used entries after every request completed",
                             expected="none (each request completes once)",
                             seen=f"{len(late)} more")


@case(
    "VU-INF-5", title="Resubmission in counter order", family="inflight", level=SHOULD,
    clause=f"{RST} Inflight I/O tracking",
    quote=quotes(INFLIGHT_TRACKING_QUOTE, INFLIGHT_USED_IDX_QUOTE, INFLIGHT_RESUBMIT_QUOTE),
    requirement="After a restart, entries marked in flight are resubmitted in increasing counter "
        "order, once the last batch is fixed up when used_idx differs from used->idx.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD], needs=["command"],
)
def test_resubmission_after_restart(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """After a restart, exactly the entries still in flight are resubmitted, in counter order,
    and complete once: with out-of-order completion before the kill (used->idx past the
    in-flight heads) and counter order different from head order; then with a crash between
    the used->idx update and the region update (the last batch still marked, used_idx behind
    used->idx): that batch is fixed up, not resubmitted."""
    try:
        out_of_order_recovery(vhost_target, make_session)
    except Unsupported as exc:  # no slow I/O (DPDK): the crash mid-update is judged anyway
        skipped: Unsupported | None = exc
    else:
        skipped = None
    mid_update_recovery(vhost_target, make_session)
    if skipped is not None:
        raise skipped


@case(
    "VU-INF-8", title="Head 0 is resubmitted too", family="inflight", level=SHOULD,
    clause=f"{RST} Inflight I/O tracking",
    quote=quotes(INFLIGHT_TRACKING_QUOTE, INFLIGHT_RESUBMIT_QUOTE),
    requirement="After a restart with head 0 in flight and used_idx 0, head 0 is resubmitted like "
        "any other.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD], needs=["command"],
)
def test_head_0_is_resubmitted(vhost_target: BackendTarget, make_session: SessionFactory) -> None:
    """With head 0 in flight and used_idx 0, head 0 is resubmitted like any other."""
    _resubmission(vhost_target, make_session, 1)


def _raw(request: int, payload: bytes) -> bytes:
    return struct.pack("<III", request, 1, len(payload)) + payload


@case(
    "VU-INF-9", title="Wrong in-flight payload sizes are refused safely", family="inflight",
    level=MUST, tier=Tier.ROBUSTNESS,
    clause=f"{RST} Front-end message types: GET_INFLIGHT_FD / SET_INFLIGHT_FD",
    requirement="GET/SET_INFLIGHT_FD with a short, empty or oversized payload gets an error or a "
        "closed connection, never a crash; a new connection works.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD],
)
def test_wrong_inflight_payload_sizes(
    vhost_target: BackendTarget, make_session: SessionFactory, vhost_timeout: float
) -> None:
    """Short, empty or oversized GET/SET_INFLIGHT_FD payloads: an error or a close, never a
    crash; a new connection still works."""
    good = Inflight(0, 0, 1, 128).encode()
    attempts = [
        ("GET_INFLIGHT_FD, empty payload", F.GET_INFLIGHT_FD, b"", False),
        ("GET_INFLIGHT_FD, 4 bytes", F.GET_INFLIGHT_FD, good[:4], False),
        ("GET_INFLIGHT_FD, 64 bytes", F.GET_INFLIGHT_FD, good + bytes(40), False),
        ("SET_INFLIGHT_FD, 8 bytes", F.SET_INFLIGHT_FD, good[:8], True),
        ("SET_INFLIGHT_FD, empty payload", F.SET_INFLIGHT_FD, b"", True),
    ]
    for what, request, payload, with_fd in attempts:
        channel = Channel(vhost_target.connect_socket(vhost_timeout))
        fd = os.memfd_create("vc-inflight-bad", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 4096)
            channel.send(F.GET_FEATURES)
            channel.recv(vhost_timeout, awaiting="GET_FEATURES", close_surplus_fds=True)
            channel.send_raw(_raw(request, payload), [fd] if with_fd else [])
            with contextlib.suppress(BackendError):
                reply = channel.recv(0.5, awaiting=request.name, close_surplus_fds=True)
                for extra in reply.fds:
                    os.close(extra)
        finally:
            os.close(fd)
            channel.close()
        time.sleep(0.05)
        if not vhost_target.alive():
            raise CaseFailed(f"back-end after {what}", expected="alive",
                             seen=f"exited with status {vhost_target.exit_status()}")
    session = make_session(vhost_target)
    do_io(session, 1)


@case(
    "VU-INF-10", title="SET_INFLIGHT_FD twice", family="inflight", level=MUST,
    clause=f"{RST} Front-end message types: SET_INFLIGHT_FD", quote=SET_INFLIGHT_FD_QUOTE,
    requirement="A second SET_INFLIGHT_FD (a new region of the size GET_INFLIGHT_FD gave) "
        "replaces the first without leaking the old mapping's fd or crashing.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD], needs=["command"], leak=True,
)
def test_set_inflight_fd_twice(vhost_target: BackendTarget, make_session: SessionFactory) -> None:
    """A second SET_INFLIGHT_FD (a new region) replaces the first without leaking.

    Every region has the size GET_INFLIGHT_FD gave for these queues: a region 2-4 times too
    large is inconsistent with its num_queues/queue_size and the spec does not ask a
    back-end to accept one (closing the connection is allowed)."""
    session = make_session(vhost_target, start=False)
    session.set_features(session.driver_features())
    first = session.get_inflight_fd()
    if first is None:
        raise CaseFailed("GET_INFLIGHT_FD mmap_size", expected="non-zero", seen=0)
    session.set_inflight_fd(first)
    session.call(F.GET_FEATURES)  # a barrier: SET_INFLIGHT_FD has no reply
    baseline = fd_count(vhost_target)
    regions = [InflightHandle.from_bytes(bytes(first.mmap_size), 1, session.queue_size)
               for _ in range(4)]
    try:
        for region in regions:
            session.set_inflight_fd(region)
            session.call(F.GET_FEATURES)
        after = fd_count(vhost_target)
        if baseline is not None and after is not None and after > baseline:
            raise CaseFailed(f"back-end fds after {len(regions)} more SET_INFLIGHT_FD",
                             expected=f"<= {baseline} (old regions closed)", seen=after)
        last = regions[-1]
        session.start(inflight=last)
        do_io(session, 1)
        parsed = parse_region(last.read(), num_queues=1, queue_size=session.queue_size,
                              packed=session.packed)
        if parsed.queues[0].version != 1:
            raise CaseFailed("version of the region given last", expected=1,
                             seen=parsed.queues[0].version)
        earlier = parse_region(regions[0].read(), num_queues=1,
                               queue_size=session.queue_size, packed=session.packed)
        if earlier.queues[0].version != 0:
            raise CaseFailed("version of a region replaced before the start",
                             expected="0 (untouched)", seen=earlier.queues[0].version)
    finally:
        for region in regions[:-1]:
            region.close()
        first.close()


@case(
    "VU-INF-11", title="Packed in-flight region", family="inflight", level=SHOULD,
    clause=f"{RST} Inflight I/O tracking (packed)",
    quote=quotes("For packed virtqueue, queue region can be implemented as:",
                 INFLIGHT_TRACKING_QUOTE),
    requirement="With RING_PACKED, the packed region's free list, old_* fields and counters "
        "follow the rules, and a restart resubmits in counter order.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD, VirtioFeature.RING_PACKED],
)
def test_packed_region(vhost_target: BackendTarget, make_session: SessionFactory) -> None:
    """With RING_PACKED, the packed region marks the taken buffers and clears them, and a
    restart resubmits what was in flight, each request completing once."""
    with slow_disk(vhost_target, LATENCY_MS):
        session = make_session(vhost_target, packed=True, model=False)
        tracker = InflightTracker(session)
        blk = session.queues[0].blk
        tracker.submit([blk.read(8 * i, 8) for i in range(2)])
        session.submit(0)
        time.sleep(0.1)
        fail_on_findings(tracker.findings(), "packed region while 2 reads are in flight")
        tracker.wait(0, 2)
        fail_on_findings(tracker.findings(), "packed region after the completions")
        marked = tracker.region().queues[0].inflight_heads()
        if marked:
            raise CaseFailed("packed region after every request completed",
                             expected="nothing in flight", seen=marked)
    if isinstance(vhost_target, CommandTarget):
        # TEST-IDEAS 5: recovery after a restart, on the packed ring too
        _resubmission(vhost_target, make_session, 2, packed=True)


@case(
    "VU-INF-12", title="In-flight region kept across reconnect", family="inflight", level=MUST,
    clause=f"{RST} Front-end message types: SET_INFLIGHT_FD", quote=SET_INFLIGHT_FD_QUOTE,
    requirement="On a new connection given the old region by SET_INFLIGHT_FD (no "
        "GET_INFLIGHT_FD), as QEMU does after a reconnect, pending heads are resubmitted.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD],
)
def test_region_kept_across_reconnect(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """Given the old region on a new connection, pending heads are resubmitted; also when
    requests completed out of order before the reconnect (used->idx past the heads still in
    flight, so SET_VRING_BASE = used->idx alone would serve the wrong slots)."""
    with slow_disk(vhost_target, LATENCY_MS):
        session = make_session(vhost_target, model=False)
        blk = session.queues[0].blk
        requests = [blk.read(8 * i, 8) for i in range(2)]
        session.submit(0)
        wait_popped(session, 0, settle=0.1)
        make_session.reconnect(session, vhost_target)
        done = wait_all(session, requests, timeout=session.timeout + 1)
        expect_status(done, what="read pending across the reconnect")
        time.sleep(LATENCY_MS / 1000 + 0.1)
        late = session.queues[0].vq.reap()
        violations = session.queues[0].vq.violations
        if late or violations:
            raise CaseFailed("used ring after the reconnect",
                             expected="each pending request completed exactly once",
                             seen=str(violations[0]) if violations else f"{len(late)} more")
    out_of_order_recovery(vhost_target, make_session, kill=False)
