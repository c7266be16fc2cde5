"""The back-end under test: one ``typing.Protocol`` and its launch strategies.

A back-end under test is reached one of three ways (DESIGN.md "The back-end under test"):

- :class:`CommandTarget`: we run a command template (placeholders ``{socket}``, ``{disk}``,
  ``{workdir}``, ...); the back-end listens on ``{socket}`` (the default) and we connect;
- :class:`CommandTarget` with ``socket_mode = "connect"`` (``--vhost-backend-connects``): we
  listen on ``{socket}`` and the back-end connects to us; the command is optional (someone
  else may start the back-end and point it at our socket);
- :class:`ExternalSocketTarget`: someone else runs the back-end; we only know its socket.

Profiles (``suites/profiles/*.toml`` or a user's TOML file with the same keys) describe a
back-end: command, socket mode, disk size, how to make its I/O slow, whether two instances can
share one disk, and known deviations. Every target owns its work directory (socket, disk image,
log), named by the pytest-xdist worker id, so that any split of the cases over workers works.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import string
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Literal, Protocol

from vhost_conformance.peers.process import PeerProcessError, Supervised
from vhost_conformance.suites import watched
from vhost_conformance.suites.capabilities import Capabilities as Capabilities
from vhost_conformance.suites.capabilities import Feature as Feature
from vhost_conformance.suites.capabilities import feature_label as feature_label
from vhost_conformance.suites.capabilities import probe_capabilities as probe_capabilities
from vhost_conformance.suites.device_type import (
    DEFAULT_DEVICE_TYPE,
    DeviceType,
    from_print_capabilities,
)
from vhost_conformance.suites.target_errors import BackendStartFailed as BackendStartFailed
from vhost_conformance.suites.target_errors import BackendStartHang as BackendStartHang
from vhost_conformance.suites.target_errors import SlowIoUnsupported as SlowIoUnsupported
from vhost_conformance.suites.target_errors import TargetError as TargetError
from vhost_conformance.suites.target_errors import UsageError as UsageError
from vhost_conformance.suites.watched import WatchedDisk

SocketMode = Literal["listen", "connect"]

#: Placeholders a command template may use. ``{socket}``, ``{disk}`` and ``{workdir}`` are the
#: documented ones; the others help the built-in profiles (``{cache}`` = the peers' cache,
#: ``{python}`` = this interpreter, ``{file_prefix}`` = a per-instance unique name for DPDK's EAL).
COMMAND_PLACEHOLDERS = frozenset(
    {"socket", "disk", "workdir", "disk_size", "cache", "python", "file_prefix", "worker"}
)
#: Extra placeholders allowed only in ``[slow_io]`` templates.
SLOW_IO_PLACEHOLDERS = frozenset({"latency_ms", "latency_ns"})
#: The extra placeholder of ``queues_args``.
QUEUES_PLACEHOLDERS = frozenset({"queues"})

DEFAULT_START_TIMEOUT = 15.0
DEFAULT_STOP_TIMEOUT = 5.0
DEFAULT_CONNECT_TIMEOUT = 5.0


def cache_dir() -> Path:
    """The peers' cache: ``$VHOST_CONFORMANCE_CACHE`` or ``/var/cache/vhost-conformance``."""
    return Path(os.environ.get("VHOST_CONFORMANCE_CACHE", "/var/cache/vhost-conformance"))


def parse_size(value: int | str, what: str = "disk_size") -> int:
    """Parse ``64M``/``1G``/``4096`` into bytes; a clear UsageError otherwise."""
    if isinstance(value, int):
        if value <= 0:
            raise UsageError(f"{what} must be positive, got {value}")
        return value
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = 1
    if text and text[-1] in units:
        scale = units[text[-1]]
        text = text[:-1]
    try:
        size = int(text) * scale
    except ValueError:
        raise UsageError(f"{what}: cannot read {value!r} as a size (e.g. 64M, 1G, 4096)") from None
    if size <= 0:
        raise UsageError(f"{what} must be positive, got {value!r}")
    return size


