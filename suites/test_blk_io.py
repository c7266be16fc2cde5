"""Block I/O cases: every virtio-blk request type against the model disk.

Family: blk-io (VU-BLK-*). Clauses: VIRTIO 1.3 "Block Device: Device Operation" (request
types, status values) and vhost-user.rst "Multiple queue support". Each case runs on a
session started as QEMU 11.1.3 starts vhost-user-blk (``vhost_session``).
"""

from __future__ import annotations

from collections.abc import Sequence

from vhost_conformance.frontend.blk import (
    SECTOR_SIZE,
    BlkConfig,
    BlkRequestType,
    BlkStatus,
)
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.protocol import BlkFeature, ProtocolFeature
from vhost_conformance.suites.clauses import (
    MULTIQUEUE_GET_QUEUE_NUM_QUOTE,
    RING_STARTED_ENABLED_QUOTE,
    RST,
    VIRTIO,
    quotes,
)
from vhost_conformance.suites.drivers import (
    IoError,
    SessionFactory,
    capacity_of,
    do_io,
    expect_status,
    pattern,
    restart_variant,
    wait_all,
    write_read_verify,
)
from vhost_conformance.suites.model import (
    MUST,
    SHOULD,
    CaseFailed,
    CaseNonStrict,
    Unsupported,
    case,
)
from vhost_conformance.suites.target import BackendTarget, Capabilities

#: A request type no virtio-blk revision defines (VIRTIO 1.3 5.2.6: types are 0..26).
UNKNOWN_TYPE = 0x7E


def _one(session: Session, request_type: int, **raw: object) -> tuple[int, int, bytes | None]:
    """Submit one raw request on queue 0 and wait: (status, used len, data). The model disk
    does not judge it (it may lie outside the disk)."""
    blk = session.queues[0].blk
    model, blk.model = blk.model, None
    try:
        request = blk.raw(request_type, **raw)  # type: ignore[arg-type]
        session.submit(0)
        (done,) = wait_all(session, [request])
    finally:
        blk.model = model
    return done.status, done.len, done.data


def _each_unsupp(
    session: Session, what: str, requests: Sequence[tuple[str, int, dict[str, object]]]
) -> None:
    """Each (name, request type, :func:`_one` keywords) must complete with
    VIRTIO_BLK_S_UNSUPP (CaseFailed naming those that did not); then the device must still
    serve I/O."""
    wrong = []
    for name, rtype, raw in requests:
        status, _, _ = _one(session, rtype, **raw)
        if status != BlkStatus.UNSUPP:
            wrong.append(f"{name}: {status}")
    if wrong:
        raise CaseFailed(what, expected="VIRTIO_BLK_S_UNSUPP (2) for each", seen="; ".join(wrong))
    do_io(session, 1)


@case(
    "VU-BLK-1", title="Write, then read back", family="blk-io", level=MUST,
    clause=f"{VIRTIO} 5.2.6 Block Device: Device Operation",
    quote="VIRTIO_BLK_T_IN requests populate data with the contents of sectors read from the block "
        "device (in multiples of 512 bytes).\n"
        "VIRTIO_BLK_T_OUT requests write the contents of data to the block device (in multiples "
        "of 512 bytes).",
    requirement="Data written with VIRTIO_BLK_T_OUT reads back unchanged with VIRTIO_BLK_T_IN, "
        "status OK.",
    ambiguity="the quoted sentences define IN and OUT and carry no MUST; no VIRTIO 1.3 sentence "
        "says in so many words that a read returns the data last written: the MUST level is ours",
)
def test_write_then_read_back(vhost_session: Session) -> None:
    """Data written with VIRTIO_BLK_T_OUT reads back unchanged with VIRTIO_BLK_T_IN."""
    write_read_verify(vhost_session, 0, pattern(1, 4096))
    # one request split over several descriptors: framing is not tied to descriptor
    # boundaries (VIRTIO 1.3 "Message Framing")
    write_read_verify(vhost_session, 64, pattern(2, 12 * SECTOR_SIZE), segments=5)
    write_read_verify(vhost_session, 200, pattern(3, SECTOR_SIZE), indirect=False)
    do_io(vhost_session, 4, sector=1024, nsectors=16)


