"""Hostile guests: descriptor chains a malicious or broken driver writes into its own rings.

Family hostile-guest (VU-HOST-*) plus the property-based VU-FUZZ-2. Clauses: VIRTIO 1.3
"Split Virtqueues" / "Packed Virtqueues" (the driver MUST NOT build such chains, so the
device may refuse them however it likes) and vhost-user.rst "Memory region description".
TEST-IDEAS.md row 17 (CVE-2016-5403, DSA-5833-1).

What a case accepts after a hostile chain, each a distinct recorded outcome (:class:`Outcome`):
the request completes with an error status (``ioerr``/``unsupp``) or even OK where the chain
is merely odd, the queue stops ("device needs reset": error eventfd, config change, or the
queue simply no longer processes), the connection is closed, or the chain is ignored. What it
does not accept: the back-end dying (``crash``), the back-end no longer answering (``hang``),
a device-readable buffer written by the device, or a back-end that a new connection cannot
bring back to a working state.

One back-end process serves every example of a property-based case (a fresh connection per
example); it is restarted only after it died, and that example is a ``crash``. Examples per
run: ``$VHOST_CONFORMANCE_EXAMPLES`` (default :data:`DEFAULT_EXAMPLES`).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky
from vhost_conformance.frontend.blk import BlkStatus
from vhost_conformance.frontend.channel import BackendClosed, BackendHang
from vhost_conformance.frontend.memory import MemoryAccessError
from vhost_conformance.frontend.protocol import (
    BackendRequest,
    FrontendRequest,
    VirtioFeature,
)
from vhost_conformance.frontend.virtqueue import (
    PackedVirtqueue,
    SplitVirtqueue,
)
from vhost_conformance.suites.clauses import RST, VIRTIO
from vhost_conformance.suites.drivers.hostile import (
    DEFAULT_EXAMPLES,
    DYING_GRACE,
    EXAMPLES_ENV,
    INDIRECT,
    NEXT,
    SAME_QUEUE_WAIT,
    SCRATCH_GPA,
    SCRATCH_SIZE,
    SETTLE,
    SLOT,
    SLOTS,
    WRITE,
    BackendCrashed,
    Guest,
    Outcome,
    Rig,
    ShrinkBudget,
    backend_fds,
    died,
    examples_setting,
    run_seed,
    unreplayable,
)
from vhost_conformance.suites.drivers.procfs import process_tree_fds
from vhost_conformance.suites.model import (
    MUST,
    CaseFailed,
    CaseHang,
    CaseOutcome,
    Unsupported,
    case,
    case_of,
)
from vhost_conformance.suites.target import BackendTarget, Capabilities, CommandTarget

# --------------------------------------------------------------------------- hostile chains


@dataclass(frozen=True)
class Desc:
    """A descriptor as the hostile driver writes it, with symbolic address and next.

    ``addr``: a scratch slot name (``hdr``, ``data``, ``status``, ``table0``, ``table1``) plus
    ``offset``, or ``region_end`` (8 bytes before the scratch region ends), ``unmapped`` (a GPA
    where nothing is mapped), ``overflow`` (addr + len wraps past 2^64).
    ``next`` (split): ``"next"`` (the following descriptor of the chain/table), ``"self"``,
    ``"first"``, ``"oob"`` (an index beyond the table), or a position in the chain/table.
    Packed rings ignore ``next`` (chains are sequential).
    """

    addr: str
    length: int
    flags: int = 0
    offset: int = 0
    next: str | int = "next"


@dataclass(frozen=True)
class Shape:
    """A hostile submission: the chain, up to two indirect tables, the avail entry."""

    chain: tuple[Desc, ...]
    tables: tuple[tuple[Desc, ...], tuple[Desc, ...]] = ((), ())
    #: the avail entry (split) / buffer id (packed): "chain" or an explicit u16
    head: str | int = "chain"
    #: how far avail->idx moves for this submission (split; > queue size = a jump)
    avail_advance: int = 1
    #: the head is made available this many times in a row
    repeat: int = 1
    #: extra kicks after publishing (a kick storm)
    kicks: int = 1

    def protected_slots(self, guest: Guest) -> set[str]:
        """Scratch slots the device may never write: no byte of them lies in the range of any
        descriptor with WRITE set, wherever it sits (VIRTIO 1.3 2.7.4: the device does not
        write device-readable buffers; indirect tables are device-readable too)."""
        ranges = [
            (_addr(guest, d), _addr(guest, d) + (d.length & 0xFFFF_FFFF))
            for d in (*self.chain, *self.tables[0], *self.tables[1])
            if d.flags & WRITE
        ]
        protected = set()
        for name in SLOTS:
            lo = guest.slot(name)
            if not any(start < lo + SLOT and lo < end for start, end in ranges):
                protected.add(name)
        return protected


#: The read request header every shape points its ``hdr`` at (VIRTIO_BLK_T_IN, sector 0).
HEADER = struct.pack("<IIQ", 0, 0, 0)

_DESC = struct.Struct("<QIHH")  # split: addr, len, flags, next
_PACKED = struct.Struct("<QIHH")  # packed: addr, len, id, flags


def _addr(guest: Guest, d: Desc) -> int:
    if d.addr in SLOTS:
        return guest.slot(d.addr) + d.offset
    if d.addr == "region_end":
        return guest.scratch_end - 8
    if d.addr == "unmapped":
        return guest.scratch_end + (1 << 20)
    if d.addr == "overflow":
        return (1 << 64) - 8
    raise ValueError(f"unknown symbolic address {d.addr!r}")


def _next(spec: str | int, position: int, indices: Sequence[int], table_size: int) -> int:
    n = len(indices)
    if spec == "next":
        return indices[position + 1] if position + 1 < n else 0
    if spec == "self":
        return indices[position]
    if spec == "first":
        return indices[0]
    if spec == "oob":
        return min(table_size + position, 0xFFFF)
    assert isinstance(spec, int)
    return indices[spec % n]


def _prepare_scratch(guest: Guest, shape: Shape, packed: bool) -> None:
    mem = guest.memory
    mem.fill(SCRATCH_GPA, SCRATCH_SIZE, 0xA5)
    mem.write(guest.slot("hdr"), HEADER)
    for name, table in zip(("table0", "table1"), shape.tables, strict=True):
        base = guest.slot(name)
        # unused table entries: zero (addr 0 len 0 flags 0)
        mem.write(base, bytes(SLOT))
        positions = list(range(len(table)))
        for i, d in enumerate(table):
            addr = _addr(guest, d) & 0xFFFF_FFFF_FFFF_FFFF
            length = d.length & 0xFFFF_FFFF
            if packed:
                mem.write(base + 16 * i, _PACKED.pack(addr, length, 0, d.flags & 0xFFFF))
            else:
                nxt = _next(d.next, i, positions, len(table)) & 0xFFFF
                mem.write(base + 16 * i, _DESC.pack(addr, length, d.flags & 0xFFFF, nxt))


@dataclass
class Submitted:
    """What the driver did: the token to look for in the used ring."""

    token: object = field(default_factory=object)
    #: the scratch slots as the driver wrote them, before anything was made available
    scratch: dict[str, bytes] = field(default_factory=dict)


def submit_shape(guest: Guest, shape: Shape) -> Submitted:
    """Write ``shape`` into queue 0's ring and scratch memory, publish it and kick."""
    vq = guest.vq
    packed = isinstance(vq, PackedVirtqueue)
    _prepare_scratch(guest, shape, packed)
    sub = Submitted(scratch={name: guest.memory.read(guest.slot(name), SLOT) for name in SLOTS})
    n = len(shape.chain)
    if isinstance(vq, SplitVirtqueue):
        indices = vq.take_descriptors(n)
        for i, d in enumerate(shape.chain):
            nxt = _next(d.next, i, indices, vq.size)
            vq.write_desc(
                indices[i],
                _addr(guest, d) & 0xFFFF_FFFF_FFFF_FFFF,
                d.length & 0xFFFF_FFFF,
                d.flags & 0xFFFF,
                nxt & 0xFFFF,
            )
        head = indices[0] if shape.head == "chain" else int(shape.head) & 0xFFFF
        for r in range(shape.repeat):
            vq.push_avail(head, sub.token if r == 0 else None, chain=indices if r == 0 else ())
        if shape.avail_advance != 1:
            vq.set_avail_idx(vq.last_avail_idx + shape.avail_advance - shape.repeat)
        else:
            vq.publish()
    else:
        pos, wrap = vq.next_avail_idx, vq.avail_wrap_counter
        buffer_id = (n - 1) if shape.head == "chain" else int(shape.head) & 0xFFFF
        slots = []
        for i in range(n):
            slots.append(((pos + i) % vq.size, wrap ^ (1 if pos + i >= vq.size else 0)))
        # the head's flags last (VIRTIO 1.3 2.8.21)
        for i in reversed(range(n)):
            d = shape.chain[i]
            ring_index, w = slots[i]
            bits = (1 << 7) if w else (1 << 15)
            vq.write_desc(
                ring_index,
                _addr(guest, d) & 0xFFFF_FFFF_FFFF_FFFF,
                d.length & 0xFFFF_FFFF,
                (d.flags & 0x7) | bits,
                buffer_id,
            )
        vq.push_avail(buffer_id, sub.token, slots=n)
    for _ in range(shape.kicks):
        guest.session.kick(0)
    return sub


