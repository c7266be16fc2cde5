"""The back-end program's command line: vhost-user.rst (QEMU 11.1.3) "Backend program
conventions" (``--socket-path=PATH``, ``--fd=FDNUM``, ``--print-capabilities``, failing early).

Family: program (VU-BACKEND-1..6). Each case
starts the program itself from the profile's ``program_command`` (the program without its
socket option); a profile without one names why in ``program_unsupported`` (a storage daemon,
an example with a fixed socket) and the cases end ``unsupported`` with that reason.
The section is advisory as a whole (ADVISORY_CONVENTIONS): violations are non-strict.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from vhost_conformance.frontend.channel import BackendError
from vhost_conformance.suites.clauses import (
    ADVISORY_CONVENTIONS,
    BACKEND_CONVENTIONS_QUOTE,
    RST,
    quotes,
)
from vhost_conformance.suites.drivers.program import (
    PROGRAM_DEADLINE,
    connect,
    get_features,
    program_argv,
    run_program,
    socket_path,
    wait_socket,
)
from vhost_conformance.suites.model import SHOULD, CaseNonStrict, Unsupported, case
from vhost_conformance.suites.target import BackendTarget, CommandTarget, python_env

_F = TypeVar("_F", bound=Callable[..., Any])

#: vhost-user.rst Backend program conventions: the options are mandatory.
MANDATORY_QUOTE = (
    "The following command line options have an expected behaviour. They are mandatory, unless "
    "explicitly said differently:"
)


def convention(
    case_id: str, title: str, *sentences: str, requirement: str,
    ambiguity: str = ADVISORY_CONVENTIONS,
) -> Callable[[_F], _F]:
    """The record of a "Backend program conventions" case: SHOULD (the section is advisory as
    a whole), run on the program we start, quoting the section's opening and ``sentences``."""
    return case(case_id, title=title, family="program", level=SHOULD,
                clause=f"{RST} Backend program conventions",
                quote=quotes(BACKEND_CONVENTIONS_QUOTE, *sentences), requirement=requirement,
                needs=["command"], ambiguity=ambiguity)


def _serves(sock: socket.socket, what: str) -> None:
    """GET_FEATURES answered on ``sock``, else non-strict naming ``what``."""
    try:
        get_features(sock)
    except BackendError as exc:
        raise CaseNonStrict(f"{what}: GET_FEATURES not answered ({exc})") from None


@convention(
    "VU-BACKEND-1", "Exits on SIGTERM, does not daemonize",
    "The back-end program must not daemonize itself, but it may be daemonized by the "
    "management layer.",
    "The back-end program must end (as quickly and cleanly as possible) when the SIGTERM "
    "signal is received.",
    requirement="The back-end program stays in the foreground as the process we started and exits "
        "on SIGTERM.",
)
def test_exits_on_sigterm(vhost_target: BackendTarget) -> None:
    """The program stays in the foreground and exits on SIGTERM."""
    import signal

    assert isinstance(vhost_target, CommandTarget)
    if not vhost_target.alive():
        raise CaseNonStrict(
            f"the process we started exited with status {vhost_target.exit_status()} while its "
            "socket stayed: it daemonized"
        )
    vhost_target.send_signal(signal.SIGTERM)
    status = vhost_target.wait_exit(5.0)
    if status is None:
        raise CaseNonStrict("the back-end did not exit within 5 s of SIGTERM")


