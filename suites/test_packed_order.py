"""Packed ring order and flag cases: the device takes driver descriptors in ring order, writes
used descriptors in completion order, takes only descriptors whose AVAIL bit changed, and
leaves a used descriptor alone once its USED bit flipped.

Family: rings (VU-RING-21..24). Clauses: VIRTIO 1.3 2.8.12 "Packed Virtqueues" and 2.8.15
"The Virtqueue Descriptor Table" (device requirements). Every case needs RING_PACKED and
drives the ring by hand where the front-end's driver would do it right: a head whose flags
are held back, flags that do not make a descriptor available, a descriptor sampled after use.
"""

from __future__ import annotations

import struct
import time

from vhost_conformance.frontend.blk import BlkDriver, BlkRequest
from vhost_conformance.frontend.channel import BackendHang
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.protocol import VirtioFeature
from vhost_conformance.frontend.virtqueue import PackedVirtqueue
from vhost_conformance.suites.clauses import VIRTIO
from vhost_conformance.suites.drivers import (
    SessionFactory,
    do_io,
    expect_status,
    pattern,
    slow_disk,
    wait_all,
)
from vhost_conformance.suites.model import MUST, CaseFailed, CaseHang, Unsupported, case
from vhost_conformance.suites.target import BackendTarget

#: How long a ring holding something the device must not take is watched.
QUIET = 0.2
#: Latency of the slow disk (VU-RING-22): a WRITE waits that long, a GET_ID does not.
LATENCY_MS = 300

_NEXT = 1
_AVAIL = 1 << 7
_USED = 1 << 15


def _packed_session(
    target: BackendTarget, make_session: SessionFactory
) -> tuple[Session, PackedVirtqueue, BlkDriver]:
    """A packed-ring session whose first read completed (VU-RING-9 owns a packed ring that
    serves nothing: a hang here follows from it), with queue 0's ring and blk driver."""
    session = make_session(target, packed=True)
    try:
        do_io(session, 1, kinds=("read",), sector=120)
    except BackendHang as exc:
        raise CaseHang(f"the first packed-ring request did not complete: {exc}",
                       behaviour="no-io-on-packed-ring") from None
    return session, _ring(session), session.queues[0].blk


def _ring(session: Session) -> PackedVirtqueue:
    vq = session.queues[0].vq
    if not isinstance(vq, PackedVirtqueue):
        raise Unsupported("a packed ring", "the session negotiated a split ring")
    return vq


def _status(session: Session, request: BlkRequest) -> int:
    assert request.status_gpa is not None
    return session.memory.read(request.status_gpa, 1)[0]


def _flags(desc: bytes) -> int:
    return int(struct.unpack_from("<H", desc, 14)[0])


def _buffer_id(desc: bytes) -> int:
    return int(struct.unpack_from("<H", desc, 12)[0])


def _untaken(session: Session, vq: PackedVirtqueue, slot: int, before: bytes,
             requests: list[BlkRequest], what: str, behaviour: str) -> None:
    """After a kick and QUIET seconds: ring entry ``slot`` is as the driver left it (no used
    descriptor written there) and no status byte of ``requests`` was written."""
    time.sleep(QUIET)
    for request in requests:
        status = _status(session, request)
        if status != 0xFF:
            raise CaseFailed(f"status byte of buffer id {request.head} {what}",
                             expected="untouched (0xff)", seen=f"{status:#x}", behaviour=behaviour)
    now = vq.ring_bytes(slot)
    if now != before:
        raise CaseFailed(f"ring entry {slot} {what}", expected=f"as the driver wrote it "
                         f"(flags {_flags(before):#06x})", seen=f"a used descriptor: id "
                         f"{_buffer_id(now)}, flags {_flags(now):#06x}", behaviour=behaviour)


