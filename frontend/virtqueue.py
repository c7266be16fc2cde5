"""Driver-side virtqueues (what a guest does) in guest memory shared with the back-end.

``SplitVirtqueue`` and ``PackedVirtqueue`` follow VIRTIO 1.x 2.7 (split) and 2.8 (packed)
(layouts: SPEC-DIGEST 9). The back-end under test is the device: every used entry it writes
is validated here, and what is wrong is recorded in ``violations`` (a hostile or buggy device
must not crash the driver). Misuse of this library raises :class:`VirtqueueError`.

Index, flag and event-suppression accesses go through :mod:`~vhost_conformance.frontend.barrier`
(acquire loads of used->idx and packed flags, release stores of avail->idx and packed head
flags, a full fence before reading the device's notification suppression); descriptor bodies
and ring slots are plain stores ordered by the release that publishes them.

Per-request work is kept small: no syscalls, one tuple per request in flight, batching
(``add`` many, ``publish`` once, ``needs_kick`` once).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vhost_conformance.frontend.errors import MisuseError
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.protocol import VringAddr

__all__ = [
    "DESC_SIZE",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "PackedVirtqueue",
    "RingViolation",
    "SplitVirtqueue",
    "Virtqueue",
    "VirtqueueError",
    "vring_need_event",
]

DESC_SIZE = 16
# VIRTIO 1.x 2.7.5 / 2.8.x descriptor flags.
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# 2.8.1 packed descriptor flags.
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
# 2.7.6 / 2.7.8 split ring flags.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
# 2.8.10 packed event suppression flags.
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2

_SPLIT_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_PACKED_DESC_BODY = struct.Struct("<QIH")  # addr, len, id (flags written separately)
_PACKED_DESC = struct.Struct("<QIHH")  # addr, len, id, flags
_USED_ELEM = struct.Struct("<II")  # id, len
_U16 = struct.Struct("<H")


class VirtqueueError(MisuseError):
    """The library was misused (queue full, bad arguments): not the back-end's fault."""


@dataclass(frozen=True, slots=True)
class RingViolation:
    """Something the device (back-end) did to a ring that the VIRTIO rules forbid."""

    queue: int
    what: str
    expected: str
    seen: str
    clause: str

    def __str__(self) -> str:
        return f"vq {self.queue}: {self.what}: expected {self.expected}, seen {self.seen} ({self.clause})"


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """VIRTIO 1.x 2.7.10: notify iff ``event_idx`` lies in ``[old_idx, new_idx)`` (mod 2^16)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


Buffers = Sequence[tuple[int, int]]


@runtime_checkable
class Virtqueue(Protocol):
    """What a driver-side virtqueue offers, split or packed."""

    index: int
    size: int
    packed: bool
    event_idx: bool
    indirect: bool
    violations: list[RingViolation]

    def add(self, out_bufs: Buffers, in_bufs: Buffers, token: object, *,
            indirect: bool | None = None) -> int:
        """Queue a buffer (driver-readable ``(gpa, len)`` first, then device-writable); returns
        the head (split) or buffer id (packed). Not visible to the device before ``publish``."""
        ...

    def add_indirect(self, table_gpa: int, n: int, writable: int, token: object) -> int:
        """Put a caller-built indirect table of ``n`` descriptors at ``table_gpa`` (its
        device-writable descriptors adding up to ``writable`` bytes) in the ring as one
        buffer; returns the head (split) or buffer id (packed)."""
        ...

    def add_indirect_many(self, tables: Sequence[int], n: int, writable: int,
                          tokens: Sequence[object]) -> list[int]:
        """:meth:`add_indirect` for each ``(table, token)`` pair, all or none."""
        ...

    def publish(self) -> None:
        """Make every added buffer available to the device."""
        ...

    def needs_kick(self) -> bool:
        """Whether the device asked to be notified of what was published since the last call."""
        ...

    def reap(self) -> list[tuple[object, int]]:
        """All new used buffers as ``(token, len)``, in the device's order."""
        ...

    def vring_addr(self, flags: int = 0, log_guest_addr: int | None = None, *,
                   gpa_addresses: bool = False) -> VringAddr:
        """The SET_VRING_ADDR payload."""
        ...

    def vring_base(self) -> int:
        """The SET_VRING_BASE ``num`` for a queue the device has not stopped (fresh: the start
        of the ring; otherwise the device's used position as memory shows it)."""
        ...

    def used_idx_in_memory(self) -> int:
        """The device's used position as guest memory shows it, in SET_VRING_BASE form (QEMU's
        fallback when GET_VRING_BASE failed: last_avail_idx = used idx)."""
        ...

    def set_no_interrupt(self, disable: bool) -> None:
        """Ask the device not to (or again to) send used-buffer notifications."""
        ...

    def set_used_event(self, idx: int) -> None:
        """Write the driver's event position (split: used_event; packed: the driver event's
        off_wrap with flags DESC): "notify me when the used position passes ``idx``"."""
        ...

    @property
    def in_flight(self) -> dict[int, object]:
        """Heads (split) or buffer ids (packed) handed to the device and not yet used."""
        ...

    @property
    def last_avail_idx(self) -> int:
        """The driver's avail position (split: u16 avail->idx incl. unpublished adds; packed:
        next ring index | avail wrap counter << 15)."""
        ...

    @property
    def used_idx(self) -> int:
        """The driver's last consumed used position (split: u16 used->idx; packed: ring index |
        used wrap counter << 15); equals ``used_idx_in_memory() & 0xFFFF`` when the device
        has written nothing new."""
        ...

    @property
    def free_count(self) -> int:
        """Descriptors still free."""
        ...


