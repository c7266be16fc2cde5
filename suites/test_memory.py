"""Guest memory cases: memory tables, memory slots, region offsets and removal.

Family: memory (VU-FD-2, VU-FD-3, VU-MEM-*; VU-FD-4 lives with the malformed cases). Clauses: vhost-user.rst (QEMU 11.1.3) "Memory region
description", "Front-end message types: SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG /
GET_MAX_MEM_SLOTS", "Back-end communication". Buffers are placed in chosen regions with
``io_at`` so that every region is read and written through its own translation.
"""

from __future__ import annotations

import time

from vhost_conformance.frontend.channel import BackendClosed
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.memory import GuestMemory, GuestRegion
from vhost_conformance.frontend.protocol import (
    FrontendRequest,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    SingleMemoryRegion,
)
from vhost_conformance.suites.clauses import ADD_MEM_REG_QUOTE, MEMORY_REGION_MAP_QUOTE, RST, quotes
from vhost_conformance.suites.drivers import (
    SessionFactory,
    do_io,
    io_at,
    kick_and_enable,
    partial_start,
    pattern,
    provoke_config_change,
    stop_now,
)
from vhost_conformance.suites.model import MUST, CaseFailed, Unsupported, case
from vhost_conformance.suites.target import BackendTarget

F = FrontendRequest
P = ProtocolFeature

#: Bytes at the end of each region that the cases use for their own buffers (the session's
#: allocator fills regions from their start).
TAIL = 64 << 10


def _tail(region: GuestRegion) -> int:
    return region.guest_phys_addr + region.memory_size - TAIL


def _round_trip(session: Session, write_in: GuestRegion, read_in: GuestRegion,
                sector: int, seed: int) -> None:
    """Write 4 KiB from a buffer in ``write_in``, read it into a buffer in ``read_in``."""
    data = pattern(seed, 4096)
    source, target = _tail(write_in), _tail(read_in) + 8192
    session.memory.write(source, data)
    session.memory.fill(target, 4096, 0)
    status = io_at(session, "write", sector, source, 4096, scratch_gpa=_tail(write_in) + 4096)
    if status != 0:
        raise CaseFailed(f"write from GPA {source:#x} (region {write_in.describe()}) status",
                         expected=0, seen=status)
    status = io_at(session, "read", sector, target, 4096, scratch_gpa=_tail(read_in) + 4096)
    if status != 0:
        raise CaseFailed(f"read into GPA {target:#x} (region {read_in.describe()}) status",
                         expected=0, seen=status)
    seen = session.memory.read(target, 4096)
    if seen != data:
        first = next(i for i in range(4096) if seen[i] != data[i])
        raise CaseFailed(
            f"data read into GPA {target:#x} (region {read_in.describe()}, mmap_offset "
            f"{read_in.mmap_offset:#x}) after a write from region {write_in.describe()}",
            expected=f"the 4096 bytes written (byte {first} = {data[first]:#x})",
            seen=f"byte {first} = {seen[first]:#x}")


def _all_regions(session: Session, base_sector: int) -> None:
    regions = session.memory.regions
    for i, region in enumerate(regions):
        _round_trip(session, region, regions[(i + 1) % len(regions)], base_sector + 8 * i, i)