@dataclass
class Reaction:
    """What the back-end did within the settle time."""

    used: bool = False
    used_len: int = 0
    err: bool = False
    config_change: bool = False
    closed: bool = False


def _socket_closed(sock: socket.socket) -> bool:
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return data == b""


def watch(guest: Guest, sub: Submitted, settle: float) -> Reaction:
    """Wait up to ``settle`` s for the hostile chain to be used, the error eventfd to fire, a
    config change on the back-end channel, or the connection to close."""
    session = guest.session
    q = session.queues[0]
    reaction = Reaction()
    poller = select.poll()
    poller.register(q.call_fd, select.POLLIN)
    poller.register(q.err_fd, select.POLLIN)
    poller.register(session.channel.sock.fileno(), select.POLLIN | select.POLLHUP)
    deadline = time.monotonic() + settle
    while True:
        for token, length in q.vq.reap():
            if token is sub.token:
                reaction.used, reaction.used_len = True, length
        with contextlib.suppress(BlockingIOError):
            if os.eventfd_read(q.err_fd):
                reaction.err = True
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(q.call_fd)
        channel = session.backend_channel
        if channel is not None and any(
            m.request == BackendRequest.CONFIG_CHANGE_MSG for m in channel.messages()
        ):
            reaction.config_change = True
        if _socket_closed(session.channel.sock):
            reaction.closed = True
        left = deadline - time.monotonic()
        if reaction.used or reaction.err or reaction.closed or reaction.config_change or left <= 0:
            return reaction
        poller.poll(min(left, 0.02) * 1000)


