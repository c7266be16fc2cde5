"""Guest memory as the back-end sees it: the regions the front-end shared (SET_MEM_TABLE,
ADD_MEM_REG, REM_MEM_REG), address translation, and the dirty-page log (SET_LOG_BASE).

Addresses: descriptors carry guest-physical addresses (GPA); SET_VRING_ADDR carries
front-end user addresses (vhost-user.rst "A vring address description": without
IOMMU_PLATFORM or GPA_ADDRESSES ring addresses are user virtual addresses). A region maps
both. Each region is mmapped once, MAP_SHARED, ``memory_size + mmap_offset`` bytes from
offset 0 of its fd (the fd offset of a region need not be page aligned).

Memory ordering: accesses go through ``struct``/``memoryview`` copies; this back-end
relies on x86-64 TSO (stores are not reordered with stores, loads not with loads), which
is what the spec's read/write barriers order on that architecture.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
import threading
from dataclasses import dataclass

#: Dirty log granularity (vhost-user.rst "Migration": VHOST_LOG_PAGE 0x1000).
LOG_PAGE_SIZE = 0x1000


_FENCE = threading.Lock()


def full_barrier() -> None:
    """A full memory fence: earlier stores are visible before later loads.

    Needed where x86-64 TSO still reorders (store -> load): between publishing
    used->idx / avail_event and reading the driver's used_event / avail->idx (VIRTIO 1.2
    2.7.10: otherwise a notification or a kick is lost). CPython's lock acquire does a
    locked read-modify-write (glibc sem_wait's cmpxchg), which is a full fence on x86-64.
    """
    _FENCE.acquire()
    _FENCE.release()


class GuestMemoryError(Exception):
    """An address the guest or front-end gave is not backed by any region."""


@dataclass(slots=True)
class Region:
    """One shared memory region, mapped."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    mm: mmap.mmap

    @property
    def gpa_end(self) -> int:
        """First GPA after the region."""
        return self.guest_phys_addr + self.memory_size

    @property
    def uva_end(self) -> int:
        """First user address after the region."""
        return self.userspace_addr + self.memory_size


def _map_fd(fd: int, length: int) -> mmap.mmap:
    return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


class GuestMemory:
    """The set of regions of one connection, with GPA and user-address lookup.

    ``generation`` changes whenever the set of regions changes, so users may cache
    translations.
    """

    def __init__(self, max_regions: int) -> None:
        self.max_regions = max_regions
        self._by_gpa: list[Region] = []
        self._gpa_starts: list[int] = []
        self.generation = 0

    @property
    def regions(self) -> list[Region]:
        """The regions, sorted by guest-physical address."""
        return list(self._by_gpa)

    def _reindex(self) -> None:
        self._by_gpa.sort(key=lambda r: r.guest_phys_addr)
        self._gpa_starts = [r.guest_phys_addr for r in self._by_gpa]
        self.generation += 1

    def add(
        self, fd: int, guest_phys_addr: int, memory_size: int, userspace_addr: int, mmap_offset: int
    ) -> Region:
        """Map ``fd`` as a new region (the caller keeps ownership of ``fd``).

        Raises GuestMemoryError for a zero size, an overlap (vhost-user.rst "Memory region
        description": the front-end must remove a region before adding an overlapping one),
        too many regions, or an fd that cannot be mapped at that size.
        """
        if memory_size == 0:
            raise GuestMemoryError("memory region of size 0")
        if len(self._by_gpa) >= self.max_regions:
            raise GuestMemoryError(f"too many memory regions: limit {self.max_regions}")
        if guest_phys_addr + memory_size > 1 << 64 or userspace_addr + memory_size > 1 << 64:
            raise GuestMemoryError("memory region wraps around the 64-bit address space")
        for r in self._by_gpa:
            if guest_phys_addr < r.gpa_end and r.guest_phys_addr < guest_phys_addr + memory_size:
                raise GuestMemoryError(
                    f"region GPA {guest_phys_addr:#x}+{memory_size:#x} overlaps "
                    f"{r.guest_phys_addr:#x}+{r.memory_size:#x}"
                )
            if userspace_addr < r.uva_end and r.userspace_addr < userspace_addr + memory_size:
                raise GuestMemoryError(
                    f"region user address {userspace_addr:#x}+{memory_size:#x} overlaps "
                    f"{r.userspace_addr:#x}+{r.memory_size:#x}"
                )
        try:
            size = os.fstat(fd).st_size
        except OSError as exc:
            raise GuestMemoryError(f"memory region fd {fd} unusable: {exc.strerror}") from None
        if size and size < mmap_offset + memory_size:
            raise GuestMemoryError(
                f"memory region fd holds {size} bytes, region needs mmap_offset "
                f"{mmap_offset:#x} + size {memory_size:#x}"
            )
        try:
            mm = _map_fd(fd, mmap_offset + memory_size)
        except (OSError, ValueError, OverflowError) as exc:
            raise GuestMemoryError(f"cannot mmap memory region: {exc}") from None
        region = Region(guest_phys_addr, memory_size, userspace_addr, mmap_offset, mm)
        self._by_gpa.append(region)
        self._reindex()
        return region

    def remove(self, guest_phys_addr: int, memory_size: int, userspace_addr: int) -> None:
        """Unmap the region with exactly these addresses and size (REM_MEM_REG)."""
        for i, r in enumerate(self._by_gpa):
            if (
                r.guest_phys_addr == guest_phys_addr
                and r.memory_size == memory_size
                and r.userspace_addr == userspace_addr
            ):
                del self._by_gpa[i]
                self._reindex()
                _close_map(r.mm)
                return
        raise GuestMemoryError(
            f"no region GPA {guest_phys_addr:#x} size {memory_size:#x} "
            f"user address {userspace_addr:#x} to remove"
        )

    def clear(self) -> None:
        """Unmap every region."""
        regions, self._by_gpa = self._by_gpa, []
        self._reindex()
        for r in regions:
            _close_map(r.mm)

    def _find_gpa(self, gpa: int) -> Region | None:
        i = bisect.bisect_right(self._gpa_starts, gpa) - 1
        if i >= 0:
            r = self._by_gpa[i]
            if gpa < r.gpa_end:
                return r
        return None

    def gpa(self, gpa: int, length: int) -> tuple[mmap.mmap, int]:
        """Translate [gpa, gpa+length) to (mapping, offset in it).

        The range must lie inside one region; raises GuestMemoryError otherwise.
        """
        r = self._find_gpa(gpa)
        if r is None or length < 0 or gpa + length > r.gpa_end:
            raise GuestMemoryError(f"guest address {gpa:#x} length {length} is not mapped")
        return r.mm, r.mmap_offset + gpa - r.guest_phys_addr

    def gpa_segments(self, gpa: int, length: int) -> list[tuple[mmap.mmap, int, int]]:
        """Translate [gpa, gpa+length) to (mapping, offset, length) pieces, one per region
        it crosses (a buffer may span adjacent regions); raises GuestMemoryError if any
        byte is unmapped."""
        out: list[tuple[mmap.mmap, int, int]] = []
        while length > 0:
            r = self._find_gpa(gpa)
            if r is None:
                raise GuestMemoryError(f"guest address {gpa:#x} length {length} is not mapped")
            n = min(length, r.gpa_end - gpa)
            out.append((r.mm, r.mmap_offset + gpa - r.guest_phys_addr, n))
            gpa += n
            length -= n
        return out

    def uva(self, uva: int, length: int) -> tuple[mmap.mmap, int]:
        """Translate a front-end user address range to (mapping, offset)."""
        for r in self._by_gpa:
            if r.userspace_addr <= uva and uva + length <= r.uva_end:
                return r.mm, r.mmap_offset + uva - r.userspace_addr
        raise GuestMemoryError(f"front-end user address {uva:#x} length {length} is not mapped")

    def uva_to_gpa(self, uva: int) -> int:
        """The GPA of a front-end user address (for dirty logging of ring writes)."""
        for r in self._by_gpa:
            if r.userspace_addr <= uva < r.uva_end:
                return r.guest_phys_addr + uva - r.userspace_addr
        raise GuestMemoryError(f"front-end user address {uva:#x} is not mapped")


def _close_map(mm: mmap.mmap) -> None:
    # A memoryview still alive somewhere keeps the mapping until it is collected.
    with contextlib.suppress(BufferError):
        mm.close()


class DirtyLog:
    """The dirty-page bitmap shared by SET_LOG_BASE: bit ``p % 8`` of byte ``p // 8`` for
    guest page ``p`` (4 KiB pages, vhost-user.rst "Migration")."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int) -> None:
        if mmap_size == 0:
            raise GuestMemoryError("dirty log of size 0")
        try:
            self._mm = _map_fd(fd, mmap_offset + mmap_size)
        except (OSError, ValueError, OverflowError) as exc:
            raise GuestMemoryError(f"cannot mmap dirty log: {exc}") from None
        self._offset = mmap_offset
        self.size = mmap_size

    def mark(self, gpa: int, length: int) -> None:
        """Mark every page of [gpa, gpa+length) dirty.

        Single-threaded read-modify-write of each byte: a clear by the front-end racing
        with it can only leave a page marked twice, never lose our mark.
        """
        if length <= 0:
            return
        first = gpa // LOG_PAGE_SIZE
        last = (gpa + length - 1) // LOG_PAGE_SIZE
        mm = self._mm
        for page in range(first, last + 1):
            byte = self._offset + page // 8
            if page // 8 >= self.size:
                return  # outside the log the front-end gave: nothing to mark
            mm[byte] = mm[byte] | (1 << (page % 8))

    def mark_all(self) -> None:
        """Set every bit of the log (the misbehaviour ``log-after-stop``)."""
        self._mm[self._offset : self._offset + self.size] = b"\xff" * self.size

    def close(self) -> None:
        """Unmap the log."""
        _close_map(self._mm)
