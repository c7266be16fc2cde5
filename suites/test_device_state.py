"""Back-end state migration: SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE (protocol feature
DEVICE_STATE, bit 19).

Family: device-state (VU-DS-1, VU-DS-2). Clauses: vhost-user.rst (QEMU 11.1.3) "Front-end
message types: SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE" and "Migrating back-end state":

- the request carries {direction u32 (0 save, 1 load), phase u32 (0 stopped)} and one fd, the
  front-end's end of a channel that behaves like a pipe;
- the u64 reply: bits 0-7 are 0 on success, bit 8 set means no fd is returned; without bit 8
  the reply carries the back-end's own channel, which the front-end must use instead of its
  own; the back-end must not both report an error and return an fd;
- the writing end writes the whole state and closes (end of transfer); the reading end reads
  until EOF; then the front-end sends CHECK_DEVICE_STATE, answered 0 on success;
- the only phase is "stopped": the source's rings are stopped (after GET_VRING_BASE) and the
  destination has not started its rings yet.

Of the back-ends the project runs only the reference back-end offers DEVICE_STATE (its own
small state: backend/device_state.py); against the others both cases end ``unsupported``
naming the bit. tests/test_suites_device_state.py runs the scenario against a fake back-end
that offers it, once behaving and once violating; the knobs device-state-error-with-fd and
check-state-always-ok break the reference (tests/test_mutations.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass

from vhost_conformance.frontend.channel import BackendHang
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.protocol import (
    U64,
    DeviceStateTransfer,
    FrontendRequest,
    ProtocolFeature,
)
from vhost_conformance.suites.clauses import RST
from vhost_conformance.suites.drivers import MakeTarget, SessionFactory
from vhost_conformance.suites.drivers.migration import destination_target
from vhost_conformance.suites.model import MUST, CaseFailed, case
from vhost_conformance.suites.target import BackendTarget

F = FrontendRequest
P = ProtocolFeature

SAVE = DeviceStateTransfer.DIRECTION_SAVE
LOAD = DeviceStateTransfer.DIRECTION_LOAD
STOPPED = DeviceStateTransfer.PHASE_STOPPED
#: SET_DEVICE_STATE_FD reply: bit 8 = no fd returned; bits 0-7 = status.
NOFD = 1 << 8
STATUS_MASK = 0xFF
#: Largest state we accept from a back-end (a blk back-end's state is small).
MAX_STATE = 64 << 20

_DIRECTION = {SAVE: "save", LOAD: "load"}


@dataclass
class Transfer:
    """The front-end's end of an agreed transfer channel."""

    direction: int
    fd: int  # the end to use: read (save) or write (load)
    backend_channel: bool  # the back-end returned its own channel (reply bit 8 clear)
    discarded: int  # our own end, kept only to see that nothing uses it (-1: none)
    reply_value: int

    def close(self) -> None:
        """Close both ends we hold (idempotent)."""
        for name in ("fd", "discarded"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)


def set_device_state_fd(session: Session, direction: int) -> Transfer:
    """SET_DEVICE_STATE_FD(direction, phase stopped) with one end of a new pipe; the reply is
    checked (VU-DS-1's rules) and the end to use returned. CaseFailed names what was wrong."""
    what = f"SET_DEVICE_STATE_FD ({_DIRECTION[direction]})"
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    give, keep = (write_end, read_end) if direction == SAVE else (read_end, write_end)
    try:
        reply = session.channel.call(
            F.SET_DEVICE_STATE_FD, DeviceStateTransfer(direction, STOPPED), fds=[give],
            timeout=session.timeout, close_surplus_fds=False)
    except BaseException:
        os.close(keep)
        raise
    finally:
        os.close(give)  # the back-end has its own copy now
    if reply is None:  # pragma: no cover - SET_DEVICE_STATE_FD always has a reply body
        os.close(keep)
        raise CaseFailed(what, expected="a u64 reply", seen="none")
    value = U64.decode(reply.payload).value
    fds = list(reply.fds)
    status, nofd = value & STATUS_MASK, bool(value & NOFD)

    def fail(reason: str, expected: object, seen: object) -> CaseFailed:
        for fd in [keep, *fds]:
            with contextlib.suppress(OSError):
                os.close(fd)
        return CaseFailed(f"{what} reply: {reason}", expected=expected, seen=seen)

    if status and (not nofd or fds):
        raise fail("an error and an fd at once", expected="a nonzero status only with bit 8 "
                   "set and no fd", seen=f"value {value:#x}, {len(fds)} fd(s)")
    if status:
        raise fail("status", expected="0 (success)", seen=f"{status:#x} (value {value:#x})")
    if value & ~(STATUS_MASK | NOFD):
        raise fail("reserved bits", expected="bits 9-63 clear", seen=f"{value:#x}")
    if nofd and fds:
        raise fail("fds with bit 8 (no fd) set", expected="0 fds", seen=f"{len(fds)} fd(s)")
    if not nofd and len(fds) != 1:
        raise fail("bit 8 clear (an fd is returned)", expected="exactly 1 fd",
                   seen=f"{len(fds)} fd(s)")
    if nofd:
        return Transfer(direction, keep, False, -1, value)
    return Transfer(direction, fds[0], True, keep, value)