@case(
    "VU-FD-2", title="SET_MEM_TABLE: one fd per region, up to 8", family="memory", level=MUST,
    clause=f"{RST} Front-end message types: SET_MEM_TABLE",
    quote=quotes(
        "Sets the memory map regions on the back-end so it can translate the vring addresses.",
        MEMORY_REGION_MAP_QUOTE,
    ),
    requirement="SET_MEM_TABLE with 1 to 8 regions and one fd each is accepted and the memory is "
        "used for I/O.",
)
def test_set_mem_table_up_to_8_regions(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """SET_MEM_TABLE with 1 to 8 regions and one fd each is accepted and used for I/O."""
    for count in (1, 8):
        memory = make_session.memory(8 << 20 if count == 1 else 16 << 20, regions=count)
        # SET_MEM_TABLE is what a front-end without CONFIGURE_MEM_SLOTS sends
        session = make_session(vhost_target, memory=memory,
                               strip_protocol=[P.CONFIGURE_MEM_SLOTS])
        _all_regions(session, 512 * count)
        session.stop()
        session.close()


@case(
    "VU-MEM-4", title="Regions with mmap_offset, GPA != HVA, holes", family="memory", level=MUST,
    clause=f"{RST} Memory region description",
    quote=quotes("User addresses map to the vhost memory region containing that user address.",
                 MEMORY_REGION_MAP_QUOTE),
    requirement="Data written at a GPA in a region with non-zero mmap_offset, a user address "
        "unlike its GPA and gaps between regions reads back right, with the regions sent by "
        "ADD_MEM_REG (where CONFIGURE_MEM_SLOTS is offered) and by SET_MEM_TABLE.",
)
def test_regions_with_offsets_and_holes(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """Regions with mmap_offset, a user address unlike the GPA, and gaps between them; sent
    the way QEMU 11.1.3 sends them to this back-end (ADD_MEM_REG per region with
    CONFIGURE_MEM_SLOTS) and by SET_MEM_TABLE (what QEMU sends without it)."""
    for strip in ([], [P.CONFIGURE_MEM_SLOTS]):
        memory = make_session.memory(16 << 20, regions=4, hole=3 << 20, mmap_offset=0x21000)
        session = make_session(vhost_target, memory=memory, strip_protocol=strip)
        for region in memory.regions:
            if region.userspace_addr == region.guest_phys_addr:
                raise AssertionError("the suite's memory layout must differ GPA from HVA")
        _all_regions(session, 4096)
        session.stop()
        session.close()


@case(
    "VU-MEM-7", title="ADD_MEM_REG as QEMU 11.1.3 sends it", family="memory", level=MUST,
    clause=f"{RST} Front-end message types: ADD_MEM_REG", quote=ADD_MEM_REG_QUOTE,
    requirement="With CONFIGURE_MEM_SLOTS, a start that sends ADD_MEM_REG (NEED_REPLY) instead of "
        "SET_MEM_TABLE works, also for a region with a non-zero mmap_offset.",
    requires=[ProtocolFeature.CONFIGURE_MEM_SLOTS],
)
def test_add_mem_reg_as_qemu_sends_it(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """A start with ADD_MEM_REG (NEED_REPLY) instead of SET_MEM_TABLE works: two regions, the
    second with a non-zero mmap_offset (QEMU's RAM above 4 GiB lies at an offset of the same
    memory backend's fd)."""
    memory = GuestMemory()
    make_session.memories.append(memory)
    memory.add_region(0, 8 << 20)
    memory.add_region(16 << 20, 4 << 20, mmap_offset=0x300000)
    session = make_session(vhost_target, memory=memory)
    do_io(session, 2)
    _all_regions(session, 2048)


@case(
    "VU-MEM-5", title="Memory slots beyond 8", family="memory", level=MUST,
    clause=f"{RST} Front-end message types: GET_MAX_MEM_SLOTS / ADD_MEM_REG",
    quote=ADD_MEM_REG_QUOTE,
    requirement="8 regions by SET_MEM_TABLE, a 9th by ADD_MEM_REG, then up to GET_MAX_MEM_SLOTS "
        "regions are accepted and usable.",
    requires=[ProtocolFeature.CONFIGURE_MEM_SLOTS],
)
def test_memory_slots_beyond_8(vhost_target: BackendTarget, make_session: SessionFactory) -> None:
    """8 regions by SET_MEM_TABLE, a 9th by ADD_MEM_REG, then up to GET_MAX_MEM_SLOTS."""
    memory = make_session.memory(16 << 20, regions=8)
    session = make_session(vhost_target, memory=memory, start=False)
    slots = session.negotiated.max_mem_slots or 0
    if slots < 9:
        raise CaseFailed("GET_MAX_MEM_SLOTS with CONFIGURE_MEM_SLOTS", expected=">= 9", seen=slots)
    session.set_features(session.driver_features())
    session.call(F.SET_MEM_TABLE, MemoryTable(tuple(memory.memory_regions())),
                 fds=memory.fds(), need_reply=session.reply_ack)
    session._mem_sent = True  # the session must not send the table again
    session.start()
    gpa = memory.highest_gpa + (1 << 20)
    added: list[GuestRegion] = []
    for _ in range(slots - 8):
        region = memory.add_region(gpa, 256 << 10)
        session.call(F.ADD_MEM_REG, SingleMemoryRegion(memory.memory_regions()[-1]),
                     fds=[region.fd], need_reply=session.reply_ack)
        added.append(region)
        gpa += 512 << 10
    first, ninth, last = memory.regions[0], added[0], added[-1]
    _round_trip(session, first, ninth, 100, 1)
    _round_trip(session, ninth, last, 200, 2)
    _round_trip(session, last, first, 300, 3)


@case(
    "VU-MEM-6", title="REM_MEM_REG of a region in use", family="memory", level=MUST,
    clause=f"{RST} Front-end message types: REM_MEM_REG",
    quote="The message payload contains a memory region descriptor struct, describing a region of "
        "guest memory which the back-end device must unmap.",
    requirement="Removing a region a queued descriptor still points into ends in an error status "
        "or a safe completion, never a crash.",
    requires=[ProtocolFeature.CONFIGURE_MEM_SLOTS],
)
def test_rem_mem_reg_of_a_region_in_use(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """A READ into region 1 queued on a stopped ring, REM_MEM_REG of region 1, then the ring
    restarted and kicked: the back-end lives (an error status, a completion, or a close with a
    working next connection)."""
    memory = make_session.memory(8 << 20, regions=2)
    session = make_session(vhost_target, memory=memory)
    do_io(session, 1)
    base = stop_now(session).bases[0]
    doomed = memory.regions[1]
    scratch = _tail(memory.regions[0])
    vq = session.queues[0].vq
    session.memory.write(scratch, (0).to_bytes(16, "little"))  # IN, sector 0
    session.memory.write(scratch + 16, b"\xff")
    vq.add([(scratch, 16)], [(_tail(doomed), 4096), (scratch + 16, 1)], object(),
           indirect=False)
    vq.publish()
    description = SingleMemoryRegion(memory.memory_regions()[1])
    session.call(F.REM_MEM_REG, description, need_reply=session.reply_ack)
    memory.remove_region(doomed.guest_phys_addr, close=False)
    closed = False
    try:
        session.start(vring_bases=[base])
        session.kick(0)
        time.sleep(0.2)
        session.call(F.GET_FEATURES)
    except BackendClosed:
        closed = True  # refusing the guest by dropping the connection is an error path too
    finally:
        doomed.close()
        session.mark_stopped()
    time.sleep(0.1)
    if not vhost_target.alive():
        raise CaseFailed("back-end after a request into a removed region",
                         expected="alive", seen=f"exited ({vhost_target.exit_status()})")
    if closed:
        # the process lives: a new connection must still work
        make_session(vhost_target).call(F.GET_FEATURES)
        return
    status = session.memory.read(scratch + 16, 1)[0]
    if status == 0:
        raise CaseFailed("status of a read into a removed region",
                         expected="IOERR, no completion, a stopped ring or a closed "
                         "connection", seen="OK")


@case(
    "VU-MEM-2", title="GPA_ADDRESSES: guest-physical ring addresses", family="memory", level=MUST,
    clause=f"{RST} Memory region description; Vring address description",
    quote="Otherwise, when VHOST_USER_PROTOCOL_F_GPA_ADDRESSES is negotiated, the ring addresses "
        "are guest physical addresses for frontend messages.\n"
        "When VHOST_USER_PROTOCOL_F_GPA_ADDRESSES is negotiated, this field contain guest "
        "physical address instead and must duplicate guest address field.",
    requirement="With GPA_ADDRESSES negotiated, regions whose user address duplicates the guest "
        "address and ring addresses given as GPAs work.",
    requires=[ProtocolFeature.GPA_ADDRESSES],
)
def test_gpa_addresses(vhost_target: BackendTarget, make_session: SessionFactory) -> None:
    """With GPA_ADDRESSES, user address = guest address and ring addresses as GPAs work."""
    memory = GuestMemory()
    make_session.memories.append(memory)
    memory.add_region(1 << 30, 8 << 20, userspace_addr=1 << 30)
    session = make_session(vhost_target, memory=memory, start=False)
    if not session.has_protocol(P.GPA_ADDRESSES):
        raise Unsupported(P.GPA_ADDRESSES)
    partial_start(session)
    kick_and_enable(session)
    do_io(session, 2)


@case(
    "VU-FD-3", title="Back-end channel fds only with BACKEND_SEND_FD", family="memory", level=MUST,
    clause=f"{RST} Back-end communication",
    quote="If VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD protocol feature is negotiated, back-end can "
        "send file descriptors (at most 8 descriptors in each message) to front-end via ancillary "
        "data using this fd communication channel.",
    requirement="Messages on the back-end channel (a disk resize provokes "
        "BACKEND_CONFIG_CHANGE_MSG) carry at most 8 fds, and fds only if BACKEND_SEND_FD was "
        "negotiated.",
    requires=[ProtocolFeature.BACKEND_REQ],
)
def test_backend_channel_fds(vhost_target: BackendTarget, vhost_session: Session) -> None:
    """Back-end channel messages carry at most 8 fds, and only with BACKEND_SEND_FD; a disk
    resize (the profile's ``resize_signal``) makes the back-end send one
    (BACKEND_CONFIG_CHANGE_MSG), else the case has nothing to judge and ends unsupported."""
    do_io(vhost_session, 4)
    channel = vhost_session.backend_channel
    if channel is None:
        raise Unsupported(P.BACKEND_REQ, "no back-end channel was set up")
    why = provoke_config_change(vhost_target) if vhost_session.has_protocol(P.CONFIG) else (
        "CONFIG (protocol bit 9) not negotiated: no BACKEND_CONFIG_CHANGE_MSG")
    deadline = time.monotonic() + 2.0
    while why is None and not channel.messages() and time.monotonic() < deadline:
        time.sleep(0.01)
    stop_now(vhost_session)
    send_fd = vhost_session.has_protocol(P.BACKEND_SEND_FD)
    if not channel.messages():
        raise Unsupported("a back-end message to judge",
                          why or "a disk resize brought no BACKEND_CONFIG_CHANGE_MSG in 2 s")
    for message in channel.messages():
        if len(message.fds) > 8 or (message.fds and not send_fd):
            raise CaseFailed(f"back-end channel message {message.request} fds",
                             expected="<= 8" if send_fd else "none (BACKEND_SEND_FD not "
                             "negotiated)", seen=len(message.fds))


@case(
    "VU-MEM-8", title="REM_MEM_REG ignores the mmap offset", family="memory", level=MUST,
    clause=f"{RST} Front-end message types: REM_MEM_REG",
    quote="The memory region to be removed is identified by its guest address, user address and "
        "size. The mmap offset is ignored.",
    requirement="REM_MEM_REG naming a region by its guest address, user address and size, with an "
        "mmap_offset unlike the one ADD_MEM_REG gave, removes that region: it is acked 0 (with "
        "REPLY_ACK), a new region at the same addresses is accepted, and I/O uses the new one.",
    requires=[ProtocolFeature.CONFIGURE_MEM_SLOTS],
)
def test_rem_mem_reg_ignores_mmap_offset(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """REM_MEM_REG with another mmap_offset removes the region; its replacement is used."""
    memory = make_session.memory(8 << 20, regions=2, mmap_offset=0x21000)
    session = make_session(vhost_target, memory=memory)
    _all_regions(session, 6144)
    old = memory.regions[1]
    gpa, size, uaddr = old.guest_phys_addr, old.memory_size, old.userspace_addr
    other = SingleMemoryRegion(MemoryRegion(gpa, size, uaddr, old.mmap_offset + 0x7000))
    session.call(F.REM_MEM_REG, other, need_reply=session.reply_ack)
    memory.remove_region(gpa, close=False)
    try:
        # the old region's memory now holds other bytes: a back-end still using it reads them
        old.data[:] = b"\x5a" * size
        new = memory.add_region(gpa, size, mmap_offset=0x5000, userspace_addr=uaddr)
        # a back-end that kept the old region sees an overlap here (refused, or two regions)
        session.call(F.ADD_MEM_REG, SingleMemoryRegion(memory.memory_regions()[1]),
                     fds=[new.fd], need_reply=session.reply_ack)
        if not session.reply_ack:
            session.call(F.GET_FEATURES)  # a barrier: ADD_MEM_REG has been handled
        _round_trip(session, memory.regions[0], new, 6200, 7)
        _round_trip(session, new, memory.regions[0], 6300, 8)
    finally:
        old.close()
