"""Guest RAM as memfd regions shared with a back-end, the GPA/user-address maps, and the dirty log.

A region is what SET_MEM_TABLE / ADD_MEM_REG describe (SPEC-DIGEST 1.2 "memory region"):
``guest_phys_addr``, ``memory_size``, ``userspace_addr`` (the front-end's own virtual address
as QEMU would send it) and ``mmap_offset`` (where the region's bytes start in the fd). The
back-end maps ``mmap_offset + memory_size`` bytes of the fd. User addresses are deliberately
unrelated to GPAs (a high base, regions placed in creation order with guard gaps), so a
back-end that mixes GPAs and user addresses, or applies one region's offset to another,
reads the wrong bytes (TEST-IDEAS #16).
"""

from __future__ import annotations

import bisect
import fcntl
import mmap
import os
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vhost_conformance.frontend.barrier import Shm, compare_buffers
from vhost_conformance.frontend.errors import MisuseError
from vhost_conformance.frontend.protocol import MemoryRegion

__all__ = [
    "DEFAULT_HVA_BASE",
    "LOG_PAGE_SIZE",
    "PAGE_SIZE",
    "DirtyLog",
    "GuestMemory",
    "GuestRegion",
    "MemoryAccessError",
    "MemorySnapshot",
]

PAGE_SIZE = 4096
# vhost-user.rst "Migration": the dirty log has one bit per 4 KiB page (SPEC-DIGEST VU-LOG-1).
LOG_PAGE_SIZE = 4096
# A user-space-looking address far from any GPA a test uses (QEMU's RAM lives near 0x7f...).
DEFAULT_HVA_BASE = 0x7F3A_0000_0000
_HVA_ALIGN = 2 << 20  # regions' user addresses are 2 MiB aligned ...
_HVA_GUARD = 2 << 20  # ... with a 2 MiB gap between them

_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
_F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)
_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)


class MemoryAccessError(ValueError, MisuseError):
    """A guest-physical access the front-end library was asked to make is not inside one region."""


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


@dataclass(eq=False)
class GuestRegion:
    """One region of guest RAM: a memfd of ``mmap_offset + memory_size`` bytes, mapped shared."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    fd: int
    mm: mmap.mmap = field(repr=False)
    shm: Shm = field(repr=False)
    # Bytes of the region only (starts at mmap_offset inside the mapping).
    data: memoryview = field(repr=False)
    alloc_cursor: int = 0
    end: int = field(init=False)  # first GPA after the region
    # Views handed out by GuestMemory.view(): released at close so the mmap can be unmapped.
    views: list[weakref.ref[memoryview]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.end = self.guest_phys_addr + self.memory_size

    def contains(self, gpa: int, n: int = 1) -> bool:
        """Whether ``[gpa, gpa + n)`` lies inside this region."""
        return self.guest_phys_addr <= gpa and gpa + n <= self.end

    def describe(self) -> str:
        """Short text used in error messages."""
        return f"[{self.guest_phys_addr:#x}, {self.end:#x})"

    def close(self) -> None:
        """Release the barrier pointer, the view, the mapping and the fd."""
        self.shm.close()
        for ref in self.views:
            view = ref()
            if view is not None:
                view.release()
        self.views.clear()
        self.data.release()
        self.mm.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _new_region(gpa: int, size: int, uaddr: int, mmap_offset: int, name: str) -> GuestRegion:
    if size <= 0 or size % PAGE_SIZE:
        raise MemoryAccessError(f"region size {size:#x} must be a positive multiple of {PAGE_SIZE}")
    if gpa < 0 or gpa % PAGE_SIZE:
        raise MemoryAccessError(f"region GPA {gpa:#x} must be page aligned")
    if mmap_offset < 0:
        raise MemoryAccessError(f"mmap_offset {mmap_offset:#x} must not be negative")
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, mmap_offset + size)
        # The back-end must not resize guest RAM under us.
        fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_SHRINK | _F_SEAL_GROW)
        mm = mmap.mmap(fd, mmap_offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    whole = memoryview(mm)
    data = whole[mmap_offset : mmap_offset + size]
    whole.release()
    try:
        shm = Shm(data)
    except BaseException:
        data.release()
        mm.close()
        os.close(fd)
        raise
    return GuestRegion(gpa, size, uaddr, mmap_offset, fd, mm, shm, data)


@dataclass(frozen=True)
class MemorySnapshot:
    """A copy of every region's bytes at one moment (see :meth:`GuestMemory.diff`)."""

    regions: tuple[tuple[int, bytes], ...]  # (guest_phys_addr, contents)


