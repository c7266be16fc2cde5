"""peers.qemu: QEMU 11.1.3 boots the tiny guest against real back-ends; QMP; qemu-img bench."""

from __future__ import annotations

import pathlib
import signal
import time

import pytest
from vhost_conformance.peers.dpdk import start_dpdk_vhost_blk
from vhost_conformance.peers.provision import PeerUnavailable, peer_path
from vhost_conformance.peers.qemu import (
    QMP,
    VhostUserBlkDisk,
    guest_kernel_args,
    parse_bench_seconds,
    qemu_args,
    qemu_img_bench,
    start_qemu,
)
from vhost_conformance.peers.qsd import FileDisk, NullDisk, create_raw_image, start_qsd

BLOCK = 4096


def _need(*names: str) -> None:
    for name in names:
        try:
            peer_path(name)
        except PeerUnavailable as exc:
            pytest.skip(str(exc))


def _need_qemu() -> None:
    _need("qemu-system-x86_64-11.1", "guest-kernel", "guest-initrd")


# -- pure ------------------------------------------------------------------------------------


def test_device_arguments() -> None:
    disk = VhostUserBlkDisk(
        pathlib.Path("/tmp/x.sock"),
        num_queues=2,
        packed=True,
        inflight_migration=True,
        reconnect_ms=500,
    )
    chardev, device = disk.args(3)[1], disk.args(3)[3]
    assert chardev == "socket,id=vc3,path=/tmp/x.sock,reconnect-ms=500"
    assert device == (
        "vhost-user-blk-pci,id=vblk3,chardev=vc3,num-queues=2,packed=on,inflight-migration=on"
    )
    plain = VhostUserBlkDisk(pathlib.Path("/tmp/y.sock")).args(0)
    assert plain[1] == "socket,id=vc0,path=/tmp/y.sock"
    assert "packed" not in plain[3] and "inflight-migration" not in plain[3]


def test_qemu_command_line_follows_peers_md(tmp_path: pathlib.Path) -> None:
    args = qemu_args(
        [VhostUserBlkDisk(tmp_path / "s.sock")],
        serial_log=tmp_path / "serial.log",
        qmp_socket=tmp_path / "qmp.sock",
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd.img",
        append=guest_kernel_args("loop", 5),
        incoming="defer",
    )
    joined = " ".join(args)
    assert "-accel tcg" in joined and "-bios /usr/share/qemu/qboot.rom" in joined
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in joined
    assert f"-serial file:{tmp_path / 'serial.log'}" in joined
    assert f"-qmp unix:{tmp_path / 'qmp.sock'},server=on,wait=off" in joined
    assert args[-2:] == ["-incoming", "defer"]
    assert "-no-reboot" in args


def test_guest_kernel_args() -> None:
    assert guest_kernel_args() == (
        "console=ttyS0 panic=-1 quiet cryptomgr.notests vc.mode=once vc.iters=1"
    )
    assert guest_kernel_args("loop", 40, blocks=8, delay=0.25).endswith(
        "vc.mode=loop vc.iters=40 vc.blocks=8 vc.delay=0.25"
    )
    with pytest.raises(ValueError, match="'twice'"):
        guest_kernel_args("twice")


def test_parse_bench_seconds() -> None:
    out = (
        "Sending 20000 requests, 4096 bytes each, 32 in parallel\nRun completed in 0.052 seconds.\n"
    )
    assert parse_bench_seconds(out) == pytest.approx(0.052)
    with pytest.raises(ValueError, match="Run completed"):
        parse_bench_seconds("qemu-img: Could not open\n")


def test_qmp_refuses_x_query_virtio_status(tmp_path: pathlib.Path) -> None:
    with QMP(tmp_path / "none.qmp", timeout=0.5) as qmp, pytest.raises(ValueError, match="asserts"):
        qmp.execute("x-query-virtio-status", {"path": "/machine/peripheral/vblk0/virtio-backend"})


# -- with the real peers ---------------------------------------------------------------------


