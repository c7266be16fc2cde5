"""The reference back-end under a real QEMU 11.1.3 (the tiny guest of PEERS.md) and under
qemu-img bench (libblkio): boot with split, packed and two queues, reconnect after a crash with a
request in flight, live migration with ``inflight-migration=on`` (protocol feature 20) and off.
Skipped with the reason when the peers are not provisioned (``scripts/provision-peers``).

The back-end runs as a program (``python -m vhost_conformance.backend ... --log FILE -vv``); what
it did is read from its log: the messages (``<- NAME``), "suspending N in-flight request(s)" at
GET_VRING_BASE (bit 20) and "resubmitting" from the in-flight region (backend/device.py).
"""

from __future__ import annotations

import pathlib
import re
import time
from dataclasses import dataclass
from typing import Any

import pytest
from vhost_conformance.peers.provision import PeerUnavailable, peer_path
from vhost_conformance.peers.qemu import VhostUserBlkDisk, qemu_img_bench, start_qemu

from tests.backend_helpers import running_backend

BLOCK = 4096
# The guest's /init (scripts/provision-peers): round i writes `blocks` 4 KiB blocks at block
# (i % 16) * blocks, each "VC-PATTERN round=i disk=D block=b boot=T" padded with spaces to 4095
# bytes plus "\n", reads them back with O_DIRECT and compares.
PATTERN_RE = re.compile(rb"VC-PATTERN round=(\d+) disk=(\S+) block=(\d+) boot=[0-9.]+ *\n")
SUSPENDED_RE = re.compile(r"GET_VRING_BASE\((\d+)\): suspending (\d+) in-flight request")


def _need(*names: str) -> None:
    for name in names:
        try:
            peer_path(name)
        except PeerUnavailable as exc:
            pytest.skip(str(exc))


def _need_qemu() -> None:
    _need("qemu-system-x86_64-11.1", "guest-kernel", "guest-initrd")


def _image(path: pathlib.Path, size: int = 64 << 20) -> pathlib.Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def pattern_problems(image: bytes, rounds: range, blocks: int, disk: str = "/dev/vda") -> list[str]:
    """What in ``image`` differs from the guest's pattern of ``rounds`` (the last round that
    wrote each slot wins); ``[]`` when every block holds its expected line."""
    latest: dict[int, int] = {}
    for i in rounds:
        latest[(i % 16) * blocks] = i
    problems = []
    for seek, i in sorted(latest.items()):
        for b in range(blocks):
            at = (seek + b) * BLOCK
            block = image[at : at + BLOCK]
            m = PATTERN_RE.fullmatch(block)
            want = (i, disk, b)
            seen = (int(m[1]), m[2].decode(), int(m[3])) if m else block[:60]
            if seen != want:
                problems.append(
                    f"block {seek + b}: expected round/disk/block {want}, seen {seen!r}"
                )
    return problems


def received(log: str, name: str) -> int:
    """How many ``name`` messages the back-end's -vv log says it received."""
    return len(re.findall(rf"<- {re.escape(name)} flags", log))


def connections(log: str) -> list[str]:
    """The back-end's log cut at each "front-end connected" line (one piece per connection)."""
    pieces = re.split(r"^.*front-end connected \(connection \d+\)$", log, flags=re.MULTILINE)
    return pieces[1:]


# -- 1. boot: split, packed, two queues --------------------------------------------------------


@pytest.mark.peer("qemu-11.1")
@pytest.mark.slow
@pytest.mark.parametrize(
    ("queues", "packed"), [(1, False), (1, True), (2, False)], ids=["split", "packed", "2q"]
)
def test_guest_passes(tmp_path: pathlib.Path, queues: int, packed: bool) -> None:
    """QEMU-TRACES (a)-(c): the guest writes, reads back and compares 16 blocks, then powers off."""
    _need_qemu()
    image = _image(tmp_path / "disk.img")
    sock, log_path = tmp_path / "be.sock", tmp_path / "be.log"
    # Two vCPUs with two queues: Linux maps one queue per CPU, so QEMU starts both vrings (with
    # one vCPU it starts only vring 0: the guest never gives vring 1 an address).
    smp = ["-smp", str(queues)] if queues > 1 else []
    with (
        running_backend(sock, "--disk", str(image), "--queues", str(queues), log=log_path),
        start_qemu(
            tmp_path, [VhostUserBlkDisk(sock, num_queues=queues, packed=packed)],
            name="guest", extra_args=smp,
        ) as guest,
    ):  # fmt: skip
        result = guest.wait_for_result(timeout=120)
        status = guest.process.wait(10)
    log = log_path.read_text()
    assert result.passed, f"{result.marker}\n{result.serial}\n{log[-3000:]}"
    assert status == 0
    (conn,) = connections(log)
    assert received(conn, "GET_INFLIGHT_FD") == 1 and received(conn, "SET_INFLIGHT_FD") == 1
    assert received(conn, "SET_VRING_KICK") == queues, "every vring started"
    assert received(conn, "GET_VRING_BASE") == queues, "every vring stopped at poweroff"
    assert "ERROR" not in log, log[-3000:]
    assert pattern_problems(image.read_bytes(), range(1, 2), 16) == []
    print(f"QEMU 11.1.3 + reference back-end, {queues} queue(s), packed={packed}: PASS "
          f"after {result.seconds:.2f} s")  # fmt: skip


