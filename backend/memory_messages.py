"""The memory-side messages of one connection: the memory table (SET_MEM_TABLE, ADD/REM_MEM_REG),
postcopy, dirty logging, device state transfer and the in-flight region.
"""

from __future__ import annotations

import contextlib
import os

from vhost_conformance.backend import device_state
from vhost_conformance.backend.core import (
    MAX_QUEUE_SIZE,
    ConnectionFatal,
    RequestError,
    _close,
    log,
)
from vhost_conformance.backend.inflight import (
    queue_region_size,
    queue_region_stride,
)
from vhost_conformance.backend.memory import DirtyLog, GuestMemoryError
from vhost_conformance.backend.postcopy import (
    UserfaultError,
    mapping_address,
    open_userfaultfd,
    register,
    unregister,
)
from vhost_conformance.backend.ring_io import RingIo
from vhost_conformance.backend.vring import RingError
from vhost_conformance.frontend.protocol import (
    U64,
    DeviceStateTransfer,
    Inflight,
    LogBase,
    MemoryRegion,
    MemoryTable,
    Message,
    ProtocolFeature,
    SingleMemoryRegion,
)


class MemoryMessages(RingIo):
    """Memory, postcopy, logging, device state and in-flight handlers."""

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
