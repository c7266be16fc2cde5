"""virtio-blk, driver side: request types, the config space, a model disk, and a driver that
builds requests in guest memory on a :class:`~vhost_conformance.frontend.virtqueue.Virtqueue`.

Request layout (SPEC-DIGEST 8; VIRTIO 1.x 5.2.6): a 16-byte header ``type u32, ioprio u32,
sector u64`` (512-byte units) that the device reads, then the data (device-readable for OUT,
DISCARD, WRITE_ZEROES, SECURE_ERASE; device-writable for IN, GET_ID, GET_LIFETIME), then one
device-writable status byte. The driver adds requests; the session publishes and kicks;
:meth:`BlkDriver.complete` takes what the ring reaped, reads status and data back and checks
reads against :class:`ModelDisk`, recording mismatches instead of raising.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, cast

from typing_extensions import TypeVar
from vhost_conformance.frontend.blk_fast import SLOT_DATA_MAX, FastPath
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.virtqueue import (
    Virtqueue,
)

__all__ = [
    "SECTOR_SIZE",
    "VIRTIO_BLK_ID_BYTES",
    "VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP",
    "BlkCompletion",
    "BlkConfig",
    "BlkDriver",
    "BlkRequest",
    "BlkRequestType",
    "BlkStatus",
    "Mismatch",
    "ModelDisk",
]

SECTOR_SIZE = 512  # the header's sector unit, whatever blk_size says (VIRTIO 1.x 5.2.6)
VIRTIO_BLK_ID_BYTES = 20
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
_HEADER = struct.Struct("<IIQ")  # type, ioprio (reserved), sector
#: data buffers up to this size stay with their request slot (allocated once, reused)
_SEGMENT = struct.Struct("<QII")  # discard/write-zeroes/secure-erase: sector, num_sectors, flags


class BlkRequestType(enum.IntEnum):
    """virtio-blk request types (SPEC-DIGEST 8)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class BlkStatus(enum.IntEnum):
    """The status byte."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


# -------------------------------------------------------------------------------------------
# Config space
# -------------------------------------------------------------------------------------------

# struct virtio_blk_config (packed), SPEC-DIGEST 8: (name, offset, struct format).
_CONFIG_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("capacity", 0, "Q"),
    ("size_max", 8, "I"),
    ("seg_max", 12, "I"),
    ("cylinders", 16, "H"),
    ("heads", 18, "B"),
    ("sectors", 19, "B"),
    ("blk_size", 20, "I"),
    ("physical_block_exp", 24, "B"),
    ("alignment_offset", 25, "B"),
    ("min_io_size", 26, "H"),
    ("opt_io_size", 28, "I"),
    ("wce", 32, "B"),
    ("num_queues", 34, "H"),
    ("max_discard_sectors", 36, "I"),
    ("max_discard_seg", 40, "I"),
    ("discard_sector_alignment", 44, "I"),
    ("max_write_zeroes_sectors", 48, "I"),
    ("max_write_zeroes_seg", 52, "I"),
    ("write_zeroes_may_unmap", 56, "B"),
    ("max_secure_erase_sectors", 60, "I"),
    ("max_secure_erase_seg", 64, "I"),
    ("secure_erase_sector_alignment", 68, "I"),
    ("zone_sectors", 72, "I"),
    ("max_open_zones", 76, "I"),
    ("max_active_zones", 80, "I"),
    ("max_append_sectors", 84, "I"),
    ("write_granularity", 88, "I"),
    ("zoned_model", 92, "B"),
)


@dataclass(frozen=True)
class BlkConfig:
    """``struct virtio_blk_config``; a field is None when the bytes given did not cover it."""

    SIZE: ClassVar[int] = 96
    capacity: int | None = None
    size_max: int | None = None
    seg_max: int | None = None
    cylinders: int | None = None
    heads: int | None = None
    sectors: int | None = None
    blk_size: int | None = None
    physical_block_exp: int | None = None
    alignment_offset: int | None = None
    min_io_size: int | None = None
    opt_io_size: int | None = None
    wce: int | None = None
    num_queues: int | None = None
    max_discard_sectors: int | None = None
    max_discard_seg: int | None = None
    discard_sector_alignment: int | None = None
    max_write_zeroes_sectors: int | None = None
    max_write_zeroes_seg: int | None = None
    write_zeroes_may_unmap: int | None = None
    max_secure_erase_sectors: int | None = None
    max_secure_erase_seg: int | None = None
    secure_erase_sector_alignment: int | None = None
    zone_sectors: int | None = None
    max_open_zones: int | None = None
    max_active_zones: int | None = None
    max_append_sectors: int | None = None
    write_granularity: int | None = None
    zoned_model: int | None = None

    @classmethod
    def decode(cls, data: bytes) -> BlkConfig:
        """Decode as many whole fields as ``data`` holds (GET_CONFIG may return any size: QEMU
        asks 57 bytes when DISCARD and WRITE_ZEROES are offered, QEMU-TRACES (a))."""
        values: dict[str, int] = {}
        for name, offset, fmt in _CONFIG_FIELDS:
            end = offset + struct.calcsize(fmt)
            if end <= len(data):
                values[name] = struct.unpack_from("<" + fmt, data, offset)[0]
        return cls(**values)

    def encode(self, size: int | None = None) -> bytes:
        """``size`` bytes (default: up to the last field that is set), unset fields zero."""
        if size is None:
            size = 0
            for name, offset, fmt in _CONFIG_FIELDS:
                if getattr(self, name) is not None:
                    size = offset + struct.calcsize(fmt)
        out = bytearray(max(size, self.SIZE))
        for name, offset, fmt in _CONFIG_FIELDS:
            value = getattr(self, name)
            if value is not None:
                struct.pack_into("<" + fmt, out, offset, value)
        return bytes(out[:size])

    @property
    def capacity_bytes(self) -> int | None:
        """The capacity in bytes (capacity counts 512-byte sectors)."""
        return None if self.capacity is None else self.capacity * SECTOR_SIZE


# -------------------------------------------------------------------------------------------
# Model disk
# -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A sector read back with content the model does not allow."""

    tag: int
    sector: int
    acceptable: int  # how many contents would have been accepted
    seen_prefix: bytes  # first 16 bytes read
    expected_prefix: bytes  # first 16 bytes of the model's main candidate

    def __str__(self) -> str:
        return (f"request {self.tag}: sector {self.sector} read {self.seen_prefix.hex()}..., "
                f"expected {self.expected_prefix.hex()}... "
                f"(one of {self.acceptable} acceptable contents)")


