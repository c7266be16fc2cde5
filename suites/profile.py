"""Back-end profiles: what a built-in profile (``suites/profiles/*.toml``) or a user's TOML file
says about a back-end under test (command template and its placeholders, socket mode, disk size,
how to make its I/O slow, whether two instances share a disk, known deviations), and the
device-type scoping of families and cases (DESIGN.md "The back-end under test")."""

from __future__ import annotations

import os
import shlex
import signal
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Literal

from vhost_conformance.suites.target_errors import (
    UsageError,
)

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
    #: vhost-user.rst "Backend program conventions" (the VU-BACKEND-3.. cases): the back-end
    #: program's command line without its socket option; the cases append
    #: ``--socket-path=PATH`` or ``--fd=FDNUM``. None: see ``program_unsupported``.
    program_command: str | None = None
    #: Why the cases of the program conventions cannot run on this back-end (e.g. it is not a
    #: program following them); used when ``program_command`` is None.
    program_unsupported: str | None = None
    #: What ``--fd=FDNUM`` hands the program: a ``listening`` Unix socket (libvhost-user's
    #: contrib vhost-user-blk, virtiofsd) or one ``connected`` end of a socket pair.
    program_fd: str = "listening"
    #: The signal (a name such as ``SIGUSR1``) after which the back-end re-reads the size of
    #: ``{disk}`` and tells the front-end (BACKEND_CONFIG_CHANGE_MSG): how a case provokes a
    #: back-end message (VU-SUSP-3). None: the suite cannot make the back-end send one.
    resize_signal: str | None = None
    #: Or: a QMP monitor socket of the back-end (a template: ``{workdir}/qmp.sock``) and the
    #: block node to grow there with ``block_resize`` (qemu-storage-daemon).
    resize_qmp: str | None = None
    resize_node: str | None = None

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
        if self.program_command is not None:
            check_template(self.program_command, COMMAND_PLACEHOLDERS,
                           f"profile {self.name!r}: program_command")  # fmt: skip
        if self.program_fd not in ("listening", "connected"):
            raise UsageError(
                f"profile {self.name!r}: program_fd must be 'listening' or 'connected', "
                f"got {self.program_fd!r}"
            )
        if self.resize_signal is not None and not (
                self.resize_signal.startswith("SIG")
                and isinstance(getattr(signal, self.resize_signal, None), signal.Signals)):
            raise UsageError(f"profile {self.name!r}: resize_signal {self.resize_signal!r} is "
                             "not a signal name (e.g. SIGUSR1)")
        if self.resize_qmp is not None:
            check_template(self.resize_qmp, COMMAND_PLACEHOLDERS,
                           f"profile {self.name!r}: resize_qmp")  # fmt: skip
            if not self.resize_node:
                raise UsageError(f"profile {self.name!r}: resize_qmp needs resize_node")
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
        "program_command",
        "program_unsupported",
        "program_fd",
        "resize_signal",
        "resize_qmp",
        "resize_node",
    }
)


#: Profile keys whose value is an optional string, each the Profile field of that name.
_OPTIONAL_TEXT_KEYS = (
    "command", "socket", "print_capabilities", "connect_command", "device_type", "queues_args",
    "program_command", "program_unsupported", "resize_signal", "resize_qmp", "resize_node",
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
    # the optional text keys, each a Profile field of the same name (str or None)
    texts: dict[str, str | None] = {}
    for key in _OPTIONAL_TEXT_KEYS:
        value = typed(key, str, None)
        texts[key] = value if isinstance(value, str) else None
    prestart = data.get("prestart", 0)
    if isinstance(prestart, bool) or not isinstance(prestart, int):
        raise UsageError(f"profile {source}: prestart must be int, got {type(prestart).__name__}")
    return Profile(
        name=str(typed("name", str, name)),
        socket_mode=str(typed("socket_mode", str, "listen")),  # type: ignore[arg-type]
        disk_size=parse_size(size_raw),
        slow_io=slow,
        shares_disk=bool(typed("shares_disk", bool, False)),
        deviations=tuple(deviations),
        description=str(typed("description", str, "")),
        needs=tuple(str(n) for n in needs),
        source=source,
        prestart=prestart,
        one_connection=bool(typed("one_connection", bool, False)),
        program_fd=str(typed("program_fd", str, "listening")),
        **texts,
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
    "VU-MEM-8", "VU-IOMMU-1",
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
