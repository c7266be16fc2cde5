"""The launch strategy of a back-end we run from a command template (``CommandTarget``), in its
own work directory: listen mode (the back-end listens on ``{socket}``, we connect) or connect mode
(we listen, the back-end connects); slow I/O by the profile's knob or the watched disk."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from vhost_conformance.peers.process import PeerProcessError, Supervised
from vhost_conformance.suites import watched
from vhost_conformance.suites.capabilities import (
    Capabilities,
)
from vhost_conformance.suites.profile import Profile, cache_dir, render_command
from vhost_conformance.suites.target_errors import (
    BackendStartFailed,
    BackendStartHang,
    SlowIoUnsupported,
    TargetError,
    UsageError,
)
from vhost_conformance.suites.target_protocol import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_START_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    CapabilityProbe,
    connect_unix,
)
from vhost_conformance.suites.watched import WatchedDisk

#: The private bytecode cache of back-ends run by this interpreter (see :func:`python_env`):
#: unset, the directory, or "" when not used.
_PYCACHE: str | None = None


def python_env(argv: Sequence[str]) -> dict[str, str] | None:
    """The environment of a back-end that is this interpreter (``{python} -m ...``) when
    bytecode writing is off here (``PYTHONDONTWRITEBYTECODE``, no ``PYTHONPYCACHEPREFIX``):
    every start would compile the back-end's modules from source again (~35 % of a start's
    CPU). The modules are compiled once per process into a private ``PYTHONPYCACHEPREFIX``
    (outside the source tree) that the back-ends then read; stale files are ignored by
    Python's own mtime check. None: the inherited environment (the usual case)."""
    global _PYCACHE
    if not argv or argv[0] != sys.executable or not sys.flags.dont_write_bytecode:
        return None
    if os.environ.get("PYTHONPYCACHEPREFIX"):
        return None
    if _PYCACHE is None:
        _PYCACHE = ""
        prefix = os.path.join(tempfile.gettempdir(), f"vc-pycache-{os.getuid()}")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = prefix
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                [sys.executable, "-c", "import vhost_conformance.backend.__main__"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
                check=False,
            )
            if done.returncode == 0:
                _PYCACHE = prefix
    if not _PYCACHE:
        return None
    return {**os.environ, "PYTHONPYCACHEPREFIX": _PYCACHE}


