"""Running the back-end program the way vhost-user.rst "Backend program conventions" says a
management layer does: ``--socket-path=PATH``, ``--fd=FDNUM``, ``--print-capabilities``.

The profile says how (``program_command``: the program without its socket option;
``program_fd``: what ``--fd`` hands it) or why not (``program_unsupported``). Every process
started here is reaped, every socket closed, within the deadlines given.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

from vhost_conformance.frontend.channel import Channel
from vhost_conformance.frontend.protocol import U64, FrontendRequest
from vhost_conformance.peers.process import PeerProcessError, Supervised
from vhost_conformance.suites.model import Unsupported
from vhost_conformance.suites.target import (
    BackendTarget,
    CommandTarget,
    python_env,
    render_command,
)

#: Seconds a program gets to listen, to exit, or to answer.
PROGRAM_DEADLINE = 10.0


def program_argv(target: BackendTarget, *extra: str, disk: str | None = None) -> list[str]:
    """The profile's ``program_command`` rendered (``disk`` replaces ``{disk}``) plus ``extra``;
    :class:`Unsupported` with the profile's reason when it has none."""
    if not isinstance(target, CommandTarget):
        raise Unsupported("a back-end program", "the suite does not run this back-end itself")
    profile = target.profile
    if profile.program_command is None:
        raise Unsupported(
            "the program conventions' command line",
            profile.program_unsupported
            or "the profile gives no program_command (the program without its socket option)",
        )
    values = dict(target.values)
    if disk is not None:
        values["disk"] = disk
    return [*render_command(profile.program_command, values), *extra]


@contextlib.contextmanager
def run_program(
    target: BackendTarget, argv: Sequence[str], label: str, *, pass_fds: Sequence[int] = ()
) -> Iterator[Supervised]:
    """Run ``argv`` in ``target``'s work directory (log ``program-<label>.log``); terminated
    and reaped on exit."""
    assert isinstance(target, CommandTarget)
    log = Path(target.workdir) / f"program-{label}.log"
    process = Supervised(argv, log, cwd=Path(target.workdir), env=python_env(argv),
                         name=f"{target.name}-{label}", pass_fds=pass_fds)
    try:
        yield process
    finally:
        process.terminate(5.0)


def socket_path(target: BackendTarget, label: str) -> str:
    """A fresh socket path in ``target``'s work directory (short enough for AF_UNIX)."""
    assert isinstance(target, CommandTarget)
    path = Path(target.workdir) / f"{label}.sock"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return str(path)


def wait_socket(process: Supervised, path: str) -> str | None:
    """Wait for the program to create the socket ``path``; None when it did, else why not."""
    try:
        process.wait_for_socket(path, PROGRAM_DEADLINE)
    except PeerProcessError as exc:
        return str(exc)
    return None


def get_features(sock: socket.socket) -> int:
    """One GET_FEATURES exchange on ``sock`` (closed afterwards): the features offered.
    Raises the channel's BackendError (hang, closed, violation) when it goes wrong."""
    channel = Channel(sock)
    try:
        reply = channel.call(FrontendRequest.GET_FEATURES, timeout=PROGRAM_DEADLINE)
        assert reply is not None  # a request with a reply of its own
        return U64.decode(reply.payload).value
    finally:
        channel.close()


def connect(path: str) -> socket.socket:
    """A connection to the Unix socket ``path`` (OSError when refused)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(PROGRAM_DEADLINE)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock
