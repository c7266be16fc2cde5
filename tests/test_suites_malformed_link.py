"""The malformed family's hand-built connection (suites/test_malformed.Link) negotiates as
QEMU does: GET_PROTOCOL_FEATURES on every connection before SET_PROTOCOL_FEATURES (rust-vmm's
vhost, in virtiofsd, enables REPLY_ACK only for bits offered on that connection: without the
GET, VU-FD-4 waited 5 s for a reply that never came)."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import tempfile

from vhost_conformance.suites.target import (
    CommandTarget,
    load_profile,
    probe_capabilities,
)
from vhost_conformance.suites.test_malformed import Link


def test_link_open_asks_the_protocol_offer_first() -> None:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="vct-", dir="/tmp"))
    target = CommandTarget(load_profile("reference"), workdir / "t", stop_timeout=5)
    try:
        target.start()
        with contextlib.closing(target.connect_socket(5)) as sock:
            caps = probe_capabilities(sock, 5)
        link = Link(target, caps, 5.0)
        channel = link.open()
        sent = [e.name for e in channel.trace.entries() if e.direction == "fe->be"]
        link.close()
        assert sent[:4] == [
            "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "SET_OWNER"
        ], sent
    finally:
        target.stop()
        shutil.rmtree(workdir, ignore_errors=True)
