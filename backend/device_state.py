"""The reference back-end's own state for DEVICE_STATE (protocol bit 19; vhost-user.rst
"Migrating back-end state"): what a blk back-end has beyond the rings and guest memory, in a
format of our own (the spec leaves it to the back-end: "the data format is
implementation-defined").

``VCSTATE1`` then a JSON object: the acked virtio features and the config's writeback flag.
:func:`decode` refuses anything else, so a destination fed garbage reports it through
CHECK_DEVICE_STATE.
"""

from __future__ import annotations

import json
import os
import select
import time

MAGIC = b"VCSTATE1"
#: Largest state accepted on load (ours is well under 100 bytes).
MAX_STATE = 1 << 16


class StateError(Exception):
    """A loaded state could not be read or applied."""


def encode(features: int, wce: int) -> bytes:
    """The saved state."""
    return MAGIC + json.dumps({"features": features, "wce": wce}, sort_keys=True).encode()


def decode(data: bytes) -> tuple[int, int]:
    """(features, wce) of a saved state; StateError when it is not one."""
    if not data.startswith(MAGIC):
        raise StateError(f"no {MAGIC.decode()} header ({len(data)} bytes)")
    try:
        obj = json.loads(data[len(MAGIC):])
        features, wce = int(obj["features"]), int(obj["wce"])
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"unreadable state: {exc}") from None
    if wce not in (0, 1) or features < 0:
        raise StateError(f"state out of range: features {features:#x}, wce {wce}")
    return features, wce


def write_all(fd: int, data: bytes) -> None:
    """Write the whole state (small: fits the pipe) and close ``fd``: the end of the data."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def read_until_eof(fd: int, timeout: float) -> bytes:
    """Read until the writer closes (StateError past ``timeout`` or ``MAX_STATE``); closes
    ``fd``."""
    deadline = time.monotonic() + timeout
    out = bytearray()
    try:
        os.set_blocking(fd, False)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StateError(f"no end of file after {len(out)} bytes")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                return bytes(out)
            out += chunk
            if len(out) > MAX_STATE:
                raise StateError(f"more than {MAX_STATE} bytes")
    finally:
        os.close(fd)