def template_fields(template: str) -> set[str]:
    """The placeholder names used in a ``str.format`` template (``{{`` escapes excluded)."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise UsageError(f"malformed template {template!r}: {exc}") from None


def check_template(template: str, allowed: frozenset[str], what: str) -> None:
    """Reject empty or positional placeholders and names outside ``allowed``."""
    fields = template_fields(template)
    bad = sorted(f for f in fields if f not in allowed)
    if bad:
        raise UsageError(
            f"{what} {template!r} uses unknown placeholder(s) "
            + ", ".join("{" + b + "}" for b in bad)
            + "; known: "
            + ", ".join("{" + a + "}" for a in sorted(allowed))
        )


def render_command(template: str, values: Mapping[str, str]) -> list[str]:
    """Split a command template like a shell would, then fill each word's placeholders."""
    check_template(template, frozenset(values), "command template")
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise UsageError(f"command template {template!r}: {exc}") from None
    if not words:
        raise UsageError("command template is empty")
    return [word.format_map(values) for word in words]


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class SlowIo:
    """How to make a back-end's I/O slow (for drain scenarios).

    ``args`` are appended to the command, ``command`` replaces it; both may use
    ``{latency_ms}``/``{latency_ns}``. With neither, ``unsupported`` says why it is impossible.
    """

    args: str | None = None
    command: str | None = None
    unsupported: str = "the profile gives no way to make this back-end's I/O slow"
    #: ``"disk"``: make the I/O slow with the watched disk (suites/watched.py) even where the
    #: profile has a knob of its own; None: the knob, else the watched disk when the command
    #: uses ``{disk}``.
    via: str | None = None

    @property
    def possible(self) -> bool:
        """Whether a slow-I/O variant of the command exists (the profile's own knob)."""
        return self.args is not None or self.command is not None


@dataclass(frozen=True)
class ProfileDeviation:
    """A known deviation of a back-end: the case is expected to fail, for this reason."""

    case: str
    reason: str


