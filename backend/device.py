"""One front-end connection of the reference vhost-user-blk back-end: the message state
machine, the virtqueues, in-flight tracking, and request scheduling.

No sockets here: :class:`Device` takes decoded messages (:meth:`Device.handle`), kicks
(:meth:`Device.kick`) and the passing of time (:meth:`Device.turn`), and leaves what to
send in :attr:`Device.outbox`. The server (``server.py``) owns the sockets and the
event loop; the kick eventfds are watched through the :class:`FdWatcher` it passes in.

A request's life: popped from the ring and marked in the in-flight region, then held
until ``now + latency`` (cancellable until then: nothing of it touched guest memory or
the disk), then executed (disk <-> guest buffers, status byte), then completed with the
other requests of the same event-loop turn as one batch (used ring, region, one
notification). References: vhost-user.rst (QEMU 11.1.3) sections named in comments;
SPEC-DIGEST.md; QEMU-TRACES.md.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import NoneType
from typing import Generic, Protocol, TypeVar

from vhost_conformance.backend import blk, device_state
from vhost_conformance.backend.disk import Disk
from vhost_conformance.backend.faults import Faults
from vhost_conformance.backend.inflight import (
    Buffer,
    InflightError,
    PackedDescCopy,
    PackedInflight,
    SplitInflight,
    queue_region_size,
    queue_region_stride,
)
from vhost_conformance.backend.memory import DirtyLog, GuestMemory, GuestMemoryError, full_barrier
from vhost_conformance.backend.postcopy import (
    Postcopy,
    UserfaultError,
    mapping_address,
    open_userfaultfd,
    register,
    unregister,
)
from vhost_conformance.backend.vring import Chain, PackedRing, RingError, SplitRing
from vhost_conformance.frontend.protocol import (
    FD_EXPECTATIONS,
    FLAG_NEED_REPLY,
    U64,
    VERSION,
    VRING_F_LOG,
    BackendRequest,
    BlkFeature,
    Config,
    DeviceStateTransfer,
    FrontendRequest,
    Header,
    Inflight,
    LogBase,
    MalformedMessage,
    MemoryRegion,
    MemoryTable,
    Message,
    ProtocolFeature,
    SingleMemoryRegion,
    VirtioFeature,
    VringAddr,
    VringState,
    encode_reply,
    expected_fd_count,
    expects_ack,
    has,
    packed_base,
    split_packed_base,
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

#: Memory slots we offer (GET_MAX_MEM_SLOTS), as QEMU's libvhost-user.
MAX_MEM_SLOTS = 509

#: Requests allowed before SET_OWNER (QEMU sends SET_BACKEND_REQ_FD first: QEMU-TRACES 8).
_BEFORE_OWNER = {
    R.GET_FEATURES,
    R.GET_PROTOCOL_FEATURES,
    R.SET_PROTOCOL_FEATURES,
    R.GET_QUEUE_NUM,
    R.GET_MAX_MEM_SLOTS,
    R.SET_BACKEND_REQ_FD,
    R.SET_OWNER,
    R.GET_CONFIG,
    R.GET_STATUS,
}


#: Requests that exist only with a protocol feature (crash-on-unexpected-request dies on them
#: without it).
_GATED = {
    R.GET_INFLIGHT_FD: ProtocolFeature.INFLIGHT_SHMFD,
    R.SET_INFLIGHT_FD: ProtocolFeature.INFLIGHT_SHMFD,
    R.GET_CONFIG: ProtocolFeature.CONFIG,
    R.SET_CONFIG: ProtocolFeature.CONFIG,
    R.ADD_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    R.REM_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    R.GET_MAX_MEM_SLOTS: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    R.GET_STATUS: ProtocolFeature.STATUS,
    R.SET_STATUS: ProtocolFeature.STATUS,
    R.SET_BACKEND_REQ_FD: ProtocolFeature.BACKEND_REQ,
    R.SET_LOG_BASE: ProtocolFeature.LOG_SHMFD,
}


def _bit(n: int) -> int:
    return 1 << int(n)


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


@dataclass(slots=True)
class BackendOptions:
    """What the back-end offers and how it behaves (the CLI fills this in)."""

    queues: int = 1
    read_only: bool = False
    blk_size: int = 512
    latency: float = 0.0
    inflight_migration: bool = True
    #: offer bit 23 GET_VRING_BASE_SKIP_DRAIN (a post-11.1 proposal) with bit 20; harmless to
    #: QEMU 11.1.3, which masks bits >= 23 off (docs/SPEC-NOTES.md "qemu-next")
    skip_drain: bool = True
    packed: bool = True
    max_mem_slots: int = MAX_MEM_SLOTS
    device_id: bytes = b"vhost-conformance"

    def virtio_features(self) -> int:
        """The virtio feature bits offered by GET_FEATURES."""
        bits = [
            VirtioFeature.VERSION_1,
            VirtioFeature.RING_INDIRECT_DESC,
            VirtioFeature.RING_EVENT_IDX,
            VirtioFeature.LOG_ALL,
            VirtioFeature.PROTOCOL_FEATURES,
            BlkFeature.SEG_MAX,
            BlkFeature.BLK_SIZE,
            BlkFeature.FLUSH,
            BlkFeature.TOPOLOGY,
            BlkFeature.CONFIG_WCE,
            BlkFeature.MQ,
            BlkFeature.DISCARD,
            BlkFeature.WRITE_ZEROES,
        ]
        if self.packed:
            bits.append(VirtioFeature.RING_PACKED)
        if self.read_only:
            bits.append(BlkFeature.RO)
        value = 0
        for b in bits:
            value |= _bit(b)
        return value

    def protocol_features(self) -> int:
        """The protocol feature bits offered by GET_PROTOCOL_FEATURES."""
        P = ProtocolFeature
        bits = [
            P.MQ,
            P.LOG_SHMFD,
            P.REPLY_ACK,
            P.BACKEND_REQ,
            P.CONFIG,
            P.INFLIGHT_SHMFD,
            P.RESET_DEVICE,
            P.CONFIGURE_MEM_SLOTS,
            P.STATUS,
            P.DEVICE_STATE,
            P.PAGEFAULT,
        ]
        if self.inflight_migration:
            bits.append(P.GET_VRING_BASE_INFLIGHT)
            if self.skip_drain:
                bits.append(P.GET_VRING_BASE_SKIP_DRAIN)
        value = 0
        for b in bits:
            value |= _bit(b)
        return value


@dataclass(eq=False, slots=True)
class Request:
    """One request taken from a ring (or resubmitted from the in-flight region)."""

    queue: VirtQueue
    seq: int
    chain: Chain
    #: split: the head descriptor index; packed: the head entry in the in-flight region
    #: (or -1 without a region).
    head: int
    deadline: float = 0.0
    cancelled: bool = False
    executed: bool = False
    written: int = 0
    status: int = 0

    def __lt__(self, other: Request) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)


class RingPhase(Enum):
    """Where a ring is in its life (vhost-user.rst "Ring states": stopped / started; a
    GET_VRING_BASE waiting for the drain; the driver broke it). Enabled / disabled is
    orthogonal to these and kept apart (:attr:`VirtQueue.enabled`).

    A broken ring stays broken through a stop (GET_STATUS keeps DEVICE_NEEDS_RESET) until
    SET_VRING_KICK starts it again, so the broken phases come in the three flavours."""

    STOPPED = "stopped"
    STARTED = "started"
    #: a GET_VRING_BASE waiting for the ring's requests to complete
    DRAINING = "draining"
    #: started and broken: nothing more is taken or completed
    BROKEN = "broken"
    #: broken while a GET_VRING_BASE waits: answered at the next flush
    BROKEN_DRAINING = "broken-draining"
    #: stopped after (or broken while stopped: serve-stopped-ring, complete-after-suspend)
    BROKEN_STOPPED = "broken-stopped"

    @property
    def started(self) -> bool:
        """Started by SET_VRING_KICK and not stopped since (draining and broken included)."""
        return self not in (RingPhase.STOPPED, RingPhase.BROKEN_STOPPED)

    @property
    def draining(self) -> bool:
        """A GET_VRING_BASE waits for the reply."""
        return self in (RingPhase.DRAINING, RingPhase.BROKEN_DRAINING)

    @property
    def broken(self) -> bool:
        """The driver broke the ring (the device needs reset)."""
        return self in (RingPhase.BROKEN, RingPhase.BROKEN_DRAINING, RingPhase.BROKEN_STOPPED)


class RingEvent(Enum):
    """What moves a ring from one :class:`RingPhase` to another."""

    #: SET_VRING_KICK (or process-on-enable's SET_VRING_ENABLE 1) on a stopped ring
    START = "start"
    #: GET_VRING_BASE with requests in flight that it waits for
    DRAIN = "drain"
    #: the GET_VRING_BASE reply is sent: the ring stopped
    STOP = "stop"
    #: the driver broke the ring (bad ring, bad chain, in-flight recovery failed, ...)
    BREAK = "break"
    #: the connection ended
    CLOSE = "close"


_P = RingPhase
_E = RingEvent
#: Every legal (phase, event) -> next phase; any other pair is an internal error.
RING_TRANSITIONS: Mapping[tuple[RingPhase, RingEvent], RingPhase] = {
    (_P.STOPPED, _E.START): _P.STARTED,
    (_P.BROKEN_STOPPED, _E.START): _P.STARTED,
    (_P.STARTED, _E.DRAIN): _P.DRAINING,
    (_P.BROKEN, _E.DRAIN): _P.BROKEN_DRAINING,
    (_P.STARTED, _E.STOP): _P.STOPPED,
    (_P.DRAINING, _E.STOP): _P.STOPPED,
    (_P.BROKEN, _E.STOP): _P.BROKEN_STOPPED,
    (_P.BROKEN_DRAINING, _E.STOP): _P.BROKEN_STOPPED,
    (_P.STOPPED, _E.BREAK): _P.BROKEN_STOPPED,
    (_P.STARTED, _E.BREAK): _P.BROKEN,
    (_P.DRAINING, _E.BREAK): _P.BROKEN_DRAINING,
    (_P.BROKEN, _E.BREAK): _P.BROKEN,
    (_P.BROKEN_DRAINING, _E.BREAK): _P.BROKEN_DRAINING,
    (_P.BROKEN_STOPPED, _E.BREAK): _P.BROKEN_STOPPED,
    (_P.STOPPED, _E.CLOSE): _P.STOPPED,
    (_P.STARTED, _E.CLOSE): _P.STOPPED,
    (_P.DRAINING, _E.CLOSE): _P.STOPPED,
    (_P.BROKEN, _E.CLOSE): _P.BROKEN_STOPPED,
    (_P.BROKEN_DRAINING, _E.CLOSE): _P.BROKEN_STOPPED,
    (_P.BROKEN_STOPPED, _E.CLOSE): _P.BROKEN_STOPPED,
}


class RingTransitionError(RuntimeError):
    """A (phase, event) pair not in :data:`RING_TRANSITIONS`: a bug of the back-end."""


@dataclass(eq=False, slots=True)
class VirtQueue:
    """The device side of one virtqueue and its vhost-user state."""

    index: int
    num: int = 0
    addr_flags: int = 0
    desc_uva: int = 0
    avail_uva: int = 0
    used_uva: int = 0
    log_guest_addr: int = 0
    addr_set: bool = False
    #: split: free-running 16-bit next avail index; packed: ring index of the next entry.
    last_avail_idx: int = 0
    avail_wrap: bool = True
    #: split: free-running 16-bit used->idx shadow; packed: ring index + wrap counter.
    used_idx: int = 0
    used_wrap: bool = True
    phase: RingPhase = RingPhase.STOPPED
    #: SET_VRING_ENABLE's (orthogonal to the phase)
    enabled: bool = False
    #: why the ring is broken (the last _break's reason; None outside the broken phases)
    broken_reason: str | None = None
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    ring: SplitRing | PackedRing | None = None
    inflight: SplitInflight | PackedInflight | None = None
    counter: int = 1
    pending: dict[int, Request] = field(default_factory=dict)
    done: list[Request] = field(default_factory=list)
    resubmit: list[Request] = field(default_factory=list)
    #: the request the stop answers (GET_VRING_BASE, or the proposal's SKIP_DRAIN)
    stop_request: int = FrontendRequest.GET_VRING_BASE
    kicked: bool = False
    #: SET_VRING_KICK came with the NOFD bit: the avail ring is polled, no kick fd
    polled: bool = False
    #: --misbehave serve-stopped-ring: stopped by GET_VRING_BASE, still served
    serve_stopped: bool = False
    #: --misbehave wait-for-first-kick: started, not looked at before a kick
    deaf: bool = False
    #: GET_VRING_BASE stopped this ring so many times on this connection
    stops: int = 0
    #: --misbehave used-idx-latched: used->idx as read at SET_VRING_ADDR
    latched_used: int | None = None

    @property
    def runnable(self) -> bool:
        """Started, enabled, not broken, not stopping: may take new requests."""
        return self.phase is RingPhase.STARTED and self.enabled

    @property
    def started(self) -> bool:
        """The phase is a started one (read-only: :meth:`apply` moves the phase)."""
        return self.phase.started

    def apply(self, event: RingEvent, reason: str | None = None) -> RingPhase:
        """Move to the phase :data:`RING_TRANSITIONS` gives for ``event`` (BREAK records
        ``reason``; a phase that is not broken forgets it). Returns the new phase."""
        new = RING_TRANSITIONS.get((self.phase, event))
        if new is None:
            raise RingTransitionError(
                f"vring {self.index}: no ring transition for event {event.name} in phase "
                f"{self.phase.name}"
            )
        self.phase = new
        if event is RingEvent.BREAK:
            self.broken_reason = reason
        elif not new.broken:
            self.broken_reason = None
        return new


class Device:
    """The state of one connection (see the module docstring)."""

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

    # ------------------------------------------------------------------ helpers

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

    # ------------------------------------------------------------------ messages

    def handle(self, msg: Message) -> None:
        """Handle one front-end message; replies go to :attr:`outbox`.

        Raises ConnectionFatal when the connection must be closed. Every fd of ``msg``
        is either kept or closed here.
        """
        fds = list(msg.fds)
        try:
            self._handle(msg, fds)
        finally:
            for fd in fds:
                _close(fd)

    def _handle(self, msg: Message, fds: list[int]) -> None:
        try:
            request = FrontendRequest(msg.request)
        except ValueError:
            if self.faults.on("crash-on-unexpected-request"):
                self.faults.die(
                    "crash-on-unexpected-request", f"unknown request {msg.request}", signal.SIGABRT
                )
            raise ConnectionFatal(f"unknown request id {msg.request}") from None
        name = request.name
        if msg.is_reply:
            raise ConnectionFatal(f"{name}: REPLY flag set on a request (flags {msg.flags:#x})")
        if self.postcopy.ack_pending and request == FrontendRequest.SET_MEM_TABLE:
            self._postcopy_ack(msg)
            return
        if (self.faults.on("inflight-bad-size-crash")
                and request in (FrontendRequest.GET_INFLIGHT_FD, FrontendRequest.SET_INFLIGHT_FD)
                and len(msg.payload) not in (Inflight.SIZE, Inflight.PACKED_SIZE)):
            self.faults.crash(f"{name} with a {len(msg.payload)}-byte payload")
        low, high = expected_fd_count(FD_EXPECTATIONS[request], msg.payload)
        try:
            self._misbehave_on_request(request, msg, fds, low, high)
            if not low <= len(fds) <= high:
                raise RequestError(
                    f"{name}: carries {len(fds)} fds, expected "
                    + (f"{low}" if low == high else f"{low}..{high}")
                )
            if not self.owner and request not in _BEFORE_OWNER:
                raise RequestError(f"{name} before SET_OWNER")
            handler = HANDLERS.get(request)
            if handler is None:
                raise RequestError(f"{name} is not supported by this back-end")
            try:
                payload = msg.decoded()
            except MalformedMessage as exc:
                if self.faults.on("trust-payload-size"):
                    self.faults.die("trust-payload-size", str(exc))
                raise RequestError(str(exc)) from None
            handler.run(self, request, msg, payload, fds)
        except RequestError as exc:
            if self._acks(msg):
                log.error("%s failed: %s (REPLY_ACK 1)", name, exc)
                self._reply(msg.request, U64(0 if self.faults.on("ack-zero-on-error") else 1)
                            .encode())
                return
            raise ConnectionFatal(f"{exc}") from None
        if self._acks(msg) or (
            self.faults.on("need-reply-extra-ack")
            and msg.flags & FLAG_NEED_REPLY
            and self._has_protocol(ProtocolFeature.REPLY_ACK)
        ):
            self._reply(msg.request, U64(0).encode())

    def _misbehave_on_request(
        self, request: FrontendRequest, msg: Message, fds: list[int], low: int, high: int
    ) -> None:
        """The robustness knobs that act on a request before it is checked: die on it, or
        keep its surplus fds (leak-surplus-fds: they leave ``fds``, nobody closes them)."""
        faults = self.faults
        if faults.on("crash-on-unexpected-request"):
            gate = _GATED.get(request)
            why = None
            if not self.owner and request not in _BEFORE_OWNER:
                why = f"{request.name} before SET_OWNER"
            elif gate is not None and not self._has_protocol(gate):
                why = f"{request.name} without {gate.name}"
            if why is not None:
                faults.die("crash-on-unexpected-request", why, signal.SIGABRT)
        if faults.on("crash-on-bad-fd-count"):
            regions = (
                struct.unpack_from("<I", msg.payload)[0]
                if request == R.SET_MEM_TABLE and len(msg.payload) >= 4
                else 0
            )
            if len(fds) < low or regions > 8:
                faults.die(
                    "crash-on-bad-fd-count",
                    f"{request.name} with {len(fds)} fds ({regions} regions), needs {low}",
                )
        if faults.on("leak-surplus-fds") and len(fds) > high:
            while len(fds) > high:
                faults.leaked.append(fds.pop())

    def _acks(self, msg: Message) -> bool:
        """Whether ``msg`` gets a REPLY_ACK (the misbehaviour knobs bend the rule)."""
        if self.faults.on("no-reply-ack"):
            return False
        if self.faults.on("ack-without-reply-ack") and msg.flags & FLAG_NEED_REPLY:
            return True
        return expects_ack(msg.request, msg.flags, self.protocol_features)

    # -- features and ownership

    def _on_get_features(self, msg: Message, payload: None, fds: list[int]) -> None:
        if self.faults.on("mute-while-suspended") and self._all_stopped:
            log.warning("misbehaving: GET_FEATURES while suspended left unanswered")
            return
        value = self.offered_features
        self._get_features_count += 1
        if self.faults.on("features-change") and self._get_features_count > 1:
            value &= ~(1 << VirtioFeature.RING_EVENT_IDX)
        if self.faults.on("features-byte-swapped"):
            value |= 1 << 24  # NOTIFY_ON_EMPTY, as qemu-storage-daemon 11.1.3 offers it
            value = int.from_bytes(value.to_bytes(8, "little"), "big")
        self._reply(msg.request, U64(value).encode())

    def _writethrough(self) -> bool:
        """Whether a WRITE is made durable before it completes: writeback 0, or FLUSH not
        negotiated (VIRTIO 1.3 5.2.6.2: a write becomes stable on completion when "neither
        VIRTIO_BLK_F_CONFIG_WCE nor VIRTIO_BLK_F_FLUSH feature were negotiated, but
        VIRTIO_BLK_F_FLUSH was offered by the device": the driver has no flush to ask for)."""
        if self.config.wce == 0:
            return True
        return not has(self.features, BlkFeature.FLUSH) and not self.faults.on(
            "writeback-without-flush")

    def _on_set_features(self, msg: Message, payload: U64, fds: list[int]) -> None:
        value = payload.value
        extra = value & ~self.offered_features
        if extra:
            raise RequestError(f"SET_FEATURES: bits {extra:#x} were not offered")
        self.features = value
        self._features_set = True
        if (has(value, BlkFeature.CONFIG_WCE) and not has(value, BlkFeature.FLUSH)
                and not self.faults.on("wce-kept-without-flush")):
            # VIRTIO 1.3 5.2.5.2: "If VIRTIO_BLK_F_CONFIG_WCE is negotiated but
            # VIRTIO_BLK_F_FLUSH is not, the device MUST initialize writeback to 0."
            self.config.wce = 0
        if self.faults.on("set-features-drops-protocol") and not has(
            value, VirtioFeature.PROTOCOL_FEATURES
        ):
            self.protocol_features = 0
        for q in self.queues:
            if q.ring is not None:
                q.ring.event_idx = self._has_feature(VirtioFeature.RING_EVENT_IDX)
        if not has(value, VirtioFeature.PROTOCOL_FEATURES) and not self.faults.on(
            "bit30-rings-disabled"
        ):
            # vhost-user.rst "Ring states": without VHOST_USER_F_PROTOCOL_FEATURES the
            # rings are enabled at once.
            for q in self.queues:
                q.enabled = True
                q.kicked = True

    def _on_get_protocol_features(self, msg: Message, payload: None, fds: list[int]) -> None:
        self._reply(msg.request, U64(self.offered_protocol).encode())

    def _on_set_protocol_features(self, msg: Message, payload: U64, fds: list[int]) -> None:
        value = payload.value
        extra = value & ~self.offered_protocol
        if extra:
            raise RequestError(f"SET_PROTOCOL_FEATURES: bits {extra:#x} were not offered")
        if self.faults.on("protocol-subset-refused") and value != self.offered_protocol:
            raise ConnectionFatal("SET_PROTOCOL_FEATURES: not the whole offer (misbehaving)")
        if (
            has(value, ProtocolFeature.GET_VRING_BASE_INFLIGHT)
            and not has(value, ProtocolFeature.INFLIGHT_SHMFD)
            and not self.faults.on("accept-bit20-without-bit12")
        ):
            # vhost-user.rst GET_VRING_BASE: bit 20 only together with INFLIGHT_SHMFD.
            raise RequestError(
                "SET_PROTOCOL_FEATURES: GET_VRING_BASE_INFLIGHT without INFLIGHT_SHMFD"
            )
        if self.faults.on("protocol-features-need-set-features") and not self._features_set:
            log.warning("SET_PROTOCOL_FEATURES before SET_FEATURES: ignored (misbehaving)")
            return
        if has(value, ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN) and not (
            has(value, ProtocolFeature.GET_VRING_BASE_INFLIGHT)
            and has(value, ProtocolFeature.INFLIGHT_SHMFD)
        ) and not self.faults.on("offer-skip-drain-alone"):
            # the proposal's GET_VRING_BASE_SKIP_DRAIN: "must only be negotiated if both
            # VHOST_USER_PROTOCOL_F_GET_VRING_BASE_INFLIGHT and ..._INFLIGHT_SHMFD" are
            raise RequestError(
                "SET_PROTOCOL_FEATURES: GET_VRING_BASE_SKIP_DRAIN without bits 20 and 12"
            )
        self.protocol_features = value

    def _on_set_owner(self, msg: Message, payload: None, fds: list[int]) -> None:
        if self.owner:
            log.warning("SET_OWNER again on the same connection (ignored)")
        self.owner = True

    def _on_reset_owner(self, msg: Message, payload: None, fds: list[int]) -> None:
        # Deprecated; vhost-user.rst: ignore it or treat it as "disable all rings".
        if self.faults.on("reset-owner-closes"):
            raise ConnectionFatal("RESET_OWNER (misbehaving: closing)")
        if self.faults.on("reset-owner-drops-disk"):
            self._disk_dropped = True
            return
        self._reset_rings()

    def _on_reset_device(self, msg: Message, payload: None, fds: list[int]) -> None:
        if not self._has_protocol(ProtocolFeature.RESET_DEVICE):
            raise RequestError("RESET_DEVICE without RESET_DEVICE negotiated")
        if self.faults.on("reset-device-keeps-rings"):
            return
        self._reset_rings()
        self.features = 0
        self.status = 0

    def _reset_rings(self) -> None:
        for q in self.queues:
            self._cancel_pending(q)
            self._close_queue_fds(q)
        self.queues = [VirtQueue(i) for i in range(len(self.queues))]

    def _on_get_queue_num(self, msg: Message, payload: None, fds: list[int]) -> None:
        reply_id = R.GET_FEATURES if self.faults.on("queue-num-reply-id") else msg.request
        fewer = 1 if self.faults.on("queue-num-understated") else 0
        self._reply(reply_id, U64(len(self.queues) - fewer).encode())

    def _on_get_max_mem_slots(self, msg: Message, payload: None, fds: list[int]) -> None:
        self._reply(msg.request, U64(self.options.max_mem_slots).encode())

    def _on_get_status(self, msg: Message, payload: None, fds: list[int]) -> None:
        if not self._has_protocol(ProtocolFeature.STATUS):
            raise RequestError("GET_STATUS without STATUS negotiated")
        status = self.status
        if self.faults.on("status-not-kept"):
            status &= ~0x4  # DRIVER_OK lost
        if any(q.phase.broken for q in self.queues):
            status |= STATUS_DEVICE_NEEDS_RESET
        self._reply(msg.request, U64(status).encode())

    def _on_set_status(self, msg: Message, payload: U64, fds: list[int]) -> None:
        if not self._has_protocol(ProtocolFeature.STATUS):
            raise RequestError("SET_STATUS without STATUS negotiated")
        if payload.value > 0xFF:
            raise RequestError(f"SET_STATUS: {payload.value:#x} is not a status byte")
        if payload.value == 0 and self.faults.on("status-zero-ignored"):
            return
        self.status = payload.value

    def _on_set_backend_req_fd(self, msg: Message, payload: None, fds: list[int]) -> None:
        if not self._has_protocol(ProtocolFeature.BACKEND_REQ):
            raise RequestError("SET_BACKEND_REQ_FD without BACKEND_REQ negotiated")
        if self.backend_fd >= 0:
            _close(self.backend_fd)
        self.backend_fd = fds.pop()

    # -- config space

    def _config_bytes(self) -> bytes:
        """The config space as GET_CONFIG shows it (the misbehaviour knobs bend it)."""
        data = bytearray(self.config.encode())
        if self.faults.on("capacity-short"):
            struct.pack_into("<Q", data, 0, max(0, self.config.capacity - 1))
        if self.faults.on("config-zero-limit"):
            struct.pack_into("<I", data, 40, 0)  # max_discard_seg
        if self.faults.on("config-padding-garbage"):
            data[33] = 0xA5  # unused0
            data[57:60] = b"\xa5\xa5\xa5"  # unused1
        if self.faults.on("config-num-queues-high"):
            struct.pack_into("<H", data, 34, len(self.queues) + 1)
        return bytes(data)

    def _on_get_config(self, msg: Message, payload: Config, fds: list[int]) -> None:
        beyond = payload.offset + payload.size > blk.CONFIG_SIZE
        if beyond and self.faults.on("trust-config-range"):
            self.faults.die("trust-config-range", f"GET_CONFIG {payload.offset}+{payload.size}")
        if (
            beyond
            and self.faults.on("config-out-of-range-bytes")
            and self._has_protocol(ProtocolFeature.CONFIG)
            and 0 < payload.size <= 256
        ):
            self._reply(msg.request, Config(payload.offset, payload.size, payload.flags,
                                            bytes(payload.size)).encode())
            return
        if not self._has_protocol(ProtocolFeature.CONFIG) or beyond or payload.size == 0:
            # vhost-user.rst GET_CONFIG: a reply of size 0 tells the front-end it failed.
            log.error(
                "GET_CONFIG offset %d size %d outside the %d-byte config space "
                "(or CONFIG not negotiated): empty reply",
                payload.offset,
                payload.size,
                blk.CONFIG_SIZE,
            )
            self._reply(msg.request, b"")
            return
        start = 0 if self.faults.on("config-offset-ignored") else payload.offset
        data = self._config_bytes()[start : start + payload.size]
        if self.faults.on("short-config-reply") and payload.size <= 8:
            # the header still says payload.size: one byte of config missing on the wire
            head = struct.pack("<III", payload.offset, payload.size, payload.flags)
            self._reply(msg.request, head + data[:-1])
            return
        self._reply(msg.request, Config(payload.offset, payload.size, payload.flags, data).encode())

    def _on_set_config(self, msg: Message, payload: Config, fds: list[int]) -> None:
        if not self._has_protocol(ProtocolFeature.CONFIG):
            raise RequestError("SET_CONFIG without CONFIG negotiated")
        end = payload.offset + payload.size
        if end > blk.CONFIG_SIZE:
            if self.faults.on("trust-config-range"):
                self.faults.die("trust-config-range", f"SET_CONFIG {payload.offset}+{payload.size}")
            raise RequestError(
                f"SET_CONFIG: bytes {payload.offset}..{end} outside the config space"
            )
        writes_wce_only = payload.offset == blk.WCE_OFFSET and payload.size == 1
        if self.faults.on("config-readonly-writable") and payload.offset == 0 and payload.size >= 8:
            (self.config.capacity,) = struct.unpack_from("<Q", payload.data, 0)
            return
        if payload.flags != Config.FLAG_MIGRATION and not writes_wce_only:
            # vhost-user.rst SET_CONFIG: read-only fields only with the migration flag.
            raise RequestError(
                f"SET_CONFIG: bytes {payload.offset}..{end} are read-only (only wce at 32 is "
                f"writable; flags {payload.flags})"
            )
        if payload.offset <= blk.WCE_OFFSET < end:
            wce = payload.data[blk.WCE_OFFSET - payload.offset]
            if wce > 1:
                raise RequestError(f"SET_CONFIG: wce {wce} (must be 0 or 1)")
            if not self.faults.on("wce-not-kept"):
                self.config.wce = wce

    # -- memory

    def _refresh_rings(self) -> None:
        for q in self.queues:
            if q.started:
                self._build_ring(q)

    def _on_set_mem_table(self, msg: Message, payload: MemoryTable, fds: list[int]) -> None:
        if self.faults.on("set-mem-table-refused"):
            raise RequestError("SET_MEM_TABLE: --misbehave set-mem-table-refused")
        self.memory.clear()
        self.postcopy.ranges.clear()  # unmapping unregistered them
        share = self.faults.on("regions-share-first-fd")
        try:
            for region, fd in zip(payload.regions, fds, strict=True):
                self.memory.add(
                    fds[0] if share else fd,
                    region.guest_phys_addr,
                    region.memory_size,
                    region.userspace_addr,
                    self._mmap_offset(region.mmap_offset),
                )
        except GuestMemoryError as exc:
            self.memory.clear()
            raise RequestError(f"SET_MEM_TABLE: {exc}") from None
        self._refresh_rings()
        if self.postcopy.listening:
            # "SET_MEM_TABLE replies with the bases of the memory mapped regions"; the regions
            # are registered once the front-end acks the reply (QEMU sends a SET_MEM_TABLE with
            # u64 0: hw/virtio/vhost-user.c vhost_user_set_mem_table_postcopy)
            if self.faults.on("postcopy-no-table-reply"):
                return
            bases = tuple(
                MemoryRegion(r.guest_phys_addr, r.memory_size, mapping_address(r.mm),
                             r.mmap_offset)
                for r in self.memory.regions
            )
            self._reply(msg.request, MemoryTable(bases).encode())
            self.postcopy.ack_pending = True

    def _on_add_mem_reg(self, msg: Message, payload: SingleMemoryRegion, fds: list[int]) -> None:
        if not self._has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            raise RequestError("ADD_MEM_REG without CONFIGURE_MEM_SLOTS negotiated")
        if self.postcopy.listening:
            # postcopy ADD_MEM_REG (a reply with the base per region) is not implemented here
            raise RequestError("ADD_MEM_REG in postcopy mode is not supported (SET_MEM_TABLE is)")
        r = payload.region
        if self.faults.on("mem-slots-overstated") and len(self.memory.regions) >= 16:
            raise RequestError("ADD_MEM_REG: --misbehave mem-slots-overstated: 16 regions")
        try:
            self.memory.add(
                fds[0],
                r.guest_phys_addr,
                r.memory_size,
                r.userspace_addr,
                self._mmap_offset(r.mmap_offset),
            )
        except GuestMemoryError as exc:
            raise RequestError(f"ADD_MEM_REG: {exc}") from None
        self._refresh_rings()

    def _on_rem_mem_reg(self, msg: Message, payload: SingleMemoryRegion, fds: list[int]) -> None:
        if not self._has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            raise RequestError("REM_MEM_REG without CONFIGURE_MEM_SLOTS negotiated")
        r = payload.region
        if fds and self.faults.on("keep-rem-mem-reg-fd"):
            self._kept_fds.append(os.dup(fds[0]))
        if self.faults.on("rem-mem-reg-by-offset") and not any(
            m.guest_phys_addr == r.guest_phys_addr and m.mmap_offset == r.mmap_offset
            for m in self.memory.regions
        ):
            raise RequestError(f"REM_MEM_REG: no region with mmap_offset {r.mmap_offset:#x}")
        if self.faults.on("rem-mem-reg-keeps-map"):
            return
        try:
            self.memory.remove(r.guest_phys_addr, r.memory_size, r.userspace_addr)
        except GuestMemoryError as exc:
            raise RequestError(f"REM_MEM_REG: {exc}") from None
        self._refresh_rings()

    def _mmap_offset(self, mmap_offset: int) -> int:
        """The fd offset a region is mapped from (0 with --misbehave ignore-mmap-offset)."""
        return 0 if self.faults.on("ignore-mmap-offset") else mmap_offset

    # -- postcopy (vhost-user.rst "Migration": postcopy; POSTCOPY_ADVISE/LISTEN/END)

    def _on_postcopy_advise(self, msg: Message, payload: None, fds: list[int]) -> None:
        if not self._has_protocol(ProtocolFeature.PAGEFAULT):
            raise RequestError("POSTCOPY_ADVISE without PAGEFAULT negotiated")
        if self.faults.on("advise-no-userfaultfd"):
            self._reply(msg.request, b"", fds=[os.eventfd(0, os.EFD_CLOEXEC)])
            return
        if self.postcopy.ufd < 0:
            try:
                self.postcopy.ufd = open_userfaultfd()
            except UserfaultError as exc:
                raise RequestError(f"POSTCOPY_ADVISE: {exc}") from None
        self._reply(msg.request, b"", fds=[os.dup(self.postcopy.ufd)])

    def _on_postcopy_listen(self, msg: Message, payload: None, fds: list[int]) -> None:
        if not self._has_protocol(ProtocolFeature.PAGEFAULT):
            raise RequestError("POSTCOPY_LISTEN without PAGEFAULT negotiated")
        if self.postcopy.ufd < 0:
            raise RequestError("POSTCOPY_LISTEN before POSTCOPY_ADVISE")
        self.postcopy.listening = True
        self._register_regions()

    def _postcopy_ack(self, msg: Message) -> None:
        """The front-end's ack of a postcopy SET_MEM_TABLE reply: register the regions."""
        self.postcopy.ack_pending = False
        for fd in msg.fds:
            _close(fd)
        if len(msg.payload) != 8 or int.from_bytes(msg.payload, "little") != 0:
            log.error("postcopy SET_MEM_TABLE ack %s: regions not registered", msg.payload.hex())
            return
        self._register_regions()
        if self.faults.on("postcopy-touches-memory"):
            for r in self.memory.regions:
                _ = r.mm[len(r.mm) - 1]  # faults: waits until the front-end provides the page

    def _register_regions(self) -> None:
        """Register every mapped region (whole mapping) for missing-page faults."""
        if self.faults.on("postcopy-no-register"):
            return
        for r in self.memory.regions:
            span = (mapping_address(r.mm), len(r.mm))
            if span in self.postcopy.ranges:
                continue
            try:
                register(self.postcopy.ufd, *span)
            except UserfaultError as exc:
                raise RequestError(f"postcopy: {exc}") from None
            self.postcopy.ranges.append(span)

    def _on_postcopy_end(self, msg: Message, payload: None, fds: list[int]) -> None:
        if not self._has_protocol(ProtocolFeature.PAGEFAULT):
            raise RequestError("POSTCOPY_END without PAGEFAULT negotiated")
        self.postcopy.listening = False
        if not self.faults.on("postcopy-end-keeps-userfaultfd"):
            self._close_userfaultfd()
        self._reply(msg.request, U64(0).encode())

    def _close_userfaultfd(self) -> None:
        for span in self.postcopy.ranges:
            with contextlib.suppress(UserfaultError):
                unregister(self.postcopy.ufd, *span)
        self.postcopy.ranges.clear()
        if self.postcopy.ufd >= 0:
            _close(self.postcopy.ufd)
            self.postcopy.ufd = -1

    def _on_set_log_base(self, msg: Message, payload: LogBase, fds: list[int]) -> None:
        if not self._has_protocol(ProtocolFeature.LOG_SHMFD):
            raise RequestError("SET_LOG_BASE without LOG_SHMFD negotiated")
        try:
            new_log = DirtyLog(fds[0], payload.mmap_size, payload.mmap_offset)
        except GuestMemoryError as exc:
            raise RequestError(f"SET_LOG_BASE: {exc}") from None
        if self.dirty_log is not None:
            self.dirty_log.close()
        self.dirty_log = new_log
        if self.faults.on("no-log-base-reply"):
            return
        # With LOG_SHMFD the back-end replies (u64 0) once the log is mapped (QEMU-TRACES 3).
        self._reply(msg.request, U64(0).encode())

    # -- back-end state (DEVICE_STATE)

    def _on_set_device_state_fd(
        self, msg: Message, payload: DeviceStateTransfer, fds: list[int]
    ) -> None:
        """vhost-user.rst SET_DEVICE_STATE_FD: direction 0 save / 1 load, phase 0 "stopped"
        (every ring stopped). We always use the front-end's channel (reply bit 8: no fd);
        an error is reported with bit 8 set and no fd ("must not both indicate an error and
        return a file descriptor")."""
        if not self._has_protocol(ProtocolFeature.DEVICE_STATE):
            raise RequestError("SET_DEVICE_STATE_FD without DEVICE_STATE negotiated")
        nofd = 1 << 8
        if self._state_load_fd >= 0:
            _close(self._state_load_fd)
            self._state_load_fd = -1
        bad = None
        if payload.direction not in (DeviceStateTransfer.DIRECTION_SAVE,
                                     DeviceStateTransfer.DIRECTION_LOAD):
            bad = f"direction {payload.direction}"
        elif payload.phase != DeviceStateTransfer.PHASE_STOPPED:
            bad = f"phase {payload.phase}"
        elif not self.suspended:
            bad = "a ring is started (phase stopped)"
        if bad is not None:
            log.error("SET_DEVICE_STATE_FD refused: %s", bad)
            self._state_result = 1
            if self.faults.on("device-state-error-with-fd"):
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                _close(write_end)
                # the server closes a reply's fds once sent
                self._reply(msg.request, U64(1).encode(), [read_end])
                return
            self._reply(msg.request, U64(1 | nofd).encode())
            return
        fd = fds.pop()
        if payload.direction == DeviceStateTransfer.DIRECTION_SAVE:
            self._state_result = 0
            self._reply(msg.request, U64(nofd).encode())
            try:
                device_state.write_all(fd, device_state.encode(self.features, self.config.wce))
            except OSError as exc:
                log.error("saving the device state: %s", exc)
                self._state_result = 1
            return
        self._state_load_fd = fd
        self._state_result = 1  # until CHECK_DEVICE_STATE has read and applied it
        self._reply(msg.request, U64(nofd).encode())

    def _on_check_device_state(self, msg: Message, payload: None, fds: list[int]) -> None:
        """CHECK_DEVICE_STATE: 0 once the last transfer was written (save) or read to its end
        and applied (load), 1 otherwise."""
        if not self._has_protocol(ProtocolFeature.DEVICE_STATE):
            raise RequestError("CHECK_DEVICE_STATE without DEVICE_STATE negotiated")
        if self._state_load_fd >= 0:
            fd, self._state_load_fd = self._state_load_fd, -1
            try:
                _features, wce = device_state.decode(device_state.read_until_eof(fd, 2.0))
            except (device_state.StateError, OSError) as exc:
                log.error("loading the device state: %s", exc)
                self._state_result = 1
            else:
                self.config.wce = wce
                self._state_result = 0
        result = self._state_result
        if self.faults.on("check-state-always-ok"):
            result = 0
        self._reply(msg.request, U64(result).encode())

    def _on_set_log_fd(self, msg: Message, payload: None, fds: list[int]) -> None:
        # Accepted for completeness; this back-end never signals it (the fd is closed).
        pass

    # -- in-flight region

    def _on_get_inflight_fd(self, msg: Message, payload: Inflight, fds: list[int]) -> None:
        if not self._has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
            raise ConnectionFatal("GET_INFLIGHT_FD without INFLIGHT_SHMFD negotiated")
        if not 1 <= payload.num_queues <= 0xFFFF or not 1 <= payload.queue_size <= MAX_QUEUE_SIZE:
            raise ConnectionFatal(
                f"GET_INFLIGHT_FD: num_queues {payload.num_queues} / queue_size "
                f"{payload.queue_size} out of range"
            )
        stride = queue_region_stride(payload.queue_size, self.packed)
        size = stride * payload.num_queues
        # libvhost-user's memfd: zero-filled, sealed against resizing, offset 0.
        fd = os.memfd_create("vhost-conformance-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            import fcntl

            fcntl.fcntl(
                fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
            )
        except OSError:
            _close(fd)
            raise
        told = size
        if self.faults.on("inflight-short-mmap"):
            told = queue_region_size(payload.queue_size, self.packed) * payload.num_queues - 16
        reply = Inflight(told, 0, payload.num_queues, payload.queue_size)
        self._reply(msg.request, reply.encode(), [fd])

    def _on_set_inflight_fd(self, msg: Message, payload: Inflight, fds: list[int]) -> None:
        if not self._has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
            raise RequestError("SET_INFLIGHT_FD without INFLIGHT_SHMFD negotiated")
        if payload.num_queues == 0 or payload.queue_size == 0:
            raise RequestError("SET_INFLIGHT_FD: num_queues and queue_size must be non-zero")
        need = queue_region_size(payload.queue_size, self.packed)
        if payload.mmap_size < need * payload.num_queues:
            raise RequestError(
                f"SET_INFLIGHT_FD: mmap_size {payload.mmap_size} < {payload.num_queues} queues x "
                f"{need} bytes"
            )
        import mmap

        try:
            mm = mmap.mmap(
                fds[0],
                payload.mmap_offset + payload.mmap_size,
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise RequestError(f"SET_INFLIGHT_FD: cannot map the region: {exc}") from None
        if self.faults.on("leak-inflight-regions") and self.inflight_mm is not None:
            # the earlier region stays mapped, its fd open, for the process's life
            self.faults.leaked.append(self.inflight_mm)
            self.inflight_mm = None
        if self.faults.on("leak-inflight-regions"):
            self.faults.leaked.append(os.dup(fds[0]))
        self._drop_inflight()
        self.inflight_mm = mm
        self.inflight_info = payload
        for q in self.queues:
            if q.started:
                try:
                    self._bind_inflight(q)
                except RingError as exc:
                    self._break(q, str(exc))

    def _drop_inflight(self) -> None:
        for q in self.queues:
            q.inflight = None
        if self.inflight_mm is not None:
            mm = self.inflight_mm
            self.inflight_mm = None
            self.inflight_info = None
            with contextlib.suppress(BufferError):
                mm.close()  # type: ignore[attr-defined]

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

    # -- vrings

    def _on_set_vring_num(self, msg: Message, payload: VringState, fds: list[int]) -> None:
        q = self._queue(payload.index)
        num = payload.num
        if q.started:
            raise RequestError(f"SET_VRING_NUM on started vring {q.index}")
        bad = not 1 <= num <= MAX_QUEUE_SIZE or (not self.packed and num & (num - 1))
        if bad and not self.faults.on("accept-any-ring-size"):
            raise RequestError(f"SET_VRING_NUM: size {num} invalid (split: power of 2 <= 32768)")
        q.num = 128 if self.faults.on("queue-size-128") else num

    def _on_set_vring_addr(self, msg: Message, payload: VringAddr, fds: list[int]) -> None:
        q = self._queue(payload.index)
        if payload.flags & ~VRING_F_LOG:
            raise RequestError(f"SET_VRING_ADDR: unknown flags {payload.flags:#x}")
        q.addr_flags = payload.flags
        q.desc_uva = payload.desc_user_addr
        q.avail_uva = payload.avail_user_addr
        q.used_uva = payload.used_user_addr
        q.log_guest_addr = payload.log_guest_addr
        q.addr_set = True
        if self.faults.on("used-idx-latched") and not self.packed and q.num:
            try:
                latch = SplitRing(self.memory, q.num, q.desc_uva, q.avail_uva, q.used_uva,
                                  indirect=False, event_idx=False)
                q.latched_used = latch.used_idx()
            except (RingError, GuestMemoryError):
                q.latched_used = None
        if q.started:
            # QEMU re-sends the address with F_LOG on a running ring to start logging.
            self._build_ring(q)

    def _on_set_vring_base(self, msg: Message, payload: VringState, fds: list[int]) -> None:
        q = self._queue(payload.index)
        if q.started:
            raise RequestError(f"SET_VRING_BASE on started vring {q.index}")
        if self.packed:
            q.last_avail_idx, q.avail_wrap, q.used_idx, q.used_wrap = split_packed_base(payload.num)
            if self.faults.on("packed-base-wrap-ignored"):
                q.avail_wrap = q.used_wrap = True
        else:
            if payload.num > 0xFFFF:
                raise RequestError(f"SET_VRING_BASE: {payload.num:#x} has reserved bits 16-31 set")
            q.last_avail_idx = payload.num

    def _base_of(self, q: VirtQueue) -> int:
        if self.faults.on("base-of-ring-0") and q.index != 0:
            return self._base_of(self.queues[0])
        if self.faults.on("base-is-used-idx"):
            if self.packed:
                return packed_base(q.used_idx, q.used_wrap, q.used_idx, q.used_wrap)
            return q.used_idx & 0xFFFF
        if self.packed:
            if self.faults.on("packed-base-used-half-avail"):
                return packed_base(q.last_avail_idx, q.avail_wrap, q.last_avail_idx, q.avail_wrap)
            return packed_base(q.last_avail_idx, q.avail_wrap, q.used_idx, q.used_wrap)
        return q.last_avail_idx & 0xFFFF

    def _on_get_vring_base(self, msg: Message, payload: VringState, fds: list[int]) -> None:
        # With bit 23 agreed the front-end follows the proposal, where GET_VRING_BASE always
        # drains and only message 45 suspends; with bit 20 alone, 11.1.3's "may suspend".
        self._get_vring_base(msg, payload, suspend=self._has_protocol(
            ProtocolFeature.GET_VRING_BASE_INFLIGHT) and not self._has_protocol(
            ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN))

    def _on_get_vring_base_skip_drain(
        self, msg: Message, payload: VringState, fds: list[int]
    ) -> None:
        # The proposal (p-b-o/qemu-ci vhost-user.rst b82b5c8c547f): "requires the
        # VHOST_USER_PROTOCOL_F_GET_VRING_BASE_SKIP_DRAIN protocol feature to be negotiated";
        # "the back-end must immediately suspend all in-flight I/O requests and record them".
        if not self._has_protocol(ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN):
            raise RequestError("GET_VRING_BASE_SKIP_DRAIN without bit 23 negotiated")
        self._get_vring_base(msg, payload, suspend=not self.faults.on("skip-drain-drains"))

    def _get_vring_base(self, msg: Message, payload: VringState, *, suspend: bool) -> None:
        """GET_VRING_BASE and the proposal's GET_VRING_BASE_SKIP_DRAIN: stop the ring,
        draining it unless ``suspend`` (requests then stay in flight in the region)."""
        what = FrontendRequest(msg.request).name
        q = self._queue(payload.index)
        if payload.num != 0:
            log.warning("%s(%d) with reserved num %d (must be 0)", what, q.index, payload.num)
        if q.phase.draining:
            raise RequestError(f"{what}({q.index}) while one is already draining")
        q.stop_request = msg.request
        if not q.started:
            if self.faults.on("crash-on-stop-before-start"):
                self.faults.die("crash-on-stop-before-start", f"GET_VRING_BASE({q.index})")
            self._reply(self._stop_reply_id(q), VringState(q.index, self._base_of(q)).encode())
            return
        self.flush()
        suspend = suspend and q.inflight is not None
        if suspend or not q.pending:
            if q.pending:
                # Bit 20: leave them in flight in the region; none touched guest memory yet.
                log.info(
                    "GET_VRING_BASE(%d): suspending %d in-flight request(s)",
                    q.index,
                    len(q.pending),
                )
            else:
                log.info("GET_VRING_BASE(%d): nothing in flight, stopped at once", q.index)
            late = None
            if q.pending and self.faults.on("write-after-suspend"):
                # the server that does not really cancel: the held WRITE's data still goes to
                # the disk after the reply (guest memory is only read)
                for req in q.pending.values():
                    write = blk.write_payload(self.memory, req.chain.readable)
                    if write is not None:
                        self._late_writes.append((self.clock() + 0.1, *write))
            if q.pending and self.faults.on("write-at-close"):
                for req in q.pending.values():
                    write = blk.write_payload(self.memory, req.chain.readable)
                    if write is not None:
                        self._close_writes.append(write)
            if q.pending and self.faults.on("complete-after-suspend"):
                late = q.pending.pop(max(q.pending))
            self._cancel_pending(q)
            if late is not None:
                q.pending[late.seq] = late
            self._stop(q)
        else:
            # Drain (the default): reply once the ring's requests completed; the control
            # socket keeps being served meanwhile.
            log.info(
                "GET_VRING_BASE(%d): draining %d in-flight request(s)", q.index, len(q.pending)
            )
            q.apply(RingEvent.DRAIN)
            if q.phase.broken:
                self.flush()  # a broken ring completes nothing more: answered at once

    def _stop_reply_id(self, q: VirtQueue) -> int:
        """The request id the stop's reply carries (misbehaviour: GET_VRING_BASE's for 45)."""
        if (q.stop_request == FrontendRequest.GET_VRING_BASE_SKIP_DRAIN
                and self.faults.on("skip-drain-reply-id")):
            return FrontendRequest.GET_VRING_BASE
        return q.stop_request

    def _stop(self, q: VirtQueue) -> None:
        log.info("vring %d stopped at avail index %#x", q.index, self._base_of(q))
        q.apply(RingEvent.STOP)
        q.stops += 1
        q.polled = False
        q.resubmit.clear()
        self._all_stopped = self.suspended
        if self.faults.on("stop-drops-unflushed-writes"):
            self._drop_unflushed()
        if self.faults.on("log-after-stop") and self.dirty_log is not None:
            self._late_logs.append(self.clock() + 0.2)
        q.serve_stopped = self.faults.on("serve-stopped-ring")
        if q.kick_fd >= 0 and not q.serve_stopped:
            if self.watcher is not None:
                self.watcher.unwatch(q.kick_fd)
            _close(q.kick_fd)
            q.kick_fd = -1
        base = self._base_of(q)
        if not self.packed and self.faults.on("base-reserved-bits"):
            base |= 0xA5A50000
        self._reply(self._stop_reply_id(q), VringState(q.index, base).encode())
        if self.faults.on("call-after-stop") and q.call_fd >= 0:
            # late enough that the front-end has drained the call fd after the reply
            # (a copy: the front-end may replace the call fd meanwhile, as QEMU does)
            self._late_calls.append((self.clock() + 0.2, os.dup(q.call_fd)))

    def _vring_fd(self, payload: U64, fds: list[int], what: str) -> tuple[VirtQueue, int]:
        if payload.value & ~0x1FF:
            raise RequestError(f"{what}: u64 {payload.value:#x} has bits beyond 0-8")
        q = self._queue(payload.vring_index)
        return q, (-1 if payload.nofd else fds.pop())

    def _on_set_vring_kick(self, msg: Message, payload: U64, fds: list[int]) -> None:
        q, fd = self._vring_fd(payload, fds, "SET_VRING_KICK")
        # NOFD (bit 8): "polling should be used instead of waiting for the kick": the avail
        # ring is looked at every POLL_INTERVAL seconds while the ring runs.
        if fd < 0 and self.faults.on("ignore-nofd"):
            q.polled = False  # keeps the old kick fd (if any): a NOFD ring is never served
        else:
            if q.kick_fd >= 0:
                if self.watcher is not None:
                    self.watcher.unwatch(q.kick_fd)
                _close(q.kick_fd)
            q.kick_fd = fd
            q.polled = fd < 0
            if fd >= 0 and self.watcher is not None:
                self.watcher.watch(fd, q.index)
        if not q.started and not (q.stops and self.faults.on("restart-kick-ignored")):
            self._start(q)

    def _on_set_vring_call(self, msg: Message, payload: U64, fds: list[int]) -> None:
        q, fd = self._vring_fd(payload, fds, "SET_VRING_CALL")
        if fd < 0 and self.faults.on("ignore-nofd"):
            return  # keeps signalling the call fd the front-end replaced
        if fd >= 0 and q.started and q.call_fd >= 0 and self.faults.on("call-swap-ignored"):
            _close(fd)
            return
        if q.call_fd >= 0:
            _close(q.call_fd)
        q.call_fd = fd

    def _on_set_vring_err(self, msg: Message, payload: U64, fds: list[int]) -> None:
        q, fd = self._vring_fd(payload, fds, "SET_VRING_ERR")
        if q.err_fd >= 0:
            _close(q.err_fd)
        q.err_fd = fd

    def _on_set_vring_enable(self, msg: Message, payload: VringState, fds: list[int]) -> None:
        q = self._queue(payload.index)
        if payload.num not in (0, 1):
            raise RequestError(f"SET_VRING_ENABLE({q.index}, {payload.num}): num must be 0 or 1")
        if not q.started and self.faults.on("stopped-ring-enable-ignored"):
            return
        q.enabled = bool(payload.num)
        if q.enabled and not self.faults.on("kick-lost-while-disabled"):
            q.kicked = True  # a kick that came while disabled must not be lost
        if q.enabled and not q.started and self.faults.on("process-on-enable") and q.addr_set:
            self._start(q)

    # ------------------------------------------------------------------ ring start/stop

    def _build_ring(self, q: VirtQueue) -> None:
        """(Re)translate the ring's addresses; a failure marks the queue broken."""
        try:
            if not q.addr_set or q.num == 0:
                raise RingError(f"vring {q.index} started without SET_VRING_NUM/SET_VRING_ADDR")
            indirect = self._has_feature(VirtioFeature.RING_INDIRECT_DESC)
            event_idx = self._has_feature(VirtioFeature.RING_EVENT_IDX)
            if self.packed:
                q.ring = PackedRing(
                    self.memory,
                    q.num,
                    q.desc_uva,
                    q.avail_uva,
                    q.used_uva,
                    indirect=indirect,
                    event_idx=event_idx,
                    faults=self.faults,
                )
            else:
                q.ring = SplitRing(
                    self.memory,
                    q.num,
                    q.desc_uva,
                    q.avail_uva,
                    q.used_uva,
                    indirect=indirect,
                    event_idx=event_idx,
                    faults=self.faults,
                )
        except RingError as exc:
            q.ring = None
            self._break(q, str(exc))

    def _start(self, q: VirtQueue) -> None:
        """SET_VRING_KICK starts the ring (vhost-user.rst "Ring states"): read used->idx,
        run the in-flight recovery ("When reconnecting") and queue the resubmissions."""
        q.apply(RingEvent.START)
        q.serve_stopped = False
        self._all_stopped = False
        self.ever_started = True
        q.pending.clear()
        q.done.clear()
        q.resubmit.clear()
        q.kicked = True
        q.deaf = self.faults.on("wait-for-first-kick")
        self._build_ring(q)
        if q.ring is None:
            return
        try:
            self._bind_inflight(q)
            # A region an earlier session set up (reconnect after a crash, migration
            # destination, restart after a stop) may hide completions the earlier back-end
            # published but never notified (death between used->idx and the call): notify
            # once, or the guest waits forever. Spurious notifications are harmless; libvhost-user
            # does the same on SET_VRING_CALL ("in case of I/O hang after reconnecting").
            earlier = q.inflight is not None and q.inflight.version != 0
            if isinstance(q.ring, SplitRing):
                q.used_idx = q.ring.used_idx()
                if self.faults.on("used-idx-latched") and q.latched_used is not None:
                    q.used_idx = q.latched_used
                if isinstance(q.inflight, SplitInflight):
                    self._recover_split(q, q.ring, q.inflight)
            elif isinstance(q.ring, PackedRing) and isinstance(q.inflight, PackedInflight):
                self._recover_packed(q, q.ring, q.inflight)
            if earlier and not q.phase.broken:
                _signal(q.call_fd)
        except (InflightError, RingError, GuestMemoryError) as exc:
            self._break(q, f"in-flight recovery: {exc}")

    def _misbehave_desc_num(self, buf: Buffer, offset: int, desc_num: int) -> None:
        """``region-desc-num-wrong``: the fresh region's header says one entry fewer (both
        layouts keep desc_num as u16 at byte 10 of the queue's region)."""
        if self.faults.on("region-desc-num-wrong"):
            struct.pack_into("<H", buf, offset + 10, (desc_num - 1) & 0xFFFF)

    def _recover_split(self, q: VirtQueue, ring: SplitRing, region: SplitInflight) -> None:
        fresh = region.version == 0
        heads, q.counter = region.recover(
            q.used_idx, fix_last_batch=not self.faults.on("skip-last-batch-fixup"))
        if fresh:
            if self.faults.on("inflight-no-version"):
                region.forget_version()
            self._misbehave_desc_num(region.buf, region.offset, region.desc_num)
            return
        if self.faults.on("ignore-inflight"):
            log.warning("vring %d: misbehaving: ignoring in-flight heads %s", q.index, heads)
            return
        if self.faults.on("resubmit-head-order"):
            heads = sorted(heads)
        # libvhost-user vu_check_queue_inflights: last_avail_idx = used->idx + in flight;
        # this is what makes a reconnect (SET_VRING_BASE = used idx) not pop twice.
        expected = (q.used_idx + len(heads)) & 0xFFFF
        if expected != q.last_avail_idx:
            log.info(
                "vring %d: last_avail_idx %d from the region (used->idx %d + %d in flight), "
                "SET_VRING_BASE said %d",
                q.index,
                expected,
                q.used_idx,
                len(heads),
                q.last_avail_idx,
            )
        if not self.faults.on("skip-used-idx-fixup"):
            q.last_avail_idx = expected
        for head in heads:
            chain = ring.read_chain(head)
            if chain.fatal:
                self._break(q, f"resubmitted head {head}: {chain.fatal}")
                return
            q.resubmit.append(self._new_request(q, chain, head))
        if heads:
            log.info("vring %d: resubmitting heads %s (counter order)", q.index, heads)

    def _recover_packed(self, q: VirtQueue, ring: PackedRing, region: PackedInflight) -> None:
        if region.version == 0:
            region.initialize(q.used_idx, q.used_wrap)
            if self.faults.on("inflight-no-version"):
                region.forget_version()
            self._misbehave_desc_num(region.buf, region.offset, region.desc_num)
            q.counter = 1
            return
        chains, q.counter, q.used_idx, q.used_wrap = region.recover(ring.flags_at)
        if self.faults.on("ignore-inflight"):
            chains = []
        total = sum(len(c.descs) for c in chains)
        idx, wrap = q.used_idx + total, q.used_wrap
        while idx >= q.num:
            idx -= q.num
            wrap = not wrap
        q.last_avail_idx, q.avail_wrap = idx, wrap
        for c in chains:
            chain = Chain(c.entry, ndescs=len(c.descs))
            ring.chain_from_descs(chain, [(d.addr, d.len, d.id, d.flags) for d in c.descs])
            if chain.fatal:
                self._break(q, f"resubmitted entry {c.entry}: {chain.fatal}")
                return
            q.resubmit.append(self._new_request(q, chain, c.entry))
        if chains:
            log.info("vring %d: resubmitting %d packed chain(s)", q.index, len(chains))

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

    # ------------------------------------------------------------------ I/O

    def kick(self, index: int) -> None:
        """The driver kicked queue ``index`` (the server read its eventfd)."""
        if 0 <= index < len(self.queues):
            q = self.queues[index]
            q.deaf = False
            if self.faults.on("disabled-ring-writes-disk") and q.started and not q.enabled:
                self._prewrite(q)
            q.kicked = True

    def _prewrite(self, q: VirtQueue) -> None:
        """--misbehave disabled-ring-writes-disk: the WRITEs made available on a started,
        disabled ring go to the disk now (the ring itself is not touched)."""
        ring = q.ring
        if not isinstance(ring, SplitRing):
            return
        idx = q.last_avail_idx
        while idx != ring.avail_idx():
            chain = ring.read_chain(ring.avail_head(idx))
            idx = (idx + 1) & 0xFFFF
            if chain.fatal or chain.error:
                continue
            payload = blk.write_payload(self.memory, chain.readable)
            if payload is not None:
                self.disk.write_from(payload[0], [memoryview(payload[1])])

    def _new_request(self, q: VirtQueue, chain: Chain, head: int) -> Request:
        self._seq += 1
        return Request(q, self._seq, chain, head)

    def _submit(self, req: Request, now: float) -> None:
        q = req.queue
        q.pending[req.seq] = req
        # the latency is the disk's: GET_ID does not touch the disk and completes at once
        # (as in qemu-storage-daemon, whose GET_ID never reaches the block layer), which
        # lets a case complete requests out of order (a GET_ID after a slow write)
        if (
            self.options.latency <= 0
            or req.chain.error is not None
            or blk.request_type(self.memory, req.chain.readable) == blk.T_GET_ID
        ):
            self._execute(req)
        else:
            req.deadline = now + self.options.latency
            heapq.heappush(self._timers, req)

    def _pop_split(self, q: VirtQueue, ring: SplitRing, now: float) -> None:
        while self._pop_split_once(q, ring, now):
            pass

    def _pop_split_once(self, q: VirtQueue, ring: SplitRing, now: float) -> bool:
        """Take what is available; True when more arrived meanwhile (EVENT_IDX re-check)."""
        avail = ring.avail_idx()
        count = (avail - q.last_avail_idx) & 0xFFFF
        if count > q.num:
            if self.faults.on("trust-avail-ring"):
                self.faults.die("trust-avail-ring", f"{count} heads available", signal.SIGABRT)
            self._break(
                q,
                f"avail->idx {avail} is {count} ahead of last_avail_idx "
                f"{q.last_avail_idx}, more than the queue size {q.num}",
            )
            return False
        inflight_heads = {r.head for r in q.pending.values()}
        for _ in range(count):
            head = ring.avail_head(q.last_avail_idx)
            chain = ring.read_chain(head)
            if chain.fatal:
                self._break(q, f"head {head} at avail slot {q.last_avail_idx}: {chain.fatal}")
                return False
            if chain.indirect and chain.error is None and (
                self.faults.on("indirect-ioerr")
                or (chain.mixed and self.faults.on("indirect-after-direct-ioerr"))
                or (chain.indirect_flags & 2 and self.faults.on("indirect-write-flag-honoured"))
            ):
                chain.error = "an indirect table (misbehaving: refused)"
            if chain.error is None and self.faults.on("fixed-descriptor-layout") and (
                not chain.readable or chain.readable[0][1] != blk.OUTHDR_SIZE
                or not chain.writable or chain.writable[-1][1] != 1
            ):
                chain.error = "not one descriptor per header and status (misbehaving)"
            if head in inflight_heads:
                if self.faults.on("trust-avail-ring"):
                    self.faults.die(
                        "trust-avail-ring", f"head {head} available twice", signal.SIGABRT
                    )
                self._break(q, f"head {head} made available again while still in flight")
                return False
            q.last_avail_idx = (q.last_avail_idx + 1) & 0xFFFF
            inflight_heads.add(head)
            if isinstance(q.inflight, SplitInflight):
                q.inflight.mark_popped(head, q.counter)
            q.counter += 1
            self.faults.reach("after-pop")
            self._submit(self._new_request(q, chain, head), now)
        if ring.event_idx:
            off = ring.set_avail_event(q.last_avail_idx)
            self._log_used(q, off, 2)
            # VIRTIO 1.2 2.7.10: the driver decides whether to kick from avail_event; a
            # buffer it added before seeing ours would not be kicked: look again.
            full_barrier()
            return ring.avail_idx() != q.last_avail_idx
        return False

    def _pop_packed(self, q: VirtQueue, ring: PackedRing, now: float) -> None:
        outstanding = sum(r.chain.ndescs for r in q.pending.values())
        while ring.is_available(q.last_avail_idx, q.avail_wrap):
            chain = ring.read_chain(q.last_avail_idx, q.avail_wrap)
            if chain.fatal:
                self._break(q, f"entry {q.last_avail_idx}: {chain.fatal}")
                return
            if outstanding + chain.ndescs > q.num:
                self._break(q, "more descriptors in flight than the queue size")
                return
            outstanding += chain.ndescs
            entry = (q.index, q.last_avail_idx, q.avail_wrap)
            idx = q.last_avail_idx + chain.ndescs
            if idx >= q.num:
                idx -= q.num
                q.avail_wrap = not q.avail_wrap
            q.last_avail_idx = idx
            if entry in self._ahead:  # packed-out-of-ring-order took it already
                self._ahead.discard(entry)
                continue
            head = -1
            if isinstance(q.inflight, PackedInflight):
                copies = [PackedDescCopy(a, ln, i, f) for a, ln, i, f in chain.ring_descs]
                try:
                    head = q.inflight.record_chain(copies, q.counter)
                except InflightError as exc:
                    self._break(q, str(exc))
                    return
            q.counter += 1
            self.faults.reach("after-pop")
            self._submit(self._new_request(q, chain, head), now)
        if self.faults.on("packed-out-of-ring-order") and not q.phase.broken:
            self._pop_ahead(q, ring, now)

    def _pop_ahead(self, q: VirtQueue, ring: PackedRing, now: float) -> None:
        """``packed-out-of-ring-order``: the entry at last_avail_idx is not available; walk
        its chain by the NEXT flags as memory holds them and take the chain after it when that
        one is available (once; it is skipped when the ring order reaches it)."""
        i, w = q.last_avail_idx, q.avail_wrap
        for _ in range(q.num):
            more = ring.flags_at(i) & 1  # VIRTQ_DESC_F_NEXT
            i += 1
            if i == q.num:
                i, w = 0, not w
            if not more:
                break
        if (q.index, i, w) in self._ahead or not ring.is_available(i, w):
            return
        chain = ring.read_chain(i, w)
        if chain.fatal:
            return
        log.warning("misbehaving: entry %d taken before entry %d", i, q.last_avail_idx)
        self._ahead.add((q.index, i, w))
        self._submit(self._new_request(q, chain, -1), now)

    def _in_submission_order(self, q: VirtQueue, batch: list[Request]) -> list[Request]:
        """``packed-used-submission-order``: of the executed requests, those taken before
        every request still executing, in the order they were taken; the others wait."""
        first_open = min((r.seq for r in q.pending.values() if not r.executed), default=None)
        ready = [r for r in batch if first_open is None or r.seq < first_open]
        q.done = [r for r in batch if not (first_open is None or r.seq < first_open)]
        return sorted(ready, key=lambda r: r.seq)

    def _misbehave_before(self, req: Request) -> bool:
        """``write-segments-lost`` (the chain loses data descriptors) and
        ``write-zeroes-unmap-noop`` (completed OK without touching the disk): True when the
        request is done."""
        if not self.faults.misbehave & {"write-segments-lost", "write-zeroes-unmap-noop"}:
            return False
        chain = req.chain
        rtype = blk.request_type(self.memory, chain.readable)
        if (self.faults.on("write-segments-lost") and rtype == blk.T_OUT
                and len(chain.readable) > 2 and chain.readable[0][1] == blk.OUTHDR_SIZE):
            # the header (one 16-byte descriptor) and the first data descriptor only
            chain.readable = chain.readable[:2]
        if (self.faults.on("write-zeroes-unmap-noop") and rtype == blk.T_WRITE_ZEROES
                and chain.status_gpa is not None):
            segment = blk.segment_flags(self.memory, chain.readable)
            if segment is not None and segment & blk.WRITE_ZEROES_F_UNMAP:
                blk.write_status(self.memory, chain.status_gpa, blk.S_OK)
                self.mark_dirty(chain.status_gpa, 1)
                req.status, req.written = blk.S_OK, 1
                return True
        return False

    def _execute(self, req: Request) -> None:
        """Run a request against the disk and guest memory (the status byte included)."""
        q = req.queue
        chain = req.chain
        req.executed = True
        if self.faults.on("stop-drops-unflushed-writes") and chain.error is None:
            self._remember_unflushed(chain)
        try:
            if chain.error is None and self._misbehave_before(req):
                pass
            elif chain.error is not None:
                log.error("vring %d head %d: %s: IOERR", q.index, chain.head, chain.error)
                status_gpa = chain.status_gpa
                assert status_gpa is not None
                blk.write_status(self.memory, status_gpa, blk.S_IOERR)
                self.mark_dirty(status_gpa, 1)
                req.status, req.written = blk.S_IOERR, 1
            elif self._held_back_write(req):
                pass
            else:
                outcome = blk.execute(
                    self.disk,
                    self.memory,
                    chain.readable,
                    chain.writable,
                    self.mark_dirty,
                    device_id=self.options.device_id,
                    writethrough=self._writethrough(),
                    fail=self.faults.should_fail(),
                )
                if outcome.status != blk.S_OK:
                    log.info(
                        "vring %d head %d: status %d: %s",
                        q.index,
                        chain.head,
                        outcome.status,
                        outcome.note,
                    )
                req.status, req.written = outcome.status, outcome.written
                self._misbehave_status(req, outcome)
                self._misbehave_data(req, outcome)
        except GuestMemoryError as exc:
            # The status byte went away (REM_MEM_REG under a queued request).
            self._break(q, f"head {chain.head}: {exc}")
            return
        self.faults.reach("after-data")
        q.done.append(req)

    def _held_back_write(self, req: Request) -> bool:
        """``flush-before-writes``: a WRITE completes OK at once while its data reaches the
        disk only 0.5 s later (a write-back cache no FLUSH waits for). Whether it did so."""
        if not self.faults.on("flush-before-writes"):
            return False
        chain = req.chain
        payload = blk.write_payload(self.memory, chain.readable)
        if payload is None or chain.status_gpa is None:
            return False
        self._late_writes.append((self.clock() + 0.5, *payload))
        blk.write_status(self.memory, chain.status_gpa, blk.S_OK)
        self.mark_dirty(chain.status_gpa, 1)
        req.status, req.written = blk.S_OK, 1
        return True

    def _remember_unflushed(self, chain: Chain) -> None:
        """``stop-drops-unflushed-writes``: keep what a WRITE overwrites (a FLUSH forgets it)."""
        rtype = blk.request_type(self.memory, chain.readable)
        if rtype == blk.T_FLUSH:
            self._unflushed.clear()
            return
        payload = blk.write_payload(self.memory, chain.readable)
        if payload is None:
            return
        offset, data = payload
        old = os.pread(self.disk.fd, len(data), offset) if offset >= 0 else b""
        self._unflushed.append((offset, old))

    def _drop_unflushed(self) -> None:
        """``stop-drops-unflushed-writes``: undo, newest first, the WRITEs since the last FLUSH."""
        while self._unflushed:
            offset, old = self._unflushed.pop()
            if old:
                self.disk.write_from(offset, [memoryview(old)])
        log.warning("misbehaving: unflushed writes dropped at the stop")

    def _misbehave_status(self, req: Request, outcome: blk.Outcome) -> None:
        """``unknown-type-ok`` and ``capacity-ignored``: report OK where the request failed."""
        rtype = blk.request_type(self.memory, req.chain.readable)
        known = rtype in blk.KNOWN_TYPES
        lie = (self.faults.on("unknown-type-ok") and outcome.status == blk.S_UNSUPP
               and not known) or (
            self.faults.on("capacity-ignored") and outcome.status == blk.S_IOERR
            and rtype in (blk.T_IN, blk.T_OUT) and "capacity" in outcome.note) or (
            self.faults.on("discard-limit-ignored") and outcome.status == blk.S_IOERR
            and rtype == blk.T_DISCARD and "max" in outcome.note) or (
            self.faults.on("segment-flags-ignored") and outcome.status == blk.S_UNSUPP
            and rtype in (blk.T_DISCARD, blk.T_WRITE_ZEROES)) or (
            self.faults.on("read-only-writes") and outcome.status == blk.S_IOERR
            and rtype == blk.T_OUT and "read-only" in outcome.note)
        if lie and req.chain.status_gpa is not None:
            blk.write_status(self.memory, req.chain.status_gpa, blk.S_OK)
            req.status = blk.S_OK
        fail = (self.faults.on("flush-ioerr") and rtype == blk.T_FLUSH) or (
            self.faults.on("get-id-ioerr") and rtype == blk.T_GET_ID) or self._disk_dropped
        if fail and req.chain.status_gpa is not None:
            blk.write_status(self.memory, req.chain.status_gpa, blk.S_IOERR)
            req.status, req.written = blk.S_IOERR, 1

    def _misbehave_data(self, req: Request, outcome: blk.Outcome) -> None:
        """``packed-read-no-data``: a read on a packed ring leaves zeros where the disk's
        bytes belong (the status byte, the last writable byte, keeps its OK)."""
        if not (self.packed and self.faults.on("packed-read-no-data")):
            return
        if outcome.status != blk.S_OK:
            return
        if blk.request_type(self.memory, req.chain.readable) != blk.T_IN:
            return
        left = sum(n for _g, n in req.chain.writable) - 1
        for gpa, n in req.chain.writable:
            k = min(n, left)
            if k <= 0:
                break
            for mm, off, seg in self.memory.gpa_segments(gpa, k):
                mm[off : off + seg] = bytes(seg)
            left -= k

    def _log_used(self, q: VirtQueue, offset: int, length: int) -> None:
        """Log a write to the used ring (vhost-user.rst "Migration": with
        VHOST_VRING_F_LOG, at log_guest_addr + offset)."""
        if not self.logging or self.faults.on("no-log-used"):
            return
        if q.addr_flags & VRING_F_LOG:
            self.mark_dirty(q.log_guest_addr + offset, length)

    def _complete_split(self, q: VirtQueue, ring: SplitRing, batch: list[Request]) -> None:
        heads = [r.head for r in batch]
        region = q.inflight if isinstance(q.inflight, SplitInflight) else None
        if region is not None:
            region.link_batch(heads)
        old = q.used_idx
        for r in batch:
            off = ring.write_used(q.used_idx, r.head, self._used_len(ring, q.used_idx, r))
            self._log_used(q, off, 8)
            q.used_idx = (q.used_idx + 1) & 0xFFFF
            self.faults.reach("after-used-elem")
        ring.set_used_idx(q.used_idx)
        self._log_used(q, 2, 2)
        if self.faults.on("used-flags-garbage"):
            ring.set_used_flags(0x2)
            self._log_used(q, 0, 2)
        self.faults.reach("after-used-idx", len(batch))
        if region is not None:
            region.clear_batch([] if self.faults.on("inflight-keep-marks") else heads, q.used_idx)
        self.faults.reach("after-region-update", len(batch))
        if self._misbehave_notify(ring, old, q.used_idx):
            _signal(q.call_fd)

    def _complete_packed(self, q: VirtQueue, ring: PackedRing, batch: list[Request]) -> None:
        region = q.inflight if isinstance(q.inflight, PackedInflight) else None
        entries = [r.head for r in batch]
        if region is not None:
            region.link_batch(entries)
        old = q.used_idx
        first = (q.used_idx, q.used_wrap)
        stuck = self.faults.on("packed-wrap-stuck")
        if stuck:
            first = (q.used_idx, True)
        late = self.faults.on("packed-used-len-late")
        if late:
            # the previous batch's lens, written after its USED bits
            for entry, length in self._late_lens.pop(q.index, []):
                ring.write_used_len(entry, length)
        for k, r in enumerate(batch):
            if late:
                self._late_lens.setdefault(q.index, []).append((q.used_idx, r.written))
            off = ring.write_used(
                q.used_idx, r.chain.buffer_id, 0 if late else r.written, q.used_wrap or stuck,
                flags_too=k > 0,
            )
            self._log_ring(ring, off)
            idx = q.used_idx + r.chain.ndescs
            if idx >= q.num:
                idx -= q.num
                q.used_wrap = not q.used_wrap
            q.used_idx = idx
            self.faults.reach("after-used-elem")
        if region is not None:
            region.set_used(q.used_idx, q.used_wrap)
        # The first entry's flags last: the whole batch becomes visible at once.
        ring.write_used_flags(*first)
        self.faults.reach("after-used-idx", len(batch))
        if region is not None:
            region.clear_batch([] if self.faults.on("inflight-keep-marks") else entries)
        self.faults.reach("after-region-update", len(batch))
        if ring.should_notify(old, q.used_idx, q.used_wrap):
            _signal(q.call_fd)

    def _used_len(self, ring: SplitRing, used_idx: int, r: Request) -> int:
        """The len of a split used element: bytes written, or what ``used-len-not-set`` and
        ``write-len-4096`` put there instead."""
        if self.faults.on("used-len-not-set"):
            return ring.used_len(used_idx)
        if self.faults.on("write-len-4096") and blk.request_type(
            self.memory, r.chain.readable
        ) == blk.T_OUT:
            return 4096
        return r.written

    def _misbehave_notify(self, ring: SplitRing, old: int, new: int) -> bool:
        """Whether to signal the call fd after used entries [old, new): the ring's rule, bent
        by ``event-idx-off-by-one`` and ``no-interrupt-ignored``."""
        if (ring.event_idx and self.faults.on("event-idx-honours-no-interrupt")
                and ring.avail_flags() & 1):
            return False
        if ring.event_idx and self.faults.on("event-idx-off-by-one"):
            event = ring.used_event()
            return (new - event) & 0xFFFF <= (new - old - 1) & 0xFFFF
        if not ring.event_idx and self.faults.on("no-interrupt-ignored"):
            return True
        return ring.should_notify(old, new)

    def _log_ring(self, ring: PackedRing, offset: int) -> None:
        if not self.logging or self.faults.on("no-log-used"):
            return
        with contextlib.suppress(GuestMemoryError):
            self.mark_dirty(self.memory.uva_to_gpa(ring.desc_uva + offset), 16)

    def flush(self) -> None:
        """Complete every executed request as one batch per queue; send the GET_VRING_BASE
        replies whose drain finished."""
        for q in self.queues:
            if q.done and q.ring is not None and not q.phase.broken:
                batch, q.done = q.done, []
                if isinstance(q.ring, SplitRing):
                    self._complete_split(q, q.ring, batch)
                else:
                    if self.faults.on("packed-used-submission-order"):
                        batch = self._in_submission_order(q, batch)
                    if batch:
                        self._complete_packed(q, q.ring, batch)
                for r in batch:
                    q.pending.pop(r.seq, None)
            early = self.faults.on("early-drain-reply") and len(q.pending) == 1
            if q.phase.draining and (not q.pending or early):
                self._stop(q)
            elif q.phase is RingPhase.BROKEN_DRAINING:
                # A broken ring never completes what it holds: answer anyway.
                self._cancel_pending(q)
                self._stop(q)

    def turn(self, now: float | None = None) -> None:
        """One event-loop turn: take new requests from kicked rings, execute the due
        ones, complete them."""
        if now is None:
            now = self.clock()
        for q in self.queues:
            if q.polled:
                q.kicked = True  # polling mode: look at the avail ring every turn
            serve = q.runnable or (q.serve_stopped and not q.phase.broken)
            if not serve or not q.kicked or q.ring is None:
                if q.started and not q.enabled and self.faults.on("kick-lost-while-disabled"):
                    q.kicked = False  # dropped, not kept for SET_VRING_ENABLE 1
                continue
            if q.deaf or (q.index > 0 and self.faults.on("second-queue-ignored")):
                continue
            q.kicked = False
            if self.faults.on("iotlb-msg-without-iommu") and not self._iotlb_sent:
                self._iotlb_sent = self._send_iotlb_miss(q)
            while q.resubmit:
                self._submit(q.resubmit.pop(0), now)
            if isinstance(q.ring, SplitRing):
                self._pop_split(q, q.ring, now)
            else:
                self._pop_packed(q, q.ring, now)
        for late in [c for c in self._late_calls if c[0] <= now]:
            self._late_calls.remove(late)
            _signal(late[1])
            _close(late[1])
        for when in [t for t in self._late_logs if t <= now]:
            self._late_logs.remove(when)
            if self.dirty_log is not None:
                log.warning("misbehaving: every dirty log bit set after the stop")
                self.dirty_log.mark_all()
        for due in [w for w in self._late_writes if w[0] <= now]:
            self._late_writes.remove(due)
            self.disk.write_from(due[1], [memoryview(due[2])])
        while self._timers and self._timers[0].deadline <= now:
            req = heapq.heappop(self._timers)
            if not req.cancelled and not req.queue.phase.broken:
                self._execute(req)
        self.flush()

    def next_deadline(self) -> float | None:
        """When the next held request (or late call of call-after-stop) is due (None: none)."""
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
        due = [self._timers[0].deadline] if self._timers else []
        due += [when for when, _ in self._late_calls]
        due += [w[0] for w in self._late_writes]
        if any(q.polled and q.runnable for q in self.queues):
            due.append(self.clock() + POLL_INTERVAL)
        due += self._late_logs
        return min(due) if due else None

    @property
    def has_work(self) -> bool:
        """A ring was kicked and may have requests to take (a polled ring waits for its
        next look: :meth:`next_deadline`)."""
        return any(q.kicked and (q.runnable or q.serve_stopped) and not q.polled
                   for q in self.queues)

    # ------------------------------------------------------------------ back-end channel

    def _send_iotlb_miss(self, q: VirtQueue) -> bool:
        """--misbehave iotlb-msg-without-iommu: a BACKEND_IOTLB_MSG miss (type 1) for the
        ring's descriptor table, though VIRTIO_F_IOMMU_PLATFORM was not negotiated."""
        if self.backend_fd < 0:
            return False
        payload = struct.pack("<QQQBB6x", q.desc_uva, 4096, 0, 1, 1)  # iova, size, uaddr, RO, MISS
        data = Header(BackendRequest.IOTLB_MSG, VERSION, len(payload)).encode() + payload
        try:
            os.write(self.backend_fd, data)
        except OSError as exc:
            log.error("BACKEND_IOTLB_MSG not sent: %s", exc)
            return False
        return True

    def send_config_change(self) -> bool:
        """Tell the front-end the config space changed (BACKEND_CONFIG_CHANGE_MSG), after
        re-reading the disk size. Not while suspended. Returns whether it was sent."""
        if self.faults.on("resize-not-announced"):
            return False
        if not self.faults.on("capacity-not-reread"):
            self.disk.size = os.fstat(self.disk.fd).st_size
            self.config.capacity = self.disk.capacity_sectors
        suspended = self.suspended and not self.faults.on("config-change-while-suspended")
        if self.backend_fd < 0 or not self._has_protocol(ProtocolFeature.CONFIG) or suspended:
            return False
        data = Header(BackendRequest.CONFIG_CHANGE_MSG, VERSION, 0).encode()
        try:
            if (self.faults.on("backend-msg-fd-without-send-fd")
                    and not self._has_protocol(ProtocolFeature.BACKEND_SEND_FD)):
                with socket.socket(fileno=os.dup(self.backend_fd)) as sock, open(
                        os.devnull) as extra:
                    socket.send_fds(sock, [data], [extra.fileno()])
                return True
            os.write(self.backend_fd, data)
        except OSError as exc:
            log.error("BACKEND_CONFIG_CHANGE_MSG not sent: %s", exc)
            return False
        return True

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """The connection ended: cancel everything (no guest write after this), close
        every fd, unmap memory, log and region. The disk stays open."""
        if self.closed:
            return
        self.closed = True
        if self._state_load_fd >= 0:
            _close(self._state_load_fd)
            self._state_load_fd = -1
        for _, fd in self._late_calls:
            _close(fd)
        self._late_calls.clear()
        for _, offset, data in self._late_writes:  # not cancelled: they land all the same
            self.disk.write_from(offset, [memoryview(data)])
        self._late_writes.clear()
        for offset, data in self._close_writes:
            self.disk.write_from(offset, [memoryview(data)])
        self._close_writes.clear()
        for q in self.queues:
            self._cancel_pending(q)
            self._close_queue_fds(q)
            q.apply(RingEvent.CLOSE)
            q.ring = None
        self._timers.clear()
        self._drop_inflight()
        if self.dirty_log is not None:
            self.dirty_log.close()
            self.dirty_log = None
        self._close_userfaultfd()
        if (
            self.faults.on("keep-regions-on-early-close")
            and not self.ever_started
            and self.memory.regions
        ):
            self.faults.carried = self.memory  # still mapped: the next connection gets them
        else:
            self.memory.clear()
        if self.backend_fd >= 0:
            _close(self.backend_fd)
            self.backend_fd = -1
        for _data, fds in self.outbox:
            for fd in fds:
                _close(fd)
        self.outbox.clear()


P = TypeVar("P")


@dataclass(frozen=True, slots=True)
class Handler(Generic[P]):
    """How one request is handled: the payload type ``msg.decoded()`` gives for it, and the
    method that takes that payload."""

    payload: type[P]
    method: Callable[[Device, Message, P, list[int]], None]

    def run(
        self, device: Device, request: FrontendRequest, msg: Message, payload: object,
        fds: list[int]
    ) -> None:
        """Check the decoded payload against :attr:`payload` once, then call the method."""
        if not isinstance(payload, self.payload):
            raise RequestError(
                f"{request.name}: payload decoded as {type(payload).__name__}, the handler "
                f"takes {self.payload.__name__}"
            )
        self.method(device, msg, payload, fds)


class AnyHandler(Protocol):
    """A :class:`Handler` of any payload type (what the dispatch table holds)."""

    @property
    def payload(self) -> type:
        """The payload type the handler takes."""

    def run(
        self, device: Device, request: FrontendRequest, msg: Message, payload: object,
        fds: list[int]
    ) -> None:
        """Check the payload's type and handle the request."""


#: The requests this back-end handles (any other is answered "not supported"), each with the
#: payload type it takes (frontend/protocol.py REQUEST_PAYLOAD; NoneType: empty payload).
HANDLERS: Mapping[FrontendRequest, AnyHandler] = {
    R.GET_FEATURES: Handler(NoneType, Device._on_get_features),
    R.SET_FEATURES: Handler(U64, Device._on_set_features),
    R.GET_PROTOCOL_FEATURES: Handler(NoneType, Device._on_get_protocol_features),
    R.SET_PROTOCOL_FEATURES: Handler(U64, Device._on_set_protocol_features),
    R.SET_OWNER: Handler(NoneType, Device._on_set_owner),
    R.RESET_OWNER: Handler(NoneType, Device._on_reset_owner),
    R.RESET_DEVICE: Handler(NoneType, Device._on_reset_device),
    R.GET_QUEUE_NUM: Handler(NoneType, Device._on_get_queue_num),
    R.GET_MAX_MEM_SLOTS: Handler(NoneType, Device._on_get_max_mem_slots),
    R.GET_STATUS: Handler(NoneType, Device._on_get_status),
    R.SET_STATUS: Handler(U64, Device._on_set_status),
    R.SET_BACKEND_REQ_FD: Handler(NoneType, Device._on_set_backend_req_fd),
    R.GET_CONFIG: Handler(Config, Device._on_get_config),
    R.SET_CONFIG: Handler(Config, Device._on_set_config),
    R.SET_MEM_TABLE: Handler(MemoryTable, Device._on_set_mem_table),
    R.ADD_MEM_REG: Handler(SingleMemoryRegion, Device._on_add_mem_reg),
    R.REM_MEM_REG: Handler(SingleMemoryRegion, Device._on_rem_mem_reg),
    R.POSTCOPY_ADVISE: Handler(NoneType, Device._on_postcopy_advise),
    R.POSTCOPY_LISTEN: Handler(NoneType, Device._on_postcopy_listen),
    R.POSTCOPY_END: Handler(NoneType, Device._on_postcopy_end),
    R.SET_LOG_BASE: Handler(LogBase, Device._on_set_log_base),
    R.SET_DEVICE_STATE_FD: Handler(DeviceStateTransfer, Device._on_set_device_state_fd),
    R.CHECK_DEVICE_STATE: Handler(NoneType, Device._on_check_device_state),
    R.SET_LOG_FD: Handler(NoneType, Device._on_set_log_fd),
    R.GET_INFLIGHT_FD: Handler(Inflight, Device._on_get_inflight_fd),
    R.SET_INFLIGHT_FD: Handler(Inflight, Device._on_set_inflight_fd),
    R.SET_VRING_NUM: Handler(VringState, Device._on_set_vring_num),
    R.SET_VRING_ADDR: Handler(VringAddr, Device._on_set_vring_addr),
    R.SET_VRING_BASE: Handler(VringState, Device._on_set_vring_base),
    R.GET_VRING_BASE: Handler(VringState, Device._on_get_vring_base),
    R.GET_VRING_BASE_SKIP_DRAIN: Handler(VringState, Device._on_get_vring_base_skip_drain),
    R.SET_VRING_KICK: Handler(U64, Device._on_set_vring_kick),
    R.SET_VRING_CALL: Handler(U64, Device._on_set_vring_call),
    R.SET_VRING_ERR: Handler(U64, Device._on_set_vring_err),
    R.SET_VRING_ENABLE: Handler(VringState, Device._on_set_vring_enable),
}


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


__all__ = [
    "FLAG_NEED_REPLY",
    "HANDLERS",
    "RING_TRANSITIONS",
    "AnyHandler",
    "BackendOptions",
    "ConnectionFatal",
    "Device",
    "FdWatcher",
    "Handler",
    "Request",
    "RequestError",
    "RingEvent",
    "RingPhase",
    "RingTransitionError",
    "VirtQueue",
]
