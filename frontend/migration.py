"""Source -> destination orchestration as QEMU 11.1.3 does it, back-end restarts, and the
downtime clock.

Live migration (QEMU-TRACES (e); SPEC-DIGEST 6.3):

- the destination is realized first: a second connection, to a second back-end on the same
  disk, gets the init sequence with GET_CONFIG (:meth:`Session.connect`), before the source
  stops (QEMU starts the destination with ``-incoming`` long before switch-over);
- switch-over, source: SET_VRING_ENABLE 0 per queue, GET_VRING_BASE per queue (the back-end
  drains, or with protocol bit 20 may suspend and record the requests in the region),
  SET_STATUS 0; nothing more;
- transfer: the region's bytes become the ``vhost-user-blk/inflight`` subsection (only when
  bit 20 was negotiated: its ``needed``), guest RAM is copied into fresh memfds;
- destination start: with the subsection, SET_INFLIGHT_FD on a new memfd loaded from the
  decoded bytes and no GET_INFLIGHT_FD; without it (``inflight-migration=off``)
  GET_INFLIGHT_FD + SET_INFLIGHT_FD on a fresh region; SET_VRING_BASE = the source's
  GET_VRING_BASE reply; kick.

Guest RAM moves *in place*: each region of the :class:`GuestMemory` gets a fresh memfd holding
a copy of its bytes, mapped over the old mapping at the same address (``MAP_FIXED``), so the
driver's rings, free lists, tags and buffers carry over unchanged while the destination
back-end receives fds the source never saw. The source's memfds stay open in a
:class:`SourceRam` for the suspended-state check (the source back-end still maps them).

Reconnect and crash (QEMU-TRACES (d)): :func:`reconnect` reads the region the front-end holds
right after the back-end died (the oracle of what was in flight), harvests what the dead
back-end left in the used rings, then :meth:`Session.reattach`.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vhost_conformance.frontend.accounting import (
    AccountingFinding,
    Ledger,
    SuspendedState,
    landmarks_of,
)
from vhost_conformance.frontend.channel import Channel
from vhost_conformance.frontend.device import InflightHandle, Queue, Session
from vhost_conformance.frontend.errors import MisuseError
from vhost_conformance.frontend.inflight import InflightLayoutError, InflightRegion, parse_region
from vhost_conformance.frontend.memory import GuestMemory, MemorySnapshot
from vhost_conformance.frontend.protocol import (
    ProtocolFeature,
)
from vhost_conformance.frontend.vmstate import (
    InflightState,
    decode_inflight_subsection,
    encode_inflight_subsection,
)

__all__ = [
    "Downtime",
    "MigrationError",
    "MigrationResult",
    "ReconnectResult",
    "SourceRam",
    "StopResult",
    "harvest_all",
    "migrate",
    "move_guest_ram",
    "prepare_destination",
    "read_oracle",
    "reconnect",
    "stop_like_qemu",
]

_MAP_FIXED = 0x10  # <sys/mman.h>, same value on x86-64 and arm64
_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
_F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)
_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]


class MigrationError(MisuseError):
    """The orchestration itself could not proceed (misuse, or the host refused a mapping)."""


# ----------------------------------------------------------------------------------------------
# Stop
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StopResult:
    """What the stop sequence saw: GET_VRING_BASE replies and their round trips."""

    vring_bases: list[int]
    get_vring_base_seconds: list[float]  # each GET_VRING_BASE round trip
    seconds: float  # first SET_VRING_ENABLE 0 to the last message of the stop
    suspend_allowed: bool  # bit 20 negotiated: the back-end may leave requests in flight
    replied_at: float  # time.monotonic() of the last GET_VRING_BASE reply

    @property
    def stop_latency(self) -> float:
        """Sum of the GET_VRING_BASE round trips (what the guest waits for at switch-over)."""
        return sum(self.get_vring_base_seconds)


def stop_like_qemu(session: Session, *, on_last_reply: Callable[[], None] | None = None,
                   before_get_vring_base: Callable[[], None] | None = None) -> StopResult:
    """vhost_user_blk_stop (SPEC-DIGEST 4.4; QEMU-TRACES (c), (e)): SET_VRING_ENABLE 0 for every
    queue, GET_VRING_BASE for every queue, SET_STATUS 0 when STATUS was negotiated.
    ``on_last_reply`` runs right after the last GET_VRING_BASE reply (the suspended-state
    snapshot belongs there), before SET_STATUS; ``before_get_vring_base`` right before the
    first GET_VRING_BASE (after the SET_VRING_ENABLE 0 replies)."""
    if not session.started:
        raise MigrationError("stop_like_qemu() on a session that is not started")
    t0 = time.monotonic()
    # qemu-next (a proposal): the switch-over with inflight-migration on sends message 45
    # where bit 23 was agreed (vhost-user-blk c2f4030c42da), and only that may suspend
    skip = session.inflight_migration and session.skip_drain_agreed
    rtts: list[float] = []
    replied: list[float] = []

    def last_reply() -> None:
        replied.append(time.monotonic())
        if on_last_reply is not None:
            on_last_reply()

    hooks: dict[str, Callable[[], object]] = {"GET_VRING_BASE": last_reply}
    if before_get_vring_base is not None:
        hooks["SET_VRING_ENABLE 0"] = before_get_vring_base
    bases = session.run_stop(begin="SET_VRING_ENABLE 0", skip_drain=skip, round_trips=rtts,
                             after=hooks)
    replied_at = replied[0]
    session.mark_stopped()
    suspend_allowed = (skip if session.profile.skip_drain
                       else session.has_protocol(ProtocolFeature.GET_VRING_BASE_INFLIGHT))
    return StopResult(bases, rtts, time.monotonic() - t0, suspend_allowed, replied_at)


# ----------------------------------------------------------------------------------------------
# Guest RAM
# ----------------------------------------------------------------------------------------------


@dataclass
class SourceRam:
    """The source's guest RAM after :func:`move_guest_ram`: its memfds, mapped read-only."""

    regions: list[tuple[int, int, int, int, mmap.mmap]]  # (gpa, size, mmap_offset, fd, map)

    def snapshot(self) -> MemorySnapshot:
        """The source RAM's bytes now, in :class:`MemorySnapshot` form."""
        return MemorySnapshot(tuple((gpa, bytes(m[off : off + size]))
                                    for gpa, size, off, _, m in self.regions))

    def close(self) -> None:
        """Unmap and close the source's memfds (idempotent)."""
        for _, _, _, fd, m in self.regions:
            if not m.closed:
                m.close()
            with contextlib.suppress(OSError):
                os.close(fd)
        self.regions = []