@dataclass(frozen=True)
class Profile:
    """A back-end under test, as a named profile or a user's TOML file describes it."""

    name: str
    command: str | None
    socket_mode: SocketMode = "listen"
    socket: str | None = None
    disk_size: int = 64 << 20
    slow_io: SlowIo = field(default_factory=SlowIo)
    shares_disk: bool = False
    deviations: tuple[ProfileDeviation, ...] = ()
    description: str = ""
    needs: tuple[str, ...] = ()
    source: str = "<built-in>"
    #: The command that prints the back-end's capabilities (vhost-user.rst "Backend program
    #: conventions"); None: the command's program with ``--print-capabilities``.
    print_capabilities: str | None = None
    #: The command for ``--vhost-backend-connects`` (the back-end connects to ``{socket}``);
    #: None: this back-end cannot connect to us.
    connect_command: str | None = None
    #: How many instances each worker keeps started ahead of need (listen mode only): a case
    #: then gets a process that was started while the previous case ran, still used by that one
    #: case only. 0: every case starts its own when it needs it.
    prestart: int = 0
    #: The back-end serves one connection and then exits (libvhost-user's contrib
    #: vhost-user-blk): every connection gets a fresh instance (a reconnect restarts it, the
    #: disk image is kept), and its exit with status 0 after that connection is not a crash.
    one_connection: bool = False
    #: The virtio device type the back-end implements (vhost-user.rst "Backend program
    #: conventions" --print-capabilities "type" names: block, net, fs, ...). None: the
    #: ``type`` that ``print_capabilities`` prints when the profile sets that command, else
    #: block (suites.device_type). Only the control-plane families run on a type other than
    #: block (see CONTROL_PLANE_FAMILIES).
    device_type: str | None = None
    #: Appended to the command to run the back-end with ``{queues}`` queues (the qemu tier's
    #: VU-QEMU-3 on a back-end whose default command runs one); None: no such option.
    queues_args: str | None = None

    def __post_init__(self) -> None:
        if self.socket_mode not in ("listen", "connect"):
            raise UsageError(
                f"profile {self.name!r}: socket_mode must be 'listen' or 'connect', "
                f"got {self.socket_mode!r}"
            )
        if self.command is not None:
            check_template(self.command, COMMAND_PLACEHOLDERS, f"profile {self.name!r}: command")
            if "socket" not in template_fields(self.command) and self.socket is None:
                raise UsageError(
                    f"profile {self.name!r}: the command template {self.command!r} has no "
                    "{socket} placeholder and the profile gives no 'socket' path: "
                    "the suite cannot know where the back-end listens"
                )
        if self.one_connection and self.socket_mode != "listen":
            raise UsageError(
                f"profile {self.name!r}: one_connection needs socket_mode 'listen' (the suite "
                "restarts the back-end for each connection it makes)"
            )
        if not isinstance(self.prestart, int) or not 0 <= self.prestart <= 8:
            raise UsageError(
                f"profile {self.name!r}: prestart must be an integer from 0 to 8, "
                f"got {self.prestart!r}"
            )
        if self.socket is not None:
            check_template(self.socket, COMMAND_PLACEHOLDERS, f"profile {self.name!r}: socket")
        if self.connect_command is not None:
            check_template(
                self.connect_command,
                COMMAND_PLACEHOLDERS,
                f"profile {self.name!r}: connect_command",
            )
            if "socket" not in template_fields(self.connect_command):
                raise UsageError(
                    f"profile {self.name!r}: connect_command {self.connect_command!r} has no "
                    "{socket} placeholder: the back-end must be told where we listen"
                )
        if self.print_capabilities is not None:
            check_template(
                self.print_capabilities,
                COMMAND_PLACEHOLDERS,
                f"profile {self.name!r}: print_capabilities",
            )
        if self.queues_args is not None:
            check_template(self.queues_args, COMMAND_PLACEHOLDERS | QUEUES_PLACEHOLDERS,
                           f"profile {self.name!r}: queues_args")  # fmt: skip
        for text, what in (
            (self.slow_io.args, "slow_io.args"),
            (self.slow_io.command, "slow_io.command"),
        ):
            if text is not None:
                check_template(
                    text,
                    COMMAND_PLACEHOLDERS | SLOW_IO_PLACEHOLDERS,
                    f"profile {self.name!r}: {what}",
                )

    def slow_io_route(self) -> Literal["knob", "disk"] | None:
        """How this back-end's I/O is made slow: its own knob, the watched disk (a command that
        uses ``{disk}``), or None (impossible: :meth:`slow_io_unsupported` says why)."""
        uses_disk = self.command is not None and "disk" in template_fields(self.command)
        if self.slow_io.via == "disk":
            return "disk" if uses_disk else None
        if self.slow_io.possible:
            return "knob"
        return "disk" if uses_disk else None

    def slow_io_unsupported(self) -> str:
        """Why :meth:`slow_io_route` is None."""
        if self.slow_io.via == "disk":
            return "slow_io.via = 'disk' but the command does not use {disk}"
        return f"{self.slow_io.unsupported}; its command uses no {{disk}} for the watched disk"

    def missing_needs(self, values: Mapping[str, str]) -> list[str]:
        """Files the profile needs (e.g. a provisioned peer binary) that do not exist here."""
        return [
            path for path in (n.format_map(values) for n in self.needs) if not os.path.exists(path)
        ]


_PROFILE_KEYS = frozenset(
    {
        "name",
        "description",
        "command",
        "socket_mode",
        "socket",
        "disk_size",
        "slow_io",
        "shares_disk",
        "deviation",
        "needs",
        "print_capabilities",
        "connect_command",
        "prestart",
        "one_connection",
        "device_type",
        "queues_args",
    }
)


