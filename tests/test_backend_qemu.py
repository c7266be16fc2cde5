"""The reference back-end under a real QEMU 11.1.3 (the tiny guest of PEERS.md) and under
qemu-img bench (libblkio). Skipped with the reason when the peers are not provisioned."""

from __future__ import annotations

import pathlib
import time

import pytest
from vhost_conformance.peers.provision import PeerUnavailable, peer_path
from vhost_conformance.peers.qemu import VhostUserBlkDisk, qemu_img_bench, start_qemu

from tests.backend_helpers import running_backend

BLOCK = 4096


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


@pytest.mark.peer("qemu-11.1")
@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_guest_passes(tmp_path: pathlib.Path, packed: bool) -> None:
    _need_qemu()
    image = _image(tmp_path / "disk.img")
    sock = tmp_path / "be.sock"
    with (
        running_backend(sock, "--disk", str(image), "--queues", "2", log=tmp_path / "be.log"),
        start_qemu(
            tmp_path,
            [VhostUserBlkDisk(sock, num_queues=2, packed=packed, inflight_migration=True)],
            name="guest",
        ) as guest,
    ):
        result = guest.wait_for_result(timeout=120)
        status = guest.process.wait(10)
    log = (tmp_path / "be.log").read_text()
    assert result.passed, f"{result.marker}\n{result.serial}\n{log[-3000:]}"
    assert status == 0
    assert "GET_INFLIGHT_FD" in log and "SET_INFLIGHT_FD" in log
    written = image.read_bytes()[16 * BLOCK : 32 * BLOCK]
    assert written.count(0) < len(written) // 2
    print(
        f"QEMU 11.1.3 + reference back-end ({'packed' if packed else 'split'}): PASS after {result.seconds:.2f} s"
    )


@pytest.mark.peer("qemu-11.1")
@pytest.mark.slow
def test_qemu_img_bench(tmp_path: pathlib.Path) -> None:
    _need("qemu-img-11.1")
    sock = tmp_path / "bench.sock"
    with running_backend(sock, "--ram-disk", "64M"):
        t0 = time.monotonic()
        iops = qemu_img_bench(sock, count=20000, depth=32)
    assert iops > 0
    print(
        f"qemu-img bench (libblkio) against the reference back-end: {iops:.0f} IOPS "
        f"({time.monotonic() - t0:.1f} s)"
    )


@pytest.mark.peer("qemu-11.1")
@pytest.mark.slow
def test_live_migration_with_inflight_migration(tmp_path: pathlib.Path) -> None:
    """QEMU-TRACES (e): two QEMUs with inflight-migration=on, one reference back-end each on
    the same image, slow I/O so requests are in flight at the switch-over (bit 20: the
    source suspends them, the destination resubmits them from the migrated region)."""
    _need_qemu()
    image = _image(tmp_path / "disk.img")
    mig = tmp_path / "mig.sock"
    src_sock, dst_sock = tmp_path / "src.sock", tmp_path / "dst.sock"
    slow = ("--disk", str(image), "--latency", "30")
    with (
        running_backend(src_sock, *slow, log=tmp_path / "src-be.log"),
        running_backend(dst_sock, *slow, log=tmp_path / "dst-be.log"),
        start_qemu(
            tmp_path, [VhostUserBlkDisk(src_sock, inflight_migration=True)], name="src",
            mode="loop", iters=30, delay=0.05,
        ) as source,
        start_qemu(
            tmp_path, [VhostUserBlkDisk(dst_sock, inflight_migration=True)], name="dst",
            mode="loop", iters=30, delay=0.05, incoming="defer",
        ) as destination,
    ):  # fmt: skip
        source.wait_for_iteration(3, timeout=120)
        destination.qmp().migrate_incoming(f"unix:{mig}")
        source.qmp().migrate_set_parameters(downtime_limit=300)
        source.qmp().migrate(f"unix:{mig}")
        info = source.qmp().wait_migration(timeout=90)
        result = destination.wait_for_result(timeout=180)
    src_log = (tmp_path / "src-be.log").read_text()
    dst_log = (tmp_path / "dst-be.log").read_text()
    assert result.passed, f"{result.marker}\n{result.serial}\n{dst_log[-3000:]}"
    assert "SET_LOG_BASE" in src_log and "GET_VRING_BASE" in src_log
    assert "SET_INFLIGHT_FD" in dst_log and "GET_INFLIGHT_FD" not in dst_log
    print(
        f"migration with inflight-migration=on: total {info.get('total-time')} ms, downtime "
        f"{info.get('downtime')} ms; source suspended: {'suspending' in src_log}; destination "
        f"resubmitted: {'resubmitting' in dst_log}"
    )


@pytest.mark.peer("qemu-11.1")
@pytest.mark.slow
def test_reconnect_after_crash_mid_io(tmp_path: pathlib.Path) -> None:
    """QEMU-TRACES (d): the back-end dies (SIGKILL at a crash point) with a request in
    flight; restarted on the same image, QEMU reconnects, hands the region back, and the
    guest finishes its loop."""
    _need_qemu()
    image = _image(tmp_path / "disk.img")
    sock = tmp_path / "be.sock"
    with start_qemu(
        tmp_path, [VhostUserBlkDisk(sock, reconnect_ms=200)], name="guest",
        mode="loop", iters=12, delay=0.05,
    ) as guest:  # fmt: skip
        with running_backend(sock, "--disk", str(image), "--crash-at", "after-data:200",
                             log=tmp_path / "be1.log", expect_exit=None) as first:  # fmt: skip
            assert first.wait(timeout=120) == -9
        sock.unlink(missing_ok=True)
        with running_backend(sock, "--disk", str(image), log=tmp_path / "be2.log"):
            result = guest.wait_for_result(timeout=180)
    log = (tmp_path / "be2.log").read_text()
    assert result.passed, f"{result.marker}\n{result.serial}\n{log[-3000:]}"
    assert "SET_INFLIGHT_FD" in log and "GET_INFLIGHT_FD" not in log
    print(f"reconnect after a crash at after-data: PASS, resubmitted: {'resubmitting' in log}")