class GuestMemory:
    """Guest RAM: memfd regions at GPAs, their user addresses, accessors and an allocator."""

    def __init__(self, *, hva_base: int = DEFAULT_HVA_BASE) -> None:
        self._regions: list[GuestRegion] = []  # sorted by guest_phys_addr
        self._starts: list[int] = []
        self._hva_next = hva_base
        self._closed = False

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        layout: Sequence[tuple[int, int]],
        *,
        mmap_offset: int = 0,
        hva_base: int = DEFAULT_HVA_BASE,
    ) -> GuestMemory:
        """Regions at the given ``(gpa, size)`` pairs, each with ``mmap_offset`` bytes before its
        data in the fd; user addresses from ``hva_base`` in the order given."""
        memory = cls(hva_base=hva_base)
        try:
            for gpa, size in layout:
                memory.add_region(gpa, size, mmap_offset=mmap_offset)
        except BaseException:
            memory.close()
            raise
        return memory

    @classmethod
    def simple(
        cls,
        size: int,
        regions: int = 1,
        *,
        hole: int = 1 << 20,
        mmap_offset: int = 0,
        hva_base: int = DEFAULT_HVA_BASE,
    ) -> GuestMemory:
        """``size`` bytes split into ``regions`` page-aligned, non-contiguous GPA ranges starting
        at GPA 0 with ``hole`` bytes between them."""
        if regions < 1:
            raise MemoryAccessError("need at least one region")
        chunk = _align_up(max(size // regions, PAGE_SIZE), PAGE_SIZE)
        layout = []
        gpa = 0
        for _ in range(regions):
            layout.append((gpa, chunk))
            gpa = _align_up(gpa + chunk + hole, PAGE_SIZE)
        return cls.create(layout, mmap_offset=mmap_offset, hva_base=hva_base)

    def add_region(
        self,
        gpa: int,
        size: int,
        *,
        mmap_offset: int = 0,
        userspace_addr: int | None = None,
    ) -> GuestRegion:
        """Add a region (the ADD_MEM_REG case); refuses a GPA or user range overlapping an
        existing one (vhost-user.rst "Memory region description": ranges never overlap)."""
        self._check_open()
        for region in self._regions:
            if gpa < region.end and region.guest_phys_addr < gpa + size:
                raise MemoryAccessError(
                    f"GPA range [{gpa:#x}, {gpa + size:#x}) overlaps region {region.describe()}"
                )
        if userspace_addr is None:
            userspace_addr = _align_up(self._hva_next, _HVA_ALIGN)
        for region in self._regions:
            if (
                userspace_addr < region.userspace_addr + region.memory_size
                and region.userspace_addr < userspace_addr + size
            ):
                raise MemoryAccessError(
                    f"user range [{userspace_addr:#x}, {userspace_addr + size:#x}) overlaps "
                    f"the user range of region {region.describe()}"
                )
        region = _new_region(gpa, size, userspace_addr, mmap_offset, f"guest-ram-{gpa:#x}")
        self._hva_next = max(self._hva_next, userspace_addr + size + _HVA_GUARD)
        index = bisect.bisect(self._starts, gpa)
        self._regions.insert(index, region)
        self._starts.insert(index, gpa)
        return region

    def remove_region(self, gpa: int, *, close: bool = True) -> GuestRegion:
        """Forget the region starting at ``gpa`` (the REM_MEM_REG case) and return it (its fields
        still describe it, for the REM_MEM_REG payload). ``close=False`` leaves it mapped and
        open for the caller to close (e.g. to look at what a back-end still writes there)."""
        self._check_open()
        index = bisect.bisect_left(self._starts, gpa)
        if index >= len(self._regions) or self._starts[index] != gpa:
            raise MemoryAccessError(f"no region starts at GPA {gpa:#x}; regions: {self._describe()}")
        region = self._regions.pop(index)
        self._starts.pop(index)
        if close:
            region.close()
        return region

    # -- lookup -------------------------------------------------------------------------------

    @property
    def regions(self) -> tuple[GuestRegion, ...]:
        """The regions, by ascending GPA."""
        return tuple(self._regions)

    def _describe(self) -> str:
        return ", ".join(r.describe() for r in self._regions) or "none"

    def region_of(self, gpa: int) -> GuestRegion:
        """The region holding ``gpa``."""
        index = bisect.bisect(self._starts, gpa) - 1
        if index >= 0:
            region = self._regions[index]
            if gpa < region.end:
                return region
        raise MemoryAccessError(f"GPA {gpa:#x} is in no region; regions: {self._describe()}")

    def locate(self, gpa: int, n: int) -> tuple[GuestRegion, int]:
        """``(region, offset in region)`` for ``[gpa, gpa + n)``, which must not cross a region."""
        index = bisect.bisect(self._starts, gpa) - 1
        if index >= 0:
            region = self._regions[index]
            if gpa + n <= region.end and n >= 0:
                return region, gpa - region.guest_phys_addr
        raise MemoryAccessError(
            f"GPA range [{gpa:#x}, {gpa + n:#x}) ({n} bytes) is not inside one region; "
            f"regions: {self._describe()}"
        )

    def gpa_to_uaddr(self, gpa: int) -> int:
        """The front-end user address of ``gpa`` (what SET_VRING_ADDR carries)."""
        region = self.region_of(gpa)
        return region.userspace_addr + (gpa - region.guest_phys_addr)

    def uaddr_to_gpa(self, uaddr: int) -> int:
        """The GPA of a front-end user address."""
        for region in self._regions:
            if region.userspace_addr <= uaddr < region.userspace_addr + region.memory_size:
                return region.guest_phys_addr + (uaddr - region.userspace_addr)
        raise MemoryAccessError(f"user address {uaddr:#x} is in no region; regions: "
                                + ", ".join(f"user [{r.userspace_addr:#x}, "
                                            f"{r.userspace_addr + r.memory_size:#x})"
                                            for r in self._regions))

    # -- access -------------------------------------------------------------------------------

    def view(self, gpa: int, n: int) -> memoryview:
        """A writable view of ``n`` bytes at ``gpa``; :meth:`close` releases it (using it after
        that raises ValueError)."""
        region, off = self.locate(gpa, n)
        view = region.data[off : off + n]
        views = region.views
        if len(views) > 64:
            views[:] = [ref for ref in views if ref() is not None]
        views.append(weakref.ref(view))
        return view

    def read(self, gpa: int, n: int) -> bytes:
        """Copy ``n`` bytes at ``gpa``."""
        region, off = self.locate(gpa, n)
        return bytes(region.data[off : off + n])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``gpa``."""
        n = len(data)
        region, off = self.locate(gpa, n)
        region.data[off : off + n] = data

    def fill(self, gpa: int, n: int, byte: int) -> None:
        """Set ``n`` bytes at ``gpa`` to ``byte``."""
        self.write(gpa, bytes([byte]) * n)

    # -- allocator ----------------------------------------------------------------------------

    def alloc(self, size: int, align: int = 16) -> int:
        """Bump-allocate ``size`` bytes aligned to ``align`` inside one region (the first, by
        GPA, with room left); never freed."""
        self._check_open()
        if size <= 0 or align <= 0 or align & (align - 1):
            raise MemoryAccessError(f"alloc({size}, align={align}): size > 0, align a power of 2")
        for region in self._regions:
            start = _align_up(region.guest_phys_addr + region.alloc_cursor, align)
            if start + size <= region.end:
                region.alloc_cursor = start + size - region.guest_phys_addr
                return start
        free = sum(r.memory_size - r.alloc_cursor for r in self._regions)
        raise MemoryAccessError(
            f"guest memory exhausted: {size} bytes (align {align}) do not fit in one region; "
            f"{free} bytes left in total; regions: {self._describe()}"
        )

    # -- vhost-user descriptions --------------------------------------------------------------

    def memory_regions(self) -> list[MemoryRegion]:
        """The regions as the wire codec's ``MemoryRegion`` (SET_MEM_TABLE / ADD_MEM_REG order:
        ascending GPA, same order as :meth:`fds`)."""
        return [
            MemoryRegion(
                guest_phys_addr=r.guest_phys_addr,
                memory_size=r.memory_size,
                userspace_addr=r.userspace_addr,
                mmap_offset=r.mmap_offset,
            )
            for r in self._regions
        ]

    def fds(self) -> list[int]:
        """One memfd per region, in :meth:`memory_regions` order."""
        return [r.fd for r in self._regions]

    @property
    def highest_gpa(self) -> int:
        """First GPA after the highest region (sizes the dirty log)."""
        return max((r.end for r in self._regions), default=0)

    # -- write detection ----------------------------------------------------------------------

    def snapshot(self) -> MemorySnapshot:
        """Copy all guest memory (compare later with :meth:`diff`)."""
        return MemorySnapshot(tuple((r.guest_phys_addr, bytes(r.data)) for r in self._regions))

    def diff(
        self,
        snapshot: MemorySnapshot,
        *,
        exclude: Iterable[tuple[int, int]] = (),
    ) -> list[tuple[int, int]]:
        """Byte ranges ``(gpa, length)`` whose contents changed since ``snapshot``, merged, with
        the ``(gpa, length)`` ranges of ``exclude`` cut out (e.g. buffers still owned by the
        device). A region present in the snapshot but gone now counts as wholly changed."""
        changed: list[tuple[int, int]] = []
        current = {r.guest_phys_addr: r for r in self._regions}
        for gpa, old in snapshot.regions:
            region = current.get(gpa)
            if region is None or region.memory_size != len(old):
                changed.append((gpa, len(old)))
                continue
            changed += [(gpa + off, n) for off, n in compare_buffers(old, region.data)]
        return _subtract(_merge(changed), _merge(list(exclude)))

    # -- lifetime -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise MemoryAccessError("guest memory is closed")

    def close(self) -> None:
        """Unmap every region and close its memfd (idempotent)."""
        self._closed = True
        while self._regions:
            self._regions.pop().close()
        self._starts.clear()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GuestMemory({self._describe()})"


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for gpa, n in sorted(r for r in ranges if r[1] > 0):
        if out and gpa <= out[-1][0] + out[-1][1]:
            last_gpa, last_n = out[-1]
            out[-1] = (last_gpa, max(last_n, gpa + n - last_gpa))
        else:
            out.append((gpa, n))
    return out


def _subtract(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for gpa, n in ranges:
        pieces = [(gpa, gpa + n)]
        for hole_gpa, hole_n in holes:
            hole_end = hole_gpa + hole_n
            next_pieces = []
            for lo, hi in pieces:
                if hole_end <= lo or hi <= hole_gpa:
                    next_pieces.append((lo, hi))
                    continue
                if lo < hole_gpa:
                    next_pieces.append((lo, hole_gpa))
                if hole_end < hi:
                    next_pieces.append((hole_end, hi))
            pieces = next_pieces
        out += [(lo, hi - lo) for lo, hi in pieces]
    return out


class DirtyLog:
    """The SET_LOG_BASE shared bitmap: bit ``p % 8`` of byte ``p // 8`` marks 4 KiB page ``p``
    dirty (vhost-user.rst "Migration", SPEC-DIGEST VU-LOG-1)."""

    def __init__(self, highest_gpa: int, *, mmap_offset: int = 0) -> None:
        if mmap_offset % PAGE_SIZE:
            raise MemoryAccessError(f"dirty log mmap_offset {mmap_offset:#x} is not page aligned "
                                    "(the back-end mmaps the log at that file offset)")
        pages = (highest_gpa + LOG_PAGE_SIZE - 1) // LOG_PAGE_SIZE
        self.bitmap_size = (pages + 7) // 8
        self.mmap_offset = mmap_offset
        # SET_LOG_BASE {mmap_size, mmap_offset}: the back-end maps mmap_size bytes of the fd
        # starting at mmap_offset (QEMU sends offset 0); the file holds both.
        self.mmap_size = _align_up(max(self.bitmap_size, 1), PAGE_SIZE)
        self.fd = os.memfd_create("dirty-log", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, mmap_offset + self.mmap_size)
            self._mm = mmap.mmap(self.fd, mmap_offset + self.mmap_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise

    @classmethod
    def for_memory(cls, memory: GuestMemory, *, mmap_offset: int = 0) -> DirtyLog:
        """A log sized for the highest GPA of ``memory``."""
        return cls(memory.highest_gpa, mmap_offset=mmap_offset)

    def bitmap(self) -> bytes:
        """The bitmap bytes (after ``mmap_offset``)."""
        return bytes(self._mm[self.mmap_offset : self.mmap_offset + self.bitmap_size])

    def dirty_pages(self) -> set[int]:
        """Page numbers (GPA // 4096) whose bit is set."""
        pages: set[int] = set()
        for index, byte in enumerate(self.bitmap()):
            if byte:
                base = index * 8
                pages.update(base + bit for bit in range(8) if byte >> bit & 1)
        return pages

    def is_dirty(self, gpa: int) -> bool:
        """Whether the page holding ``gpa`` is marked."""
        page = gpa // LOG_PAGE_SIZE
        return bool(self._mm[self.mmap_offset + page // 8] >> (page % 8) & 1)

    def clear(self) -> None:
        """Zero the bitmap."""
        self._mm[self.mmap_offset : self.mmap_offset + self.bitmap_size] = bytes(self.bitmap_size)

    def close(self) -> None:
        """Unmap and close the fd (idempotent)."""
        if self.fd >= 0:
            self._mm.close()
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> DirtyLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
