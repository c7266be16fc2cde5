"""Notification cases: polling instead of the kick and call eventfds (the NOFD bit).

Family: rings (VU-POLL-*). Clauses: vhost-user.rst (QEMU 11.1.3) "Front-end message types:
SET_VRING_KICK / SET_VRING_CALL": bit 8 of the u64 is the invalid FD flag, set when no fd
comes with the message. QEMU 11.1.3 never sets it (QEMU-TRACES correction 7): a back-end
that fails these cases still works under QEMU; other front-ends (poll-mode drivers) use it.
"""

from __future__ import annotations

import contextlib
import os
import time

from vhost_conformance.frontend.blk import BlkCompletion, BlkRequest
from vhost_conformance.frontend.channel import BackendClosed, BackendHang, BackendNack
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.protocol import U64, VRING_NOFD_MASK, FrontendRequest
from vhost_conformance.suites.clauses import RST
from vhost_conformance.suites.drivers import (
    SessionFactory,
    do_io,
    expect_status,
    partial_start,
    pattern,
    wait_all,
)
from vhost_conformance.suites.model import SHOULD, CaseFailed, CaseNonStrict, Unsupported, case
from vhost_conformance.suites.target import BackendTarget

F = FrontendRequest

#: How polling may be refused, and what we make of it (both cases).
NOFD_AMBIGUITY = (
    "The spec gives the NOFD bit a meaning but no way to decline it. We read it as: a back-end "
    "that accepts the message must then poll (kick) or do without the call fd (call); one that "
    "cannot may refuse it with a non-zero REPLY_ACK status (the case then ends unsupported). "
    "Accepting the message and then ignoring the bit is the failure. QEMU 11.1.3 never sets the "
    "bit."
)


def _send_nofd(session: Session, request: FrontendRequest, index: int) -> None:
    """``request`` (SET_VRING_KICK or SET_VRING_CALL) for vring ``index`` with the NOFD bit and
    no fd, NEED_REPLY when REPLY_ACK was negotiated; a refusal ends the case unsupported."""
    name = request.name
    try:
        session.call(request, U64(index | VRING_NOFD_MASK), need_reply=session.reply_ack)
        if not session.reply_ack:
            session.call(F.GET_FEATURES)  # a barrier: the message was handled
    except BackendNack as exc:
        raise Unsupported(f"polling ({name} with NOFD)",
                          f"refused with REPLY_ACK status {exc.status:#x}") from None
    except BackendClosed:
        raise CaseNonStrict(
            f"{name} with the NOFD bit (bit 8) and no fd: the back-end closed the connection "
            "(a non-zero REPLY_ACK would have said it cannot poll)"
        ) from None


@case(
    "VU-POLL-1", title="SET_VRING_KICK with NOFD: the ring is polled", family="rings", level=SHOULD,
    clause=f"{RST} Front-end message types: SET_VRING_KICK",
    quote="Bit 8 is the invalid FD flag. This flag is set when there is no file descriptor in the "
        "ancillary data. This signals that polling should be used instead of waiting for the kick.",
    requirement="After SET_VRING_KICK with bit 8 set and no fd (the ring starts on it), requests "
        "published without any kick complete; or the message is refused with a non-zero REPLY_ACK "
        "status.",
    ambiguity=NOFD_AMBIGUITY,
)
def test_kick_nofd_polls(vhost_target: BackendTarget, make_session: SessionFactory) -> None:
    """A ring started by SET_VRING_KICK with NOFD serves requests no kick announced."""
    session = make_session(vhost_target, start=False)
    partial_start(session)
    _send_nofd(session, F.SET_VRING_KICK, 0)
    # the rest of QEMU's start: no kick step, no injected kick
    session.run_start(begin="SET_VRING_ENABLE 1")
    blk = session.queues[0].blk
    for round_ in range(2):
        sector = 64 + 16 * round_
        data = pattern(sector, 4096)
        write = blk.write(sector, data)
        session.queues[0].vq.publish()  # published, never kicked (the back-end has no kick fd)
        expect_status(_polled(session, write, round_), what="write on a polled ring")
        read = blk.read(sector, 8)
        session.queues[0].vq.publish()
        done = _polled(session, read, round_)
        expect_status(done, what="read on a polled ring")
        if done[0].data != data:
            raise CaseFailed(f"read of sector {sector} on a polled ring",
                             expected="the data written", seen="other bytes")


def _polled(session: Session, request: BlkRequest, round_: int) -> list[BlkCompletion]:
    """Wait for ``request``, published on a ring in polling mode and never kicked."""
    try:
        return wait_all(session, [request])
    except BackendHang:
        raise CaseNonStrict(
            f"a request published on vring 0 after SET_VRING_KICK with NOFD (round {round_ + 1}) "
            f"did not complete within {session.timeout:.1f} s: the back-end accepted the NOFD "
            "bit but does not poll the ring"
        ) from None


@case(
    "VU-POLL-2", title="SET_VRING_CALL with NOFD: no call fd, completions still come",
    family="rings", level=SHOULD, clause=f"{RST} Front-end message types: SET_VRING_CALL",
    quote="Bit 8 is the invalid FD flag. This flag is set when there is no file descriptor in the "
        "ancillary data. This signals that polling will be used instead of waiting for the call.",
    requirement="After SET_VRING_CALL with bit 8 set and no fd on a running ring, requests still "
        "complete in the used ring and the call fd it replaced is not signalled any more; or the "
        "message is refused with a non-zero REPLY_ACK status.",
    ambiguity=NOFD_AMBIGUITY,
)
def test_call_nofd_completes(vhost_target: BackendTarget, make_session: SessionFactory) -> None:
    """SET_VRING_CALL with NOFD: completions still arrive (found by polling the used ring) and
    the withdrawn call fd stays quiet."""
    session = make_session(vhost_target)
    do_io(session, 1)
    _send_nofd(session, F.SET_VRING_CALL, 0)
    queue = session.queues[0]
    withdrawn = queue.call_fd
    # the session waits on an eventfd the back-end never got (it polls the used ring too):
    # the withdrawn one is read only at the end
    queue.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        time.sleep(0.05)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(withdrawn)  # anything signalled before the message was handled
        try:
            do_io(session, 3, sector=128)
        except BackendHang as exc:
            raise CaseNonStrict(
                f"after SET_VRING_CALL with NOFD the back-end stopped completing requests "
                f"({exc}): it cannot do without a call fd"
            ) from None
        time.sleep(0.1)
        try:
            signals = os.eventfd_read(withdrawn)
        except BlockingIOError:
            signals = 0
    finally:
        os.close(queue.call_fd)
        queue.call_fd = withdrawn
    if signals:
        raise CaseNonStrict(
            f"the call fd replaced by SET_VRING_CALL with NOFD was signalled ({signals} times "
            "for 6 completions): the back-end kept the fd the front-end withdrew"
        )
