"""The front-end's transport: AF_UNIX stream sockets, SCM_RIGHTS, REPLY_ACK, bounded waits.

- ``Channel``: the main vhost-user socket (client or server side of the connect), with
  ``send``/``recv``/``call``; ``call`` waits for exactly what the protocol says comes back
  and validates it as QEMU does (hw/virtio/vhost-user.c vhost_user_read_header,
  process_message_reply, vhost_user_get_u64 ...).
- ``BackendChannel``: the back-end request channel of SET_BACKEND_REQ_FD, read by a thread
  that records the back-end's messages and answers them.
- ``WireTrace``: every message on either channel, for reports.

Every wait has a deadline; a passed deadline raises ``BackendHang``.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

from vhost_conformance.frontend.errors import BackendClosed as BackendClosed
from vhost_conformance.frontend.errors import BackendError as BackendError
from vhost_conformance.frontend.errors import BackendHang as BackendHang
from vhost_conformance.frontend.errors import BackendNack as BackendNack
from vhost_conformance.frontend.errors import BackendViolation as BackendViolation
from vhost_conformance.frontend.errors import FrontendUsageError as FrontendUsageError
from vhost_conformance.frontend.protocol import (
    BACKEND_FD_EXPECTATIONS,
    FD_EXPECTATIONS,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    REPLY_FD_EXPECTATIONS,
    REPLY_FLAGS,
    REPLY_PAYLOAD,
    U64,
    VERSION,
    VRING_F_LOG,
    BackendRequest,
    Config,
    FdRule,
    FrontendRequest,
    Inflight,
    MalformedMessage,
    Message,
    MessageParser,
    Payload,
    ProtocolFeature,
    ShmemConfig,
    VirtioFeature,
    VringAddr,
    device_feature_names,
    encode_reply,
    expected_fd_count,
    expects_ack,
    feature_names,
    has,
    has_defined_reply,
    request_name,
)

ChannelName = Literal["main", "backend"]
Direction = Literal["fe->be", "be->fe"]

#: fds accepted per recvmsg: more than any message may carry, so that surplus fds are
#: received (and can be closed/reported) rather than silently truncated by the kernel.
_RECV_FDS = 64
_CMSG_SPACE = socket.CMSG_SPACE(_RECV_FDS * array.array("i").itemsize)
#: Linux SCM_MAX_FD: the most fds one sendmsg can carry.
_SCM_MAX_FD = 253


# --------------------------------------------------------------------------------------
# Errors


# The errors live in frontend/errors.py (misuse vs the back-end's fault); named here too.


# --------------------------------------------------------------------------------------
# Wire trace


def _jsonable(value: object) -> object:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


_FEATURE_ENUMS: dict[int, tuple[Any, ...]] = {
    FrontendRequest.GET_FEATURES: (VirtioFeature,),
    FrontendRequest.SET_FEATURES: (VirtioFeature,),
    FrontendRequest.GET_PROTOCOL_FEATURES: (ProtocolFeature,),
    FrontendRequest.SET_PROTOCOL_FEATURES: (ProtocolFeature,),
}


_FEATURE_GETS = (FrontendRequest.GET_FEATURES, FrontendRequest.GET_PROTOCOL_FEATURES)


def describe_payload(message: Message, channel: ChannelName, device_type: str | None = None
                     ) -> dict[str, object] | None:
    """The decoded payload as a JSON-able dict (None for an empty payload); payloads that do
    not decode give ``{"error": ..., "hex": ...}``. A feature word gets ``names``: virtio
    feature bits named by ``device_type``'s table too when it is known (``block``, ``net``,
    ``fs``), else only the transport bits (device bits stay ``bit<N>``)."""
    try:
        decoded = message.decoded(channel=channel)
    except MalformedMessage as exc:
        return {"error": str(exc), "hex": message.payload.hex()}
    if decoded is None:
        return None
    out = _jsonable(decoded)
    assert isinstance(out, dict)
    # feature words: requests SET_*, replies of GET_* (a SET_* reply is an ack)
    if (
        channel == "main"
        and isinstance(decoded, U64)
        and message.request in _FEATURE_ENUMS
        and (not message.is_reply or message.request in _FEATURE_GETS)
    ):
        enums = _FEATURE_ENUMS[message.request]
        if device_type is not None and enums == (VirtioFeature,):
            out["names"] = device_feature_names(decoded.value, device_type)
        else:
            out["names"] = feature_names(decoded.value, *enums)
    return out


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One message as it crossed a channel."""

    time: float  # time.monotonic()
    direction: Direction
    channel: ChannelName
    request: int
    name: str
    flags: int
    size: int
    nfds: int
    payload: dict[str, object] | None
    note: str = ""  # e.g. "2 surplus fds closed"

    def to_dict(self) -> dict[str, object]:
        """JSON-able dict."""
        return {
            "time": self.time,
            "direction": self.direction,
            "channel": self.channel,
            "request": self.request,
            "name": self.name,
            "flags": f"{self.flags:#x}",
            "size": self.size,
            "nfds": self.nfds,
            "payload": self.payload,
            **({"note": self.note} if self.note else {}),
        }