def _status_outcome(guest: Guest, shape: Shape) -> Outcome:
    """Outcome of a used hostile chain: the status byte where virtio-blk puts it (the last
    byte of the last device-writable buffer) when the shape has a plain one."""
    last = [d for d in shape.chain if d.flags & WRITE and not d.flags & INDIRECT]
    if not last or last[-1].addr != "status" or last[-1].length < 1:
        return Outcome.COMPLETED
    d = last[-1]
    try:
        status = guest.memory.read(guest.slot("status") + d.offset + d.length - 1, 1)[0]
    except MemoryAccessError:
        return Outcome.COMPLETED  # the buffer's last byte is past guest RAM: no status there
    by_status: dict[int, Outcome] = {
        int(BlkStatus.OK): Outcome.OK,
        int(BlkStatus.IOERR): Outcome.IOERR,
        int(BlkStatus.UNSUPP): Outcome.UNSUPP,
    }
    return by_status.get(status, Outcome.COMPLETED)


def run_shape(rig: Rig, shape: Shape, *, packed: bool) -> Outcome:
    """One example: a fresh guest, the hostile submission, the back-end's reaction judged.

    Raises CaseFailed (device wrote a device-readable buffer), CaseHang (the back-end stopped
    answering), BackendCrashed (it died)."""
    try:
        with rig.guest(packed=packed) as guest:
            rig.hostile += 1
            sub = submit_shape(guest, shape)
            before = sub.scratch
            reaction = watch(guest, sub, SETTLE)
            outcome = _classify(rig, guest, shape, sub, reaction)
            for slot in shape.protected_slots(guest):
                after = guest.memory.read(guest.slot(slot), SLOT)
                if after != before[slot]:
                    changed = [i for i in range(SLOT) if after[i] != before[slot][i]]
                    first = changed[0]
                    raise CaseFailed(
                        f"the device wrote the device-readable buffer '{slot}' of a hostile "
                        "chain (VIRTIO 1.3 2.7.4)",
                        expected="unchanged",
                        seen=f"{len(changed)} byte(s) changed, the first at offset {first}: "
                        f"{before[slot][first]:#04x} -> {after[first]:#04x}",
                        # VIRTIO 1.3 2.7.5.1 "A device MUST NOT write to a device-readable
                        # buffer": a conformance MUST even on hostile input (gates)
                        finding_level=MUST,
                    )
    except (BackendClosed, OSError) as exc:
        rig.check_alive(grace=DYING_GRACE)
        raise CaseFailed(f"the back-end failed the example: {type(exc).__name__}: {exc}") from None
    except BackendHang as exc:
        rig.check_alive(grace=DYING_GRACE)
        if rig.restart:
            rig.target.restart()
        raise CaseHang(f"the back-end stopped answering after a hostile chain: {exc}") from None
    rig.check_alive()
    rig.record(outcome)
    return outcome


def _classify(rig: Rig, guest: Guest, shape: Shape, sub: Submitted, reaction: Reaction) -> Outcome:
    if reaction.closed:
        return Outcome.CLOSED
    if reaction.used:
        outcome = _status_outcome(guest, shape)
    elif reaction.err or reaction.config_change:
        outcome = Outcome.NEEDS_RESET
    else:
        # nothing visible: does the queue still serve a well-formed request?
        try:
            guest.good_io(SAME_QUEUE_WAIT)
            outcome = Outcome.IGNORED
        except (BackendHang, CaseFailed):
            outcome = Outcome.NEEDS_RESET
        except BackendClosed:
            return Outcome.CLOSED
    # the control plane still answers (or the connection was closed: that is allowed)
    try:
        guest.session.channel.call(FrontendRequest.GET_FEATURES, timeout=rig.timeout)
    except BackendClosed:
        return Outcome.CLOSED
    return outcome


# --------------------------------------------------------------------------- named shapes


def _request(*middle: Desc, status: Desc | None = None) -> tuple[Desc, ...]:
    """header (readable 16) + ``middle`` + status (writable 1), chained with NEXT."""
    descs = [Desc("hdr", 16), *middle, status or Desc("status", 1, WRITE)]
    return tuple(
        Desc(d.addr, d.length, d.flags | (NEXT if i + 1 < len(descs) else 0), d.offset, d.next)
        for i, d in enumerate(descs)
    )


