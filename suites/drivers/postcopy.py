"""What a postcopy case needs to see of the back-end process: its memory mappings and whether
the kernel has them registered with a userfaultfd (``/proc/PID/smaps`` VmFlags ``um``:
missing-page tracking), over the whole process tree (a wrapper script runs the real back-end
as a child)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import struct
import time

_VMA = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")


def vma_flags(pids: list[int], start: int) -> str | None:
    """The VmFlags of the mapping that starts at ``start`` in one of ``pids``, None if none."""
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        inside = False
        for line in lines:
            match = _VMA.match(line)
            if match:
                inside = int(match.group(1), 16) == start
            elif inside and line.startswith("VmFlags:"):
                return line.split(":", 1)[1].strip()
    return None


def mappings_of(pids: list[int], name: str) -> list[tuple[int, str]]:
    """(start, VmFlags) of every mapping in ``pids`` of a file whose path contains ``name``
    (a memfd shows as ``/memfd:NAME (deleted)``)."""
    out: list[tuple[int, str]] = []
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        start: int | None = None
        for line in lines:
            match = _VMA.match(line)
            if match:
                start = int(match.group(1), 16) if name in line else None
            elif start is not None and line.startswith("VmFlags:"):
                out.append((start, line.split(":", 1)[1].strip()))
                start = None
    return out


#: struct uffd_msg (include/uapi/linux/userfaultfd.h): 32 bytes, event at 0
#: (UFFD_EVENT_PAGEFAULT 0x12), pagefault.address at 16
_UFFD_MSG = struct.Struct("<B7xQQ8x")
_UFFD_EVENT_PAGEFAULT = 0x12
#: UFFDIO_WAKE = _IOR(0xAA, 0x02, struct uffdio_range {u64 start, len})
_UFFDIO_WAKE = (2 << 30) | (16 << 16) | (0xAA << 8) | 0x02


def next_fault(uffd: int, timeout: float) -> int | None:
    """The address of the next page fault the back-end reports on ``uffd`` within
    ``timeout`` seconds (None: none came)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([uffd], [], [], left)[0]:
            return None
        try:
            data = os.read(uffd, _UFFD_MSG.size)
        except BlockingIOError:
            continue
        if len(data) == _UFFD_MSG.size:
            event, _flags, address = _UFFD_MSG.unpack(data)
            if event == _UFFD_EVENT_PAGEFAULT:
                return int(address)


def wake(uffd: int, address: int, length: int = 4096) -> None:
    """Wake whoever waits on the faulted page at ``address`` (the page is now there)."""
    start = address & ~(length - 1)
    with contextlib.suppress(OSError):
        fcntl.ioctl(uffd, _UFFDIO_WAKE, bytearray(struct.pack("<QQ", start, length)))
