"""Which virtio device a back-end implements: the profile's ``device_type``, else the ``type``
its ``--print-capabilities`` prints (vhost-user.rst "Backend program conventions":
"Output to stdout the back-end capabilities in JSON format, and then exit successfully"),
else ``block``, the suite's historical assumption."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: The type taken when neither the profile nor the program names one.
DEFAULT_DEVICE_TYPE = "block"


@dataclass(frozen=True, slots=True)
class DeviceType:
    """A device type and where it came from (for reports and ``probe``)."""

    name: str
    source: str


def _run(argv: Sequence[str], cwd: Path, timeout: float) -> tuple[int | None, bytes, bytes]:
    """Run ``argv`` in its own session; on the deadline kill the whole group. Returns
    (exit status or None on timeout, stdout, stderr)."""
    try:
        proc = subprocess.Popen(
            list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True,
        )
    except OSError as exc:
        return 127, b"", str(exc).encode()
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=5.0)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5.0)
        return None, b"", b""


def from_print_capabilities(argv: Sequence[str], cwd: Path, timeout: float = 10.0) -> DeviceType:
    """The ``type`` of the program's ``--print-capabilities`` JSON, or
    :data:`DEFAULT_DEVICE_TYPE` with the reason it could not be read."""
    shown = " ".join(argv)
    status, out, _err = _run(argv, cwd, timeout)
    if status is None:
        return DeviceType(DEFAULT_DEVICE_TYPE, f"{shown} did not exit within {timeout:g} s")
    if status != 0:
        return DeviceType(DEFAULT_DEVICE_TYPE, f"{shown} exited with status {status}")
    with contextlib.suppress(ValueError):
        data = json.loads(out)
        if isinstance(data, dict) and isinstance(data.get("type"), str) and data["type"]:
            return DeviceType(str(data["type"]), f"{shown}: \"type\"")
    return DeviceType(DEFAULT_DEVICE_TYPE, f"{shown} printed no JSON with a \"type\" on stdout")
