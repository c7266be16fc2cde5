"""Tests of the transport against a tiny in-test fake back-end (a thread on a socketpair)."""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vhost_conformance.frontend import protocol as p
from vhost_conformance.frontend.channel import (
    BackendChannel,
    BackendClosed,
    BackendError,
    BackendHang,
    BackendNack,
    BackendReply,
    BackendViolation,
    Channel,
    FrontendUsageError,
    WireTrace,
    qemu_need_reply,
)

F = p.FrontendRequest
B = p.BackendRequest
REPLY_ACK = 1 << p.ProtocolFeature.REPLY_ACK
TRACE = Path("/work/shared/data/qemu-11.1.3/boot-io-poweroff-qsd.jsonl")

Script = Callable[[p.Message], list[tuple[bytes, list[int]]] | None]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def recv_message(sock: socket.socket, parser: p.MessageParser, timeout: float) -> p.Message | None:
    """The fake back-end's reader: one message with its fds, None at EOF."""
    deadline = time.monotonic() + timeout
    while (m := parser.next_message()) is None:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        data, anc, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
        fds: list[int] = []
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(raw[: len(raw) - len(raw) % 4])
                fds.extend(arr)
        if not data:
            return None
        parser.feed(data, fds)
    return m


class FakeBackend:
    """Answers each front-end message by ``script`` (a list of (bytes, fds) to send back;
    None closes the connection). Records what it received; closes received fds itself
    unless ``keep_fds``."""

    def __init__(self, sock: socket.socket, script: Script, *, keep_fds: bool = False) -> None:
        self.sock = sock
        self.script = script
        self.keep_fds = keep_fds
        self.received: list[p.Message] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        parser = p.MessageParser()
        try:
            while True:
                m = recv_message(self.sock, parser, timeout=5.0)
                if m is None:
                    return
                self.received.append(m)
                out = self.script(m)
                if not self.keep_fds:
                    for fd in m.fds:
                        os.close(fd)
                if out is None:
                    self.sock.close()
                    return
                for data, fds in out:
                    send_with_fds(self.sock, data, fds)
        except (OSError, p.ProtocolError) as exc:
            self.error = exc

    def join(self) -> None:
        self.thread.join(5.0)
        assert not self.thread.is_alive()


@pytest.fixture
def pair() -> Iterator[tuple[Channel, socket.socket]]:
    fe, be = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = Channel(fe)
    yield channel, be
    channel.close()
    # wakes a fake back-end blocked in recvmsg (EOF), so its thread ends now
    with contextlib.suppress(OSError):
        be.shutdown(socket.SHUT_RDWR)
    be.close()


def ack(request: int, status: int = 0) -> list[tuple[bytes, list[int]]]:
    return [(p.encode_reply(request, p.U64(status)), [])]


# ------------------------------------------------------------------------------------------
# fds both ways


def test_fd_crosses_to_backend(pair: tuple[Channel, socket.socket]) -> None:
    channel, be = pair
    fake = FakeBackend(be, lambda m: [], keep_fds=True)
    memfd = os.memfd_create("kick-test")
    os.write(memfd, b"vhost")
    channel.send(F.SET_VRING_KICK, p.U64(0), fds=[memfd])
    channel.send(F.SET_OWNER)
    deadline = time.monotonic() + 5
    while len(fake.received) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    kick, owner = fake.received
    assert kick.request == F.SET_VRING_KICK and len(kick.fds) == 1 and owner.fds == ()
    assert os.pread(kick.fds[0], 5, 0) == b"vhost"
    assert os.fstat(kick.fds[0]).st_ino == os.fstat(memfd).st_ino
    os.close(kick.fds[0])
    os.close(memfd)