@convention(
    "VU-BACKEND-2", "--print-capabilities",
    "Output to stdout the back-end capabilities in JSON format, and then exit "
    "successfully.",
    requirement="The program prints its capabilities as JSON with type 'block' on "
        "--print-capabilities and exits 0.",
)
def test_print_capabilities(vhost_target: BackendTarget) -> None:
    """--print-capabilities prints JSON with the device's type (the profile's device_type
    when it names one) on stdout and exits 0."""
    assert isinstance(vhost_target, CommandTarget)
    argv = vhost_target.print_capabilities_argv()
    assert argv is not None
    try:
        done = subprocess.run(
            argv, capture_output=True, timeout=10, check=False, cwd=vhost_target.workdir
        )
    except subprocess.TimeoutExpired:
        raise CaseNonStrict(f"{' '.join(argv)} did not exit within 10 s") from None
    except OSError as exc:
        raise CaseNonStrict(f"cannot run {' '.join(argv)}: {exc}") from None
    if done.returncode != 0:
        raise CaseNonStrict(
            f"{' '.join(argv)} exited with status {done.returncode}: {done.stderr[-300:]!r}"
        )
    try:
        capabilities = json.loads(done.stdout)
    except ValueError:
        raise CaseNonStrict(
            f"--print-capabilities output on stdout is not JSON: {done.stdout[:200]!r} "
            f"(stderr: {done.stderr[:200]!r})"
        ) from None
    kind = vhost_target.profile.device_type
    seen = capabilities.get("type") if isinstance(capabilities, dict) else None
    if kind is None:
        # the run takes its device type from this output (suites.device_type): any type name
        if not isinstance(seen, str) or not seen:
            raise CaseNonStrict(
                f'--print-capabilities: expected {{"type": "<device type>", ...}}, seen '
                f"{capabilities!r:.200}"
            )
    elif seen != kind:
        raise CaseNonStrict(
            f'--print-capabilities: expected {{"type": "{kind}", ...}} (the profile\'s '
            f"device_type), seen {capabilities!r:.200}"
        )


@convention(
    "VU-BACKEND-3", "--socket-path=PATH",
    MANDATORY_QUOTE,
    "This option specify the location of the vhost-user Unix domain socket.",
    requirement="The program started with --socket-path=PATH (the option spelled as the spec "
        "spells it) listens on PATH and answers GET_FEATURES there.",
)
def test_socket_path_option(vhost_target: BackendTarget) -> None:
    """--socket-path=PATH: the program listens on PATH and answers there."""
    path = socket_path(vhost_target, "opt")
    argv = program_argv(vhost_target, f"--socket-path={path}")
    with run_program(vhost_target, argv, "socket-path") as process:
        why = wait_socket(process, path)
        if why is not None:
            raise CaseNonStrict(f"{' '.join(argv[-1:])}: no socket at {path}: {why}")
        try:
            sock = connect(path)
        except OSError as exc:
            raise CaseNonStrict(f"--socket-path={path}: connecting failed: {exc}") from None
        _serves(sock, f"--socket-path={path}")


@convention(
    "VU-BACKEND-4", "--fd=FDNUM",
    MANDATORY_QUOTE,
    "When this argument is given, the back-end program is started with the vhost-user "
    "socket as file descriptor FDNUM.",
    requirement="The program started with --fd=FDNUM and the vhost-user socket as that fd serves "
        "the vhost-user protocol on it (GET_FEATURES answered).",
    ambiguity=ADVISORY_CONVENTIONS + "; 'the vhost-user socket' is not said to be listening or "
        "connected: the profile's program_fd says which (libvhost-user's contrib "
        "vhost-user-blk and virtiofsd take a listening socket, the default)",
)
def test_fd_option(vhost_target: BackendTarget) -> None:
    """--fd=FDNUM: the program serves the socket it inherited as FDNUM."""
    argv0 = program_argv(vhost_target)  # Unsupported first, before any socket exists
    assert isinstance(vhost_target, CommandTarget)
    connected = vhost_target.profile.program_fd == "connected"
    ours: socket.socket | None = None
    path = socket_path(vhost_target, "fd")
    if connected:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        theirs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.bind(path)
        theirs.listen(4)
    try:
        fd = theirs.fileno()
        os.set_inheritable(fd, True)
        argv = [*argv0, f"--fd={fd}"]
        with run_program(vhost_target, argv, "fd", pass_fds=[fd]) as process:
            theirs.close()  # the program holds its own copy now
            what = f"--fd={fd} ({vhost_target.profile.program_fd} socket)"
            if ours is None:
                try:
                    ours = connect(path)
                except OSError as exc:
                    raise CaseNonStrict(f"{what}: connecting failed: {exc}") from None
            sock, ours = ours, None
            _serves(sock, f"{what}, program {process.describe()}")
            if not process.alive() and process.exit_status() != 0:
                raise CaseNonStrict(f"{what}: the program exited with {process.exit_status()}")
    finally:
        theirs.close()
        if ours is not None:
            ours.close()