@case(
    "VU-BLK-2", title="FLUSH", family="blk-io", level=MUST,
    clause=f"{VIRTIO} 5.2.6.2 Block Device: Device Operation: Device Requirements",
    quote="If the device is backed by persistent storage, the device MUST ensure that stable "
        "writes are committed to it, before reporting completion of the write (cases 1 and 2) or "
        "the flush (case 3).",
    requirement="With FLUSH offered, VIRTIO_BLK_T_FLUSH completes with status OK.",
    ambiguity="the case sees only the flush's status: whether stable writes reached persistent "
        "storage is not observable here, and no VIRTIO 1.3 sentence requires status OK for a "
        "flush (a back-end failing its storage may answer IOERR)",
    requires=[BlkFeature.FLUSH],
)
def test_flush_completes_ok(vhost_session: Session) -> None:
    """With FLUSH offered, VIRTIO_BLK_T_FLUSH completes with status OK."""
    do_io(vhost_session, 1, kinds=("write", "flush", "read"))


@case(
    "VU-BLK-3", title="Unknown request types are UNSUPP", family="blk-io", level=MUST,
    clause=f"{VIRTIO} 5.2.6 Block Device: Device Operation",
    quote="The final status byte is written by the device: either VIRTIO_BLK_S_OK for success, "
        "VIRTIO_BLK_S_IOERR for device or driver error or VIRTIO_BLK_S_UNSUPP for a request "
        "unsupported by device:",
    requirement="A request of a type the device does not implement completes with "
        "VIRTIO_BLK_S_UNSUPP.",
    ambiguity="the quoted sentence names UNSUPP for a request unsupported by device but carries "
        "no MUST: the MUST level is ours",
)
def test_unknown_type_is_unsupp(vhost_session: Session) -> None:
    """A request of a type the device does not implement completes with UNSUPP."""
    status, _, _ = _one(vhost_session, UNKNOWN_TYPE, in_len=SECTOR_SIZE)
    if status != BlkStatus.UNSUPP:
        raise CaseFailed(f"status of request type {UNKNOWN_TYPE:#x}",
                         expected="VIRTIO_BLK_S_UNSUPP (2)", seen=status)
    # the device still works afterwards
    do_io(vhost_session, 1)


#: VIRTIO 1.3 5.2.6: VIRTIO_BLK_T_ZONE_APPEND 15, ZONE_REPORT 16, ZONE_OPEN 18, ZONE_CLOSE 20,
#: ZONE_FINISH 22, ZONE_RESET 24, ZONE_RESET_ALL 26 (SPEC-DIGEST "request types").
ZONE_TYPES = {15: "ZONE_APPEND", 16: "ZONE_REPORT", 18: "ZONE_OPEN", 20: "ZONE_CLOSE",
              22: "ZONE_FINISH", 24: "ZONE_RESET", 26: "ZONE_RESET_ALL"}


@case(
    "VU-BLK-10", title="ZONE_* requests are UNSUPP without ZONED", family="blk-io", level=MUST,
    clause=f"{VIRTIO} 5.2.6.2 Block Device: Device Operation: Device Requirements",
    quote="If the VIRTIO_BLK_F_ZONED feature is not negotiated, the device MUST reject "
        "VIRTIO_BLK_T_ZONE_REPORT, VIRTIO_BLK_T_ZONE_OPEN, VIRTIO_BLK_T_ZONE_CLOSE, "
        "VIRTIO_BLK_T_ZONE_FINISH, VIRTIO_BLK_T_ZONE_APPEND, VIRTIO_BLK_T_ZONE_RESET and "
        "VIRTIO_BLK_T_ZONE_RESET_ALL requests with VIRTIO_BLK_S_UNSUPP status.",
    requirement="Without VIRTIO_BLK_F_ZONED acked (QEMU 11.1.3's vhost-user-blk never acks it), "
        "each zone request type completes with VIRTIO_BLK_S_UNSUPP and the device goes on.",
)
def test_zone_requests_are_unsupp(vhost_session: Session) -> None:
    """ZONE_APPEND, ZONE_REPORT, ZONE_OPEN/CLOSE/FINISH/RESET/RESET_ALL: UNSUPP each."""
    if vhost_session.negotiated.acked_features >> BlkFeature.ZONED & 1:
        raise CaseFailed("ZONED acked by the session", expected="not acked (as QEMU)", seen="acked")
    requests: list[tuple[str, int, dict[str, object]]] = []
    for rtype, name in ZONE_TYPES.items():
        raw: dict[str, object] = {"sector": 0}
        if rtype == 15:
            raw["out_data"] = pattern(15, SECTOR_SIZE)
        elif rtype == 16:
            raw["in_len"] = 4096
        requests.append((f"{name} ({rtype})", rtype, raw))
    _each_unsupp(vhost_session, "status of zone requests without ZONED", requests)


