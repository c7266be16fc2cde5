"""Guest memory: regions, address maps, allocator, write detection, dirty log; barrier helpers."""

from __future__ import annotations

import itertools
import mmap
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vhost_conformance.frontend.barrier import Shm, compare_buffers, smp_mb, smp_rmb, smp_wmb
from vhost_conformance.frontend.memory import (
    DEFAULT_HVA_BASE,
    PAGE_SIZE,
    DirtyLog,
    GuestMemory,
    MemoryAccessError,
)
from vhost_conformance.frontend.protocol import MemoryRegion

MiB = 1 << 20


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_shm_little_endian_accesses_and_fences() -> None:
    mm = mmap.mmap(-1, PAGE_SIZE)
    with Shm(mm) as shm:
        shm.store16(0, 0x1234)
        shm.store32(4, 0xDEADBEEF)
        shm.store64(8, 0x0102030405060708)
        shm.store16_release(16, 0xFFFF)
        shm.store32_release(20, 7)
        assert bytes(mm[0:2]) == b"\x34\x12"
        assert bytes(mm[4:8]) == b"\xef\xbe\xad\xde"
        assert bytes(mm[8:16]) == bytes(range(8, 0, -1))
        assert shm.load16(0) == 0x1234
        assert shm.load32(4) == 0xDEADBEEF
        assert shm.load64(8) == 0x0102030405060708
        assert shm.load16_acquire(16) == 0xFFFF
        assert shm.load32_acquire(20) == 7
        shm.mb()
        shm.rmb()
        shm.wmb()
    smp_mb()
    smp_rmb()
    smp_wmb()
    with pytest.raises(ValueError, match="closed"):
        shm.load16(0)
    mm.close()  # no exported pointer left


def test_shm_release_acquire_message_passing_between_threads() -> None:
    """A release-published index orders the data written before it (smoke test)."""
    mm = mmap.mmap(-1, PAGE_SIZE)
    writer, reader = Shm(mm), Shm(mm)
    rounds = 2000
    bad: list[int] = []

    def produce() -> None:
        for i in range(1, rounds + 1):
            writer.store32(64, i * 3)
            writer.store16_release(0, i)

    thread = threading.Thread(target=produce)
    thread.start()
    seen = 0
    deadline = time.monotonic() + 30
    while seen < rounds and time.monotonic() < deadline:
        idx = reader.load16_acquire(0)
        if idx != seen:
            value = reader.load32(64)
            if value < idx * 3:
                bad.append(idx)
            seen = idx
    thread.join(timeout=10)
    writer.close()
    reader.close()
    mm.close()
    assert seen == rounds and bad == []


def test_compare_buffers_reports_changed_runs() -> None:
    old = bytes(3 * PAGE_SIZE)
    new = bytearray(old)
    new[10] = 1
    new[20] = 1  # less than `gap` after the first change: same range
    new[PAGE_SIZE + 5] = 9
    new[-1] = 1
    assert compare_buffers(old, new) == [(10, 11), (PAGE_SIZE + 5, 1), (3 * PAGE_SIZE - 1, 1)]
    assert compare_buffers(old, new, gap=4) == [
        (10, 1), (20, 1), (PAGE_SIZE + 5, 1), (3 * PAGE_SIZE - 1, 1)]
    assert compare_buffers(old, old) == []
    with pytest.raises(ValueError, match="lengths differ"):
        compare_buffers(old, b"x")


def test_regions_have_fds_user_addresses_unrelated_to_gpas_and_mmap_offset() -> None:
    with GuestMemory.simple(4 * MiB, regions=4, mmap_offset=2 * PAGE_SIZE) as memory:
        regions = memory.regions
        assert len(regions) == 4
        gpas = [r.guest_phys_addr for r in regions]
        assert gpas[0] == 0
        # holes between the GPA ranges
        assert all(regions[i].end < regions[i + 1].guest_phys_addr for i in range(3))
        deltas = {r.userspace_addr - r.guest_phys_addr for r in regions}
        assert len(deltas) == 4  # no single GPA->user offset works for every region
        assert all(r.userspace_addr >= DEFAULT_HVA_BASE for r in regions)
        for region in regions:
            assert region.mmap_offset == 2 * PAGE_SIZE
            assert os.fstat(region.fd).st_size == region.mmap_offset + region.memory_size
        # The bytes of a GPA sit at mmap_offset + (gpa - region gpa) in the fd, as a back-end maps it.
        target = regions[2].guest_phys_addr + 100
        memory.write(target, b"hello")
        assert os.pread(regions[2].fd, 5, 2 * PAGE_SIZE + 100) == b"hello"
        os.pwrite(regions[1].fd, b"from-backend", 2 * PAGE_SIZE + 7)
        assert memory.read(regions[1].guest_phys_addr + 7, 12) == b"from-backend"
        assert memory.fds() == [r.fd for r in regions]


