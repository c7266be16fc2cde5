"""The disk behind the device: a file or a RAM disk (a memfd), read and written with
``os.preadv``/``os.pwritev`` straight into guest buffers.

Sizes on the command line (``64M``) are parsed here too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

#: virtio-blk sectors are always 512 bytes, whatever blk_size says (VIRTIO 1.2 5.2.6).
SECTOR_SIZE = 512

_SIZE_RE = re.compile(r"^(\d+)([KMGT]?)(i?B?)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class DiskError(Exception):
    """A disk could not be opened or an access fell outside it."""


def parse_size(text: str) -> int:
    """Parse ``4096``, ``64M``, ``1G``, ``512K``, ``2GiB`` into bytes (binary units)."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r} (expected e.g. 4096, 64M, 1G)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


class Disk:
    """A block of bytes the device serves: a regular file or a memfd RAM disk.

    Every access is checked against :attr:`size`; reads and writes scatter/gather
    directly into the buffers given (guest memory views), one syscall per request.
    """

    def __init__(self, fd: int, size: int, *, read_only: bool, name: str, is_ram: bool) -> None:
        self.fd = fd
        self.size = size
        self.read_only = read_only
        self.name = name
        self.is_ram = is_ram
        #: whether :meth:`flush` really syncs (the misbehaviour ``flush-no-sync`` clears it)
        self.sync = True

    @classmethod
    def open_file(cls, path: str, *, read_only: bool = False) -> Disk:
        """Open an existing image file (raw); its size is the disk size."""
        try:
            fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskError(f"cannot open disk {path!r}: {exc.strerror}") from None
        size = os.fstat(fd).st_size
        if size < SECTOR_SIZE:
            os.close(fd)
            raise DiskError(f"disk {path!r} holds {size} bytes, less than one 512-byte sector")
        return cls(fd, size, read_only=read_only, name=path, is_ram=False)

    @classmethod
    def ram(cls, size: int, *, read_only: bool = False) -> Disk:
        """A zero-filled RAM disk of ``size`` bytes (a memfd, so preadv/pwritev work on it)."""
        if size < SECTOR_SIZE:
            raise DiskError(f"RAM disk of {size} bytes is smaller than one 512-byte sector")
        fd = os.memfd_create("vhost-conformance-ram-disk", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            os.close(fd)
            raise DiskError(f"cannot size RAM disk to {size} bytes: {exc.strerror}") from None
        return cls(fd, size, read_only=read_only, name=f"ram:{size}", is_ram=True)

    @property
    def capacity_sectors(self) -> int:
        """The size in 512-byte sectors (rounded down), as virtio-blk config ``capacity``."""
        return self.size // SECTOR_SIZE

    def check_range(self, offset: int, length: int) -> None:
        """Raise DiskError unless [offset, offset+length) lies inside the disk."""
        if offset < 0 or length < 0 or offset + length > self.capacity_sectors * SECTOR_SIZE:
            raise DiskError(
                f"access at byte {offset} length {length} outside the disk "
                f"({self.capacity_sectors * SECTOR_SIZE} bytes)"
            )

    def read_into(self, offset: int, buffers: Sequence[memoryview]) -> int:
        """Fill ``buffers`` from the disk at ``offset``; return bytes read."""
        total = sum(len(b) for b in buffers)
        self.check_range(offset, total)
        done = os.preadv(self.fd, buffers, offset) if buffers else 0
        if done != total:
            raise DiskError(f"short read at byte {offset}: {done} of {total} bytes")
        return done

    def write_from(self, offset: int, buffers: Sequence[memoryview]) -> int:
        """Write ``buffers`` to the disk at ``offset``; return bytes written."""
        if self.read_only:
            raise DiskError("write to a read-only disk")
        total = sum(len(b) for b in buffers)
        self.check_range(offset, total)
        done = os.pwritev(self.fd, buffers, offset) if buffers else 0
        if done != total:
            raise DiskError(f"short write at byte {offset}: {done} of {total} bytes")
        return done

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read back as zeroes."""
        if self.read_only:
            raise DiskError("write-zeroes on a read-only disk")
        self.check_range(offset, length)
        chunk = bytes(min(length, 1 << 20))
        done = 0
        while done < length:
            n = min(len(chunk), length - done)
            os.pwrite(self.fd, chunk[:n] if n != len(chunk) else chunk, offset + done)
            done += n

    def discard(self, offset: int, length: int) -> None:
        """Discard [offset, offset+length): the contents afterwards are unspecified
        (VIRTIO 1.2 5.2.6.1); we zero them, which is one of the allowed outcomes."""
        self.write_zeroes(offset, length)

    def flush(self) -> None:
        """Make completed writes durable (fdatasync; nothing to do for a RAM disk, or with
        the misbehaviour ``flush-no-sync``: :attr:`sync` False)."""
        if not self.is_ram and not self.read_only and self.sync:
            os.fdatasync(self.fd)

    def close(self) -> None:
        """Close the disk's fd (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