def profile_from_mapping(data: Mapping[str, object], name: str, source: str) -> Profile:
    """Build a Profile from parsed TOML; unknown keys and wrong types are UsageErrors."""
    unknown = sorted(set(data) - _PROFILE_KEYS)
    if unknown:
        raise UsageError(
            f"profile {source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_PROFILE_KEYS))}"
        )

    def typed(key: str, kind: type, default: object) -> object:
        value = data.get(key, default)
        if value is not None and not isinstance(value, kind):
            raise UsageError(
                f"profile {source}: {key} must be {kind.__name__}, got {type(value).__name__}"
            )
        return value

    slow_raw = typed("slow_io", dict, {})
    assert isinstance(slow_raw, dict)
    bad_slow = sorted(set(slow_raw) - {"args", "command", "unsupported", "via"})
    if bad_slow:
        raise UsageError(f"profile {source}: unknown [slow_io] key(s) {', '.join(bad_slow)}")
    slow = SlowIo(
        args=slow_raw.get("args"),
        command=slow_raw.get("command"),
        unsupported=str(slow_raw.get("unsupported", SlowIo.unsupported)),
        via=slow_raw.get("via"),
    )
    if slow.via not in (None, "disk"):
        raise UsageError(f"profile {source}: slow_io.via must be 'disk', got {slow.via!r}")
    deviations = []
    raw_devs = typed("deviation", list, [])
    assert isinstance(raw_devs, list)
    for i, entry in enumerate(raw_devs):
        if not isinstance(entry, dict) or not entry.get("case") or not entry.get("reason"):
            raise UsageError(
                f"profile {source}: [[deviation]] #{i + 1} needs both 'case' and 'reason'"
            )
        deviations.append(ProfileDeviation(str(entry["case"]), str(entry["reason"])))
    size_raw = data.get("disk_size", "64M")
    if not isinstance(size_raw, int | str):
        raise UsageError(f"profile {source}: disk_size must be an int or a string like '64M'")
    needs = typed("needs", list, [])
    assert isinstance(needs, list)
    command = typed("command", str, None)
    socket_path = typed("socket", str, None)
    print_caps = typed("print_capabilities", str, None)
    connect_cmd = typed("connect_command", str, None)
    device_type = typed("device_type", str, None)
    queues_args = typed("queues_args", str, None)
    prestart = data.get("prestart", 0)
    if isinstance(prestart, bool) or not isinstance(prestart, int):
        raise UsageError(f"profile {source}: prestart must be int, got {type(prestart).__name__}")
    return Profile(
        name=str(typed("name", str, name)),
        command=command if isinstance(command, str) else None,
        socket_mode=str(typed("socket_mode", str, "listen")),  # type: ignore[arg-type]
        socket=socket_path if isinstance(socket_path, str) else None,
        disk_size=parse_size(size_raw),
        slow_io=slow,
        shares_disk=bool(typed("shares_disk", bool, False)),
        deviations=tuple(deviations),
        description=str(typed("description", str, "")),
        needs=tuple(str(n) for n in needs),
        source=source,
        print_capabilities=print_caps if isinstance(print_caps, str) else None,
        connect_command=connect_cmd if isinstance(connect_cmd, str) else None,
        prestart=prestart,
        one_connection=bool(typed("one_connection", bool, False)),
        device_type=device_type if isinstance(device_type, str) else None,
        queues_args=queues_args if isinstance(queues_args, str) else None,
    )