def test_fd_crosses_back_in_reply(pair: tuple[Channel, socket.socket]) -> None:
    channel, be = pair
    region = os.memfd_create("inflight-test")
    os.write(region, b"\x01" * 64)

    def script(m: p.Message) -> list[tuple[bytes, list[int]]]:
        assert m.decoded() == p.Inflight(0, 0, 1, 128)
        return [(p.encode_reply(F.GET_INFLIGHT_FD, p.Inflight(4096, 0, 1, 128)), [region])]

    FakeBackend(be, script)
    reply = channel.call(F.GET_INFLIGHT_FD, p.Inflight(0, 0, 1, 128), timeout=2)
    assert reply is not None and reply.decoded() == p.Inflight(4096, 0, 1, 128)
    assert len(reply.fds) == 1
    assert os.pread(reply.fds[0], 4, 0) == b"\x01" * 4
    os.close(reply.fds[0])
    os.close(region)


# ------------------------------------------------------------------------------------------
# Replies and REPLY_ACK


def test_call_defined_reply(pair: tuple[Channel, socket.socket]) -> None:
    channel, be = pair
    FakeBackend(be, lambda m: [(p.encode_reply(F.GET_FEATURES, p.U64(0x175007E44)), [])])
    reply = channel.call(F.GET_FEATURES, timeout=2)
    assert reply is not None and reply.decoded() == p.U64(0x175007E44)
    entries = channel.trace.entries()
    assert [(e.direction, e.name, e.flags, e.size) for e in entries] == [
        ("fe->be", "GET_FEATURES", 0x1, 0),
        ("be->fe", "GET_FEATURES", 0x5, 8),
    ]
    assert entries[1].payload is not None and "VERSION_1" in entries[1].payload["names"]  # type: ignore[operator]


def test_reply_ack(pair: tuple[Channel, socket.socket]) -> None:
    channel, be = pair
    fake = FakeBackend(be, lambda m: ack(m.request) if m.need_reply else [])
    channel.protocol_features = REPLY_ACK
    call_fd = os.eventfd(0)
    try:
        reply = channel.call(F.SET_VRING_CALL, p.U64(0), fds=[call_fd], timeout=2)
        assert reply is not None and reply.decoded() == p.U64(0) and reply.flags == 0x5
        assert fake.received[-1].flags == 0x9  # QEMU's choice: NEED_REPLY on SET_VRING_CALL
        # QEMU sends SET_VRING_NUM without NEED_REPLY: nothing to wait for
        assert channel.call(F.SET_VRING_NUM, p.VringState(0, 128), timeout=2) is None
        assert channel.call(F.SET_VRING_NUM, p.VringState(0, 128), need_reply=True, timeout=2)
    finally:
        os.close(call_fd)


def test_no_ack_without_reply_ack_feature(pair: tuple[Channel, socket.socket]) -> None:
    channel, be = pair
    fake = FakeBackend(be, lambda m: [])  # a back-end that never acks
    start = time.monotonic()
    assert channel.call(F.SET_VRING_ENABLE, p.VringState(0, 1), need_reply=True, timeout=2) is None
    assert time.monotonic() - start < 0.5
    deadline = time.monotonic() + 2
    while not fake.received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.received[0].flags == 0x9


def test_nack(pair: tuple[Channel, socket.socket]) -> None:
    channel, be = pair
    FakeBackend(be, lambda m: ack(m.request, 22))
    channel.protocol_features = REPLY_ACK
    with pytest.raises(BackendNack) as info:
        channel.call(F.SET_VRING_ENABLE, p.VringState(0, 1), timeout=2)
    assert info.value.status == 22 and info.value.request_name == "SET_VRING_ENABLE"
    assert "0x16" in str(info.value)


# ------------------------------------------------------------------------------------------
# Hangs, EOF, violations


@pytest.mark.parametrize("timeout", [0.2, 0.5])
def test_timeout_raises_hang_within_deadline(
    pair: tuple[Channel, socket.socket], timeout: float
) -> None:
    channel, be = pair
    FakeBackend(be, lambda m: [])
    start = time.monotonic()
    with pytest.raises(BackendHang) as info:
        channel.call(F.GET_VRING_BASE, p.VringState(0, 0), timeout=timeout)
    elapsed = time.monotonic() - start
    assert timeout <= elapsed < timeout + 0.5  # margin for a loaded 2-core machine
    assert info.value.request_name == "GET_VRING_BASE"
    assert info.value.timeout == timeout
    assert f"{timeout:.3f} s" in str(info.value)


