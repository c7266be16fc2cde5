"""The device-state scenario (suites/test_device_state.py, VU-DS-1/VU-DS-2) against a small
fake back-end that offers DEVICE_STATE (bit 19): none of the real back-ends we run does.

The fake runs in a thread on one end of a socketpair. It answers GET_FEATURES,
GET_PROTOCOL_FEATURES, GET_VRING_BASE, SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE (it offers
no REPLY_ACK, so nothing else is answered) and closes every fd it is given. ``mode`` makes it
behave or violate one rule of vhost-user.rst "Migrating back-end state".
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator

import pytest
from vhost_conformance.frontend.channel import BackendHang, Channel
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.protocol import (
    REPLY_FLAGS,
    U64,
    DeviceStateTransfer,
    Message,
    MessageParser,
    VringState,
)
from vhost_conformance.frontend.protocol import FrontendRequest as R
from vhost_conformance.frontend.protocol import ProtocolFeature as P
from vhost_conformance.frontend.protocol import VirtioFeature as V
from vhost_conformance.suites import test_device_state as ds
from vhost_conformance.suites.model import CaseFailed

STATE = bytes(range(256)) * 300  # 76,800 bytes: more than a pipe holds at once
TIMEOUT = 2.0


class FakeBackend:
    """A vhost-user back-end offering DEVICE_STATE, in a thread (see the module docstring).

    Modes: ``ok`` (writes/reads on the front-end's pipe, bit 8 set), ``own-fd`` (returns its
    own pipe), ``error-and-fd`` (status 1 with an fd), ``status-error`` (status 1, bit 8, no
    fd: a legal refusal, but not success), ``wrong-channel`` (returns its own fd, writes on
    the front-end's), ``no-eof`` (never closes the save channel), ``check-fails``
    (CHECK_DEVICE_STATE answers 1), ``early-close`` (load: closes the pipe unread).
    """

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.loaded: bytes | None = None
        self.requests: list[int] = []
        self.kept: list[int] = []  # fds held on purpose (no-eof), closed by stop()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Close the socket, join the thread, close kept fds."""
        with contextlib.suppress(OSError):
            self.peer.shutdown(socket.SHUT_RDWR)
        self.peer.close()
        self.thread.join(5)
        for fd in self.kept:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sock.close()

    def _reply(self, request: int, payload: bytes, fds: list[int] | None = None) -> None:
        data = Message(int(request), REPLY_FLAGS, payload).encode()
        socket.send_fds(self.peer, [data], fds or [])

    def _serve(self) -> None:
        parser = MessageParser()
        try:
            while True:
                data, fds, _, _ = socket.recv_fds(self.peer, 65536, 16)
                if not data:
                    return
                parser.feed(data, fds)
                while (msg := parser.next_message()) is not None:
                    self._handle(msg)
        except OSError:
            return
        except BaseException as exc:  # surfaces in the test through .error
            self.error = exc

    def _handle(self, msg: Message) -> None:
        rq = msg.request
        self.requests.append(rq)
        fds = list(msg.fds)
        if rq == R.GET_FEATURES:
            self._reply(rq, U64((1 << V.VERSION_1) | (1 << V.PROTOCOL_FEATURES)).encode())
        elif rq == R.GET_PROTOCOL_FEATURES:
            self._reply(rq, U64(1 << P.DEVICE_STATE).encode())
        elif rq == R.GET_VRING_BASE:
            index = VringState.decode(msg.payload).index
            self._reply(rq, VringState(index, 0).encode())
        elif rq == R.SET_DEVICE_STATE_FD:
            self._device_state(msg, fds.pop())
        elif rq == R.CHECK_DEVICE_STATE:
            ok = self.mode != "check-fails" and self.loaded in (None, STATE)
            self._reply(rq, U64(0 if ok else 1).encode())
        for fd in fds:
            os.close(fd)

    def _device_state(self, msg: Message, fd: int) -> None:
        rq = msg.request
        params = DeviceStateTransfer.decode(msg.payload)
        mode = self.mode
        if mode == "error-and-fd":
            r, w = os.pipe()
            os.close(w)
            self._reply(rq, U64(1).encode(), [r])
            os.close(r)
            os.close(fd)
            return
        if mode == "status-error":
            os.close(fd)
            self._reply(rq, U64(ds.NOFD | 1).encode())
            return
        if params.direction == ds.SAVE:
            if mode in ("own-fd", "wrong-channel"):
                r, w = os.pipe()
                self._reply(rq, U64(0).encode(), [r])
                os.close(r)
                target, other = (fd, w) if mode == "wrong-channel" else (w, fd)
                os.close(other)
                _write_all(target, STATE)
                os.close(target)
                return
            self._reply(rq, U64(ds.NOFD).encode())
            _write_all(fd, STATE)
            if mode == "no-eof":
                self.kept.append(fd)
            else:
                os.close(fd)
            return
        # load: reply first (at once), then read until EOF
        self._reply(rq, U64(ds.NOFD).encode())
        if mode == "early-close":
            os.close(fd)
            return
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        os.close(fd)
        self.loaded = b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@contextlib.contextmanager
def connected(mode: str = "ok", *, start: bool = True) -> Iterator[tuple[FakeBackend, Session]]:
    """A fake back-end in ``mode`` and a session on it (started unless ``start=False``)."""
    fake = FakeBackend(mode)
    memory = GuestMemory.simple(1 << 20)
    session = Session(Channel(fake.sock), memory, timeout=TIMEOUT)
    try:
        session.connect()
        if start:
            session.start()
        yield fake, session
    finally:
        session.close()
        memory.close()
        fake.stop()
    assert fake.error is None, fake.error


def test_fake_backend_negotiates_device_state() -> None:
    with connected() as (_, session):
        assert session.has_protocol(P.DEVICE_STATE)
        assert session.started


@pytest.mark.parametrize("mode", ["ok", "own-fd"])
def test_ds1_passes_on_a_behaving_backend(mode: str) -> None:
    with connected(mode) as (fake, session):
        transfer = ds.set_device_state_fd_after_stop(session)
        assert transfer.backend_channel is (mode == "own-fd")
        try:
            assert ds.read_state(transfer, TIMEOUT) == STATE
        finally:
            transfer.close()
        assert R.GET_VRING_BASE in fake.requests  # stopped before the transfer
        assert fake.requests.index(R.GET_VRING_BASE) < fake.requests.index(
            R.SET_DEVICE_STATE_FD)


def test_ds1_fails_on_error_with_an_fd() -> None:
    with connected("error-and-fd") as (_, session):
        with pytest.raises(CaseFailed, match="an error and an fd at once") as info:
            ds.set_device_state_fd_after_stop(session)
        assert "value 0x1, 1 fd(s)" in info.value.reason


def test_ds1_fails_when_the_state_comes_on_the_discarded_channel() -> None:
    with connected("wrong-channel") as (_, session):
        transfer = ds.set_device_state_fd_after_stop(session)
        try:
            with pytest.raises(CaseFailed, match="wrote on the front-end's") as info:
                ds.read_state(transfer, TIMEOUT)
        finally:
            transfer.close()
        assert "0 on the returned fd" in info.value.reason


def test_ds1_error_without_fd_is_named() -> None:
    with connected("status-error") as (_, session), pytest.raises(
            CaseFailed, match=r"reply: status.*seen 0x1 \(value 0x101\)"):
        ds.set_device_state_fd_after_stop(session)


def test_save_without_eof_is_a_hang() -> None:
    with connected("no-eof") as (_, session):
        transfer = ds.set_device_state_fd_after_stop(session)
        try:
            with pytest.raises(BackendHang, match=f"no end of file.*{len(STATE)} bytes so far"):
                ds.read_state(transfer, 0.5)
        finally:
            transfer.close()


def _destination(mode: str, sessions: list[Session], fakes: list[FakeBackend],
                 memories: list[GuestMemory]) -> Session:
    fake = FakeBackend(mode)
    fakes.append(fake)
    memory = GuestMemory.simple(1 << 20)
    memories.append(memory)
    session = Session(Channel(fake.sock), memory, timeout=TIMEOUT)
    sessions.append(session)
    session.connect()
    return session


def _transfer(source_mode: str, destination_mode: str) -> tuple[bytes, FakeBackend, Session]:
    sessions: list[Session] = []
    fakes: list[FakeBackend] = []
    memories: list[GuestMemory] = []
    try:
        with connected(source_mode) as (_, source):
            state = ds.transfer_scenario(
                source, lambda: _destination(destination_mode, sessions, fakes, memories))
        return state, fakes[0], sessions[0]
    finally:
        for s in sessions:
            s.close()
        for m in memories:
            m.close()
        for f in fakes:
            f.stop()


def test_ds2_passes_and_the_destination_loads_the_state() -> None:
    state, destination, session = _transfer("ok", "ok")
    assert state == STATE
    assert destination.loaded == STATE
    assert session.started is True
    order = destination.requests
    assert order.index(R.SET_DEVICE_STATE_FD) < order.index(R.CHECK_DEVICE_STATE)
    assert order.index(R.CHECK_DEVICE_STATE) < order.index(R.SET_VRING_BASE)


def test_ds2_fails_when_check_reports_an_error_on_the_source() -> None:
    with pytest.raises(CaseFailed, match=r"CHECK_DEVICE_STATE after saving the state.*seen 0x1"):
        _transfer("check-fails", "ok")


def test_ds2_fails_when_check_reports_an_error_on_the_destination() -> None:
    with pytest.raises(CaseFailed, match=f"CHECK_DEVICE_STATE after loading {len(STATE)} bytes"):
        _transfer("ok", "check-fails")


def test_ds2_fails_when_the_destination_closes_before_eof() -> None:
    with pytest.raises(CaseFailed, match="closed its reading end before EOF"):
        _transfer("ok", "early-close")
