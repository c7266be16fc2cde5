"""The in-flight region (GET_INFLIGHT_FD / SET_INFLIGHT_FD): layouts and the update and
recovery rules of vhost-user.rst "Inflight I/O tracking", split and packed.

Pure functions over a writable buffer (an mmap of the shared memfd, or a bytearray in
tests); nothing here touches a socket. Byte layouts (host-native = little-endian here):

split queue region (QueueRegionSplit, 16-byte header)::

    features u64 @0, version u16 @8, desc_num u16 @10, last_batch_head u16 @12,
    used_idx u16 @14, desc[desc_num] @16, each DescStateSplit (16 bytes):
    inflight u8 @0, padding[5], next u16 @6, counter u64 @8

packed queue region (QueueRegionPacked, 32-byte header; desc[] 8-byte aligned)::

    features u64 @0, version u16 @8, desc_num u16 @10, free_head u16 @12,
    old_free_head u16 @14, used_idx u16 @16, old_used_idx u16 @18,
    used_wrap_counter u8 @20, old_used_wrap_counter u8 @21, padding[7], desc[] @32,
    each DescStatePacked (32 bytes): inflight u8 @0, padding u8, next u16 @2,
    last u16 @4, num u16 @6, counter u64 @8, id u16 @16, flags u16 @18, len u32 @20,
    addr u64 @24

(SPEC-DIGEST 5.2 and 5.5; the packed offsets were checked against DPDK's rte_vhost.h.)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

INFLIGHT_VERSION = 1
SPLIT_HEADER_SIZE = 16
SPLIT_DESC_SIZE = 16
PACKED_HEADER_SIZE = 32
PACKED_DESC_SIZE = 32
#: Alignment of each queue's region in the buffer we hand out (libvhost-user, DPDK: 64).
INFLIGHT_ALIGNMENT = 64

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_PACKED_DESC = struct.Struct("<BxHHHQHHIQ")

Buffer = Any  # a writable buffer: mmap.mmap or bytearray


class InflightError(Exception):
    """The region's contents are inconsistent (bad version, desc_num, list links)."""


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def queue_region_size(queue_size: int, packed: bool) -> int:
    """Bytes one queue's region needs (header + descriptor states)."""
    if packed:
        return PACKED_HEADER_SIZE + PACKED_DESC_SIZE * queue_size
    return SPLIT_HEADER_SIZE + SPLIT_DESC_SIZE * queue_size


def queue_region_stride(queue_size: int, packed: bool) -> int:
    """Per-queue stride of the buffer we allocate for GET_INFLIGHT_FD.

    Split: libvhost-user's vu_inflight_queue_size, ALIGN_UP(16 * Q + 2, 64) (>= 16 + 16 * Q
    for every Q). Packed: ALIGN_UP(32 + 32 * Q, 64), which equals DPDK's
    ALIGN_UP(32 * Q + 29, 64) for every Q.
    """
    if packed:
        return _align_up(PACKED_HEADER_SIZE + PACKED_DESC_SIZE * queue_size, INFLIGHT_ALIGNMENT)
    return _align_up(SPLIT_DESC_SIZE * queue_size + 2, INFLIGHT_ALIGNMENT)


# --------------------------------------------------------------------------------------
# split