def test_partial_reply_hangs(pair: tuple[Channel, socket.socket]) -> None:
    channel, be = pair
    FakeBackend(be, lambda m: [(p.encode_reply(F.GET_FEATURES, p.U64(1))[:15], [])])
    with pytest.raises(BackendHang, match="had 3 of 8 bytes"):
        channel.call(F.GET_FEATURES, timeout=0.3)


def test_eof_raises_closed(pair: tuple[Channel, socket.socket]) -> None:
    channel, be = pair
    FakeBackend(be, lambda m: None)
    start = time.monotonic()
    with pytest.raises(BackendClosed) as info:
        channel.call(F.GET_PROTOCOL_FEATURES, timeout=5)
    assert time.monotonic() - start < 1
    assert info.value.request_name == "GET_PROTOCOL_FEATURES"
    assert "EOF" in str(info.value)
    # sending on the dead connection: also BackendClosed (EPIPE), not a bare OSError
    with pytest.raises(BackendClosed):
        for _ in range(100):
            channel.send(F.SET_OWNER)


def test_eof_midway(pair: tuple[Channel, socket.socket]) -> None:
    channel, be = pair

    def script(m: p.Message) -> list[tuple[bytes, list[int]]] | None:
        be.sendall(p.encode_reply(F.GET_FEATURES, p.U64(1))[:6])
        return None

    FakeBackend(be, script)
    with pytest.raises(BackendClosed, match="after 6 of 12 bytes"):
        channel.call(F.GET_FEATURES, timeout=2)


@pytest.mark.parametrize(
    ("reply", "what", "expected", "seen"),
    [
        (p.Message(1, 0xD, bytes(8)).encode(), "reply flags", "0x5", "0xd"),
        (p.Message(1, 0x1, bytes(8)).encode(), "reply flags", "0x5", "0x1"),
        (p.encode_reply(F.GET_PROTOCOL_FEATURES, p.U64(0)), "reply request id", "1 (GET_FEATURES)",
         "15 (GET_PROTOCOL_FEATURES)"),
        (p.encode_reply(F.GET_FEATURES, bytes(4)), "reply size", "8 bytes", "4 bytes"),
    ],
)  # fmt: skip
def test_bad_reply_raises_violation(
    pair: tuple[Channel, socket.socket], reply: bytes, what: str, expected: str, seen: str
) -> None:
    channel, be = pair
    FakeBackend(be, lambda m: [(reply, [])])
    with pytest.raises(BackendViolation) as info:
        channel.call(F.GET_FEATURES, timeout=2)
    err = info.value
    assert (err.what, err.expected, err.seen) == (what, expected, seen)
    assert err.request_name == "GET_FEATURES"
    assert isinstance(err, BackendError) and isinstance(err, p.ProtocolError)


def test_inflight_reply_must_be_24_bytes(pair: tuple[Channel, socket.socket]) -> None:
    channel, be = pair
    packed = p.Inflight(0, 0, 1, 128).encode()[:20]
    FakeBackend(be, lambda m: [(p.encode_reply(F.GET_INFLIGHT_FD, packed), [])])
    with pytest.raises(BackendViolation) as info:
        channel.call(F.GET_INFLIGHT_FD, p.Inflight(0, 0, 1, 128), timeout=2)
    assert (info.value.expected, info.value.seen) == ("24 bytes", "20 bytes")


def test_get_config_reply_size_must_match_request(pair: tuple[Channel, socket.socket]) -> None:
    channel, be = pair
    FakeBackend(be, lambda m: [(p.encode_reply(F.GET_CONFIG, p.Config(0, 36, 0, bytes(36))), [])])
    with pytest.raises(BackendViolation) as info:
        channel.call(F.GET_CONFIG, p.Config.request(0, 57), timeout=2)
    assert (info.value.expected, info.value.seen) == ("69 bytes", "48 bytes")


