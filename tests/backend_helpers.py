"""Shared helpers of the back-end tests: run the back-end program as a child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def running_backend(
    sock: Path, *args: str, log: Path | None = None, expect_exit: int | None = 0
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``python -m vhost_conformance.backend --socket-path SOCK ARGS``; wait until it
    listens; on exit SIGTERM it and check its exit status (when ``expect_exit`` is set)."""
    cmd: Sequence[str] = [
        sys.executable,
        "-m",
        "vhost_conformance.backend",
        "--socket-path",
        str(sock),
        *args,
    ]
    if log is not None:
        cmd = [*cmd, "--log", str(log), "-vv"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"back-end did not start (rc {proc.poll()}): {err}")
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            raise AssertionError("back-end did not exit within 10 s of SIGTERM") from None
        err = proc.stderr.read().decode() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        if expect_exit is not None and rc != expect_exit:
            raise AssertionError(f"back-end exited {rc}, expected {expect_exit}: {err[-2000:]}")


def open_fd_count(pid: int) -> int:
    """Number of open fds of process ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))