class SplitInflight:
    """One split queue's region at ``offset`` of ``buf``, ``desc_num`` entries."""

    def __init__(self, buf: Buffer, offset: int, desc_num: int) -> None:
        self.buf = buf
        self.offset = offset
        self.desc_num = desc_num

    # header fields
    def _get16(self, off: int) -> int:
        return int(_U16.unpack_from(self.buf, self.offset + off)[0])

    def _set16(self, off: int, value: int) -> None:
        _U16.pack_into(self.buf, self.offset + off, value & 0xFFFF)

    @property
    def version(self) -> int:
        """Region version (0 = uninitialised)."""
        return self._get16(8)

    @property
    def header_desc_num(self) -> int:
        """desc_num as stored in the region."""
        return self._get16(10)

    @property
    def last_batch_head(self) -> int:
        """Head of the list of the last batch of used descriptors."""
        return self._get16(12)

    @property
    def used_idx(self) -> int:
        """Copy of used->idx after the last completed batch."""
        return self._get16(14)

    def _desc(self, head: int) -> int:
        return self.offset + SPLIT_HEADER_SIZE + SPLIT_DESC_SIZE * head

    def inflight(self, head: int) -> int:
        """desc[head].inflight."""
        return int(self.buf[self._desc(head)])

    def counter(self, head: int) -> int:
        """desc[head].counter."""
        return int(_U64.unpack_from(self.buf, self._desc(head) + 8)[0])

    def next(self, head: int) -> int:
        """desc[head].next."""
        return int(_U16.unpack_from(self.buf, self._desc(head) + 6)[0])

    def initialize(self, used_idx: int) -> None:
        """Initialise a version-0 region: zero it, version 1, desc_num, used_idx."""
        size = queue_region_size(self.desc_num, packed=False)
        self.buf[self.offset : self.offset + size] = bytes(size)
        self._set16(10, self.desc_num)
        self._set16(14, used_idx)
        self._set16(8, INFLIGHT_VERSION)

    def forget_version(self) -> None:
        """version = 0 (the misbehaviour ``inflight-no-version``)."""
        self._set16(8, 0)

    # "When receiving available buffers from the driver"
    def mark_popped(self, head: int, counter: int) -> None:
        """desc[head].counter = counter; desc[head].inflight = 1 (in that order)."""
        d = self._desc(head)
        _U64.pack_into(self.buf, d + 8, counter)
        self.buf[d] = 1

    # "When supplying used buffers to the driver"
    def link_batch(self, heads: list[int]) -> None:
        """Steps 1-3 for every head of a batch: desc[i].next = last_batch_head;
        last_batch_head = i. Done before used->idx is increased."""
        last = self.last_batch_head
        for head in heads:
            _U16.pack_into(self.buf, self._desc(head) + 6, last)
            last = head
        self._set16(12, last)

    def clear_batch(self, heads: list[int], used_idx: int) -> None:
        """After used->idx was increased: inflight = 0 for the batch, then used_idx."""
        for head in heads:
            self.buf[self._desc(head)] = 0
        self._set16(14, used_idx)

    def recover(self, ring_used_idx: int, *, fix_last_batch: bool = True
                ) -> tuple[list[int], int]:
        """Reconnect rules for a region set by SET_INFLIGHT_FD, at ring start.

        Returns (heads to resubmit in increasing counter order, next counter value).
        A version-0 region is initialised and yields nothing. ``fix_last_batch`` False (the
        misbehaviour ``skip-last-batch-fixup``) leaves a last batch that reached the used
        ring marked in flight.
        """
        if self.version == 0:
            self.initialize(ring_used_idx)
            return [], 1
        if self.version != INFLIGHT_VERSION:
            raise InflightError(f"split in-flight region version {self.version}, expected 1")
        if self.header_desc_num != self.desc_num:
            raise InflightError(
                f"split in-flight region desc_num {self.header_desc_num}, "
                f"expected the queue size {self.desc_num}"
            )
        if self.used_idx != ring_used_idx and fix_last_batch:
            # The last batch reached the used ring but not the region: its entries are
            # not in flight any more; the list starts at last_batch_head.
            batch = (ring_used_idx - self.used_idx) & 0xFFFF
            if batch > self.desc_num:
                raise InflightError(
                    f"used->idx {ring_used_idx} is {batch} ahead of the region's used_idx "
                    f"{self.used_idx}, more than the queue size {self.desc_num}"
                )
            head = self.last_batch_head
            for _ in range(batch):
                if head >= self.desc_num:
                    raise InflightError(f"last-batch list reaches head {head} >= desc_num")
                self.buf[self._desc(head)] = 0
                head = self.next(head)
            self._set16(14, ring_used_idx)
        heads = [h for h in range(self.desc_num) if self.inflight(h) == 1]
        heads.sort(key=self.counter)
        next_counter = max((self.counter(h) for h in heads), default=0) + 1
        return heads, next_counter


# --------------------------------------------------------------------------------------
# packed


@dataclass(frozen=True, slots=True)
class PackedDescCopy:
    """A descriptor as copied into the region (addr, len, id, flags)."""

    addr: int
    len: int
    id: int
    flags: int


