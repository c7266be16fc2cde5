"""Cases on the watched disk (suites/watched.py): the back-end runs on a journaled ``{disk}``
with requests held in flight, and the journal says what reached the disk and when."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from vhost_conformance.frontend.blk import BlkRequest
from vhost_conformance.suites.drivers import slow_disk
from vhost_conformance.suites.model import Unsupported
from vhost_conformance.suites.target import (
    BackendTarget,
    CommandTarget,
    SlowIoUnsupported,
    template_fields,
)
from vhost_conformance.suites.watched import JournalEntry, WatchedDisk

SECTOR = 512


@contextlib.contextmanager
def journaled_hold(target: BackendTarget, latency_ms: int) -> Iterator[WatchedDisk]:
    """The back-end on the watched disk with ``latency_ms`` per request inside the block.

    A profile knob that keeps the disk (the reference back-end's ``--latency``: a held request
    it can still cancel) holds the requests and the watched disk only journals (latency 0);
    otherwise (no knob, or a knob that swaps the disk for a null driver, qemu-storage-daemon's
    null-co) the watched disk holds them, in the filesystem, uncancellably."""
    if not isinstance(target, CommandTarget) or target.profile.command is None or \
            "disk" not in template_fields(target.profile.command):
        raise Unsupported("the watched disk", "the back-end's command uses no {disk}")
    slow = target.profile.slow_io
    knob_keeps_disk = target.profile.slow_io_route() == "knob" and (
        slow.command is None or "disk" in template_fields(slow.command))
    try:
        with target.watched_disk(0 if knob_keeps_disk else latency_ms, relaunch=False) as disk:
            if knob_keeps_disk:
                with slow_disk(target, latency_ms):
                    yield disk
            else:
                yield disk
    except SlowIoUnsupported as exc:
        raise Unsupported("the watched disk", str(exc)) from None


def overlaps(entry: JournalEntry, request: BlkRequest) -> bool:
    """Whether a journal write touches the sectors of ``request``."""
    start = request.sector * SECTOR
    end = start + request.nsectors * SECTOR
    return entry.offset < end and start < entry.offset + entry.length


def writes_after(journal: Sequence[JournalEntry], when: float) -> list[JournalEntry]:
    """The writes and discards that reached the disk after ``when`` (CLOCK_MONOTONIC s)."""
    return [e for e in journal if e.op in ("write", "discard") and e.t1 > when]


def executions(journal: Sequence[JournalEntry], request: BlkRequest, digest: str) -> int:
    """How often the data of WRITE ``request`` reached its sectors."""
    return sum(1 for e in journal
               if e.op == "write" and e.sha256 == digest and e.offset == request.sector * SECTOR)


def describe(entries: Sequence[JournalEntry], since: float) -> str:
    """A short human line for journal entries (times relative to ``since``)."""
    return "; ".join(f"{e.op} at byte {e.offset} ({e.length} B) by pid {e.pid}, "
                     f"{(e.t1 - since) * 1e3:+.0f} ms" for e in entries[:4])