def _table(*descs: Desc, chained: bool = True) -> tuple[Desc, ...]:
    return tuple(
        Desc(
            d.addr,
            d.length,
            d.flags | (NEXT if chained and i + 1 < len(descs) else 0),
            d.offset,
            d.next,
        )
        for i, d in enumerate(descs)
    )


def _good_table() -> tuple[Desc, ...]:
    return _table(Desc("hdr", 16), Desc("data", 512, WRITE), Desc("status", 1, WRITE))


#: Split-ring shapes by case; each id maps to (shape name, shape) pairs run in order.
SPLIT_SHAPES: dict[str, list[tuple[str, Shape]]] = {
    "VU-HOST-1": [
        (
            "two descriptors pointing at each other",
            Shape((Desc("hdr", 16, NEXT, next=1), Desc("data", 512, WRITE | NEXT, next="first"))),
        ),
        ("a descriptor pointing at itself", Shape((Desc("hdr", 16, NEXT, next="self"),))),
    ],
    "VU-HOST-2": [
        (
            "an indirect table of 2x the queue size, fully chained",
            Shape(
                (Desc("table0", 16 * 256, INDIRECT),),
                (_table(*[Desc("hdr", 16)] * 255, Desc("status", 1, WRITE)), ()),
            ),
        ),
    ],
    "VU-HOST-3": [
        (
            "an INDIRECT descriptor inside an indirect table",
            Shape(
                (Desc("table0", 32, INDIRECT),),
                (_table(Desc("hdr", 16), Desc("table1", 48, INDIRECT)), _good_table()),
            ),
        ),
    ],
    "VU-HOST-4": [
        ("next beyond the descriptor table", Shape((Desc("hdr", 16, NEXT, next="oob"),))),
        (
            "next beyond an indirect table",
            Shape(
                (Desc("table0", 32, INDIRECT),),
                (_table(Desc("hdr", 16, next="oob"), Desc("status", 1, WRITE)), ()),
            ),
        ),
    ],
    "VU-HOST-5": [
        (
            "a data buffer crossing the region's end",
            Shape(_request(Desc("region_end", 512, WRITE))),
        ),
        ("a data buffer at an unmapped GPA", Shape(_request(Desc("unmapped", 512, WRITE)))),
        (
            "a header at an unmapped GPA",
            Shape((Desc("unmapped", 16, NEXT), Desc("status", 1, WRITE))),
        ),
        (
            "a buffer whose addr + len wraps past 2^64",
            Shape(_request(Desc("overflow", 4096, WRITE))),
        ),
        ("an indirect table at an unmapped GPA", Shape((Desc("unmapped", 48, INDIRECT),))),
        (
            "a status byte at an unmapped GPA",
            Shape(_request(Desc("data", 512, WRITE), status=Desc("unmapped", 1, WRITE))),
        ),
    ],
    "VU-HOST-6": [
        (
            "avail->idx jumping by queue size + 1",
            Shape(_request(Desc("data", 512, WRITE)), avail_advance=129),
        ),
        (
            "avail->idx jumping by 0x8000",
            Shape(_request(Desc("data", 512, WRITE)), avail_advance=0x8000),
        ),
    ],
    "VU-HOST-7": [
        (
            "a device-writable header",
            Shape(
                (
                    Desc("hdr", 16, WRITE | NEXT),
                    Desc("data", 512, WRITE | NEXT),
                    Desc("status", 1, WRITE),
                )
            ),
        ),
        (
            "a device-readable status byte",
            Shape((Desc("hdr", 16, NEXT), Desc("data", 512, WRITE | NEXT), Desc("status", 1))),
        ),
        (
            "a device-readable buffer after a device-writable one",
            Shape(
                (
                    Desc("hdr", 16, NEXT),
                    Desc("data", 512, WRITE | NEXT),
                    Desc("data", 16, NEXT, offset=1024),
                    Desc("status", 1, WRITE),
                )
            ),
        ),
    ],
    "VU-HOST-8": [
        ("avail entry naming head = queue size", Shape(_request(), head=128)),
        ("avail entry naming head 0xffff", Shape(_request(), head=0xFFFF)),
    ],
    "VU-HOST-9": [
        (
            "one head made available 4 times without waiting, 1000 kicks",
            Shape(_request(Desc("data", 512, WRITE)), repeat=4, kicks=1000),
        ),
    ],
    "VU-HOST-10": [
        ("indirect table length 0", Shape((Desc("table0", 0, INDIRECT),), (_good_table(), ()))),
        (
            "indirect table length 40 (not a multiple of 16)",
            Shape((Desc("table0", 40, INDIRECT),), (_good_table(), ())),
        ),
        (
            "INDIRECT together with NEXT",
            Shape(
                (Desc("table0", 48, INDIRECT | NEXT, next=1), Desc("status", 1, WRITE)),
                (_good_table(), ()),
            ),
        ),
    ],
    "VU-HOST-11": [
        ("a zero-length data buffer", Shape(_request(Desc("data", 0, WRITE)))),
        ("a zero-length header", Shape((Desc("hdr", 0, NEXT), Desc("status", 1, WRITE)))),
        (
            "a zero-length status buffer",
            Shape(_request(Desc("data", 512, WRITE), status=Desc("status", 0, WRITE))),
        ),
    ],
}

