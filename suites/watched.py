"""The watched disk: the back-end's ``{disk}`` as a file on a FUSE filesystem the suite owns.

The filesystem (one file, ``disk.img``, backed by a real file) runs in a child process
(``python -m vhost_conformance.suites.watched``, libfuse3 through mfusepy). It

- adds a real, uncancellable latency to reads, writes and flushes (``fsync``/``fdatasync``):
  the request sleeps in the filesystem before it reaches the backing file, whatever the
  back-end does meanwhile (a FUSE interrupt is ignored);
- journals every write, flush and discard (``fallocate`` punch-hole) as one JSON line:
  ``op``, ``t0`` (arrival) and ``t1`` (reached the backing file, after the latency), both
  CLOCK_MONOTONIC in seconds (the suite's ``time.monotonic``), ``offset``, ``length``,
  ``sha256`` of the data (writes) and ``pid`` of the writing process;
- opens with ``direct_io`` (FOPEN_DIRECT_IO), so ``O_DIRECT``, libaio and io_uring users work.

The mount never outlives a run: the child dies with its parent (PR_SET_PDEATHSIG), the
parent unmounts on every exit path, and :func:`clean_stale_mounts` lazily unmounts (MNT_DETACH)
every watched mount whose owner process is gone (a suite killed with SIGKILL), before the next
mount. Where FUSE cannot be used :func:`unavailable` says why (the case is ``unsupported``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: fsname prefix of every watched mount; the owner's pid follows (``vc-watched:1234``).
FSNAME = "vc-watched"
#: the one file of the filesystem
DISK_NAME = "disk.img"
#: how long a mount may take to appear / a child to exit
MOUNT_TIMEOUT = 10.0
_MNT_DETACH = 2
_PR_SET_PDEATHSIG = 1
_FALLOC_FL_PUNCH_HOLE = 0x02


# --------------------------------------------------------------------------- journal


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One write, flush or discard as the filesystem saw it."""

    op: str  # "write", "flush", "discard"
    t0: float  # arrival (CLOCK_MONOTONIC s)
    t1: float  # reached the backing file (after the latency)
    offset: int
    length: int
    sha256: str
    pid: int

    @property
    def sector(self) -> int:
        """First 512-byte sector touched."""
        return self.offset // 512


def read_journal(path: Path) -> list[JournalEntry]:
    """The journal's entries in the order they reached the backing file (a torn last line is
    left out: the writer may be mid-line)."""
    entries: list[JournalEntry] = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return entries
    for line in text.splitlines():
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            continue
        entries.append(JournalEntry(str(raw["op"]), float(raw["t0"]), float(raw["t1"]),
                                    int(raw["offset"]), int(raw["length"]),
                                    str(raw.get("sha256", "")), int(raw["pid"])))
    entries.sort(key=lambda e: e.t1)
    return entries


# --------------------------------------------------------------------------- availability


