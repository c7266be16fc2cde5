"""What a postcopy case needs to see of the back-end process: its memory mappings and whether
the kernel has them registered with a userfaultfd (``/proc/PID/smaps`` VmFlags ``um``:
missing-page tracking), over the whole process tree (a wrapper script runs the real back-end
as a child)."""

from __future__ import annotations

import contextlib
import os
import re

_VMA = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read().decode(errors="replace")
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[-1].split()
            if len(fields) >= 2 and fields[1].isdigit():
                children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        if p not in out:
            out.append(p)
            todo.extend(children.get(p, []))
    return out


def vma_flags(pids: list[int], start: int) -> str | None:
    """The VmFlags of the mapping that starts at ``start`` in one of ``pids``, None if none."""
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        inside = False
        for line in lines:
            match = _VMA.match(line)
            if match:
                inside = int(match.group(1), 16) == start
            elif inside and line.startswith("VmFlags:"):
                return line.split(":", 1)[1].strip()
    return None


def mappings_of(pids: list[int], name: str) -> list[tuple[int, str]]:
    """(start, VmFlags) of every mapping in ``pids`` of a file whose path contains ``name``
    (a memfd shows as ``/memfd:NAME (deleted)``)."""
    out: list[tuple[int, str]] = []
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        start: int | None = None
        for line in lines:
            match = _VMA.match(line)
            if match:
                start = int(match.group(1), 16) if name in line else None
            elif start is not None and line.startswith("VmFlags:"):
                out.append((start, line.split(":", 1)[1].strip()))
                start = None
    return out
