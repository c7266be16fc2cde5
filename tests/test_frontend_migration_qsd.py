"""frontend/migration.py against qemu-storage-daemon 11.1.3 (libvhost-user; no INFLIGHT_SHMFD,
so QEMU migrates with a draining stop): 8 reads held on a 100 ms null-co disk, source ->
destination. The ledger and the suspended-state check give the verdict on what the daemon
does; the test records it as a finding and passes when the verdict agrees with what was
observed (a request that never completed must have been taken by the source, which then
answered GET_VRING_BASE without draining; what it completes after the reply, if anything,
lands in RAM the destination never sees)."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable

import pytest
from vhost_conformance.frontend.accounting import Ledger
from vhost_conformance.frontend.channel import Channel
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.migration import harvest_all, migrate, prepare_destination
from vhost_conformance.peers.provision import PeerUnavailable, peer_path
from vhost_conformance.peers.qsd import NullDisk, start_qsd

TIMEOUT = 10.0
LATENCY_NS = 100_000_000
HELD = 8


@pytest.mark.peer("qsd-11.1")
def test_qsd_migration_with_held_reads_verdict(
    tmp_path: pathlib.Path, record_property: Callable[[str, object], None]
) -> None:
    try:
        peer_path("qsd-11.1")
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    disk = NullDisk(64 << 20, latency_ns=LATENCY_NS)
    ledger = Ledger()
    with (
        start_qsd(tmp_path / "src.sock", disk, version="11.1") as src_peer,
        start_qsd(tmp_path / "dst.sock", disk, version="11.1") as dst_peer,
        GuestMemory.simple(8 << 20) as memory,
    ):
        src = Session(Channel.connect(src_peer.socket, timeout=TIMEOUT), memory, timeout=TIMEOUT)
        result = None
        try:
            src.connect()
            src.start()
            dst = prepare_destination(src, Channel.connect(dst_peer.socket, timeout=TIMEOUT))
            q = src.queues[0]
            for i in range(HELD):
                ledger.submit(q.blk.read(i * 8, 8))
            src.submit(0)
            time.sleep(0.03)
            result = migrate(src, dst, ledger=ledger)
            deadline = time.monotonic() + 1.0
            while ledger.outstanding() and time.monotonic() < deadline:
                harvest_all(result.destination, ledger)
                time.sleep(0.01)
            suspended = result.finish(0.3)
        finally:
            if result is not None:
                result.finish(0)
                result.destination.close()
            else:
                src.close()
    summary = ledger.summary()
    used_ring_writes = [f for f in suspended if f.kind == "suspended-write"
                        and "used ring" in f.where]
    verdict = (f"GET_VRING_BASE {result.stop.stop_latency * 1e3:.1f} ms with {HELD} reads "
               f"held on a 100 ms disk; {summary}; after the reply the source wrote "
               f"{len(suspended)} range(s) of guest memory"
               + (f" (used ring: {used_ring_writes[0].what})" if used_ring_writes else ""))
    record_property("finding", f"qemu-storage-daemon 11.1.3 migration: {verdict}")
    print(verdict)
    for f in ledger.findings()[:4] + suspended[:4]:
        print(f)
    assert summary.submitted == HELD
    assert summary.completed_once + summary.lost + summary.double == HELD
    if summary.lost:
        # without bit 20 nothing can carry a request to the destination: a loss means the
        # source answered GET_VRING_BASE before the requests it had taken were complete (it
        # did not drain); whatever it completes later lands in RAM the destination never sees
        assert result.stop.stop_latency < LATENCY_NS / 1e9, "a drained stop lost requests"
        assert result.stop.vring_bases[0] == HELD, "requests lost that were never taken"
    else:
        assert summary.exactly_once