#: Families whose cases speak only the vhost-user control plane (handshake, features,
#: REPLY_ACK, memory tables, malformed messages and fds, program conventions): they run on a
#: back-end of any device type; every other family drives virtio-blk requests or the blk
#: config space and is ``unsupported`` on another type.
CONTROL_PLANE_FAMILIES = frozenset({"handshake", "memory", "malformed", "program"})
#: Cases of those families that still check with virtio-blk requests (their liveness or
#: data check is a blk read/write) or expect what only a blk back-end must offer (CONFIG):
#: unsupported on another device type too. Found by running them against dpdk-testpmd's
#: vhost-user-net (each hung on its blk request) and virtiofsd (killed by its seccomp filter
#: on the blk request, signal 31; VU-FD-4's final check too, once its REM_MEM_REG loop ran).
BLK_REQUEST_CASES = frozenset({
    "VU-FEAT-11",  # VIRTIO 1.3 5.2.5.2: virtio-blk's FLUSH/CONFIG_WCE bits
    "VU-FEAT-5", "VU-FD-2", "VU-FD-3", "VU-FD-4", "VU-MEM-4", "VU-MEM-5", "VU-MEM-6", "VU-MEM-7",
    "VU-MAL-17",
    "VU-MAL-1", "VU-MAL-2", "VU-MAL-3", "VU-MAL-4", "VU-MAL-5", "VU-MAL-6", "VU-MAL-7",
    "VU-MAL-8", "VU-MAL-9", "VU-MAL-11", "VU-MAL-12", "VU-MAL-15", "VU-MAL-16",
})


