"""The launch strategy of a back-end someone else runs (``ExternalSocketTarget``): we only know
its socket (no restart of our own, no slow I/O, no log)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

from vhost_conformance.suites.capabilities import (
    Capabilities,
)
from vhost_conformance.suites.target_errors import (
    SlowIoUnsupported,
    TargetError,
)
from vhost_conformance.suites.target_protocol import (
    DEFAULT_CONNECT_TIMEOUT,
    CapabilityProbe,
    connect_unix,
    is_socket,
)


class ExternalSocketTarget:
    """A back-end someone else runs; we only know its socket (no restart, no slow I/O)."""

    shares_disk = False

    def __init__(
        self, path: str, *, name: str = "external", probe: CapabilityProbe | None = None
    ) -> None:
        self.name = name
        self.path = path
        self._probe = probe

    def start(self) -> str:
        """Check the socket is there and return it."""
        if not is_socket(self.path):
            raise TargetError(
                f"external back-end socket {self.path} does not exist (or is not a socket)"
            )
        return self.path

    def stop(self) -> None:
        """Nothing to stop: someone else owns the back-end."""

    def restart(self) -> str:
        """We cannot restart someone else's back-end: wait up to 10 s for its socket."""
        deadline = time.monotonic() + 10.0
        while not is_socket(self.path):
            if time.monotonic() >= deadline:
                raise TargetError(
                    f"external back-end socket {self.path} did not come back within 10 s"
                )
            time.sleep(0.05)
        return self.path

    def alive(self) -> bool:
        """Whether the socket file is there."""
        return is_socket(self.path)

    def exit_status(self) -> int | None:
        """Unknown: not our process."""
        return None

    def log_tail(self, lines: int = 30) -> str:
        """No log: not our process."""
        return ""

    def connect_socket(self, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> socket.socket:
        """Connect to the external socket."""
        return connect_unix(self.path, time.monotonic() + timeout)

    @contextlib.contextmanager
    def slow_io(self, latency_ms: int) -> Iterator[None]:
        """Not possible for a back-end we do not run."""
        raise SlowIoUnsupported(f"external back-end at {self.path}: cannot change how it runs")
        yield  # pragma: no cover

    @property
    def capabilities(self) -> Capabilities:
        """Probed once per run."""
        if self._probe is None:
            raise TargetError("external back-end has no capability probe attached")
        return self._probe.capabilities()