def test_oversized_reply_header(pair: tuple[Channel, socket.socket]) -> None:
    channel, be = pair
    FakeBackend(be, lambda m: [(p.Header(1, 5, 5000).encode(), [])])
    with pytest.raises(BackendViolation) as info:
        channel.call(F.GET_FEATURES, timeout=2)
    assert info.value.seen == "5000 bytes"


# ------------------------------------------------------------------------------------------
# fd hygiene and misuse


def test_surplus_fds_not_leaked(pair: tuple[Channel, socket.socket]) -> None:
    channel, be = pair
    channel.protocol_features = REPLY_ACK
    extra = [os.eventfd(0) for _ in range(3)]

    def script(m: p.Message) -> list[tuple[bytes, list[int]]]:
        return [(p.encode_reply(m.request, p.U64(0)), extra)]

    FakeBackend(be, script)
    kick = os.eventfd(0)
    before = open_fds()
    for _ in range(5):
        reply = channel.call(F.SET_VRING_KICK, p.U64(0), fds=[kick], timeout=2)
        assert reply is not None and reply.fds == ()
        assert channel.last_surplus_fds == 3
    assert open_fds() == before
    assert "3 surplus fds closed" in channel.trace.format()
    assert channel.trace.entries()[-1].nfds == 3

    # without close_surplus_fds the caller gets them (and owns them)
    reply = channel.call(F.SET_VRING_KICK, p.U64(0), fds=[kick], timeout=2, close_surplus_fds=False)
    assert reply is not None and len(reply.fds) == 3
    assert open_fds() == before + 3
    for fd in reply.fds:
        os.close(fd)
    assert open_fds() == before
    for fd in [*extra, kick]:
        os.close(fd)


def test_fds_closed_on_violation(pair: tuple[Channel, socket.socket]) -> None:
    channel, be = pair
    region = os.memfd_create("bad-reply")
    FakeBackend(be, lambda m: [(p.Message(F.GET_INFLIGHT_FD, 0xD, bytes(24)).encode(), [region])])
    before = open_fds()
    with pytest.raises(BackendViolation):
        channel.call(F.GET_INFLIGHT_FD, p.Inflight(0, 0, 1, 128), timeout=2)
    assert open_fds() == before
    os.close(region)


def test_usage_errors(pair: tuple[Channel, socket.socket]) -> None:
    channel, _be = pair
    fd = os.eventfd(0)
    try:
        with pytest.raises(FrontendUsageError, match="SET_VRING_KICK carries 1 fds"):
            channel.send(F.SET_VRING_KICK, p.U64(0))
        with pytest.raises(FrontendUsageError, match="0 fds"):
            channel.send(F.SET_VRING_KICK, p.U64(0x100), fds=[fd])
        with pytest.raises(FrontendUsageError, match="SET_VRING_NUM"):
            channel.send(F.SET_VRING_NUM, p.VringState(0, 1), fds=[fd])
        with pytest.raises(FrontendUsageError, match="request id 99"):
            channel.send(99)
        with pytest.raises(FrontendUsageError, match="2057 bytes"):
            channel.send(F.SET_CONFIG, bytes(2057))
        assert not issubclass(FrontendUsageError, p.ProtocolError)
        assert len(channel.trace) == 0
        channel.close()
        with pytest.raises(FrontendUsageError, match="closed"):
            channel.send(F.SET_OWNER)
    finally:
        os.close(fd)


def test_send_raw_reaches_backend(pair: tuple[Channel, socket.socket]) -> None:
    channel, be = pair
    channel.send_raw(p.Header(8, 0x1, 4).encode() + b"abcd")
    be.settimeout(2)
    assert be.recv(100) == p.Header(8, 0x1, 4).encode() + b"abcd"
    entry = channel.trace.entries()[-1]
    assert entry.name == "SET_VRING_NUM" and entry.payload is not None
    assert "error" in entry.payload