def builtin_profile_names() -> list[str]:
    """Names of the profiles shipped in ``vhost_conformance.suites/profiles``."""
    folder = resources.files("vhost_conformance.suites").joinpath("profiles")
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def load_profile(name_or_path: str) -> Profile:
    """Load a built-in profile by name, or a user's TOML profile file by path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.is_file():
        try:
            text = path.read_text()
        except OSError as exc:
            raise UsageError(f"cannot read profile file {name_or_path}: {exc}") from None
        source, default_name = str(path), path.stem
    else:
        resource = resources.files("vhost_conformance.suites").joinpath(
            "profiles", f"{name_or_path}.toml"
        )
        if not resource.is_file():
            raise UsageError(
                f"unknown back-end profile {name_or_path!r}; built-in profiles: "
                f"{', '.join(builtin_profile_names())} (or give a path to a .toml file)"
            )
        text = resource.read_text()
        source, default_name = f"profiles/{name_or_path}.toml", name_or_path
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"profile {source}: not valid TOML: {exc}") from None
    return profile_from_mapping(data, default_name, source)


def command_profile(command: str, socket_mode: SocketMode = "listen") -> Profile:
    """A profile for a bare ``--vhost-backend-cmd`` template (no deviations, no slow I/O)."""
    check_template(command, COMMAND_PLACEHOLDERS, "--vhost-backend-cmd")
    if "socket" not in template_fields(command):
        raise UsageError(
            f"--vhost-backend-cmd {command!r} has no {{socket}} placeholder: the suite "
            "creates the socket path and must pass it to the back-end"
        )
    return Profile(
        name="command", command=command, socket_mode=socket_mode, source="--vhost-backend-cmd"
    )


# --------------------------------------------------------------------------- targets


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


def _connect_unix(path: str, deadline: float) -> socket.socket:
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


def _is_socket(path: str) -> bool:
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
            sock = _connect_unix(self.socket_path, deadline)
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
        if not _is_socket(self.path):
            raise TargetError(
                f"external back-end socket {self.path} does not exist (or is not a socket)"
            )
        return self.path

    def stop(self) -> None:
        """Nothing to stop: someone else owns the back-end."""

    def restart(self) -> str:
        """We cannot restart someone else's back-end: wait up to 10 s for its socket."""
        deadline = time.monotonic() + 10.0
        while not _is_socket(self.path):
            if time.monotonic() >= deadline:
                raise TargetError(
                    f"external back-end socket {self.path} did not come back within 10 s"
                )
            time.sleep(0.05)
        return self.path

    def alive(self) -> bool:
        """Whether the socket file is there."""
        return _is_socket(self.path)

    def exit_status(self) -> int | None:
        """Unknown: not our process."""
        return None

    def log_tail(self, lines: int = 30) -> str:
        """No log: not our process."""
        return ""

    def connect_socket(self, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> socket.socket:
        """Connect to the external socket."""
        return _connect_unix(self.path, time.monotonic() + timeout)

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


class CapabilityProbe(Protocol):
    """Where a target gets its (cached) capabilities from."""

    def capabilities(self) -> Capabilities:
        """Probe once, then return the cached result."""


# --------------------------------------------------------------------------- factory

_LABEL = re.compile(r"[^A-Za-z0-9_.-]+")


class TargetFactory:
    """Makes one back-end under test per case (own work dir, socket, disk, process), named by
    the xdist worker, and probes capabilities once per run on a dedicated instance."""

    def __init__(
        self,
        *,
        profile: Profile | None = None,
        external_socket: str | None = None,
        worker: str = "main",
        rundir: Path | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        probe_timeout: float = 5.0,
        maker: Callable[[str, Path], BackendTarget | None] | None = None,
    ) -> None:
        if (profile is None) == (external_socket is None):
            raise UsageError("give exactly one of a back-end profile or an external socket")
        self.profile = profile
        self.external_socket = external_socket
        self.worker = worker
        self.start_timeout = start_timeout
        self.probe_timeout = probe_timeout
        self.maker = maker
        base = os.environ.get("VHOST_CONFORMANCE_RUNDIR", tempfile.gettempdir())
        self.rundir = rundir or Path(tempfile.mkdtemp(prefix=f"vc-{worker}-", dir=base))
        self._count = itertools.count(1)
        self._targets: list[BackendTarget] = []
        #: pre-started instances (profile.prestart), oldest first; each is handed out once
        self._pool: list[CommandTarget] = []
        self.pool_hits = 0
        self._capabilities: Capabilities | None = None
        self._probe_error: TargetError | None = None
        self._device_type: DeviceType | None = None

    @property
    def name(self) -> str:
        """The back-end's name for reports."""
        return self.profile.name if self.profile is not None else "external"

    @property
    def command(self) -> str | None:
        """The command template, if we run the back-end."""
        return self.profile.command if self.profile is not None else None

    @property
    def prestart(self) -> int:
        """How many instances are kept pre-started (the profile's ``prestart``, listen mode)."""
        profile = self.profile
        if profile is None or profile.command is None or profile.socket_mode != "listen":
            return 0
        return profile.prestart

    def _workdir(self, label: str) -> Path:
        return self.rundir / f"{next(self._count):03d}-{_LABEL.sub('_', label)[:32]}"

    def _fill_pool(self) -> None:
        """Launch instances until ``prestart`` are waiting (no wait for them to listen)."""
        while len(self._pool) < self.prestart:
            assert self.profile is not None
            target = CommandTarget(
                self.profile,
                self._workdir("prestarted"),
                worker=self.worker,
                start_timeout=self.start_timeout,
                probe=self,
            )
            try:
                target.launch()
            except TargetError:
                # the ordinary start path will run it again and report the failure
                target.stop()
                self._forget(target)
                return
            self._targets.append(target)
            self._pool.append(target)

    def warm(self) -> None:
        """Launch the pre-started instances now (e.g. while pytest finishes collecting)."""
        if self.prestart:
            self._fill_pool()

    def _from_pool(self) -> CommandTarget | None:
        """A pre-started instance still running (dead ones are discarded), or None."""
        while self._pool:
            target = self._pool.pop(0)
            if target.alive():
                self.pool_hits += 1
                return target
            target.stop()
            self._forget(target)
        return None

    def new(self, label: str = "case") -> BackendTarget:
        """A new back-end in its own work directory, used by one case only: a pre-started
        instance (``prestart``; start() then waits until it listens) or a not yet started one."""
        workdir = self._workdir(label)
        target: BackendTarget | None = None
        if self.maker is not None:
            target = self.maker(label, workdir)
        if target is None and self.prestart:
            self._fill_pool()
            target = self._from_pool()
            self._fill_pool()
            if target is not None:
                return target
        if target is None:
            if self.profile is not None:
                target = CommandTarget(
                    self.profile,
                    workdir,
                    worker=self.worker,
                    start_timeout=self.start_timeout,
                    probe=self,
                )
            else:
                assert self.external_socket is not None
                target = ExternalSocketTarget(self.external_socket, probe=self)
        self._targets.append(target)
        return target

    def device_type(self) -> DeviceType:
        """The device type (suites.device_type): the profile's, else the ``type`` its
        ``print_capabilities`` command prints (run once), else block."""
        if self._device_type is None:
            profile = self.profile
            if profile is not None and profile.device_type is not None:
                self._device_type = DeviceType(profile.device_type, "the profile's device_type")
            elif profile is not None and profile.print_capabilities is not None:
                workdir = self._workdir("device-type")
                workdir.mkdir(parents=True, exist_ok=True)
                probe = CommandTarget(profile, workdir, worker=self.worker)
                argv = probe.print_capabilities_argv()
                assert argv is not None
                self._device_type = from_print_capabilities(argv, workdir)
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                self._device_type = DeviceType(
                    DEFAULT_DEVICE_TYPE, "neither a device_type nor a print_capabilities command"
                )
        return self._device_type

    def capabilities(self) -> Capabilities:
        """Probe once (a dedicated instance, stopped afterwards), then the cached result."""
        if self._capabilities is not None:
            return self._capabilities
        if self._probe_error is not None:
            raise self._probe_error
        target = self.new("probe")
        try:
            target.start()
            with contextlib.closing(target.connect_socket(self.probe_timeout)) as sock:
                self._capabilities = probe_capabilities(
                    sock, self.probe_timeout, device_type=self.device_type().name
                )
        except TargetError as exc:
            if isinstance(exc, BackendStartHang | BackendStartFailed) and not exc.log_tail:
                exc.log_tail = target.log_tail()
            if isinstance(exc, BackendStartFailed) and exc.exit_status is None:
                # EOF can reach us a moment before the dying process is reapable
                if isinstance(target, CommandTarget):
                    target.wait_exit(1.0)
                if not target.alive():
                    exc.exit_status = target.exit_status()
            self._probe_error = exc
            raise
        finally:
            target.stop()
            self._forget(target)
        return self._capabilities

    def _forget(self, target: BackendTarget) -> None:
        with contextlib.suppress(ValueError):
            self._targets.remove(target)
        workdir = getattr(target, "workdir", None)
        if isinstance(workdir, Path):
            shutil.rmtree(workdir, ignore_errors=True)

    def release(self, target: BackendTarget, *, keep_files: bool = False) -> None:
        """Stop a target made here and (unless ``keep_files``) remove its work directory."""
        target.stop()
        if keep_files:
            with contextlib.suppress(ValueError):
                self._targets.remove(target)
        else:
            self._forget(target)

    def close(self) -> None:
        """Stop every target still running (pre-started ones too) and remove the run directory."""
        self._pool.clear()
        for target in list(self._targets):
            with contextlib.suppress(Exception):
                target.stop()
        self._targets.clear()
        shutil.rmtree(self.rundir, ignore_errors=True)


def connecting_profile(profile: Profile) -> Profile:
    """The profile for ``--vhost-backend-connects``: the back-end connects to our socket.

    A profile already in connect mode is returned as it is; otherwise its ``connect_command``
    replaces the command (a UsageError when it has none: that back-end only listens).
    """
    if profile.socket_mode == "connect":
        return profile
    if profile.connect_command is None:
        raise UsageError(
            f"back-end profile {profile.name!r} has no connect_command: it cannot connect to "
            "the suite (drop --vhost-backend-connects, or give a profile/command that connects)"
        )
    return replace(
        profile,
        command=profile.connect_command,
        socket_mode="connect",
        prestart=0,
        socket=None,
        slow_io=SlowIo(unsupported="slow I/O is not defined for the connecting command"),
    )
