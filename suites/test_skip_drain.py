"""GET_VRING_BASE_SKIP_DRAIN (protocol bit 23, message 45): a PROPOSAL, not QEMU 11.1.3.

These cases drive the back-end with the ``qemu-next`` front-end profile (frontend.sequences),
which tracks the newest vhost-user.rst in the index: p-b-o/qemu-ci
docs/interop/vhost-user.rst b82b5c8c547fb49b30f60e2b3e8cae565cbf6e66, "Front-end message
types: VHOST_USER_GET_VRING_BASE_SKIP_DRAIN" (id 45) and the protocol feature table (bit 23),
as queued on mst's next branch (1276e6c85dcc, 2026-09-11). The text is not in the
authoritative 11.1.3 copy, so the cases are interop tier with that source. A back-end that
does not offer bit 23 (every real peer today) gets ``unsupported``. The texts disagree on the
id: yc-libvhost-server PR #48 (2026-09-15) gives the message id 44, which 11.1.3 assigns to
GET_SHMEM_CONFIG; the cases send 45 (docs/SPEC-NOTES.md "qemu-next").
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vhost_conformance.frontend.device import QEMU_NEXT_SOURCE, Session
from vhost_conformance.frontend.protocol import FrontendRequest, ProtocolFeature, VringState
from vhost_conformance.reports.model import Tier
from vhost_conformance.suites.drivers import (
    InflightTracker,
    MakeTarget,
    SessionFactory,
    do_io,
    fail_on_findings,
    pending_io,
    slow_disk,
    stop_now,
    wait_popped,
)
from vhost_conformance.suites.drivers.migration import fail_on, held_migration
from vhost_conformance.suites.drivers.watched import late_writes
from vhost_conformance.suites.model import MUST, CaseFailed, case
from vhost_conformance.suites.target import BackendTarget, Capabilities

F = FrontendRequest
P = ProtocolFeature

#: the proposal's section, as the cases cite it
SECTION = "vhost-user.rst (post-11.1 proposal) Front-end message types: GET_VRING_BASE_SKIP_DRAIN"
#: per-request latency of the slow disk, and requests held: long, so that a back-end whose
#: requests all complete before the reply waited for them (a loaded machine does not stall
#: the back-end's socket read for most of a second; the held requests run concurrently)
LATENCY_MS = 1000
HELD = 2
SKIP_DRAIN_BITS = [P.INFLIGHT_SHMFD, P.GET_VRING_BASE_INFLIGHT, P.GET_VRING_BASE_SKIP_DRAIN]


def _next_session(make_session: SessionFactory, target: BackendTarget) -> Session:
    """A started ``qemu-next`` session with bit 23 agreed (CaseFailed if the offer of bits
    12, 20 and 23 did not end agreed)."""
    session = make_session(target, profile="qemu-next", inflight_migration=True, model=False)
    if not session.skip_drain_agreed:
        raise CaseFailed("bit 23 after the qemu-next negotiation",
                         expected="agreed (bits 12, 20 and 23 offered)",
                         seen=f"protocol features {session.negotiated.protocol_features:#x}")
    return session


@case(
    "VU-SKIP-1",
    title="Bit 23 GET_VRING_BASE_SKIP_DRAIN is offered only with bits 20 and 12 (proposal)",
    family="handshake", level=MUST, tier=Tier.INTEROP, clause=f"{SECTION}; Protocol features",
    source=f"{QEMU_NEXT_SOURCE}: 'The VHOST_USER_PROTOCOL_F_GET_VRING_BASE_SKIP_DRAIN protocol "
    "feature must only be negotiated if both VHOST_USER_PROTOCOL_F_GET_VRING_BASE_INFLIGHT and "
    "VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD are also negotiated'",
    requirement="A back-end offering bit 23 offers bits 20 and 12 too, and a qemu-next "
        "front-end's negotiation of all three is accepted.",
    requires=[P.GET_VRING_BASE_SKIP_DRAIN],
)
def test_skip_drain_comes_with_bits_20_and_12(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, make_session: SessionFactory
) -> None:
    """Bit 23 without its prerequisites could never be negotiated; with them, it is."""
    missing = vhost_capabilities.missing([P.INFLIGHT_SHMFD, P.GET_VRING_BASE_INFLIGHT])
    if missing:
        raise CaseFailed("protocol bits offered with bit 23 GET_VRING_BASE_SKIP_DRAIN",
                         expected="bits 12 (INFLIGHT_SHMFD) and 20 (GET_VRING_BASE_INFLIGHT)",
                         seen=f"{', '.join(str(m) for m in missing)} not offered "
                         f"(offer {vhost_capabilities.protocol_features:#x})")
    _next_session(make_session, vhost_target)


@case(
    "VU-SKIP-2",
    title="GET_VRING_BASE_SKIP_DRAIN suspends at once and records in the region (proposal)",
    family="suspended", level=MUST, tier=Tier.INTEROP,
    clause=f"{SECTION}; Inflight I/O tracking; Suspended device state",
    source=f"{QEMU_NEXT_SOURCE}: 'the back-end must not wait for inflight I/O requests to "
    "complete before stopping the vring. Instead, the back-end must immediately suspend all "
    "in-flight I/O requests and record them as described in Inflight I/O tracking'",
    requirement="With reads held on a 1 s disk, the SKIP_DRAIN reply comes before they complete, "
        "the region marks exactly the outstanding heads, and nothing is written or signalled "
        "after the reply.",
    requires=SKIP_DRAIN_BITS, needs=["slow-io"],
)
def test_skip_drain_suspends_and_records(
    vhost_target: BackendTarget, make_session: SessionFactory,
    vhost_measurements: dict[str, float], vhost_measure: Callable[..., None],
) -> None:
    """Hold :data:`HELD` reads, stop with message 45: none of them may complete before the
    reply (that would be the drain), the region must say which are outstanding, and the
    device stays suspended while the disk latency passes."""
    with slow_disk(vhost_target, LATENCY_MS):
        session = _next_session(make_session, vhost_target)
        tracker = InflightTracker(session)
        requests = tracker.submit(pending_io(session, HELD))
        wait_popped(session, 0, settle=0.1)
        stopped = stop_now(session, requests, skip_drain=True)
        base = stopped.bases[0]
        outstanding_before = (base - stopped.used_idx_before[0]) & 0xFFFF
        outstanding_at_reply = (base - stopped.used_idx_at_reply[0]) & 0xFFFF
        vhost_measurements["stop_ms"] = round(stopped.elapsed * 1e3, 3)
        vhost_measurements["outstanding_before"] = float(outstanding_before)
        vhost_measurements["outstanding_at_reply"] = float(outstanding_at_reply)
        vhost_measure("stop_latency_ms", stopped.elapsed * 1e3, mode="skip-drain",
                      disk_latency_ms=LATENCY_MS, inflight=HELD)
        if base == 0:
            raise CaseFailed("GET_VRING_BASE_SKIP_DRAIN num with requests published and kicked",
                             expected=f"1..{HELD} (the back-end took them)", seen=0)
        if outstanding_before and not outstanding_at_reply:
            raise CaseFailed(
                f"requests outstanding when GET_VRING_BASE_SKIP_DRAIN was sent, completed by "
                f"its reply ({stopped.elapsed * 1e3:.0f} ms, disk latency {LATENCY_MS} ms)",
                expected=f"{outstanding_before} still outstanding (suspended, not drained)",
                seen="all completed: the back-end drained")
        tracker.reap(0)
        fail_on_findings(tracker.findings(stopped.bases),
                         "in-flight region after GET_VRING_BASE_SKIP_DRAIN")
        time.sleep(LATENCY_MS / 1000 + 0.3)
        changed = session.memory.diff(stopped.snapshot)
        if changed:
            raise CaseFailed(
                f"guest memory {LATENCY_MS + 300} ms after the SKIP_DRAIN reply",
                expected="unchanged (suspended)",
                seen=f"{len(changed)} range(s) written, first at GPA {changed[0][0]:#x}")
        signals = session.drain_call(0)
        if signals:
            raise CaseFailed("call eventfd after the SKIP_DRAIN reply", expected="not signalled",
                             seen=f"signalled ({signals})")


@case(
    "VU-SKIP-3", title="GET_VRING_BASE_SKIP_DRAIN is answered like GET_VRING_BASE (proposal)",
    family="stop-drain", level=MUST, tier=Tier.INTEROP,
    clause=f"{SECTION}; GET_VRING_BASE; Ring states",
    source=f"{QEMU_NEXT_SOURCE}: ':request payload: vring state description / :reply payload: "
    "vring descriptor index/indices'; 'Identical to VHOST_USER_GET_VRING_BASE except that the "
    "back-end must not wait for inflight I/O'; rings are 'stopped with "
    "VHOST_USER_GET_VRING_BASE or VHOST_USER_GET_VRING_BASE_SKIP_DRAIN'",
    requirement="The reply carries id 45, the queue index and the next avail index; the ring is "
        "stopped, asked again it says the same, and SET_VRING_BASE with it plus a kick resumes "
        "I/O there.",
    requires=SKIP_DRAIN_BITS,
)
def test_skip_drain_is_answered_like_get_vring_base(
    vhost_target: BackendTarget, make_session: SessionFactory,
) -> None:
    """After 2 rounds of I/O: the reply, a request on the stopped ring left alone, the same
    index asked again, and a restart at it."""
    session = _next_session(make_session, vhost_target)
    done = do_io(session, 2)
    # the channel checks the reply's header as QEMU does: flags 0x5, id 45, 8 bytes
    stopped = stop_now(session, skip_drain=True)
    base = stopped.bases[0]
    if base != len(done) & 0xFFFF:
        raise CaseFailed("GET_VRING_BASE_SKIP_DRAIN num after completed I/O",
                         expected=f"{len(done)} (the next avail index)", seen=base)
    reply = session.call(F.GET_VRING_BASE_SKIP_DRAIN, VringState(0, 0))
    assert reply is not None
    again = VringState.decode(reply.payload)
    if again != VringState(0, base):
        raise CaseFailed("GET_VRING_BASE_SKIP_DRAIN asked again on the stopped ring",
                         expected=VringState(0, base), seen=again)
    q = session.queues[0]
    late = q.blk.read(300, 8)
    q.vq.publish()
    session.kick(0)
    time.sleep(0.2)
    used = q.vq.used_idx_in_memory()
    if used != base:
        raise CaseFailed("used->idx after a request on the ring stopped by SKIP_DRAIN",
                         expected=f"{base} (the ring is stopped)", seen=used)
    # "A stopped ring enters the started state again with VHOST_USER_SET_VRING_KICK"
    session.start(vring_bases=[base])
    got = session.wait_used(0, 1)
    completed = q.blk.complete(got)
    if [c.tag for c in completed] != [late.tag]:
        raise CaseFailed("after SET_VRING_BASE with the SKIP_DRAIN reply and a restart",
                         expected=f"the request left on the stopped ring (tag {late.tag}) done",
                         seen=f"{len(completed)} completion(s)")
    do_io(session, 1, kinds=("read",), sector=4000)


@case(
    "VU-SKIP-4",
    title="An in-flight migration whose switch-over sends GET_VRING_BASE_SKIP_DRAIN (proposal)",
    family="migration", level=MUST, tier=Tier.INTEROP, clause=f"{SECTION}; Inflight I/O tracking",
    source=f"{QEMU_NEXT_SOURCE}; c2f4030c42da 'vhost-user-blk: use GET_VRING_BASE_SKIP_DRAIN "
    "when inflight-migration is on' (the switch-over's stop; p-b-o/qemu-ci hw/virtio/vhost.c "
    "1040dc581d92 do_vhost_virtqueue_stop sends it per queue); the destination resubmits the "
    "recorded requests as with bit 20 (QEMU 11.1.3 hw/block/vhost-user-blk.c inflight subsection)",
    requirement="With the qemu-next front-end, the source is stopped by GET_VRING_BASE_SKIP_DRAIN "
        "(no GET_VRING_BASE) and every request held at the switch-over completes once, on the "
        "destination or on the source before the reply.",
    requires=SKIP_DRAIN_BITS, needs=["slow-io"],
)
def test_skip_drain_migration_completes_every_request_once(
    vhost_target: BackendTarget, vhost_target_factory: MakeTarget,
    make_session: SessionFactory, vhost_measurements: dict[str, float],
) -> None:
    """VU-MIG-3 with the qemu-next switch-over: reads held on the slow disk, message 45 at
    the stop, the destination given the migrated region."""
    result, ledger, _ = held_migration(vhost_target, vhost_target_factory, make_session,
                                       kinds=("read",), measurements=vhost_measurements,
                                       profile="qemu-next")
    sent = [e.name for e in result.source.channel.trace.entries() if e.direction == "fe->be"]
    stops = [n for n in sent if n.startswith("GET_VRING_BASE")]
    if not result.source.skip_drain_agreed or stops != ["GET_VRING_BASE_SKIP_DRAIN"]:
        raise CaseFailed("the qemu-next switch-over on the source",
                         expected="bit 23 agreed and one GET_VRING_BASE_SKIP_DRAIN",
                         seen=f"protocol {result.source.negotiated.protocol_features:#x}, "
                         f"stop messages {stops}")
    fail_on([f for f in ledger.findings() if f.kind != "status"],
            "requests held across the qemu-next migration")


@case(
    "VU-SKIP-5",
    title="No disk write after a GET_VRING_BASE_SKIP_DRAIN reply (proposal, watched disk)",
    family="suspended", level=MUST, tier=Tier.INTEROP, clause=f"{SECTION}; Suspended device state",
    source=f"{QEMU_NEXT_SOURCE}: 'the back-end must immediately suspend all in-flight I/O "
    "requests ... How to suspend an in-flight request depends on the implementation of the "
    "back-end, but it typically can be done by aborting or cancelling the underlying I/O "
    "request'; the destination resubmits what the source recorded (VU-DISK-2's reasoning)",
    requirement="WRITEs held at a GET_VRING_BASE_SKIP_DRAIN stop do not reach the disk after its "
        "reply (watched disk journal).",
    requires=SKIP_DRAIN_BITS,
)
def test_no_disk_write_after_a_skip_drain_stop(
    vhost_target: BackendTarget, make_session: SessionFactory, vhost_measurements: dict[str, float]
) -> None:
    """VU-DISK-2 with message 45: whatever the back-end suspended must not land later."""
    late_writes(vhost_target, make_session, vhost_measurements, bit20=True, skip_drain=True)
