"""Postcopy migration on the destination: vhost-user.rst (QEMU 11.1.3) "Migration" (postcopy),
POSTCOPY_ADVISE, POSTCOPY_LISTEN, POSTCOPY_END, SET_MEM_TABLE in postcopy mode.

Family: migration (VU-POSTCOPY-*), with PAGEFAULT (protocol bit 8) negotiated. The memory goes
by SET_MEM_TABLE, the front-end mode without CONFIGURE_MEM_SLOTS (with the bit QEMU 11.1.3
sends postcopy ADD_MEM_REGs instead: hw/virtio/vhost-user.c vhost_user_set_mem_table_postcopy).
QEMU's order on the destination is followed: ADVISE while still in precopy, LISTEN at the
switch to postcopy, then the device start with SET_MEM_TABLE, whose reply (the back-end's bases
of the regions) QEMU acks with a SET_MEM_TABLE carrying u64 0 (same function). What the
back-end did with the userfaultfd is read from the kernel: ``/proc/PID/smaps`` marks a mapping
registered for missing-page faults with VmFlags ``um``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.protocol import (
    U64,
    VERSION,
    FrontendRequest,
    MemoryTable,
    Message,
    ProtocolFeature,
)
from vhost_conformance.suites.clauses import RST, quotes
from vhost_conformance.suites.drivers import SessionFactory
from vhost_conformance.suites.drivers.postcopy import mappings_of, next_fault, wake
from vhost_conformance.suites.drivers.procfs import process_tree
from vhost_conformance.suites.model import MUST, CaseFailed, Unsupported, case
from vhost_conformance.suites.target import BackendTarget

F = FrontendRequest
P = ProtocolFeature

ADVISE_QUOTE = (
    "When VHOST_USER_PROTOCOL_F_PAGEFAULT is supported, the front-end advises back-end that a "
    "migration with postcopy enabled is underway, the back-end must open a userfaultfd for later "
    "use."
)


def _session(target: BackendTarget, make_session: SessionFactory) -> Session:
    """An initialised, not started session with PAGEFAULT, without CONFIGURE_MEM_SLOTS."""
    session = make_session(target, start=False, strip_protocol=[P.CONFIGURE_MEM_SLOTS])
    if not session.has_protocol(P.PAGEFAULT):
        raise Unsupported(P.PAGEFAULT)
    return session


def _advise(session: Session) -> int:
    """POSTCOPY_ADVISE: the fd of the reply (the caller closes it); fails unless it is one
    userfaultfd."""
    reply = session.call(F.POSTCOPY_ADVISE)
    assert reply is not None  # a request with a reply of its own
    fds = list(reply.fds)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise CaseFailed("fds with the POSTCOPY_ADVISE reply", expected="1 (the userfaultfd)",
                         seen=len(fds))
    try:
        kind = os.readlink(f"/proc/self/fd/{fds[0]}")
    except OSError as exc:
        kind = f"unreadable ({exc.strerror})"
    if kind != "anon_inode:[userfaultfd]":
        os.close(fds[0])
        raise CaseFailed("the fd of the POSTCOPY_ADVISE reply",
                         expected="a userfaultfd (anon_inode:[userfaultfd])", seen=kind)
    return fds[0]


@contextlib.contextmanager
def _listening(session: Session) -> Iterator[tuple[int, list[int], list[int]]]:
    """ADVISE, LISTEN, SET_FEATURES, the postcopy SET_MEM_TABLE and its ack: yields the
    userfaultfd, the bases the back-end replied and the faults it took right after the ack
    (served); closes the userfaultfd at the end."""
    uffd = _advise(session)
    try:
        session.call(F.POSTCOPY_LISTEN, need_reply=session.reply_ack)
        session.set_features(session.driver_features())
        memory = session.memory
        regions = memory.memory_regions()
        table = MemoryTable(tuple(regions))
        # "NEED_REPLY_MASK is not set in this case": the reply is the table itself
        session.channel.send(F.SET_MEM_TABLE, table, fds=memory.fds())
        reply = session.channel.recv(session.timeout, awaiting="SET_MEM_TABLE (postcopy)")
        for fd in reply.fds:
            os.close(fd)
        if reply.request != F.SET_MEM_TABLE:
            raise CaseFailed("reply to SET_MEM_TABLE after POSTCOPY_LISTEN",
                             expected="SET_MEM_TABLE with the bases", seen=reply.request)
        try:
            bases = MemoryTable.decode(reply.payload).regions
        except ValueError as exc:
            raise CaseFailed("SET_MEM_TABLE reply after POSTCOPY_LISTEN",
                             expected="a memory table", seen=f"undecodable: {exc}") from None
        seen = [(r.guest_phys_addr, r.memory_size) for r in bases]
        wanted = [(r.guest_phys_addr, r.memory_size) for r in regions]
        if seen != wanted or not all(r.userspace_addr for r in bases):
            raise CaseFailed("regions of the postcopy SET_MEM_TABLE reply",
                             expected=f"{wanted} with the back-end's bases",
                             seen=[(r.guest_phys_addr, r.memory_size, r.userspace_addr)
                                   for r in bases])
        # QEMU's ack of the bases (vhost_user_set_mem_table_postcopy: u64 0 = OK)
        session.channel.send_message(Message(int(F.SET_MEM_TABLE), VERSION, U64(0).encode()))
        faults = _serve_faults(session, uffd, [r.userspace_addr for r in bases])
        session.call(F.GET_FEATURES)  # a barrier: the ack has been handled
        yield uffd, [r.userspace_addr for r in bases], faults
    finally:
        with contextlib.suppress(OSError):
            os.close(uffd)


def _memfd_name(gpa: int) -> str:
    """The name of the suite's memfd of the region at ``gpa`` (frontend.memory: one memfd
    per region, ``guest-ram-<gpa>``), as smaps shows it."""
    return f"/memfd:guest-ram-{gpa:#x} "


def _serve_faults(session: Session, uffd: int, bases: list[int]) -> list[int]:
    """Faults the back-end takes within 0.3 s of the ack, each served as QEMU serves a shared
    page (the page written on our side, then UFFDIO_WAKE): their addresses."""
    faults: list[int] = []
    while (address := next_fault(uffd, 0.3)) is not None and len(faults) < 64:
        faults.append(address)
        for region, base in zip(session.memory.regions, bases, strict=False):
            if base <= address < base + region.mmap_offset + region.memory_size:
                offset = max(0, address - base - region.mmap_offset) & ~0xFFF
                session.memory.write(region.guest_phys_addr + offset, bytes(4096))
        wake(uffd, address)
    return faults


def _pids(target: BackendTarget) -> list[int]:
    pid = getattr(target, "pid", None)
    if not isinstance(pid, int):
        raise Unsupported("the back-end's process id", "the suite does not run this back-end")
    return process_tree(pid)


@case(
    "VU-POSTCOPY-1", title="POSTCOPY_ADVISE: a userfaultfd", family="migration", level=MUST,
    clause=f"{RST} Front-end message types: POSTCOPY_ADVISE", quote=ADVISE_QUOTE,
    requirement="With PAGEFAULT negotiated, POSTCOPY_ADVISE is answered with exactly one fd, a "
        "userfaultfd.",
    requires=[ProtocolFeature.PAGEFAULT],
)
def test_postcopy_advise(vhost_target: BackendTarget, make_session: SessionFactory) -> None:
    """POSTCOPY_ADVISE replies with one fd that is a userfaultfd."""
    os.close(_advise(_session(vhost_target, make_session)))


@case(
    "VU-POSTCOPY-2", title="POSTCOPY_LISTEN: memory registered with the userfaultfd, not touched",
    family="migration", level=MUST,
    clause=f"{RST} Front-end message types: POSTCOPY_LISTEN; SET_MEM_TABLE; Migration",
    quote=quotes(
        "The back-end must ensure that shared memory is registered with userfaultfd to "
        "cause faulting of non-present pages.",
        "When VHOST_USER_POSTCOPY_LISTEN has been received, SET_MEM_TABLE replies with the "
        "bases of the memory mapped regions to the front-end.",
        "The back-end must have mmap\u2019d the regions but not yet accessed them and should "
        "not yet generate a userfault event.",
        "In postcopy migration the back-end is started before all the memory has been "
        "received from the source host, and care must be taken to avoid accessing pages "
        "that have yet to be received.",
    ),
    requirement="After POSTCOPY_ADVISE and POSTCOPY_LISTEN, SET_MEM_TABLE is answered with the "
        "regions and the back-end's bases; once acked, each region's mapping in the back-end is "
        "registered for missing-page faults (smaps VmFlags um), and no fault event is pending on "
        "the userfaultfd (the memory was not touched).",
    requires=[ProtocolFeature.PAGEFAULT], needs=["command"],
)
def test_postcopy_listen_registers(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """The postcopy SET_MEM_TABLE: bases replied, regions registered, nothing touched."""
    pids = _pids(vhost_target)
    session = _session(vhost_target, make_session)
    with _listening(session) as (_uffd, bases, faults):
        if faults:
            # "The back-end must have mmap'd the regions but not yet accessed them": a
            # userfault event is an access to a page not yet received
            raise CaseFailed("userfault events right after the postcopy SET_MEM_TABLE ack",
                             expected="none (the regions mapped, not yet accessed)",
                             seen=f"{len(faults)}, the first at {faults[0]:#x}")
        for region in session.memory.regions:
            name = _memfd_name(region.guest_phys_addr)
            maps = mappings_of(pids, name)
            unregistered = [start for start, flags in maps if "um" not in flags.split()]
            if not maps or unregistered:
                raise CaseFailed(
                    f"the back-end's mappings of the region at GPA {region.guest_phys_addr:#x} "
                    f"(memfd {name}) after POSTCOPY_LISTEN and the SET_MEM_TABLE ack",
                    expected="registered with the userfaultfd (smaps VmFlags um)",
                    seen=f"{len(unregistered)} of {len(maps)} not registered" if maps
                    else "not mapped")
        mapped = {start for region in session.memory.regions
                  for start, _ in mappings_of(pids, _memfd_name(region.guest_phys_addr))}
        wrong = [base for base in bases if base not in mapped]
        if wrong:
            ours = {r.userspace_addr for r in session.memory.regions}
            raise CaseFailed(
                "bases in the postcopy SET_MEM_TABLE reply",
                expected=f"where the back-end mapped the regions ({sorted(map(hex, mapped))})",
                seen=f"{[hex(b) for b in bases]}"
                + (" (the front-end's own userspace_addr echoed)" if set(wrong) <= ours else ""),
            )


@case(
    "VU-POSTCOPY-3", title="POSTCOPY_END: 0, the userfaultfd disabled", family="migration",
    level=MUST, clause=f"{RST} Front-end message types: POSTCOPY_END",
    quote=quotes(
        "The front-end advises that postcopy migration has now completed.  The back-end must "
        "disable the userfaultfd.",
        "The value returned is an error indication; 0 is success.",
    ),
    requirement="POSTCOPY_END after POSTCOPY_LISTEN is answered with u64 0, and once the "
        "front-end closed its copy of the userfaultfd no region of the back-end is registered any "
        "more.",
    requires=[ProtocolFeature.PAGEFAULT], needs=["command"],
)
def test_postcopy_end(vhost_target: BackendTarget, make_session: SessionFactory) -> None:
    """POSTCOPY_END: reply 0, then the regions are no longer registered."""
    pids = _pids(vhost_target)
    session = _session(vhost_target, make_session)
    with _listening(session):
        reply = session.call(F.POSTCOPY_END)
        assert reply is not None
        value = U64.decode(reply.payload).value
        if value != 0:
            raise CaseFailed("POSTCOPY_END reply", expected=0, seen=value)
    # our copy is closed now: a back-end that disabled its own leaves no registration
    deadline = time.monotonic() + 1.0
    names = [_memfd_name(r.guest_phys_addr) for r in session.memory.regions]
    while True:
        still = [start for name in names for start, flags in mappings_of(pids, name)
                 if "um" in flags.split()]
        if not still or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if still:
        raise CaseFailed("the back-end's mappings after POSTCOPY_END",
                         expected="no longer registered with a userfaultfd",
                         seen=f"{len(still)} still with VmFlags um (first at {still[0]:#x})")