@case(
    "VU-RING-21", title="Packed descriptors are taken in ring order", family="rings", level=MUST,
    clause=f"{VIRTIO} 2.8.12 Packed Virtqueues (device requirements)",
    quote="The device MUST start processing driver descriptors in the order in which they appear "
        "in the ring.",
    requirement="Two reads are written into the ring; the second one's head is made available, "
        "the first one's is not yet (its flags carry NEXT, AVAIL and USED still 0). After a kick "
        "the device takes neither: the second read's status byte and the first entry stay "
        "untouched for 0.2 s. Once the first head is made available both complete OK.",
    ambiguity="the order of starting is judged where it is observable without timing: a device "
        "that starts the second request while the first is not available started it out of ring "
        "order",
    requires=[VirtioFeature.RING_PACKED],
)
def test_packed_ring_order(vhost_target: BackendTarget, make_session: SessionFactory) -> None:
    """A later available chain behind a chain whose head is not available is not taken."""
    s, vq, blk = _packed_session(vhost_target, make_session)
    first = vq.next_avail_idx
    held = blk.read(8, 1, indirect=False)
    later = blk.read(16, 1, indirect=False)
    vq.publish(hold_first=True)
    vq.write_flags(first, _NEXT)  # written out, not made available (AVAIL = USED = 0)
    before = vq.ring_bytes(first)
    s.kick(0)
    _untaken(s, vq, first, before, [held, later],
             "while the entry before it was not available",
             behaviour="packed-out-of-ring-order")
    s.submit(0)  # the first head's flags: both are available, in order
    expect_status(wait_all(s, [held, later]), what="read")
    if vq.violations:
        raise CaseFailed("packed ring", expected="no violation", seen=str(vq.violations[0]))


@case(
    "VU-RING-22", title="Packed used descriptors in completion order", family="rings", level=MUST,
    clause=f"{VIRTIO} 2.8.12 Packed Virtqueues (device requirements)",
    quote="The device MUST start writing device descriptors into the ring in the order in which "
        "they complete.",
    requirement="On a slow disk (0.3 s per request) a WRITE and then a GET_ID (which needs no "
        "disk) are made available together. Whichever status byte is written first, alone, marks "
        "the request that completed first: the first used descriptor carries its buffer id.",
    ambiguity="the spec does not say when a request completes; the case takes the moment its "
        "status byte, the last byte the device writes into the buffers, appears (QEMU 11.1.3's "
        "libvhost-user pushes the used element after the status); two status bytes seen in the "
        "same sample give no order: unsupported",
    requires=[VirtioFeature.RING_PACKED],
)
def test_packed_used_in_completion_order(vhost_target: BackendTarget,
                                         make_session: SessionFactory) -> None:
    """A slow WRITE then a GET_ID: the first used descriptor is the one that completed first."""
    with slow_disk(vhost_target, LATENCY_MS):
        s = make_session(vhost_target, packed=True, model=False)
        vq = _ring(s)
        blk = s.queues[0].blk
        slot = vq.last_used_idx
        slow = blk.write(40, pattern(90, 4096), indirect=False)
        fast = blk.get_id()
        s.submit(0)
        order: list[list[BlkRequest]] = []
        deadline = time.monotonic() + s.timeout
        while sum(len(group) for group in order) < 2 and time.monotonic() < deadline:
            seen = {r.tag for group in order for r in group}
            new = [r for r in (slow, fast) if r.tag not in seen and _status(s, r) != 0xFF]
            if new:
                order.append(new)
            time.sleep(0.0005)
        try:
            done = wait_all(s, [slow, fast])
        except BackendHang as exc:
            raise CaseHang(f"a WRITE and a GET_ID on the packed ring: {exc}",
                           behaviour="no-io-on-packed-ring") from None
        expect_status(done, what="WRITE / GET_ID")
        if len(order[0]) != 1:
            raise Unsupported("requests completing in another order than the ring's",
                              "both status bytes appeared in the same sample")
        first_done = order[0][0]
        used = vq.ring_bytes(slot)
        if _buffer_id(used) != first_done.head:
            name = {slow.head: "the WRITE", fast.head: "the GET_ID"}
            raise CaseFailed(
                f"first used descriptor (ring entry {slot}) after {name[first_done.head]} "
                "completed first", expected=f"buffer id {first_done.head}",
                seen=f"buffer id {_buffer_id(used)} "
                f"({name.get(_buffer_id(used), 'neither')})",
                behaviour="packed-used-submission-order")


