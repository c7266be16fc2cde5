"""peers.qsd: qemu-storage-daemon (host 7.2 and the Debian 13 root's 11.1) as vhost-user-blk."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator

import pytest
from vhost_conformance.peers.provision import PeerUnavailable, peer_path
from vhost_conformance.peers.qsd import (
    FileDisk,
    NullDisk,
    blockdev_arg,
    create_raw_image,
    qsd_args,
    start_qsd,
)

WRAPPER = {"7.2": "qsd-7.2", "11.1": "qsd-11.1"}


def _need(name: str) -> None:
    try:
        peer_path(name)
    except PeerUnavailable as exc:
        pytest.skip(str(exc))


def test_blockdev_for_a_file_and_for_null_co(tmp_path: pathlib.Path) -> None:
    image = tmp_path / "d.img"
    assert blockdev_arg(FileDisk(image), "n0") == f"driver=file,node-name=n0,filename={image}"
    assert blockdev_arg(FileDisk(image, locking=False), "n0").endswith(",locking=off")
    assert blockdev_arg(NullDisk(1 << 30), "n1") == "driver=null-co,node-name=n1,size=1073741824"
    assert blockdev_arg(NullDisk(4096, latency_ns=2_000_000), "n0").endswith(",latency-ns=2000000")


def test_export_arguments(tmp_path: pathlib.Path) -> None:
    args = qsd_args(tmp_path / "s.sock", NullDisk(1 << 20), num_queues=4, writable=False)
    assert args[0] == "--blockdev" and args[2] == "--export"
    export = args[3].split(",")
    assert "type=vhost-user-blk" in export
    assert f"addr.path={tmp_path / 's.sock'}" in export
    assert "num-queues=4" in export and "writable=off" in export and "node-name=n0" in export


def test_create_raw_image_is_sparse_and_sized(tmp_path: pathlib.Path) -> None:
    image = create_raw_image(tmp_path / "d.img", 64 << 20)
    assert image.stat().st_size == 64 << 20
    assert image.stat().st_blocks * 512 < 1 << 20


@pytest.mark.peer("qsd")
@pytest.mark.parametrize("version", ["7.2", "11.1"])
def test_qsd_serves_a_socket_and_stops_on_sigterm(tmp_path: pathlib.Path, version: str) -> None:
    _need(WRAPPER[version])
    sock = tmp_path / "qsd.sock"
    peer = start_qsd(sock, NullDisk(64 << 20), version=version, num_queues=2)
    try:
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert peer.alive()
        # The wrappers exec all the way down: the PID we hold is the daemon itself.
        exe = os.readlink(f"/proc/{peer.process.pid}/exe")
        assert exe.endswith("/qemu-storage-daemon"), exe
        status = peer.terminate(timeout=5)
    finally:
        peer.terminate()
    assert status in (0, -signal.SIGTERM), f"{version}: status {status}; {peer.process.log_tail()}"


@pytest.fixture
def outside_tmp() -> Iterator[pathlib.Path]:
    """A directory not under /tmp or /run, so the chroot sees it only through VC_BINDS."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="vc-qsd-test-", dir=pathlib.Path.home()))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.peer("qsd-11.1")
def test_qsd_11_1_serves_a_file_outside_tmp(outside_tmp: pathlib.Path) -> None:
    _need("qsd-11.1")
    image = create_raw_image(outside_tmp / "disk.img", 16 << 20)
    with start_qsd(outside_tmp / "s.sock", FileDisk(image, locking=False), version="11.1") as peer:
        assert stat.S_ISSOCK(peer.socket.stat().st_mode)
        assert peer.alive(), peer.process.log_tail()


@pytest.mark.peer("qsd-11.1")
def test_qsd_reports_a_missing_image(tmp_path: pathlib.Path) -> None:
    _need("qsd-11.1")
    from vhost_conformance.peers.process import PeerProcessError

    with pytest.raises(PeerProcessError, match=r"(?s)exited before socket.*nothere\.img"):
        start_qsd(
            tmp_path / "s.sock", FileDisk(tmp_path / "nothere.img"), version="11.1", timeout=10
        )