@pytest.mark.peer("qemu-11.1")
@pytest.mark.slow
def test_qemu_img_bench(tmp_path: pathlib.Path) -> None:
    """libblkio (REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS) reads at depth 32 complete."""
    _need("qemu-img-11.1")
    sock = tmp_path / "bench.sock"
    with running_backend(sock, "--ram-disk", "64M"):
        t0 = time.monotonic()
        iops = qemu_img_bench(sock, count=20000, depth=32)
    assert iops > 1000
    print(
        f"qemu-img bench (libblkio) against the reference back-end: {iops:.0f} IOPS "
        f"({time.monotonic() - t0:.1f} s)"
    )


# -- 2. reconnect after a crash with a request in flight ---------------------------------------


@pytest.mark.peer("qemu-11.1")
@pytest.mark.slow
def test_reconnect_after_crash_mid_io(tmp_path: pathlib.Path) -> None:
    """QEMU-TRACES (d): the back-end (50 ms per request) SIGKILLs itself right after taking the
    20th request from the ring (marked in flight in the region, no data moved); restarted on the
    same image, QEMU (reconnect-ms=500) hands the region back with SET_INFLIGHT_FD and no
    GET_INFLIGHT_FD; the back-end resubmits; the guest finishes its rounds with verified data."""
    _need_qemu()
    image = _image(tmp_path / "disk.img")
    sock = tmp_path / "be.sock"
    iters, blocks = 4, 4
    slow = ("--disk", str(image), "--latency", "50")
    with start_qemu(
        tmp_path, [VhostUserBlkDisk(sock, reconnect_ms=500)], name="guest",
        mode="loop", iters=iters, blocks=blocks,
    ) as guest:  # fmt: skip
        with running_backend(
            sock, *slow, "--crash-at", "after-pop:20", log=tmp_path / "be1.log", expect_exit=None
        ) as first:
            assert first.wait(timeout=120) == -9
        assert guest.iterations() < iters, "the crash came too late to matter"
        sock.unlink(missing_ok=True)  # SIGKILL left it; wait for the new back-end's socket
        with running_backend(sock, *slow, log=tmp_path / "be2.log"):
            result = guest.wait_for_result(timeout=120)
    first_log, log = (tmp_path / "be1.log").read_text(), (tmp_path / "be2.log").read_text()
    assert result.passed, f"{result.marker}\n{result.serial}\n{log[-3000:]}"
    assert received(first_log, "GET_INFLIGHT_FD") == 1
    conn = connections(log)[0]
    assert received(conn, "SET_INFLIGHT_FD") == 1 and received(conn, "GET_INFLIGHT_FD") == 0
    assert received(conn, "GET_CONFIG") == 0  # QEMU-TRACES (d): not sent on reconnect
    resubmitted = re.findall(r"vring 0: resubmitting heads \[([\d, ]+)\]", conn)
    assert resubmitted, f"nothing resubmitted after the crash:\n{conn[-3000:]}"
    assert pattern_problems(image.read_bytes(), range(1, iters + 1), blocks) == []
    print(f"reconnect after a crash at after-pop:20: PASS, resubmitted heads {resubmitted}")


# -- 3. live migration -------------------------------------------------------------------------


@dataclass
class Migration:
    """What one live migration of the looping guest showed."""

    info: dict[str, Any]  # the source's last query-migrate
    passed: bool
    marker: str
    src_log: str
    dst_log: str
    suspended: int  # requests the source back-end suspended at GET_VRING_BASE (bit 20)
    resubmitted: bool  # the destination back-end resubmitted from the region
    image: bytes
    rounds: range
    blocks: int