def move_guest_ram(memory: GuestMemory) -> SourceRam:
    """Copy every region into a fresh sealed memfd and map it over the old mapping at the same
    address, so that every view, ring and driver on ``memory`` now uses the copy. The old
    memfds (what the source back-end maps) are returned in a :class:`SourceRam`."""
    moved: list[tuple[int, int, int, int, mmap.mmap]] = []
    try:
        for region in memory.regions:
            total = region.mmap_offset + region.memory_size
            new_fd = os.memfd_create(f"guest-ram-dst-{region.guest_phys_addr:#x}",
                                     os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.ftruncate(new_fd, total)
                view = memoryview(region.mm)
                try:
                    written = 0
                    while written < total:
                        written += os.pwrite(new_fd, view[written:], written)
                finally:
                    view.release()
                fcntl.fcntl(new_fd, _F_ADD_SEALS, _F_SEAL_SHRINK | _F_SEAL_GROW)
                anchor = ctypes.c_char.from_buffer(region.mm)
                address = ctypes.addressof(anchor)
                del anchor
                got = _libc.mmap(address, total, mmap.PROT_READ | mmap.PROT_WRITE,
                                 mmap.MAP_SHARED | _MAP_FIXED, new_fd, 0)
                if got != address:
                    err = ctypes.get_errno()
                    raise MigrationError(f"MAP_FIXED of the copy of region "
                                         f"{region.describe()} failed: {os.strerror(err)}")
            except BaseException:
                os.close(new_fd)
                raise
            old_fd, region.fd = region.fd, new_fd
            source_map = mmap.mmap(old_fd, total, mmap.MAP_SHARED, mmap.PROT_READ)
            moved.append((region.guest_phys_addr, region.memory_size, region.mmap_offset,
                          old_fd, source_map))
    except BaseException:
        SourceRam(moved).close()
        raise
    return SourceRam(moved)


# ----------------------------------------------------------------------------------------------
# Migration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Downtime:
    """The downtime clock: source stop, transfer (region, VMState, RAM), destination start."""

    stop: float
    transfer: float
    start: float

    @property
    def total(self) -> float:
        """stop + transfer + start."""
        return self.stop + self.transfer + self.start

    def __str__(self) -> str:
        return (f"downtime {self.total * 1e3:.1f} ms (stop {self.stop * 1e3:.1f}, transfer "
                f"{self.transfer * 1e3:.1f}, start {self.start * 1e3:.1f})")


@dataclass
class MigrationResult:
    """Everything a migration produced; :meth:`finish` runs the suspended-state check and
    releases the source."""

    source: Session
    destination: Session
    stop: StopResult
    downtime: Downtime
    vmstate: bytes | None  # the vhost-user-blk/inflight subsection (None: not needed)
    inflight_state: InflightState | None
    region_at_stop: InflightRegion | None  # the source region parsed right after the stop
    region_findings: list[AccountingFinding]
    source_ram: SourceRam
    suspended: SuspendedState
    completed_on_source_after_stop: int  # used entries harvested from the copied RAM
    suspended_findings: list[AccountingFinding] = field(default_factory=list)

    def finish(self, wait: float) -> list[AccountingFinding]:
        """Wait ``wait`` seconds (at least the back-end's I/O latency) with the source back-end
        still connected, then compare its RAM with the snapshot taken at the last
        GET_VRING_BASE reply; close the source connection and its RAM. Idempotent."""
        if self.source_ram.regions:
            time.sleep(max(0.0, wait))
            self.suspended_findings = self.suspended.compare(self.source_ram.snapshot())
            self.source.close()
            self.source_ram.close()
        return self.suspended_findings


def harvest_all(session: Session, ledger: Ledger | None) -> int:
    """Reap every queue once and record the completions; returns how many completed."""
    if ledger is None:
        return sum(len(q.blk.complete(q.vq.reap())) for q in session.queues)
    return sum(len(ledger.harvest(q.vq, q.blk.complete)) for q in session.queues)


def _check_region_at_stop(session: Session, region: InflightRegion,
                          bases: list[int]) -> list[AccountingFinding]:
    """After a stop with bit 20 and after harvesting the used rings: the region marks exactly
    the requests still outstanding (TEST-IDEAS 9; vhost-user.rst "Inflight I/O tracking")."""
    out: list[AccountingFinding] = []
    for q, qr in zip(session.queues, region.queues, strict=True):
        marked = set(qr.inflight_heads()) if qr.version else set()
        outstanding = set(q.vq.in_flight)
        if not session.packed:
            not_popped = (getattr(q.vq, "published_idx", bases[q.index]) - bases[q.index]) & 0xFFFF
            if not_popped:
                # some outstanding heads were never popped: only marked-but-not-outstanding is
                # decidable here
                outstanding_must: set[int] = set()
            else:
                outstanding_must = outstanding
        else:
            outstanding_must = outstanding
        for head in sorted(outstanding_must - marked):
            token = q.vq.in_flight[head]
            out.append(AccountingFinding(
                "region", "popped, not completed, and not marked in flight in the region after "
                "a GET_VRING_BASE that did not drain", where=f"desc[{head}].inflight = 0",
                tag=getattr(token, "tag", None), queue=q.index, head=head))
        for head in sorted(marked - outstanding):
            out.append(AccountingFinding(
                "region", "marked in flight in the region but not outstanding (its request "
                "completed, or it was never made available)", where=f"desc[{head}].inflight = 1",
                queue=q.index, head=head))
        # counters follow the pop order, which is the avail order (= tag order of one driver):
        # resubmission goes by increasing counter (vhost-user.rst "Inflight I/O tracking")
        by_counter = [h for h in (qr.inflight_heads() if qr.version else []) if h in outstanding]
        by_avail = sorted(by_counter, key=lambda h: getattr(q.vq.in_flight[h], "tag", 0))
        if by_counter != by_avail:
            out.append(AccountingFinding(
                "region", f"in-flight heads by counter {by_counter[:16]} do not follow the avail "
                f"order {by_avail[:16]}", where="desc[].counter", queue=q.index))
    return out


def prepare_destination(source: Session, channel: Channel) -> Session:
    """The destination device, realized as QEMU does before switch-over (``-incoming``): a
    session on ``channel`` with the source's options that takes over the source's queues (the
    same virtqueue and driver objects, new eventfds), connected (init sequence + GET_CONFIG),
    not started."""
    destination = Session(
        channel, source.memory, profile=source.profile.name,
        num_queues=source.num_queues, queue_size=source.queue_size, packed=source.packed,
        event_idx=source.event_idx, indirect=source.indirect,
        inflight_migration=source.inflight_migration, model=source.model,
        timeout=source.timeout)
    destination.queues = [
        Queue(q.index, q.vq, os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
              os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
              os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), q.blk)
        for q in source.queues]
    destination.connect(realize=True)
    return destination