class _Ring:
    """Placement of one ring part in guest memory: its region's barrier helper and offset."""

    __slots__ = ("gpa", "mv", "off", "shm")

    def __init__(self, memory: GuestMemory, size: int, align: int) -> None:
        self.gpa = memory.alloc(size, align)
        region, self.off = memory.locate(self.gpa, size)
        self.shm = region.shm
        self.mv = memory.view(self.gpa, size)
        self.mv[:] = bytes(size)


def _check_size(size: int, *, packed: bool) -> None:
    if not 1 <= size <= 32768:
        raise VirtqueueError(f"queue size {size} out of range 1..32768")
    if not packed and size & (size - 1):
        raise VirtqueueError(f"split queue size {size} is not a power of 2 (VIRTIO 2.7)")


class _IndirectTables:
    """Indirect descriptor tables, one per head/id, reused and grown on demand."""

    __slots__ = ("_memory", "_tables")

    def __init__(self, memory: GuestMemory) -> None:
        self._memory = memory
        self._tables: dict[int, tuple[int, int, memoryview]] = {}

    def get(self, slot: int, n: int) -> tuple[int, memoryview]:
        table = self._tables.get(slot)
        if table is None or table[1] < n:
            capacity = max(n, 8)
            gpa = self._memory.alloc(capacity * DESC_SIZE, 16)
            table = (gpa, capacity, self._memory.view(gpa, capacity * DESC_SIZE))
            self._tables[slot] = table
        return table[0], table[2]


class _DriverQueue:
    """What split and packed share: identity, the three areas, tokens in flight, indirect
    tables, violations, and the SET_VRING_ADDR payload."""

    packed: bool

    def __init__(self, memory: GuestMemory, index: int, size: int, *, event_idx: bool,
                 indirect: bool, areas: tuple[tuple[int, int], tuple[int, int],
                                              tuple[int, int]]) -> None:
        _check_size(size, packed=self.packed)
        self.memory = memory
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        # (size, alignment) of the descriptor area, driver area, device area; all zeroed.
        self._desc = _Ring(memory, *areas[0])
        self._driver = _Ring(memory, *areas[1])
        self._device = _Ring(memory, *areas[2])
        self._in_flight: dict[int, object] = {}
        self._no_interrupt = False
        self._indirect_tables = _IndirectTables(memory)
        self.violations: list[RingViolation] = []

    def vring_addr(self, flags: int = 0, log_guest_addr: int | None = None, *,
                   gpa_addresses: bool = False) -> VringAddr:
        """SET_VRING_ADDR payload: desc = descriptor area, avail = driver area, used = device
        area, as user addresses (GPAs with GPA_ADDRESSES); ``log_guest_addr`` defaults to the
        device area's GPA, as QEMU sends it even without VHOST_VRING_F_LOG."""
        to_addr = (lambda g: g) if gpa_addresses else self.memory.gpa_to_uaddr
        return VringAddr(
            index=self.index,
            flags=flags,
            desc_user_addr=to_addr(self._desc.gpa),
            used_user_addr=to_addr(self._device.gpa),
            avail_user_addr=to_addr(self._driver.gpa),
            log_guest_addr=self._device.gpa if log_guest_addr is None else log_guest_addr,
        )

    @property
    def desc_gpa(self) -> int:
        """GPA of the descriptor table (split) or ring (packed)."""
        return self._desc.gpa

    @property
    def in_flight(self) -> dict[int, object]:
        """head (split) or buffer id (packed) -> token, for every buffer not yet used."""
        return self._in_flight

    def _violation(self, what: str, expected: str, seen: str, clause: str) -> None:
        self.violations.append(RingViolation(self.index, what, expected, seen, clause))


# --------------------------------------------------------------------------------------------
# Split virtqueue (VIRTIO 1.x 2.7)
# --------------------------------------------------------------------------------------------


