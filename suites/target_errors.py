"""The errors of the back-end under test (suites.target and its helpers): the back-end could
not be started, reached or stopped, or a profile is wrong."""

from __future__ import annotations

from vhost_conformance.frontend.errors import MisuseError


class TargetError(Exception):
    """The back-end under test could not be started, reached or stopped."""


class UsageError(TargetError, MisuseError):
    """A profile or command template is wrong (the user's mistake, not the back-end's)."""


class BackendStartFailed(TargetError):
    """The back-end process exited before it listened; carries its exit status and log tail."""

    def __init__(self, message: str, exit_status: int | None, log_tail: str) -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.log_tail = log_tail


class BackendStartHang(TargetError):
    """The back-end process is alive but did not listen (or connect) within the deadline."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(message)
        self.log_tail = log_tail


class SlowIoUnsupported(TargetError):
    """The profile gives no way to make this back-end's I/O slow."""
