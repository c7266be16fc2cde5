"""Ordered loads and stores on memory shared with a back-end process, through cffi.

Rings live in memfd pages that the back-end maps too, so the driver's index and flag
accesses need real memory ordering (VIRTIO 1.x 2.7.13 "Supplying Buffers to The Device":
the driver performs a suitable memory barrier before the idx update; 2.7.14 the driver reads
used entries after the idx it observed). Those few accesses go through the C helpers below,
compiled once (cffi API mode) into a cache directory; bulk data copies stay plain memoryview
slices.

Ordering used by the rings in this package:

- ``load16_acquire`` for avail->idx / used->idx / a packed descriptor's flags: later plain
  reads of descriptors or used entries cannot be satisfied before it.
- ``store16_release`` to publish avail->idx or a packed head's flags: every earlier plain
  store (descriptors, ring slots, data) is visible first.
- ``mb()`` (full fence) between publishing and reading the other side's event-suppression
  field, as the driver must before deciding whether to notify (VIRTIO 1.x 2.7.10/2.8.21).

All values are little-endian (VIRTIO 1.x rings; vhost-user hosts are x86-64/arm64).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import pathlib
import shutil
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

__all__ = [
    "BarrierBuildError",
    "Shm",
    "cache_dir",
    "compare_buffers",
    "load_library",
    "smp_mb",
    "smp_rmb",
    "smp_wmb",
]

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("vhost_conformance.frontend.barrier supports little-endian hosts only")

_CDEF = """
uint16_t vhc_load16(char *base, size_t off);
uint32_t vhc_load32(char *base, size_t off);
uint64_t vhc_load64(char *base, size_t off);
uint16_t vhc_load16_acquire(char *base, size_t off);
uint32_t vhc_load32_acquire(char *base, size_t off);
void vhc_store16(char *base, size_t off, uint16_t v);
void vhc_store32(char *base, size_t off, uint32_t v);
void vhc_store64(char *base, size_t off, uint64_t v);
void vhc_store16_release(char *base, size_t off, uint16_t v);
void vhc_store32_release(char *base, size_t off, uint32_t v);
void vhc_mb(void);
void vhc_rmb(void);
void vhc_wmb(void);
size_t vhc_first_diff(const char *a, const char *b, size_t start, size_t end);
size_t vhc_diff_run_end(const char *a, const char *b, size_t start, size_t end, size_t gap);
"""

# Relaxed atomics for the plain accesses (single-copy atomic, never torn), acquire/release
# where the ring protocol needs them, and the three fences Linux calls virt_mb/rmb/wmb.
_SOURCE = """
#include <stdint.h>
#include <stddef.h>
#define VHC_P(T) ((T *)(void *)(base + off))
uint16_t vhc_load16(char *base, size_t off) { return __atomic_load_n(VHC_P(uint16_t), __ATOMIC_RELAXED); }
uint32_t vhc_load32(char *base, size_t off) { return __atomic_load_n(VHC_P(uint32_t), __ATOMIC_RELAXED); }
uint64_t vhc_load64(char *base, size_t off) { return __atomic_load_n(VHC_P(uint64_t), __ATOMIC_RELAXED); }
uint16_t vhc_load16_acquire(char *base, size_t off) { return __atomic_load_n(VHC_P(uint16_t), __ATOMIC_ACQUIRE); }
uint32_t vhc_load32_acquire(char *base, size_t off) { return __atomic_load_n(VHC_P(uint32_t), __ATOMIC_ACQUIRE); }
void vhc_store16(char *base, size_t off, uint16_t v) { __atomic_store_n(VHC_P(uint16_t), v, __ATOMIC_RELAXED); }
void vhc_store32(char *base, size_t off, uint32_t v) { __atomic_store_n(VHC_P(uint32_t), v, __ATOMIC_RELAXED); }
void vhc_store64(char *base, size_t off, uint64_t v) { __atomic_store_n(VHC_P(uint64_t), v, __ATOMIC_RELAXED); }
void vhc_store16_release(char *base, size_t off, uint16_t v) { __atomic_store_n(VHC_P(uint16_t), v, __ATOMIC_RELEASE); }
void vhc_store32_release(char *base, size_t off, uint32_t v) { __atomic_store_n(VHC_P(uint32_t), v, __ATOMIC_RELEASE); }
void vhc_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void vhc_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
void vhc_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
#include <string.h>
/* First offset in [start, end) where a and b differ, or end. */
size_t vhc_first_diff(const char *a, const char *b, size_t start, size_t end) {
    size_t off = start;
    while (off < end) {
        size_t n = end - off < 65536 ? end - off : 65536;
        if (memcmp(a + off, b + off, n) != 0) {
            while (a[off] == b[off]) off++;
            return off;
        }
        off += n;
    }
    return end;
}
/* End of the run of differences starting at start: the first offset from which the next
   gap bytes (or everything up to end) are equal. */
