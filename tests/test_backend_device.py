"""The back-end's message state machine and ring processing, in process (no socket):
messages go to Device.handle, kicks to Device.kick, time to Device.turn. The guest side is
the front-end library's memory and split virtqueue (raw access for hostile chains)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from vhost_conformance.backend.core import ConnectionFatal
from vhost_conformance.backend.device import Device
from vhost_conformance.backend.disk import Disk
from vhost_conformance.backend.options import BackendOptions
from vhost_conformance.frontend.memory import DirtyLog, GuestMemory
from vhost_conformance.frontend.protocol import (
    FLAG_NEED_REPLY,
    U64,
    VERSION,
    VRING_F_LOG,
    Config,
    FrontendRequest,
    Inflight,
    LogBase,
    Message,
    MessageParser,
    ProtocolFeature,
    SingleMemoryRegion,
    VirtioFeature,
    VringAddr,
    VringState,
)
from vhost_conformance.frontend.virtqueue import PackedVirtqueue, SplitVirtqueue

F = FrontendRequest
NEXT, WRITE, INDIRECT = 1, 2, 4
QSIZE = 16


class Harness:
    """A Device plus guest memory, one split queue and its eventfds."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        read_only: bool = False,
        event_idx: bool = False,
        packed: bool = False,
    ) -> None:
        self.disk = Disk.ram(1 << 20, read_only=read_only)
        self.now = 0.0
        self.dev = Device(
            BackendOptions(latency=latency, read_only=read_only), self.disk, clock=lambda: self.now
        )
        self.mem = GuestMemory.simple(4 << 20)
        self.packed = packed
        self.vq: SplitVirtqueue | PackedVirtqueue = (
            PackedVirtqueue(self.mem, 0, QSIZE, event_idx=event_idx, indirect=True)
            if packed
            else SplitVirtqueue(self.mem, 0, QSIZE, event_idx=event_idx, indirect=True)
        )
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.err_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.event_idx = event_idx
        self.inflight_fd = -1

    def send(
        self,
        request: int,
        payload: object = None,
        fds: tuple[int, ...] = (),
        need_reply: bool = False,
    ) -> list[Message]:
        """Handle one message; return the replies it produced (fds are dup'ed: the device
        owns what it gets)."""
        data = b"" if payload is None else payload.encode()  # type: ignore[attr-defined]
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        self.dev.handle(Message(int(request), flags, data, tuple(os.dup(fd) for fd in fds)))
        return self.take_replies()

    def take_replies(self) -> list[Message]:
        parser = MessageParser()
        out: list[Message] = []
        for data, fds in self.dev.outbox:
            parser.feed(data, fds)
            msg = parser.next_message()
            assert msg is not None
            out.append(msg)
        self.dev.outbox.clear()
        return out

    def connect(self, protocol: int | None = None, features: int | None = None) -> None:
        offered = U64.decode(self.send(F.GET_FEATURES)[0].payload).value
        proto = U64.decode(self.send(F.GET_PROTOCOL_FEATURES)[0].payload).value
        self.send(F.SET_PROTOCOL_FEATURES, U64(proto if protocol is None else protocol))
        self.send(F.SET_OWNER)
        want = offered & ~(1 << VirtioFeature.LOG_ALL)
        if not self.packed:
            want &= ~(1 << VirtioFeature.RING_PACKED)
        if not self.event_idx:
            want &= ~(1 << VirtioFeature.RING_EVENT_IDX)
        self.send(F.SET_FEATURES, U64(want if features is None else features))

    def start(self, base: int = 0, enable: bool = True) -> None:
        proto = self.dev.protocol_features
        if proto >> ProtocolFeature.INFLIGHT_SHMFD & 1:
            reply = self.send(F.GET_INFLIGHT_FD, Inflight(0, 0, 1, QSIZE))[0]
            info = Inflight.decode(reply.payload)
            self.inflight_fd = reply.fds[0]
            self.send(F.SET_INFLIGHT_FD, info, (self.inflight_fd,))
        for region, fd in zip(self.mem.memory_regions(), self.mem.fds(), strict=True):
            self.send(F.ADD_MEM_REG, SingleMemoryRegion(region), (fd,))
        self.send(F.SET_VRING_CALL, U64(0), (self.call_fd,))
        self.send(F.SET_VRING_ERR, U64(0), (self.err_fd,))
        self.send(F.SET_VRING_NUM, VringState(0, QSIZE))
        self.send(F.SET_VRING_BASE, VringState(0, 0x80008000 if self.packed else base))
        self.send(F.SET_VRING_ADDR, self.vq.vring_addr())
        kick = os.eventfd(0)
        self.send(F.SET_VRING_KICK, U64(0), (kick,))
        os.close(kick)
        if enable:
            self.send(F.SET_VRING_ENABLE, VringState(0, 1))

    def request(
        self, rtype: int, sector: int, *, data: bytes = b"", in_len: int = 0
    ) -> tuple[int, int]:
        """Build a well-formed request chain; returns (head, status gpa)."""
        hdr = self.mem.alloc(16)
        self.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        status = self.mem.alloc(1)
        self.mem.write(status, b"\xff")
        descs: list[tuple[int, int, int]] = [(hdr, 16, 0)]
        if data:
            buf = self.mem.alloc(len(data))
            self.mem.write(buf, data)
            descs.append((buf, len(data), 0))
        if in_len:
            descs.append((self.mem.alloc(in_len), in_len, WRITE))
        descs.append((status, 1, WRITE))
        ids = self.vq.take_descriptors(len(descs))
        for k, (addr, n, fl) in enumerate(descs):
            last = k == len(descs) - 1
            self.vq.write_desc(
                ids[k], addr, n, fl | (0 if last else NEXT), 0 if last else ids[k + 1]
            )
        self.vq.push_avail(ids[0])
        self.vq.set_avail_idx(self.vq._avail_idx)  # type: ignore[attr-defined]
        return ids[0], status

    def push(self, head: int) -> None:
        self.vq.push_avail(head)
        self.vq.set_avail_idx(self.vq._avail_idx)  # type: ignore[attr-defined]

    def run(self) -> None:
        self.dev.kick(0)
        self.dev.turn(self.now)

    def used(self, slot: int) -> tuple[int, int]:
        return struct.unpack("<II", self.mem.read(self.vq.used_gpa + 4 + 8 * slot, 8))

    def status(self) -> int:
        reply = self.send(F.GET_STATUS)
        return U64.decode(reply[0].payload).value

    def close(self) -> None:
        self.dev.close()
        self.disk.close()
        for fd in (self.call_fd, self.err_fd, self.inflight_fd):
            if fd >= 0:
                os.close(fd)
        self.mem.close()


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.close()


