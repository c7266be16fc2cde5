"""Where the provisioned peers live (see ``scripts/provision-peers``) and how to ask for one.

Every peer is a plain file in the cache: a wrapper in ``$CACHE/bin`` or an artefact of the
tiny guest in ``$CACHE/guest``. ``peer_path`` returns it or raises ``PeerUnavailable`` with the
command that provisions it, so a test can skip with a reason a person can act on.
"""

from __future__ import annotations

import os
import pathlib

CACHE_ENV = "VHOST_CONFORMANCE_CACHE"
DEFAULT_CACHE = "/var/cache/vhost-conformance"

# name -> (path relative to the cache, the provision-peers peer that creates it)
PEERS: dict[str, tuple[str, str]] = {
    "qsd-7.2": ("bin/qsd-7.2", "qsd"),
    "qsd-host": ("bin/qsd-host", "qsd"),
    "dpdk-vhost-blk": ("bin/dpdk-vhost-blk", "dpdk-vhost-blk"),
    "qsd-11.1": ("bin/qsd-11.1", "trixie-root"),
    "qemu-system-x86_64-11.1": ("bin/qemu-system-x86_64-11.1", "trixie-root"),
    "qemu-img-11.1": ("bin/qemu-img-11.1", "trixie-root"),
    "trixie-run": ("bin/trixie-run", "trixie-root"),
    "vhost-user-blk-contrib": ("bin/vhost-user-blk-contrib", "contrib-blk"),
    "dpdk-testpmd-vhost": ("bin/dpdk-testpmd-vhost", "dpdk-testpmd"),
    "guest-kernel": ("guest/vmlinuz", "guest"),
    "guest-initrd": ("guest/initrd.img", "guest"),
}


class PeerUnavailable(Exception):
    """A real peer is not provisioned (or not usable) on this machine."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"peer {name!r} unavailable: {reason}")
        self.name = name
        self.reason = reason


def cache_dir() -> pathlib.Path:
    """The provisioning cache: ``$VHOST_CONFORMANCE_CACHE`` or /var/cache/vhost-conformance."""
    return pathlib.Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def provision_hint(name: str) -> str:
    """The command that provisions the peer ``name``."""
    step = PEERS[name][1] if name in PEERS else name
    return f"run (as root) scripts/provision-peers --only {step}"


def peer_path(name: str) -> pathlib.Path:
    """The path of the provisioned peer ``name`` (a key of ``PEERS``); raises PeerUnavailable."""
    if name not in PEERS:
        raise PeerUnavailable(name, f"unknown peer (known: {', '.join(sorted(PEERS))})")
    relative, _ = PEERS[name]
    path = cache_dir() / relative
    if not path.exists():
        raise PeerUnavailable(name, f"{path} does not exist; {provision_hint(name)}")
    if relative.startswith("bin/") and not os.access(path, os.X_OK):
        raise PeerUnavailable(name, f"{path} is not executable; {provision_hint(name)}")
    if relative.startswith("bin/") and os.geteuid() != 0 and name in _NEEDS_ROOT:
        raise PeerUnavailable(name, "runs in a chroot with its own mount namespace: needs root")
    return path


# The wrappers of the Debian 13 root use unshare --mount and chroot.
_NEEDS_ROOT = frozenset({"qsd-11.1", "qemu-system-x86_64-11.1", "qemu-img-11.1", "trixie-run"})


def available(name: str) -> bool:
    """Whether ``peer_path(name)`` would succeed."""
    try:
        peer_path(name)
    except PeerUnavailable:
        return False
    return True
