"""A config change the back-end announces: a disk resize brings BACKEND_CONFIG_CHANGE_MSG and
GET_CONFIG then shows the new capacity.

Family: config (VU-CFG-8). Clause: vhost-user.rst (QEMU 11.1.3) "Back-end message types:
VHOST_USER_BACKEND_CONFIG_CHANGE_MSG". The resize is made the way the profile says
(``resize_signal``: the reference back-end; ``resize_qmp``/``resize_node``: qemu-storage-daemon's
``block_resize``); a profile with neither ends the case unsupported.
"""

from __future__ import annotations

import time

from vhost_conformance.frontend.protocol import (
    BackendRequest,
    Config,
    FrontendRequest,
    ProtocolFeature,
)
from vhost_conformance.suites.clauses import RST
from vhost_conformance.suites.drivers import SessionFactory, do_io, provoke_config_change
from vhost_conformance.suites.model import MUST, SHOULD, CaseFailed, Unsupported, case
from vhost_conformance.suites.target import BackendTarget

F = FrontendRequest
P = ProtocolFeature

#: How long a resize may take to be announced.
ANNOUNCE_S = 2.0


@case(
    "VU-CFG-8", title="A disk resize is announced and read back", family="config", level=SHOULD,
    clause=f"{RST} Back-end message types: VHOST_USER_BACKEND_CONFIG_CHANGE_MSG",
    quote="When VHOST_USER_PROTOCOL_F_CONFIG is negotiated, vhost-user back-end sends such "
        "messages to notify that the virtio device’s configuration space has changed, for those "
        "host devices which can support such feature, host driver can send VHOST_USER_GET_CONFIG "
        "message to the back-end to get the latest content.",
    requirement="After the disk grows by 1 MiB, BACKEND_CONFIG_CHANGE_MSG arrives on the back-end "
        "channel within 2 s, and GET_CONFIG then reports the new capacity (a wrong capacity is a "
        "MUST-level finding).",
    requires=[P.CONFIG, P.BACKEND_REQ],
    ambiguity="\"for those host devices which can support such feature\": a back-end need not notice "
        "a resize at all, so a missing message is SHOULD-level (VIRTIO 1.3 5.2.6.2 makes the "
        "notification a SHOULD of the device too); once it announces one, GET_CONFIG must show "
        "the new size",
)
def test_disk_resize_is_announced_and_read_back(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """Grow the disk by 1 MiB while the device runs: a BACKEND_CONFIG_CHANGE_MSG must come,
    then GET_CONFIG's capacity (offset 0, 8 bytes) is the old one + 2048 sectors."""
    session = make_session(vhost_target)
    do_io(session, 1)
    channel = session.backend_channel
    if channel is None:
        raise CaseFailed("back-end channel", expected="set up by SET_BACKEND_REQ_FD", seen="none")
    reply = session.call(F.GET_CONFIG, Config.request(0, 8))
    assert reply is not None
    before = int.from_bytes(Config.decode(reply.payload).data[:8], "little")
    why = provoke_config_change(vhost_target)
    if why is not None:
        raise Unsupported("a way to resize the disk", why)
    deadline = time.monotonic() + ANNOUNCE_S
    while not [m for m in channel.messages() if m.request == BackendRequest.CONFIG_CHANGE_MSG]:
        if time.monotonic() > deadline:
            raise CaseFailed("back-end channel after the disk grew by 1 MiB",
                             expected="BACKEND_CONFIG_CHANGE_MSG",
                             seen=f"nothing in {ANNOUNCE_S:g} s")
        time.sleep(0.01)
    reply = session.call(F.GET_CONFIG, Config.request(0, 8))
    assert reply is not None
    after = int.from_bytes(Config.decode(reply.payload).data[:8], "little")
    if after != before + 2048:
        raise CaseFailed("GET_CONFIG capacity after BACKEND_CONFIG_CHANGE_MSG",
                         expected=f"{before + 2048} sectors (1 MiB more)", seen=after,
                         finding_level=MUST)
