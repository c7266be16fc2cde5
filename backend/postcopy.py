"""userfaultfd for postcopy migration (vhost-user.rst "Migration", POSTCOPY_ADVISE /
POSTCOPY_LISTEN / POSTCOPY_END, SET_MEM_TABLE in postcopy mode).

The back-end opens a userfaultfd at POSTCOPY_ADVISE and passes it to the front-end, which
serves the faults (it copies the page into the shared memory and wakes us). Once the front-end
is listening, every mapped region is registered for missing-page faults; POSTCOPY_END closes
the fd (the front-end closes its copy too, which unregisters the regions).

Linux ABI (include/uapi/linux/userfaultfd.h): ``userfaultfd(2)`` is syscall 323 on x86-64;
UFFDIO_API = _IOWR(0xAA, 0x3F, struct uffdio_api {u64 api, features, ioctls}) with
UFFD_API 0xAA; UFFDIO_REGISTER = _IOWR(0xAA, 0x00, struct uffdio_register {u64 start, len,
mode, ioctls}) with UFFDIO_REGISTER_MODE_MISSING 1; UFFDIO_UNREGISTER = _IOR(0xAA, 0x01,
struct uffdio_range {u64 start, len}).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass, field

_SYS_USERFAULTFD = 323  # x86-64
_UFFD_API = 0xAA


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0xAA << 8) | nr


_UFFDIO_API = _ioc(3, 0x3F, 24)
_UFFDIO_REGISTER = _ioc(3, 0x00, 32)
_UFFDIO_UNREGISTER = _ioc(2, 0x01, 16)
_MODE_MISSING = 1

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(slots=True)
class Postcopy:
    """One connection's postcopy state."""

    #: our userfaultfd (POSTCOPY_ADVISE), -1 before
    ufd: int = -1
    #: POSTCOPY_LISTEN came (until POSTCOPY_END)
    listening: bool = False
    #: (start, length) of the mappings registered with ``ufd``
    ranges: list[tuple[int, int]] = field(default_factory=list)
    #: a postcopy SET_MEM_TABLE reply waits for the front-end's ack
    ack_pending: bool = False


class UserfaultError(OSError):
    """userfaultfd is not available, or an ioctl on it failed."""


def open_userfaultfd() -> int:
    """A new userfaultfd (close-on-exec, non-blocking), its API handshake done."""
    fd = int(_libc.syscall(_SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK))
    if fd < 0:
        err = ctypes.get_errno()
        raise UserfaultError(err, f"userfaultfd: {os.strerror(err)}")
    try:
        fcntl.ioctl(fd, _UFFDIO_API, bytearray(struct.pack("<QQQ", _UFFD_API, 0, 0)))
    except OSError as exc:
        os.close(fd)
        raise UserfaultError(exc.errno or 0, f"UFFDIO_API: {exc.strerror}") from None
    return fd


def mapping_address(mm: mmap.mmap) -> int:
    """The address of ``mm`` in this process."""
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # releases the buffer export (the mapping can be closed later)


def register(fd: int, start: int, length: int) -> None:
    """Register [start, start+length) for missing-page faults on ``fd``."""
    try:
        fcntl.ioctl(fd, _UFFDIO_REGISTER,
                    bytearray(struct.pack("<QQQQ", start, length, _MODE_MISSING, 0)))
    except OSError as exc:
        raise UserfaultError(exc.errno or 0, f"UFFDIO_REGISTER: {exc.strerror}") from None


def unregister(fd: int, start: int, length: int) -> None:
    """Unregister [start, start+length) from ``fd``."""
    try:
        fcntl.ioctl(fd, _UFFDIO_UNREGISTER, bytearray(struct.pack("<QQ", start, length)))
    except OSError as exc:
        raise UserfaultError(exc.errno or 0, f"UFFDIO_UNREGISTER: {exc.strerror}") from None