@case(
    "VU-RING-23", title="Packed descriptors without a changed AVAIL bit are not used",
    family="rings", level=MUST,
    clause=f"{VIRTIO} 2.8.15 The Virtqueue Descriptor Table (device requirements)",
    quote="A device MUST NOT use a descriptor unless it observes the VIRTQ_DESC_F_AVAIL bit in "
        "its flags being changed (e.g. as compared to the initial zero value).",
    requirement="A read is written at the next ring entry with head flags that do not make it "
        "available: in the first lap USED set and AVAIL clear (the pattern of the other wrap "
        "counter), after the ring wrapped AVAIL set with USED clear and with USED set (the values "
        "the entry had in the first lap). After a kick the device takes none of them (status byte "
        "and entry untouched for 0.2 s); made available, each completes OK.",
    requires=[VirtioFeature.RING_PACKED],
)
def test_packed_stale_avail_bit(vhost_target: BackendTarget, make_session: SessionFactory) -> None:
    """Wrong-wrap and stale AVAIL/USED pairs at the next entry, in both laps."""
    s, vq, blk = _packed_session(vhost_target, make_session)

    def probe(bits: int, name: str) -> None:
        slot, wrap = vq.next_avail_idx, vq.avail_wrap_counter
        request = blk.read(24, 1, indirect=False)
        vq.write_flags(slot, _NEXT | bits)
        before = vq.ring_bytes(slot)
        s.kick(0)
        _untaken(s, vq, slot, before, [request],
                 f"with head flags {_NEXT | bits:#06x} ({name}; driver wrap counter {wrap})",
                 behaviour="packed-stale-avail-used")
        s.submit(0)
        expect_status(wait_all(s, [request]), what=f"read made available after {name}")

    if vq.avail_wrap_counter != 1:
        raise Unsupported("a first lap", "the ring wrapped already")  # not with _packed_session
    probe(_USED, "USED set, AVAIL clear: available only for wrap counter 0")
    for _ in range(2 * vq.size):
        if vq.avail_wrap_counter == 0:
            break
        do_io(s, 1, kinds=("read",), sector=128)
    probe(_AVAIL, "AVAIL set, USED clear: available only for wrap counter 1")
    probe(_AVAIL | _USED, "AVAIL and USED set: a used entry of wrap counter 1")
    if vq.violations:
        raise CaseFailed("packed ring", expected="no violation", seen=str(vq.violations[0]))


@case(
    "VU-RING-24", title="Packed used descriptors are not changed after their USED bit",
    family="rings", level=MUST,
    clause=f"{VIRTIO} 2.8.15 The Virtqueue Descriptor Table (device requirements)",
    quote="A device MUST NOT change a descriptor after changing it's the VIRTQ_DESC_F_USED bit in "
        "its flags.",
    requirement="Four requests (reads and writes) are made available one after the other, each "
        "once the previous one's used descriptor appeared; each used descriptor's 16 bytes are "
        "read when its USED bit flips and must stay the same through the later completions and "
        "0.2 s after the last (nothing is reaped or reused meanwhile).",
    requires=[VirtioFeature.RING_PACKED],
)
def test_packed_used_descriptor_unchanged(vhost_target: BackendTarget,
                                          make_session: SessionFactory) -> None:
    """Snapshots of used descriptors at the flip, compared after every later completion."""
    s, vq, blk = _packed_session(vhost_target, make_session)
    seen: dict[int, bytes] = {}
    requests: list[BlkRequest] = []

    def compare(when: str) -> None:
        for at, snapshot in seen.items():
            now = vq.ring_bytes(at)
            if now != snapshot:
                raise CaseFailed(
                    f"used descriptor at ring entry {at} {when}",
                    expected=f"unchanged (len {struct.unpack_from('<I', snapshot, 8)[0]}, id "
                    f"{_buffer_id(snapshot)}, flags {_flags(snapshot):#06x})",
                    seen=f"len {struct.unpack_from('<I', now, 8)[0]}, id {_buffer_id(now)}, "
                    f"flags {_flags(now):#06x}", behaviour="packed-used-changed")

    for k in range(4):
        slot, wrap = vq.next_avail_idx, vq.avail_wrap_counter
        want = (_AVAIL | _USED) if wrap else 0
        if k % 2:
            request = blk.write(200 + 8 * k, pattern(95 + k, 4096), indirect=False)
        else:
            request = blk.read(200 + 8 * k, 8, indirect=False)
        requests.append(request)
        s.submit(0)
        deadline = time.monotonic() + s.timeout
        while True:
            desc = vq.ring_bytes(slot)
            if _flags(desc) & (_AVAIL | _USED) == want and _buffer_id(desc) == request.head:
                desc = vq.ring_bytes(slot)  # read again: id and len were stored before the flags
                break
            if time.monotonic() > deadline:
                raise CaseHang(f"request {k + 1} of 4: no used descriptor at ring entry {slot}")
            time.sleep(0.0005)
        compare(f"after request {k + 1} of 4 completed")
        seen[slot] = desc
    time.sleep(QUIET)
    compare(f"{QUIET} s after the last completion")
    expect_status(wait_all(s, requests), what="read / write")
    if vq.violations:
        raise CaseFailed("packed ring", expected="no violation", seen=str(vq.violations[0]))
