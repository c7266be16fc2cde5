"""The blk driver's fast path (the benchmark's, ``bench/``): requests of one shape (header,
at most one data buffer, status byte) as an indirect table kept per request slot, its data
buffer allocated once and its descriptors rewritten from a cached image, so that a request
costs a header store, a table copy and one ring head. :class:`FastPath` is owned by
``blk.BlkDriver`` (which shares its request slots, arena and outstanding table with it) and
builds the same descriptors ``BlkDriver.raw`` builds for that shape."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.virtqueue import (
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    PackedVirtqueue,
    SplitVirtqueue,
    Virtqueue,
)

if TYPE_CHECKING:
    from vhost_conformance.frontend.blk import BlkRequest

SECTOR_SIZE = 512
#: The most data bytes a fast-path request carries (one buffer per slot).
SLOT_DATA_MAX = 64 * 1024
HEADER_STATUS = struct.Struct("<IIQB")  # the header, then the status byte at +16 (a slot)
SPLIT_TABLE_DESC = struct.Struct("<QIHH")  # addr, len, flags, next (VIRTIO 1.x 2.7.5)
PACKED_TABLE_DESC = struct.Struct("<QIHH")  # addr, len, id, flags (VIRTIO 1.x 2.8.13)


class Arena(Protocol):
    """The driver's data-buffer allocator, as the fast path uses it."""

    def alloc(self, size: int, align: int = 64) -> int:
        """A block of ``size`` bytes of guest memory."""

    def free(self, gpa: int) -> None:
        """Give a block back."""


class SlotShape:
    """What one request slot keeps between requests of the same shape (fast path): its data
    buffer (allocated once), a view of it, and the image of its indirect table (header, data,
    status descriptors) copied into the slot's table in one store."""

    __slots__ = ("block", "capacity", "data_bufs", "image", "image_len", "in_bufs", "key",
                 "ndesc", "out_bufs", "request", "view", "writable")

    def __init__(self) -> None:
        self.key = -1  # data bytes << 1 | device-writable data
        self.block = -1  # GPA of the slot's data buffer, -1: none yet
        self.capacity = 0
        self.view: memoryview | None = None
        self.image = b""
        self.image_len = 0
        self.ndesc = 0
        self.writable = 0
        self.out_bufs: tuple[tuple[int, int], ...] = ()
        self.data_bufs: tuple[tuple[int, int], ...] = ()
        self.in_bufs: tuple[tuple[int, int], ...] = ()
        self.request: BlkRequest | None = None  # the fast-path request in the slot now


