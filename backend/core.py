"""The state of one connection of the reference back-end (:class:`DeviceCore`) and what every
part of it uses: its errors, the fd watcher it is given, status bits, the helpers.

:class:`~vhost_conformance.backend.ring_io.RingIo` (rings and I/O),
:class:`~vhost_conformance.backend.memory_messages.MemoryMessages` (memory, postcopy,
logging, device state, in-flight region) and
:class:`~vhost_conformance.backend.device.Device` (the message dispatch and the other
handlers) build on it, in that order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
from collections.abc import Callable
from typing import Protocol

from vhost_conformance.backend import blk
from vhost_conformance.backend.disk import Disk
from vhost_conformance.backend.faults import Faults
from vhost_conformance.backend.inflight import (
    PackedInflight,
    SplitInflight,
)
from vhost_conformance.backend.memory import DirtyLog, GuestMemory
from vhost_conformance.backend.options import BackendOptions, _bit
from vhost_conformance.backend.postcopy import (
    Postcopy,
)
from vhost_conformance.backend.queue import Request, RingEvent, VirtQueue
from vhost_conformance.backend.vring import RingError
from vhost_conformance.frontend.protocol import (
    BlkFeature,
    FrontendRequest,
    Inflight,
    ProtocolFeature,
    VirtioFeature,
    encode_reply,
    has,
)

log = logging.getLogger("vhost_conformance.backend")

R = FrontendRequest
#: virtio status bits (VIRTIO 1.2 2.1).
STATUS_FEATURES_OK = 0x08
STATUS_DEVICE_NEEDS_RESET = 0x40
#: Largest queue size (VIRTIO 1.2: 32768).
MAX_QUEUE_SIZE = 32768
#: Seconds between two looks at the avail ring of a ring in polling mode (SET_VRING_KICK
#: with the NOFD bit).
POLL_INTERVAL = 0.005


class RequestError(Exception):
    """The message could not be honoured (named in the text); answered by a REPLY_ACK
    failure when one was requested, otherwise by closing the connection."""


class ConnectionFatal(Exception):
    """The connection must be closed (the reason is the text)."""


class FdWatcher(Protocol):
    """Where the device registers the kick eventfds it wants to be told about."""

    def watch(self, fd: int, queue_index: int) -> None:
        """Start watching ``fd`` (readable -> Device.kick(queue_index))."""

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (called before it is closed)."""


