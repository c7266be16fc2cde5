"""Exactly-once accounting against DPDK 22.11's vhost_blk example (rte_vhost, INFLIGHT_SHMFD,
split ring): SIGKILL at random moments during queue-depth-64 I/O, many rounds, the held region
read right after each kill as the oracle of what was in flight, restart, reconnect
(QEMU-TRACES (d)). The test records the ledger's verdict on what the example does as a
finding; it passes when the accounting ran and its verdict agrees with what it observed.
The example's RAM disk is private per process (PEERS.md), so data across restarts is not
checked (no model disk)."""

from __future__ import annotations

import pathlib
import random
import signal
import time
from collections.abc import Callable

import pytest
from vhost_conformance.frontend.accounting import Ledger
from vhost_conformance.frontend.blk import SECTOR_SIZE
from vhost_conformance.frontend.channel import Channel
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.migration import harvest_all, reconnect
from vhost_conformance.frontend.protocol import ProtocolFeature, has
from vhost_conformance.peers.dpdk import start_dpdk_vhost_blk
from vhost_conformance.peers.process import SocketPeer
from vhost_conformance.peers.provision import PeerUnavailable, peer_path

TIMEOUT = 10.0
DEPTH = 64
ROUNDS = 12
#: the example offers no INDIRECT: 3 descriptors per request, 64 in flight need 192
QUEUE_SIZE = 256
DPDK_SECTORS = (128 << 20) // SECTOR_SIZE


def top_up(s: Session, ledger: Ledger, rng: random.Random) -> None:
    """Make requests available until DEPTH are outstanding (writes and reads of 4 KiB)."""
    q = s.queues[0]
    added = 0
    while len(q.blk.outstanding) < DEPTH:
        sector = rng.randrange(0, DPDK_SECTORS // 8) * 8
        if rng.random() < 0.5:
            r = q.blk.write(sector, rng.randbytes(4096))
        else:
            r = q.blk.read(sector, 8)
        ledger.submit(r)
        added += 1
    if added:
        s.submit(0)


def run_for(s: Session, ledger: Ledger, rng: random.Random, seconds: float) -> None:
    """Keep DEPTH requests in flight for ``seconds``, harvesting as they complete."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        harvest_all(s, ledger)
        top_up(s, ledger, rng)
        time.sleep(0.001)


def kill(peer: SocketPeer) -> None:
    """SIGKILL the example and reap it (no SIGCONT/SIGTERM first)."""
    peer.process.signal(signal.SIGKILL)
    assert peer.process.wait(TIMEOUT) == -signal.SIGKILL, peer.process.log_tail()
    peer.terminate()  # reaped already; removes its EAL runtime directory


@pytest.mark.peer("dpdk-vhost-blk")
def test_dpdk_random_kills_exactly_once_verdict(
    tmp_path: pathlib.Path, record_property: Callable[[str, object], None]
) -> None:
    try:
        peer_path("dpdk-vhost-blk")
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    rng = random.Random("dpdk-kills")
    ledger = Ledger()
    rounds: list[str] = []
    directory = tmp_path / "dpdk"
    with GuestMemory.simple(16 << 20, regions=2) as memory:
        peer = start_dpdk_vhost_blk(directory)
        s = Session(Channel.connect(peer.socket, timeout=TIMEOUT), memory, timeout=TIMEOUT,
                    queue_size=QUEUE_SIZE)
        try:
            s.connect()
            s.start()
            assert has(s.negotiated.protocol_features, ProtocolFeature.INFLIGHT_SHMFD)
            assert s.inflight is not None
            for i in range(ROUNDS):
                run_for(s, ledger, rng, rng.uniform(0.005, 0.08))
                outstanding = len(s.queues[0].vq.in_flight)
                kill(peer)
                peer = start_dpdk_vhost_blk(directory)
                rec = reconnect(s, Channel.connect(peer.socket, timeout=TIMEOUT),
                                ledger=ledger, hop=f"restart-{i + 1}")
                assert rec.oracle is not None, "the region the front-end holds did not parse"
                rounds.append(f"round {i + 1}: {outstanding} outstanding at the kill, "
                              f"{rec.harvested_before} used entries left by the dead back-end, "
                              f"{len(rec.oracle_heads[0])} heads marked in the region")
            # last hop: let everything outstanding complete, then watch for extras
            deadline = time.monotonic() + 5.0
            while s.queues[0].vq.in_flight and time.monotonic() < deadline:
                harvest_all(s, ledger)
                time.sleep(0.005)
            time.sleep(0.3)
            harvest_all(s, ledger)
            alive = peer.alive()
        finally:
            s.close()
            peer.terminate()
    summary = ledger.summary()
    findings = ledger.findings()
    kinds: dict[str, int] = {}
    for f in findings:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    verdict = ("exactly once" if summary.exactly_once else
               f"NOT exactly once: {kinds}")
    record_property("finding", f"DPDK vhost_blk random kills x{ROUNDS}: {verdict}; {summary}")
    record_property("rounds", "; ".join(rounds))
    for f in findings[:20]:
        print(f)
    print(verdict, summary, *rounds, sep="\n")
    # the verdict agrees with the observations
    assert alive, "the example died on its own after the last restart"
    assert summary.submitted == len(ledger.submitted) > ROUNDS * DEPTH // 2
    assert summary.completed_once + summary.lost + summary.double == summary.submitted
    assert kinds.get("lost", 0) == summary.lost
    assert kinds.get("double", 0) == summary.double
    assert kinds.get("completed-again", 0) + kinds.get("unknown-head", 0) == summary.stray
    assert summary.exactly_once == (not findings or all(f.kind == "status" for f in findings))
