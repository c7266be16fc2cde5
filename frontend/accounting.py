"""Exactly-once accounting of virtio-blk requests across hops (source -> destination, before and
after a back-end restart or crash), and the suspended-state check.

A :class:`Ledger` records every request the driver made available (queue, head, tag, avail
index, kind, sector, data), every completion seen on each hop (status, used len, data read
back), used entries naming a head that was not in flight, and what the held in-flight region
said right after a back-end died (the "oracle"). :meth:`Ledger.findings` turns that into
verdicts, each naming tag, queue, head, what and where:

- ``lost``: submitted, never completed anywhere;
- ``double``: completed more than once (twice on one hop, or on two hops);
- ``completed-again``: a used entry for a head whose request had already completed (on the
  same or an earlier hop) and that was not in flight any more;
- ``unknown-head``: a used entry for a head never made available;
- ``data``: a read returned content the model disk does not allow, or the image holds such
  content (:meth:`Ledger.check_disk`);
- ``status``: a request completed with a status other than OK (SHOULD: the scenarios here
  give the back-end no reason to fail a request).

:class:`SuspendedState` is TEST-IDEAS "suspended state" (vhost-user.rst "Suspended device
state"; SPEC-DIGEST 4.3 and 6.1): once GET_VRING_BASE was answered for every ring, the back-end
writes no guest memory and signals nothing. Snapshot at the last reply, compare after the
back-end's I/O latency has passed. Nothing is excluded: the spec allows no guest write at all
while suspended (the in-flight region is not guest memory).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from vhost_conformance.frontend.barrier import compare_buffers
from vhost_conformance.frontend.blk import (
    SECTOR_SIZE,
    BlkCompletion,
    BlkRequest,
    BlkRequestType,
    BlkStatus,
    ModelDisk,
)
from vhost_conformance.frontend.inflight import InflightRegion
from vhost_conformance.frontend.memory import GuestMemory, MemorySnapshot
from vhost_conformance.frontend.virtqueue import RingViolation, Virtqueue

__all__ = [
    "AccountingFinding",
    "Completion",
    "Landmark",
    "Ledger",
    "Submitted",
    "Summary",
    "SuspendedState",
    "changed_ranges",
    "landmarks_of",
]

_KIND_NAMES = {int(t): t.name for t in BlkRequestType}
# RingViolation texts of virtqueue.reap for a used entry naming a head/id not in flight.
_NOT_IN_FLIGHT = re.compile(r"names a (?:head|buffer id) not in flight")
_SEEN_ID = re.compile(r"id (\d+)")


@dataclass(frozen=True, slots=True)
class Submitted:
    """One request as it was made available."""

    tag: int
    queue: int
    head: int
    avail_idx: int | None
    kind: str
    sector: int
    nsectors: int
    data: bytes
    hop: str

    def describe(self) -> str:
        """``tag 7 (OUT sector 8 x 8, queue 0 head 3, avail 12, submitted on source)``."""
        avail = "" if self.avail_idx is None else f", avail {self.avail_idx}"
        return (f"tag {self.tag} ({self.kind} sector {self.sector} x {self.nsectors}, queue "
                f"{self.queue} head {self.head}{avail}, submitted on {self.hop})")


@dataclass(frozen=True, slots=True)
class Completion:
    """One used entry the driver harvested."""

    tag: int | None  # None: the head was not in flight
    queue: int
    head: int
    hop: str
    status: int
    length: int
    data: bytes | None = None


@dataclass(frozen=True, slots=True)
class AccountingFinding:
    """A verdict about one request (or one guest-memory range): what went wrong and where."""

    kind: str
    what: str
    where: str = ""
    tag: int | None = None
    queue: int | None = None
    head: int | None = None
    level: str = "MUST"

    def __str__(self) -> str:
        who = []
        if self.tag is not None:
            who.append(f"tag {self.tag}")
        if self.queue is not None:
            who.append(f"queue {self.queue}")
        if self.head is not None:
            who.append(f"head {self.head}")
        prefix = f"[{self.level} {self.kind}] " + (", ".join(who) + ": " if who else "")
        return prefix + self.what + (f" ({self.where})" if self.where else "")


@dataclass(frozen=True, slots=True)
class Summary:
    """Counts over the whole ledger."""

    submitted: int
    completed_once: int
    lost: int
    double: int
    stray: int
    data: int
    hops: tuple[str, ...]
    completed_per_hop: dict[str, int]

    @property
    def exactly_once(self) -> bool:
        """Every request completed once and nothing else was used."""
        return self.completed_once == self.submitted and not (self.lost or self.double
                                                              or self.stray)

    def __str__(self) -> str:
        per_hop = ", ".join(f"{h}: {n}" for h, n in self.completed_per_hop.items())
        return (f"{self.submitted} submitted, {self.completed_once} completed exactly once, "
                f"{self.lost} lost, {self.double} double, {self.stray} stray used entries, "
                f"{self.data} data mismatches; completions per hop: {per_hop or 'none'}")


class Ledger:
    """Requests and completions across hops; see the module docstring."""

    def __init__(self, model: ModelDisk | None = None, *, hop: str = "source") -> None:
        self.model = model
        self.hop = hop
        self.hops: list[str] = [hop]
        self.submitted: dict[int, Submitted] = {}
        self.completions: dict[int, list[Completion]] = {}
        self.strays: list[tuple[Completion, str]] = []  # (used entry, where)
        self.mismatches: list[AccountingFinding] = []
        #: (queue, head) -> tags made available there, in order
        self._head_tags: dict[tuple[int, int], list[int]] = {}
        #: tag -> hops whose crash oracle marked it in flight / saw it outstanding unmarked
        self.oracle_marked: dict[int, list[str]] = {}
        self.oracle_unmarked: dict[int, list[str]] = {}
        self._violations_seen: dict[int, int] = {}  # id(vq) -> violations already absorbed

    # -- recording ------------------------------------------------------------------------------

    def enter(self, hop: str) -> None:
        """Everything recorded from now on happens on ``hop`` (e.g. ``destination``,
        ``restart-1``)."""
        self.hop = hop
        if hop not in self.hops:
            self.hops.append(hop)

    def submit(self, request: BlkRequest, avail_idx: int | None = None) -> Submitted:
        """Record a request the driver added (call before or after publishing it)."""
        if request.tag in self.submitted:
            raise ValueError(f"tag {request.tag} submitted twice to the ledger")
        entry = Submitted(request.tag, request.queue, request.head, avail_idx,
                          _KIND_NAMES.get(request.type, str(request.type)), request.sector,
                          request.nsectors, bytes(request.out_data), self.hop)
        self.submitted[request.tag] = entry
        self.completions.setdefault(request.tag, [])
        self._head_tags.setdefault((request.queue, request.head), []).append(request.tag)
        return entry

    def complete(self, completions: Iterable[BlkCompletion]) -> None:
        """Record what :meth:`BlkDriver.complete` returned on the current hop."""
        for c in completions:
            r = c.request
            if r.tag not in self.submitted:
                raise ValueError(f"completion of tag {r.tag}, which was never submitted to "
                                 "the ledger")
            self.completions[r.tag].append(
                Completion(r.tag, r.queue, r.head, self.hop, c.status, c.len, c.data))
            for m in c.mismatches:
                self.mismatches.append(AccountingFinding(
                    "data", f"read returned {m.seen_prefix.hex()}... at sector {m.sector}, the "
                    f"model allows {m.acceptable} content(s) starting {m.expected_prefix.hex()}...",
                    where=f"completed on {self.hop}", tag=r.tag, queue=r.queue, head=r.head))

    def stray(self, queue: int, head: int, length: int, where: str) -> None:
        """A used entry naming ``head``, which was not in flight when it was harvested."""
        self.strays.append((Completion(None, queue, head, self.hop, -1, length), where))

    def absorb_violations(self, vq: Virtqueue) -> list[RingViolation]:
        """Take the ring violations ``vq`` recorded since the last call: used entries naming a
        head not in flight become strays; the others are returned for the caller to report."""
        start = self._violations_seen.get(id(vq), 0)
        new = vq.violations[start:]
        self._violations_seen[id(vq)] = len(vq.violations)
        other = []
        for v in new:
            m = _SEEN_ID.search(v.seen)
            if _NOT_IN_FLIGHT.search(v.what) and m:
                self.stray(v.queue, int(m.group(1)), -1, v.what)
            else:
                other.append(v)
        return other

    def harvest(self, vq: Virtqueue, completions: Callable[[list[tuple[object, int]]],
                                                           list[BlkCompletion]]
                ) -> list[BlkCompletion]:
        """Reap ``vq`` once, turn the entries into completions with ``completions`` (usually
        ``BlkDriver.complete``), record both, and return the completions."""
        done = completions(vq.reap())
        self.complete(done)
        self.absorb_violations(vq)
        return done

    def note_oracle(self, region: InflightRegion, in_flight: Sequence[dict[int, object]]) -> None:
        """What a dead back-end's region said (read through the fd the front-end holds):
        ``in_flight[q]`` maps each driver head of queue ``q`` still outstanding to its request."""
        for qr in region.queues:
            marked = set(qr.inflight_heads()) if qr.version else set()
            for head, token in in_flight[qr.queue].items():
                if isinstance(token, BlkRequest):
                    target = self.oracle_marked if head in marked else self.oracle_unmarked
                    target.setdefault(token.tag, []).append(self.hop)

    # -- verdicts -------------------------------------------------------------------------------

    def outstanding(self) -> list[Submitted]:
        """Requests with no completion yet, in tag order."""
        return [s for t, s in sorted(self.submitted.items()) if not self.completions[t]]

    def _oracle_note(self, tag: int) -> str:
        notes = []
        if tag in self.oracle_marked:
            notes.append("marked in flight in the region after the crash on "
                         + ", ".join(self.oracle_marked[tag]))
        if tag in self.oracle_unmarked:
            notes.append("outstanding but not marked in the region after the crash on "
                         + ", ".join(self.oracle_unmarked[tag]))
        return "; ".join(notes)

    def findings(self, *, final: bool = True) -> list[AccountingFinding]:
        """Every violation of exactly-once so far; ``final`` also reports requests that never
        completed as lost (pass False while requests may legitimately still be in flight)."""
        out: list[AccountingFinding] = []
        for tag, sub in sorted(self.submitted.items()):
            seen = self.completions[tag]
            if not seen and final:
                out.append(AccountingFinding(
                    "lost", f"{sub.describe()} never completed on any hop",
                    where=self._oracle_note(tag) or f"hops {', '.join(self.hops)}",
                    tag=tag, queue=sub.queue, head=sub.head))
            elif len(seen) > 1:
                hops = [c.hop for c in seen]
                kind = "double"
                what = (f"{sub.describe()} completed {len(seen)} times, on "
                        + ", then ".join(hops))
                out.append(AccountingFinding(kind, what, where=self._oracle_note(tag),
                                             tag=tag, queue=sub.queue, head=sub.head))
            for c in seen:
                if c.status != BlkStatus.OK:
                    out.append(AccountingFinding(
                        "status", f"{sub.describe()} completed with status {c.status} "
                        f"({_status_name(c.status)})", where=f"on {c.hop}", tag=tag,
                        queue=sub.queue, head=sub.head, level="SHOULD"))
        for c, where in self.strays:
            tags = self._head_tags.get((c.queue, c.head), [])
            done = [t for t in tags if self.completions.get(t)]
            if done:
                last = done[-1]
                done_on = ", ".join(x.hop for x in self.completions[last])
                out.append(AccountingFinding(
                    "completed-again",
                    f"used entry for head {c.head} on {c.hop} after its request tag {last} had "
                    f"already completed (on {done_on}); nothing was in flight there",
                    where=where, tag=last, queue=c.queue, head=c.head))
            else:
                out.append(AccountingFinding(
                    "unknown-head", f"used entry for head {c.head} on {c.hop}, a head never "
                    "made available", where=where, queue=c.queue, head=c.head))
        out += self.mismatches
        return out

    def summary(self) -> Summary:
        """Counts (see :class:`Summary`)."""
        once = sum(1 for t in self.submitted if len(self.completions[t]) == 1)
        lost = sum(1 for t in self.submitted if not self.completions[t])
        double = sum(1 for t in self.submitted if len(self.completions[t]) > 1)
        per_hop: dict[str, int] = {h: 0 for h in self.hops}
        for seen in self.completions.values():
            for c in seen:
                per_hop[c.hop] = per_hop.get(c.hop, 0) + 1
        return Summary(len(self.submitted), once, lost, double, len(self.strays),
                       len(self.mismatches), tuple(self.hops), per_hop)

    def check_disk(self, read_at: Callable[[int, int], bytes]) -> list[AccountingFinding]:
        """Read back every sector a write of this ledger touched (``read_at(offset, length)``,
        e.g. from the image file) and compare with the model (a write that never completed may
        hold old or new content: :meth:`ModelDisk.pending_write`)."""
        if self.model is None:
            raise ValueError("check_disk needs a ledger built with a ModelDisk")
        out = []
        writers: dict[int, list[int]] = {}
        for tag, sub in self.submitted.items():
            if sub.kind in ("OUT", "WRITE_ZEROES") and sub.nsectors:
                for s in range(sub.sector, sub.sector + sub.nsectors):
                    writers.setdefault(s, []).append(tag)
        for start, n in _runs(sorted(writers)):
            data = read_at(start * SECTOR_SIZE, n * SECTOR_SIZE)
            for m in self.model.check(start, data):
                tags = writers.get(m.sector, [])
                out.append(AccountingFinding(
                    "data", f"sector {m.sector} on disk holds {m.seen_prefix.hex()}..., the model "
                    f"allows {m.acceptable} content(s) starting {m.expected_prefix.hex()}...",
                    where=f"written by tag(s) {tags}", tag=tags[-1] if tags else None))
        return out


def _status_name(status: int) -> str:
    try:
        return str(BlkStatus(status).name)
    except ValueError:
        return "not a virtio-blk status" if status != 0xFF else "never written (0xff)"


def _runs(sectors: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for s in sectors:
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((s, 1))
    return runs


# ----------------------------------------------------------------------------------------------
# Suspended state
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Landmark:
    """A named range of guest memory (a ring area or a request's buffer) for findings."""

    gpa: int
    length: int
    name: str
    tag: int | None = None
    queue: int | None = None
    head: int | None = None


def landmarks_of(memory: GuestMemory, queues: Iterable[tuple[Virtqueue, Iterable[BlkRequest]]]
                 ) -> list[Landmark]:
    """Ring areas of each virtqueue and the buffers of the given requests."""
    out: list[Landmark] = []
    for vq, requests in queues:
        addr = vq.vring_addr()
        size = vq.size
        if vq.packed:
            areas = ((addr.desc_user_addr, 16 * size, "descriptor ring"),
                     (addr.avail_user_addr, 4, "driver event suppression"),
                     (addr.used_user_addr, 4, "device event suppression"))
        else:
            areas = ((addr.desc_user_addr, 16 * size, "descriptor table"),
                     (addr.avail_user_addr, 6 + 2 * size, "avail ring"),
                     (addr.used_user_addr, 6 + 8 * size, "used ring"))
        for uaddr, length, name in areas:
            out.append(Landmark(memory.uaddr_to_gpa(uaddr), length, f"vq {vq.index} {name}",
                                queue=vq.index))
        for r in requests:
            out.append(Landmark(r.header_gpa, 16, "request header", r.tag, r.queue, r.head))
            if r.status_gpa is not None:
                out.append(Landmark(r.status_gpa, 1, "status byte", r.tag, r.queue, r.head))
            for gpa, n in r.data_bufs:
                out.append(Landmark(gpa, n, "data buffer", r.tag, r.queue, r.head))
    return out


def changed_ranges(before: MemorySnapshot, after: MemorySnapshot) -> list[tuple[int, int]]:
    """``(gpa, length)`` ranges that differ between two snapshots of the same layout."""
    now = dict(after.regions)
    out: list[tuple[int, int]] = []
    for gpa, old in before.regions:
        new = now.get(gpa)
        if new is None or len(new) != len(old):
            out.append((gpa, len(old)))
            continue
        out += [(gpa + off, n) for off, n in compare_buffers(old, new, gap=1)]
    return out


@dataclass
class SuspendedState:
    """Guest memory and call-fd state at the last GET_VRING_BASE reply (see module docstring)."""

    snapshot: MemorySnapshot
    landmarks: list[Landmark]
    call_fds: Sequence[int] = ()
    hop: str = "source"
    findings_: list[AccountingFinding] = field(default_factory=list)

    @classmethod
    def begin(cls, memory: GuestMemory, landmarks: list[Landmark], *,
              call_fds: Sequence[int] = (), hop: str = "source") -> SuspendedState:
        """Snapshot now (right after the last reply); drain the call eventfds so that only a
        signal sent after the reply counts."""
        for fd in call_fds:
            with contextlib.suppress(BlockingIOError, OSError):
                os.eventfd_read(fd)
        return cls(memory.snapshot(), landmarks, call_fds, hop)

    def compare(self, after: MemorySnapshot) -> list[AccountingFinding]:
        """Findings for every byte range changed since :meth:`begin` and every call eventfd
        signalled since (vhost-user.rst "Suspended device state": no guest-memory writes, no
        notifications)."""
        out: list[AccountingFinding] = []
        for gpa, n in changed_ranges(self.snapshot, after):
            names = [m for m in self.landmarks if m.gpa < gpa + n and gpa < m.gpa + m.length]
            where = "; ".join(
                f"{m.name}" + (f" of tag {m.tag}" if m.tag is not None else "")
                + f" [{m.gpa:#x}, {m.gpa + m.length:#x})" for m in names) or "no known structure"
            first = names[0] if names else None
            out.append(AccountingFinding(
                "suspended-write",
                f"guest memory [{gpa:#x}, {gpa + n:#x}) ({n} bytes) changed after the last "
                f"GET_VRING_BASE reply on {self.hop}", where=where,
                tag=first.tag if first else None, queue=first.queue if first else None,
                head=first.head if first else None))
        for i, fd in enumerate(self.call_fds):
            try:
                count = os.eventfd_read(fd)
            except (BlockingIOError, OSError):
                count = 0
            if count:
                out.append(AccountingFinding(
                    "suspended-notify", f"call eventfd of queue {i} signalled {count} time(s) "
                    f"after the last GET_VRING_BASE reply on {self.hop}", queue=i))
        self.findings_ = out
        return out
