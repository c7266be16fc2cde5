"""qemu-storage-daemon as a vhost-user-blk export: the host's (7.2 on Debian 12) or 11.1.3
from the Debian 13 root. Recipes: PEERS.md "qemu-storage-daemon"."""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

from vhost_conformance.peers.process import SocketPeer, spawn
from vhost_conformance.peers.provision import peer_path

# The versions this module can start, and the wrapper that runs each.
QSD_WRAPPERS = {"7.2": "qsd-7.2", "11.1": "qsd-11.1"}


@dataclass(frozen=True)
class FileDisk:
    """A raw image file (``driver=file``); ``locking=False`` lets two daemons share it."""

    path: pathlib.Path
    locking: bool = True


@dataclass(frozen=True)
class NullDisk:
    """``driver=null-co``: no data kept, reads return zeroes; ``latency_ns`` slows each request."""

    size: int
    latency_ns: int = 0


Disk = FileDisk | NullDisk


def create_raw_image(path: pathlib.Path, size: int) -> pathlib.Path:
    """Create (or resize) a sparse raw image of ``size`` bytes; the same as qemu-img create -f raw."""
    with open(path, "wb") as image:
        image.truncate(size)
    return path


def blockdev_arg(disk: Disk, node_name: str) -> str:
    """The ``--blockdev`` value for ``disk``."""
    if isinstance(disk, FileDisk):
        arg = f"driver=file,node-name={node_name},filename={disk.path}"
        if not disk.locking:
            arg += ",locking=off"
        return arg
    # null-co's size is in bytes ("1G" is refused): PEERS.md.
    arg = f"driver=null-co,node-name={node_name},size={int(disk.size)}"
    if disk.latency_ns:
        arg += f",latency-ns={int(disk.latency_ns)}"
    return arg


def qsd_args(
    socket_path: pathlib.Path,
    disk: Disk,
    *,
    num_queues: int = 1,
    writable: bool = True,
    logical_block_size: int | None = None,
) -> list[str]:
    """qemu-storage-daemon arguments exporting ``disk`` as vhost-user-blk on ``socket_path``."""
    export = (
        f"type=vhost-user-blk,id=e0,addr.type=unix,addr.path={socket_path},node-name=n0,"
        f"writable={'on' if writable else 'off'},num-queues={int(num_queues)}"
    )
    if logical_block_size is not None:
        export += f",logical-block-size={int(logical_block_size)}"
    return ["--blockdev", blockdev_arg(disk, "n0"), "--export", export]


def start_qsd(
    socket_path: pathlib.Path,
    disk: Disk,
    *,
    version: str = "11.1",
    num_queues: int = 1,
    writable: bool = True,
    logical_block_size: int | None = None,
    log_path: pathlib.Path | None = None,
    timeout: float = 15.0,
) -> SocketPeer:
    """Start qemu-storage-daemon ``version`` ("7.2" = the host's, "11.1" = the Debian 13 root's)
    and wait (up to ``timeout`` s) for its socket. Raises PeerUnavailable if not provisioned."""
    if version not in QSD_WRAPPERS:
        raise ValueError(f"qemu-storage-daemon version {version!r}: known {sorted(QSD_WRAPPERS)}")
    wrapper = peer_path(QSD_WRAPPERS[version])
    socket_path = pathlib.Path(socket_path).absolute()
    socket_path.unlink(missing_ok=True)  # a stale file would pass for the new socket
    if log_path is None:
        log_path = socket_path.with_name(socket_path.name + f".qsd-{version}.log")
    env = dict(os.environ)
    binds = [str(socket_path.parent)]
    if isinstance(disk, FileDisk):
        binds.append(str(pathlib.Path(disk.path).absolute().parent))
    env["VC_BINDS"] = ":".join([*binds, *filter(None, env.get("VC_BINDS", "").split(":"))])
    process = spawn(
        [
            str(wrapper),
            *qsd_args(
                socket_path,
                disk,
                num_queues=num_queues,
                writable=writable,
                logical_block_size=logical_block_size,
            ),
        ],
        log_path,
        env=env,
        name=f"qemu-storage-daemon-{version}",
    )
    try:
        process.wait_for_socket(socket_path, timeout)
    except BaseException:
        process.terminate()
        raise
    return SocketPeer(f"qsd-{version}", socket_path, process)