@case(
    "VU-BLK-4", title="I/O beyond capacity fails", family="blk-io", level=MUST,
    clause=f"{VIRTIO} 5.2.6 Block Device: Device Operation",
    quote="The final status byte is written by the device: either VIRTIO_BLK_S_OK for success, "
        "VIRTIO_BLK_S_IOERR for device or driver error or VIRTIO_BLK_S_UNSUPP for a request "
        "unsupported by device:",
    requirement="A read or write past the capacity completes with VIRTIO_BLK_S_IOERR and touches "
        "nothing.",
    ambiguity="VIRTIO 1.3 5.2.6.1 forbids only the driver such a request (\"A driver MUST NOT submit "
        "a request which would cause a read or write beyond capacity.\"); IOERR as \"device or "
        "driver error\" and touching nothing are ours: the quoted sentence carries no MUST",
)
def test_io_beyond_capacity_fails(vhost_session: Session) -> None:
    """A read or write past the capacity completes with IOERR and touches nothing."""
    capacity = capacity_of(vhost_session) // SECTOR_SIZE
    last = capacity - 8
    write_read_verify(vhost_session, last, pattern(9, 8 * SECTOR_SIZE))
    # wholly beyond the end, and straddling it
    for sector, what in ((capacity, "at the capacity"), (capacity - 4, "straddling the end")):
        status, _, _ = _one(vhost_session, BlkRequestType.IN, sector=sector, in_len=8 * SECTOR_SIZE)
        if status != BlkStatus.IOERR:
            raise CaseFailed(f"status of a read {what} (sector {sector}, capacity {capacity})",
                             expected="VIRTIO_BLK_S_IOERR (1)", seen=status)
        status, _, _ = _one(
            vhost_session, BlkRequestType.OUT, sector=sector, out_data=b"\xee" * (8 * SECTOR_SIZE)
        )
        if status != BlkStatus.IOERR:
            raise CaseFailed(f"status of a write {what} (sector {sector}, capacity {capacity})",
                             expected="VIRTIO_BLK_S_IOERR (1)", seen=status)
    # "touches nothing": the last sectors in range still hold what was written there
    read = vhost_session.queues[0].blk.read(last, 8)
    vhost_session.submit(0)
    expect_status(wait_all(vhost_session, [read]), what="read of the last 8 sectors")


@case(
    "VU-BLK-5", title="GET_ID", family="blk-io", level=SHOULD,
    clause=f"{VIRTIO} 5.2.6 Block Device: Device Operation (VIRTIO_BLK_T_GET_ID)",
    quote="The device ID string is a NUL-padded ASCII string up to 20 bytes long.",
    requirement="VIRTIO_BLK_T_GET_ID fills at most 20 bytes and completes OK or UNSUPP.",
    ambiguity="the quoted sentence is a definition without a normative word; the SHOULD level is "
        "ours",
)
def test_get_id(vhost_session: Session) -> None:
    """VIRTIO_BLK_T_GET_ID fills at most 20 bytes and completes OK or UNSUPP.

    The request carries exactly the 20-byte buffer VIRTIO 1.3 5.2.6 gives GET_ID
    (``u8 id[20]``) as a driver (Linux virtio_blk, QEMU's guest) sends it: a larger buffer is
    not what the spec describes, and a device that checks the length (DPDK's vhost_blk
    answers IOERR to 64 bytes) is right to refuse it."""
    blk = vhost_session.queues[0].blk
    request = blk.get_id()
    vhost_session.submit(0)
    (done,) = wait_all(vhost_session, [request])
    if done.status not in (BlkStatus.OK, BlkStatus.UNSUPP):
        raise CaseNonStrict(f"GET_ID with the 20-byte buffer: status {done.status}, expected OK "
                            "or UNSUPP")