def migrate_looping_guest(
    tmp_path: pathlib.Path, *, inflight_migration: bool, latency_ms: int = 100
) -> Migration:
    """QEMU-TRACES (e): two QEMUs (the destination ``-incoming defer``), one reference back-end
    each on one image, slow I/O so a request is in flight at the switch-over; the guest loops
    and finishes on the destination."""
    image = _image(tmp_path / "disk.img")
    mig = tmp_path / "mig.sock"
    src_sock, dst_sock = tmp_path / "src.sock", tmp_path / "dst.sock"
    slow = ("--disk", str(image), "--latency", str(latency_ms))
    iters, blocks = 4, 4
    loop: dict[str, Any] = {"mode": "loop", "iters": iters, "blocks": blocks}
    with (
        running_backend(src_sock, *slow, log=tmp_path / "src-be.log"),
        running_backend(dst_sock, *slow, log=tmp_path / "dst-be.log"),
        start_qemu(
            tmp_path, [VhostUserBlkDisk(src_sock, inflight_migration=inflight_migration)],
            name="src", **loop,
        ) as source,
        start_qemu(
            tmp_path, [VhostUserBlkDisk(dst_sock, inflight_migration=inflight_migration)],
            name="dst", incoming="defer", **loop,
        ) as destination,
    ):  # fmt: skip
        source.wait_for_iteration(1, timeout=120)
        destination.qmp().migrate_incoming(f"unix:{mig}")
        source.qmp().migrate_set_parameters(downtime_limit=300)
        source.qmp().migrate(f"unix:{mig}")
        info = source.qmp().wait_migration(timeout=90)
        result = destination.wait_for_result(timeout=120)
    src_log = (tmp_path / "src-be.log").read_text()
    dst_log = (tmp_path / "dst-be.log").read_text()
    return Migration(
        info=info,
        passed=result.passed,
        marker=f"{result.marker}\n{result.serial}",
        src_log=src_log,
        dst_log=dst_log,
        suspended=sum(int(m[2]) for m in SUSPENDED_RE.finditer(src_log)),
        resubmitted="resubmitting" in dst_log,
        image=image.read_bytes(),
        rounds=range(1, iters + 1),
        blocks=blocks,
    )


@pytest.mark.peer("qemu-11.1")
@pytest.mark.slow
@pytest.mark.parametrize("inflight_migration", [True, False], ids=["inflight-on", "inflight-off"])
def test_live_migration(tmp_path: pathlib.Path, inflight_migration: bool) -> None:
    """=on: bit 20 negotiated, the source suspends the request in flight at GET_VRING_BASE, the
    region travels in the stream, the destination gets it by SET_INFLIGHT_FD (no GET_INFLIGHT_FD)
    and resubmits. =off: the source drains, the destination starts a fresh region."""
    _need_qemu()
    m = migrate_looping_guest(tmp_path, inflight_migration=inflight_migration)
    assert m.passed, f"{m.marker}\n{m.dst_log[-3000:]}"
    assert m.info["status"] == "completed"
    # Source: dirty logging, then the stop at the switch-over (QEMU-TRACES (e)).
    assert received(m.src_log, "SET_LOG_BASE") == 1 and received(m.src_log, "GET_VRING_BASE") >= 1
    (dst,) = connections(m.dst_log)
    assert received(dst, "SET_INFLIGHT_FD") == 1
    if inflight_migration:
        # With latency 100 ms and the guest's back-to-back O_DIRECT requests one is (almost
        # always) pending at GET_VRING_BASE; the back-end suspends only with bit 20 negotiated.
        assert m.suspended >= 1, f"source did not suspend:\n{m.src_log[-2000:]}"
        assert received(dst, "GET_INFLIGHT_FD") == 0
        assert m.resubmitted, f"destination did not resubmit:\n{m.dst_log[-2000:]}"
    else:
        assert m.suspended == 0 and received(dst, "GET_INFLIGHT_FD") == 1
        assert not m.resubmitted
    assert pattern_problems(m.image, m.rounds, m.blocks) == []
    print(
        f"migration inflight-migration={'on' if inflight_migration else 'off'}: total "
        f"{m.info.get('total-time')} ms, downtime {m.info.get('downtime')} ms, suspended "
        f"{m.suspended}, resubmitted {m.resubmitted}"
    )
