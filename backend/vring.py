"""Device-side virtqueue access, split and packed: reading and validating the chains the
driver made available, writing used entries, notification suppression.

Everything the guest wrote is checked before use (VIRTIO 1.2 2.7 / 2.8, SPEC-DIGEST 9):
head and next indices inside the table, chain length <= queue size (loops), indirect
tables (feature negotiated, len a non-zero multiple of 16, no nesting, not together with
NEXT), device-readable buffers before device-writable ones, every buffer mapped. A chain
is ``fatal`` when its end cannot be found safely (the queue must stop: needs reset), or
carries an ``error`` with a ``status`` location when the status byte can still be written.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from vhost_conformance.backend.faults import Faults
from vhost_conformance.backend.memory import GuestMemory, GuestMemoryError, full_barrier

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
PACKED_DESC_F_AVAIL = 1 << 7
PACKED_DESC_F_USED = 1 << 15
#: avail->flags bit (split): the driver asks for no interrupts.
AVAIL_F_NO_INTERRUPT = 1
#: packed driver event suppression flags values.
PACKED_EVENT_ENABLE = 0
PACKED_EVENT_DISABLE = 1
PACKED_EVENT_DESC = 2
DESC_SIZE = 16

_SPLIT_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_PACKED_DESC = struct.Struct("<QIHH")  # addr, len, id, flags
_U16 = struct.Struct("<H")
_U32X2 = struct.Struct("<II")


class RingError(Exception):
    """A ring address is not mapped, or the driver broke the ring (queue needs reset)."""


@dataclass(slots=True)
class Chain:
    """A descriptor chain the device took.

    ``readable``/``writable`` hold (gpa, len) in chain order. ``fatal`` names a structural
    error (no safe completion possible); ``error`` a request error with the status byte
    still writable at ``status_gpa``.
    """

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)
    ndescs: int = 1
    buffer_id: int = 0
    fatal: str | None = None
    error: str | None = None
    #: the buffers came from an indirect table
    indirect: bool = False
    #: direct descriptors came before the indirect one
    mixed: bool = False
    #: the flags of the descriptor that referred to the indirect table
    indirect_flags: int = 0
    #: ring descriptors as read (packed in-flight tracking copies them), (addr, len, id, flags)
    ring_descs: list[tuple[int, int, int, int]] = field(default_factory=list)

    @property
    def status_gpa(self) -> int | None:
        """GPA of the status byte: the last byte of the last device-writable buffer."""
        if not self.writable:
            return None
        gpa, length = self.writable[-1]
        return gpa + length - 1 if length > 0 else None


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event (VIRTIO 1.2 2.7.10): notify if ``event`` lies in [old, new)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def _walk(
    chain: Chain,
    mem: GuestMemory,
    read_desc: Callable[[int], tuple[int, int, int, int]],
    first: int,
    table_size: int,
    indirect_ok: bool,
    packed: bool,
    faults: Faults,
    queue_size: int,
) -> None:
    """Follow descriptors from ``first`` of a table of ``table_size`` entries, filling
    ``chain`` (buffers, fatal/error). ``read_desc(i)`` -> (addr, len, flags, next).
    ``faults``: the robustness knobs that die on what this walk refuses."""
    reader = read_desc
    idx = first
    count = 0
    total = 0
    in_indirect = False
    limit = table_size
    seen_write = False
    indirect_mm: tuple[mmap.mmap, int] | None = None
    while True:
        if idx >= limit:
            if faults.on("unchecked-desc-index"):
                faults.die("unchecked-desc-index", f"descriptor {idx} of a table of {limit}")
            chain.fatal = f"descriptor index {idx} outside a table of {limit}"
            return
        count += 1
        total += 1
        if total > queue_size and faults.on("chain-overflow"):
            faults.die("chain-overflow", f"descriptor {total} of a queue of {queue_size}")
        if count > limit:
            chain.fatal = f"descriptor chain longer than its table of {limit} (a loop?)"
            return
        if indirect_mm is not None:
            mm, off = indirect_mm
            if packed:
                addr, length, _id, flags = _PACKED_DESC.unpack_from(mm, off + DESC_SIZE * idx)
                nxt = idx + 1
            else:
                addr, length, flags, nxt = _SPLIT_DESC.unpack_from(mm, off + DESC_SIZE * idx)
        else:
            addr, length, flags, nxt = reader(idx)
        if flags & DESC_F_INDIRECT:
            indirect_mm = _indirect_table(chain, mem, addr, length, flags, in_indirect=in_indirect,
                                          indirect_ok=indirect_ok, packed=packed, faults=faults)  # fmt: skip
            if indirect_mm is None:
                return
            in_indirect = True
            chain.indirect = True
            chain.mixed = bool(chain.readable or chain.writable)
            chain.indirect_flags = flags
            limit = length // DESC_SIZE
            idx = 0
            count = 0
            continue
        if length == 0 and faults.on("crash-on-zero-length"):
            faults.die("crash-on-zero-length", f"descriptor {idx}")
        last = not flags & DESC_F_NEXT if not (packed and in_indirect) else idx + 1 >= limit
        seen_write = _add_buffer(chain, mem, addr, length, flags, last=last,
                                 seen_write=seen_write, faults=faults)  # fmt: skip
        if packed and in_indirect:
            # Packed indirect tables are used sequentially, all entries (VIRTIO 1.2 2.8.7).
            if nxt >= limit:
                return
            idx = nxt
            continue
        if not flags & DESC_F_NEXT:
            return
        idx = nxt


def _indirect_table(
    chain: Chain, mem: GuestMemory, addr: int, length: int, flags: int, *,
    in_indirect: bool, indirect_ok: bool, packed: bool, faults: Faults,
) -> tuple[mmap.mmap, int] | None:
    """The mapping of the indirect table a descriptor names, or None with ``chain.fatal``
    set when the descriptor may not name one (nested, not negotiated, with NEXT, a length
    that is not a non-zero multiple of 16, outside guest memory)."""
    if faults.on("unchecked-indirect") and (
        in_indirect
        or (flags & DESC_F_NEXT and not packed)
        or length == 0
        or length % DESC_SIZE
    ):
        faults.die("unchecked-indirect", f"indirect descriptor len {length} flags {flags:#x}")
    if in_indirect:
        chain.fatal = "indirect descriptor inside an indirect table"
        return None
    if not indirect_ok:
        chain.fatal = "indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC"
        return None
    if flags & DESC_F_NEXT and not packed:
        chain.fatal = "descriptor with both INDIRECT and NEXT"
        return None
    if length == 0 or length % DESC_SIZE:
        chain.fatal = f"indirect table length {length} is not a non-zero multiple of 16"
        return None
    try:
        return mem.gpa(addr, length)
    except GuestMemoryError as exc:
        if faults.on("unchecked-gpa"):
            faults.die("unchecked-gpa", f"indirect table: {exc}")
        chain.fatal = f"indirect table: {exc}"
        return None


def _add_buffer(
    chain: Chain, mem: GuestMemory, addr: int, length: int, flags: int, *,
    last: bool, seen_write: bool, faults: Faults,
) -> bool:
    """Append one buffer descriptor to ``chain`` (readable or writable; a readable one after
    a writable one and a buffer outside guest memory set ``chain.error``); returns whether a
    writable buffer has been seen."""
    if flags & DESC_F_WRITE or (last and faults.on("write-readable-status")):
        seen_write = True
        chain.writable.append((addr, length))
    else:
        if seen_write and chain.error is None:
            chain.error = "device-readable descriptor after a device-writable one"
        chain.readable.append((addr, length))
    if chain.error is None or faults.on("unchecked-gpa"):
        try:
            mem.gpa_segments(addr, length)
        except GuestMemoryError as exc:
            if faults.on("unchecked-gpa"):
                faults.die("unchecked-gpa", f"buffer: {exc}")
            chain.error = f"buffer: {exc}"
    return seen_write


def _finish(chain: Chain, mem: GuestMemory, faults: Faults) -> None:
    """A chain can be completed only with a mapped status byte (the last byte of the last
    device-writable buffer); without one it is fatal, with one a request error means IOERR."""
    if chain.fatal:
        return
    status = chain.status_gpa
    problem = None
    if status is None:
        problem = "no device-writable byte for the status"
    else:
        try:
            mem.gpa(status, 1)
        except GuestMemoryError as exc:
            if faults.on("unchecked-gpa"):
                faults.die("unchecked-gpa", f"status byte: {exc}")
            problem = f"status byte: {exc}"
    if problem is not None:
        chain.fatal = f"{chain.error}; and {problem}" if chain.error else problem


class SplitRing:
    """The three areas of a split virtqueue, at front-end user addresses."""

    def __init__(
        self,
        mem: GuestMemory,
        num: int,
        desc_uva: int,
        avail_uva: int,
        used_uva: int,
        *,
        indirect: bool,
        event_idx: bool,
        faults: Faults | None = None,
    ) -> None:
        self.mem = mem
        self.num = num
        self.indirect = indirect
        self.event_idx = event_idx
        self.faults = faults or Faults()
        try:
            self.desc_mm, self.desc_off = mem.uva(desc_uva, DESC_SIZE * num)
            self.avail_mm, self.avail_off = mem.uva(avail_uva, 6 + 2 * num)
            self.used_mm, self.used_off = mem.uva(used_uva, 6 + 8 * num)
        except GuestMemoryError as exc:
            raise RingError(f"split ring address: {exc}") from None
        self.used_uva = used_uva
        self.generation = mem.generation

    def avail_idx(self) -> int:
        """avail->idx."""
        return int(_U16.unpack_from(self.avail_mm, self.avail_off + 2)[0])

    def avail_flags(self) -> int:
        """avail->flags."""
        return int(_U16.unpack_from(self.avail_mm, self.avail_off)[0])

    def used_event(self) -> int:
        """avail->used_event (EVENT_IDX)."""
        return int(_U16.unpack_from(self.avail_mm, self.avail_off + 4 + 2 * self.num)[0])

    def avail_head(self, last_avail_idx: int) -> int:
        """avail->ring[last_avail_idx % num]."""
        off = self.avail_off + 4 + 2 * (last_avail_idx % self.num)
        return int(_U16.unpack_from(self.avail_mm, off)[0])

    def used_idx(self) -> int:
        """used->idx as in guest memory."""
        return int(_U16.unpack_from(self.used_mm, self.used_off + 2)[0])

    def _read_desc(self, i: int) -> tuple[int, int, int, int]:
        return _SPLIT_DESC.unpack_from(self.desc_mm, self.desc_off + DESC_SIZE * i)

    def read_chain(self, head: int) -> Chain:
        """Read and validate the chain starting at descriptor ``head``."""
        if head >= self.num and self.faults.on("head-modulo"):
            head %= self.num  # the ring index mask applied to the head too
        chain = Chain(head, buffer_id=head)
        if head >= self.num:
            if self.faults.on("unchecked-desc-index"):
                self.faults.die("unchecked-desc-index", f"head {head} of a queue of {self.num}")
            chain.fatal = f"head {head} outside the queue of size {self.num}"
            return chain
        _walk(
            chain,
            self.mem,
            self._read_desc,
            head,
            self.num,
            self.indirect,
            packed=False,
            faults=self.faults,
            queue_size=self.num,
        )
        _finish(chain, self.mem, self.faults)
        return chain

    def write_used(self, used_idx: int, head: int, length: int) -> int:
        """Write used->ring[used_idx % num] = {head, length}; return its offset in the
        used area (for dirty logging)."""
        rel = 4 + 8 * (used_idx % self.num)
        _U32X2.pack_into(self.used_mm, self.used_off + rel, head, length)
        return rel

    def used_len(self, used_idx: int) -> int:
        """The len field of used->ring[used_idx % num] as guest memory holds it."""
        rel = 4 + 8 * (used_idx % self.num)
        return int(_U32X2.unpack_from(self.used_mm, self.used_off + rel)[1])

    def set_used_idx(self, value: int) -> None:
        """used->idx = value (after the elements: x86 stores stay in order)."""
        _U16.pack_into(self.used_mm, self.used_off + 2, value & 0xFFFF)

    def set_used_flags(self, value: int) -> None:
        """used->flags = value."""
        _U16.pack_into(self.used_mm, self.used_off, value & 0xFFFF)

    def set_avail_event(self, value: int) -> int:
        """used->avail_event = value (EVENT_IDX); return its offset in the used area."""
        rel = 4 + 8 * self.num
        _U16.pack_into(self.used_mm, self.used_off + rel, value & 0xFFFF)
        return rel

    def should_notify(self, old_used: int, new_used: int) -> bool:
        """Whether the driver wants an interrupt for used entries [old_used, new_used)."""
        full_barrier()  # used->idx stored before used_event / flags are read
        if self.event_idx:
            return need_event(self.used_event(), new_used, old_used)
        return not self.avail_flags() & AVAIL_F_NO_INTERRUPT


class PackedRing:
    """A packed virtqueue: descriptor ring + driver/device event suppression areas."""

    def __init__(
        self,
        mem: GuestMemory,
        num: int,
        desc_uva: int,
        driver_event_uva: int,
        device_event_uva: int,
        *,
        indirect: bool,
        event_idx: bool,
        faults: Faults | None = None,
    ) -> None:
        self.mem = mem
        self.num = num
        self.indirect = indirect
        self.event_idx = event_idx
        self.faults = faults or Faults()
        try:
            self.desc_mm, self.desc_off = mem.uva(desc_uva, DESC_SIZE * num)
            self.drv_mm, self.drv_off = mem.uva(driver_event_uva, 4)
            self.dev_mm, self.dev_off = mem.uva(device_event_uva, 4)
        except GuestMemoryError as exc:
            raise RingError(f"packed ring address: {exc}") from None
        self.desc_uva = desc_uva
        self.generation = mem.generation
        # Device event suppression: always ENABLE (we never ask the driver not to kick).
        struct.pack_into("<HH", self.dev_mm, self.dev_off, 0, PACKED_EVENT_ENABLE)

    def flags_at(self, idx: int) -> int:
        """Flags of descriptor ring entry ``idx``."""
        return int(_U16.unpack_from(self.desc_mm, self.desc_off + DESC_SIZE * idx + 14)[0])

    def is_available(self, idx: int, wrap: bool) -> bool:
        """Entry ``idx`` is available for driver wrap counter ``wrap``."""
        flags = self.flags_at(idx)
        avail = bool(flags & PACKED_DESC_F_AVAIL)
        used = bool(flags & PACKED_DESC_F_USED)
        if self.faults.on("packed-avail-ignores-wrap"):
            return avail != used
        return avail == wrap and used != wrap

    def read_chain(self, idx: int, wrap: bool) -> Chain:
        """Read the chain starting at ring entry ``idx`` (available for ``wrap``)."""
        chain = Chain(idx, ndescs=0)
        descs: list[tuple[int, int, int, int]] = []
        i, w = idx, wrap
        while True:
            if len(descs) >= self.num:
                if self.faults.on("chain-overflow"):
                    self.faults.die("chain-overflow", f"packed chain past {self.num} entries")
                chain.fatal = f"packed chain longer than the queue size {self.num}"
                return chain
            if descs and not self.is_available(i, w):
                chain.fatal = f"packed chain continues into entry {i}, not available"
                return chain
            addr, length, bid, flags = _PACKED_DESC.unpack_from(
                self.desc_mm, self.desc_off + DESC_SIZE * i
            )
            descs.append((addr, length, bid, flags))
            i += 1
            if i == self.num:
                i, w = 0, not w
            if not flags & DESC_F_NEXT:
                break
        chain.ring_descs = descs
        return self.chain_from_descs(chain, descs)

    def chain_from_descs(self, chain: Chain, descs: list[tuple[int, int, int, int]]) -> Chain:
        """Validate ring descriptors (addr, len, id, flags) into ``chain``'s buffers."""
        chain.ndescs = len(descs)
        chain.buffer_id = descs[-1][2]
        chain.ring_descs = list(descs)
        if chain.buffer_id >= self.num and self.faults.on("unchecked-desc-index"):
            self.faults.die("unchecked-desc-index", f"buffer id {chain.buffer_id} of {self.num}")
        if any(f & DESC_F_INDIRECT for _a, _l, _i, f in descs) and len(descs) != 1:
            chain.fatal = "packed indirect descriptor chained with others"
            return chain

        def read(k: int) -> tuple[int, int, int, int]:
            a, ln, _bid, fl = descs[k]
            return a, ln, fl, k + 1

        _walk(
            chain,
            self.mem,
            read,
            0,
            len(descs),
            self.indirect,
            packed=True,
            faults=self.faults,
            queue_size=self.num,
        )
        _finish(chain, self.mem, self.faults)
        return chain

    def write_used(
        self, idx: int, buffer_id: int, length: int, wrap: bool, *, flags_too: bool
    ) -> int:
        """Write id and len of used entry ``idx`` (and its flags when ``flags_too``);
        return the entry's offset in the descriptor ring."""
        base = self.desc_off + DESC_SIZE * idx
        struct.pack_into("<I", self.desc_mm, base + 8, length & 0xFFFFFFFF)
        _U16.pack_into(self.desc_mm, base + 12, buffer_id)
        if flags_too:
            self.write_used_flags(idx, wrap)
        return DESC_SIZE * idx

    def write_used_len(self, idx: int, length: int) -> None:
        """Write the len field of ring entry ``idx`` alone."""
        struct.pack_into("<I", self.desc_mm, self.desc_off + DESC_SIZE * idx + 8, length & 0xFFFFFFFF)

    def write_used_flags(self, idx: int, wrap: bool) -> None:
        """Mark entry ``idx`` used: AVAIL = USED = device wrap counter."""
        flags = (PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED) if wrap else 0
        _U16.pack_into(self.desc_mm, self.desc_off + DESC_SIZE * idx + 14, flags)

    def should_notify(self, old_used: int, new_used: int, used_wrap: bool) -> bool:
        """Driver event suppression (VIRTIO 1.2 2.8.10): ENABLE, DISABLE or DESC."""
        full_barrier()  # used flags stored before the driver's event area is read
        off_wrap, flags = struct.unpack_from("<HH", self.drv_mm, self.drv_off)
        if flags == PACKED_EVENT_DISABLE:
            return False
        if flags != PACKED_EVENT_DESC or not self.event_idx:
            return True
        off = off_wrap & 0x7FFF
        if used_wrap != bool(off_wrap >> 15):
            off -= self.num
        return need_event(off & 0xFFFF, new_used, old_used)
