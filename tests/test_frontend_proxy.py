"""frontend/proxy.py: the recording relay between a real front-end and a back-end forwards
every byte and fd unchanged, records each message in a WireTrace, judges the back-end's
replies with the emulated channel's validator, and ends both sides of a connection when one
side dies (every wait here has a deadline)."""

from __future__ import annotations

import array
import os
import pathlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from vhost_conformance.frontend.channel import Channel, WireTrace
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.protocol import (
    HEADER_SIZE,
    U64,
    FrontendRequest,
    Header,
    MemoryRegion,
    MemoryTable,
)
from vhost_conformance.frontend.proxy import RecordingProxy
from vhost_conformance.suites.drivers import do_io

from tests.backend_helpers import running_backend

F = FrontendRequest
MiB = 1 << 20


def _msg(request: int, flags: int, payload: bytes) -> bytes:
    return Header(request, flags, len(payload)).encode() + payload


def _recv_exact(sock: socket.socket, n: int, timeout: float = 5.0) -> tuple[bytes, list[int]]:
    sock.settimeout(timeout)
    data, fds = b"", []
    while len(data) < n:
        chunk, anc, _f, _a = sock.recvmsg(n - len(data), socket.CMSG_SPACE(8 * 4))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(raw[: len(raw) - len(raw) % 4])
                fds.extend(arr)
    return data, fds


def _recv_msg(sock: socket.socket) -> tuple[bytes, list[int]]:
    head, fds = _recv_exact(sock, HEADER_SIZE)
    size = Header.decode(head).size
    body, more = _recv_exact(sock, size) if size else (b"", [])
    return head + body, fds + more


class FakeBackend:
    """A listening socket; ``behaviour`` runs on the accepted connection in a thread."""

    def __init__(self, path: pathlib.Path, behaviour: Callable[[socket.socket], None]) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.error: BaseException | None = None

        def run() -> None:
            try:
                conn, _ = self.listener.accept()
                with conn:
                    behaviour(conn)
            except BaseException as exc:  # reported by join()
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(10)
        assert not self.thread.is_alive(), "fake back-end thread did not end"
        self.listener.close()
        if self.error is not None:
            raise self.error


@pytest.fixture
def paths(tmp_path: pathlib.Path) -> Iterator[tuple[pathlib.Path, pathlib.Path]]:
    """(proxy socket, back-end socket)."""
    yield tmp_path / "proxy.sock", tmp_path / "be.sock"


def _client(path: pathlib.Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def test_bytes_and_fds_cross_unchanged(paths: tuple[pathlib.Path, pathlib.Path]) -> None:
    """Requests (one with an fd, one split over two sends) reach the back-end byte for byte,
    the fd names the same file; the replies (one with an fd) come back byte for byte; the trace
    names each message with its size and fd count."""
    proxy_path, be_path = paths
    memfd = os.memfd_create("proxy-test")
    os.ftruncate(memfd, 4096)
    table = MemoryTable((MemoryRegion(0, 4096, 0x7F0000000000, 0),)).encode()
    requests = [
        _msg(F.GET_FEATURES, 1, b""),
        _msg(F.SET_MEM_TABLE, 1, table),
        _msg(F.SET_FEATURES, 1, U64(1 << 32).encode()),
    ]
    reply_fd = os.memfd_create("proxy-reply")
    replies = [_msg(F.GET_FEATURES, 5, U64(1 << 32 | 1 << 30).encode())]
    seen: list[tuple[bytes, list[int]]] = []

    def behaviour(conn: socket.socket) -> None:
        for _ in requests:
            seen.append(_recv_msg(conn))
            if len(seen) == 1:
                conn.sendall(replies[0])
        # an unsolicited message with an fd (a violation for the judge; forwarded anyway)
        fds = array.array("i", [reply_fd]).tobytes()
        conn.sendmsg([_msg(F.GET_FEATURES, 5, U64(7).encode())],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])  # fmt: skip

    backend = FakeBackend(be_path, behaviour)
    with RecordingProxy(proxy_path, be_path) as proxy:
        client = _client(proxy_path)
        with client:
            client.sendall(requests[0])
            assert _recv_msg(client) == (replies[0], [])
            fd_bytes = array.array("i", [memfd]).tobytes()
            client.sendmsg([requests[1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd_bytes)])
            client.sendall(requests[2][:5])
            time.sleep(0.1)
            client.sendall(requests[2][5:])
            late, late_fds = _recv_msg(client)
            backend.join()
        proxy.wait_for_message("GET_FEATURES", timeout=5, count=3)
    assert [data for data, _ in seen] == requests
    assert [len(fds) for _, fds in seen] == [0, 1, 0]
    got_fd = seen[1][1][0]
    assert os.fstat(got_fd).st_ino == os.fstat(memfd).st_ino
    assert late == _msg(F.GET_FEATURES, 5, U64(7).encode()) and len(late_fds) == 1
    assert os.fstat(late_fds[0]).st_ino == os.fstat(reply_fd).st_ino
    for fd in (memfd, reply_fd, got_fd, *late_fds):
        os.close(fd)
    rows = [(e.direction, e.name, e.size, e.nfds) for e in proxy.trace.entries()]
    assert rows == [
        ("fe->be", "GET_FEATURES", 0, 0),
        ("be->fe", "GET_FEATURES", 8, 0),
        ("fe->be", "SET_MEM_TABLE", len(table), 1),
        ("fe->be", "SET_FEATURES", 8, 0),
        ("be->fe", "GET_FEATURES", 8, 1),
    ]
    assert len(proxy.violations) == 1 and "to no request awaiting one" in proxy.violations[0]
    (conn,) = proxy.connections
    assert conn.fds_forwarded == 2
    assert conn.bytes_forwarded == {"fe->be": sum(map(len, requests)), "be->fe": 40}


