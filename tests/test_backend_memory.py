"""Guest memory as the back-end maps it: regions, translation, overlap, dirty log."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import pytest
from vhost_conformance.backend.memory import DirtyLog, GuestMemory, GuestMemoryError


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("t")
    os.ftruncate(fd, 3 << 20)
    yield fd
    os.close(fd)


def test_translation_with_mmap_offset_and_gpa_not_hva(memfd: int) -> None:
    mem = GuestMemory(8)
    try:
        mem.add(memfd, 0x100000, 1 << 20, 0x7F0000000000, 1 << 20)
        mem.add(memfd, 0x200000, 1 << 20, 0x7F1000000000, 2 << 20)
        os.pwrite(memfd, b"hello", (1 << 20) + 0x10)
        mm, off = mem.gpa(0x100010, 5)
        assert mm[off : off + 5] == b"hello"
        mm2, off2 = mem.uva(0x7F0000000010, 5)
        assert mm2[off2 : off2 + 5] == b"hello"
        assert mem.uva_to_gpa(0x7F1000000004) == 0x200004
        # A buffer across two adjacent regions comes back in two pieces.
        pieces = mem.gpa_segments(0x1FFFF0, 0x20)
        assert [n for _m, _o, n in pieces] == [0x10, 0x10]
        with pytest.raises(GuestMemoryError, match="not mapped"):
            mem.gpa(0x300000, 1)
        with pytest.raises(GuestMemoryError, match="not mapped"):
            mem.gpa(0x1FFFF0, 0x20)  # one region only
    finally:
        mem.clear()


def test_overlaps_limits_and_removal(memfd: int) -> None:
    mem = GuestMemory(2)
    try:
        mem.add(memfd, 0, 1 << 20, 0x1000000, 0)
        with pytest.raises(GuestMemoryError, match="overlaps"):
            mem.add(memfd, 0x80000, 1 << 20, 0x9000000, 0)
        with pytest.raises(GuestMemoryError, match="user address"):
            mem.add(memfd, 0x800000, 1 << 20, 0x1080000, 0)
        mem.add(memfd, 1 << 20, 1 << 20, 0x2000000, 1 << 20)
        with pytest.raises(GuestMemoryError, match="too many"):
            mem.add(memfd, 8 << 20, 4096, 0x9000000, 0)
        with pytest.raises(GuestMemoryError, match="no region"):
            mem.remove(0, 4096, 0x1000000)
        mem.remove(0, 1 << 20, 0x1000000)
        assert [r.guest_phys_addr for r in mem.regions] == [1 << 20]
        with pytest.raises(GuestMemoryError, match="needs"):
            mem.add(memfd, 16 << 20, 4 << 20, 0x8000000, 0)  # past the end of the fd
    finally:
        mem.clear()


def test_dirty_log_bits() -> None:
    fd = os.memfd_create("log")
    os.ftruncate(fd, 4096)
    try:
        log = DirtyLog(fd, 4096, 0)
        log.mark(0x3000, 1)
        log.mark(0x9FFF, 2)  # pages 9 and 10
        log.mark(1 << 40, 4096)  # outside the log: ignored
        log.close()
        with mmap.mmap(fd, 4096) as m:
            assert m[0] == 0b1000 and m[1] == 0b110
    finally:
        os.close(fd)
