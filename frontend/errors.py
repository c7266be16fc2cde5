"""The two kinds of error of the library, kept apart as h11 keeps its LocalProtocolError
(we did something wrong) and RemoteProtocolError (the peer did):

- :class:`MisuseError`: the library was misused (the caller's bug or ours, never the
  back-end's fault): a case that raises one ends ``error`` ("the suite failed"), never
  ``fail``. Every such error of the front-end derives from it (``FrontendUsageError``,
  ``EncodeError``, ``SessionError``, ``VirtqueueError``, ``MemoryAccessError``,
  ``InflightModelError``, ``MigrationError``) and so does the suites' ``UsageError``.
- :class:`BackendError`: the back-end did something wrong (or nothing): a hang, a close, a
  violation of the protocol (``expected`` vs ``seen``), a NACK. The plugin turns one into the
  case's verdict and, for a violation, into the case's violation record
  (``suites.model.Violation``: case id, clause, level, expected, seen).

This module imports nothing of the package: the codec (``protocol.py``) and every other
module import their bases from here.
"""

from __future__ import annotations


class MisuseError(Exception):
    """Base of every misuse of the library: the caller's (or the library's) bug, not the
    back-end's fault."""


class SessionError(MisuseError):
    """Misuse of the session API (a bug in the caller, not in the back-end)."""


class ProtocolError(Exception):
    """Base of every error about what was (or would be) on the wire."""


class FrontendUsageError(MisuseError):
    """The library was used in a way the protocol cannot express (our bug, not the peer's)."""


class BackendError(ProtocolError):
    """The back-end did something wrong (or nothing): ``request_name`` names the request.
    The base of every back-end fault (h11's RemoteProtocolError)."""

    def __init__(self, message: str, *, request_name: str | None = None) -> None:
        self.request_name = request_name
        super().__init__(f"{request_name}: {message}" if request_name else message)


class BackendHang(BackendError):
    """A deadline passed while waiting for the back-end."""

    def __init__(self, what: str, *, request_name: str | None, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(f"{what} within {timeout:.3f} s", request_name=request_name)


class BackendClosed(BackendError):
    """The back-end closed the connection (EOF, ECONNRESET, EPIPE)."""


class BackendViolation(BackendError):
    """A reply or message that breaks the protocol: ``expected`` vs ``seen``."""

    def __init__(
        self,
        what: str,
        *,
        request_name: str | None,
        expected: object,
        seen: object,
    ) -> None:
        self.what = what
        self.expected = expected
        self.seen = seen
        super().__init__(f"{what}: expected {expected}, seen {seen}", request_name=request_name)


class BackendNack(BackendError):
    """A REPLY_ACK reply with a nonzero status (QEMU: -EIO)."""

    def __init__(self, *, request_name: str, status: int) -> None:
        self.status = status
        super().__init__(f"back-end answered REPLY_ACK status {status:#x} (failure)",
                         request_name=request_name)