@pytest.mark.peer("qemu-11.1")
@pytest.mark.slow
def test_guest_passes_against_qsd_11_1_file(tmp_path: pathlib.Path) -> None:
    _need_qemu()
    _need("qsd-11.1")
    image = create_raw_image(tmp_path / "disk.img", 64 << 20)
    with (
        start_qsd(tmp_path / "qsd.sock", FileDisk(image), version="11.1") as qsd,
        start_qemu(tmp_path, [VhostUserBlkDisk(qsd.socket)], name="guest") as guest,
    ):
        result = guest.wait_for_result(timeout=90)
        status = guest.process.wait(10)
    assert result.passed, f"{result.marker}\n{result.serial}"
    assert status == 0  # poweroff -f with -no-reboot ends QEMU cleanly
    print(f"QEMU 11.1.3 + qsd 11.1 file: PASS after {result.seconds:.2f} s")
    # The guest's O_DIRECT pattern reached the image: round 1 writes 16 blocks at block 16.
    written = image.read_bytes()[16 * BLOCK : 32 * BLOCK]
    assert written.count(0) < len(written) // 2


@pytest.mark.peer("qemu-11.1")
@pytest.mark.peer("dpdk-vhost-blk")
@pytest.mark.slow
def test_guest_passes_against_dpdk_vhost_blk(tmp_path: pathlib.Path) -> None:
    _need_qemu()
    _need("dpdk-vhost-blk")
    with (
        start_dpdk_vhost_blk(tmp_path / "dpdk") as dpdk,
        start_qemu(
            tmp_path, [VhostUserBlkDisk(dpdk.socket)], name="guest", mode="loop", iters=3
        ) as guest,
    ):
        result = guest.wait_for_result(timeout=90)
    assert result.passed, f"{result.marker}\n{result.serial}"
    assert result.iterations == 3
    print(f"QEMU 11.1.3 + DPDK vhost_blk: PASS after {result.seconds:.2f} s")


@pytest.mark.peer("qemu-11.1")
@pytest.mark.slow
def test_guest_checks_two_disks_on_two_daemons(tmp_path: pathlib.Path) -> None:
    _need_qemu()
    _need("qsd-11.1", "qsd-7.2")
    with (
        start_qsd(tmp_path / "a.sock", NullDisk(64 << 20), version="11.1", num_queues=2) as first,
        start_qsd(
            tmp_path / "b.sock",
            FileDisk(create_raw_image(tmp_path / "b.img", 16 << 20)),
            version="7.2",
        ) as second,
        start_qemu(
            tmp_path,
            [VhostUserBlkDisk(first.socket, num_queues=2), VhostUserBlkDisk(second.socket)],
            name="guest",
        ) as guest,
    ):
        guest.wait_for_serial(r"READY mode=once disks=/dev/vda,/dev/vdb", timeout=90)
        result = guest.wait_for_result(timeout=90)
    # null-co keeps no data: the read-back of /dev/vda cannot match.
    assert not result.passed
    assert result.marker.startswith("FAIL data mismatch on /dev/vda"), result.marker


@pytest.mark.peer("qemu-11.1")
@pytest.mark.slow
def test_qmp_stop_cont_quit(tmp_path: pathlib.Path) -> None:
    _need_qemu()
    _need("qsd-11.1")
    with (
        start_qsd(tmp_path / "qsd.sock", NullDisk(64 << 20), version="11.1") as qsd,
        start_qemu(tmp_path, [VhostUserBlkDisk(qsd.socket)], name="guest", mode="hold") as guest,
    ):
        guest.wait_for_serial(r"VC-GUEST: READY", timeout=90)
        qmp = guest.qmp()
        assert qmp.query_status()["status"] == "running"
        qmp.stop()
        assert qmp.query_status()["status"] == "paused"
        qmp.cont()
        assert qmp.query_status()["running"] is True
        qmp.quit()
        assert guest.process.wait(10) == 0