def read_state(transfer: Transfer, timeout: float) -> bytes:
    """Read the saved state until EOF (BackendHang when it does not come before the deadline;
    CaseFailed when the back-end wrote on the channel it told us to discard)."""
    data = _read_until_eof(transfer.fd, timeout, "the saved state")
    if transfer.discarded >= 0:
        stray = _read_now(transfer.discarded)
        if stray:
            raise CaseFailed(
                "SET_DEVICE_STATE_FD (save): the back-end returned its own channel, then wrote "
                "on the front-end's", expected="the state on the returned fd only",
                seen=f"{len(stray)} byte(s) on the front-end's pipe, {len(data)} on the "
                "returned fd")
    return data


def write_state(transfer: Transfer, state: bytes, timeout: float) -> None:
    """Write the whole state, then close our end (the end of the transfer)."""
    fd = transfer.fd
    os.set_blocking(fd, False)
    deadline = time.monotonic() + timeout
    view = memoryview(state)
    try:
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendHang(f"the back-end did not read the state ({len(view)} of "
                                  f"{len(state)} bytes left)",
                                  request_name="SET_DEVICE_STATE_FD (load)", timeout=timeout)
            _, ready, _ = select.select([], [fd], [], min(left, 0.1))
            if not ready:
                continue
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise CaseFailed("SET_DEVICE_STATE_FD (load): the back-end closed its reading "
                                 "end before EOF", expected=f"{len(state)} bytes read",
                                 seen=f"{len(state) - len(view)} taken") from None
    finally:
        transfer.close()


def check_device_state(session: Session, what: str) -> None:
    """CHECK_DEVICE_STATE must answer 0."""
    reply = session.call(F.CHECK_DEVICE_STATE)
    value = None if reply is None else U64.decode(reply.payload).value
    if value != 0:
        raise CaseFailed(f"CHECK_DEVICE_STATE after {what}", expected="0 (success)",
                         seen=None if value is None else f"{value:#x}")


