"""The back-end's process tree as /proc shows it (a wrapper script runs the real back-end as
a child: the suite looks at every process of the tree)."""

from __future__ import annotations

import contextlib
import os


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


def process_tree_fds(pid: int) -> int | None:
    """Open fds of ``pid`` and all its descendants; None when /proc cannot tell."""
    total = 0
    for p in process_tree(pid):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            if p == pid:
                return None
    return total
