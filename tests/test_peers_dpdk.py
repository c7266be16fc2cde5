"""peers.dpdk: DPDK's vhost_blk example, one instance per directory and file prefix."""

from __future__ import annotations

import os
import pathlib
import stat
import time

import pytest
from vhost_conformance.peers.dpdk import (
    DPDK_RUNTIME_DIR,
    SOCKET_NAME,
    start_dpdk_vhost_blk,
    unique_file_prefix,
)
from vhost_conformance.peers.provision import PeerUnavailable, peer_path

pytestmark = pytest.mark.peer("dpdk-vhost-blk")


def _need() -> None:
    try:
        peer_path("dpdk-vhost-blk")
    except PeerUnavailable as exc:
        pytest.skip(str(exc))


def test_file_prefixes_are_unique() -> None:
    prefixes = {unique_file_prefix() for _ in range(100)}
    assert len(prefixes) == 100
    assert all(str(os.getpid()) in p for p in prefixes)


def test_two_instances_run_side_by_side(tmp_path: pathlib.Path) -> None:
    _need()
    started = time.monotonic()
    with (
        start_dpdk_vhost_blk(tmp_path / "a") as first,
        start_dpdk_vhost_blk(tmp_path / "b") as second,
    ):
        assert first.socket == tmp_path / "a" / SOCKET_NAME
        assert stat.S_ISSOCK(first.socket.stat().st_mode)
        assert stat.S_ISSOCK(second.socket.stat().st_mode)
        time.sleep(0.3)
        assert first.alive(), first.process.log_tail()
        assert second.alive(), second.process.log_tail()
        assert os.readlink(f"/proc/{first.process.pid}/exe").endswith("vhost-blk-shared")
        prefix_dirs = [DPDK_RUNTIME_DIR / p for p in first.process.argv if p.startswith("vc")]
    assert time.monotonic() - started < 20
    assert not first.alive() and not second.alive()
    # EAL's runtime files of the instance are cleaned up with it.
    assert prefix_dirs and not any(d.exists() for d in prefix_dirs)
