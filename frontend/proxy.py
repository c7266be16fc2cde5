"""A recording proxy between a real front-end (QEMU) and a vhost-user back-end.

The proxy listens on a Unix socket (QEMU's ``-chardev socket,path=...``), and for every
connection accepted there opens one to the back-end's socket; then it relays both ways,
forwarding every chunk exactly as received (one ``recvmsg`` becomes one ``sendmsg`` carrying
the same bytes and the same SCM_RIGHTS fds), so neither side can tell it is there. Beside the
relay it frames each direction with :class:`frontend.protocol.MessageParser` and records the
messages in a :class:`frontend.channel.WireTrace` (the shape every emulated case's channel
records: it goes into the report entry of a QEMU case as it is), and it judges each back-end
reply with :func:`frontend.channel.validate_reply`, the validator the emulated channel uses.

Connections end together: when either side closes (a back-end that dies, a QEMU that dies),
what was already received is forwarded and the other side is closed too, which is what each
would have seen without the proxy. A QEMU with ``reconnect-ms`` connects again; the proxy then
connects to the back-end again (waiting up to ``connect_timeout`` for a restarted back-end's
socket; if it does not come, the QEMU side is closed and QEMU retries).

Not traced: the back-end channel. The socket QEMU hands over with SET_BACKEND_REQ_FD is
forwarded as it is (an fd of a socketpair in QEMU), so back-end requests go straight to QEMU.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from vhost_conformance.frontend.channel import (
    BackendViolation,
    Direction,
    WireTrace,
    validate_reply,
)
from vhost_conformance.frontend.protocol import (
    HEADER_SIZE,
    U64,
    FrontendRequest,
    MalformedMessage,
    Message,
    MessageParser,
    expects_ack,
    has_defined_reply,
)

#: Bytes per recvmsg; ancillary room for far more fds than vhost-user allows (8), so that a
#: peer sending too many is relayed rather than truncated.
CHUNK = 65536
ANCILLARY = socket.CMSG_SPACE(64 * array.array("i").itemsize)
#: Poll interval of the relay and accept loops (how soon ``close`` is noticed).
POLL = 0.05


class ProxyError(Exception):
    """The proxy could not start (its socket), or a wait on it passed its deadline."""


@dataclass
class ProxyConnection:
    """One front-end connection and its back-end counterpart."""

    number: int
    accepted: float  # time.monotonic()
    backend_connected: bool = False
    ended: float | None = None
    end_reason: str = ""
    messages: int = 0
    fds_forwarded: int = 0
    bytes_forwarded: dict[str, int] = field(default_factory=lambda: {"fe->be": 0, "be->fe": 0})


@dataclass
class _Pending:
    request: int
    payload: bytes
    defined: bool


class _Judge:
    """Pairs back-end replies with QEMU's requests and validates each one."""

    def __init__(self, violations: list[str], lock: threading.Lock) -> None:
        self.protocol_features = 0
        self.pending: list[_Pending] = []
        self._violations = violations
        self._lock = lock

    def _violate(self, text: str) -> None:
        with self._lock:
            self._violations.append(text)

    def request(self, message: Message) -> None:
        if message.request == FrontendRequest.SET_PROTOCOL_FEATURES and len(message.payload) == 8:
            self.protocol_features = U64.decode(message.payload).value
        defined = has_defined_reply(message.request, self.protocol_features)
        ack = expects_ack(message.request, message.flags, self.protocol_features)
        if defined or ack:
            self.pending.append(_Pending(message.request, message.payload, defined))

    def reply(self, message: Message) -> None:
        if not self.pending:
            self._violate(
                f"reply {message.name()} (flags {message.flags:#x}) to no request awaiting one"
            )
            return
        pending = self.pending.pop(0)
        try:
            request = FrontendRequest(pending.request)
        except ValueError:
            return
        try:
            validate_reply(request, pending.payload, message, defined=pending.defined)
        except BackendViolation as exc:
            self._violate(str(exc))
        if not pending.defined and len(message.payload) == 8:
            status = U64.decode(message.payload).value
            if status != 0:
                self._violate(f"{request.name}: REPLY_ACK status {status:#x} (failure)")


