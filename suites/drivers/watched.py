"""Cases on the watched disk (suites/watched.py): the back-end runs on a journaled ``{disk}``
with requests held in flight, and the journal says what reached the disk and when."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

from vhost_conformance.frontend.blk import BlkRequest
from vhost_conformance.suites.drivers import (
    COMPLETES_AFTER_REPLY,
    SessionFactory,
    pending_io,
    slow_disk,
    stop_now,
    wait_popped,
)
from vhost_conformance.suites.model import CaseFailed, Unsupported
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


#: per-request latency of the held writes, and how many are held
LATENCY_MS = 150
HELD = 4


def late_writes(
    target: BackendTarget, make_session: SessionFactory, measurements: dict[str, float],
    *, bit20: bool, skip_drain: bool = False,
) -> None:
    """Hold :data:`HELD` WRITEs, stop, wait out the latency: no write of the source may reach
    the disk after the last GET_VRING_BASE reply (VU-DISK-1/-2). ``skip_drain``: the
    ``qemu-next`` front-end stopping with GET_VRING_BASE_SKIP_DRAIN (VU-SKIP-5)."""
    what = "GET_VRING_BASE_SKIP_DRAIN" if skip_drain else "GET_VRING_BASE"
    with journaled_hold(target, LATENCY_MS) as disk:
        options: dict[str, Any] = {"profile": "qemu-next"} if skip_drain else {}
        session = make_session(target, inflight_migration=bit20 or skip_drain, model=False,
                               **options)
        if skip_drain and not session.skip_drain_agreed:
            raise CaseFailed("bit 23 after the qemu-next negotiation", expected="agreed",
                             seen=f"protocol features {session.negotiated.protocol_features:#x}")
        held = []
        for i in range(HELD):
            # half a latency apart: the reply must wait for the last write, not the first
            held += pending_io(session, 1, kind="write", sector=8 * i)
            time.sleep(LATENCY_MS / 2000)
        wait_popped(session, 0, settle=0.05)
        stopped = stop_now(session, held, skip_drain=skip_drain)
        replied = time.monotonic()  # just after the reply: a write past this is late
        time.sleep(LATENCY_MS * HELD / 1000 + 0.3)
        journal = disk.journal()
        late = [e for e in writes_after(journal, replied) if any(overlaps(e, r) for r in held)]
        counts = [executions(journal, r, hashlib.sha256(r.out_data).hexdigest()) for r in held]
        measurements["stop_ms"] = round(stopped.elapsed * 1e3, 3)
        measurements["late_writes"] = float(len(late))
        measurements["held_executed_once"] = float(counts.count(1))
        measurements["held_executed_never"] = float(counts.count(0))
        measurements["held_executed_twice_or_more"] = float(sum(1 for c in counts if c > 1))
        if late:
            raise CaseFailed(
                f"{len(late)} held write(s) reached the disk after the {what} reply "
                f"(bit 20 {'negotiated' if bit20 or skip_drain else 'not negotiated'}, "
                f"{LATENCY_MS} ms disk)",
                expected="no write of the source after its reply",
                seen=describe(late, replied),
                # without bit 20 a write after the reply is the stop without drain (VU-GVB-3)
                behaviour=None if bit20 or skip_drain else COMPLETES_AFTER_REPLY)
