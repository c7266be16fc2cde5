"""virtio-blk: the config space and the execution of one request (VIRTIO 1.2 5.2,
SPEC-DIGEST 8).

A request is a chain: a 16-byte header (type u32, ioprio u32, sector u64) in the
device-readable part, data, and a status byte, the last byte of the device-writable part.
Buffers may be split across descriptors in any way (VERSION_1 / ANY_LAYOUT).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from vhost_conformance.backend.disk import SECTOR_SIZE, Disk, DiskError
from vhost_conformance.backend.memory import GuestMemory, GuestMemoryError

T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
#: the request types this device implements (others complete with UNSUPP)
KNOWN_TYPES = frozenset({T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES})
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2
OUTHDR_SIZE = 16
ID_BYTES = 20
SEGMENT_SIZE = 16
WRITE_ZEROES_F_UNMAP = 1
#: Config space: struct virtio_blk_config up to and including unused1 (60 bytes; QEMU asks
#: for 57 with discard + write-zeroes).
CONFIG_SIZE = 60
WCE_OFFSET = 32
MAX_DISCARD_SECTORS = 32768
MAX_WRITE_ZEROES_SECTORS = 32768

_OUTHDR = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")


@dataclass(slots=True)
class BlkConfig:
    """The device's configuration (what GET_CONFIG returns)."""

    capacity: int
    blk_size: int = 512
    seg_max: int = 126
    num_queues: int = 1
    wce: int = 1

    def encode(self) -> bytes:
        """The 60 config bytes (struct virtio_blk_config, packed, little-endian)."""
        out = bytearray(CONFIG_SIZE)
        struct.pack_into("<Q", out, 0, self.capacity)
        struct.pack_into("<I", out, 12, self.seg_max)
        struct.pack_into("<I", out, 20, self.blk_size)
        # topology: physical_block_exp 0, alignment_offset 0, min_io_size 1, opt_io_size 0
        struct.pack_into("<BBHI", out, 24, 0, 0, 1, 0)
        out[WCE_OFFSET] = self.wce
        struct.pack_into("<H", out, 34, self.num_queues)
        struct.pack_into(
            "<III", out, 36, MAX_DISCARD_SECTORS, 1, max(1, self.blk_size // SECTOR_SIZE)
        )
        struct.pack_into("<IIB", out, 48, MAX_WRITE_ZEROES_SECTORS, 1, 1)
        return bytes(out)


@dataclass(slots=True)
class Outcome:
    """What executing a request did: status byte and bytes written to the guest."""

    status: int
    written: int
    note: str = ""


MarkDirty = Callable[[int, int], None]


def _views(mem: GuestMemory, buffers: list[tuple[int, int]]) -> list[memoryview]:
    views: list[memoryview] = []
    for gpa, length in buffers:
        for mm, off, n in mem.gpa_segments(gpa, length):
            views.append(memoryview(mm)[off : off + n])
    return views


def _gather(mem: GuestMemory, buffers: list[tuple[int, int]], length: int) -> bytes:
    """Copy the first ``length`` bytes of device-readable buffers."""
    out = bytearray()
    for gpa, blen in buffers:
        if len(out) >= length:
            break
        for mm, off, n in mem.gpa_segments(gpa, blen):
            out += mm[off : off + min(n, length - len(out))]
            if len(out) >= length:
                break
    return bytes(out)


def _split_writable(
    writable: list[tuple[int, int]],
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Split the device-writable buffers into data buffers and the status byte."""
    data = list(writable)
    gpa, length = data.pop()
    if length > 1:
        data.append((gpa, length - 1))
    return data, (gpa + length - 1, 1)


def _skip(buffers: list[tuple[int, int]], skip: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for gpa, length in buffers:
        if skip >= length:
            skip -= length
            continue
        out.append((gpa + skip, length - skip))
        skip = 0
    return out


def write_status(mem: GuestMemory, status_gpa: int, status: int) -> None:
    """Write the status byte."""
    mm, off = mem.gpa(status_gpa, 1)
    mm[off] = status


def request_type(mem: GuestMemory, readable: list[tuple[int, int]]) -> int | None:
    """The type field of a request's header, or None when the header is short or unmapped."""
    try:
        header = _gather(mem, readable, OUTHDR_SIZE)
    except GuestMemoryError:
        return None
    if len(header) < OUTHDR_SIZE:
        return None
    rtype: int = _OUTHDR.unpack(header)[0]
    return rtype


def segment_flags(mem: GuestMemory, readable: list[tuple[int, int]]) -> int | None:
    """The flags of the first discard/write-zeroes segment, None when there is none."""
    data = _gather(mem, _skip(readable, OUTHDR_SIZE), SEGMENT_SIZE)
    if len(data) < SEGMENT_SIZE:
        return None
    flags: int = _SEGMENT.unpack(data)[2]
    return flags


def write_payload(mem: GuestMemory, readable: list[tuple[int, int]]) -> tuple[int, bytes] | None:
    """(byte offset, data) of a WRITE (T_OUT) request, None for any other request."""
    header = _gather(mem, readable, OUTHDR_SIZE)
    if len(header) < OUTHDR_SIZE:
        return None
    rtype, _ioprio, sector = _OUTHDR.unpack(header)
    if rtype != T_OUT:
        return None
    data_r = _skip(readable, OUTHDR_SIZE)
    return sector * SECTOR_SIZE, _gather(mem, data_r, sum(n for _g, n in data_r))


def execute(
    disk: Disk,
    mem: GuestMemory,
    readable: list[tuple[int, int]],
    writable: list[tuple[int, int]],
    mark_dirty: MarkDirty,
    *,
    device_id: bytes,
    writethrough: bool = False,
    fail: bool = False,
) -> Outcome:
    """Execute one virtio-blk request and write its status byte.

    The caller guarantees ``writable`` is non-empty with a mapped last byte. Returns the
    status and the number of bytes written into device-writable buffers (incl. status),
    which is the used element's ``len``. ``fail`` forces IOERR (fault injection) without
    touching the disk.
    """
    data_w, (status_gpa, _) = _split_writable(writable)
    written = 0
    status = S_OK
    note = ""
    try:
        header = _gather(mem, readable, OUTHDR_SIZE)
        if len(header) < OUTHDR_SIZE:
            raise _RequestError(S_IOERR, f"request header holds {len(header)} of 16 bytes")
        rtype, _ioprio, sector = _OUTHDR.unpack(header)
        data_r = _skip(readable, OUTHDR_SIZE)
        if fail:
            raise _RequestError(S_IOERR, "injected failure (--fail-rate)")
        if rtype == T_IN:
            length = sum(n for _g, n in data_w)
            _check_rw(disk, sector, length)
            views = _views(mem, data_w)
            try:
                disk.read_into(sector * SECTOR_SIZE, views)
            finally:
                for v in views:
                    v.release()
            for gpa, n in data_w:
                mark_dirty(gpa, n)
            written = length
        elif rtype == T_OUT:
            if disk.read_only:
                raise _RequestError(S_IOERR, "write to a read-only device")
            length = sum(n for _g, n in data_r)
            _check_rw(disk, sector, length)
            views = _views(mem, data_r)
            try:
                disk.write_from(sector * SECTOR_SIZE, views)
            finally:
                for v in views:
                    v.release()
            if writethrough:
                disk.flush()
        elif rtype == T_FLUSH:
            disk.flush()
        elif rtype == T_GET_ID:
            left = device_id[:ID_BYTES].ljust(ID_BYTES, b"\0")
            for gpa, n in data_w:
                if not left:
                    break
                k = min(n, len(left))
                for mm, off, seg in mem.gpa_segments(gpa, k):
                    mm[off : off + seg] = left[:seg]
                    left = left[seg:]
                mark_dirty(gpa, k)
                written += k
        elif rtype in (T_DISCARD, T_WRITE_ZEROES):
            _discard_or_zero(disk, mem, data_r, rtype)
        else:
            raise _RequestError(S_UNSUPP, f"request type {rtype} not supported")
    except _RequestError as exc:
        status, note, written = exc.status, exc.note, 0
    except (DiskError, GuestMemoryError, OSError) as exc:
        status, note, written = S_IOERR, str(exc), 0
    write_status(mem, status_gpa, status)
    mark_dirty(status_gpa, 1)
    return Outcome(status, written + 1, note)


class _RequestError(Exception):
    def __init__(self, status: int, note: str) -> None:
        super().__init__(note)
        self.status = status
        self.note = note


def _check_rw(disk: Disk, sector: int, length: int) -> None:
    if length % SECTOR_SIZE:
        raise _RequestError(S_IOERR, f"data length {length} is not a multiple of 512")
    if sector * SECTOR_SIZE + length > disk.capacity_sectors * SECTOR_SIZE:
        raise _RequestError(
            S_IOERR,
            f"sectors {sector}+{length // SECTOR_SIZE} beyond capacity {disk.capacity_sectors}",
        )


def _discard_or_zero(
    disk: Disk, mem: GuestMemory, data_r: list[tuple[int, int]], rtype: int
) -> None:
    total = sum(n for _g, n in data_r)
    if total == 0 or total % SEGMENT_SIZE:
        raise _RequestError(S_IOERR, f"segment data of {total} bytes (not k*16, k >= 1)")
    if total // SEGMENT_SIZE > 1:
        raise _RequestError(S_IOERR, f"{total // SEGMENT_SIZE} segments, max 1")
    if disk.read_only:
        raise _RequestError(S_IOERR, "discard/write-zeroes on a read-only device")
    raw = _gather(mem, data_r, total)
    for k in range(0, total, SEGMENT_SIZE):
        sector, num_sectors, flags = _SEGMENT.unpack_from(raw, k)
        if rtype == T_DISCARD and flags:
            raise _RequestError(S_UNSUPP, f"discard segment flags {flags:#x} (must be 0)")
        if rtype == T_WRITE_ZEROES and flags & ~WRITE_ZEROES_F_UNMAP:
            raise _RequestError(S_UNSUPP, f"write-zeroes segment flags {flags:#x}")
        limit = MAX_DISCARD_SECTORS if rtype == T_DISCARD else MAX_WRITE_ZEROES_SECTORS
        if num_sectors > limit:
            raise _RequestError(S_IOERR, f"segment of {num_sectors} sectors, max {limit}")
        if (sector + num_sectors) > disk.capacity_sectors:
            raise _RequestError(S_IOERR, f"segment {sector}+{num_sectors} beyond capacity")
        if rtype == T_DISCARD:
            disk.discard(sector * SECTOR_SIZE, num_sectors * SECTOR_SIZE)
        else:
            disk.write_zeroes(sector * SECTOR_SIZE, num_sectors * SECTOR_SIZE)