#: Packed-ring shapes (packed chains are sequential: no loops, no next out of range).
PACKED_SHAPES: dict[str, list[tuple[str, Shape]]] = {
    "VU-HOST-2": [
        (
            "a chain of queue size + 1 descriptors (wrapping onto itself)",
            Shape(tuple(Desc("hdr", 16, NEXT) for _ in range(129))),
        ),
    ],
    "VU-HOST-3": SPLIT_SHAPES["VU-HOST-3"][:1],
    "VU-HOST-5": SPLIT_SHAPES["VU-HOST-5"],
    "VU-HOST-7": SPLIT_SHAPES["VU-HOST-7"],
    "VU-HOST-8": [
        ("buffer id = queue size", Shape(_request(), head=128)),
        ("buffer id 0xffff", Shape(_request(), head=0xFFFF)),
    ],
    "VU-HOST-10": SPLIT_SHAPES["VU-HOST-10"][:2],
    "VU-HOST-11": SPLIT_SHAPES["VU-HOST-11"],
}


def _layout(layout: str, capabilities: Capabilities) -> bool:
    if layout == "packed":
        if not capabilities.offers(VirtioFeature.RING_PACKED):
            raise Unsupported(VirtioFeature.RING_PACKED)
        return True
    return False


def run_named(
    case_id: str,
    layout: str,
    target: BackendTarget,
    capabilities: Capabilities,
    timeout: float,
    measurements: dict[str, float],
) -> None:
    """Run every shape of ``case_id`` for ``layout``; record each outcome; then a new
    connection must work."""
    packed = _layout(layout, capabilities)
    shapes = (PACKED_SHAPES if packed else SPLIT_SHAPES).get(case_id)
    if not shapes:
        raise Unsupported(
            f"a {layout} ring shape for {case_id}",
            "packed chains are sequential: no loops or next indices",
        )
    if not packed and not capabilities.offers(VirtioFeature.RING_INDIRECT_DESC):
        # an INDIRECT flag the back-end never offered: VIRTIO 1.3 2.7.5.3.1 "The driver MUST
        # NOT set the VIRTQ_DESC_F_INDIRECT flag unless the VIRTIO_F_INDIRECT_DESC feature was
        # negotiated". Still hostile input a guest can write (a back-end dying on it lets a
        # guest kill it), but its own shape: run last and named so, the killer is not
        # mistaken for the GPA the shape was about
        plain = [(n, sh) for n, sh in shapes if not _uses_indirect(sh)]
        flagged = [
            (f"{n} {UNNEGOTIATED_INDIRECT}", sh)
            for n, sh in shapes
            if _uses_indirect(sh)
        ]
        shapes = plain + flagged
    rig = Rig(target, capabilities, timeout, restart=False)
    seen: list[str] = []
    previous: str | None = None
    for name, shape in shapes:
        submitted = rig.hostile
        try:
            outcome = run_shape(rig, shape, packed=packed)
        except CaseOutcome as exc:
            raise _named(exc, layout, name, previous, rig.hostile == submitted) from None
        seen.append(f"{name}: {outcome.value}")
        if not packed and case_id in REFUSE_ONLY and outcome not in REFUSALS:
            raise CaseFailed(
                f"{layout} ring, {name}: {REFUSE_ONLY[case_id]}",
                expected="refused: nothing used (ignored, the queue needing a reset, or the "
                "connection closed)",
                seen=f"outcome {outcome.value}",
            )
        measurements[f"outcome.{outcome.value}"] = (
            measurements.get(f"outcome.{outcome.value}", 0) + 1
        )
        previous = name
    try:
        rig.final_check()
    except CaseOutcome as exc:
        raise _named(exc, layout, None, previous, True) from None
    print(f"{case_id} {layout}: " + "; ".join(seen))


#: Cases whose split shapes have no servable reading: any used entry means the back-end
#: served a descriptor the avail entry did not name (a head beyond the table: VIRTIO 1.3 2.7.5
#: "The number of descriptors in the table is defined by the queue size"). Packed ids are the
#: driver's tags, copied back, so a packed id beyond the queue may be completed.
REFUSE_ONLY = {
    "VU-HOST-8": "an avail entry naming a head beyond the descriptor table was served (a "
    "descriptor that does not exist, or another head's chain, e.g. the head taken modulo the "
    "queue size)",
}
REFUSALS = frozenset({Outcome.IGNORED, Outcome.NEEDS_RESET, Outcome.CLOSED})


#: How run_named names a shape that sets INDIRECT although the back-end did not offer it.
UNNEGOTIATED_INDIRECT = "(its INDIRECT flag not negotiated: RING_INDIRECT_DESC is not offered)"


def _death_behaviour(shape_name: str) -> str | None:
    """One behaviour for every death on an INDIRECT flag never negotiated (counted once)."""
    return "dies-on-unnegotiated-indirect" if UNNEGOTIATED_INDIRECT in shape_name else None


