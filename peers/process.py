"""A supervised child process: a peer run with a log file and deadlines, always reaped.

The child runs in its own session (so its own process group); ``terminate`` signals the whole
group, SIGTERM then SIGKILL, and reaps the leader. The leader is only reaped after the group was
killed (``waitid(WNOWAIT)`` watches it without reaping), so the group id cannot be reused by an
unrelated process while we still signal it.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Self


class PeerProcessError(Exception):
    """A supervised peer did not do what was awaited (exited early, missed a deadline)."""


def _status_from_siginfo(info: os.waitid_result) -> int:
    """Popen-style status: the exit code, or minus the signal number."""
    if info.si_code == os.CLD_EXITED:
        return int(info.si_status)
    return -int(info.si_status)


class TerminatesOnExit:
    """Context-manager protocol for the peers here: leaving the ``with`` block calls
    ``terminate()``, which stops and reaps whatever the object supervises."""

    def terminate(self, timeout: float = 5.0) -> int:
        """Stop and reap; return the exit status."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.terminate()


class Supervised(TerminatesOnExit):
    """One child process in its own process group, with its stdout+stderr in ``log_path``."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: pathlib.Path,
        *,
        cwd: pathlib.Path | None = None,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.log_path = pathlib.Path(log_path)
        self.name = name or pathlib.Path(self.argv[0]).name
        self._status: int | None = None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"# {' '.join(self.argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=None if env is None else dict(env),
                start_new_session=True,
                close_fds=True,
                pass_fds=tuple(pass_fds),
            )
        self.pid = self._popen.pid
        self.started = time.monotonic()

    # -- state -----------------------------------------------------------------------------

    def _peek(self) -> int | None:
        """The leader's status if it has exited (not reaped), else None."""
        if self._status is not None:
            return self._status
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            # Reaped behind our back (should not happen): take Popen's view.
            self._popen.poll()
            return self._popen.returncode
        if info is None:
            return None
        return _status_from_siginfo(info)

    def alive(self) -> bool:
        """Whether the leader process is still running."""
        return self._peek() is None

    def exit_status(self) -> int | None:
        """None while running; then the exit code, or minus the signal that ended it.

        Once the leader has exited, the rest of its group is killed and the leader reaped.
        """
        if self._status is not None:
            return self._status
        if self._peek() is None:
            return None
        self._kill_group(signal.SIGKILL)
        self._status = self._popen.wait()
        return self._status

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the leader to exit on its own; its status or None."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.exit_status()
            if status is not None or time.monotonic() >= deadline:
                return status
            time.sleep(0.02)

    def log_text(self) -> str:
        """The whole log so far (undecodable bytes replaced)."""
        try:
            return self.log_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 20) -> str:
        """The last ``n`` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-n:])

    def describe(self) -> str:
        """One line for error messages: name, pid, state."""
        status = self._peek()
        state = "running" if status is None else f"exited with status {status}"
        return f"{self.name} (pid {self.pid}, {state})"

    # -- waiting ---------------------------------------------------------------------------

    def wait_for_socket(self, path: pathlib.Path | str, timeout: float = 10.0) -> pathlib.Path:
        """Wait until the Unix socket file ``path`` exists (no connection is made to it).

        Raises PeerProcessError, with the log's tail, if the process exits first or the
        deadline passes.
        """
        sock = pathlib.Path(path)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if stat.S_ISSOCK(sock.stat().st_mode):
                    return sock
            except FileNotFoundError:
                pass
            if not self.alive():
                raise PeerProcessError(
                    f"{self.describe()} exited before socket {sock} appeared; log tail:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise PeerProcessError(
                    f"socket {sock} did not appear within {timeout:.1f} s from {self.describe()};"
                    f" log tail:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def wait_for_connectable(self, path: pathlib.Path | str, timeout: float = 10.0) -> None:
        """Wait until a client connection to the Unix socket ``path`` succeeds (then close it).

        Only for peers that tolerate a probe connection; a vhost-user server sees it as a
        front-end that connected and left.
        """
        deadline = time.monotonic() + timeout
        self.wait_for_socket(path, timeout)
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                    return
                except (ConnectionRefusedError, FileNotFoundError):
                    pass
            if time.monotonic() >= deadline:
                raise PeerProcessError(
                    f"socket {path} refused connections for {timeout:.1f} s ({self.describe()})"
                )
            time.sleep(0.02)

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the log matches the regular expression ``pattern``; returns the match."""
        return wait_for_text(self.log_path, pattern, timeout, self)

    # -- stopping --------------------------------------------------------------------------

    def _kill_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the leader only (e.g. SIGSTOP/SIGCONT/SIGKILL for fault cases)."""
        if self._status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self, timeout: float = 5.0) -> int:
        """SIGTERM to the whole group, SIGKILL after ``timeout`` s; reaps; returns the status."""
        if self._status is not None:
            return self._status
        if self._peek() is None:
            self._kill_group(signal.SIGCONT)  # a stopped group would not act on SIGTERM
            self._kill_group(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self._peek() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        self._kill_group(signal.SIGKILL)
        self._status = self._popen.wait()
        return self._status

    def kill(self) -> int:
        """SIGKILL to the whole group at once; reaps; returns the status."""
        return self.terminate(timeout=0.0)


def spawn(
    argv: Sequence[str],
    log_path: pathlib.Path,
    *,
    cwd: pathlib.Path | None = None,
    env: Mapping[str, str] | None = None,
    name: str | None = None,
) -> Supervised:
    """Start ``argv`` supervised, its stdout and stderr appended to ``log_path``."""
    return Supervised(argv, log_path, cwd=cwd, env=env, name=name)


def wait_for_text(
    path: pathlib.Path,
    pattern: str,
    timeout: float,
    process: Supervised | None = None,
) -> re.Match[str]:
    """Wait until the text of the file ``path`` matches ``pattern`` (a regular expression).

    Fails early, with the file's tail, when ``process`` exits without the text appearing.
    """
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            text = ""
        found = regex.search(text)
        if found:
            return found
        exited = process is not None and not process.alive()
        if exited or time.monotonic() >= deadline:
            # One last read: the process may have written and exited in between.
            try:
                text = path.read_bytes().decode(errors="replace")
            except FileNotFoundError:
                text = ""
            found = regex.search(text)
            if found:
                return found
            tail = "\n".join(text.splitlines()[-20:])
            why = (
                f"{process.describe()} exited"
                if exited and process is not None
                else f"{timeout:.1f} s passed"
            )
            raise PeerProcessError(f"{why} before /{pattern}/ appeared in {path}; tail:\n{tail}")
        time.sleep(0.05)


class SocketPeer(TerminatesOnExit):
    """A running vhost-user back-end peer: its supervised process and the socket it serves."""

    def __init__(
        self,
        name: str,
        socket_path: pathlib.Path,
        process: Supervised,
        cleanup: Sequence[pathlib.Path] = (),
    ) -> None:
        self.name = name
        self.socket = socket_path
        self.process = process
        self._cleanup = list(cleanup)

    def alive(self) -> bool:
        """Whether the peer's process still runs."""
        return self.process.alive()

    def terminate(self, timeout: float = 5.0) -> int:
        """Stop the peer (SIGTERM, then SIGKILL), reap it, remove its runtime files."""
        status = self.process.terminate(timeout)
        for path in self._cleanup:
            _remove_tree(path)
        return status


def _remove_tree(path: pathlib.Path) -> None:
    """Remove a file or a directory tree, ignoring what is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