class ModelDisk:
    """What every 512-byte sector may contain.

    ``base`` holds one acceptable content per sector (always acceptable). Sectors touched by
    something whose outcome is open (a discard: old data or zeroes; a write or write-zeroes in
    flight across a crash or migration: old or new) also accept the contents listed in
    ``_extra`` until the outcome is known.
    """

    def __init__(self, size_bytes: int) -> None:
        if size_bytes <= 0 or size_bytes % SECTOR_SIZE:
            raise ValueError(f"model disk size {size_bytes} is not a positive multiple of 512")
        self.size_bytes = size_bytes
        self.nsectors = size_bytes // SECTOR_SIZE
        self.base = bytearray(size_bytes)
        self._extra: dict[int, list[bytes]] = {}
        self._any: set[int] = set()  # sectors whose content is unspecified (any is accepted)
        # tag -> (first sector, data) of writes whose completion is not known yet
        self._pending: dict[int, tuple[int, bytes]] = {}

    def _check_range(self, sector: int, nsectors: int) -> None:
        if sector < 0 or nsectors < 0 or sector + nsectors > self.nsectors:
            raise ValueError(f"sectors [{sector}, {sector + nsectors}) outside the model disk "
                             f"({self.nsectors} sectors)")

    def _sector(self, sector: int) -> bytes:
        return bytes(self.base[sector * SECTOR_SIZE : (sector + 1) * SECTOR_SIZE])

    def load(self, data: bytes, offset: int = 0) -> None:
        """Set the initial content (e.g. the disk image the suite created)."""
        if offset % SECTOR_SIZE or len(data) % SECTOR_SIZE:
            raise ValueError("load() takes whole sectors")
        self._check_range(offset // SECTOR_SIZE, len(data) // SECTOR_SIZE)
        self.base[offset : offset + len(data)] = data

    def apply_write(self, sector: int, data: bytes) -> None:
        """A completed write: the sectors now hold ``data`` (and only it, unless other writes
        to them are still pending)."""
        if len(data) % SECTOR_SIZE:
            raise ValueError(f"write of {len(data)} bytes is not whole sectors")
        n = len(data) // SECTOR_SIZE
        self._check_range(sector, n)
        self.base[sector * SECTOR_SIZE : sector * SECTOR_SIZE + len(data)] = data
        for s in range(sector, sector + n):
            self._extra.pop(s, None)
            self._any.discard(s)
        self._readd_pending(sector, n)

    def apply_unknown(self, sector: int, nsectors: int) -> None:
        """Sectors whose content is unspecified from now on (e.g. after SECURE_ERASE) until the
        next completed write: any content is accepted."""
        self._check_range(sector, nsectors)
        self._any.update(range(sector, sector + nsectors))

    def apply_zeroes(self, sector: int, nsectors: int) -> None:
        """A completed WRITE_ZEROES (with or without unmap, reads return zeroes)."""
        self.apply_write(sector, bytes(nsectors * SECTOR_SIZE))

    def apply_discard(self, sector: int, nsectors: int) -> None:
        """A discard: each sector may now read as before or as zeroes."""
        self._check_range(sector, nsectors)
        zero = bytes(SECTOR_SIZE)
        for s in range(sector, sector + nsectors):
            alternatives = self._extra.setdefault(s, [])
            if zero not in alternatives:
                alternatives.append(zero)

    def pending_write(self, tag: int, sector: int, data: bytes) -> None:
        """A write (or write-zeroes: zero data) whose completion is unknown: until
        :meth:`resolve`, each sector may hold its old or its new content."""
        if len(data) % SECTOR_SIZE:
            raise ValueError(f"write of {len(data)} bytes is not whole sectors")
        self._check_range(sector, len(data) // SECTOR_SIZE)
        self._pending[tag] = (sector, bytes(data))
        self._add_alternatives(sector, data)

    def _add_alternatives(self, sector: int, data: bytes) -> None:
        for i in range(len(data) // SECTOR_SIZE):
            chunk = data[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE]
            alternatives = self._extra.setdefault(sector + i, [])
            if chunk not in alternatives:
                alternatives.append(chunk)

    def _readd_pending(self, sector: int, n: int) -> None:
        for other_sector, other in self._pending.values():
            other_n = len(other) // SECTOR_SIZE
            if other_sector < sector + n and sector < other_sector + other_n:
                self._add_alternatives(other_sector, other)

    def resolve(self, tag: int, completed: bool | None) -> None:
        """The outcome of pending write ``tag``: True = it completed (new content), False = it
        never executed (old content only), None = it failed or is lost (keep both)."""
        entry = self._pending.pop(tag, None)
        if entry is None:
            return
        sector, data = entry
        if completed:
            self.apply_write(sector, data)
        elif completed is False:
            n = len(data) // SECTOR_SIZE
            for i in range(n):
                chunk = data[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE]
                alternatives = self._extra.get(sector + i)
                if alternatives and chunk in alternatives:
                    alternatives.remove(chunk)
                    if not alternatives:
                        del self._extra[sector + i]
            self._readd_pending(sector, n)

    @property
    def pending_tags(self) -> list[int]:
        """Writes whose outcome is still open."""
        return list(self._pending)

    def expected(self, sector: int, n: int) -> bytes:
        """One acceptable content of ``n`` sectors (the model's main candidate)."""
        self._check_range(sector, n)
        return bytes(self.base[sector * SECTOR_SIZE : (sector + n) * SECTOR_SIZE])

    def acceptable(self, sector: int) -> list[bytes]:
        """Every content sector ``sector`` may hold now."""
        self._check_range(sector, 1)
        base = self._sector(sector)
        return [base, *(a for a in self._extra.get(sector, ()) if a != base)]

    def check(self, sector: int, data: bytes | memoryview, *, tag: int = -1) -> list[Mismatch]:
        """Compare ``data`` read from ``sector`` with the model; one :class:`Mismatch` per bad
        sector."""
        n = len(data) // SECTOR_SIZE
        self._check_range(sector, n)
        start = sector * SECTOR_SIZE
        # bytearray == any buffer is a memcmp (memoryview == memoryview compares items)
        if self.base[start : start + len(data)] == data:  # type: ignore[comparison-overlap]
            return []
        data = bytes(data)
        bad = []
        for i in range(n):
            if sector + i in self._any:
                continue
            got = data[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE]
            allowed = self.acceptable(sector + i)
            if got not in allowed:
                bad.append(Mismatch(tag, sector + i, len(allowed), bytes(got[:16]),
                                    allowed[0][:16]))
        return bad

    def observe(self, sector: int, data: bytes) -> None:
        """Settle sectors to what a read showed, where that read was acceptable and nothing is
        pending on them (a discarded sector that read as zeroes stays zeroes)."""
        pending_sectors: set[int] = set()
        for s, d in self._pending.values():
            pending_sectors.update(range(s, s + len(d) // SECTOR_SIZE))
        for i in range(len(data) // SECTOR_SIZE):
            s = sector + i
            if s in self._extra and s not in pending_sectors:
                got = data[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE]
                if got in self.acceptable(s):
                    self.base[s * SECTOR_SIZE : (s + 1) * SECTOR_SIZE] = got
                    del self._extra[s]


# -------------------------------------------------------------------------------------------
# Requests and the driver
# -------------------------------------------------------------------------------------------

_tags = itertools.count(1)


@dataclass(eq=False, slots=True)
class BlkRequest:
    """One request handed to the ring: unique ``tag`` (unique across drivers, for exactly-once
    accounting across stop/migration/reconnect), what it asks, where it lives in guest memory."""

    tag: int
    type: int
    sector: int
    head: int  # split head / packed buffer id
    queue: int
    header_gpa: int
    status_gpa: int | None
    data_bufs: list[tuple[int, int]]  # (gpa, len) of the data descriptors, readable first
    in_data_bufs: list[tuple[int, int]]  # the device-writable ones among them
    out_data: bytes = b""  # what OUT / DISCARD / WRITE_ZEROES carried
    nsectors: int = 0
    writable_len: int = 0  # device-writable bytes (data if any, plus status)
    slot: int = -1
    blocks: list[int] = field(default_factory=list)  # arena blocks to free

    @property
    def data_len(self) -> int:
        """Total data bytes."""
        return sum(n for _, n in self.data_bufs)


#: what a completion's ``data`` is: a copy (``bytes``, what cases see) or a view of the guest
#: buffer (``memoryview``, :meth:`BlkDriver.complete_views`, for bulk paths)
DataT = TypeVar("DataT", bytes, memoryview, default=bytes)


@dataclass(frozen=True, slots=True)
class BlkCompletion(Generic[DataT]):
    """A used request: the status byte, the data read back (device-writable requests), the
    device's used ``len``, and read mismatches against the model. The one shape of a
    completion; ``BlkCompletion`` (``data`` a copy) unless made by
    :meth:`BlkDriver.complete_views`: ``BlkCompletion[memoryview]``, whose data view stays valid
    until the request's slot carries another request (copy what must outlive that) and is
    released when the guest memory closes."""

    request: BlkRequest
    status: int
    len: int
    data: DataT | None
    mismatches: tuple[Mismatch, ...] = ()

    @property
    def tag(self) -> int:
        """The request's tag."""
        return self.request.tag

    @property
    def ok(self) -> bool:
        """Status OK and no mismatch."""
        return self.status == BlkStatus.OK and not self.mismatches


# the slot descriptors of BlkCompletion's fields (_complete fills new instances with them)
_COMPLETION_SETTERS = tuple(
    getattr(BlkCompletion, name).__set__
    for name in ("request", "status", "len", "data", "mismatches"))


class _Chunk:
    """One piece of guest memory with a sorted list of free ``(gpa, len)`` ranges."""

    __slots__ = ("end", "free", "start")

    def __init__(self, start: int, size: int) -> None:
        self.start = start
        self.end = start + size
        self.free: list[tuple[int, int]] = [(start, size)]

    def alloc(self, size: int, align: int) -> int | None:
        for i, (gpa, length) in enumerate(self.free):
            start = (gpa + align - 1) // align * align
            if start + size <= gpa + length:
                pieces = []
                if start > gpa:
                    pieces.append((gpa, start - gpa))
                if start + size < gpa + length:
                    pieces.append((start + size, gpa + length - start - size))
                self.free[i : i + 1] = pieces
                return start
        return None

    def release(self, gpa: int, size: int) -> None:
        i = bisect.bisect(self.free, (gpa, size))
        lo, hi = gpa, gpa + size
        if i < len(self.free) and self.free[i][0] == hi:
            hi += self.free[i][1]
            del self.free[i]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == lo:
            lo = self.free[i - 1][0]
            del self.free[i - 1]
            i -= 1
        self.free.insert(i, (lo, hi - lo))


class _Arena:
    """Allocator for data buffers over chunks of guest memory taken on demand: freed blocks are
    kept per size for O(1) reuse (requests repeat their sizes) and returned to their chunk's
    first-fit free list, coalescing, only when a request does not fit otherwise."""

    def __init__(self, memory: GuestMemory, chunk: int) -> None:
        self._memory = memory
        self._chunk = chunk
        self._chunks: list[_Chunk] = []
        self._starts: list[int] = []
        self._sizes: dict[int, int] = {}
        self._cache: dict[int, list[int]] = {}

    def alloc(self, size: int, align: int = 64) -> int:
        cached = self._cache.get(size)
        if cached:
            block = cached.pop()
            self._sizes[block] = size
            return block
        gpa = self._first_fit(size, align)
        if gpa is None and self._cache:
            self._flush_cache()
            gpa = self._first_fit(size, align)
        if gpa is None:
            chunk_size = max(self._chunk, (size + align + 4095) // 4096 * 4096)
            chunk = _Chunk(self._memory.alloc(chunk_size, 4096), chunk_size)
            index = bisect.bisect(self._starts, chunk.start)
            self._chunks.insert(index, chunk)
            self._starts.insert(index, chunk.start)
            gpa = chunk.alloc(size, align)
            assert gpa is not None
        self._sizes[gpa] = size
        return gpa

    def _first_fit(self, size: int, align: int) -> int | None:
        for chunk in self._chunks:
            gpa = chunk.alloc(size, align)
            if gpa is not None:
                return gpa
        return None

    def _flush_cache(self) -> None:
        for size, blocks in self._cache.items():
            for gpa in blocks:
                self._chunks[bisect.bisect(self._starts, gpa) - 1].release(gpa, size)
        self._cache.clear()

    def free(self, gpa: int) -> None:
        size = self._sizes.pop(gpa)
        self._cache.setdefault(size, []).append(gpa)

    @property
    def free_bytes(self) -> int:
        """Free bytes over all chunks (coalesces the per-size cache first)."""
        self._flush_cache()
        return sum(n for c in self._chunks for _, n in c.free)

    @property
    def total_bytes(self) -> int:
        """Bytes of all chunks."""
        return sum(c.end - c.start for c in self._chunks)


class BlkDriver:
    """Builds virtio-blk requests on one virtqueue; see the module docstring."""

    def __init__(self, vq: Virtqueue, memory: GuestMemory, *, model: ModelDisk | None = None,
                 data_chunk: int = 1 << 20) -> None:
        self.vq = vq
        self.memory = memory
        self.model = model
        self.outstanding: dict[int, BlkRequest] = {}
        #: completions a wait reaped for requests no one waited for yet, by tag: the next
        #: wait for them takes them from here (``Session.wait_requests``)
        self.unclaimed: dict[int, BlkCompletion] = {}
        self.mismatches: list[Mismatch] = []
        # One 32-byte slot per possible request: header at +0, status byte at +16.
        self._slots_gpa = memory.alloc(32 * vq.size, 64)
        self._slots_view = memory.view(self._slots_gpa, 32 * vq.size)
        self._free_slots = list(range(vq.size - 1, -1, -1))
        self._arena = _Arena(memory, data_chunk)
        # Fast path (one data buffer at most, status byte, indirect; frontend/blk_fast.py)
        self._fast = FastPath(vq, memory, arena=self._arena, slots_gpa=self._slots_gpa,
                              slots_view=self._slots_view, free_slots=self._free_slots,
                              outstanding=self.outstanding, make_request=BlkRequest, tags=_tags)

    # -- building ---------------------------------------------------------------------------

    def _data_bufs(self, total: int, segments: int, req_blocks: list[int]) -> list[tuple[int, int]]:
        if total == 0:
            return []
        alloc = self._arena.alloc
        if segments <= 1:
            gpa = alloc(total)
            req_blocks.append(gpa)
            return [(gpa, total)]
        segments = min(segments, total)
        base, extra = divmod(total, segments)
        bufs = []
        for i in range(segments):
            n = base + (1 if i < extra else 0)
            gpa = alloc(n)
            req_blocks.append(gpa)
            bufs.append((gpa, n))
        return bufs

    def read_many(self, sectors: Iterable[int], nsectors: int) -> list[BlkRequest]:
        """VIRTIO_BLK_T_IN of ``nsectors`` sectors at each of ``sectors`` (the bulk form of
        :meth:`read`, through the fast path when it can take them: then all or none are
        added). Nothing is published."""
        sectors = list(sectors)
        requests = self._fast.read_many(sectors, nsectors)
        if requests is None:
            return [self.read(sector, nsectors) for sector in sectors]
        return requests

    def raw(self, type: int, *, sector: int = 0, out_data: bytes = b"", in_len: int = 0,
            segments: int = 1, status: bool = True, ioprio: int = 0,
            header_writable: bool = False, indirect: bool | None = None) -> BlkRequest:
        """Any request: header, ``out_data`` (device-readable), ``in_len`` device-writable bytes,
        then the status byte (``status=False`` leaves it out; ``header_writable`` makes
        the header device-writable, for hostile cases)."""
        if (status and not header_writable and (segments == 1 or not (out_data or in_len))
                and not (out_data and in_len) and len(out_data) + in_len <= SLOT_DATA_MAX
                and self._fast.ok(indirect)):
            return self._fast.add(type, sector, ioprio, out_data, in_len)
        free_slots = self._free_slots
        if not free_slots:
            raise RuntimeError(f"vq {self.vq.index}: all {self.vq.size} request slots in use")
        slot = free_slots.pop()
        slot_off = 32 * slot
        header_gpa = self._slots_gpa + slot_off
        status_gpa = header_gpa + 16
        slots_view = self._slots_view
        _HEADER.pack_into(slots_view, slot_off, type, ioprio, sector)
        slots_view[slot_off + 16] = 0xFF  # a status the device must overwrite
        blocks: list[int] = []
        try:
            out_data_bufs = self._data_bufs(len(out_data), segments, blocks)
            if out_data_bufs:
                off = 0
                write = self.memory.write
                for gpa, n in out_data_bufs:
                    write(gpa, out_data[off : off + n])
                    off += n
            in_data_bufs = self._data_bufs(in_len, segments, blocks)
            header = (header_gpa, 16)
            if header_writable:
                out_bufs = out_data_bufs
                in_bufs = [header, *in_data_bufs]
            else:
                out_bufs = [header, *out_data_bufs]
                in_bufs = list(in_data_bufs)
            writable_len = in_len + (16 if header_writable else 0)
            if status:
                in_bufs.append((status_gpa, 1))
                writable_len += 1
            request = BlkRequest(
                next(_tags), type, sector, -1, self.vq.index, header_gpa,
                status_gpa if status else None, out_data_bufs + in_data_bufs, in_data_bufs,
                out_data, (len(out_data) or in_len) // SECTOR_SIZE, writable_len, slot, blocks,
            )
            request.head = self.vq.add(out_bufs, in_bufs, request, indirect=indirect)
        except BaseException:
            free_slots.append(slot)
            for gpa in blocks:
                self._arena.free(gpa)
            raise
        self.outstanding[request.tag] = request
        return request

    def read(self, sector: int, nsectors: int, *, segments: int = 1,
             indirect: bool | None = None) -> BlkRequest:
        """VIRTIO_BLK_T_IN of ``nsectors`` sectors."""
        in_len = nsectors * SECTOR_SIZE
        if segments == 1 and 0 < in_len <= SLOT_DATA_MAX and self._fast.ok(indirect):
            return self._fast.add(BlkRequestType.IN, sector, 0, b"", in_len)
        return self.raw(BlkRequestType.IN, sector=sector, in_len=nsectors * SECTOR_SIZE,
                        segments=segments, indirect=indirect)

    def write(self, sector: int, data: bytes, *, segments: int = 1,
              indirect: bool | None = None) -> BlkRequest:
        """VIRTIO_BLK_T_OUT; the model holds old-or-new for the sectors until completion."""
        if not data or len(data) % SECTOR_SIZE:
            raise ValueError(f"write of {len(data)} bytes: need whole 512-byte sectors")
        request = self.raw(BlkRequestType.OUT, sector=sector, out_data=data, segments=segments,
                           indirect=indirect)
        if self.model is not None:
            self.model.pending_write(request.tag, sector, data)
        return request

    def flush(self) -> BlkRequest:
        """VIRTIO_BLK_T_FLUSH."""
        return self.raw(BlkRequestType.FLUSH)

    def get_id(self) -> BlkRequest:
        """VIRTIO_BLK_T_GET_ID (20 device-writable bytes)."""
        return self.raw(BlkRequestType.GET_ID, in_len=VIRTIO_BLK_ID_BYTES)

    def _ranges(self, type: int, ranges: Sequence[tuple[int, int]], flags: int) -> BlkRequest:
        if not ranges:
            raise ValueError("at least one (sector, num_sectors) range")
        payload = b"".join(_SEGMENT.pack(s, n, flags) for s, n in ranges)
        return self.raw(type, out_data=payload)

    def discard(self, ranges: Sequence[tuple[int, int]]) -> BlkRequest:
        """VIRTIO_BLK_T_DISCARD of ``(sector, num_sectors)`` ranges; the model accepts old data
        or zeroes there from now on."""
        request = self._ranges(BlkRequestType.DISCARD, ranges, 0)
        if self.model is not None:
            for s, n in ranges:
                self.model.apply_discard(s, n)
        return request

    def secure_erase(self, ranges: Sequence[tuple[int, int]]) -> BlkRequest:
        """VIRTIO_BLK_T_SECURE_ERASE of ``(sector, num_sectors)`` ranges; the model accepts any
        content there afterwards (the spec does not say what reads return)."""
        request = self._ranges(BlkRequestType.SECURE_ERASE, ranges, 0)
        if self.model is not None:
            for s, n in ranges:
                self.model.apply_unknown(s, n)
        return request

    def write_zeroes(self, ranges: Sequence[tuple[int, int]], unmap: bool = False) -> BlkRequest:
        """VIRTIO_BLK_T_WRITE_ZEROES (flag UNMAP if asked); old-or-zero until completion."""
        flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
        request = self._ranges(BlkRequestType.WRITE_ZEROES, ranges, flags)
        if self.model is not None:
            for i, (s, n) in enumerate(ranges):
                self.model.pending_write(_sub_tag(request.tag, i), s, bytes(n * SECTOR_SIZE))
        return request

    # -- completion -------------------------------------------------------------------------

    def complete(self, used_entries: Iterable[tuple[object, int]]) -> list[BlkCompletion]:
        """Turn reaped ``(token, len)`` pairs into completions: status, data read back (a
        copy), reads checked against the model (mismatches recorded, never raised), writes
        settled in the model when OK. Tokens that are not this driver's requests are
        ignored. :meth:`complete_views` does the same without copying the data."""
        return cast("list[BlkCompletion]", self._complete(used_entries, copy=True))

    def complete_views(self, used_entries: Iterable[tuple[object, int]]
                       ) -> list[BlkCompletion[memoryview]]:
        """Like :meth:`complete`, but the data read back is a view of the guest buffer (valid
        until the request slot is reused, see :class:`BlkCompletion`): no copy, for bulk
        paths."""
        return cast("list[BlkCompletion[memoryview]]", self._complete(used_entries, copy=False))

    def _complete(self, used_entries: Iterable[tuple[object, int]], *, copy: bool
                  ) -> list[BlkCompletion[bytes]] | list[BlkCompletion[memoryview]]:
        """The one completion loop: data copied to ``bytes`` or left a view."""
        out: list[BlkCompletion[Any]] = []
        append = out.append
        model = self.model
        outstanding_pop = self.outstanding.pop
        slots_view = self._slots_view
        take_fast = self._fast.take
        new = object.__new__
        s_request, s_status, s_len, s_data, s_mismatches = _COMPLETION_SETTERS
        for token, length in used_entries:
            if type(token) is not BlkRequest and not isinstance(token, BlkRequest):
                continue
            request = token
            if outstanding_pop(request.tag, None) is None:
                continue
            status = -1 if request.status_gpa is None else slots_view[(request.slot << 5) + 16]
            fast, data = take_fast(request)
            if not fast:
                data = self._data_view(request)
                self._release(request)
            mismatches: tuple[Mismatch, ...] = ()
            if model is not None:
                mismatches = self._settle(model, request, status, data)
            # what the frozen dataclass's __init__ does, at half the cost (no __post_init__)
            c = new(BlkCompletion)
            s_request(c, request)
            s_status(c, status)
            s_len(c, length)
            s_data(c, bytes(data) if copy and data is not None else data)
            s_mismatches(c, mismatches)
            append(c)
        return out

    def _settle(self, model: ModelDisk, request: BlkRequest, status: int,
                data: memoryview | None) -> tuple[Mismatch, ...]:
        """A completed request against the model: a read checked (mismatches recorded), a
        write or write-zeroes resolved (kept when OK)."""
        kind = request.type
        if kind == BlkRequestType.IN:
            if status == BlkStatus.OK and data:
                found = model.check(request.sector, data, tag=request.tag)
                if found:
                    self.mismatches.extend(found)
                    return tuple(found)
        elif kind == BlkRequestType.OUT:
            model.resolve(request.tag, True if status == BlkStatus.OK else None)
        elif kind == BlkRequestType.WRITE_ZEROES:
            for i in range(len(request.out_data) // _SEGMENT.size):
                model.resolve(_sub_tag(request.tag, i), True if status == BlkStatus.OK else None)
        return ()

    def _data_view(self, request: BlkRequest) -> memoryview | None:
        """The device-writable data of a request built by the general path."""
        in_data_bufs = request.in_data_bufs
        if not in_data_bufs:
            return None
        if len(in_data_bufs) == 1:
            return self.memory.view(*in_data_bufs[0])
        read = self.memory.read
        return memoryview(b"".join(read(gpa, n) for gpa, n in in_data_bufs))

    def _release(self, request: BlkRequest) -> None:
        self._free_slots.append(request.slot)
        for gpa in request.blocks:
            self._arena.free(gpa)
        request.blocks = []

    def _retained_bytes(self) -> int:
        """Bytes of data buffers kept by request slots (fast path) rather than the arena."""
        return self._fast.retained_bytes()

    def abandon(self, tag: int) -> BlkRequest | None:
        """Forget an outstanding request (its ring slot is lost, e.g. the back-end died); the
        model keeps old-or-new for its sectors. Its guest buffers are not reused."""
        return self.outstanding.pop(tag, None)


def _sub_tag(tag: int, i: int) -> int:
    # model keys for the ranges of one multi-range request: negative, never a real tag
    return -(tag << 12 | i) - 1