def _uses_indirect(shape: Shape) -> bool:
    """The shape sets VIRTQ_DESC_F_INDIRECT somewhere (chain or tables)."""
    return any(d.flags & INDIRECT for d in (*shape.chain, *shape.tables[0], *shape.tables[1]))


def _named(
    exc: CaseOutcome, layout: str, name: str | None, previous: str | None, before_own: bool
) -> CaseOutcome:
    """*exc* re-raised naming the shape it belongs to: a death found while connecting for a
    shape (before its own chain was submitted) is the previous shape's doing."""
    if isinstance(exc, BackendCrashed) and before_own and previous is not None:
        after = (
            f" (found dead when connecting for the next shape, {name})"
            if name
            else " (found dead at the final check)"
        )
        return type(exc)(
            f"{layout} ring, {previous}{after}: {exc.reason}", behaviour=_death_behaviour(previous)
        )
    if isinstance(exc, BackendCrashed) and name is not None:
        return type(exc)(f"{layout} ring, {name}: {exc.reason}", behaviour=_death_behaviour(name))
    if exc.behaviour is not None:
        return type(exc)(
            f"{layout} ring, {name}: {exc.reason}",
            behaviour=exc.behaviour,
            finding_level=exc.finding_level,
        )
    return type(exc)(f"{layout} ring, {name}: {exc.reason}", finding_level=exc.finding_level)


@pytest.fixture
def hostile_shapes(
    request: pytest.FixtureRequest,
    vhost_target: BackendTarget,
    vhost_capabilities: Capabilities,
    vhost_timeout: float,
    vhost_measurements: dict[str, float],
) -> Callable[[str], None]:
    """``run(layout)`` runs every named shape of this case (its id from the case marker) on
    that ring layout: one driver for all the named hostile-guest cases."""
    meta = case_of(request.function)
    assert meta is not None, "hostile_shapes is for @case functions"

    def run(layout: str) -> None:
        run_named(
            meta.id, layout, vhost_target, vhost_capabilities, vhost_timeout, vhost_measurements
        )

    return run


LAYOUTS = pytest.mark.parametrize("layout", ["split", "packed"])
#: Shapes that exist only for split rings (packed chains are sequential: no next index to
#: loop or overflow, no avail index to jump).
SPLIT_ONLY = pytest.mark.parametrize("layout", ["split"])


def named_case(
    case_id: str, name: str, title: str, clause: str, requirement: str, **record: Any
) -> Callable[[str, Callable[[str], None]], None]:
    """A MUST case of this family that is nothing but its named shapes: its test function
    (called ``name``, documented by the requirement) runs them on each layout that has some
    (packed too when ``case_id`` is in PACKED_SHAPES)."""

    def run_shapes(layout: str, hostile_shapes: Callable[[str], None]) -> None:
        hostile_shapes(layout)

    run_shapes.__name__ = run_shapes.__qualname__ = name
    run_shapes.__doc__ = requirement
    layouts = LAYOUTS if case_id in PACKED_SHAPES else SPLIT_ONLY
    meta = case(case_id, title=title, family="hostile-guest", level=MUST, clause=clause,
                requirement=requirement, **record)
    return meta(layouts(run_shapes))


test_descriptor_loop = named_case(
    "VU-HOST-1", "test_descriptor_loop",
    "Descriptor loop", f"{VIRTIO} Split Virtqueues: The Virtqueue Descriptor Table",
    "A descriptor chain that loops is refused (error status, device broken or ignored), with no "
    "crash or hang.",
)


@case(
    "VU-HOST-2", title="Chain longer than the queue", family="hostile-guest", level=MUST,
    clause=f"{VIRTIO} Split Virtqueues",
    requirement="A chain of more descriptors than the queue size (split: through an indirect "
        "table; packed: wrapping the ring) gets an error, a stopped queue, a closed connection or "
        "is served, never a crash or hang.",
    ambiguity="VIRTIO 1.3 forbids the driver such chains but does not say what the device does; "
        "QEMU's own virtqueue serves an indirect table of any length, so serving it passes",
)
@LAYOUTS
def test_chain_longer_than_queue(
    layout: str, vhost_capabilities: Capabilities, hostile_shapes: Callable[[str], None]
) -> None:
    """A chain of more descriptors than the queue holds is refused without crash or hang."""
    if layout == "split" and not vhost_capabilities.offers(VirtioFeature.RING_INDIRECT_DESC):
        raise Unsupported(
            VirtioFeature.RING_INDIRECT_DESC,
            "a split chain longer than the queue needs an indirect table",
        )
    hostile_shapes(layout)


test_indirect_inside_indirect = named_case(
    "VU-HOST-3", "test_indirect_inside_indirect",
    "Indirect inside indirect", f"{VIRTIO} Split Virtqueues: Indirect Descriptors",
    "An indirect table holding an INDIRECT descriptor is refused without a crash.",
    requires=[VirtioFeature.RING_INDIRECT_DESC],
)


test_next_out_of_range = named_case(
    "VU-HOST-4", "test_next_out_of_range", "next out of range", f"{VIRTIO} Split Virtqueues",
    "A descriptor whose next index is beyond the table is refused without a crash.",
)