def _read_now(fd: int) -> bytes:
    """What can be read from ``fd`` without waiting."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


def _read_until_eof(fd: int, timeout: float, what: str) -> bytes:
    os.set_blocking(fd, False)
    deadline = time.monotonic() + timeout
    out = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BackendHang(f"no end of file on {what} ({len(out)} bytes so far)",
                              request_name="SET_DEVICE_STATE_FD (save)", timeout=timeout)
        ready, _, _ = select.select([fd], [], [], min(left, 0.1))
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        except OSError as exc:  # pragma: no cover - a pipe read fails only on EIO
            if exc.errno == errno.EINTR:
                continue
            raise
        if not chunk:
            return bytes(out)
        out += chunk
        if len(out) > MAX_STATE:
            raise CaseFailed(f"{what}", expected=f"at most {MAX_STATE} bytes",
                             seen=f"more ({len(out)} so far, no end of file)")


# --------------------------------------------------------------------------- scenarios


def save_scenario(source: Session, *, check: bool) -> bytes:
    """Stop the source (QEMU's stop: rings disabled, GET_VRING_BASE, SET_STATUS 0) when it is
    started, agree a save channel, read the state until EOF; ``check``: CHECK_DEVICE_STATE
    must then answer 0. Returns the state."""
    if source.started:
        source.stop()
    transfer = set_device_state_fd(source, SAVE)
    try:
        state = read_state(transfer, source.timeout)
    finally:
        transfer.close()
    if check:
        check_device_state(source, "saving the state")
    return state


def load_scenario(destination: Session, state: bytes) -> None:
    """On a destination that is connected but not started: agree a load channel, write the
    state and close, CHECK_DEVICE_STATE must answer 0."""
    transfer = set_device_state_fd(destination, LOAD)
    write_state(transfer, state, destination.timeout)
    check_device_state(destination, f"loading {len(state)} bytes of state")


def transfer_scenario(source: Session, open_destination: Callable[[], Session]) -> bytes:
    """VU-DS-2: save on the source (checked), load on a new destination (checked), then the
    destination starts at the source's vring bases as QEMU re-initializes it. Returns the
    state that went across."""
    bases = source.stop() if source.started else None
    state = save_scenario(source, check=True)
    destination = open_destination()
    load_scenario(destination, state)
    destination.start(vring_bases=bases)
    return state


# --------------------------------------------------------------------------- cases


@case(
    "VU-DS-1", title="SET_DEVICE_STATE_FD: error or fd, not both", family="device-state",
    level=MUST, clause=f"{RST} Front-end message types: SET_DEVICE_STATE_FD",
    quote="The back-end must not both indicate an error and return a file descriptor.",
    requirement="The reply never reports an error and returns an fd at once, also when the "
        "request is refused (an undefined direction or phase); a returned fd is the one to use.",
    requires=[ProtocolFeature.DEVICE_STATE],
)
def test_set_device_state_fd_error_or_fd(
    vhost_session: Session, vhost_measurements: dict[str, float]
) -> None:
    """On a stopped source, SET_DEVICE_STATE_FD(save, stopped) is answered at once (before we
    read anything) with either success or an error without an fd; when it returns an fd the
    state arrives on that fd, not on the front-end's pipe. Then the error path: direction 2
    and phase 1 (neither defined) must not be answered with an error and an fd together
    (``refused``: how many of the two the back-end refused)."""
    transfer = set_device_state_fd_after_stop(vhost_session)
    vhost_measurements["backend_channel"] = float(transfer.backend_channel)
    try:
        state = read_state(transfer, vhost_session.timeout)
    finally:
        transfer.close()
    vhost_measurements["state_bytes"] = float(len(state))
    refused = [refused_without_fd(vhost_session, 2, STOPPED), refused_without_fd(vhost_session,
                                                                               SAVE, 1)]
    vhost_measurements["refused"] = float(sum(refused))


def refused_without_fd(session: Session, direction: int, phase: int) -> bool:
    """SET_DEVICE_STATE_FD with ``direction``/``phase`` (one of them undefined) and one end of
    a new pipe: CaseFailed when an error comes with an fd; True when it was refused."""
    what = f"SET_DEVICE_STATE_FD (direction {direction}, phase {phase})"
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        reply = session.channel.call(
            F.SET_DEVICE_STATE_FD, DeviceStateTransfer(direction, phase), fds=[write_end],
            timeout=session.timeout, close_surplus_fds=False)
    finally:
        os.close(write_end)
        os.close(read_end)
    if reply is None:  # pragma: no cover - SET_DEVICE_STATE_FD always has a reply body
        raise CaseFailed(what, expected="a u64 reply", seen="none")
    fds = list(reply.fds)
    for fd in fds:
        os.close(fd)
    value = U64.decode(reply.payload).value
    status = value & STATUS_MASK
    if status and (not value & NOFD or fds):
        raise CaseFailed(f"{what} reply: an error and an fd at once",
                         expected="a nonzero status only with bit 8 set and no fd",
                         seen=f"value {value:#x}, {len(fds)} fd(s)")
    return bool(status)


def set_device_state_fd_after_stop(session: Session) -> Transfer:
    """QEMU's stop when the session is started, then SET_DEVICE_STATE_FD(save, stopped)."""
    if session.started:
        session.stop()
    return set_device_state_fd(session, SAVE)


@case(
    "VU-DS-2", title="State transfer is a pipe, checked after", family="device-state", level=MUST,
    clause=f"{RST} Migrating back-end state",
    quote="The nature of the channel is implementation-defined, but it must generally behave like "
        "a pipe: The writing end will write all the data it has into it, signalling the end of "
        "data by closing its end.\n"
        "The reading end must read all of this data (until encountering the end of file) and "
        "process it.\n"
        "The value returned indicates success or error; 0 is success, any non-zero value is an "
        "error.",
    requirement="The state is written to / read from the transfer fd until EOF, and "
        "CHECK_DEVICE_STATE then reports success; after loading bytes that are not a state the "
        "back-end saved it reports an error.",
    requires=[ProtocolFeature.DEVICE_STATE],
    ambiguity="the spec does not say how a back-end checks a loaded state (the format is its "
        "own); a CHECK_DEVICE_STATE that answers 0 to bytes no back-end of its kind could have "
        "saved (the saved state with every bit inverted) cannot report a failed transfer at all, "
        "so the case asks for an error there (QEMU 11.1.3 fails the migration on a non-zero "
        "answer)",
)
def test_state_transfer_is_a_pipe_checked_after(
    vhost_target: BackendTarget, vhost_target_factory: MakeTarget, make_session: SessionFactory,
    vhost_measurements: dict[str, float]
) -> None:
    """The source writes its state until EOF and CHECK_DEVICE_STATE answers 0; a second
    instance reads that state until EOF, CHECK_DEVICE_STATE answers 0, and it starts at the
    source's vring bases."""
    source = make_session(vhost_target)
    target = destination_target(vhost_target, vhost_target_factory)
    destinations: list[Session] = []

    def open_destination() -> Session:
        destinations.append(make_session(target, start=False))
        return destinations[-1]

    state = transfer_scenario(source, open_destination)
    vhost_measurements["state_bytes"] = float(len(state))
    destination = destinations[0]
    destination.stop()
    garbage = bytes(b ^ 0xFF for b in state) or b"\xff" * 16
    transfer = set_device_state_fd(destination, LOAD)
    write_state(transfer, garbage, destination.timeout)
    reply = destination.call(F.CHECK_DEVICE_STATE)
    value = None if reply is None else U64.decode(reply.payload).value
    if value == 0:
        raise CaseFailed(f"CHECK_DEVICE_STATE after loading {len(garbage)} bytes that are not a "
                         "saved state (the saved state, every bit inverted)",
                         expected="non-zero (an error)", seen="0 (success)")
