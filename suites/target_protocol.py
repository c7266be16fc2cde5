"""What every launch strategy of a back-end under test is: the ``BackendTarget`` protocol, the
capability probe a target reads from, the default deadlines, and the two socket helpers the
strategies share (connect with retries; is this path a socket)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import time
from typing import Protocol

from vhost_conformance.suites.capabilities import (
    Capabilities,
)
from vhost_conformance.suites.target_errors import (
    TargetError,
)

DEFAULT_START_TIMEOUT = 15.0
DEFAULT_STOP_TIMEOUT = 5.0
DEFAULT_CONNECT_TIMEOUT = 5.0


class BackendTarget(Protocol):
    """A back-end under test, whatever launches it. Every wait inside has a deadline."""

    name: str
    shares_disk: bool

    def start(self) -> str:
        """Start (or find) the back-end; return the vhost-user socket path."""

    def stop(self) -> None:
        """Stop the back-end (SIGTERM, then SIGKILL after a deadline) and reap it."""

    def restart(self) -> str:
        """Stop, then start again; return the socket path."""

    def alive(self) -> bool:
        """Whether the back-end process (or socket) is still there."""

    def exit_status(self) -> int | None:
        """The process's exit status (negative: killed by that signal); None if running or unknown."""

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the back-end's stdout/stderr, for crash verdicts."""

    def connect_socket(self, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> socket.socket:
        """A connected stream socket to the back-end (we connect, or accept its connection)."""

    def slow_io(self, latency_ms: int) -> contextlib.AbstractContextManager[None]:
        """Within the context the back-end's I/O takes ``latency_ms`` (restarting it if needed)."""

    @property
    def capabilities(self) -> Capabilities:
        """What the back-end offers, probed once over the wire (cached per run)."""


class CapabilityProbe(Protocol):
    """Where a target gets its (cached) capabilities from."""

    def capabilities(self) -> Capabilities:
        """Probe once, then return the cached result."""



def connect_unix(path: str, deadline: float) -> socket.socket:
    """Connect to a listening Unix socket, retrying while it is not there yet."""
    last: OSError | None = None
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            sock.connect(path)
            sock.settimeout(None)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                raise TargetError(f"cannot connect to back-end socket {path}: {exc}") from exc
        if time.monotonic() >= deadline:
            raise TargetError(
                f"back-end socket {path} refused connections until the deadline: {last}"
            )
        time.sleep(0.02)


def is_socket(path: str) -> bool:
    """Whether ``path`` is a Unix socket (False when it is missing or unreadable)."""
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False