class DeviceCore:
    """The state of one connection (see the ``device`` module docstring) and the helpers
    every part uses."""

    def __init__(
        self,
        options: BackendOptions,
        disk: Disk,
        faults: Faults | None = None,
        watcher: FdWatcher | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self.disk = disk
        self.faults = faults or Faults()
        self.watcher = watcher
        self.clock = clock
        self.offered_features, self.offered_protocol = self._offers(options)
        if self.faults.on("flush-no-sync"):
            disk.sync = False
        #: SET_FEATURES seen on this connection (--misbehave protocol-features-need-set-features)
        self._features_set = False
        #: --misbehave reset-owner-drops-disk: RESET_OWNER came, the rings still run
        self._disk_dropped = False
        if self.faults.on("offer-skip-drain-alone"):
            self.offered_protocol &= ~_bit(ProtocolFeature.GET_VRING_BASE_INFLIGHT)
            self.offered_protocol |= _bit(ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN)
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.status = 0
        self.memory = self._fresh_memory()
        #: a ring was started on this connection (keep-regions-on-early-close)
        self.ever_started = False
        self.dirty_log: DirtyLog | None = None
        self.backend_fd = -1
        self.inflight_mm: object | None = None
        self.inflight_info: Inflight | None = None
        self.config = blk.BlkConfig(
            capacity=disk.capacity_sectors,
            blk_size=options.blk_size,
            num_queues=options.queues,
        )
        self.queues = [VirtQueue(i) for i in range(options.queues)]
        if self.faults.on("rings-start-enabled"):
            for q in self.queues:
                q.enabled = True
        self.outbox: list[tuple[bytes, list[int]]] = []
        #: (when, call fd) of the misbehaviour call-after-stop
        self._late_calls: list[tuple[float, int]] = []
        #: --misbehave write-after-suspend: (when, byte offset, data) still to reach the disk
        self._late_writes: list[tuple[float, int, bytes]] = []
        #: --misbehave write-at-close: (byte offset, data) to reach the disk at close()
        self._close_writes: list[tuple[int, bytes]] = []
        #: --misbehave log-after-stop: when to set every bit of the dirty log
        self._late_logs: list[float] = []
        #: --misbehave packed-out-of-ring-order: (queue, entry, wrap) taken before their turn
        self._ahead: set[tuple[int, int, bool]] = set()
        #: --misbehave packed-used-len-late: queue -> (entry, len) still to be written
        self._late_lens: dict[int, list[tuple[int, int]]] = {}
        #: every ring was stopped by GET_VRING_BASE and none started since
        self._all_stopped = False
        #: DEVICE_STATE: the load channel until CHECK_DEVICE_STATE reads it; the last result
        self._state_load_fd = -1
        self._state_result = 0
        #: --misbehave stop-drops-unflushed-writes: (offset, old bytes) of WRITEs since a FLUSH
        self._unflushed: list[tuple[int, bytes]] = []
        self._timers: list[Request] = []
        self._seq = 0
        self._get_features_count = 0
        self.postcopy = Postcopy()  # PAGEFAULT: the userfaultfd and what was done with it
        #: --misbehave iotlb-msg-without-iommu: the miss was sent; keep-rem-mem-reg-fd: the fds
        self._iotlb_sent = False
        self._kept_fds: list[int] = []
        self.closed = False

    def _offers(self, options: BackendOptions) -> tuple[int, int]:
        """The virtio and protocol feature bits offered (the misbehaviour knobs bend them)."""
        features = options.virtio_features()
        if self.faults.on("wce-without-flush"):
            features &= ~(1 << BlkFeature.FLUSH)
        if self.faults.on("no-version-1"):
            features &= ~(1 << VirtioFeature.VERSION_1)
        protocol = options.protocol_features()
        if self.faults.on("bit20-without-bit12"):
            protocol |= _bit(ProtocolFeature.GET_VRING_BASE_INFLIGHT)
            protocol &= ~_bit(ProtocolFeature.INFLIGHT_SHMFD)
        if self.faults.on("no-config-feature"):
            protocol &= ~_bit(ProtocolFeature.CONFIG)
        if self.faults.on("no-mq-feature"):
            protocol &= ~_bit(ProtocolFeature.MQ)
        if self.faults.on("offer-skip-drain-alone"):
            protocol &= ~_bit(ProtocolFeature.GET_VRING_BASE_INFLIGHT)
            protocol |= _bit(ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN)
        return features, protocol

    def _fresh_memory(self) -> GuestMemory:
        """No regions yet; with keep-regions-on-early-close, those of the connection before
        when it ended before any ring started."""
        carried, self.faults.carried = self.faults.carried, None
        if isinstance(carried, GuestMemory):
            return carried
        return GuestMemory(self.options.max_mem_slots)

    def _has_protocol(self, bit: int) -> bool:
        return has(self.protocol_features, bit)

    def _has_feature(self, bit: int) -> bool:
        return has(self.features, bit)

    @property
    def packed(self) -> bool:
        """RING_PACKED negotiated."""
        return self._has_feature(VirtioFeature.RING_PACKED)

    @property
    def logging(self) -> bool:
        """Dirty logging is on (LOG_ALL negotiated and a log given)."""
        return self.dirty_log is not None and self._has_feature(VirtioFeature.LOG_ALL)

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Log a guest write at [gpa, gpa+length) when dirty logging is on."""
        if self.dirty_log is not None and self._has_feature(VirtioFeature.LOG_ALL):
            self.dirty_log.mark(gpa, length)

    def _reply(
        self, request: int, payload: bytes | None = None, fds: list[int] | None = None
    ) -> None:
        data = encode_reply(request, payload)
        if self.faults.on("wrong-reply-flags"):
            data = data[:4] + struct.pack("<I", 0x1) + data[8:]
        if self.faults.on("reply-version-0"):
            data = data[:4] + struct.pack("<I", 0x4) + data[8:]
        self.outbox.append((data, fds or []))

    def _queue(self, index: int) -> VirtQueue:
        if not 0 <= index < len(self.queues):
            if self.faults.on("crash-on-bad-vring-index"):
                self.faults.die("crash-on-bad-vring-index", f"vring index {index}")
            raise RequestError(f"vring index {index} out of range (device has {len(self.queues)})")
        return self.queues[index]

    @property
    def suspended(self) -> bool:
        """Every ring stopped (vhost-user.rst "Suspended device state")."""
        return not any(q.started for q in self.queues)

    def _writethrough(self) -> bool:
        """Whether a WRITE is made durable before it completes: writeback 0, or FLUSH not
        negotiated (VIRTIO 1.3 5.2.6.2: a write becomes stable on completion when "neither
        VIRTIO_BLK_F_CONFIG_WCE nor VIRTIO_BLK_F_FLUSH feature were negotiated, but
        VIRTIO_BLK_F_FLUSH was offered by the device": the driver has no flush to ask for)."""
        if self.config.wce == 0:
            return True
        return not has(self.features, BlkFeature.FLUSH) and not self.faults.on(
            "writeback-without-flush")

    def _bind_inflight(self, q: VirtQueue) -> None:
        """Attach queue ``q`` to its part of the region (QEMU-TRACES 9: the per-queue
        stride is mmap_size / num_queues)."""
        info = self.inflight_info
        q.inflight = None
        if info is None or self.inflight_mm is None or q.index >= info.num_queues:
            return
        if q.num > info.queue_size:
            raise RingError(
                f"queue {q.index} has size {q.num}, the in-flight region only {info.queue_size}"
            )
        stride = info.mmap_size // info.num_queues
        offset = info.mmap_offset + stride * q.index
        cls = PackedInflight if self.packed else SplitInflight
        q.inflight = cls(self.inflight_mm, offset, info.queue_size)

    def _break(self, q: VirtQueue, reason: str) -> None:
        """The driver broke the ring: stop processing it (device needs reset), log it,
        signal the error eventfd. In-flight requests stay as they are."""
        if not q.phase.broken:
            log.error("vring %d needs reset: %s", q.index, reason)
        q.apply(RingEvent.BREAK, reason)
        if q.err_fd >= 0:
            _signal(q.err_fd)

    def _cancel_pending(self, q: VirtQueue) -> None:
        for req in q.pending.values():
            req.cancelled = True
        q.pending.clear()
        q.done.clear()

    def _close_queue_fds(self, q: VirtQueue) -> None:
        if q.kick_fd >= 0 and self.watcher is not None:
            self.watcher.unwatch(q.kick_fd)
        for fd in (q.kick_fd, q.call_fd, q.err_fd):
            if fd >= 0:
                _close(fd)
        q.kick_fd = q.call_fd = q.err_fd = -1
        q.polled = False


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


_ONE = struct.pack("<Q", 1)


def _signal(fd: int) -> None:
    """Write 1 to an eventfd (call/err); a closed or full fd is logged, never fatal."""
    if fd < 0:
        return
    try:
        os.write(fd, _ONE)
    except BlockingIOError:
        pass  # counter saturated: the peer has a wake-up pending anyway
    except OSError as exc:
        log.error("eventfd %d write failed: %s", fd, exc)