def unavailable() -> str | None:
    """Why the watched disk cannot be used here, or None when it can."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine (FUSE not available)"
    if os.geteuid() != 0:
        return "mounting the watched disk needs root (mount(2) on /dev/fuse)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"no usable libfuse3 binding ({exc}); run scripts/provision-peers --only fuse"
    return None


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fstype, source) of every mount in this namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) >= 5 and len(rfields) >= 2:
                point = fields[4].replace("\\040", " ")
                out.append((point, rfields[0], rfields[1]))
    return out


def _umount(point: str, flags: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.umount2(point.encode(), flags)
    return 0 if rc == 0 else ctypes.get_errno()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watched_mounts() -> list[tuple[str, int]]:
    """(mount point, owner pid) of every watched mount in this namespace."""
    found = []
    for point, _fstype, source in _mounts():
        if source.startswith(FSNAME + ":"):
            with contextlib.suppress(ValueError):
                found.append((point, int(source.split(":", 1)[1])))
    return found


def clean_stale_mounts() -> list[str]:
    """Lazily unmount every watched mount whose owner process is gone; the points detached."""
    detached = []
    for point, owner in watched_mounts():
        if not _pid_alive(owner) and _umount(point, _MNT_DETACH) == 0:
            detached.append(point)
    return detached


# --------------------------------------------------------------------------- parent side

#: the watched disks this process has mounted, by backing file
_ACTIVE: dict[str, WatchedDisk] = {}


def active(path: Path) -> WatchedDisk | None:
    """The mounted watched disk whose backing file or watched file is ``path``, if any."""
    for disk in _ACTIVE.values():
        if str(path) in (str(disk.backing), str(disk.path)):
            return disk
    return None


class WatchedDisk:
    """A mounted watched disk: ``path`` is the file to hand the back-end as ``{disk}``."""

    def __init__(self, backing: Path, mountpoint: Path, *, latency_ms: int = 0) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.journal_path = mountpoint.parent / (mountpoint.name + ".journal")
        self.control_path = mountpoint.parent / (mountpoint.name + ".latency")
        self.log_path = mountpoint.parent / (mountpoint.name + ".log")
        self._latency_ms = latency_ms
        self._child: subprocess.Popen[bytes] | None = None

    @property
    def path(self) -> Path:
        """The watched file (inside the mount)."""
        return self.mountpoint / DISK_NAME

    @property
    def mounted(self) -> bool:
        """Whether the mount point is a watched mount now."""
        return any(point == str(self.mountpoint) for point, _ in watched_mounts())

    def set_latency(self, latency_ms: int) -> None:
        """Latency per read, write and flush from the next request on."""
        self._latency_ms = latency_ms
        tmp = self.control_path.with_suffix(".tmp")
        tmp.write_text(str(latency_ms))
        os.replace(tmp, self.control_path)

    def journal(self) -> list[JournalEntry]:
        """Every write, flush and discard so far."""
        return read_journal(self.journal_path)

    def mount(self) -> None:
        """Mount (stale mounts of dead runs are detached first); raises OSError on failure."""
        reason = unavailable()
        if reason is not None:
            raise OSError(errno.ENODEV, reason)
        clean_stale_mounts()
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.set_latency(self._latency_ms)
        self.journal_path.write_text("")
        with open(self.log_path, "ab") as log:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "vhost_conformance.suites.watched",
                 "--backing", str(self.backing), "--mount", str(self.mountpoint),
                 "--journal", str(self.journal_path), "--control", str(self.control_path),
                 "--owner", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not self.mounted:
            if self._child.poll() is not None or time.monotonic() > deadline:
                self.unmount()
                tail = self.log_path.read_text(errors="replace")[-800:]
                raise OSError(errno.EIO, f"the watched disk did not mount: {tail.strip()}")
            time.sleep(0.02)
        _ACTIVE[str(self.backing)] = self

    def unmount(self) -> None:
        """Unmount (lazily when busy), end and reap the filesystem process."""
        if _ACTIVE.get(str(self.backing)) is self:
            del _ACTIVE[str(self.backing)]
        busy = False
        if self.mounted and _umount(str(self.mountpoint)) != 0:
            busy = True
            _umount(str(self.mountpoint), _MNT_DETACH)
        child, self._child = self._child, None
        if child is not None:
            try:
                child.wait(1.0 if busy else MOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                # a user still holds the detached file: end the filesystem (its I/O fails)
                child.terminate()
                try:
                    child.wait(MOUNT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait(MOUNT_TIMEOUT)

    def __enter__(self) -> WatchedDisk:
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@contextlib.contextmanager
def watched(backing: Path, mountpoint: Path, latency_ms: int = 0) -> Iterator[WatchedDisk]:
    """A mounted :class:`WatchedDisk` for the block."""
    disk = WatchedDisk(backing, mountpoint, latency_ms=latency_ms)
    disk.mount()
    try:
        yield disk
    finally:
        disk.unmount()


# --------------------------------------------------------------------------- child side


class _Operations:
    """mfusepy operations: a root directory holding the one watched file."""

    use_ns = True

    def __init__(self, backing: str, journal: str, control: str) -> None:
        self.fd = os.open(backing, os.O_RDWR)
        self.journal_fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.control = control
        self._control_mtime = -1
        self._latency = 0.0
        self._lock = threading.Lock()

    def _delay(self) -> None:
        # the latency is real and uncancellable: the request sleeps whatever happens meanwhile
        try:
            st = os.stat(self.control)
            if st.st_mtime_ns != self._control_mtime:
                self._control_mtime = st.st_mtime_ns
                self._latency = int(Path(self.control).read_text().strip() or 0) / 1000.0
        except (OSError, ValueError):
            pass
        if self._latency > 0:
            time.sleep(self._latency)

    def _record(self, op: str, t0: float, offset: int, length: int, digest: str) -> None:
        from mfusepy import fuse_get_context

        pid = fuse_get_context()[2]
        line = json.dumps({"op": op, "t0": t0, "t1": time.monotonic(), "offset": offset,
                           "length": length, "sha256": digest, "pid": pid}) + "\n"
        with self._lock:
            os.write(self.journal_fd, line.encode())

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        now = time.time_ns()
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_atime": now,
                    "st_mtime": now, "st_ctime": now}
        if path == "/" + DISK_NAME:
            size = os.fstat(self.fd).st_size
            return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1, "st_size": size,
                    "st_blocks": (size + 511) // 512, "st_atime": now, "st_mtime": now,
                    "st_ctime": now}
        raise _fuse_error(errno.ENOENT)

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", DISK_NAME]

    def open(self, path: str, fi: Any) -> int:
        if path != "/" + DISK_NAME:
            raise _fuse_error(errno.ENOENT)
        fi.direct_io = 1  # FOPEN_DIRECT_IO: O_DIRECT opens work, no page cache in between
        fi.fh = 0
        return 0

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        self._delay()
        return os.pread(self.fd, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        t0 = time.monotonic()
        self._delay()
        n = os.pwrite(self.fd, data, offset)
        self._record("write", t0, offset, n, hashlib.sha256(data[:n]).hexdigest())
        return n

    def fsync(self, path: str, datasync: int, fh: Any) -> int:
        t0 = time.monotonic()
        self._delay()
        os.fdatasync(self.fd) if datasync else os.fsync(self.fd)
        self._record("flush", t0, 0, 0, "")
        return 0

    def flush(self, path: str, fh: Any) -> int:
        return 0  # close(2): not a FLUSH request

    def release(self, path: str, fh: Any) -> int:
        return 0

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        os.ftruncate(self.fd, length)
        return 0

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: Any) -> int:
        t0 = time.monotonic()
        self._delay()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        if libc.fallocate(self.fd, mode, offset, size) != 0:
            raise _fuse_error(ctypes.get_errno())
        if mode & _FALLOC_FL_PUNCH_HOLE:
            self._record("discard", t0, offset, size, "")
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs("/")
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": st.f_blocks,
                "f_bfree": st.f_bfree, "f_bavail": st.f_bavail, "f_namemax": 255}


def _fuse_error(code: int) -> Exception:
    from mfusepy import FuseOSError

    return FuseOSError(code)  # type: ignore[no-any-return]


def serve(backing: str, mountpoint: str, journal: str, control: str, owner: int) -> None:
    """Run the filesystem in the foreground (multi-threaded) until it is unmounted."""
    from mfusepy import FUSE

    FUSE(_Operations(backing, journal, control), mountpoint, raw_fi=True, foreground=True,
         fsname=f"{FSNAME}:{owner}", subtype=FSNAME, allow_other=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m vhost_conformance.suites.watched``: the filesystem process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backing", required=True)
    parser.add_argument("--mount", required=True)
    parser.add_argument("--journal", required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--owner", type=int, default=os.getppid())
    args = parser.parse_args(argv)
    serve(args.backing, args.mount, args.journal, args.control, args.owner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