@dataclass(frozen=True, slots=True)
class PackedResubmit:
    """A request to resubmit: region head entry, its descriptors, counter."""

    entry: int
    descs: tuple[PackedDescCopy, ...]
    counter: int


class PackedInflight:
    """One packed queue's region at ``offset`` of ``buf``, ``desc_num`` entries."""

    def __init__(self, buf: Buffer, offset: int, desc_num: int) -> None:
        self.buf = buf
        self.offset = offset
        self.desc_num = desc_num

    def _get16(self, off: int) -> int:
        return int(_U16.unpack_from(self.buf, self.offset + off)[0])

    def _set16(self, off: int, value: int) -> None:
        _U16.pack_into(self.buf, self.offset + off, value & 0xFFFF)

    @property
    def version(self) -> int:
        """Region version (0 = uninitialised)."""
        return self._get16(8)

    @property
    def header_desc_num(self) -> int:
        """desc_num as stored."""
        return self._get16(10)

    @property
    def free_head(self) -> int:
        """Head of the free entry list."""
        return self._get16(12)

    @property
    def old_free_head(self) -> int:
        """Committed head of the free entry list."""
        return self._get16(14)

    @property
    def used_idx(self) -> int:
        """Device's used index in the descriptor ring."""
        return self._get16(16)

    @property
    def old_used_idx(self) -> int:
        """Committed used index."""
        return self._get16(18)

    @property
    def used_wrap_counter(self) -> int:
        """Device ring wrap counter."""
        return int(self.buf[self.offset + 20])

    @property
    def old_used_wrap_counter(self) -> int:
        """Committed device ring wrap counter."""
        return int(self.buf[self.offset + 21])

    def _desc(self, entry: int) -> int:
        return self.offset + PACKED_HEADER_SIZE + PACKED_DESC_SIZE * entry

    def entry(self, entry: int) -> tuple[int, int, int, int, int, int, int, int, int]:
        """(inflight, next, last, num, counter, id, flags, len, addr) of an entry."""
        return _PACKED_DESC.unpack_from(self.buf, self._desc(entry))

    def _set_entry16(self, entry: int, off: int, value: int) -> None:
        _U16.pack_into(self.buf, self._desc(entry) + off, value & 0xFFFF)

    def _get_entry16(self, entry: int, off: int) -> int:
        return int(_U16.unpack_from(self.buf, self._desc(entry) + off)[0])

    def initialize(self, used_idx: int, used_wrap: bool) -> None:
        """Initialise a version-0 region: free list 0 -> 1 -> ... -> desc_num, used index
        and wrap counter from the ring, version 1."""
        size = queue_region_size(self.desc_num, packed=True)
        self.buf[self.offset : self.offset + size] = bytes(size)
        for e in range(self.desc_num):
            self._set_entry16(e, 2, e + 1)
        self._set16(10, self.desc_num)
        self._set16(16, used_idx)
        self._set16(18, used_idx)
        self.buf[self.offset + 20] = int(used_wrap)
        self.buf[self.offset + 21] = int(used_wrap)
        self._set16(8, INFLIGHT_VERSION)

    def forget_version(self) -> None:
        """version = 0 (the misbehaviour ``inflight-no-version``)."""
        self._set16(8, 0)

    # "When receiving available buffers from the driver"
    def record_chain(self, descs: list[PackedDescCopy], counter: int) -> int:
        """Record one fetched chain (ring descriptors in order); return its head entry."""
        head = self.old_free_head
        free = self.free_head
        n = len(descs)
        for k, d in enumerate(descs):
            if free >= self.desc_num:
                raise InflightError(f"packed in-flight free list exhausted (entry {free})")
            if k == 0:
                self._set_entry16(head, 6, 0)
                _U64.pack_into(self.buf, self._desc(head) + 8, counter)
                self.buf[self._desc(head)] = 1
            if k == n - 1:
                self._set_entry16(head, 4, free)
            self._set_entry16(head, 6, self._get_entry16(head, 6) + 1)
            base = self._desc(free)
            _U16.pack_into(self.buf, base + 16, d.id)
            _U16.pack_into(self.buf, base + 18, d.flags)
            struct.pack_into("<I", self.buf, base + 20, d.len & 0xFFFFFFFF)
            _U64.pack_into(self.buf, base + 24, d.addr)
            free = self._get_entry16(free, 2)
            self._set16(12, free)
            if k == n - 1:
                self._set16(14, free)
        return head

    # "When supplying used buffers to the driver"
    def link_batch(self, entries: list[int]) -> None:
        """Steps 1-4 per used head entry: desc[e.last].next = free_head; free_head = e."""
        free = self.free_head
        for e in entries:
            last = self._get_entry16(e, 4)
            self._set_entry16(last, 2, free)
            free = e
        self._set16(12, free)

    def set_used(self, used_idx: int, used_wrap: bool) -> None:
        """Increase used_idx (and the wrap counter): before the ring flags are written."""
        self._set16(16, used_idx)
        self.buf[self.offset + 20] = int(used_wrap)

    def clear_batch(self, entries: list[int]) -> None:
        """After the ring flags were written: inflight = 0, then commit the old_* copies."""
        for e in entries:
            self.buf[self._desc(e)] = 0
        self._set16(14, self.free_head)
        self._set16(18, self.used_idx)
        self.buf[self.offset + 21] = self.used_wrap_counter

    def chain_of(self, entry: int) -> tuple[PackedDescCopy, ...]:
        """The descriptor copies of the chain whose head entry is ``entry``."""
        _inflight, _next, last, num, _counter, _id, _flags, _len, _addr = self.entry(entry)
        if num == 0 or num > self.desc_num:
            raise InflightError(f"packed in-flight entry {entry} holds num {num}")
        out: list[PackedDescCopy] = []
        e = entry
        for k in range(num):
            if e >= self.desc_num:
                raise InflightError(f"packed in-flight chain of entry {entry} reaches entry {e}")
            _i, nxt, _l, _n, _c, did, dflags, dlen, daddr = self.entry(e)
            out.append(PackedDescCopy(daddr, dlen, did, dflags))
            if k == num - 1:
                if e != last:
                    raise InflightError(
                        f"packed in-flight chain of entry {entry}: last is {last}, walk ends at {e}"
                    )
                break
            e = nxt
        return tuple(out)

    def recover(self, ring_flags_at: Any) -> tuple[list[PackedResubmit], int, int, bool]:
        """Reconnect rules, at ring start. ``ring_flags_at(idx)`` reads the flags of
        descriptor ring entry ``idx``.

        Returns (chains to resubmit in counter order, next counter, used_idx, used_wrap)
        after the roll-back. The caller initialises a version-0 region itself.
        """
        if self.version != INFLIGHT_VERSION:
            raise InflightError(f"packed in-flight region version {self.version}, expected 1")
        if self.header_desc_num != self.desc_num:
            raise InflightError(
                f"packed in-flight region desc_num {self.header_desc_num}, "
                f"expected the queue size {self.desc_num}"
            )
        if (self.used_idx, self.used_wrap_counter) != (
            self.old_used_idx,
            self.old_used_wrap_counter,
        ):
            old_wrap = self.old_used_wrap_counter
            # Available pattern for wrap counter w: AVAIL (bit 7) = w, USED (bit 15) = !w.
            avail_pattern = (old_wrap << 7) | ((not old_wrap) << 15)
            flags = ring_flags_at(self.old_used_idx) & 0x8080
            if flags != avail_pattern:
                # The used descriptor reached the ring: commit the in-progress update.
                self._set16(14, self.free_head)
                self._set16(18, self.used_idx)
                self.buf[self.offset + 21] = self.used_wrap_counter
        # Roll back any in-progress update.
        self._set16(12, self.old_free_head)
        self._set16(16, self.old_used_idx)
        self.buf[self.offset + 20] = self.old_used_wrap_counter
        # Entries on the free list are not in flight.
        e = self.free_head
        for _ in range(self.desc_num):
            if e >= self.desc_num:
                break
            self.buf[self._desc(e)] = 0
            e = self._get_entry16(e, 2)
        chains = []
        for entry in range(self.desc_num):
            if self.buf[self._desc(entry)] == 1:
                chains.append(PackedResubmit(entry, self.chain_of(entry), self.entry(entry)[4]))
        chains.sort(key=lambda c: c.counter)
        next_counter = max((c.counter for c in chains), default=0) + 1
        return chains, next_counter, self.used_idx, bool(self.used_wrap_counter)