@convention(
    "VU-BACKEND-5", "Initialization failure: early exit with status != 0",
    "If the back-end is not capable of enabling a requested feature on the host (such "
    "as 3D acceleration with virgl), or the initialization failed, the back-end should "
    "fail to start early and exit with a status != 0.",
    requirement="The program started with a disk image that does not exist exits within 10 s with "
        "a status other than 0.",
)
def test_init_failure_exit_status(vhost_target: BackendTarget) -> None:
    """A disk that cannot be opened: the program exits early, status != 0."""
    assert isinstance(vhost_target, CommandTarget)
    template = vhost_target.profile.program_command
    if template is not None and "{disk}" not in template:
        raise Unsupported("an initialization failure the suite can cause",
                          "the program command names no disk image ({disk})")
    missing = str(Path(vhost_target.workdir) / "no-such-directory" / "disk.img")
    path = socket_path(vhost_target, "init")
    argv = program_argv(vhost_target, f"--socket-path={path}", disk=missing)
    with run_program(vhost_target, argv, "init-failure") as process:
        status = process.wait(PROGRAM_DEADLINE)
        if status is None:
            raise CaseNonStrict(
                f"with the disk image {missing} missing the program still runs after "
                f"{PROGRAM_DEADLINE:g} s (it should fail to start early)"
            )
        if status == 0:
            raise CaseNonStrict(
                f"with the disk image {missing} missing the program exited with status 0 "
                f"(log: {process.log_tail(3)!r})"
            )


@convention(
    "VU-BACKEND-6", "--print-capabilities with other options: no normal function",
    "Output to stdout the back-end capabilities in JSON format, and then exit "
    "successfully.",
    "Other options and arguments should be ignored, and the back-end program should not "
    "perform its normal function.",
    requirement="The program started with its normal options, --socket-path=PATH and "
        "--print-capabilities prints JSON, exits 0 within 10 s and never listens on PATH.",
    ambiguity=ADVISORY_CONVENTIONS + "; 'other options' are taken to be the program's own (its "
        "normal command line), not unknown ones",
)
def test_print_capabilities_ignores_other_options(vhost_target: BackendTarget) -> None:
    """--print-capabilities among the normal options: JSON, exit 0, no socket."""
    path = socket_path(vhost_target, "caps")
    argv = program_argv(vhost_target, f"--socket-path={path}", "--print-capabilities")
    assert isinstance(vhost_target, CommandTarget)
    try:
        done = subprocess.run(argv, capture_output=True, timeout=PROGRAM_DEADLINE, check=False,
                              cwd=vhost_target.workdir, env=python_env(argv))
    except subprocess.TimeoutExpired:
        raise CaseNonStrict(
            f"{' '.join(argv)} still ran after {PROGRAM_DEADLINE:g} s (listening on the socket: "
            f"{os.path.exists(path)}): it performed its normal function"
        ) from None
    finally:
        listened = os.path.exists(path)
        if listened:
            os.unlink(path)
    if listened:
        raise CaseNonStrict(f"--print-capabilities with --socket-path={path}: the program "
                            "created the socket (it performed its normal function)")
    if done.returncode != 0:
        raise CaseNonStrict(f"--print-capabilities among other options exited with status "
                            f"{done.returncode}: {done.stderr[-300:]!r}")
    try:
        capabilities = json.loads(done.stdout)
    except ValueError:
        raise CaseNonStrict(f"--print-capabilities among other options: stdout is not JSON: "
                            f"{done.stdout[:200]!r}") from None
    if not isinstance(capabilities, dict) or not isinstance(capabilities.get("type"), str):
        raise CaseNonStrict(f'--print-capabilities: expected {{"type": ..., ...}}, seen '
                            f"{capabilities!r:.200}")
