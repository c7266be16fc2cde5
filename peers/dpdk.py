"""DPDK's vhost_blk example (rte_vhost): a 128 MiB RAM disk served on ``DIR/vhost.socket``.
Recipe: PEERS.md "DPDK vhost_blk example"."""

from __future__ import annotations

import itertools
import os
import pathlib

from vhost_conformance.peers.process import SocketPeer, spawn
from vhost_conformance.peers.provision import peer_path

# The example hard-codes its socket name in the working directory (vhost_blk.c CTRLR_NAME).
SOCKET_NAME = "vhost.socket"
# EAL keeps per-instance runtime files here, named by --file-prefix.
DPDK_RUNTIME_DIR = pathlib.Path("/var/run/dpdk")

_serial = itertools.count()


def unique_file_prefix() -> str:
    """An EAL --file-prefix no other running instance uses (pid + counter)."""
    return f"vc{os.getpid()}n{next(_serial)}"


def start_dpdk_vhost_blk(
    directory: pathlib.Path,
    *,
    file_prefix: str | None = None,
    log_path: pathlib.Path | None = None,
    timeout: float = 30.0,
) -> SocketPeer:
    """Start the example in ``directory`` (created if needed) and wait for its socket.

    Raises PeerUnavailable if not provisioned, PeerProcessError if it does not come up.
    """
    wrapper = peer_path("dpdk-vhost-blk")
    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    socket_path = directory / SOCKET_NAME
    socket_path.unlink(missing_ok=True)
    prefix = file_prefix or unique_file_prefix()
    if log_path is None:
        log_path = directory / f"dpdk-vhost-blk-{prefix}.log"
    process = spawn(
        [str(wrapper), "--dir", str(directory), "--file-prefix", prefix],
        log_path,
        name="dpdk-vhost-blk",
    )
    try:
        process.wait_for_socket(socket_path, timeout)
    except BaseException:
        process.terminate()
        raise
    return SocketPeer("dpdk-vhost-blk", socket_path, process, cleanup=[DPDK_RUNTIME_DIR / prefix])