class RecordingProxy:
    """Relay between ``listen_path`` (the front-end connects here) and ``backend_path``.

    Use as a context manager, or call :meth:`start` and :meth:`close`. ``trace`` receives every
    message of every connection (``main`` channel); ``violations`` lists what the reply
    validator found; ``connections`` what happened to each connection.
    """

    def __init__(
        self,
        listen_path: str | os.PathLike[str],
        backend_path: str | os.PathLike[str],
        *,
        trace: WireTrace | None = None,
        connect_timeout: float = 10.0,
        send_timeout: float = 10.0,
    ) -> None:
        self.listen_path = os.fspath(listen_path)
        self.backend_path = os.fspath(backend_path)
        self.trace = trace if trace is not None else WireTrace()
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.violations: list[str] = []
        self.decode_errors: list[str] = []
        self.connections: list[ProxyConnection] = []
        #: copies of the fds of GET_INFLIGHT_FD replies (the in-flight regions), closed by close()
        self.inflight_fds: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> RecordingProxy:
        """Listen and start accepting (the socket exists when this returns)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.listen_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.listen_path)
            listener.listen(4)
        except OSError as exc:
            listener.close()
            raise ProxyError(f"proxy socket {self.listen_path}: {exc}") from None
        listener.settimeout(POLL)
        self._listener = listener
        self._spawn(self._accept_loop, "vhost-proxy-accept")
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, join the threads (each within ``timeout``)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen_path)
        with self._lock:
            for fd in self.inflight_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.inflight_fds.clear()
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise ProxyError(f"proxy threads still running after {timeout:g} s: {alive}")

    def __enter__(self) -> RecordingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, target: object, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    # -- waits --------------------------------------------------------------------------

    def wait_for_connections(self, count: int, timeout: float) -> None:
        """Wait until ``count`` front-end connections have reached the back-end."""
        deadline = time.monotonic() + timeout
        while sum(c.backend_connected for c in self.connections) < count:
            if time.monotonic() >= deadline:
                raise ProxyError(
                    f"{count} proxied connection(s) not made within {timeout:g} s "
                    f"(made: {sum(c.backend_connected for c in self.connections)})"
                )
            time.sleep(POLL)

    def wait_for_message(self, name: str, timeout: float, *, count: int = 1) -> None:
        """Wait until the trace holds ``count`` messages called ``name`` (either direction)."""
        deadline = time.monotonic() + timeout
        while sum(e.name == name for e in self.trace.entries()) < count:
            if time.monotonic() >= deadline:
                raise ProxyError(f"{count} x {name} not seen within {timeout:g} s")
            time.sleep(POLL)

    # -- the loops ----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        number = 0
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            number += 1
            conn = ProxyConnection(number, time.monotonic())
            with self._lock:
                self.connections.append(conn)
            self._spawn(self._serve, f"vhost-proxy-{number}", client, conn)

    def _connect_backend(self) -> socket.socket | None:
        deadline = time.monotonic() + self.connect_timeout
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.backend_path)
                return sock
            except OSError:
                sock.close()
                if time.monotonic() >= deadline:
                    return None
                time.sleep(POLL)
        return None

    def _serve(self, client: socket.socket, conn: ProxyConnection) -> None:
        backend: socket.socket | None = None
        try:
            backend = self._connect_backend()
            if backend is None:
                conn.end_reason = (
                    f"back-end socket {self.backend_path} not connectable within "
                    f"{self.connect_timeout:g} s"
                )
                return
            conn.backend_connected = True
            # a peer that stops reading ends the connection instead of blocking the relay
            client.settimeout(self.send_timeout)
            backend.settimeout(self.send_timeout)
            conn.end_reason = self._relay(client, backend, conn)
        finally:
            conn.ended = time.monotonic()
            for sock in (client, backend):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    sock.close()

    def _relay(self, client: socket.socket, backend: socket.socket, conn: ProxyConnection) -> str:
        peers: dict[int, tuple[socket.socket, socket.socket, Direction]] = {
            client.fileno(): (client, backend, "fe->be"),
            backend.fileno(): (backend, client, "be->fe"),
        }
        parsers: dict[str, MessageParser | None] = {
            "fe->be": MessageParser("main"),
            "be->fe": MessageParser("main"),
        }
        judge = _Judge(self.violations, self._lock)
        poller = select.poll()
        for fd in peers:
            poller.register(fd, select.POLLIN)
        while not self._stop.is_set():
            for fd, _event in poller.poll(int(POLL * 1000)):
                source, sink, direction = peers[fd]
                try:
                    data, ancdata, msg_flags, _ = source.recvmsg(CHUNK, ANCILLARY)
                except (ConnectionResetError, OSError) as exc:
                    return f"{_side(direction)} error: {exc}"
                fds = _fds(ancdata)
                try:
                    if not data:
                        return f"{_side(direction)} closed the connection"
                    if msg_flags & socket.MSG_CTRUNC:
                        self._decode_error(conn, direction, "fds truncated (over 64 on a chunk)")
                    split, names = self._observe(parsers, direction, data, len(fds), judge, conn)
                    if fds and direction == "be->fe" and "GET_INFLIGHT_FD" in names:
                        with self._lock:  # a copy of the region, for the caller to inspect
                            self.inflight_fds.append(os.dup(fds[-1]))
                    try:
                        # the fds ride on the first byte of the message that brought them
                        if fds and split:
                            _send(sink, data[:split], [])
                            _send(sink, data[split:], fds)
                        else:
                            _send(sink, data, fds)
                    except OSError as exc:
                        return f"{_side(direction, sink=True)} gone ({exc})"
                finally:
                    for received in fds:
                        with contextlib.suppress(OSError):
                            os.close(received)
                conn.bytes_forwarded[direction] += len(data)
                conn.fds_forwarded += len(fds)
        return "proxy closed"

    def _observe(
        self,
        parsers: dict[str, MessageParser | None],
        direction: Direction,
        data: bytes,
        nfds: int,
        judge: _Judge,
        conn: ProxyConnection,
    ) -> tuple[int, list[str]]:
        """Frame and record the messages ``data`` completes; return the offset in ``data`` of
        the last message starting inside it (0 when none does or decoding stopped) and the
        names of the messages completed."""
        names: list[str] = []
        parser = parsers[direction]
        if parser is None:
            return 0, names
        start = parser.pending_bytes  # bytes of an unfinished message before this chunk
        offset = -start  # offset in ``data`` of the next message's first byte
        split = 0
        # the fds are forwarded and closed: the parser only counts them
        parser.feed(data, [-1] * nfds)
        while True:
            try:
                message = parser.next_message()
            except MalformedMessage as exc:
                self._decode_error(conn, direction, f"{exc} (no further decoding this way)")
                parsers[direction] = None
                return 0, names
            if message is None:
                if 0 <= offset < len(data) and parser.pending_bytes:
                    split = offset
                return split, names
            if offset >= 0:
                split = offset
            offset += HEADER_SIZE + len(message.payload)
            conn.messages += 1
            names.append(message.name())
            self.trace.record(direction, "main", message, note=f"connection {conn.number}")
            if direction == "fe->be":
                judge.request(message)
            else:
                judge.reply(message)

    def _decode_error(self, conn: ProxyConnection, direction: str, text: str) -> None:
        with self._lock:
            self.decode_errors.append(f"connection {conn.number} {direction}: {text}")


def _side(direction: str, *, sink: bool = False) -> str:
    front = direction == "fe->be"
    if sink:
        front = not front
    return "front-end" if front else "back-end"


def _fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def _send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """One sendmsg carrying ``data`` and ``fds`` (the rest of ``data`` after a short write)."""
    ancillary = (
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    )
    sent = sock.sendmsg([data], ancillary)
    while sent < len(data):
        sent += sock.send(data[sent:])