class SplitVirtqueue(_DriverQueue):
    """A split virtqueue: descriptor table, available ring, used ring, driver side."""

    packed = False

    def __init__(
        self,
        memory: GuestMemory,
        index: int,
        size: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        # used->idx starts zeroed (TEST-IDEAS #11: the device must not latch a stale value).
        super().__init__(memory, index, size, event_idx=event_idx, indirect=indirect,
                         areas=((DESC_SIZE * size, 16), (6 + 2 * size, 2), (6 + 8 * size, 4)))
        self._avail = self._driver
        self._used = self._device
        self._avail_event_off = self._used.off + 4 + 8 * size
        self._used_event_off = self._avail.off + 4 + 2 * size
        self._free: list[int] = list(range(size - 1, -1, -1))
        # head -> (descriptors of the chain, device-writable bytes)
        self._chains: dict[int, tuple[Sequence[int], int]] = {}
        self._avail_idx = 0  # the driver's next avail->idx (free-running u16)
        self._published = 0
        self._kicked = 0  # avail->idx at the last needs_kick()
        self._used_idx = 0  # last used->idx seen

    # -- addresses ----------------------------------------------------------------------------

    @property
    def avail_gpa(self) -> int:
        """GPA of the available ring (driver area)."""
        return self._avail.gpa

    @property
    def used_gpa(self) -> int:
        """GPA of the used ring (device area)."""
        return self._used.gpa

    def vring_base(self) -> int:
        """SET_VRING_BASE ``num`` (SPEC-DIGEST 1.2, split: the next avail index the device
        processes) for a queue the device has not stopped with GET_VRING_BASE: used->idx as
        memory shows it. 0 on a fresh queue even when buffers were published before the start
        (the device must still process them); equal to avail->idx once drained. After a stop,
        send what GET_VRING_BASE returned instead."""
        return self.used_idx_in_memory()

    def used_idx_in_memory(self) -> int:
        """used->idx as the device last wrote it (acquire load)."""
        return self._used.shm.load16_acquire(self._used.off + 2)

    # -- state --------------------------------------------------------------------------------

    @property
    def last_avail_idx(self) -> int:
        """The driver's avail->idx (including added but unpublished heads)."""
        return self._avail_idx

    @property
    def published_idx(self) -> int:
        """avail->idx as the device can see it."""
        return self._published

    @property
    def used_idx(self) -> int:
        """The last used->idx the driver consumed."""
        return self._used_idx

    @property
    def free_count(self) -> int:
        """Free descriptors."""
        return len(self._free)

    # -- adding -------------------------------------------------------------------------------

    def add(self, out_bufs: Buffers, in_bufs: Buffers, token: object, *,
            indirect: bool | None = None) -> int:
        """Chain ``out_bufs`` (driver-readable) then ``in_bufs`` (device-writable) and put the
        head in the next avail slot; ``indirect`` defaults to the queue's setting for chains
        of more than one buffer. Returns the head."""
        n = len(out_bufs) + len(in_bufs)
        if n == 0:
            raise VirtqueueError("add() needs at least one buffer")
        if indirect is None:
            indirect = self.indirect and n > 1
        free = self._free
        pack = _SPLIT_DESC.pack_into
        writable = 0
        for _, length in in_bufs:
            writable += length
        if indirect:
            if not free:
                raise VirtqueueError(f"vq {self.index}: no free descriptor (size {self.size})")
            head = free.pop()
            table_gpa, table = self._indirect_tables.get(head, n)
            i = 0
            for addr, length in out_bufs:
                i += 1
                pack(table, (i - 1) * 16, addr, length, VIRTQ_DESC_F_NEXT if i < n else 0, i)
            for addr, length in in_bufs:
                i += 1
                flags = VIRTQ_DESC_F_WRITE | (VIRTQ_DESC_F_NEXT if i < n else 0)
                pack(table, (i - 1) * 16, addr, length, flags, i)
            pack(self._desc.mv, head * 16, table_gpa, n * DESC_SIZE, VIRTQ_DESC_F_INDIRECT, 0)
            chain: Sequence[int] = (head,)
        else:
            if len(free) < n:
                raise VirtqueueError(
                    f"vq {self.index}: {n} descriptors needed, {len(free)} free (size {self.size})"
                )
            chain = free[-n:][::-1]
            del free[-n:]
            desc = self._desc.mv
            i = 0
            for addr, length in out_bufs:
                nxt = chain[i + 1] if i + 1 < n else 0
                pack(desc, chain[i] * 16, addr, length, VIRTQ_DESC_F_NEXT if i + 1 < n else 0, nxt)
                i += 1
            for addr, length in in_bufs:
                nxt = chain[i + 1] if i + 1 < n else 0
                flags = VIRTQ_DESC_F_WRITE | (VIRTQ_DESC_F_NEXT if i + 1 < n else 0)
                pack(desc, chain[i] * 16, addr, length, flags, nxt)
                i += 1
            head = chain[0]
        self._in_flight[head] = token
        self._chains[head] = (chain, writable)
        _U16.pack_into(self._avail.mv, 4 + 2 * (self._avail_idx & (self.size - 1)), head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        return head

    def add_indirect(self, table_gpa: int, n: int, writable: int, token: object) -> int:
        """Put a caller-built indirect table of ``n`` descriptors at ``table_gpa`` (its
        device-writable descriptors adding up to ``writable`` bytes) in the next avail slot:
        one head descriptor with F_INDIRECT (VIRTIO 1.x 2.7.5.3). The fast path for drivers
        that keep one table per request slot; returns the head."""
        free = self._free
        if not free:
            raise VirtqueueError(f"vq {self.index}: no free descriptor (size {self.size})")
        head = free.pop()
        _SPLIT_DESC.pack_into(self._desc.mv, head << 4, table_gpa, n << 4,
                              VIRTQ_DESC_F_INDIRECT, 0)
        self._in_flight[head] = token
        self._chains[head] = ((head,), writable)
        avail_idx = self._avail_idx
        _U16.pack_into(self._avail.mv, 4 + 2 * (avail_idx & (self.size - 1)), head)
        self._avail_idx = (avail_idx + 1) & 0xFFFF
        return head

    def add_indirect_many(self, tables: Sequence[int], n: int, writable: int,
                          tokens: Sequence[object]) -> list[int]:
        """:meth:`add_indirect` for each ``(table, token)`` pair, all or none (nothing is
        added when the ring lacks descriptors for all); returns the heads in order."""
        count = len(tokens)
        free = self._free
        if len(tables) != count:
            raise VirtqueueError(f"{len(tables)} tables for {count} tokens")
        if count > len(free):
            raise VirtqueueError(
                f"vq {self.index}: {count} descriptors needed, {len(free)} free (size {self.size})")
        heads = free[len(free) - count :][::-1]
        del free[len(free) - count :]
        pack = _SPLIT_DESC.pack_into
        desc = self._desc.mv
        avail = self._avail.mv
        pack_u16 = _U16.pack_into
        in_flight, chains = self._in_flight, self._chains
        mask = self.size - 1
        avail_idx = self._avail_idx
        length = n << 4
        for head, table_gpa, token in zip(heads, tables, tokens, strict=True):
            pack(desc, head << 4, table_gpa, length, VIRTQ_DESC_F_INDIRECT, 0)
            in_flight[head] = token
            chains[head] = ((head,), writable)
            pack_u16(avail, 4 + 2 * (avail_idx & mask), head)
            avail_idx = (avail_idx + 1) & 0xFFFF
        self._avail_idx = avail_idx
        return heads

    def publish(self) -> None:
        """Release-store avail->idx (VIRTIO 2.7.13: barrier before the idx update)."""
        self._avail.shm.store16_release(self._avail.off + 2, self._avail_idx)
        self._published = self._avail_idx

    def needs_kick(self) -> bool:
        """Whether to notify the device of the heads published since the last call: with
        EVENT_IDX, avail_event in [old, new) (2.7.10); else used->flags lacks NO_NOTIFY."""
        shm = self._used.shm
        shm.mb()  # the published idx must be visible before the suppression field is read
        old, new = self._kicked, self._published
        self._kicked = new
        if self.event_idx:
            return vring_need_event(shm.load16(self._avail_event_off), new, old)
        return not shm.load16(self._used.off) & VIRTQ_USED_F_NO_NOTIFY

    # -- completions --------------------------------------------------------------------------

    def reap(self) -> list[tuple[object, int]]:
        """Consume every used entry up to used->idx (acquire). Entries naming a head that is out
        of range or not in flight, or a len beyond the chain's writable bytes, are recorded in
        ``violations`` (the former are skipped)."""
        used = self._used
        idx = used.shm.load16_acquire(used.off + 2)
        pending = (idx - self._used_idx) & 0xFFFF
        if not pending:
            return []
        if pending > self.size:
            self._violation(
                "used->idx moved past more entries than the queue holds",
                f"at most {self.size} new entries", f"used->idx {self._used_idx} -> {idx}",
                "VIRTIO 1.x 2.7.8",
            )
            pending = min(pending, len(self._in_flight))
        out: list[tuple[object, int]] = []
        append = out.append
        size = self.size
        in_flight, chains, free = self._in_flight, self._chains, self._free
        pop_token, pop_chain, extend = in_flight.pop, chains.pop, free.extend
        used_idx = self._used_idx
        start = used_idx & (size - 1)
        # the used elements (id, len) of the batch in at most two runs (the ring wraps), each
        # unpacked in one call; plain loads ordered by the acquire of used->idx above
        first = min(pending, size - start)
        values = _used_elems(first).unpack_from(used.mv, 4 + 8 * start)
        if first < pending:
            values += _used_elems(pending - first).unpack_from(used.mv, 4)
        it = iter(values)
        for head, length in zip(it, it, strict=True):
            used_idx = (used_idx + 1) & 0xFFFF
            token = pop_token(head, _MISSING)
            if token is _MISSING:
                self._bad_id(head, used_idx - 1)
                continue
            chain, writable = pop_chain(head)
            extend(chain)
            if length > writable:
                self._violation(
                    f"used len of head {head} exceeds the chain's device-writable bytes",
                    f"len <= {writable}", f"len {length}", "VIRTIO 1.x 2.7.8.2",
                )
            append((token, length))
        self._used_idx = used_idx
        if self.event_idx and not self._no_interrupt:
            self._avail.shm.store16(self._used_event_off, used_idx)
            self._avail.shm.mb()
        return out

    def _bad_id(self, head: int, slot: int) -> None:
        if head >= self.size:
            self._violation(f"used ring entry {slot & 0xFFFF} names a head out of range",
                            f"id < {self.size}", f"id {head}", "VIRTIO 1.x 2.7.8.2")
        else:
            self._violation(f"used ring entry {slot & 0xFFFF} names a head not in flight "
                            "(used twice, or never made available)",
                            f"one of {sorted(self._in_flight)[:16]}", f"id {head}",
                            "VIRTIO 1.x 2.7.8.2")

    # -- notification suppression -------------------------------------------------------------

    def set_no_interrupt(self, disable: bool) -> None:
        """avail->flags NO_INTERRUPT (ignored by the device with EVENT_IDX, 2.7.7.2); with
        EVENT_IDX, used_event stops following ``used_idx`` while disabled."""
        self._no_interrupt = disable
        self._avail.shm.store16(self._avail.off, VIRTQ_AVAIL_F_NO_INTERRUPT if disable else 0)
        if not disable and self.event_idx:
            self._avail.shm.store16(self._used_event_off, self._used_idx)
        self._avail.shm.mb()

    def set_used_event(self, idx: int) -> None:
        """Write used_event (the driver's "interrupt me when used->idx passes this")."""
        self._avail.shm.store16(self._used_event_off, idx & 0xFFFF)
        self._avail.shm.mb()

    @property
    def avail_event(self) -> int:
        """The device's avail_event (EVENT_IDX)."""
        return self._used.shm.load16(self._avail_event_off)

    @property
    def used_flags(self) -> int:
        """The device's used->flags."""
        return self._used.shm.load16(self._used.off)

    # -- raw access for hostile-guest cases ----------------------------------------------------

    def take_descriptors(self, n: int) -> list[int]:
        """Remove ``n`` descriptors from the free list for hand-built chains."""
        if n > len(self._free):
            raise VirtqueueError(f"vq {self.index}: {n} descriptors asked, {len(self._free)} free")
        taken = self._free[-n:][::-1]
        del self._free[-n:]
        return taken

    def write_desc(self, i: int, addr: int, length: int, flags: int, next: int) -> None:
        """Write descriptor ``i`` verbatim (any values that fit the fields)."""
        if not 0 <= i < self.size:
            raise VirtqueueError(f"descriptor index {i} outside the table (size {self.size})")
        _SPLIT_DESC.pack_into(self._desc.mv, i * 16, addr, length, flags, next)

    def push_avail(self, head: int, token: object = None, *, chain: Sequence[int] = (),
                   writable: int = 0xFFFFFFFF) -> None:
        """Put ``head`` (any u16, even out of range) in the next avail slot. With a token the
        head is tracked in flight; ``chain`` descriptors return to the free list when used."""
        _U16.pack_into(self._avail.mv, 4 + 2 * (self._avail_idx & (self.size - 1)), head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        if token is not None:
            self._in_flight[head] = token
            self._chains[head] = (tuple(chain), writable)

    def set_avail_idx(self, value: int) -> None:
        """Release-store an arbitrary avail->idx (e.g. jumping by more than the queue size)."""
        self._avail_idx = value & 0xFFFF
        self.publish()


_MISSING = object()
_USED_ELEMS: dict[int, struct.Struct] = {}


def _used_elems(n: int) -> struct.Struct:
    """``n`` used elements (id u32, len u32) in a row, one Struct per count, cached."""
    st = _USED_ELEMS.get(n)
    if st is None:
        st = _USED_ELEMS[n] = struct.Struct(f"<{2 * n}I")
    return st


# --------------------------------------------------------------------------------------------
# Packed virtqueue (VIRTIO 1.x 2.8)
# --------------------------------------------------------------------------------------------


class PackedVirtqueue(_DriverQueue):
    """A packed virtqueue: descriptor ring plus driver and device event suppression areas."""

    packed = True

    def __init__(
        self,
        memory: GuestMemory,
        index: int,
        size: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        # driver event suppression is the "avail" address, device event suppression "used"
        super().__init__(memory, index, size, event_idx=event_idx, indirect=indirect,
                         areas=((DESC_SIZE * size, 16), (4, 4), (4, 4)))
        self._ring = self._desc
        # 2.8.1: both wrap counters start at 1.
        self._next_avail = 0
        self._avail_wrap = 1
        self._last_used = 0
        self._used_wrap = 1
        self._free_slots = size
        self._free_ids: list[int] = list(range(size - 1, -1, -1))
        self._chains: dict[int, tuple[int, int]] = {}  # id -> (ring slots used, writable bytes)
        self._pending_heads: list[tuple[int, int]] = []  # (ring offset of flags, flags)
        self._added = 0  # descriptors made available since the last needs_kick
        self._unpublished = 0
        if event_idx:
            self._write_driver_event(RING_EVENT_FLAGS_DESC, self._last_used | 1 << 15)

    # -- addresses ----------------------------------------------------------------------------

    @property
    def driver_event_gpa(self) -> int:
        """GPA of the driver event suppression structure."""
        return self._driver.gpa

    @property
    def device_event_gpa(self) -> int:
        """GPA of the device event suppression structure."""
        return self._device.gpa

    def vring_base(self) -> int:
        """SET_VRING_BASE ``num`` (SPEC-DIGEST 1.2, packed: bits 0-14 next avail index, bit 15
        avail wrap counter, bits 16-30 used index, bit 31 used wrap counter) for a queue the
        device has not stopped: both halves at the device's used position
        (:meth:`used_idx_in_memory`); ``(0 | 1 << 15) * 0x10001`` on a fresh queue."""
        return self.used_idx_in_memory()

    def used_idx_in_memory(self) -> int:
        """Where the device will write its next used descriptor, found by walking the used
        descriptors past the driver's used index without consuming them; in SET_VRING_BASE
        form with the avail half equal to the used half (QEMU's packed fallback)."""
        shm, base, mv = self._ring.shm, self._ring.off, self._ring.mv
        pos, wrap = self._last_used, self._used_wrap
        for _ in range(self.size):
            flags = shm.load16_acquire(base + pos * 16 + 14)
            avail = 1 if flags & VIRTQ_DESC_F_AVAIL else 0
            used = 1 if flags & VIRTQ_DESC_F_USED else 0
            if avail != used or used != wrap:
                break
            buffer_id = _PACKED_DESC_BODY.unpack_from(mv, pos * 16)[2]
            chain = self._chains.get(buffer_id)
            pos += chain[0] if chain is not None else 1
            if pos >= self.size:
                pos -= self.size
                wrap ^= 1
        half = pos | wrap << 15
        return half | half << 16

    # -- state --------------------------------------------------------------------------------

    @property
    def next_avail_idx(self) -> int:
        """Ring index of the next descriptor the driver writes."""
        return self._next_avail

    @property
    def avail_wrap_counter(self) -> int:
        """Driver ring wrap counter."""
        return self._avail_wrap

    @property
    def last_used_idx(self) -> int:
        """Ring index where the driver expects the next used descriptor."""
        return self._last_used

    @property
    def used_wrap_counter(self) -> int:
        """Device ring wrap counter as the driver tracks it."""
        return self._used_wrap

    @property
    def last_avail_idx(self) -> int:
        """The driver's next avail index with its wrap counter in bit 15."""
        return self._next_avail | self._avail_wrap << 15

    @property
    def used_idx(self) -> int:
        """The driver's used index with its wrap counter in bit 15."""
        return self._last_used | self._used_wrap << 15

    @property
    def free_count(self) -> int:
        """Free ring slots."""
        return self._free_slots

    # -- adding -------------------------------------------------------------------------------

    def add(self, out_bufs: Buffers, in_bufs: Buffers, token: object, *,
            indirect: bool | None = None) -> int:
        """Write the buffer's descriptors at the driver's ring index; the head's flags wait for
        :meth:`publish`. Returns the buffer id."""
        n = len(out_bufs) + len(in_bufs)
        if n == 0:
            raise VirtqueueError("add() needs at least one buffer")
        if indirect is None:
            indirect = self.indirect and n > 1
        slots = 1 if indirect else n
        if slots > self._free_slots or not self._free_ids:
            raise VirtqueueError(
                f"vq {self.index}: {slots} ring slots needed, {self._free_slots} free "
                f"(size {self.size})"
            )
        buffer_id = self._free_ids.pop()
        writable = 0
        for _, length in in_bufs:
            writable += length
        ring = self._ring.mv
        size = self.size
        pos = self._next_avail
        wrap = self._avail_wrap
        # avail/used bits of a descriptor made available in wrap phase w: AVAIL=w, USED=!w.
        avail_bits = VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED
        head_pos = pos
        if indirect:
            table_gpa, table = self._indirect_tables.get(buffer_id, n)
            i = 0
            pack = _PACKED_DESC.pack_into
            for addr, length in out_bufs:
                pack(table, i * 16, addr, length, 0, 0)
                i += 1
            for addr, length in in_bufs:
                pack(table, i * 16, addr, length, 0, VIRTQ_DESC_F_WRITE)
                i += 1
            _PACKED_DESC_BODY.pack_into(ring, pos * 16, table_gpa, n * DESC_SIZE, buffer_id)
            head_flags = VIRTQ_DESC_F_INDIRECT | avail_bits
            pos += 1
            if pos == size:
                pos = 0
                wrap ^= 1
        else:
            head_flags = 0
            i = 0
            for group, base_flags in ((out_bufs, 0), (in_bufs, VIRTQ_DESC_F_WRITE)):
                for addr, length in group:
                    flags = base_flags | (VIRTQ_DESC_F_NEXT if i + 1 < n else 0)
                    if i == 0:
                        _PACKED_DESC_BODY.pack_into(ring, pos * 16, addr, length, buffer_id)
                        head_flags = flags | avail_bits
                    else:
                        bits = VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED
                        _PACKED_DESC.pack_into(ring, pos * 16, addr, length, buffer_id,
                                               flags | bits)
                    i += 1
                    pos += 1
                    if pos == size:
                        pos = 0
                        wrap ^= 1
        self._next_avail = pos
        self._avail_wrap = wrap
        self._free_slots -= slots
        self._in_flight[buffer_id] = token
        self._chains[buffer_id] = (slots, writable)
        self._pending_heads.append((head_pos * 16 + 14, head_flags))
        self._unpublished += slots
        return buffer_id

    def add_indirect(self, table_gpa: int, n: int, writable: int, token: object) -> int:
        """Put a caller-built indirect table of ``n`` descriptors at ``table_gpa`` (its
        device-writable descriptors adding up to ``writable`` bytes) at the driver's ring
        index: one ring slot with F_INDIRECT (VIRTIO 1.x 2.8.19), its flags waiting for
        :meth:`publish`. Returns the buffer id."""
        if self._free_slots < 1 or not self._free_ids:
            raise VirtqueueError(
                f"vq {self.index}: 1 ring slot needed, {self._free_slots} free (size {self.size})"
            )
        buffer_id = self._free_ids.pop()
        pos = self._next_avail
        wrap = self._avail_wrap
        _PACKED_DESC_BODY.pack_into(self._ring.mv, pos * 16, table_gpa, n * DESC_SIZE, buffer_id)
        self._pending_heads.append(
            (pos * 16 + 14,
             VIRTQ_DESC_F_INDIRECT | (VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED)))
        pos += 1
        if pos == self.size:
            pos = 0
            self._avail_wrap = wrap ^ 1
        self._next_avail = pos
        self._free_slots -= 1
        self._in_flight[buffer_id] = token
        self._chains[buffer_id] = (1, writable)
        self._unpublished += 1
        return buffer_id

    def add_indirect_many(self, tables: Sequence[int], n: int, writable: int,
                          tokens: Sequence[object]) -> list[int]:
        """:meth:`add_indirect` for each ``(table, token)`` pair, all or none (nothing is
        added when the ring lacks slots or ids for all); returns the buffer ids in order."""
        count = len(tokens)
        if len(tables) != count:
            raise VirtqueueError(f"{len(tables)} tables for {count} tokens")
        if count > self._free_slots or count > len(self._free_ids):
            raise VirtqueueError(
                f"vq {self.index}: {count} ring slots needed, {self._free_slots} free "
                f"(size {self.size})")
        return [self.add_indirect(table, n, writable, token)
                for table, token in zip(tables, tokens, strict=True)]

    def publish(self, *, hold_first: bool = False) -> None:
        """Expose the added buffers: after a write fence, store each pending head's flags, the
        first one last, with release (2.8.21: the head's flags are written after the rest).
        ``hold_first``: the first pending head stays unpublished (its descriptors written, its
        flags not), so later buffers are available before it; the next :meth:`publish`
        exposes it (for a case on the device's ring order, VIRTIO 1.3 2.8.12)."""
        pending = self._pending_heads
        if not pending:
            return
        shm, base = self._ring.shm, self._ring.off
        shm.wmb()
        for off, flags in reversed(pending[1:]):
            shm.store16(base + off, flags)
        if hold_first:
            del pending[1:]
            return
        off, flags = pending[0]
        shm.store16_release(base + off, flags)
        pending.clear()
        self._added += self._unpublished
        self._unpublished = 0

    def needs_kick(self) -> bool:
        """Whether the device asked to be notified (2.8.10 device event suppression: ENABLE,
        DISABLE, or DESC with an off_wrap inside what was published since the last call)."""
        shm = self._device.shm
        shm.mb()
        added, self._added = self._added, 0
        off_wrap = shm.load16(self._device.off)
        flags = shm.load16(self._device.off + 2)
        if flags != RING_EVENT_FLAGS_DESC:
            return flags != RING_EVENT_FLAGS_DISABLE
        new = self._next_avail
        old = (new - added) & 0xFFFF
        event_idx = off_wrap & 0x7FFF
        if off_wrap >> 15 != self._avail_wrap:
            event_idx = (event_idx - self.size) & 0xFFFF
        return vring_need_event(event_idx, new, old)

    # -- completions --------------------------------------------------------------------------

    def reap(self) -> list[tuple[object, int]]:
        """Consume used descriptors at the driver's used index while AVAIL == USED == the used
        wrap counter (2.8.6); a chain's slots are skipped as a whole. Unknown ids and bad
        lengths are recorded in ``violations``."""
        ring = self._ring
        load_flags = ring.shm.load16_acquire
        base = ring.off
        mv = ring.mv
        size = self.size
        out: list[tuple[object, int]] = []
        in_flight, chains = self._in_flight, self._chains
        pos, wrap = self._last_used, self._used_wrap
        for _ in range(size):
            flags = load_flags(base + pos * 16 + 14)
            avail = 1 if flags & VIRTQ_DESC_F_AVAIL else 0
            used = 1 if flags & VIRTQ_DESC_F_USED else 0
            if avail != used or used != wrap:
                break
            _, length, buffer_id = _PACKED_DESC_BODY.unpack_from(mv, pos * 16)
            token = in_flight.pop(buffer_id, _MISSING)
            if token is _MISSING:
                self._violation(
                    f"used descriptor at ring index {pos} names a buffer id not in flight",
                    f"one of {sorted(in_flight)[:16]}", f"id {buffer_id}", "VIRTIO 1.x 2.8.6",
                )
                slots = 1  # cannot know the chain; step one slot
            else:
                slots, writable = chains.pop(buffer_id)
                self._free_ids.append(buffer_id)
                self._free_slots += slots
                if length > writable:
                    self._violation(
                        f"used len of buffer id {buffer_id} exceeds its device-writable bytes",
                        f"len <= {writable}", f"len {length}", "VIRTIO 1.x 2.8.6",
                    )
                out.append((token, length))
            pos += slots
            if pos >= size:
                pos -= size
                wrap ^= 1
        self._last_used, self._used_wrap = pos, wrap
        if out and self.event_idx and not self._no_interrupt:
            self._write_driver_event(RING_EVENT_FLAGS_DESC, pos | wrap << 15)
        return out

    # -- notification suppression -------------------------------------------------------------

    def _write_driver_event(self, flags: int, off_wrap: int) -> None:
        shm = self._driver.shm
        shm.store16(self._driver.off, off_wrap)
        shm.store16(self._driver.off + 2, flags)
        shm.mb()

    def set_no_interrupt(self, disable: bool) -> None:
        """Driver event suppression flags: DISABLE, or ENABLE (DESC at the used index with
        EVENT_IDX)."""
        self._no_interrupt = disable
        if disable:
            self._write_driver_event(RING_EVENT_FLAGS_DISABLE, self._last_used | self._used_wrap << 15)
        elif self.event_idx:
            self._write_driver_event(RING_EVENT_FLAGS_DESC, self._last_used | self._used_wrap << 15)
        else:
            self._write_driver_event(RING_EVENT_FLAGS_ENABLE, 0)

    def set_used_event(self, idx: int) -> None:
        """Driver event off_wrap (ring index | wrap << 15) with flags DESC."""
        self._write_driver_event(RING_EVENT_FLAGS_DESC, idx & 0xFFFF)

    @property
    def device_event(self) -> tuple[int, int]:
        """The device's event suppression ``(off_wrap, flags)``."""
        shm = self._device.shm
        return shm.load16(self._device.off), shm.load16(self._device.off + 2)

    # -- raw access for hostile-guest cases ----------------------------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int, next: int = 0) -> None:
        """Write ring descriptor ``i`` verbatim; ``next`` is the buffer id field here."""
        if not 0 <= i < self.size:
            raise VirtqueueError(f"descriptor index {i} outside the ring (size {self.size})")
        _PACKED_DESC_BODY.pack_into(self._ring.mv, i * 16, addr, length, next)
        self._ring.shm.store16_release(self._ring.off + i * 16 + 14, flags)

    def write_flags(self, i: int, flags: int) -> None:
        """Store the flags of ring descriptor ``i`` alone (release), for a case that leaves a
        written descriptor's AVAIL/USED bits at a value that does not make it available."""
        if not 0 <= i < self.size:
            raise VirtqueueError(f"descriptor index {i} outside the ring (size {self.size})")
        self._ring.shm.store16_release(self._ring.off + i * 16 + 14, flags)

    def ring_bytes(self, i: int) -> bytes:
        """The 16 bytes of ring descriptor ``i`` as guest memory holds them now."""
        if not 0 <= i < self.size:
            raise VirtqueueError(f"descriptor index {i} outside the ring (size {self.size})")
        self._ring.shm.mb()
        return bytes(self._ring.mv[i * 16 : i * 16 + 16])

    def avail_flags(self) -> int:
        """AVAIL/USED bits that make a descriptor available in the driver's current wrap phase."""
        return VIRTQ_DESC_F_AVAIL if self._avail_wrap else VIRTQ_DESC_F_USED

    def push_avail(self, head: int, token: object = None, *, slots: int = 1,
                   writable: int = 0xFFFFFFFF) -> None:
        """Advance the driver's ring index by ``slots`` after hand-written descriptors (use
        :meth:`avail_flags` for their flags); with a token, buffer id ``head`` is in flight."""
        self._free_slots -= slots
        pos = self._next_avail + slots
        while pos >= self.size:
            pos -= self.size
            self._avail_wrap ^= 1
        self._next_avail = pos
        self._added += slots
        if token is not None:
            if head in self._free_ids:
                self._free_ids.remove(head)
            self._in_flight[head] = token
            self._chains[head] = (slots, writable)

    def set_avail_idx(self, value: int) -> None:
        """Packed rings have no avail index: set the driver's next index and wrap (bit 15)."""
        self._next_avail = value & 0x7FFF
        self._avail_wrap = value >> 15 & 1