test_buffers_outside_guest_memory = named_case(
    "VU-HOST-5", "test_buffers_outside_guest_memory",
    "Buffers outside guest memory", f"{RST} Memory region description",
    "A buffer that crosses a region's end or lies at an unmapped GPA is refused; no host memory "
    "is read or written.",
)


test_avail_idx_jump = named_case(
    "VU-HOST-6", "test_avail_idx_jump",
    "avail->idx jumps past the queue size",
    f"{VIRTIO} Split Virtqueues: The Virtqueue Available Ring",
    "An avail->idx more than queue size ahead of the last one is refused without a crash or hang.",
)


test_wrong_buffer_directions = named_case(
    "VU-HOST-7", "test_wrong_buffer_directions",
    "Wrong buffer directions", f"{VIRTIO} Block Device: Device Operation",
    "A device-writable header or a device-readable status byte gets an error or is ignored; "
    "nothing is written to the read-only buffer.",
)


test_head_beyond_queue = named_case(
    "VU-HOST-8", "test_head_beyond_queue",
    "Head index beyond the queue", f"{VIRTIO} Split Virtqueues: The Virtqueue Available Ring",
    "An avail entry naming a head at or beyond the queue size is refused without a crash: on a "
    "split ring nothing is used for it (no used entry; ignoring it, needing a reset or closing "
    "are refusals); a packed buffer id beyond the queue is a tag and may be completed.",
    ambiguity="VIRTIO 1.3 has no device sentence for an out-of-range head (the driver's side is "
        "2.7.5: the table holds queue size descriptors); serving one means reading a descriptor "
        "that does not exist or another head's chain, which is judged here as a wrong answer "
        "(robustness: reported, gates with --strict)",
)


test_flood_of_submissions = named_case(
    "VU-HOST-9", "test_flood_of_submissions", "Flood of submissions", f"{VIRTIO} Split Virtqueues",
    "Making available and kicking far more requests than the queue holds, without waiting, leaves "
    "the back-end alive and correct.",
)


test_bad_indirect_length = named_case(
    "VU-HOST-10", "test_bad_indirect_length",
    "Bad indirect table length", f"{VIRTIO} Split Virtqueues: Indirect Descriptors",
    "An indirect descriptor whose len is 0 or not a multiple of 16, or that also has NEXT, is "
    "refused without a crash or hang.",
    requires=[VirtioFeature.RING_INDIRECT_DESC],
)


test_zero_length_buffers = named_case(
    "VU-HOST-11", "test_zero_length_buffers",
    "Zero-length buffers", f"{VIRTIO} Block Device: Device Operation",
    "A zero-length header, data or status buffer gets an error status, a completion, a stopped "
    "queue or a closed connection, never a crash or hang.",
)


# --------------------------------------------------------------------------- property-based

_ADDRS = st.sampled_from(
    ["hdr", "data", "status", "table0", "table1", "region_end", "unmapped", "overflow"]
)
_LENGTHS = st.sampled_from([0, 1, 15, 16, 17, 48, 512, 4096, 0x10000, 0xFFFF_FFFF])
_FLAGS = st.sampled_from(
    [
        0,
        NEXT,
        WRITE,
        NEXT | WRITE,
        INDIRECT,
        INDIRECT | NEXT,
        INDIRECT | WRITE,
        NEXT | WRITE | INDIRECT,
    ]
)
_NEXTS = st.one_of(st.sampled_from(["next", "next", "self", "first", "oob"]), st.integers(0, 7))


@st.composite
def descs(draw: st.DrawFn) -> Desc:
    """One hostile descriptor."""
    return Desc(
        draw(_ADDRS),
        draw(_LENGTHS),
        draw(_FLAGS),
        draw(st.sampled_from([0, 8, 4090])),
        draw(_NEXTS),
    )


def _mutate(draw: st.DrawFn, d: Desc) -> Desc:
    field_name = draw(st.sampled_from(["addr", "length", "flags", "offset", "next"]))
    if field_name == "addr":
        return Desc(draw(_ADDRS), d.length, d.flags, d.offset, d.next)
    if field_name == "length":
        return Desc(d.addr, draw(_LENGTHS), d.flags, d.offset, d.next)
    if field_name == "flags":
        return Desc(d.addr, d.length, draw(_FLAGS), d.offset, d.next)
    if field_name == "offset":
        return Desc(d.addr, d.length, d.flags, draw(st.sampled_from([8, 4090])), d.next)
    return Desc(d.addr, d.length, d.flags, d.offset, draw(_NEXTS))