def test_memory_is_shared_with_another_mapping_of_the_fd() -> None:
    with GuestMemory.create([(0x100000, MiB)], mmap_offset=PAGE_SIZE) as memory:
        region = memory.regions[0]
        other = mmap.mmap(region.fd, PAGE_SIZE + MiB)  # what a back-end does
        other[PAGE_SIZE + 16 : PAGE_SIZE + 20] = b"abcd"
        assert memory.read(0x100010, 4) == b"abcd"
        memory.write(0x100020, b"xy")
        assert other[PAGE_SIZE + 0x20 : PAGE_SIZE + 0x22] == b"xy"
        other.close()


def test_address_translation_both_ways() -> None:
    with GuestMemory.create([(0, MiB), (16 * MiB, 2 * MiB)]) as memory:
        for gpa in (0, 123, MiB - 1, 16 * MiB, 18 * MiB - 1):
            uaddr = memory.gpa_to_uaddr(gpa)
            assert uaddr != gpa
            assert memory.uaddr_to_gpa(uaddr) == gpa
        assert memory.region_of(16 * MiB + 5).guest_phys_addr == 16 * MiB
        with pytest.raises(MemoryAccessError, match=r"0x100000 is in no region"):
            memory.region_of(MiB)
        with pytest.raises(MemoryAccessError, match="user address"):
            memory.uaddr_to_gpa(5)


def test_access_crossing_a_region_is_refused_with_gpa_and_regions() -> None:
    with GuestMemory.create([(0, MiB), (MiB, MiB)]) as memory:  # adjacent, still two regions
        with pytest.raises(MemoryAccessError) as info:
            memory.view(MiB - 2, 4)
        message = str(info.value)
        assert "0xffffe" in message and "[0x0, 0x100000)" in message
        with pytest.raises(MemoryAccessError):
            memory.write(MiB - 1, b"ab")
        with pytest.raises(MemoryAccessError):
            memory.read(2 * MiB, 1)
        view = memory.view(MiB, 8)
        view[:] = b"12345678"
        view.release()
        assert memory.read(MiB, 8) == b"12345678"
        memory.fill(MiB + 8, 4, 0xAB)
        assert memory.read(MiB + 8, 4) == b"\xab" * 4


def test_alloc_aligns_and_never_crosses_a_region() -> None:
    with GuestMemory.create([(0, PAGE_SIZE), (MiB, 2 * PAGE_SIZE)]) as memory:
        a = memory.alloc(100, align=16)
        b = memory.alloc(10, align=64)
        assert a == 0 and b % 64 == 0 and b >= 100
        c = memory.alloc(PAGE_SIZE)  # does not fit in region 0 any more
        assert c == MiB
        d = memory.alloc(8, align=4)
        assert memory.region_of(d) is memory.regions[0]  # small blocks still fill region 0
        with pytest.raises(MemoryAccessError, match="exhausted"):
            memory.alloc(2 * PAGE_SIZE)
        with pytest.raises(MemoryAccessError):
            memory.alloc(8, align=3)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3000), st.sampled_from([1, 2, 4, 16, 64, 4096])),
                min_size=1, max_size=40))
def test_alloc_blocks_are_disjoint_aligned_and_inside_one_region(
    requests: list[tuple[int, int]],
) -> None:
    with GuestMemory.simple(64 * PAGE_SIZE, regions=3) as memory:
        blocks = []
        for size, align in requests:
            gpa = memory.alloc(size, align)
            assert gpa % align == 0
            memory.locate(gpa, size)  # inside one region
            blocks.append((gpa, size))
        blocks.sort()
        for (g1, s1), (g2, _) in itertools.pairwise(blocks):
            assert g1 + s1 <= g2


def test_snapshot_diff_finds_every_write_and_honours_exclusions() -> None:
    with GuestMemory.simple(1 * MiB, regions=2) as memory:
        second = memory.regions[1].guest_phys_addr
        snap = memory.snapshot()
        assert memory.diff(snap) == []
        memory.write(5, b"\x01")
        memory.write(PAGE_SIZE - 2, b"\x01\x02\x03\x04")  # spans a page boundary
        memory.write(second + 3 * PAGE_SIZE, b"zz")
        assert memory.diff(snap) == [(5, 1), (PAGE_SIZE - 2, 4), (second + 3 * PAGE_SIZE, 2)]
        assert memory.diff(snap, exclude=[(0, PAGE_SIZE)]) == [
            (PAGE_SIZE, 2),
            (second + 3 * PAGE_SIZE, 2),
        ]
        assert memory.diff(snap, exclude=[(second, MiB), (0, 2 * PAGE_SIZE)]) == []