class FastPath:
    """The per-slot fast path of one :class:`~vhost_conformance.frontend.blk.BlkDriver`."""

    def __init__(self, vq: Virtqueue, memory: GuestMemory, *, arena: Arena, slots_gpa: int,
                 slots_view: memoryview, free_slots: list[int],
                 outstanding: dict[int, BlkRequest],
                 make_request: Callable[..., BlkRequest], tags: Iterator[int]) -> None:
        self.vq = vq
        self.memory = memory
        self.arena = arena
        self.slots_gpa = slots_gpa
        self.slots_view = slots_view
        self.free_slots = free_slots
        self.outstanding = outstanding
        self.make_request = make_request
        self.tags = tags
        # per slot, a data buffer kept across requests and an indirect table of up to 3
        # descriptors, allocated on first use; the table is rewritten from a cached image
        self.shapes: list[SlotShape | None] = [None] * vq.size
        self.tables_gpa = -1
        self.tables_view: memoryview | None = None
        self.usable = isinstance(vq, (SplitVirtqueue, PackedVirtqueue))

    def shape(self, slot: int, data_len: int, writable_data: bool) -> SlotShape:
        """Prepare ``slot`` for requests of ``data_len`` data bytes (device-writable or not):
        its data buffer (kept; a bigger one replaces it), a view of it, the table image."""
        vq = self.vq
        if self.tables_view is None:
            self.tables_gpa = self.memory.alloc(48 * vq.size, 16)
            self.tables_view = self.memory.view(self.tables_gpa, 48 * vq.size)
        shape = self.shapes[slot]
        if shape is None:
            shape = self.shapes[slot] = SlotShape()
        if data_len > shape.capacity:
            if shape.block >= 0:
                self.arena.free(shape.block)
                shape.block, shape.capacity = -1, 0
            capacity = (data_len + 511) // 512 * 512
            shape.block = self.arena.alloc(capacity)
            shape.capacity = capacity
        header_gpa = self.slots_gpa + 32 * slot
        descs: list[tuple[int, int, bool]] = [(header_gpa, 16, False)]
        if data_len:
            descs.append((shape.block, data_len, writable_data))
            shape.view = self.memory.view(shape.block, data_len)
        else:
            shape.view = None
        descs.append((header_gpa + 16, 1, True))
        n = len(descs)
        image = bytearray()
        for i, (gpa, length, writable) in enumerate(descs):
            if vq.packed:  # 2.8.13: a packed indirect table has no NEXT chaining
                image += PACKED_TABLE_DESC.pack(gpa, length, 0,
                                                 VIRTQ_DESC_F_WRITE if writable else 0)
            else:
                flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (
                    VIRTQ_DESC_F_NEXT if i + 1 < n else 0)
                image += SPLIT_TABLE_DESC.pack(gpa, length, flags, i + 1)
        shape.image = bytes(image)
        shape.ndesc = n
        shape.writable = 1 + (data_len if writable_data else 0)
        data = ((shape.block, data_len),) if data_len else ()
        shape.out_bufs = () if writable_data else data
        shape.in_bufs = data if writable_data else ()
        shape.image_len = len(shape.image)
        shape.data_bufs = data
        shape.key = data_len << 1 | writable_data
        return shape

    def add(self, type: int, sector: int, ioprio: int, out_data: bytes,
            in_len: int) -> BlkRequest:
        """Header, at most one data buffer, status byte, as an indirect table kept per slot
        (the same descriptors ``BlkDriver.raw`` builds for that shape)."""
        free_slots = self.free_slots
        if not free_slots:
            raise RuntimeError(f"vq {self.vq.index}: all {self.vq.size} request slots in use")
        slot = free_slots.pop()
        try:
            data_len = len(out_data) or in_len
            key = data_len << 1 | (in_len > 0)
            shape = self.shapes[slot]
            if shape is None or shape.key != key:
                shape = self.shape(slot, data_len, in_len > 0)
            slot_off = slot << 5
            HEADER_STATUS.pack_into(self.slots_view, slot_off, type, ioprio, sector, 0xFF)
            if out_data:
                view = shape.view
                assert view is not None
                view[:] = out_data
            table_off = 48 * slot
            tables_view = self.tables_view
            assert tables_view is not None
            tables_view[table_off : table_off + shape.image_len] = shape.image
            header_gpa = self.slots_gpa + slot_off
            request = self.make_request(
                next(self.tags), type, sector, -1, self.vq.index, header_gpa, header_gpa + 16,
                list(shape.data_bufs), list(shape.in_bufs), out_data, data_len >> 9,
                shape.writable, slot, [],
            )
            request.head = self.vq.add_indirect(
                self.tables_gpa + table_off, shape.ndesc, shape.writable, request)
        except BaseException:
            free_slots.append(slot)
            raise
        shape.request = request
        self.outstanding[request.tag] = request
        return request

    def ok(self, indirect: bool | None) -> bool:
        """Whether a request with this ``indirect`` choice can take the fast path: it needs
        an indirect table the ring (one of ours) can take as one head."""
        return bool(indirect or (indirect is None and self.vq.indirect)) and self.usable

    def read_many(self, sectors: Iterable[int], nsectors: int) -> list[BlkRequest] | None:
        """VIRTIO_BLK_T_IN of ``nsectors`` sectors at each of ``sectors`` (the bulk form of
        ``BlkDriver.read``: same requests, less work per request when each request slot keeps
        its data buffer and indirect table; then all or none are added). Nothing is published.
        None when the fast path cannot take them (the driver reads them one by one)."""
        in_len = nsectors * SECTOR_SIZE
        vq = self.vq
        if not (0 < in_len <= SLOT_DATA_MAX and self.ok(None)):
            return None
        sectors = list(sectors)
        count = len(sectors)
        free_slots = self.free_slots
        if count > len(free_slots):
            raise RuntimeError(f"vq {vq.index}: {count} request slots asked, "
                               f"{len(free_slots)} free (size {vq.size})")
        if count > vq.free_count:
            raise RuntimeError(f"vq {vq.index}: {count} requests, {vq.free_count} free "
                               f"descriptors (size {vq.size})")
        slots = free_slots[len(free_slots) - count :][::-1]
        key = in_len << 1 | 1
        shapes = self.shapes
        for slot in slots:  # first use of a slot, or another shape before: prepare it
            shape = shapes[slot]
            if shape is None or shape.key != key:
                self.shape(slot, in_len, True)
        slots_view, tables_view = self.slots_view, self.tables_view
        assert tables_view is not None
        slots_gpa, tables_gpa = self.slots_gpa, self.tables_gpa
        pack_into = HEADER_STATUS.pack_into
        index = vq.index
        tags = self.tags
        make = self.make_request
        requests: list[BlkRequest] = []
        append = requests.append
        tables: list[int] = []
        append_table = tables.append
        writable = in_len + 1
        for slot, sector in zip(slots, sectors, strict=True):
            shape = shapes[slot]
            assert shape is not None
            slot_off = slot << 5
            pack_into(slots_view, slot_off, 0, 0, sector, 0xFF)
            table_off = 48 * slot
            tables_view[table_off : table_off + 48] = shape.image
            header_gpa = slots_gpa + slot_off
            data_bufs = list(shape.data_bufs)
            request = make(next(tags), 0, sector, -1, index, header_gpa, header_gpa + 16,
                                 data_bufs, list(data_bufs), b"", nsectors, writable, slot, [])
            shape.request = request
            append(request)
            append_table(tables_gpa + table_off)
        heads = vq.add_indirect_many(tables, 3, writable, requests)
        del free_slots[len(free_slots) - count :]
        outstanding = self.outstanding
        for request, head in zip(requests, heads, strict=True):
            request.head = head
            outstanding[request.tag] = request
        return requests

    def take(self, request: BlkRequest) -> tuple[bool, memoryview | None]:
        """A used request: (True, its data view) when its slot is a fast-path slot holding it
        (the slot's own buffer, nothing to free; the slot is free again), else (False, None)."""
        slot = request.slot
        shape = self.shapes[slot]
        if shape is not None and shape.request is request:
            shape.request = None
            self.free_slots.append(slot)
            return True, shape.view if shape.in_bufs else None
        return False, None

    def retained_bytes(self) -> int:
        """Bytes of data buffers kept by request slots (fast path) rather than the arena."""
        return sum(shape.capacity for shape in self.shapes if shape is not None)
