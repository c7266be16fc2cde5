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
