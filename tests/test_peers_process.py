"""peers.process: the supervisor starts, watches, kills (whole group) and reaps."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import sys
import time

import pytest
from vhost_conformance.peers.process import PeerProcessError, spawn, wait_for_text


def _gone(pid: int) -> bool:
    """True when no process ``pid`` exists (or only a zombie that is not ours to reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.02)
    return False


def test_terminate_kills_the_whole_group_and_reaps(tmp_path: pathlib.Path) -> None:
    log = tmp_path / "tree.log"
    # A shell whose child ignores SIGTERM: only the group SIGKILL can end it.
    script = "trap '' TERM; sleep 300 & echo grandchild=$!; wait"
    with spawn(["sh", "-c", script], log) as child:
        found = child.wait_for_log(r"grandchild=(\d+)", timeout=5)
        grandchild = int(found.group(1))
        assert child.alive()
        assert os.getpgid(grandchild) == child.pid
        started = time.monotonic()
        status = child.terminate(timeout=0.5)
        elapsed = time.monotonic() - started
    assert status == -signal.SIGKILL  # it ignored SIGTERM
    assert 0.4 < elapsed < 5
    assert _wait_gone(grandchild), f"grandchild {grandchild} survived the group kill"
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)  # already reaped


def test_sigterm_is_enough_for_a_well_behaved_child(tmp_path: pathlib.Path) -> None:
    child = spawn(["sleep", "300"], tmp_path / "sleep.log")
    try:
        assert child.exit_status() is None
    finally:
        status = child.terminate(timeout=5)
    assert status == -signal.SIGTERM
    assert child.exit_status() == -signal.SIGTERM
    assert not child.alive()


def test_exit_status_and_log_tail(tmp_path: pathlib.Path) -> None:
    with spawn(
        ["sh", "-c", "for i in 1 2 3 4 5; do echo line$i; done; echo oops >&2; exit 7"],
        tmp_path / "exit.log",
    ) as child:
        assert child.wait(5) == 7
        assert child.log_tail(2) == "line5\noops"
        assert "# sh -c" in child.log_text()  # the command line heads the log


def test_stopped_child_is_still_killed(tmp_path: pathlib.Path) -> None:
    with spawn(["sleep", "300"], tmp_path / "stopped.log") as child:
        child.signal(signal.SIGSTOP)
        assert child.terminate(timeout=2) in (-signal.SIGTERM, -signal.SIGKILL)
    assert _gone(child.pid)


def test_wait_for_socket_sees_a_unix_socket(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.sock"
    code = (
        "import socket, sys, time; s = socket.socket(socket.AF_UNIX); time.sleep(0.3);"
        f" s.bind({str(path)!r}); s.listen(1); print('listening', flush=True); time.sleep(300)"
    )
    with spawn([sys.executable, "-c", code], tmp_path / "sock.log") as child:
        assert child.wait_for_socket(path, timeout=10) == path
        child.wait_for_connectable(path, timeout=5)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))


def test_wait_for_socket_fails_fast_when_the_process_exits(tmp_path: pathlib.Path) -> None:
    with spawn(["sh", "-c", "echo cannot bind >&2; exit 3"], tmp_path / "early.log") as child:
        started = time.monotonic()
        with pytest.raises(
            PeerProcessError, match=r"(?s)exited before socket .* appeared.*\ncannot bind"
        ):
            child.wait_for_socket(tmp_path / "never.sock", timeout=30)
        assert time.monotonic() - started < 5


def test_wait_for_socket_deadline(tmp_path: pathlib.Path) -> None:
    with (
        spawn(["sleep", "300"], tmp_path / "slow.log") as child,
        pytest.raises(PeerProcessError, match=r"did not appear within 0\.3 s"),
    ):
        child.wait_for_socket(tmp_path / "never.sock", timeout=0.3)


def test_wait_for_text_deadline_shows_the_tail(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "serial.log"
    path.write_text("booting\nstill booting\n")
    with pytest.raises(PeerProcessError, match=r"(?s)0.2 s passed.*tail:\nbooting\nstill booting"):
        wait_for_text(path, r"^DONE", 0.2)
