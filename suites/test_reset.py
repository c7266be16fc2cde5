"""RESET_DEVICE: the back-end disables every ring and returns its device state to the initial
state, keeping ownership (vhost-user.rst (QEMU 11.1.3) "Front-end message types:
RESET_DEVICE"; only with protocol feature RESET_DEVICE, bit 13).

Family: reconnect (VU-RST-2; VU-RST-1, RESET_OWNER, lives in test_reconnect.py). QEMU 11.1.3
never sends RESET_DEVICE to vhost-user-blk (QEMU-TRACES.md correction 12), so the scenario is
ours: after RESET_DEVICE on a started device, a request made available and kicked is not
served; GET_STATUS (when STATUS is negotiated) reads 0; and the start sequence, sent again on
the same connection without SET_OWNER, brings the device back: the request left on the ring is
served once and data written before the reset reads back. Memory regions are not sent again:
a reset device keeps its memory table, as QEMU's front-end assumes when it restarts a device
(it only sends memory-table differences).
"""

from __future__ import annotations

import time

from vhost_conformance.frontend.channel import BackendNack
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.protocol import U64, FrontendRequest, ProtocolFeature
from vhost_conformance.suites.clauses import RST
from vhost_conformance.suites.drivers import do_io, expect_status, stop_now, wait_all
from vhost_conformance.suites.model import MUST, CaseFailed, case

F = FrontendRequest
P = ProtocolFeature

#: Seconds to watch a disabled ring for a completion that must not come.
QUIET = 0.3


def reset_device(session: Session) -> None:
    """RESET_DEVICE, synchronous: with REPLY_ACK NEED_REPLY (the ack must be 0), else a
    GET_FEATURES round trip after it. The session is no longer started afterwards."""
    session.call(F.RESET_DEVICE, need_reply=session.reply_ack)
    if not session.reply_ack:
        session.call(F.GET_FEATURES)
    session.mark_stopped()


@case(
    "VU-RST-2", title="RESET_DEVICE resets to the initial state", family="reconnect", level=MUST,
    clause=f"{RST} Front-end message types: RESET_DEVICE",
    quote="Ask the vhost user back-end to disable all rings and reset all internal device state to "
        "the initial state, ready to be reinitialized.\n"
        "The back-end retains ownership of the device throughout the reset operation.",
    requirement="With RESET_DEVICE negotiated, it disables all rings and resets device state "
        "while keeping ownership.",
    requires=[ProtocolFeature.RESET_DEVICE],
)
def test_reset_device_resets_to_the_initial_state(vhost_session: Session) -> None:
    """RESET_DEVICE on a started device: rings stop serving, status reads 0, and the start
    sequence without SET_OWNER on the same connection brings the device back (the request
    left on the ring is served once, earlier writes read back)."""
    s = vhost_session
    do_io(s, 2, kinds=("write",))
    reset_device(s)
    vq = s.queues[0].vq
    used_before = vq.used_idx_in_memory()
    held = s.queues[0].blk.read(0, 8)
    vq.publish()
    s.kick(0)
    deadline = time.monotonic() + QUIET
    while time.monotonic() < deadline:
        if vq.used_idx_in_memory() != used_before:
            raise CaseFailed("a request made available after RESET_DEVICE",
                             expected="not served (every ring disabled)",
                             seen=f"used->idx moved {used_before} -> "
                             f"{vq.used_idx_in_memory()}")
        time.sleep(0.01)
    if s.has_protocol(P.STATUS):
        reply = s.call(F.GET_STATUS)
        status = None if reply is None else U64.decode(reply.payload).value
        if status != 0:
            raise CaseFailed("GET_STATUS after RESET_DEVICE (the initial device status)",
                             expected="0", seen=None if status is None else f"{status:#x}")
    sent_before = len(s.channel.trace.entries())
    try:
        s.start()  # SET_VRING_BASE = used->idx: the held request is served on restart
    except BackendNack as exc:  # a close or a hang keeps its own verdict (crash, hang)
        raise CaseFailed("the start sequence after RESET_DEVICE, without SET_OWNER "
                         "(ownership is kept)", expected="accepted",
                         seen=f"{type(exc).__name__}: {exc}") from None
    names = [e.name for e in s.channel.trace.entries()[sent_before:]
             if e.direction == "fe->be"]
    if "SET_OWNER" in names:  # our own sequence: the point is that it has none
        raise CaseFailed("the restart after RESET_DEVICE (front-end)",
                         expected="no SET_OWNER", seen=", ".join(names))
    expect_status(wait_all(s, [held]), what="the request left on the ring across the reset")
    # the earlier writes read back (checked against the model), and new I/O works
    do_io(s, 2, kinds=("read",))
    do_io(s, 2, sector=4096)


@case(
    "VU-RST-3", title="GET_STATUS reads back what SET_STATUS wrote", family="reconnect", level=MUST,
    clause="vhost-user.rst (QEMU 11.1.3) Front-end message types: VHOST_USER_GET_STATUS, "
        "VHOST_USER_SET_STATUS",
    quote="When the VHOST_USER_PROTOCOL_F_STATUS protocol feature has been successfully "
    "negotiated, this message is submitted by the front-end to query the back-end for its "
    "device status as defined in the Virtio specification.\n"
    "When the VHOST_USER_PROTOCOL_F_STATUS protocol feature has been successfully "
    "negotiated, this message is submitted by the front-end to notify the back-end with "
    "updated device status as defined in the Virtio specification.",
    requirement="With STATUS negotiated, GET_STATUS after QEMU 11.1.3's start (SET_STATUS 0xF) "
        "and after I/O returns 0xF: the status the front-end set, no bit lost or added; after "
        "QEMU's stop, whose last message is SET_STATUS 0 (a reset, VIRTIO 1.3 2.4), it returns 0.",
    requires=[P.STATUS],
    ambiguity="SET_STATUS 0 is the virtio reset (VIRTIO 1.3 2.1: writing 0 to device status "
        "resets the device; 2.4.1: the device reinitializes status to 0): the status read back "
        "after it is 0",
)
def test_get_status_reads_back(vhost_session: Session) -> None:
    """GET_STATUS after the start and after I/O equals the last SET_STATUS value."""
    s = vhost_session
    written = s.negotiated.status
    if not written:
        raise CaseFailed("the start's SET_STATUS (QEMU-TRACES correction 12)",
                         expected="sent (status 0xf)", seen="not sent")
    for when in ("after the start", "after I/O"):
        if when == "after I/O":
            do_io(s, 1)
        reply = s.call(F.GET_STATUS)
        status = None if reply is None else U64.decode(reply.payload).value
        if status != written:
            raise CaseFailed(f"GET_STATUS {when}", expected=f"{written:#x} (the last SET_STATUS)",
                             seen=None if status is None else f"{status:#x}")
    if "SET_STATUS 0" not in s.sequences[1].names:
        return
    stop_now(s)  # SET_VRING_ENABLE 0, GET_VRING_BASE, SET_STATUS 0 (QEMU 11.1.3's stop)
    reply = s.call(F.GET_STATUS)
    status = None if reply is None else U64.decode(reply.payload).value
    if status != 0:
        raise CaseFailed("GET_STATUS after QEMU's stop (SET_STATUS 0)", expected="0",
                         seen=None if status is None else f"{status:#x}")