size_t vhc_diff_run_end(const char *a, const char *b, size_t start, size_t end, size_t gap) {
    size_t last = start;
    for (size_t off = start; off < end; off++) {
        if (a[off] != b[off]) last = off;
        else if (off - last >= gap) break;
    }
    return last + 1;
}
"""


class BarrierBuildError(RuntimeError):
    """The C helpers could not be compiled or loaded (names the compiler and the directory)."""


def cache_dir() -> pathlib.Path:
    """Where the compiled helpers live: $VHOST_CONFORMANCE_CACHE, else $XDG_CACHE_HOME or
    ~/.cache, under ``vhost-conformance/cffi``."""
    explicit = os.environ.get("VHOST_CONFORMANCE_CACHE")
    if explicit:
        return pathlib.Path(explicit) / "cffi"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "vhost-conformance" / "cffi"


def _module_name() -> str:
    tag = sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag or "py"
    digest = hashlib.sha256((_CDEF + _SOURCE + tag).encode()).hexdigest()[:16]
    return f"_vhc_barrier_{digest}"


def _compiler() -> str:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return str(cc).split()[0]


def _build(directory: pathlib.Path, name: str) -> pathlib.Path:
    try:
        import cffi  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - cffi is a declared dependency
        raise BarrierBuildError(f"cffi is not installed ({exc}); pip install cffi") from exc
    compiler = _compiler()
    if shutil.which(compiler) is None:
        raise BarrierBuildError(
            f"no C compiler: {compiler!r} (from $CC or Python's sysconfig CC) is not on PATH; "
            "the ring barrier helpers need one once, e.g. apt-get install gcc"
        )
    directory.mkdir(parents=True, exist_ok=True)
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    ffi.set_source(name, _SOURCE, extra_compile_args=["-O2"])
    tmp = tempfile.mkdtemp(prefix=f"{name}-", dir=directory)
    try:
        built = pathlib.Path(ffi.compile(tmpdir=tmp, verbose=False))
        final = directory / built.name
        os.replace(built, final)  # atomic: concurrent builders never see a half-written file
        return final
    except Exception as exc:
        raise BarrierBuildError(
            f"building the ring barrier helpers with {compiler!r} in {tmp} failed: {exc}"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_lock = threading.Lock()
_loaded: ModuleType | None = None


def load_library() -> ModuleType:
    """Compile (first use only, under a file lock) and import the helper module; returns the
    cffi extension module (attributes ``ffi`` and ``lib``)."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        name = _module_name()
        directory = cache_dir()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            directory = pathlib.Path(tempfile.gettempdir()) / f"vhost-conformance-{os.getuid()}"
            directory.mkdir(parents=True, exist_ok=True)
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        target = directory / f"{name}{suffix}"
        if not target.exists():
            with open(directory / f"{name}.lock", "w") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX)
                try:
                    if not target.exists():
                        target = _build(directory, name)
                finally:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)
        spec = importlib.util.spec_from_file_location(name, target)
        if spec is None or spec.loader is None:
            raise BarrierBuildError(f"cannot load the ring barrier helpers from {target}")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except ImportError as exc:
            raise BarrierBuildError(f"loading {target} failed: {exc}") from exc
        _loaded = module
        return module