@st.composite
def shapes(draw: st.DrawFn, packed: bool) -> Shape:
    """A hostile submission: either a well-formed read (direct or through an indirect table)
    with one to three fields mutated, or a 1-6 descriptor chain of random descriptors with
    random tables; sometimes an odd head or an avail jump (split)."""
    if draw(st.booleans()):
        chain = list(
            draw(
                st.sampled_from(
                    [
                        _request(Desc("data", 512, WRITE)),
                        (Desc("table0", 48, INDIRECT),),
                    ]
                )
            )
        )
        table0 = list(_good_table())
        for _ in range(draw(st.integers(1, 3))):
            where = draw(st.sampled_from(["chain", "table"]))
            items = chain if where == "chain" else table0
            i = draw(st.integers(0, len(items) - 1))
            items[i] = _mutate(draw, items[i])
        tables: tuple[tuple[Desc, ...], tuple[Desc, ...]] = (tuple(table0), _good_table())
        chain_t = tuple(chain)
    else:
        chain_t = tuple(draw(st.lists(descs(), min_size=1, max_size=6)))
        tables = (
            tuple(draw(st.lists(descs(), max_size=5))),
            tuple(draw(st.lists(descs(), max_size=3))),
        )
    chain = list(chain_t)
    head: str | int = draw(st.sampled_from(["chain"] * 6 + [128, 0xFFFF]))
    advance = 1 if packed else draw(st.sampled_from([1] * 8 + [129, 0x8000]))
    return Shape(tuple(chain), tables, head, advance)


def fuzz_descriptor_chains(rig: Rig, examples: int, layouts: Sequence[str]) -> int:
    """Run ``examples`` hypothesis examples of hostile chains against ``rig``; returns how many
    ran. Failures propagate (the minimal example is printed by hypothesis)."""
    budget = ShrinkBudget()
    ran = 0
    first: tuple[Exception, str] | None = None

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        print_blob=True,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )
    @given(data=st.data())
    def example(data: st.DataObject) -> None:
        nonlocal ran, first
        if budget.exhausted():
            return
        layout = data.draw(st.sampled_from(list(layouts)), label="layout")
        shape = data.draw(shapes(layout == "packed"), label="shape")
        ran += 1
        try:
            run_shape(rig, shape, packed=layout == "packed")
        except Exception as exc:
            budget.failed()
            if first is None:
                first = (exc, f"layout={layout!r}, shape={shape!r}")
            raise
        except BaseException:
            budget.failed()
            raise

    try:
        example()
    except Flaky as flaky:
        # the failure depended on the back-end's history (a restart resets it): report the
        # first failing example as it ran
        raise unreplayable(
            flaky, first, "first failing example (hypothesis could not replay it, the "
            "back-end's state carried over from earlier examples): "
        ) from None
    return ran


@case(
    "VU-FUZZ-2", title="Fuzzed descriptor chains", family="fuzz", level=MUST,
    clause=f"{VIRTIO} Split Virtqueues",
    requirement="Arbitrary descriptor chains (loops, lengths, flags, addresses) never crash or "
        "hang the back-end.",
)
def test_fuzzed_descriptor_chains(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float,
    vhost_measurements: dict[str, float]
) -> None:
    """Arbitrary chains (loops, lengths, flags, addresses, heads, avail jumps; split and packed
    where offered) never crash or hang the back-end, never make it write a device-readable
    buffer, never leak its fds, and a new connection always works afterwards."""
    layouts = ["split"]
    if vhost_capabilities.offers(VirtioFeature.RING_PACKED):
        layouts.append("packed")
    rig = Rig(vhost_target, vhost_capabilities, vhost_timeout)
    examples = examples_setting()
    started = time.monotonic()
    # warm-up, one plain guest per layout: fds after it are the baseline; a layout on which
    # not even a well-formed request completes is left out (the blk-io family reports that)
    for layout in list(layouts):
        try:
            with rig.guest(packed=layout == "packed"):
                pass
        except CaseHang as exc:
            if layout == "split":
                raise
            layouts.remove(layout)
            vhost_measurements[f"excluded.{layout}"] = 1.0
            print(f"VU-FUZZ-2: {layout} rings left out: {exc.reason}")
            if isinstance(vhost_target, CommandTarget):
                vhost_target.restart()
    fds_before = backend_fds(vhost_target)
    try:
        ran = fuzz_descriptor_chains(rig, examples, layouts)
        rig.final_check()
    finally:
        vhost_measurements["examples"] = float(rig.seq)
        vhost_measurements["seconds"] = round(time.monotonic() - started, 2)
        for name, count in rig.outcomes.items():
            vhost_measurements[f"outcome.{name}"] = float(count)
    fds_after = backend_fds(vhost_target)
    vhost_measurements["examples"] = float(ran)
    if fds_before is not None and fds_after is not None:
        vhost_measurements["fds.before"] = float(fds_before)
        vhost_measurements["fds.after"] = float(fds_after)
        if fds_after > fds_before + 16:
            raise CaseFailed(f"the back-end's open fds grew over {ran} hostile examples (a leak)",
                             expected=f"<= {fds_before + 16}", seen=fds_after)
    print(f"VU-FUZZ-2: {ran} examples ({', '.join(layouts)}): {rig.outcomes}")


__all__ = [
    "DEFAULT_EXAMPLES",
    "EXAMPLES_ENV",
    "BackendCrashed",
    "Outcome",
    "Rig",
    "Shape",
    "backend_fds",
    "died",
    "examples_setting",
    "process_tree_fds",
    "run_seed",
    "run_shape",
]