@case(
    "VU-BLK-6", title="DISCARD", family="blk-io", level=MUST,
    clause=f"{VIRTIO} 5.2.6 Block Device: Device Operation (discard)",
    quote="The final status byte is written by the device: either VIRTIO_BLK_S_OK for success, "
        "VIRTIO_BLK_S_IOERR for device or driver error or VIRTIO_BLK_S_UNSUPP for a request "
        "unsupported by device:",
    requirement="With DISCARD offered, a discard within max_discard_sectors completes OK; one "
        "beyond it is rejected.",
    ambiguity="the quoted sentence carries no MUST; VIRTIO 1.3 bounds only the driver "
        "(max_discard_seg segments) and says nothing of a device's answer to a segment beyond "
        "max_discard_sectors: rejecting it (IOERR or UNSUPP) is ours",
    requires=[BlkFeature.DISCARD],
)
def test_discard(vhost_session: Session) -> None:
    """A discard within max_discard_sectors completes OK; one beyond it is rejected."""
    config = BlkConfig.decode(vhost_session.negotiated.config)
    limit = config.max_discard_sectors or 0
    alignment = max(config.discard_sector_alignment or 1, 1)
    blk = vhost_session.queues[0].blk
    n = max(alignment, 8)
    if limit and n > limit:
        n = limit
    write_read_verify(vhost_session, 2048, pattern(4, n * SECTOR_SIZE))
    request = blk.discard([(2048, n)])
    vhost_session.submit(0)
    expect_status(wait_all(vhost_session, [request]), what="discard")
    # the range now reads old data or zeroes (the model accepts either)
    read = blk.read(2048, n)
    vhost_session.submit(0)
    expect_status(wait_all(vhost_session, [read]), what="read after discard")
    capacity = capacity_of(vhost_session) // SECTOR_SIZE
    if limit and limit + 1 < capacity:
        # raw: the model must not take this discard as done
        status, _, _ = _one(
            vhost_session,
            BlkRequestType.DISCARD,
            out_data=(0).to_bytes(8, "little")
            + (limit + alignment).to_bytes(4, "little")
            + bytes(4),
        )
        if status == BlkStatus.OK:
            raise CaseFailed(
                f"status of a discard of {limit + alignment} sectors (max_discard_sectors {limit})",
                expected="IOERR or UNSUPP",
                seen="OK",
            )


@case(
    "VU-BLK-7", title="WRITE_ZEROES", family="blk-io", level=MUST,
    clause=f"{VIRTIO} 5.2.6.2 Block Device: Device Operation: Device Requirements",
    quote="After a write zeroes command is completed, reads of the specified ranges of sectors "
        "MUST return zeroes.\n"
        "This is true independent of whether unmap was set or clear.",
    requirement="With WRITE_ZEROES offered, the range reads back as zeroes, with the unmap flag "
        "clear and with it set.",
    requires=[BlkFeature.WRITE_ZEROES],
)
def test_write_zeroes(vhost_session: Session) -> None:
    """With WRITE_ZEROES offered, the range reads back as zeroes (unmap clear, then set)."""
    blk = vhost_session.queues[0].blk
    for base, unmap in ((4096, False), (4160, True)):
        write_read_verify(vhost_session, base, pattern(5 + unmap, 16 * SECTOR_SIZE))
        request = blk.write_zeroes([(base + 4, 8)], unmap=unmap)
        vhost_session.submit(0)
        flag = "unmap set" if unmap else "unmap clear"
        expect_status(wait_all(vhost_session, [request]), what=f"write-zeroes ({flag})")
        read = blk.read(base, 16)
        vhost_session.submit(0)
        (done,) = wait_all(vhost_session, [read])
        expect_status([done], what=f"read after write-zeroes ({flag})")
        data = done.data or b""
        if data[4 * SECTOR_SIZE : 12 * SECTOR_SIZE] != bytes(8 * SECTOR_SIZE):
            raise CaseFailed(f"sectors {base + 4}..{base + 11} after WRITE_ZEROES ({flag})",
                             expected="zeroes", seen="other bytes")