def smp_mb() -> None:
    """Full fence (loads and stores on both sides of it stay there)."""
    load_library().lib.vhc_mb()


def smp_rmb() -> None:
    """Read fence: earlier loads complete before later loads."""
    load_library().lib.vhc_rmb()


def smp_wmb() -> None:
    """Write fence: earlier stores are visible before later stores."""
    load_library().lib.vhc_wmb()


def compare_buffers(old: Any, new: Any, gap: int = 64) -> list[tuple[int, int]]:
    """Changed byte ranges ``(offset, length)`` between two equally long buffers, at memcmp
    speed; runs of changes less than ``gap`` equal bytes apart are reported as one range
    (detects guest-memory writes)."""
    module = load_library()
    ffi, lib = module.ffi, module.lib
    n = len(old)
    if len(new) != n:
        raise ValueError(f"compare_buffers: lengths differ ({n} vs {len(new)})")
    a = ffi.from_buffer("char[]", old)
    b = ffi.from_buffer("char[]", new)
    try:
        out: list[tuple[int, int]] = []
        off = 0
        while True:
            off = int(lib.vhc_first_diff(a, b, off, n))
            if off >= n:
                return out
            end = int(lib.vhc_diff_run_end(a, b, off, n, max(gap, 1)))
            out.append((off, end - off))
            off = end
    finally:
        ffi.release(a)
        ffi.release(b)


class Shm:
    """Ordered little-endian accesses at byte offsets of one writable buffer (an mmap).

    Holds a pointer into the buffer until :meth:`close`; the mmap cannot be closed before.
    """

    __slots__ = (
        "_base",
        "_ffi",
        "_lib",
        "load16",
        "load16_acquire",
        "load32",
        "load32_acquire",
        "load64",
        "size",
        "store16",
        "store16_release",
        "store32",
        "store32_release",
        "store64",
    )

    def __init__(self, buffer: Any) -> None:
        module = load_library()
        self._ffi = module.ffi
        self._lib = module.lib
        self._base = self._ffi.from_buffer("char[]", buffer, require_writable=True)
        self.size: int = len(self._base)
        base, lib = self._base, self._lib
        # Offsets are checked by the callers that own the layout (rings, regions); the C
        # helpers trust them.
        # functools.partial is implemented in C: one access costs one partial + one cffi call.
        self.load16: Callable[[int], int] = partial(lib.vhc_load16, base)
        self.load32: Callable[[int], int] = partial(lib.vhc_load32, base)
        self.load64: Callable[[int], int] = partial(lib.vhc_load64, base)
        self.load16_acquire: Callable[[int], int] = partial(lib.vhc_load16_acquire, base)
        self.load32_acquire: Callable[[int], int] = partial(lib.vhc_load32_acquire, base)
        self.store16: Callable[[int, int], None] = partial(lib.vhc_store16, base)
        self.store32: Callable[[int, int], None] = partial(lib.vhc_store32, base)
        self.store64: Callable[[int, int], None] = partial(lib.vhc_store64, base)
        self.store16_release: Callable[[int, int], None] = partial(lib.vhc_store16_release, base)
        self.store32_release: Callable[[int, int], None] = partial(lib.vhc_store32_release, base)

    def mb(self) -> None:
        """Full fence."""
        self._lib.vhc_mb()

    def rmb(self) -> None:
        """Read fence."""
        self._lib.vhc_rmb()

    def wmb(self) -> None:
        """Write fence."""
        self._lib.vhc_wmb()

    def close(self) -> None:
        """Release the pointer into the buffer (idempotent)."""
        base = self._base
        if base is None:
            return
        self.load16 = self.load32 = self.load64 = _closed
        self.load16_acquire = self.load32_acquire = _closed
        self.store16 = self.store32 = self.store64 = _closed
        self.store16_release = self.store32_release = _closed
        self._base = None
        with contextlib.suppress(Exception):
            self._ffi.release(base)

    def __enter__(self) -> Shm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _closed(*_args: int) -> Any:
    raise ValueError("Shm is closed: its buffer pointer was released")