def test_add_and_remove_regions() -> None:
    before = _open_fds()
    memory = GuestMemory.simple(8 * PAGE_SIZE, regions=8)
    assert len(memory.fds()) == 8
    ninth = memory.add_region(1 << 32, 4 * PAGE_SIZE, mmap_offset=PAGE_SIZE)
    assert memory.regions[-1] is ninth
    assert len({r.userspace_addr for r in memory.regions}) == 9
    memory.write((1 << 32) + 10, b"ninth")
    with pytest.raises(MemoryAccessError, match="overlaps"):
        memory.add_region((1 << 32) + PAGE_SIZE, PAGE_SIZE)
    with pytest.raises(MemoryAccessError, match="user range"):
        memory.add_region(1 << 33, PAGE_SIZE, userspace_addr=ninth.userspace_addr)
    kept = memory.remove_region(memory.regions[0].guest_phys_addr, close=False)
    assert kept.fd >= 0 and len(memory.regions) == 8
    with pytest.raises(MemoryAccessError):
        memory.region_of(0)
    kept.data[0:2] = b"ok"  # still mapped for the caller
    kept.close()
    removed = memory.remove_region(1 << 32)
    assert removed.guest_phys_addr == 1 << 32 and removed.fd == -1
    with pytest.raises(MemoryAccessError):
        memory.read((1 << 32) + 10, 5)
    with pytest.raises(MemoryAccessError, match="no region starts"):
        memory.remove_region(12345)
    memory.close()
    memory.close()
    assert _open_fds() == before


def test_memory_regions_use_the_wire_codec_type() -> None:
    with GuestMemory.create([(0, MiB), (4 * MiB, MiB)], mmap_offset=PAGE_SIZE) as memory:
        described = memory.memory_regions()
        assert all(isinstance(r, MemoryRegion) for r in described)
        assert [(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
                for r in described] == [
            (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
            for r in memory.regions
        ]


def test_dirty_log_bit_layout() -> None:
    with GuestMemory.create([(0, MiB), (64 * MiB, MiB)]) as memory, \
            DirtyLog.for_memory(memory) as log:
        pages = (65 * MiB) // PAGE_SIZE
        assert log.bitmap_size == pages // 8
        assert log.mmap_size % PAGE_SIZE == 0 and log.mmap_size >= log.bitmap_size
        assert os.fstat(log.fd).st_size == log.mmap_size
        assert log.dirty_pages() == set()
        # A back-end marks page p at byte p/8 bit p%8 (VU-LOG-1).
        other = mmap.mmap(log.fd, log.mmap_size)
        page = (64 * MiB + 5 * PAGE_SIZE) // PAGE_SIZE
        other[page // 8] |= 1 << (page % 8)
        other[0] |= 1 << 3
        assert log.dirty_pages() == {3, page}
        assert log.is_dirty(64 * MiB + 5 * PAGE_SIZE + 17)
        assert not log.is_dirty(64 * MiB + 6 * PAGE_SIZE)
        log.clear()
        assert log.dirty_pages() == set()
        other.close()


def test_missing_compiler_is_named(tmp_path: pathlib.Path) -> None:
    """With an empty cache and no compiler, loading fails with an error naming the compiler."""
    code = (
        "from vhost_conformance.frontend import barrier\n"
        "try:\n"
        "    barrier.load_library()\n"
        "except barrier.BarrierBuildError as exc:\n"
        "    print('ERROR', exc)\n"
    )
    env = dict(os.environ, CC="/nonexistent/vc-cc", VHOST_CONFORMANCE_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    assert "ERROR no C compiler: '/nonexistent/vc-cc'" in out.stdout


def test_close_releases_views_handed_out() -> None:
    memory = GuestMemory.simple(MiB)
    view = memory.view(0, 16)
    memory.close()  # would fail to unmap if the view still pinned the mapping
    with pytest.raises(ValueError):
        view[0] = 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3 * PAGE_SIZE - 1), st.binary(min_size=1, max_size=300)),
                max_size=12))
def test_diff_covers_every_changed_byte_and_starts_and_ends_on_one(
    writes: list[tuple[int, bytes]],
) -> None:
    with GuestMemory.create([(0, 4 * PAGE_SIZE)]) as memory:
        memory.fill(0, 4 * PAGE_SIZE, 0x5A)
        snap = memory.snapshot()
        for gpa, data in writes:
            memory.write(gpa, data)
        now = memory.read(0, 4 * PAGE_SIZE)
        before = snap.regions[0][1]
        changed = {i for i in range(len(now)) if now[i] != before[i]}
        ranges = memory.diff(snap)
        covered = {i for gpa, n in ranges for i in range(gpa, gpa + n)}
        assert changed <= covered
        for gpa, n in ranges:
            assert gpa in changed and gpa + n - 1 in changed


def test_dirty_log_with_mmap_offset_is_mapped_from_that_offset() -> None:
    with DirtyLog(8 * MiB, mmap_offset=PAGE_SIZE) as log:
        assert log.mmap_size == PAGE_SIZE  # 2048 pages -> 256 bytes, one page
        assert os.fstat(log.fd).st_size == PAGE_SIZE + log.mmap_size
        backend_view = mmap.mmap(log.fd, log.mmap_size, offset=log.mmap_offset)
        backend_view[1] = 0x80  # page 15
        assert log.dirty_pages() == {15}
        backend_view.close()
    with pytest.raises(MemoryAccessError, match="page aligned"):
        DirtyLog(MiB, mmap_offset=100)