@case(
    "VU-BLK-11", title="Unknown segment flags are UNSUPP", family="blk-io", level=MUST,
    clause=f"{VIRTIO} 5.2.6.2 Block Device: Device Operation: Device Requirements",
    quote="The device MUST set the status byte to VIRTIO_BLK_S_UNSUPP for discard, secure erase "
        "and write zeroes commands if any unknown flag is set.\n"
        "Furthermore, the device MUST set the status byte to VIRTIO_BLK_S_UNSUPP for discard "
        "commands if the unmap flag is set.",
    requirement="A DISCARD or WRITE_ZEROES segment with an unknown flag (bit 1), and a DISCARD "
        "with the unmap flag, complete with VIRTIO_BLK_S_UNSUPP; each command judged when its "
        "feature is negotiated.",
)
def test_unknown_segment_flags_are_unsupp(vhost_session: Session) -> None:
    """Discard with flags 2 or 1 (unmap), write zeroes with flags 2: UNSUPP each."""
    acked = vhost_session.negotiated.acked_features
    shapes = []
    if acked >> BlkFeature.DISCARD & 1:
        shapes += [(BlkRequestType.DISCARD, 2, "DISCARD, unknown flag bit 1"),
                   (BlkRequestType.DISCARD, 1, "DISCARD, unmap flag")]
    if acked >> BlkFeature.WRITE_ZEROES & 1:
        shapes.append((BlkRequestType.WRITE_ZEROES, 2, "WRITE_ZEROES, unknown flag bit 1"))
    if not shapes:
        raise Unsupported([BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES])
    requests: list[tuple[str, int, dict[str, object]]] = []
    for rtype, flags, what in shapes:
        segment = (6144).to_bytes(8, "little") + (8).to_bytes(4, "little") + flags.to_bytes(
            4, "little")
        requests.append((what, rtype, {"out_data": segment}))
    _each_unsupp(vhost_session,
                 "status of discard/write-zeroes segments with flags they may not carry", requests)


@case(
    "VU-BLK-8", title="Read-only device refuses writes", family="blk-io", level=MUST,
    clause=f"{VIRTIO} 5.2.6.2 Block Device: Device Operation: Device Requirements",
    quote="A device MUST set the status byte to VIRTIO_BLK_S_IOERR for a write request if the "
        "VIRTIO_BLK_F_RO feature if offered, and MUST NOT write any data.",
    requirement="A device that offers RO (the profile's read-only variant) completes writes with "
        "VIRTIO_BLK_S_IOERR and leaves the data unchanged.",
    ambiguity="the back-end under test does not offer RO by default: the case restarts it "
        "read-only where the profile knows how (reference --read-only, qemu-storage-daemon "
        "writable=off) and is unsupported elsewhere",
)
def test_read_only_device_refuses_writes(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """With RO offered, writes complete with IOERR and the data is unchanged."""
    restart_variant(vhost_target, read_only=True)
    session = make_session(vhost_target)
    if not session.negotiated.features >> BlkFeature.RO & 1:
        raise CaseFailed("GET_FEATURES of a read-only device", expected="VIRTIO_BLK_F_RO set",
                         seen=f"{session.negotiated.features:#x}")
    blk = session.queues[0].blk
    before = blk.read(16, 8)
    session.submit(0)
    (old,) = wait_all(session, [before])
    expect_status([old], what="read on a read-only device")
    status, _, _ = _one(session, BlkRequestType.OUT, sector=16, out_data=b"\x5a" * 4096)
    if status != BlkStatus.IOERR:
        raise CaseFailed("status of a write to a read-only device",
                         expected="VIRTIO_BLK_S_IOERR (1)", seen=status)
    after = blk.read(16, 8)
    session.submit(0)
    (new,) = wait_all(session, [after])
    if new.data != old.data:
        raise IoError("sectors 16..23 after a refused write", expected="unchanged", seen="changed")


@case(
    "VU-BLK-9", title="I/O on every queue", family="blk-io", level=MUST,
    clause=f"{RST} Multiple queue support",
    quote=quotes(RING_STARTED_ENABLED_QUOTE, MULTIQUEUE_GET_QUEUE_NUM_QUOTE),
    requirement="With several queues, requests on each queue complete on that queue.",
    requires=[ProtocolFeature.MQ, BlkFeature.MQ],
)
def test_io_on_every_queue(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, make_session: SessionFactory
) -> None:
    """With several queues, requests on each queue complete on that queue."""
    queues = 2
    if (vhost_capabilities.queue_num or 1) < queues:
        restart_variant(vhost_target, queues=queues)
    session = make_session(vhost_target, num_queues=queues)
    requests = []
    for index in range(queues):
        blk = session.queues[index].blk
        requests.append(blk.write(8192 + 64 * index, pattern(20 + index, 4096)))
        session.submit(index)
    expect_status(wait_all(session, requests), what="write")
    for index in range(queues):
        write_read_verify(session, 9000 + 64 * index, pattern(30 + index, 2048), queue=index)
        stray = session.queues[index].vq.violations
        if stray:
            raise CaseFailed(f"used ring of queue {index}", expected="only its own heads",
                             seen=str(stray[0]))