def is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class CommandTarget:
    """A back-end we run from a command template, in its own work directory.

    ``socket_mode="listen"``: the back-end listens on the socket path and we connect.
    ``socket_mode="connect"``: we listen on the socket path and the back-end connects; the
    command may then be None (the back-end is started by someone else and pointed at our path).
    """

    def __init__(
        self,
        profile: Profile,
        workdir: Path,
        *,
        worker: str = "main",
        start_timeout: float = DEFAULT_START_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        probe: CapabilityProbe | None = None,
    ) -> None:
        self.profile = profile
        self.name = profile.name
        self.shares_disk = profile.shares_disk
        self.workdir = workdir
        self.worker = worker
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._probe = probe
        self._process: Supervised | None = None
        self._listener: socket.socket | None = None
        self._latency_ms: int | None = None
        self._queues: int | None = None
        #: the watched disk the back-end runs on (inside :meth:`watched_disk`), else None
        self.watched: WatchedDisk | None = None
        self._exit_status: int | None = None
        self._stopped_by_us = False
        self._starts = 0
        self._launched = False
        #: connections made to the running instance (profile.one_connection: at most one)
        self._connections = 0
        self.log_path = workdir / "backend.log"
        self.values: dict[str, str] = {
            "workdir": str(workdir),
            "disk": str(workdir / "disk.img"),
            "disk_size": str(profile.disk_size),
            "cache": str(cache_dir()),
            "python": sys.executable,
            "worker": worker,
            # DPDK's EAL needs a unique --file-prefix per running instance.
            "file_prefix": f"vc-{worker}-{os.getpid()}-{workdir.name}",
        }
        sock = profile.socket or "{workdir}/vhost.sock"
        self.values["socket"] = sock.format_map(self.values)
        if len(self.values["socket"].encode()) >= 108:
            raise UsageError(
                f"socket path {self.values['socket']!r} is {len(self.values['socket'])} bytes; "
                "Unix socket paths must be shorter than 108: use a shorter work directory"
            )

    # -- helpers

    @property
    def socket_path(self) -> str:
        """Where the vhost-user socket is (ours in connect mode, the back-end's otherwise)."""
        return self.values["socket"]

    @property
    def pid(self) -> int | None:
        """The back-end's process id while it runs (for /proc/PID/fd checks)."""
        return self._process.pid if self._process is not None and self._process.alive() else None

    @property
    def stopped_by_us(self) -> bool:
        """True when the last exit was our own stop(), not the back-end's doing."""
        return self._stopped_by_us

    def argv(self) -> list[str] | None:
        """The command line the next start() runs (with slow I/O applied), None if no command."""
        if self.profile.command is None:
            return None
        values = dict(self.values)
        template = self.profile.command
        if self._latency_ms is not None:
            values["latency_ms"] = str(self._latency_ms)
            values["latency_ns"] = str(self._latency_ms * 1_000_000)
            slow = self.profile.slow_io
            if slow.command is not None:
                template = slow.command
            elif slow.args is not None:
                template = f"{template} {slow.args}"
        if self._queues is not None and self.profile.queues_args is not None:
            values["queues"] = str(self._queues)
            template = f"{template} {self.profile.queues_args}"
        return render_command(template, values)

    def print_capabilities_argv(self) -> list[str] | None:
        """The command line that asks the back-end program for its capabilities, or None."""
        if self.profile.print_capabilities is not None:
            return render_command(self.profile.print_capabilities, self.values)
        argv = self.argv()
        if argv is None:
            return None
        program = argv[:1]
        if Path(argv[0]).name.startswith("python") and len(argv) > 1:
            # an interpreter: the program is "python -m module" or "python script.py"
            program = argv[:3] if argv[1] == "-m" else argv[:2]
        return [*program, "--print-capabilities"]

    def _make_disk(self) -> None:
        disk = Path(self.values["disk"])
        if not disk.exists():
            with open(disk, "wb") as f:
                f.truncate(self.profile.disk_size)

    # -- BackendTarget

    def start(self) -> str:
        """Create the work dir and disk image, run the command, wait until it listens."""
        if self._running():
            if self._launched:
                self._launched = False
                if self.profile.socket_mode == "listen":
                    self._wait_listening()
            return self.socket_path
        self._launch()
        self._launched = False
        if self.profile.socket_mode == "listen":
            self._wait_listening()
        return self.socket_path

    def launch(self) -> None:
        """Run the command without waiting for it to listen (a pre-started instance); the next
        start() waits for the socket, within ``start_timeout`` counted from then."""
        if self._running():
            return
        self._launch()
        self._launched = True

    def _launch(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._make_disk()
        missing = self.profile.missing_needs(self.values)
        if missing:
            raise UsageError(
                f"back-end profile {self.name!r} needs {', '.join(missing)}, which is not there "
                "(run scripts/provision-peers)"
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        if self.profile.socket_mode == "connect":
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self.socket_path)
            listener.listen(4)
            self._listener = listener
        argv = self.argv()
        self._exit_status = None
        self._stopped_by_us = False
        self._connections = 0
        if argv is not None:
            self._starts += 1
            try:
                self._process = Supervised(
                    argv, self.log_path, cwd=self.workdir, env=python_env(argv), name=self.name
                )
            except OSError as exc:
                raise BackendStartFailed(
                    f"cannot run back-end command {shlex.join(argv)}: {exc}", None, ""
                ) from exc

    def _wait_listening(self) -> None:
        process = self._process
        assert process is not None, "listen mode always has a command"
        try:
            process.wait_for_socket(self.socket_path, self.start_timeout)
        except PeerProcessError:
            status = process.exit_status()
            tail = self.log_tail()
            if status is not None:
                self._exit_status = status
                raise BackendStartFailed(
                    f"back-end {self.name!r} exited with status {status} before listening on "
                    f"{self.socket_path}",
                    status,
                    tail,
                ) from None
            self.stop()
            raise BackendStartHang(
                f"back-end {self.name!r} did not listen on {self.socket_path} within "
                f"{self.start_timeout:g} s",
                tail,
            ) from None

    def stop(self) -> None:
        """SIGTERM the back-end's process group, SIGKILL after ``stop_timeout``; always reaped."""
        self._launched = False
        process = self._process
        if process is not None:
            if process.alive():
                self._stopped_by_us = True
            self._exit_status = process.terminate(self.stop_timeout)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def restart(self) -> str:
        """Stop and start again (the disk image is kept)."""
        self.stop()
        return self.start()

    def _running(self) -> bool:
        if self._process is not None:
            return self._process.alive()
        return self.profile.command is None and self._listener is not None

    def _served_its_connection(self) -> bool:
        """A one-connection back-end that exited with status 0 after its connection."""
        return (
            self.profile.one_connection
            and self._connections > 0
            and self._process is not None
            and self._process.exit_status() == 0
        )

    def alive(self) -> bool:
        """Whether our back-end process is running (connect mode without command: listening);
        a one-connection back-end that exited cleanly after its connection counts as alive
        (the next connect_socket starts a fresh instance)."""
        return self._running() or self._served_its_connection()

    def exit_status(self) -> int | None:
        """Exit status of the last run (negative = killed by that signal), None while running."""
        if self._process is not None:
            status = self._process.exit_status()
            if status is not None:
                self._exit_status = status
            else:
                return None
        return self._exit_status

    def expect_exit(self) -> None:
        """The case makes this run of the back-end exit on purpose (e.g. its own ``--crash-at``
        fault injection): its death is then not a ``crash`` verdict. Reset by start()."""
        self._stopped_by_us = True

    def send_signal(self, signum: signal.Signals) -> None:
        """Send a signal to the back-end process (e.g. SIGSTOP/SIGKILL in crash scenarios)."""
        if self._process is None or not self._process.alive():
            raise TargetError(f"back-end {self.name!r} is not running")
        if signum in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGQUIT):
            self._stopped_by_us = True  # its death is then the case's doing, not a crash
        self._process.signal(signum)

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the back-end to exit; its status or None."""
        if self._process is None:
            return self._exit_status
        status = self._process.wait(timeout)
        if status is not None:
            self._exit_status = status
        return status

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the back-end's log (stdout and stderr)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                data = f.read()
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    def connect_socket(self, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> socket.socket:
        """Connect to the back-end (listen mode) or accept its connection (connect mode)."""
        if self._launched and self._running():
            self.start()  # launched ahead of need: wait until it listens
        if self.profile.one_connection and self._connections > 0:
            self.restart()  # it serves one connection: a fresh instance for this one
        deadline = time.monotonic() + timeout
        if self.profile.socket_mode == "listen":
            if self._process is None:
                raise TargetError(f"back-end {self.name!r} is not started")
            sock = connect_unix(self.socket_path, deadline)
            self._connections += 1
            return sock
        if self._listener is None:
            raise TargetError(f"back-end {self.name!r} is not started (no listening socket)")
        self._listener.settimeout(timeout)
        try:
            conn, _ = self._listener.accept()
        except TimeoutError:
            raise BackendStartHang(
                f"back-end {self.name!r} did not connect to {self.socket_path} within {timeout:g} s",
                self.log_tail(),
            ) from None
        conn.settimeout(None)
        return conn

    @contextlib.contextmanager
    def watched_disk(self, latency_ms: int, *, relaunch: bool = True) -> Iterator[WatchedDisk]:
        """Run the back-end on the watched disk (suites/watched.py) with ``latency_ms`` per
        read, write and flush inside the context (restarts it when it runs). A disk another
        target already watches (a migration pair sharing one image) is joined, not mounted
        again. Leaving stops the back-end (it must close the file before the unmount) and, with
        ``relaunch``, launches it again on the plain image."""
        reason = watched.unavailable()
        if reason is not None:
            raise SlowIoUnsupported(f"back-end {self.name!r}: the watched disk: {reason}")
        plain = self.values["disk"]
        disk = watched.active(Path(plain))
        owned = disk is None
        was_running = self.alive()
        if disk is None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._make_disk()
            disk = watched.WatchedDisk(Path(plain), self.workdir / "watched")
            try:
                disk.mount()
            except OSError as exc:
                raise SlowIoUnsupported(
                    f"back-end {self.name!r}: the watched disk: {exc.strerror}") from None
        disk.set_latency(latency_ms)
        self.values["disk"] = str(disk.path)
        self.watched = disk
        try:
            if was_running or not relaunch:
                # slow_disk's way (relaunch=False): the back-end runs on the watched disk now
                self.restart()
            yield disk
        finally:
            self.stop()
            self.values["disk"] = plain
            self.watched = None
            if owned:
                disk.unmount()
            else:
                disk.set_latency(0)
            if relaunch and was_running:
                self.launch()

    @contextlib.contextmanager
    def slow_io(self, latency_ms: int) -> Iterator[None]:
        """Run the back-end with ``latency_ms`` per I/O inside the context (restarts it)."""
        route = self.profile.slow_io_route()
        if route is None:
            raise SlowIoUnsupported(f"back-end {self.name!r}: {self.profile.slow_io_unsupported()}")
        if route == "disk":
            with self.watched_disk(latency_ms):
                yield
            return
        was_running = self.alive()
        self._latency_ms = latency_ms
        try:
            if was_running:
                self.restart()
            yield
        finally:
            self._latency_ms = None
            if was_running or self.alive():
                # back to the normal command, launched without waiting: the next start() or
                # connect_socket() waits until it listens (a case that is done with the target
                # does not wait for a start it never uses)
                self.stop()
                self.launch()

    @contextlib.contextmanager
    def queues(self, count: int) -> Iterator[None]:
        """Run the back-end with ``count`` queues inside the context (the profile's
        ``queues_args``; restarts it), back to its normal command after."""
        if self.profile.queues_args is None:
            raise TargetError(f"back-end {self.name!r}: the profile has no queues_args")
        self._queues = count
        try:
            self.restart()
            yield
        finally:
            self._queues = None
            self.stop()
            self.launch()

    @property
    def capabilities(self) -> Capabilities:
        """Probed once per run through the shared probe (see TargetFactory)."""
        if self._probe is None:
            raise TargetError(f"back-end {self.name!r} has no capability probe attached")
        return self._probe.capabilities()