@pytest.mark.peer("qemu-11.1")
@pytest.mark.slow
def test_live_migration_between_two_qemus(tmp_path: pathlib.Path) -> None:
    """PEERS.md: two QEMUs, one qemu-storage-daemon each on the same image (locking=off)."""
    _need_qemu()
    _need("qsd-11.1")
    image = create_raw_image(tmp_path / "disk.img", 64 << 20)
    mig = tmp_path / "mig.sock"
    with (
        start_qsd(tmp_path / "src.sock", FileDisk(image, locking=False), version="11.1") as src_qsd,
        start_qsd(tmp_path / "dst.sock", FileDisk(image, locking=False), version="11.1") as dst_qsd,
        start_qemu(
            tmp_path,
            [VhostUserBlkDisk(src_qsd.socket)],
            name="src",
            mode="loop",
            iters=40,
            delay=0.1,
        ) as source,
        start_qemu(
            tmp_path,
            [VhostUserBlkDisk(dst_qsd.socket)],
            name="dst",
            mode="loop",
            iters=40,
            delay=0.1,
            incoming="defer",
        ) as destination,
    ):
        source.wait_for_iteration(3, timeout=90)
        destination.qmp().migrate_incoming(f"unix:{mig}")
        source.qmp().migrate_set_parameters(downtime_limit=300)
        started = time.monotonic()
        source.qmp().migrate(f"unix:{mig}")
        info = source.qmp().wait_migration(timeout=60)
        assert source.qmp().query_status()["status"] == "postmigrate"
        iteration_at_switch = source.iterations()
        result = destination.wait_for_result(timeout=120)
    assert result.passed, f"{result.marker}\n{result.serial}"
    assert iteration_at_switch < 40 and result.iterations == 40
    print(
        f"migration: completed in {info.get('total-time')} ms, downtime {info.get('downtime')} ms"
        f" (wall {time.monotonic() - started:.2f} s to guest PASS); switched at ITER {iteration_at_switch}"
    )


@pytest.mark.peer("qemu-11.1")
def test_qemu_img_bench_against_qsd_null_co(tmp_path: pathlib.Path) -> None:
    _need("qemu-img-11.1", "qsd-11.1")
    with start_qsd(tmp_path / "null.sock", NullDisk(1 << 30), version="11.1") as qsd:
        iops = qemu_img_bench(qsd.socket, count=20000, depth=32)
        assert qsd.alive()
    assert iops > 1000
    print(f"qemu-img bench, 20000 x 4 KiB reads, depth 32, qsd 11.1 null-co: {iops:.0f} IOPS")


@pytest.mark.peer("dpdk-vhost-blk")
def test_qemu_img_bench_refuses_dpdk(tmp_path: pathlib.Path) -> None:
    """libblkio needs CONFIGURE_MEM_SLOTS, which the DPDK example lacks (PEERS.md)."""
    _need("qemu-img-11.1", "dpdk-vhost-blk")
    from vhost_conformance.peers.process import PeerProcessError

    with (
        start_dpdk_vhost_blk(tmp_path / "dpdk") as dpdk,
        pytest.raises(PeerProcessError, match="exited"),
    ):
        qemu_img_bench(dpdk.socket, count=100, depth=1, timeout=30)


@pytest.mark.peer("qemu-11.1")
@pytest.mark.slow
def test_guest_survives_a_back_end_restart_with_reconnect_ms(tmp_path: pathlib.Path) -> None:
    """PEERS.md "reconnect": kill -9 the daemon, start a new one on the same socket and image;
    QEMU (chardev reconnect-ms) replays the set-up and the guest's I/O continues."""
    _need_qemu()
    _need("qsd-11.1")
    image = create_raw_image(tmp_path / "disk.img", 64 << 20)
    sock = tmp_path / "qsd.sock"
    first = start_qsd(sock, FileDisk(image), version="11.1")
    try:
        with start_qemu(
            tmp_path,
            [VhostUserBlkDisk(sock, reconnect_ms=200)],
            name="guest",
            mode="loop",
            iters=30,
            delay=0.1,
        ) as guest:
            guest.wait_for_iteration(3, timeout=90)
            first.process.signal(signal.SIGKILL)
            assert first.process.wait(5) == -signal.SIGKILL
            killed_at = guest.iterations()
            with start_qsd(sock, FileDisk(image), version="11.1") as second:
                result = guest.wait_for_result(timeout=120)
                assert second.alive()
    finally:
        first.terminate()
    assert result.passed, f"{result.marker}\n{result.serial}"
    assert killed_at < 30 and result.iterations == 30
    print(
        f"reconnect: back-end killed at ITER {killed_at}, guest PASS after {result.seconds:.2f} s"
    )
