"""The back-end's event loop: one thread, ``selectors`` over the control socket, every
ring's kick eventfd, a wake-up pipe (signals, :meth:`Server.request_stop`) and the timer
of the next held request.

Listen mode serves one front-end at a time and, when that connection ends, accepts the
next one with fresh per-connection state (the disk is kept): that is how QEMU's
``reconnect-ms`` and a migration destination find us. Connect mode serves one connection
and returns.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import selectors
import signal
import socket
import time

from vhost_conformance.backend.core import ConnectionFatal
from vhost_conformance.backend.device import Device
from vhost_conformance.backend.disk import Disk
from vhost_conformance.backend.faults import Faults
from vhost_conformance.backend.options import BackendOptions
from vhost_conformance.frontend.protocol import (
    MAX_PAYLOAD_SIZE,
    Header,
    MalformedMessage,
    MessageParser,
    UnknownRequest,
    request_name,
)

log = logging.getLogger("vhost_conformance.backend")

#: SCM_MAX_FD: room for every fd a peer may send, so surplus ones reach us and get closed
#: rather than being dropped with MSG_CTRUNC (TEST-IDEAS 7).
_MAX_RECV_FDS = 253
_RECV_SIZE = 65536
#: Longest a reply send may block (the front-end is not reading: give up on it).
SEND_TIMEOUT = 5.0
#: Longest a select waits with nothing scheduled (the loop re-checks its stop flag).
IDLE_WAIT = 1.0


class _Watcher:
    def __init__(self, sel: selectors.BaseSelector) -> None:
        self.sel = sel

    def watch(self, fd: int, queue_index: int) -> None:
        try:
            self.sel.register(fd, selectors.EVENT_READ, ("kick", queue_index))
        except (KeyError, ValueError, OSError) as exc:
            log.error("cannot watch kick fd %d: %s", fd, exc)

    def unwatch(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.sel.unregister(fd)


class Server:
    """Serves vhost-user-blk on a listening socket (or one outgoing connection)."""

    def __init__(
        self,
        options: BackendOptions,
        disk: Disk,
        faults: Faults | None = None,
        *,
        listen_sock: socket.socket | None = None,
        connect_path: str | None = None,
    ) -> None:
        if (listen_sock is None) == (connect_path is None):
            raise ValueError("Server needs exactly one of listen_sock and connect_path")
        self.options = options
        self.disk = disk
        self.faults = faults or Faults()
        self.listen_sock = listen_sock
        self.connect_path = connect_path
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = False
        self.connections = 0
        self.sel: selectors.BaseSelector | None = None
        self.conn: socket.socket | None = None
        self.device: Device | None = None
        self.parser: MessageParser | None = None

    @property
    def wakeup_fd(self) -> int:
        """Write end of the wake-up pipe (for ``signal.set_wakeup_fd``)."""
        return self._wake_w

    def request_stop(self) -> None:
        """Ask the loop to end (thread- and signal-safe)."""
        self._stop = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # ------------------------------------------------------------------ connection

    def _open(self, conn: socket.socket) -> None:
        assert self.sel is not None
        conn.settimeout(SEND_TIMEOUT)
        self.conn = conn
        self.device = Device(self.options, self.disk, self.faults, _Watcher(self.sel))
        self.parser = MessageParser(
            "main", any_version=self.faults.on("ignore-version-bits")
        )
        self.connections += 1
        self.sel.register(conn, selectors.EVENT_READ, ("conn", 0))
        if self.listen_sock is not None:
            self.sel.unregister(self.listen_sock)
        log.info("front-end connected (connection %d)", self.connections)

    def _drop(self, reason: str) -> None:
        assert self.sel is not None
        log.info("connection %d closed: %s", self.connections, reason)
        if self.device is not None:
            self.device.close()
            self.device = None
        if self.parser is not None:
            for fd in self.parser.take_pending_fds():
                _close(fd)
            self.parser = None
        if self.conn is not None:
            self.sel.unregister(self.conn)
            self.conn.close()
            self.conn = None
        if self.faults.on("exit-on-disconnect"):
            log.warning("misbehaving: exiting with the connection")
            self._stop = True
        elif self.listen_sock is not None:
            self.sel.register(self.listen_sock, selectors.EVENT_READ, ("listen", 0))
        else:
            self._stop = True

    def _read(self) -> None:
        assert self.conn is not None and self.parser is not None and self.device is not None
        try:
            data, ancdata, msg_flags, _addr = self.conn.recvmsg(
                _RECV_SIZE, socket.CMSG_SPACE(_MAX_RECV_FDS * 4)
            )
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError as exc:
            self._drop(f"recvmsg: {exc}")
            return
        fds: list[int] = []
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
                fds.extend(arr)
        if msg_flags & socket.MSG_CTRUNC:
            for fd in fds:
                _close(fd)
            self._drop("ancillary data truncated (MSG_CTRUNC)")
            return
        if not data:
            if self.parser.pending_bytes and self.faults.on("spin-on-partial-message"):
                self.faults.hang(
                    "spin-on-partial-message",
                    f"the rest of a message ({self.parser.pending_bytes} bytes so far) after EOF",
                )
            for fd in fds:
                _close(fd)
            self._drop("end of file")
            return
        self.parser.feed(data, fds)
        while self.device is not None and self.parser is not None:
            try:
                msg = self.parser.next_message()
            except MalformedMessage as exc:
                self._misbehave_on_header(exc)
                log.error("malformed message: %s", exc)
                self._drop(f"malformed message: {exc}")
                return
            if msg is None:
                return
            log.debug(
                "<- %s flags %#x size %d fds %d",
                request_name(msg.request),
                msg.flags,
                len(msg.payload),
                len(msg.fds),
            )
            try:
                self.device.handle(msg)
            except ConnectionFatal as exc:
                log.error("%s", exc)
                self._send_outbox()
                self._drop(str(exc))
                return
            except Exception as exc:  # a bug of ours must not take the process down
                log.exception("internal error handling %s", request_name(msg.request))
                self._drop(f"internal error: {exc!r}")
                return
            self._send_outbox()

    def _misbehave_on_header(self, exc: MalformedMessage) -> None:
        """crash-on-unexpected-request / trust-payload-size: die on the header the parser
        refused (an unknown id; a size beyond the payload union)."""
        if isinstance(exc, UnknownRequest) and self.faults.on("crash-on-unexpected-request"):
            self.faults.die("crash-on-unexpected-request", str(exc), signal.SIGABRT)
        if self.faults.on("trust-payload-size") and self.parser is not None:
            raw = self.parser.buffered(12)
            if len(raw) == 12 and Header.decode(raw).size > MAX_PAYLOAD_SIZE:
                self.faults.die("trust-payload-size", f"header size {Header.decode(raw).size}")

    def _send_outbox(self) -> None:
        device, conn = self.device, self.conn
        if device is None or conn is None:
            return
        while device.outbox:
            data, fds = device.outbox.pop(0)
            try:
                if fds:
                    conn.sendmsg(
                        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    )
                else:
                    conn.sendall(data)
                log.debug(
                    "-> reply %s (%d bytes, %d fds)",
                    request_name(int.from_bytes(data[:4], "little")),
                    len(data),
                    len(fds),
                )
            except OSError as exc:
                for fd in fds:
                    _close(fd)
                self._drop(f"send: {exc}")
                return
            for fd in fds:
                _close(fd)

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        """Serve until :meth:`request_stop` (or, in connect mode, until the connection
        ends). Returns the exit status (0)."""
        sel = selectors.DefaultSelector()
        self.sel = sel
        sel.register(self._wake_r, selectors.EVENT_READ, ("wake", 0))
        try:
            if self.listen_sock is not None:
                self.listen_sock.setblocking(False)
                sel.register(self.listen_sock, selectors.EVENT_READ, ("listen", 0))
            else:
                assert self.connect_path is not None
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.settimeout(SEND_TIMEOUT)
                try:
                    conn.connect(self.connect_path)
                except OSError:
                    conn.close()
                    raise
                self._open(conn)
            while not self._stop:
                try:
                    self._turn(sel)
                except Exception as exc:  # a bug of ours: lose the connection, not the process
                    log.exception("internal error in the event loop")
                    if self.conn is not None:
                        self._drop(f"internal error: {exc!r}")
                    time.sleep(0.01)
        finally:
            if self.conn is not None:
                self._drop("back-end stopping")
            sel.close()
            self.sel = None
            _close(self._wake_r)
            _close(self._wake_w)
        return 0

    def _turn(self, sel: selectors.BaseSelector) -> None:
        timeout = IDLE_WAIT
        device = self.device
        if device is not None:
            if device.has_work:
                timeout = 0.0
            else:
                deadline = device.next_deadline()
                if deadline is not None:
                    timeout = max(0.0, min(timeout, deadline - time.monotonic()))
        for key, _mask in sel.select(timeout):
            kind, index = key.data
            if kind == "wake":
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            elif kind == "listen":
                assert self.listen_sock is not None
                try:
                    conn, _ = self.listen_sock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                if self.conn is None:
                    self._open(conn)
                else:
                    conn.close()
            elif kind == "conn":
                if self.conn is not None:
                    self._read()
            elif kind == "kick":
                if sel.get_map().get(key.fd) is not key:
                    # A message handled earlier in this round (GET_VRING_BASE, SET_VRING_KICK,
                    # the connection's end) unwatched and closed this fd: a stale event.
                    continue
                try:
                    if os.read(key.fd, 8) == b"":
                        # Not an eventfd (EOF on a pipe or file): stop polling it.
                        log.error(
                            "kick fd %d of vring %d reads EOF: no longer watched", key.fd, index
                        )
                        sel.unregister(key.fd)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as exc:
                    log.error("kick fd %d of vring %d: %s: no longer watched", key.fd, index, exc)
                    sel.unregister(key.fd)
                if self.device is not None:
                    self.device.kick(index)
        if self.device is not None:
            try:
                self.device.turn()
            except Exception as exc:  # a bug of ours must not take the process down
                log.exception("internal error processing the rings")
                self._drop(f"internal error: {exc!r}")
                return
            self._send_outbox()


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