def test_bad_reply_is_judged_and_forwarded(paths: tuple[pathlib.Path, pathlib.Path]) -> None:
    """A GET_FEATURES reply with flags 0x1 (no REPLY bit) is forwarded as is; the proxy's
    verdict names the reply flags, as the emulated channel's validator does."""
    proxy_path, be_path = paths
    bad = _msg(F.GET_FEATURES, 1, U64(1).encode())

    def behaviour(conn: socket.socket) -> None:
        _recv_msg(conn)
        conn.sendall(bad)

    backend = FakeBackend(be_path, behaviour)
    with RecordingProxy(proxy_path, be_path) as proxy, _client(proxy_path) as client:
        client.sendall(_msg(F.GET_FEATURES, 1, b""))
        assert _recv_msg(client) == (bad, [])
        backend.join()
        proxy.wait_for_message("GET_FEATURES", timeout=5, count=2)
    assert any("reply flags" in v and "0x5" in v for v in proxy.violations), proxy.violations


def test_backend_that_dies_closes_the_front_end(paths: tuple[pathlib.Path, pathlib.Path]) -> None:
    """The back-end closes mid-session: the front-end's side reaches EOF (what QEMU sees when
    a back-end dies), and a new front-end connection finds no back-end within connect_timeout
    and is closed too."""
    proxy_path, be_path = paths

    def behaviour(conn: socket.socket) -> None:
        _recv_msg(conn)  # then close without replying

    backend = FakeBackend(be_path, behaviour)
    with RecordingProxy(proxy_path, be_path, connect_timeout=0.5) as proxy:
        with _client(proxy_path) as client:
            client.sendall(_msg(F.GET_FEATURES, 1, b""))
            assert client.recv(1) == b""  # EOF within the socket's 5 s timeout
        backend.join()
        os.unlink(be_path)
        with _client(proxy_path) as again:
            assert again.recv(1) == b""
    first, second = proxy.connections
    assert first.backend_connected and "back-end closed" in first.end_reason
    assert not second.backend_connected and "not connectable" in second.end_reason


def test_front_end_that_dies_closes_the_back_end(paths: tuple[pathlib.Path, pathlib.Path]) -> None:
    """The front-end goes away: the back-end's side reaches EOF."""
    proxy_path, be_path = paths
    eof: list[bytes] = []

    def behaviour(conn: socket.socket) -> None:
        _recv_msg(conn)
        conn.settimeout(5)
        eof.append(conn.recv(1))

    backend = FakeBackend(be_path, behaviour)
    with RecordingProxy(proxy_path, be_path) as proxy:
        client = _client(proxy_path)
        client.sendall(_msg(F.GET_FEATURES, 1, b""))
        proxy.wait_for_message("GET_FEATURES", timeout=5)
        client.close()
        backend.join()
    assert eof == [b""]
    assert "front-end closed" in proxy.connections[0].end_reason


def test_reference_session_through_the_proxy(paths: tuple[pathlib.Path, pathlib.Path]) -> None:
    """The emulated front-end's whole connect + start + I/O through the proxy: the proxy's
    trace is the session's own trace (direction, name, flags, size, fds, payload), and the
    reference back-end's replies pass the validator."""
    proxy_path, be_path = paths
    with (
        running_backend(be_path, "--ram-disk", "8M"),
        RecordingProxy(proxy_path, be_path, trace=WireTrace("block")) as proxy,
        GuestMemory.simple(32 * MiB, regions=1) as memory,
    ):
        session = Session(Channel.connect(proxy_path, timeout=5.0), memory, queue_size=16)
        try:
            session.connect()
            session.start()
            do_io(session, 2)
            session.stop()
        finally:
            session.channel.close()
        deadline = time.monotonic() + 5
        while len(proxy.trace) < len(session.channel.trace):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    mine = [(e.direction, e.name, e.flags, e.size, e.nfds, e.payload)
            for e in session.channel.trace.entries()]  # fmt: skip
    relayed = [(e.direction, e.name, e.flags, e.size, e.nfds, e.payload)
               for e in proxy.trace.entries()]  # fmt: skip
    assert relayed == mine
    assert proxy.violations == [] and proxy.decode_errors == []