def migrate(
    source: Session,
    destination: Session | Channel,
    *,
    ledger: Ledger | None = None,
    destination_hop: str = "destination",
) -> MigrationResult:
    """Migrate a started ``source`` session to ``destination`` (a session from
    :func:`prepare_destination`, or a channel to prepare one on now; see the module
    docstring). The destination is returned started, on the source's queues. The source
    session stays connected until :meth:`MigrationResult.finish`."""
    if not source.started:
        raise MigrationError("migrate() needs a started source session")
    memory = source.memory
    if isinstance(destination, Channel):
        destination = prepare_destination(source, destination)
    if destination.memory is not memory or destination.started:
        raise MigrationError("the destination must be an unstarted session on the source's "
                             "guest memory (prepare_destination)")

    landmarks = landmarks_of(memory, [(q.vq, list(q.blk.outstanding.values()))
                                      for q in source.queues])
    holder: list[SuspendedState] = []

    def snapshot_at_reply() -> None:
        holder.append(SuspendedState.begin(memory, landmarks,
                                           call_fds=[q.call_fd for q in source.queues]))

    # -- switch-over: source stop
    stop = stop_like_qemu(source, on_last_reply=snapshot_at_reply)
    t_transfer = time.monotonic()
    # -- transfer: in-flight subsection (needed iff bit 20: SPEC-DIGEST 6.3), then RAM
    vmstate: bytes | None = None
    state: InflightState | None = None
    region_at_stop: InflightRegion | None = None
    region_bytes = source.inflight.read() if source.inflight is not None else None
    if region_bytes is not None:
        with contextlib.suppress(InflightLayoutError):
            region_at_stop = parse_region(region_bytes, num_queues=source.num_queues,
                                          queue_size=source.queue_size, packed=source.packed)
    handle: InflightHandle | None = None
    if stop.suspend_allowed and region_bytes is not None:
        vmstate = encode_inflight_subsection(region_bytes, queue_size=source.queue_size)
        state, _ = decode_inflight_subsection(vmstate)
        handle = InflightHandle.from_bytes(state.buffer, source.num_queues, state.queue_size)
    source_ram = move_guest_ram(memory)
    # used entries the source wrote before the reply travel in RAM; harvest them as source's
    n_source = harvest_all(destination, ledger)
    region_findings: list[AccountingFinding] = []
    if stop.suspend_allowed and region_at_stop is not None:
        region_findings = _check_region_at_stop(destination, region_at_stop, stop.vring_bases)
    transfer = time.monotonic() - t_transfer
    # -- destination start
    if ledger is not None:
        ledger.enter(destination_hop)
    t_start = time.monotonic()
    destination.start(vring_bases=stop.vring_bases, inflight=handle)
    start = time.monotonic() - t_start
    return MigrationResult(
        source, destination, stop, Downtime(stop.seconds, transfer, start), vmstate, state,
        region_at_stop, region_findings, source_ram, holder[0], n_source)