class WireTrace:
    """Thread-safe, append-only record of every message on the channels it is given to."""

    def __init__(self, device_type: str | None = None) -> None:
        self._lock = threading.Lock()
        self._entries: list[TraceEntry] = []
        self.start = time.monotonic()
        #: the device type whose feature table names the virtio bits of the feature words
        #: recorded from now on (None: transport bits only; the session sets its own)
        self.device_type = device_type

    def record(
        self,
        direction: Direction,
        channel: ChannelName,
        message: Message,
        *,
        nfds: int | None = None,
        note: str = "",
    ) -> TraceEntry:
        """Append one message (its fds counted unless ``nfds`` is given)."""
        entry = TraceEntry(
            time=time.monotonic(),
            direction=direction,
            channel=channel,
            request=message.request,
            name=request_name(message.request, channel),
            flags=message.flags,
            size=len(message.payload),
            nfds=len(message.fds) if nfds is None else nfds,
            payload=describe_payload(message, channel, self.device_type),
            note=note,
        )
        with self._lock:
            self._entries.append(entry)
        return entry

    def entries(self) -> list[TraceEntry]:
        """A snapshot of the entries so far."""
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def to_json(self) -> list[dict[str, object]]:
        """The entries as JSON-able dicts (``json.dumps`` them as they are)."""
        return [e.to_dict() for e in self.entries()]

    def dumps(self) -> str:
        """The entries as a JSON text (one array)."""
        return json.dumps(self.to_json())

    def format(self) -> str:
        """One line per message: time since start, direction, channel, name, flags, size, fds,
        payload."""
        lines = []
        for e in self.entries():
            payload = "" if e.payload is None else " " + json.dumps(e.payload, separators=(",", ":"))
            note = f" [{e.note}]" if e.note else ""
            lines.append(
                f"{e.time - self.start:9.6f} {e.direction} {e.channel:<7} {e.name:<24}"
                f" flags={e.flags:#x} size={e.size} fds={e.nfds}{payload}{note}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Socket helpers


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            usable = len(data) - len(data) % arr.itemsize
            arr.frombytes(data[:usable])
            fds.extend(arr)
    return fds


def _sendmsg_all(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    """Send ``data``; the fds ride on the sendmsg that carries the first byte."""
    ancillary = (
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    )
    sent = sock.sendmsg([data], ancillary)
    while sent < len(data):
        sent += sock.send(data[sent:])


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()


# --------------------------------------------------------------------------------------
# QEMU's NEED_REPLY choice


def qemu_need_reply(request: int, payload: bytes, protocol_features: int) -> bool:
    """Whether QEMU 11.1.3 sets NEED_REPLY on this request (QEMU-TRACES.md correction 2).

    Only when REPLY_ACK is negotiated: SET_BACKEND_REQ_FD, SET_VRING_CALL/ERR/KICK,
    ADD_MEM_REG, REM_MEM_REG, SET_MEM_TABLE, SET_VRING_ENABLE, SET_CONFIG, NET_SET_MTU;
    SET_FEATURES only with LOG_ALL; SET_VRING_ADDR only with VRING_F_LOG. IOTLB_MSG always.
    """
    f = FrontendRequest
    if request == f.IOTLB_MSG:
        return True
    if not has(protocol_features, ProtocolFeature.REPLY_ACK):
        return False
    if request in (
        f.SET_BACKEND_REQ_FD, f.SET_VRING_CALL, f.SET_VRING_ERR, f.SET_VRING_KICK,
        f.ADD_MEM_REG, f.REM_MEM_REG, f.SET_MEM_TABLE, f.SET_VRING_ENABLE, f.SET_CONFIG,
        f.NET_SET_MTU,
    ):  # fmt: skip
        return True
    if request == f.SET_FEATURES and len(payload) == U64.SIZE:
        return has(U64.decode(payload).value, VirtioFeature.LOG_ALL)
    if request == f.SET_VRING_ADDR and len(payload) == VringAddr.SIZE:
        return bool(VringAddr.decode(payload).flags & VRING_F_LOG)
    return False


def _payload_bytes(payload: Payload | bytes | None) -> bytes:
    if payload is None:
        return b""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    return payload.encode()


# --------------------------------------------------------------------------------------
# The main channel


#: Called with the trace of every :class:`Channel` made while it is set (the suite's runner
#: sets it for each case, so every connection a case opens reaches its report with its wire
#: trace: :func:`observe_traces`).
trace_observer: Callable[[WireTrace], None] | None = None


def observe_traces(callback: Callable[[WireTrace], None] | None) -> None:
    """Set (or with ``None`` clear) the callback every new channel's trace is given to."""
    global trace_observer
    trace_observer = callback


def validate_reply(
    request: FrontendRequest, sent: bytes, reply: Message, *, defined: bool
) -> None:
    """Judge ``reply`` to ``request`` (payload ``sent``) as QEMU 11.1.3 does: flags exactly
    0x5, the same request id, the exact size of a fixed-size reply (GET_CONFIG: the size
    requested; a REPLY_ACK ack: 8 bytes) and a payload that decodes. Raises BackendViolation.
    ``defined``: the request has a reply body of its own (else the reply is an ack). Used by
    :class:`Channel` and by the recording proxy (frontend/proxy.py) on real QEMU's traffic."""
    name = request.name
    # vhost_user_read_header: flags must be exactly VERSION | REPLY.
    if reply.flags != REPLY_FLAGS:
        raise BackendViolation(
            "reply flags", request_name=name, expected=f"{REPLY_FLAGS:#x}",
            seen=f"{reply.flags:#x}",
        )
    if reply.request != request:
        raise BackendViolation(
            "reply request id", request_name=name,
            expected=f"{int(request)} ({name})",
            seen=f"{reply.request} ({request_name(reply.request)})",
        )
    size = len(reply.payload)
    layout = REPLY_PAYLOAD.get(request) if defined else U64
    want: int | None
    if layout is Config:
        want = len(sent)  # vhost_user_get_config: VHOST_USER_CONFIG_HDR_SIZE + config_len
    elif layout is Inflight:
        want = Inflight.SIZE  # QEMU compares with sizeof(VhostUserInflight) = 24
    elif layout is ShmemConfig:
        want = None  # QEMU does not check it; see ShmemConfig.decode
    else:
        want = getattr(layout, "SIZE", None) if layout is not None else 0
    if want is not None and size != want:
        raise BackendViolation(
            "reply size" if defined else "REPLY_ACK reply size",
            request_name=name, expected=f"{want} bytes", seen=f"{size} bytes",
        )
    try:
        reply.decoded()
    except MalformedMessage as exc:
        raise BackendViolation(
            exc.what, request_name=name, expected=exc.expected, seen=exc.seen
        ) from exc


class Channel:
    """A connected vhost-user main socket, front-end side.

    ``protocol_features`` holds the negotiated protocol features (the session sets it after
    SET_PROTOCOL_FEATURES); ``call`` uses it to know which replies to wait for. A
    ``BackendHang`` leaves the stream where it was: a late reply may still arrive (QEMU
    would drop the connection; a case that goes on must expect it). One thread at a time:
    the channel has no lock, as QEMU has one request in flight per connection.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        trace: WireTrace | None = None,
        send_timeout: float = 10.0,
    ) -> None:
        self.sock = sock
        self.trace = trace if trace is not None else WireTrace()
        if trace_observer is not None:
            trace_observer(self.trace)
        self.protocol_features = 0
        self.send_timeout = send_timeout
        #: Surplus fds received with the last message (closed when asked to).
        self.last_surplus_fds = 0
        self._closed = False

    # ---- construction
    @classmethod
    def connect(
        cls, path: str | os.PathLike[str], *, timeout: float, trace: WireTrace | None = None
    ) -> Channel:
        """Connect to a back-end listening on ``path``, retrying until it listens or the
        deadline passes (BackendHang)."""
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(_remaining(deadline), 0.001))
                sock.connect(os.fspath(path))
                sock.settimeout(None)
                return cls(sock, trace=trace)
            except (FileNotFoundError, ConnectionRefusedError, TimeoutError) as exc:
                sock.close()
                last = exc
            except BaseException:
                sock.close()
                raise
            if _remaining(deadline) <= 0:
                raise BackendHang(
                    f"no back-end accepting on {os.fspath(path)} (last error: {last})",
                    request_name="connect",
                    timeout=timeout,
                )
            time.sleep(min(0.02, max(_remaining(deadline), 0)))

    @classmethod
    def listen(cls, path: str | os.PathLike[str], *, trace: WireTrace | None = None) -> Listener:
        """Listen on ``path`` for a back-end that connects to us (``--backend-connects``)."""
        return Listener(path, trace=trace)

    # ---- lifetime
    def close(self) -> None:
        """Close the socket (idempotent)."""
        if not self._closed:
            self._closed = True
            self.sock.close()

    @property
    def closed(self) -> bool:
        """True after close()."""
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        """The socket's fd."""
        return self.sock.fileno()

    # ---- sending
    def send(
        self,
        request: int,
        payload: Payload | bytes | None = None,
        *,
        fds: Sequence[int] = (),
        need_reply: bool = False,
    ) -> None:
        """Send one request (fds on the sendmsg carrying the header's first byte).

        Raises FrontendUsageError for an unknown request id, a payload larger than QEMU's
        union or an fd count the message cannot carry (use ``send_raw`` to send such bytes
        on purpose).
        """
        data = _payload_bytes(payload)
        try:
            req = FrontendRequest(request)
        except ValueError:
            raise FrontendUsageError(
                f"request id {request} is not a front-end request (use send_raw)"
            ) from None
        if len(data) > MAX_PAYLOAD_SIZE:
            raise FrontendUsageError(
                f"{req.name}: payload of {len(data)} bytes exceeds {MAX_PAYLOAD_SIZE}"
            )
        lo, hi = expected_fd_count(FD_EXPECTATIONS[req], data)
        if not lo <= len(fds) <= hi:
            raise FrontendUsageError(
                f"{req.name} carries {lo if lo == hi else f'{lo}..{hi}'} fds"
                f" ({FD_EXPECTATIONS[req].value}), {len(fds)} given (use send_raw)"
            )
        flags = VERSION | (0x8 if need_reply else 0)
        self.send_message(Message(int(req), flags, data, tuple(fds)))

    def send_message(self, message: Message) -> None:
        """Send a message as it is (its ``fds`` ride with the first byte), unchecked."""
        if len(message.fds) > _SCM_MAX_FD:
            raise FrontendUsageError(f"{len(message.fds)} fds in one message is beyond any use")
        name = request_name(message.request)
        if self._closed:
            raise FrontendUsageError(f"{name}: channel is closed")
        self.sock.settimeout(self.send_timeout)
        try:
            _sendmsg_all(self.sock, message.encode(), message.fds)
        except TimeoutError:
            raise BackendHang(
                "back-end did not take the bytes (socket buffer full)",
                request_name=name,
                timeout=self.send_timeout,
            ) from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BackendClosed(f"connection closed while sending ({exc})", request_name=name) from None
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(None)
        self.trace.record("fe->be", "main", message)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send arbitrary bytes (malformed-message cases); fds ride with the first byte."""
        if self._closed:
            raise FrontendUsageError("send_raw: channel is closed")
        self.sock.settimeout(self.send_timeout)
        try:
            _sendmsg_all(self.sock, data, fds)
        except TimeoutError:
            raise BackendHang("back-end did not take raw bytes", request_name=None,
                              timeout=self.send_timeout) from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BackendClosed(f"connection closed while sending raw bytes ({exc})") from None
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(None)
        if len(data) >= HEADER_SIZE:
            self.trace.record("fe->be", "main", Message(
                int.from_bytes(data[0:4], "little"), int.from_bytes(data[4:8], "little"),
                data[HEADER_SIZE:], tuple(fds)), note=f"raw {len(data)} bytes")

    # ---- receiving
    def _recv_exact(
        self, n: int, deadline: float, timeout: float, awaiting: str | None, fds: list[int]
    ) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = _remaining(deadline)
            if left <= 0:
                raise BackendHang(
                    f"no reply (had {len(buf)} of {n} bytes)" if buf else "no reply",
                    request_name=awaiting,
                    timeout=timeout,
                )
            self.sock.settimeout(left)
            try:
                data, ancdata, msg_flags, _addr = self.sock.recvmsg(
                    n - len(buf), _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except TimeoutError:
                continue
            except ConnectionResetError:
                raise BackendClosed("connection reset by the back-end", request_name=awaiting) from None
            finally:
                with contextlib.suppress(OSError):
                    self.sock.settimeout(None)
            fds.extend(_fds_from_ancillary(ancdata))
            if msg_flags & socket.MSG_CTRUNC:
                # more fds than _RECV_FDS: the kernel closed the rest
                self.last_surplus_fds += 1
            if not data:
                raise BackendClosed(
                    f"back-end closed the connection (EOF after {len(buf)} of {n} bytes)",
                    request_name=awaiting,
                )
            buf += data
        return bytes(buf)

    def recv(
        self,
        timeout: float,
        *,
        awaiting: str | None = None,
        close_surplus_fds: bool = False,
    ) -> Message:
        """Read one whole message and the fds that came with it.

        Reads exactly the header, then exactly its payload, so fds cannot be attributed to
        the wrong message. The caller owns the returned fds. With ``close_surplus_fds``, fds
        beyond what the message may carry (the FD_EXPECTATIONS tables) are closed and
        counted in ``last_surplus_fds``. ``awaiting`` names the request in error messages.
        Raises BackendHang, BackendClosed, or BackendViolation for a malformed header.
        """
        if self._closed:
            raise FrontendUsageError(f"{awaiting or 'recv'}: channel is closed")
        deadline = time.monotonic() + timeout
        self.last_surplus_fds = 0
        fds: list[int] = []
        try:
            parser = MessageParser("main")
            parser.feed(self._recv_exact(HEADER_SIZE, deadline, timeout, awaiting, fds))
            try:
                header = parser.peek_header()
            except MalformedMessage as exc:
                raise BackendViolation(
                    exc.what, request_name=exc.request_name or awaiting,
                    expected=exc.expected, seen=exc.seen,
                ) from exc
            assert header is not None
            if header.size:
                parser.feed(self._recv_exact(header.size, deadline, timeout, awaiting, fds))
            message = parser.next_message()
            assert message is not None
        except BaseException:
            _close_fds(fds)
            raise
        message = dataclasses.replace(message, fds=tuple(fds))
        note = ""
        if close_surplus_fds:
            message, surplus = self._trim_fds(message)
            if surplus:
                self.last_surplus_fds += surplus
                note = f"{surplus} surplus fds closed"
        self.trace.record("be->fe", "main", message, nfds=len(fds), note=note)
        return message

    @staticmethod
    def _trim_fds(message: Message) -> tuple[Message, int]:
        rule: FdRule
        try:
            req = FrontendRequest(message.request)
        except ValueError:
            rule = FdRule.NONE
        else:
            if message.is_reply:
                rule = REPLY_FD_EXPECTATIONS.get(req, FdRule.NONE)
            else:
                rule = FD_EXPECTATIONS[req]
        _lo, hi = expected_fd_count(rule, message.payload)
        if len(message.fds) <= hi:
            return message, 0
        _close_fds(message.fds[hi:])
        return dataclasses.replace(message, fds=message.fds[:hi]), len(message.fds) - hi

    # ---- request/reply
    def call(
        self,
        request: int,
        payload: Payload | bytes | None = None,
        *,
        fds: Sequence[int] = (),
        need_reply: bool | None = None,
        timeout: float,
        close_surplus_fds: bool = True,
    ) -> Message | None:
        """Send a request, then wait for what comes back under the negotiated features.

        ``need_reply=None`` sets NEED_REPLY where QEMU 11.1.3 does (``qemu_need_reply``).
        Waits for the defined reply (``has_defined_reply``) or, with NEED_REPLY and
        REPLY_ACK negotiated, the u64 ack; returns it, or None when nothing comes back.
        The reply is validated as QEMU does: flags exactly 0x5, same request id, exact size
        for fixed-size replies (GET_CONFIG: the size requested). A nonzero ack raises
        BackendNack. Surplus fds on the reply are closed (``close_surplus_fds``).
        """
        data = _payload_bytes(payload)
        if need_reply is None:
            need_reply = qemu_need_reply(request, data, self.protocol_features)
        self.send(request, data, fds=fds, need_reply=need_reply)
        name = request_name(request)
        flags = VERSION | (0x8 if need_reply else 0)
        defined = has_defined_reply(request, self.protocol_features)
        ack = expects_ack(request, flags, self.protocol_features)
        if not defined and not ack:
            return None
        reply = self.recv(timeout, awaiting=name, close_surplus_fds=close_surplus_fds)
        try:
            self._validate_reply(FrontendRequest(request), data, reply, defined=defined)
        except BaseException:
            _close_fds(reply.fds)
            raise
        if not defined:
            status = U64.decode(reply.payload).value
            if status != 0:
                raise BackendNack(request_name=name, status=status)
        return reply

    def _validate_reply(
        self, request: FrontendRequest, sent: bytes, reply: Message, *, defined: bool
    ) -> None:
        validate_reply(request, sent, reply, defined=defined)


class Listener:
    """A listening socket for a back-end that connects to us; ``accept`` gives a Channel."""

    def __init__(self, path: str | os.PathLike[str], *, trace: WireTrace | None = None) -> None:
        self.path = os.fspath(path)
        self.trace = trace
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(self.path)
            self.sock.listen(4)
        except BaseException:
            self.sock.close()
            raise

    def accept(self, timeout: float) -> Channel:
        """Wait up to ``timeout`` for the back-end to connect (BackendHang otherwise)."""
        self.sock.settimeout(timeout)
        try:
            conn, _addr = self.sock.accept()
        except TimeoutError:
            raise BackendHang(
                f"no back-end connected to {self.path}", request_name="accept", timeout=timeout
            ) from None
        conn.settimeout(None)
        return Channel(conn, trace=self.trace)

    def close(self) -> None:
        """Close the socket and remove its path."""
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------
# The back-end request channel


@dataclass(frozen=True, slots=True)
class BackendReply:
    """What a BackendChannel handler answers: a payload (+fds), or ``send=False`` for none."""

    payload: Payload | bytes | None = None
    fds: tuple[int, ...] = ()
    send: bool = True


BackendHandler = Callable[[Message], BackendReply | None]


class BackendChannel:
    """The SET_BACKEND_REQ_FD channel: a socketpair whose peer end goes to the back-end.

    A daemon thread reads the back-end's messages (with their fds), records them, and
    answers: a handler set with ``on_message`` may return a BackendReply; otherwise a
    message with NEED_REPLY gets the REPLY_ACK u64 0 (QEMU answers NEED_REPLY whatever
    was negotiated), SHARED_OBJECT_LOOKUP gets u64 1 (no such object). Received fds stay
    open until ``close()`` (dup what you keep). Errors of the reader go to ``errors()``.
    """

    def __init__(self, *, trace: WireTrace | None = None, poll_interval: float = 0.05) -> None:
        self.trace = trace if trace is not None else WireTrace()
        self._ours, self._peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._peer_open = True
        self._handler: BackendHandler | None = None
        self._lock = threading.Condition()
        self._messages: list[Message] = []
        self._errors: list[BaseException] = []
        self._stop = threading.Event()
        self._eof = False
        self._poll_interval = poll_interval
        self._thread = threading.Thread(
            target=self._run, name="vhost-backend-channel", daemon=True
        )
        self._thread.start()

    def peer_fd(self) -> int:
        """The fd to send with SET_BACKEND_REQ_FD."""
        if not self._peer_open:
            raise FrontendUsageError("peer_fd: the peer end was already closed")
        return self._peer.fileno()

    def close_peer_fd(self) -> None:
        """Close our copy of the peer end once it was sent, so the back-end's exit gives EOF."""
        if self._peer_open:
            self._peer_open = False
            self._peer.close()

    def on_message(self, handler: BackendHandler | None) -> None:
        """Set the handler asked for each back-end message's reply (None: the default)."""
        self._handler = handler

    def messages(self) -> list[Message]:
        """A snapshot of the back-end messages received so far."""
        with self._lock:
            return list(self._messages)

    def errors(self) -> list[BaseException]:
        """Errors the reader met (malformed messages, handler exceptions)."""
        with self._lock:
            return list(self._errors)

    @property
    def eof(self) -> bool:
        """True once the back-end closed its end."""
        return self._eof

    def wait_for(
        self, predicate: Callable[[Message], bool], timeout: float
    ) -> Message:
        """Wait until a received message satisfies ``predicate`` (BackendHang after timeout)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for m in self._messages:
                    if predicate(m):
                        return m
                left = _remaining(deadline)
                if left <= 0:
                    raise BackendHang(
                        "no matching back-end channel message", request_name=None, timeout=timeout
                    )
                self._lock.wait(left)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the reader (joined within ``timeout``), close sockets and received fds."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._ours.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise BackendHang(
                "back-end channel reader did not stop", request_name=None, timeout=timeout
            )
        self._ours.close()
        self.close_peer_fd()
        with self._lock:
            for m in self._messages:
                _close_fds(m.fds)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reader thread
    def _run(self) -> None:
        parser = MessageParser("backend")
        self._ours.settimeout(self._poll_interval)
        while not self._stop.is_set():
            try:
                data, ancdata, _flags, _addr = self._ours.recvmsg(
                    65536, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except TimeoutError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EBADF, errno.ENOTCONN, errno.ECONNRESET):
                    self._record_error(exc)
                break
            fds = _fds_from_ancillary(ancdata)
            if not data:
                _close_fds(fds)
                self._eof = True
                break
            parser.feed(data, fds)
            try:
                while (message := parser.next_message()) is not None:
                    self._handle(message)
            except MalformedMessage as exc:
                # the stream cannot be framed any more: record and stop reading
                self._record_error(exc)
                _close_fds(parser.take_pending_fds())
                break
        _close_fds(parser.take_pending_fds())
        with self._lock:
            self._lock.notify_all()

    def _record_error(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)
            self._lock.notify_all()

    def _handle(self, message: Message) -> None:
        self.trace.record("be->fe", "backend", message)
        lo, hi = expected_fd_count(
            BACKEND_FD_EXPECTATIONS.get(BackendRequest(message.request), FdRule.NONE),
            message.payload,
        )
        # the violation is recorded before the message: whoever waits for the message sees it
        if not lo <= len(message.fds) <= hi:
            self._record_error(BackendViolation(
                "fds on back-end request", request_name=message.name("backend"),
                expected=f"{lo}..{hi}", seen=len(message.fds),
            ))
        with self._lock:
            self._messages.append(message)
            self._lock.notify_all()
        reply: BackendReply | None = None
        handler = self._handler
        if handler is not None:
            try:
                reply = handler(message)
            except Exception as exc:  # a handler bug must not kill the reader
                self._record_error(exc)
                reply = BackendReply(U64(1))
        if reply is None:
            if message.request == BackendRequest.SHARED_OBJECT_LOOKUP:
                reply = BackendReply(U64(1))
            elif message.need_reply:
                reply = BackendReply(U64(0))
            else:
                return
        if not reply.send:
            return
        body = _payload_bytes(reply.payload)
        out = Message(message.request, REPLY_FLAGS, body, reply.fds)
        try:
            _sendmsg_all(self._ours, encode_reply(message.request, body), reply.fds)
        except OSError as exc:
            self._record_error(exc)
            return
        self.trace.record("fe->be", "backend", out)