# ------------------------------------------------------------------------------------------
# connect / listen over a path


def test_connect_retries_until_listening(tmp_path: Path) -> None:
    path = tmp_path / "vhost.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def start_later() -> None:
        time.sleep(0.2)
        server.bind(str(path))
        server.listen(1)

    t = threading.Thread(target=start_later)
    t.start()
    try:
        with Channel.connect(path, timeout=3) as channel:
            conn, _ = server.accept()
            channel.send(F.SET_OWNER)
            conn.settimeout(2)
            assert conn.recv(12) == p.encode_request(F.SET_OWNER)
            conn.close()
    finally:
        t.join(5)
        server.close()


def test_connect_deadline(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(BackendHang) as info:
        Channel.connect(tmp_path / "nobody.sock", timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 0.8
    assert info.value.request_name == "connect" and "nobody.sock" in str(info.value)


def test_listen_accept(tmp_path: Path) -> None:
    path = tmp_path / "fe.sock"
    with Channel.listen(path) as listener:
        with pytest.raises(BackendHang):
            listener.accept(timeout=0.1)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        with listener.accept(timeout=2) as channel:
            client.sendall(p.encode_reply(F.GET_FEATURES, p.U64(5)))
            m = channel.recv(2)
            assert m.decoded() == p.U64(5) and m.is_reply
        client.close()
    assert not path.exists()


# ------------------------------------------------------------------------------------------
# Back-end channel


def backend_end(bc: BackendChannel) -> socket.socket:
    """What the back-end would hold after SET_BACKEND_REQ_FD: a dup of the peer end."""
    sock = socket.socket(fileno=os.dup(bc.peer_fd()))
    bc.close_peer_fd()
    return sock


def test_backend_channel_acks_and_records() -> None:
    trace = WireTrace()
    before = open_fds()
    bc = BackendChannel(trace=trace)
    be = backend_end(bc)
    parser = p.MessageParser("backend")
    try:
        be.sendall(p.encode_request(B.CONFIG_CHANGE_MSG, need_reply=True))
        reply = recv_message(be, parser, 2)
        assert reply is not None
        assert (reply.request, reply.flags, reply.payload) == (B.CONFIG_CHANGE_MSG, 0x5, bytes(8))
        # without NEED_REPLY: no answer
        be.sendall(p.encode_request(B.VRING_CALL, p.VringState(0, 0)))
        m = bc.wait_for(lambda m: m.request == B.VRING_CALL, timeout=2)
        assert m.decoded(channel="backend") == p.VringState(0, 0)
        be.settimeout(0.2)
        with pytest.raises(TimeoutError):
            be.recv(1)
        assert [m.request for m in bc.messages()] == [B.CONFIG_CHANGE_MSG, B.VRING_CALL]
        names = [(e.direction, e.channel, e.name) for e in trace.entries()]
        assert names == [
            ("be->fe", "backend", "BACKEND_CONFIG_CHANGE_MSG"),
            ("fe->be", "backend", "BACKEND_CONFIG_CHANGE_MSG"),
            ("be->fe", "backend", "BACKEND_VRING_CALL"),
        ]
        assert bc.errors() == []
    finally:
        be.close()
        bc.close()
    assert open_fds() == before


def test_backend_channel_handler_and_fds() -> None:
    before = open_fds()
    bc = BackendChannel()
    be = backend_end(bc)
    parser = p.MessageParser("backend")
    answer_fd = os.memfd_create("dmabuf")
    seen: list[p.Message] = []

    def handler(m: p.Message) -> BackendReply | None:
        seen.append(m)
        if m.request == B.SHARED_OBJECT_LOOKUP:
            return BackendReply(p.U64(0), fds=(answer_fd,))
        return None

    bc.on_message(handler)
    shm = os.memfd_create("shmem-map")
    try:
        send_with_fds(be, p.encode_request(B.SHMEM_MAP, p.ShmemMap(0, 0, 0, 4096, 1),
                                           need_reply=True), [shm])  # fmt: skip
        r1 = recv_message(be, parser, 2)
        assert r1 is not None and r1.decoded(channel="backend") == p.U64(0)
        got = bc.messages()[0]
        assert len(got.fds) == 1 and os.fstat(got.fds[0]).st_ino == os.fstat(shm).st_ino
        be.sendall(p.encode_request(B.SHARED_OBJECT_LOOKUP, p.Shared(bytes(16))))
        r2 = recv_message(be, parser, 2)
        assert r2 is not None and r2.decoded(channel="backend") == p.U64(0) and len(r2.fds) == 1
        os.close(r2.fds[0])
        assert [m.request for m in seen] == [B.SHMEM_MAP, B.SHARED_OBJECT_LOOKUP]
        # an fd where none belongs is recorded as a violation
        send_with_fds(be, p.encode_request(B.CONFIG_CHANGE_MSG), [shm])
        bc.wait_for(lambda m: m.request == B.CONFIG_CHANGE_MSG, timeout=2)
        errs = bc.errors()
        assert len(errs) == 1 and isinstance(errs[0], BackendViolation)
    finally:
        be.close()
        bc.close()
        os.close(shm)
        os.close(answer_fd)
    assert open_fds() == before


def test_backend_channel_malformed_and_eof() -> None:
    bc = BackendChannel()
    be = backend_end(bc)
    try:
        be.sendall(p.Header(77, 1, 0).encode())
        deadline = time.monotonic() + 2
        while not bc.errors() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(bc.errors()[0], p.UnknownRequest)
    finally:
        be.close()
        start = time.monotonic()
        bc.close(timeout=2)
        assert time.monotonic() - start < 1
    bc2 = BackendChannel()
    be2 = backend_end(bc2)
    be2.close()
    deadline = time.monotonic() + 2
    while not bc2.eof and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bc2.eof
    with pytest.raises(BackendHang):
        bc2.wait_for(lambda m: True, timeout=0.1)
    bc2.close()


# ------------------------------------------------------------------------------------------
# Trace output and QEMU's NEED_REPLY choice


def test_trace_json_and_format(pair: tuple[Channel, socket.socket]) -> None:
    channel, be = pair
    FakeBackend(be, lambda m: [(p.encode_reply(F.GET_VRING_BASE, p.VringState(0, 129)), [])])
    channel.call(F.GET_VRING_BASE, p.VringState(0, 0), timeout=2)
    records = json.loads(json.dumps(channel.trace.to_json()))
    assert records[1]["payload"] == {"index": 0, "num": 129}
    assert records[1]["flags"] == "0x5" and records[1]["direction"] == "be->fe"
    lines = channel.trace.format().splitlines()
    assert len(lines) == 2
    assert "fe->be main    GET_VRING_BASE" in lines[0] and "size=8 fds=0" in lines[0]
    assert '{"index":0,"num":129}' in lines[1]
    assert json.loads(channel.trace.dumps()) == records


def test_qemu_need_reply_matches_trace() -> None:
    if not TRACE.exists():
        pytest.skip(f"QEMU trace not available at {TRACE}")
    checked = 0
    for line in TRACE.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("dir") != "fe->be":
            continue
        payload = bytes.fromhex(rec["hex"])
        assert qemu_need_reply(rec["req"], payload, 0x8F2B) == rec["need_reply"], rec["name"]
        checked += 1
    assert checked >= 20
    # QEMU-TRACES.md correction 2/3: LOG_ALL and F_LOG variants get NEED_REPLY
    log_all = p.U64(0x170006E44 | 1 << p.VirtioFeature.LOG_ALL).encode()
    assert qemu_need_reply(F.SET_FEATURES, log_all, 0x8F2B)
    assert qemu_need_reply(F.SET_VRING_ADDR, p.VringAddr(0, 1, 0, 0, 0, 0).encode(), 0x8F2B)
    assert not qemu_need_reply(F.SET_VRING_KICK, p.U64(0).encode(), 0)
    assert not qemu_need_reply(F.SET_INFLIGHT_FD, bytes(24), 0x8F2B)


# ------------------------------------------------------------------------------------------
# A real peer: qemu-storage-daemon's vhost-user-blk export (libvhost-user)


@pytest.mark.peer("qsd")
@pytest.mark.parametrize("version", ["7.2", "11.1"])
def test_handshake_with_qemu_storage_daemon(tmp_path: Path, version: str) -> None:
    from vhost_conformance.peers.provision import PeerUnavailable
    from vhost_conformance.peers.qsd import NullDisk, start_qsd

    try:
        peer = start_qsd(tmp_path / "qsd.sock", NullDisk(64 << 20), version=version)
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    before = open_fds()
    with peer, Channel.connect(peer.socket, timeout=5) as channel:
        features = channel.call(F.GET_FEATURES, timeout=5)
        assert features is not None
        offered = p.U64.decode(features.payload).value
        assert p.has(offered, p.VirtioFeature.PROTOCOL_FEATURES)
        reply = channel.call(F.GET_PROTOCOL_FEATURES, timeout=5)
        assert reply is not None
        protocol = p.U64.decode(reply.payload).value
        assert p.has(protocol, p.ProtocolFeature.REPLY_ACK)
        assert p.has(protocol, p.ProtocolFeature.CONFIG)
        if version == "11.1":
            # the same offers as in QEMU-TRACES.md (a)
            assert (offered, protocol) == (0x175007E44, 0x8F2B)
        channel.call(F.SET_PROTOCOL_FEATURES, p.U64(protocol), timeout=5)
        channel.protocol_features = protocol
        assert channel.call(F.GET_QUEUE_NUM, timeout=5) is not None
        backend_channel = BackendChannel(trace=channel.trace)
        if p.has(protocol, p.ProtocolFeature.BACKEND_REQ):
            ack = channel.call(F.SET_BACKEND_REQ_FD, fds=[backend_channel.peer_fd()], timeout=5)
            assert ack is not None and ack.decoded() == p.U64(0)
        backend_channel.close_peer_fd()
        channel.call(F.SET_OWNER, timeout=5)
        call_fd, err_fd = os.eventfd(0), os.eventfd(0)
        try:
            # fds + NEED_REPLY + REPLY_ACK, as QEMU sends them
            ack1 = channel.call(F.SET_VRING_CALL, p.U64(0), fds=[call_fd], timeout=5)
            ack2 = channel.call(F.SET_VRING_ERR, p.U64(0), fds=[err_fd], timeout=5)
            assert ack1 is not None and ack1.decoded() == p.U64(0)
            assert ack2 is not None and ack2.decoded() == p.U64(0)
        finally:
            os.close(call_fd)
            os.close(err_fd)
        config = channel.call(F.GET_CONFIG, p.Config.request(0, 57), timeout=5)
        assert config is not None
        cfg = config.decoded()
        assert isinstance(cfg, p.Config) and cfg.size == 57
        assert int.from_bytes(cfg.data[:8], "little") == (64 << 20) // 512  # capacity
        # every message went through the trace, replies flagged exactly 0x5
        entries = channel.trace.entries()
        assert all(e.flags == 0x5 for e in entries if e.direction == "be->fe")
        sent = [e.name for e in entries if e.direction == "fe->be"]
        assert [n for n in sent if n != "SET_BACKEND_REQ_FD"] == [
            "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
            "SET_OWNER", "SET_VRING_CALL", "SET_VRING_ERR", "GET_CONFIG",
        ]  # fmt: skip
        assert ("SET_BACKEND_REQ_FD" in sent) == p.has(protocol, p.ProtocolFeature.BACKEND_REQ)
        assert [e.flags for e in entries if e.name == "SET_VRING_CALL"] == [0x9, 0x5]
        backend_channel.close()
        assert backend_channel.errors() == []
    assert open_fds() <= before