# ----------------------------------------------------------------------------------------------
# Reconnect / crash
# ----------------------------------------------------------------------------------------------


def read_oracle(session: Session) -> InflightRegion | None:
    """The region the front-end holds, parsed now (right after the back-end died it says what
    was in flight); None without a region or when it does not parse."""
    if session.inflight is None:
        return None
    try:
        return parse_region(session.inflight.read(), num_queues=session.num_queues,
                            queue_size=session.queue_size, packed=session.packed)
    except InflightLayoutError:
        return None


@dataclass(frozen=True, slots=True)
class ReconnectResult:
    """What a reconnect saw: the oracle region, used entries the dead back-end left, the
    SET_VRING_BASE values sent and the time the set-up took."""

    oracle: InflightRegion | None
    oracle_heads: list[list[int]]  # per queue, heads marked in flight after the death
    harvested_before: int
    vring_bases: list[int]
    seconds: float


def reconnect(session: Session, channel: Channel, *, ledger: Ledger | None = None,
              hop: str = "restart") -> ReconnectResult:
    """QEMU's reconnect (QEMU-TRACES (d)) with accounting: read the held region (the oracle),
    harvest what the dead back-end completed, then :meth:`Session.reattach` on ``channel``
    (SET_INFLIGHT_FD with the kept region, SET_VRING_BASE = used idx). Records go to ``hop``."""
    oracle = read_oracle(session)
    harvested = harvest_all(session, ledger)
    heads = [list(qr.inflight_heads()) if qr.version else [] for qr in oracle.queues] \
        if oracle is not None else [[] for _ in session.queues]
    if ledger is not None:
        if oracle is not None:
            ledger.note_oracle(oracle, [dict(q.vq.in_flight) for q in session.queues])
        ledger.enter(hop)
    bases = [q.vq.used_idx_in_memory() for q in session.queues]
    t0 = time.monotonic()
    session.reattach(channel)
    return ReconnectResult(oracle, heads, harvested, bases, time.monotonic() - t0)
