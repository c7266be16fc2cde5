"""One front-end connection of the reference vhost-user-blk back-end: the message dispatch
(:class:`Device`, one table of handlers typed per message: :data:`HANDLERS`) on top of
the memory-side handlers (``memory_messages.py``), rings and I/O (``ring_io.py``) and the
connection's state (``core.py``); a ring's phase is one transition table (``queue.py``).

No sockets here: :class:`Device` takes decoded messages (:meth:`Device.handle`), kicks
(:meth:`Device.kick`) and the passing of time (:meth:`Device.turn`), and leaves what to
send in :attr:`Device.outbox`. The server (``server.py``) owns the sockets and the
event loop; the kick eventfds are watched through the ``FdWatcher`` it passes in.

A request's life: popped from the ring and marked in the in-flight region, then held
until ``now + latency`` (cancellable until then: nothing of it touched guest memory or
the disk), then executed (disk <-> guest buffers, status byte), then completed with the
other requests of the same event-loop turn as one batch (used ring, region, one
notification). References: vhost-user.rst (QEMU 11.1.3) sections named in comments;
SPEC-DIGEST.md; QEMU-TRACES.md.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import NoneType
from typing import Generic, Protocol, TypeVar

from vhost_conformance.backend import blk
from vhost_conformance.backend.core import (
    MAX_QUEUE_SIZE,
    STATUS_DEVICE_NEEDS_RESET,
    ConnectionFatal,
    R,
    RequestError,
    _close,
    log,
)
from vhost_conformance.backend.memory import GuestMemoryError
from vhost_conformance.backend.memory_messages import MemoryMessages
from vhost_conformance.backend.queue import RingEvent, VirtQueue
from vhost_conformance.backend.vring import RingError, SplitRing
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
    MemoryTable,
    Message,
    ProtocolFeature,
    SingleMemoryRegion,
    VirtioFeature,
    VringAddr,
    VringState,
    expected_fd_count,
    expects_ack,
    has,
    split_packed_base,
)

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


class Device(MemoryMessages):
    """The state of one connection (see the module docstring)."""

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
