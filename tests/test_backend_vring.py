"""Device-side ring access on hand-written rings: notification arithmetic, packed chains
(availability, wrap, indirect, hostile shapes), used entries."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from vhost_conformance.backend.memory import GuestMemory
from vhost_conformance.backend.vring import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    PackedRing,
    need_event,
)

N = 8
UVA = 0x7000_0000_0000
DESC, DRV, DEV = 0x1000, 0x2000, 0x2100
AVAIL_W1 = PACKED_DESC_F_AVAIL  # available for wrap counter 1


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    fd = os.memfd_create("ring")
    os.ftruncate(fd, 1 << 20)
    m = GuestMemory(4)
    m.add(fd, 0, 1 << 20, UVA, 0)
    os.close(fd)
    yield m
    m.clear()


def _ring(mem: GuestMemory, *, indirect: bool = True, event_idx: bool = False) -> PackedRing:
    return PackedRing(
        mem, N, UVA + DESC, UVA + DRV, UVA + DEV, indirect=indirect, event_idx=event_idx
    )


def _put(mem: GuestMemory, idx: int, addr: int, length: int, bid: int, flags: int) -> None:
    mm, off = mem.gpa(DESC + 16 * idx, 16)
    struct.pack_into("<QIHH", mm, off, addr, length, bid, flags)


def test_need_event() -> None:
    assert need_event(0, 1, 0)
    assert not need_event(5, 3, 0)
    assert need_event(0xFFFF, 1, 0xFFFE)  # across the 16-bit wrap


def test_packed_chain_and_used_entry(mem: GuestMemory) -> None:
    ring = _ring(mem)
    assert not ring.is_available(0, True)
    _put(mem, 0, 0x10000, 16, 0, AVAIL_W1 | DESC_F_NEXT)
    _put(mem, 1, 0x11000, 512, 0, AVAIL_W1 | DESC_F_WRITE | DESC_F_NEXT)
    _put(mem, 2, 0x12000, 1, 42, AVAIL_W1 | DESC_F_WRITE)
    assert ring.is_available(0, True)
    chain = ring.read_chain(0, True)
    assert chain.fatal is None and chain.error is None
    assert chain.ndescs == 3 and chain.buffer_id == 42
    assert chain.readable == [(0x10000, 16)] and chain.writable == [(0x11000, 512), (0x12000, 1)]
    ring.write_used(0, 42, 513, True, flags_too=True)
    mm, off = mem.gpa(DESC, 16)
    assert struct.unpack_from("<QIHH", mm, off)[1:] == (
        513,
        42,
        PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED,
    )


def test_packed_chain_wraps_around_the_ring(mem: GuestMemory) -> None:
    ring = _ring(mem)
    _put(mem, N - 1, 0x10000, 16, 0, AVAIL_W1 | DESC_F_NEXT)
    # Entry 0 on the next lap: available for wrap counter 0 (AVAIL=0, USED=1).
    _put(mem, 0, 0x12000, 1, 7, PACKED_DESC_F_USED | DESC_F_WRITE)
    chain = ring.read_chain(N - 1, True)
    assert chain.fatal is None and chain.ndescs == 2 and chain.buffer_id == 7


@pytest.mark.parametrize("shape", ["unavailable-continuation", "too-long", "indirect-chained"])
def test_packed_hostile_chains(mem: GuestMemory, shape: str) -> None:
    ring = _ring(mem)
    if shape == "unavailable-continuation":
        _put(mem, 0, 0x10000, 16, 0, AVAIL_W1 | DESC_F_NEXT)  # entry 1 never made available
    elif shape == "too-long":
        for i in range(N):
            _put(mem, i, 0x10000, 16, 0, AVAIL_W1 | DESC_F_NEXT)
        # after a lap everything reads as not available for the flipped wrap counter
    else:
        _put(mem, 0, 0x10000, 32, 0, AVAIL_W1 | DESC_F_INDIRECT | DESC_F_NEXT)
        _put(mem, 1, 0x12000, 1, 0, AVAIL_W1 | DESC_F_WRITE)
    assert ring.read_chain(0, True).fatal


def test_packed_indirect_table(mem: GuestMemory) -> None:
    ring = _ring(mem)
    table = 0x20000
    mm, off = mem.gpa(table, 48)
    struct.pack_into("<QIHH", mm, off, 0x10000, 16, 0, 0)
    struct.pack_into("<QIHH", mm, off + 16, 0x11000, 4096, 0, DESC_F_WRITE)
    struct.pack_into("<QIHH", mm, off + 32, 0x12000, 1, 0, DESC_F_WRITE)
    _put(mem, 0, table, 48, 9, AVAIL_W1 | DESC_F_INDIRECT)
    chain = ring.read_chain(0, True)
    assert chain.fatal is None and chain.ndescs == 1 and chain.buffer_id == 9
    assert chain.writable == [(0x11000, 4096), (0x12000, 1)]
    assert _ring(mem, indirect=False).read_chain(0, True).fatal


def test_packed_driver_event_suppression(mem: GuestMemory) -> None:
    ring = _ring(mem, event_idx=True)
    mm, off = mem.gpa(DRV, 4)
    struct.pack_into("<HH", mm, off, 0, 1)  # DISABLE
    assert not ring.should_notify(0, 1, True)
    struct.pack_into("<HH", mm, off, 0, 0)  # ENABLE
    assert ring.should_notify(0, 1, True)
    struct.pack_into("<HH", mm, off, 0x8000 | 3, 2)  # DESC: at entry 3, wrap 1
    assert not ring.should_notify(0, 2, True)
    assert ring.should_notify(2, 4, True)