def _eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# ------------------------------------------------------------------------ messages


def test_offers(h: Harness) -> None:
    features = U64.decode(h.send(F.GET_FEATURES)[0].payload).value
    for bit in (32, 34, 28, 29, 26, 30, 2, 6, 9, 10, 11, 12, 13, 14):
        assert features >> bit & 1, bit
    assert not features >> 5 & 1  # RO only with --read-only
    proto = U64.decode(h.send(F.GET_PROTOCOL_FEATURES)[0].payload).value
    assert proto == sum(1 << b for b in (0, 1, 3, 5, 8, 9, 12, 13, 15, 16, 19, 20, 23))


def test_reply_ack_exactly_as_the_spec(h: Harness) -> None:
    # Before REPLY_ACK is negotiated NEED_REPLY gets nothing extra.
    assert h.send(F.SET_OWNER, need_reply=True) == []
    h.send(F.SET_PROTOCOL_FEATURES, U64(1 << ProtocolFeature.REPLY_ACK))
    replies = h.send(F.SET_VRING_NUM, VringState(0, 8), need_reply=True)
    assert [(r.request, r.flags, r.payload) for r in replies] == [
        (F.SET_VRING_NUM, 5, U64(0).encode())
    ]
    # A defined reply is not doubled by an ack.
    replies = h.send(F.GET_FEATURES, need_reply=True)
    assert len(replies) == 1 and replies[0].flags == 5 and len(replies[0].payload) == 8
    # A failure is acked with non-zero.
    replies = h.send(F.SET_VRING_NUM, VringState(0, 7), need_reply=True)
    assert U64.decode(replies[0].payload).value != 0


def test_messages_before_set_owner_close_the_connection(h: Harness) -> None:
    with pytest.raises(ConnectionFatal, match="before SET_OWNER"):
        h.send(F.SET_VRING_NUM, VringState(0, 8))


def test_protocol_feature_20_needs_12(h: Harness) -> None:
    with pytest.raises(ConnectionFatal, match="without INFLIGHT_SHMFD"):
        h.send(F.SET_PROTOCOL_FEATURES, U64(1 << 20))


def test_config_space(h: Harness) -> None:
    h.connect()
    reply = h.send(F.GET_CONFIG, Config.request(0, 57))[0]
    cfg = Config.decode(reply.payload)
    assert cfg.size == 57
    assert struct.unpack_from("<Q", cfg.data)[0] == (1 << 20) // 512
    assert struct.unpack_from("<I", cfg.data, 20)[0] == 512
    assert cfg.data[32] == 1 and struct.unpack_from("<H", cfg.data, 34)[0] == 1
    # wce is writable; capacity is not, unless for migration.
    h.send(F.SET_CONFIG, Config(32, 1, 0, b"\x00"), need_reply=True)
    assert h.dev.config.wce == 0
    nack = h.send(F.SET_CONFIG, Config(0, 8, 0, bytes(8)), need_reply=True)
    assert U64.decode(nack[0].payload).value != 0
    ok = h.send(F.SET_CONFIG, Config(0, 33, 1, bytes(32) + b"\x01"), need_reply=True)
    assert U64.decode(ok[0].payload).value == 0 and h.dev.config.wce == 1
    # Out of range: an empty reply (vhost-user.rst GET_CONFIG: size 0 = failure).
    assert h.send(F.GET_CONFIG, Config.request(0, 200))[0].payload == b""


def test_inflight_fd_is_zeroed_aligned_memfd(h: Harness) -> None:
    h.connect()
    reply = h.send(F.GET_INFLIGHT_FD, Inflight(0, 0, 2, 128))[0]
    assert len(reply.payload) == 24 and reply.flags == 5
    info = Inflight.decode(reply.payload)
    assert (info.mmap_size, info.mmap_offset, info.num_queues, info.queue_size) == (
        2 * 2112,
        0,
        2,
        128,
    )
    assert len(reply.fds) == 1
    assert os.fstat(reply.fds[0]).st_size == 2 * 2112
    assert os.pread(reply.fds[0], 4224, 0) == bytes(4224)
    os.close(reply.fds[0])


# ------------------------------------------------------------------------ data path


def test_write_read_get_id_and_vring_base(h: Harness) -> None:
    h.connect()
    h.start()
    _head, status = h.request(1, 2, data=b"\x5a" * 1024)
    h.run()
    assert h.mem.read(status, 1) == b"\x00"
    assert h.disk and os.pread(h.disk.fd, 1024, 1024) == b"\x5a" * 1024
    head, status = h.request(0, 2, in_len=512)
    h.run()
    assert h.used(1) == (head, 513) and h.mem.read(status, 1) == b"\x00"
    head, status = h.request(8, 0, in_len=20)
    h.run()
    assert h.used(2) == (head, 21)
    assert h.vq.used_idx_in_memory() == 3
    assert _eventfd_count(h.call_fd) >= 1
    # GET_VRING_BASE: the next avail index; twice the same; resume there (TEST-IDEAS 1).
    base = VringState.decode(h.send(F.GET_VRING_BASE, VringState(0, 0))[0].payload)
    assert base == VringState(0, 3)
    assert VringState.decode(h.send(F.GET_VRING_BASE, VringState(0, 0))[0].payload).num == 3


def test_unknown_type_unsupp_and_readonly_write_ioerr() -> None:
    h = Harness(read_only=True)
    try:
        h.connect()
        h.start()
        _head, status = h.request(77, 0, in_len=0)
        h.run()
        assert h.mem.read(status, 1) == b"\x02"
        _head, status = h.request(1, 0, data=bytes(512))
        h.run()
        assert h.mem.read(status, 1) == b"\x01"
        _head, status = h.request(0, (1 << 20) // 512, in_len=512)  # past the end
        h.run()
        assert h.mem.read(status, 1) == b"\x01"
    finally:
        h.close()


def test_kick_before_enable_is_not_lost(h: Harness) -> None:
    h.connect()
    h.start(enable=False)
    h.request(0, 0, in_len=512)
    h.run()
    assert h.vq.used_idx_in_memory() == 0  # disabled: nothing taken
    h.send(F.SET_VRING_ENABLE, VringState(0, 1))
    h.dev.turn(h.now)  # no new kick
    assert h.vq.used_idx_in_memory() == 1


def test_event_idx_avail_event_and_used_event() -> None:
    h = Harness(event_idx=True)
    try:
        h.connect()
        h.start()
        h.vq.set_used_event(5)
        h.request(0, 0, in_len=512)
        h.run()
        assert h.vq.avail_event == 1
        assert _eventfd_count(h.call_fd) == 0  # used_event 5 not reached
        h.vq.set_used_event(1)
        h.request(0, 0, in_len=512)
        h.run()
        assert _eventfd_count(h.call_fd) == 1
    finally:
        h.close()


def test_dirty_log_marks_data_status_and_used_ring(h: Harness) -> None:
    h.connect()
    h.start()
    log = DirtyLog.for_memory(h.mem)
    try:
        replies = h.send(F.SET_LOG_BASE, LogBase(log.mmap_size, 0), (log.fd,))
        assert [(r.flags, r.payload) for r in replies] == [(5, U64(0).encode())]
        h.send(F.SET_FEATURES, U64(h.dev.features | 1 << VirtioFeature.LOG_ALL), need_reply=True)
        addr = h.vq.vring_addr()
        h.send(
            F.SET_VRING_ADDR,
            VringAddr(
                0,
                VRING_F_LOG,
                addr.desc_user_addr,
                addr.used_user_addr,
                addr.avail_user_addr,
                h.vq.used_gpa,
            ),
        )
        _head, status = h.request(0, 0, in_len=4096 * 2)
        h.run()
        pages = log.dirty_pages()
        assert status // 4096 in pages
        assert h.vq.used_gpa // 4096 in pages
        assert len(pages) >= 3
    finally:
        log.close()


def test_latency_holds_and_drain_defers_the_reply() -> None:
    h = Harness(latency=0.5)
    try:
        h.connect(protocol=sum(1 << b for b in (0, 1, 3, 5, 9, 12, 13, 15, 16)))  # no bit 20
        h.start()
        h.request(0, 0, in_len=512)
        h.run()
        assert h.vq.used_idx_in_memory() == 0 and h.dev.next_deadline() == 0.5
        h.send(F.SET_VRING_ENABLE, VringState(0, 0))
        assert h.send(F.GET_VRING_BASE, VringState(0, 0)) == []  # draining
        assert h.send(F.GET_FEATURES) != []  # the control channel is still served
        h.now = 0.6
        h.dev.turn(h.now)
        assert h.vq.used_idx_in_memory() == 1
        assert VringState.decode(h.take_replies()[0].payload) == VringState(0, 1)
    finally:
        h.close()


#: what the reference back-end offers, as an 11.1.3 front-end agrees it (bit 23 masked off)
_UPTO_BIT_20 = sum(1 << b for b in (0, 1, 3, 5, 9, 12, 13, 15, 16, 20))


def test_bit20_suspends_and_marks_region() -> None:
    h = Harness(latency=0.5)
    try:
        h.connect(protocol=_UPTO_BIT_20)
        h.start()
        head, _status = h.request(0, 0, in_len=512)
        h.run()
        reply = h.send(F.GET_VRING_BASE, VringState(0, 0))
        assert VringState.decode(reply[0].payload) == VringState(0, 1)
        region = os.pread(h.inflight_fd, 16 + 16 * QSIZE, 0)
        assert region[16 + 16 * head] == 1
        h.now = 1.0
        h.dev.turn(h.now)
        assert h.vq.used_idx_in_memory() == 0  # suspended: no late write
        # Restart on the same region: resubmitted, completed once.
        kick = os.eventfd(0)
        h.send(F.SET_VRING_BASE, VringState(0, 1))
        h.send(F.SET_VRING_KICK, U64(0), (kick,))
        os.close(kick)
        h.dev.turn(h.now)
        h.now = 2.0
        h.dev.turn(h.now)
        assert h.vq.used_idx_in_memory() == 1 and h.used(0)[0] == head
        assert os.pread(h.inflight_fd, 1, 16 + 16 * head) == b"\x00"
    finally:
        h.close()


def test_skip_drain_suspends_records_and_replies_as_45() -> None:
    """The proposal's GET_VRING_BASE_SKIP_DRAIN (bit 23, message 45): suspend at once,
    record in the region, reply like GET_VRING_BASE under its own id."""
    h = Harness(latency=0.5)
    try:
        h.connect(protocol=_UPTO_BIT_20 | 1 << ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN)
        h.start()
        head, _status = h.request(0, 0, in_len=512)
        h.run()
        reply = h.send(F.GET_VRING_BASE_SKIP_DRAIN, VringState(0, 0))
        assert [(r.request, r.flags) for r in reply] == [(F.GET_VRING_BASE_SKIP_DRAIN, 5)]
        assert VringState.decode(reply[0].payload) == VringState(0, 1)
        assert os.pread(h.inflight_fd, 1, 16 + 16 * head) == b"\x01"
        h.now = 1.0
        h.dev.turn(h.now)
        assert h.vq.used_idx_in_memory() == 0  # suspended: no late write
    finally:
        h.close()


def test_with_bit_23_get_vring_base_drains() -> None:
    """Bit 23 agreed: the front-end follows the proposal, where only message 45 suspends."""
    h = Harness(latency=0.5)
    try:
        h.connect()
        h.start()
        h.request(0, 0, in_len=512)
        h.run()
        assert h.send(F.GET_VRING_BASE, VringState(0, 0)) == []  # draining
        h.now = 0.6
        h.dev.turn(h.now)
        replies = h.take_replies()
        assert [r.request for r in replies] == [F.GET_VRING_BASE]
        assert h.vq.used_idx_in_memory() == 1
    finally:
        h.close()


def test_skip_drain_needs_bit_23_and_bit_23_needs_20_and_12() -> None:
    h = Harness()
    try:
        h.connect(protocol=_UPTO_BIT_20)
        h.start()
        with pytest.raises(ConnectionFatal, match="without bit 23"):
            h.send(F.GET_VRING_BASE_SKIP_DRAIN, VringState(0, 0))
    finally:
        h.close()
    h = Harness()
    try:
        with pytest.raises(ConnectionFatal, match="without bits 20 and 12"):
            h.send(F.SET_PROTOCOL_FEATURES, U64(1 << 12 | 1 << 23))
    finally:
        h.close()


# ------------------------------------------------------------------------ hostile guest


def _expect_broken(h: Harness) -> None:
    h.run()
    assert h.vq.used_idx_in_memory() == 0
    assert h.status() & 0x40  # DEVICE_NEEDS_RESET
    assert _eventfd_count(h.err_fd) == 1
    # It stays stopped, answers GET_VRING_BASE, and does not crash on more kicks.
    h.run()
    assert h.send(F.GET_VRING_BASE, VringState(0, 0))


@pytest.mark.parametrize(
    "shape",
    [
        "loop",
        "next-out-of-range",
        "head-out-of-range",
        "indirect-bad-len",
        "nested-indirect",
        "avail-jump",
    ],
)
def test_hostile_chains_break_the_queue(h: Harness, shape: str) -> None:
    h.connect()
    h.start()
    hdr = h.mem.alloc(16)
    if shape == "loop":
        h.vq.write_desc(0, hdr, 16, NEXT, 1)
        h.vq.write_desc(1, hdr, 16, NEXT, 0)
        h.push(0)
    elif shape == "next-out-of-range":
        h.vq.write_desc(0, hdr, 16, NEXT, 100)
        h.push(0)
    elif shape == "head-out-of-range":
        h.push(100)
    elif shape == "indirect-bad-len":
        h.vq.write_desc(0, h.mem.alloc(64), 24, INDIRECT, 0)
        h.push(0)
    elif shape == "nested-indirect":
        table = h.mem.alloc(32)
        inner = h.mem.alloc(32)
        h.mem.write(table, struct.pack("<QIHH", inner, 32, INDIRECT, 0) + bytes(16))
        h.vq.write_desc(0, table, 32, INDIRECT, 0)
        h.push(0)
    else:
        h.vq.set_avail_idx(QSIZE + 1)
    _expect_broken(h)


@pytest.mark.parametrize("shape", ["readable-after-writable", "unmapped-data", "short-header"])
def test_bad_requests_with_a_safe_status_byte_get_ioerr(h: Harness, shape: str) -> None:
    h.connect()
    h.start()
    hdr = h.mem.alloc(16)
    h.mem.write(hdr, struct.pack("<IIQ", 0, 0, 0))
    data = h.mem.alloc(512)
    status = h.mem.alloc(1)
    if shape == "readable-after-writable":
        h.vq.write_desc(0, hdr, 16, NEXT, 1)
        h.vq.write_desc(1, data, 512, WRITE | NEXT, 2)
        h.vq.write_desc(2, hdr, 16, NEXT, 3)
        h.vq.write_desc(3, status, 1, WRITE, 0)
    elif shape == "unmapped-data":
        h.vq.write_desc(0, hdr, 16, NEXT, 1)
        h.vq.write_desc(1, 1 << 40, 512, WRITE | NEXT, 2)
        h.vq.write_desc(2, status, 1, WRITE, 0)
    else:
        h.vq.write_desc(0, hdr, 8, NEXT, 1)
        h.vq.write_desc(1, status, 1, WRITE, 0)
    h.push(0)
    h.run()
    assert h.vq.used_idx_in_memory() == 1
    assert h.used(0) == (0, 1)
    assert h.mem.read(status, 1) == b"\x01"
    assert not h.status() & 0x40


def test_indirect_request(h: Harness) -> None:
    h.connect()
    h.start()
    hdr = h.mem.alloc(16)
    h.mem.write(hdr, struct.pack("<IIQ", 0, 0, 0))
    data = h.mem.alloc(1024)
    status = h.mem.alloc(1)
    table = h.mem.alloc(48)
    h.mem.write(
        table,
        struct.pack("<QIHH", hdr, 16, NEXT, 1)
        + struct.pack("<QIHH", data, 1024, WRITE | NEXT, 2)
        + struct.pack("<QIHH", status, 1, WRITE, 0),
    )
    h.vq.write_desc(0, table, 48, INDIRECT, 0)
    h.push(0)
    h.run()
    assert h.used(0) == (0, 1025) and h.mem.read(status, 1) == b"\x00"


# ------------------------------------------------------------------------ property


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_desc = st.tuples(
    st.sampled_from(["hdr", "data", "status", "unmapped", "table"]),
    st.integers(0, 4200),
    st.integers(0, 7),
    st.integers(0, QSIZE + 2),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    descs=st.lists(_desc, min_size=QSIZE, max_size=QSIZE),
    heads=st.lists(st.integers(0, QSIZE + 1), min_size=1, max_size=QSIZE),
    avail_jump=st.booleans(),
)
def test_random_descriptor_tables_never_crash_or_hang(
    descs: list[tuple[str, int, int, int]], heads: list[int], avail_jump: bool
) -> None:
    """Whatever the guest writes, a turn returns; each taken head is either completed with a
    status byte or the queue is marked as needing reset (TEST-IDEAS 17)."""
    h = Harness()
    try:
        h.connect()
        h.start()
        hdr = h.mem.alloc(16)
        h.mem.write(hdr, struct.pack("<IIQ", 0, 0, 0))
        data = h.mem.alloc(8192)
        status = h.mem.alloc(16)
        table = h.mem.alloc(64)
        h.mem.write(
            table,
            struct.pack("<QIHH", hdr, 16, NEXT, 1)
            + struct.pack("<QIHH", status, 1, WRITE, 0)
            + bytes(32),
        )
        where = {"hdr": hdr, "data": data, "status": status, "unmapped": 1 << 44, "table": table}
        for i, (kind, length, flags, nxt) in enumerate(descs):
            h.vq.write_desc(i, where[kind], length, flags, nxt)
        for head in heads:
            h.vq.push_avail(head)
        h.vq.set_avail_idx(QSIZE * 3 if avail_jump else h.vq._avail_idx)  # type: ignore[attr-defined]
        h.run()
        h.run()
        used = h.vq.used_idx_in_memory()
        broken = bool(h.status() & 0x40)
        assert used <= len(heads)
        assert broken or used == len(heads)
        assert h.send(F.GET_VRING_BASE, VringState(0, 0))
    finally:
        h.close()


@settings(max_examples=60, deadline=None)
@given(
    descs=st.lists(
        st.tuples(
            st.sampled_from(["hdr", "data", "status", "unmapped", "table"]),
            st.integers(0, 4200),
            st.sampled_from([0, 1, 2, 3, 4, 5, 6, 0x80, 0x81, 0x82, 0x83, 0x84, 0x8000, 0x8080]),
            st.integers(0, 0xFFFF),
        ),
        min_size=1,
        max_size=QSIZE,
    )
)
def test_random_packed_rings_never_crash_or_hang(descs: list[tuple[str, int, int, int]]) -> None:
    """Packed: whatever the guest writes, turns return, completions are well-formed used
    entries or the queue needs reset, and the control channel still answers."""
    h = Harness(packed=True)
    try:
        h.connect()
        h.start()
        hdr = h.mem.alloc(16)
        h.mem.write(hdr, struct.pack("<IIQ", 0, 0, 0))
        data = h.mem.alloc(8192)
        status = h.mem.alloc(16)
        table = h.mem.alloc(64)
        h.mem.write(
            table, struct.pack("<QIHH", hdr, 16, 0, 0) + struct.pack("<QIHH", status, 1, 0, WRITE)
        )
        where = {"hdr": hdr, "data": data, "status": status, "unmapped": 1 << 44, "table": table}
        for i, (kind, length, flags, bid) in enumerate(descs):
            h.vq.write_desc(i, where[kind], length, flags, bid)
        h.run()
        h.run()
        assert h.status() >= 0
        reply = h.send(F.GET_VRING_BASE, VringState(0, 0))
        assert len(reply) == 1 and len(reply[0].payload) == 8
    finally:
        h.close()


def test_fail_rate_injects_ioerr_reproducibly() -> None:
    from vhost_conformance.backend.faults import Faults

    statuses = []
    for _ in range(2):
        h = Harness()
        h.dev.faults = Faults(fail_rate=0.5, seed=7)
        try:
            h.connect()
            h.start()
            got = []
            for _i in range(5):
                _head, status = h.request(0, 0, in_len=512)
                h.run()
                got.append(h.mem.read(status, 1)[0])
            statuses.append(got)
        finally:
            h.close()
    assert statuses[0] == statuses[1]
    assert set(statuses[0]) == {0, 1}


def test_device_state_save_load_and_refusal(h: Harness) -> None:
    """DEVICE_STATE (bit 19): save writes VCSTATE1 + JSON to the front-end's pipe and closes
    it; a load of that state checks 0, a load of garbage checks 1; an undefined direction is
    refused with bit 8 set and no fd (never an error and an fd at once)."""
    from vhost_conformance.frontend.protocol import DeviceStateTransfer

    h.connect()
    nofd = 1 << 8
    r, w = os.pipe()
    reply = h.send(F.SET_DEVICE_STATE_FD, DeviceStateTransfer(0, 0), fds=(w,))[0]
    os.close(w)
    assert U64.decode(reply.payload).value == nofd and not reply.fds
    state = os.read(r, 4096)
    assert state.startswith(b"VCSTATE1") and os.read(r, 10) == b""
    os.close(r)
    assert U64.decode(h.send(F.CHECK_DEVICE_STATE)[0].payload).value == 0
    for data, result in ((state, 0), (b"garbage", 1)):
        r, w = os.pipe()
        reply = h.send(F.SET_DEVICE_STATE_FD, DeviceStateTransfer(1, 0), fds=(r,))[0]
        os.close(r)
        assert U64.decode(reply.payload).value == nofd
        os.write(w, data)
        os.close(w)
        assert U64.decode(h.send(F.CHECK_DEVICE_STATE)[0].payload).value == result
    r, w = os.pipe()
    reply = h.send(F.SET_DEVICE_STATE_FD, DeviceStateTransfer(2, 0), fds=(w,))[0]
    os.close(r)
    os.close(w)
    value = U64.decode(reply.payload).value
    assert value & 0xFF and value & nofd and not reply.fds
