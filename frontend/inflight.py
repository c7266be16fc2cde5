"""The in-flight I/O tracking region: layout, parser, validator, writer and the front-end's model.

Pure functions over a buffer (``bytes``, ``memoryview`` or an ``mmap``); no sockets, no fds.

Layout facts (vhost-user.rst "Inflight I/O tracking"; SPEC-DIGEST 5.2 and 5.5):

- The buffer is ``num_queues`` consecutive per-queue regions. The spec does not define the
  per-queue stride and real back-ends differ (QEMU-TRACES correction 9: 2112 bytes for 128
  descriptors in some, 2064 in others), so the stride is derived as ``len(buf) // num_queues``
  and every queue header's ``desc_num`` is validated instead of trusted.
- Split queue: a 16-byte header (``features u64, version u16, desc_num u16,
  last_batch_head u16, used_idx u16``) and one 16-byte ``DescStateSplit`` per descriptor
  (``inflight u8, padding[5], next u16, counter u64``).
- Packed queue: a 32-byte header (``features u64, version u16, desc_num u16, free_head u16,
  old_free_head u16, used_idx u16, old_used_idx u16, used_wrap_counter u8,
  old_used_wrap_counter u8, padding[7]``, then padding to 8-byte alignment) and one 32-byte
  ``DescStatePacked`` per descriptor (``inflight u8, padding u8, next u16, last u16, num u16,
  counter u64, id u16, flags u16, len u32, addr u64``).
- Host-native byte order (the region is shared between two processes on one host).

The :class:`InflightModel` is what the front-end knows (what it submitted, what it saw
completed) and says which heads a region MUST, MAY and MUST NOT mark in flight.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vhost_conformance.frontend.errors import MisuseError

__all__ = [
    "DESC_PACKED_SIZE",
    "DESC_SPLIT_SIZE",
    "INFLIGHT_ALIGNMENT",
    "INFLIGHT_VERSION",
    "PACKED_HEADER_SIZE",
    "SPLIT_HEADER_SIZE",
    "DescStatePacked",
    "DescStateSplit",
    "Expectation",
    "Finding",
    "InflightLayoutError",
    "InflightModel",
    "InflightModelError",
    "InflightRegion",
    "PackedQueueRegion",
    "PackedSlot",
    "QueueRegion",
    "Request",
    "SplitQueueRegion",
    "build_packed_region",
    "build_split_region",
    "dpdk_packed_stride",
    "dpdk_split_stride",
    "libvhost_user_split_stride",
    "minimal_queue_bytes",
    "parse_region",
    "validate_region",
]

# vhost-user.rst "Inflight I/O tracking"; libvhost-user INFLIGHT_ALIGNMENT, DPDK the same.
INFLIGHT_ALIGNMENT = 64
SPLIT_HEADER_SIZE = 16
DESC_SPLIT_SIZE = 16
PACKED_HEADER_SIZE = 32
DESC_PACKED_SIZE = 32
# The only version the spec defines; 0 means "not initialised yet" (fresh region, VM reset).
INFLIGHT_VERSION = 1

# "=" : native byte order, standard sizes, no implicit alignment (offsets are explicit).
_SPLIT_HEADER = struct.Struct("=QHHHH")
_DESC_SPLIT = struct.Struct("=B5sHQ")
_PACKED_HEADER = struct.Struct("=QHHHHHHBB10s")
_DESC_PACKED = struct.Struct("=BBHHHQHHIQ")
assert _SPLIT_HEADER.size == SPLIT_HEADER_SIZE and _DESC_SPLIT.size == DESC_SPLIT_SIZE
assert _PACKED_HEADER.size == PACKED_HEADER_SIZE and _DESC_PACKED.size == DESC_PACKED_SIZE

_U16 = 1 << 16


class InflightLayoutError(ValueError):
    """A buffer cannot hold the region asked for (sizes do not fit)."""


class InflightModelError(ValueError, MisuseError):
    """The model was fed something impossible (misuse of the library, or an impossible event)."""


# --------------------------------------------------------------------------------------------
# Stride formulas
# --------------------------------------------------------------------------------------------


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def libvhost_user_split_stride(queue_size: int) -> int:
    """Per-queue bytes libvhost-user allocates: ``ALIGN_UP(16*Q + 2, 64)``.

    libvhost-user.c vu_inflight_queue_size: sizeof(VuDescStateSplit) * Q + sizeof(uint16_t).
    """
    return _align_up(DESC_SPLIT_SIZE * queue_size + 2, INFLIGHT_ALIGNMENT)


def dpdk_split_stride(queue_size: int) -> int:
    """Per-queue bytes DPDK allocates for split rings: ``ALIGN_UP(16*Q + 8 + 2*4, 64)``.

    DPDK lib/vhost/vhost_user.c get_pervq_shm_size_split.
    """
    return _align_up(DESC_SPLIT_SIZE * queue_size + 8 + 2 * 4, INFLIGHT_ALIGNMENT)


def dpdk_packed_stride(queue_size: int) -> int:
    """Per-queue bytes DPDK allocates for packed rings: ``ALIGN_UP(32*Q + 8 + 2*6 + 9, 64)``.

    DPDK lib/vhost/vhost_user.c get_pervq_shm_size_packed.
    """
    return _align_up(DESC_PACKED_SIZE * queue_size + 8 + 2 * 6 + 9, INFLIGHT_ALIGNMENT)


def minimal_queue_bytes(queue_size: int, packed: bool) -> int:
    """Smallest per-queue region that holds the header and ``queue_size`` descriptor states."""
    if packed:
        return PACKED_HEADER_SIZE + DESC_PACKED_SIZE * queue_size
    return SPLIT_HEADER_SIZE + DESC_SPLIT_SIZE * queue_size


# --------------------------------------------------------------------------------------------
# Parsed region
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DescStateSplit:
    """One ``DescStateSplit`` entry; ``offset`` is its byte offset in the whole buffer."""

    index: int
    offset: int
    inflight: int
    padding: bytes
    next: int
    counter: int


@dataclass(frozen=True, slots=True)
class DescStatePacked:
    """One ``DescStatePacked`` entry (a slot of the packed region, not a descriptor id)."""

    index: int
    offset: int
    inflight: int
    padding: int
    next: int
    last: int
    num: int
    counter: int
    id: int
    flags: int
    len: int
    addr: int


@dataclass(frozen=True, slots=True)
class SplitQueueRegion:
    """The region of one split virtqueue: header fields and ``queue_size`` entries."""

    queue: int
    offset: int
    stride: int
    features: int
    version: int
    desc_num: int
    last_batch_head: int
    used_idx: int
    entries: tuple[DescStateSplit, ...]

    packed = False

    def inflight_entries(self) -> list[DescStateSplit]:
        """Entries with ``inflight == 1`` in increasing ``counter`` order (resubmission order)."""
        return sorted(
            (e for e in self.entries if e.inflight == 1), key=lambda e: (e.counter, e.index)
        )

    def inflight_heads(self) -> list[int]:
        """Descriptor heads marked in flight, sorted by counter (split: entry index == head)."""
        return [e.index for e in self.inflight_entries()]


@dataclass(frozen=True, slots=True)
class PackedQueueRegion:
    """The region of one packed virtqueue: header fields and ``queue_size`` slots."""

    queue: int
    offset: int
    stride: int
    features: int
    version: int
    desc_num: int
    free_head: int
    old_free_head: int
    used_idx: int
    old_used_idx: int
    used_wrap_counter: int
    old_used_wrap_counter: int
    padding: bytes
    entries: tuple[DescStatePacked, ...]

    packed = True

    def inflight_entries(self) -> list[DescStatePacked]:
        """Slots with ``inflight == 1`` (chain heads) in increasing ``counter`` order."""
        return sorted(
            (e for e in self.entries if e.inflight == 1), key=lambda e: (e.counter, e.index)
        )

    def inflight_heads(self) -> list[int]:
        """Buffer ids of the in-flight chains, sorted by counter (packed: the slot's ``id``)."""
        return [e.id for e in self.inflight_entries()]


QueueRegion = SplitQueueRegion | PackedQueueRegion


@dataclass(frozen=True, slots=True)
class InflightRegion:
    """A parsed in-flight buffer: one :data:`QueueRegion` per queue."""

    num_queues: int
    queue_size: int
    packed: bool
    stride: int
    size: int
    queues: tuple[QueueRegion, ...]


def parse_region(
    buf: bytes | bytearray | memoryview | mmap.mmap,
    *,
    num_queues: int,
    queue_size: int,
    packed: bool,
) -> InflightRegion:
    """Parse ``buf`` as ``num_queues`` regions of ``queue_size`` descriptors each.

    The per-queue stride is ``len(buf) // num_queues`` (QEMU-TRACES correction 9). Raises
    :class:`InflightLayoutError` if the length is not a multiple of ``num_queues`` or a stride
    is too small for the header and ``queue_size`` entries.
    """
    view = memoryview(buf).cast("B")
    size = len(view)
    if num_queues <= 0:
        raise InflightLayoutError(f"num_queues must be positive, got {num_queues}")
    if not 0 < queue_size <= 0x8000:
        raise InflightLayoutError(f"queue_size must be 1..32768, got {queue_size}")
    if size % num_queues:
        raise InflightLayoutError(
            f"in-flight buffer of {size} bytes is not a multiple of num_queues={num_queues}"
        )
    stride = size // num_queues
    needed = minimal_queue_bytes(queue_size, packed)
    if stride < needed:
        kind = "packed" if packed else "split"
        raise InflightLayoutError(
            f"in-flight buffer of {size} bytes gives {stride} bytes per queue for "
            f"{num_queues} queue(s); a {kind} queue of {queue_size} descriptors needs {needed}"
        )
    queues: list[QueueRegion] = []
    for q in range(num_queues):
        base = q * stride
        queues.append(
            _parse_packed_queue(view, q, base, stride, queue_size)
            if packed
            else _parse_split_queue(view, q, base, stride, queue_size)
        )
    return InflightRegion(num_queues, queue_size, packed, stride, size, tuple(queues))


def _parse_split_queue(
    view: memoryview, q: int, base: int, stride: int, queue_size: int
) -> SplitQueueRegion:
    features, version, desc_num, last_batch_head, used_idx = _SPLIT_HEADER.unpack_from(view, base)
    entries = []
    for i in range(queue_size):
        off = base + SPLIT_HEADER_SIZE + i * DESC_SPLIT_SIZE
        inflight, padding, nxt, counter = _DESC_SPLIT.unpack_from(view, off)
        entries.append(DescStateSplit(i, off, inflight, padding, nxt, counter))
    return SplitQueueRegion(
        q, base, stride, features, version, desc_num, last_batch_head, used_idx, tuple(entries)
    )


def _parse_packed_queue(
    view: memoryview, q: int, base: int, stride: int, queue_size: int
) -> PackedQueueRegion:
    (
        features,
        version,
        desc_num,
        free_head,
        old_free_head,
        used_idx,
        old_used_idx,
        used_wrap,
        old_used_wrap,
        padding,
    ) = _PACKED_HEADER.unpack_from(view, base)
    entries = []
    for i in range(queue_size):
        off = base + PACKED_HEADER_SIZE + i * DESC_PACKED_SIZE
        entries.append(DescStatePacked(i, off, *_DESC_PACKED.unpack_from(view, off)))
    return PackedQueueRegion(
        q,
        base,
        stride,
        features,
        version,
        desc_num,
        free_head,
        old_free_head,
        used_idx,
        old_used_idx,
        used_wrap,
        old_used_wrap,
        padding,
        tuple(entries),
    )


# --------------------------------------------------------------------------------------------
# Findings and validation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing wrong with a region: which queue, which byte, which field, expected vs seen.

    ``rule`` is a short stable id (``"version"``, ``"must-be-inflight"``, ...) a suite can map
    to a case; ``level`` is ``"MUST"`` or ``"SHOULD"``.
    """

    rule: str
    queue: int
    offset: int
    field: str
    expected: str
    seen: str
    level: str = "MUST"

    def __str__(self) -> str:
        return (
            f"[{self.level} {self.rule}] queue {self.queue}, byte {self.offset} (0x{self.offset:x}), "
            f"{self.field}: expected {self.expected}, seen {self.seen}"
        )


# Byte offsets of header fields inside a queue region.
_SPLIT_OFF = {"features": 0, "version": 8, "desc_num": 10, "last_batch_head": 12, "used_idx": 14}
_PACKED_OFF = {
    "features": 0,
    "version": 8,
    "desc_num": 10,
    "free_head": 12,
    "old_free_head": 14,
    "used_idx": 16,
    "old_used_idx": 18,
    "used_wrap_counter": 20,
    "old_used_wrap_counter": 21,
}


def _header_offset(queue: QueueRegion, name: str) -> int:
    table = _PACKED_OFF if queue.packed else _SPLIT_OFF
    return queue.offset + table[name]


def validate_region(region: InflightRegion) -> list[Finding]:
    """Check a region against the format rules, independent of what the front-end submitted.

    - ``version`` is 0 (not initialised) or 1;
    - once ``version == 1``, ``desc_num`` equals the negotiated queue size;
    - every ``inflight`` flag is 0 or 1;
    - counters of the in-flight entries are unique (they order the resubmission);
    - split: ``last_batch_head`` is a valid descriptor index;
    - packed: wrap counters are 0/1, ``free_head``/``old_free_head`` are in range, the free
      list from ``free_head`` ends without a loop and holds no in-flight head, and in-flight
      heads have ``num >= 1`` and a ``last`` slot in range.
    """
    findings: list[Finding] = []
    for queue in region.queues:
        findings += _validate_queue(region, queue)
    return findings


def _validate_queue(region: InflightRegion, queue: QueueRegion) -> list[Finding]:
    out: list[Finding] = []
    q = queue.queue
    qs = region.queue_size
    if queue.version not in (0, INFLIGHT_VERSION):
        out.append(
            Finding(
                "version",
                q,
                _header_offset(queue, "version"),
                "version",
                "0 or 1",
                str(queue.version),
            )
        )
    if queue.version == INFLIGHT_VERSION and queue.desc_num != qs:
        out.append(
            Finding(
                "desc-num",
                q,
                _header_offset(queue, "desc_num"),
                "desc_num",
                str(qs),
                str(queue.desc_num),
            )
        )
    for e in queue.entries:
        if e.inflight not in (0, 1):
            out.append(
                Finding(
                    "inflight-flag",
                    q,
                    e.offset,
                    f"desc[{e.index}].inflight",
                    "0 or 1",
                    str(e.inflight),
                )
            )
    seen_counters: dict[int, int] = {}
    for e in queue.entries:
        if e.inflight != 1:
            continue
        if e.counter in seen_counters:
            out.append(
                Finding(
                    "counter-unique",
                    q,
                    e.offset + 8,
                    f"desc[{e.index}].counter",
                    f"a counter no other in-flight entry has (desc[{seen_counters[e.counter]}] has it)",
                    str(e.counter),
                )
            )
        else:
            seen_counters[e.counter] = e.index
    if isinstance(queue, SplitQueueRegion):
        if queue.version == INFLIGHT_VERSION and queue.last_batch_head >= qs:
            out.append(
                Finding(
                    "last-batch-head",
                    q,
                    _header_offset(queue, "last_batch_head"),
                    "last_batch_head",
                    f"< {qs}",
                    str(queue.last_batch_head),
                )
            )
    else:
        out += _validate_packed_queue(queue, qs)
    return out


def _validate_packed_queue(queue: PackedQueueRegion, qs: int) -> list[Finding]:
    out: list[Finding] = []
    q = queue.queue
    for name in ("used_wrap_counter", "old_used_wrap_counter"):
        value = getattr(queue, name)
        if value not in (0, 1):
            out.append(
                Finding("wrap-counter", q, _header_offset(queue, name), name, "0 or 1", str(value))
            )
    if queue.version != INFLIGHT_VERSION:
        return out
    for name in ("free_head", "old_free_head", "used_idx", "old_used_idx"):
        value = getattr(queue, name)
        # free_head == desc_num is the end of the free list (DPDK initialises next = j + 1).
        limit = qs if name in ("free_head", "old_free_head") else qs - 1
        if value > limit:
            out.append(
                Finding(
                    "index-range", q, _header_offset(queue, name), name, f"<= {limit}", str(value)
                )
            )
    visited: set[int] = set()
    slot = queue.free_head
    while slot < qs:
        if slot in visited:
            out.append(
                Finding(
                    "free-list",
                    q,
                    _header_offset(queue, "free_head"),
                    "free list",
                    "a list that ends (next >= desc_num)",
                    f"a loop back to slot {slot}",
                )
            )
            break
        visited.add(slot)
        entry = queue.entries[slot]
        if entry.inflight == 1:
            out.append(
                Finding(
                    "free-list",
                    q,
                    entry.offset,
                    f"desc[{slot}].inflight",
                    "0 for a slot on the free list",
                    "1 (an in-flight head is on the free list)",
                )
            )
        slot = entry.next
    for e in queue.entries:
        if e.inflight != 1:
            continue
        if e.num < 1:
            out.append(
                Finding("chain", q, e.offset + 6, f"desc[{e.index}].num", ">= 1", str(e.num))
            )
        if e.last >= qs:
            out.append(
                Finding("chain", q, e.offset + 4, f"desc[{e.index}].last", f"< {qs}", str(e.last))
            )
    return out


# --------------------------------------------------------------------------------------------
# Writers (for tests and for models of a back-end)
# --------------------------------------------------------------------------------------------

SplitEntries = Mapping[int, Mapping[int, tuple[int, int, int]]]


def build_split_region(
    queue_size: int,
    num_queues: int,
    *,
    stride: int | None = None,
    entries: SplitEntries | None = None,
    used_idx: int | Mapping[int, int] = 0,
    last_batch_head: int | Mapping[int, int] = 0,
    version: int = INFLIGHT_VERSION,
    desc_num: int | None = None,
    features: int = 0,
) -> bytes:
    """Write a split in-flight buffer.

    ``entries`` is ``{queue: {head: (inflight, counter, next)}}``; ``used_idx`` and
    ``last_batch_head`` are one value for every queue or ``{queue: value}``. ``stride``
    defaults to the libvhost-user formula; ``desc_num`` to ``queue_size`` (0 if version 0).
    """
    stride = libvhost_user_split_stride(queue_size) if stride is None else stride
    if stride < minimal_queue_bytes(queue_size, False):
        raise InflightLayoutError(
            f"stride {stride} is smaller than the {minimal_queue_bytes(queue_size, False)} bytes "
            f"a split queue of {queue_size} descriptors needs"
        )
    if desc_num is None:
        desc_num = queue_size if version else 0
    out = bytearray(stride * num_queues)
    for q in range(num_queues):
        base = q * stride
        _SPLIT_HEADER.pack_into(
            out,
            base,
            features,
            version,
            desc_num,
            _per_queue(last_batch_head, q),
            _per_queue(used_idx, q) % _U16,
        )
        for head, (inflight, counter, nxt) in (entries or {}).get(q, {}).items():
            if not 0 <= head < queue_size:
                raise InflightLayoutError(
                    f"head {head} is outside a queue of {queue_size} descriptors"
                )
            _DESC_SPLIT.pack_into(
                out,
                base + SPLIT_HEADER_SIZE + head * DESC_SPLIT_SIZE,
                inflight,
                bytes(5),
                nxt,
                counter,
            )
    return bytes(out)


@dataclass(frozen=True, slots=True)
class PackedSlot:
    """One slot written by :func:`build_packed_region`."""

    inflight: int = 0
    next: int = 0
    last: int = 0
    num: int = 0
    counter: int = 0
    id: int = 0
    flags: int = 0
    len: int = 0
    addr: int = 0


def build_packed_region(
    queue_size: int,
    num_queues: int,
    *,
    stride: int | None = None,
    slots: Mapping[int, Mapping[int, PackedSlot]] | None = None,
    free_head: int = 0,
    used_idx: int = 0,
    used_wrap_counter: int = 1,
    version: int = INFLIGHT_VERSION,
    desc_num: int | None = None,
) -> bytes:
    """Write a packed in-flight buffer the way DPDK initialises one, then apply ``slots``.

    Every slot starts with ``next = index + 1`` (DPDK vhost_user_get_inflight_fd), wrap
    counters 1; ``old_*`` fields equal the current ones (a committed state).
    """
    stride = dpdk_packed_stride(queue_size) if stride is None else stride
    if stride < minimal_queue_bytes(queue_size, True):
        raise InflightLayoutError(
            f"stride {stride} is smaller than the {minimal_queue_bytes(queue_size, True)} bytes "
            f"a packed queue of {queue_size} descriptors needs"
        )
    if desc_num is None:
        desc_num = queue_size if version else 0
    out = bytearray(stride * num_queues)
    for q in range(num_queues):
        base = q * stride
        _PACKED_HEADER.pack_into(
            out,
            base,
            0,
            version,
            desc_num,
            free_head,
            free_head,
            used_idx,
            used_idx,
            used_wrap_counter,
            used_wrap_counter,
            bytes(10),
        )
        given = (slots or {}).get(q, {})
        for i in range(queue_size):
            s = given.get(i, PackedSlot(next=i + 1))
            _DESC_PACKED.pack_into(
                out,
                base + PACKED_HEADER_SIZE + i * DESC_PACKED_SIZE,
                s.inflight,
                0,
                s.next,
                s.last,
                s.num,
                s.counter,
                s.id,
                s.flags,
                s.len,
                s.addr,
            )
    return bytes(out)


def _per_queue(value: int | Mapping[int, int], queue: int) -> int:
    return value if isinstance(value, int) else value.get(queue, 0)


# --------------------------------------------------------------------------------------------
# The front-end's model
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    """One request the front-end made available: where, which head, its tag, its fate.

    ``position`` is the free-running (unbounded) avail position; ``avail_idx`` is its 16-bit
    value as placed in the ring. ``used_position`` is set when the front-end saw it completed.
    """

    queue: int
    head: int
    tag: object
    avail_idx: int
    position: int
    used_position: int | None = None

    @property
    def completed(self) -> bool:
        """True once the front-end saw the head in the used ring."""
        return self.used_position is not None


@dataclass(frozen=True, slots=True)
class Expectation:
    """For one queue: heads that MUST, MAY and MUST NOT be marked in flight.

    ``must`` maps head -> tag of the outstanding request; ``may`` heads are outstanding but
    perhaps not popped, or completed in the last batch the region has not committed yet
    (``region.used_idx != used->idx``); every other head MUST NOT be marked. ``order`` lists the
    MUST heads in the order the back-end popped them (their counters must follow it).
    """

    queue: int
    must: Mapping[int, object]
    may: Mapping[int, object]
    order: tuple[int, ...]
    last_batch: tuple[int, ...]


@dataclass
class _QueueModel:
    next_position: int = 0
    outstanding: dict[int, Request] = field(default_factory=dict)  # head -> request
    completed: list[Request] = field(default_factory=list)  # in used-ring order


class InflightModel:
    """What a region must contain, from what the front-end submitted and saw completed.

    Feed it with :meth:`submit` (queue, head, tag, avail index) as requests are made available
    and :meth:`complete` as used entries are harvested, in used-ring order. Then
    :meth:`expectations` and :meth:`check` take the ring's ``used->idx`` and the back-end's
    ``last_avail_idx`` (the GET_VRING_BASE reply; ``None`` when there is none, e.g. a crash).

    Positions are 16-bit free-running indices (split rings). For packed rings pass the
    driver's own free-running counts instead (submissions for avail indices and
    ``last_avail_idx``, used entries seen for ``used_idx``), modulo 2**16; heads are buffer ids.
    """

    def __init__(self, num_queues: int, queue_size: int) -> None:
        if num_queues <= 0 or queue_size <= 0:
            raise InflightModelError(
                f"num_queues and queue_size must be positive, got {num_queues}, {queue_size}"
            )
        self.num_queues = num_queues
        self.queue_size = queue_size
        self._queues = [_QueueModel() for _ in range(num_queues)]

    def _queue(self, queue: int) -> _QueueModel:
        if not 0 <= queue < self.num_queues:
            raise InflightModelError(f"queue {queue} outside 0..{self.num_queues - 1}")
        return self._queues[queue]

    def submit(self, queue: int, head: int, tag: object, avail_idx: int | None = None) -> Request:
        """Record a request made available at ring position ``avail_idx`` (16-bit).

        Positions must be consecutive per queue; ``None`` takes the next one. A head that is
        still outstanding cannot be submitted again.
        """
        qm = self._queue(queue)
        if not 0 <= head < self.queue_size:
            raise InflightModelError(
                f"head {head} outside a queue of {self.queue_size} descriptors"
            )
        expected = qm.next_position % _U16
        if avail_idx is not None and avail_idx % _U16 != expected:
            raise InflightModelError(
                f"queue {queue}: avail index {avail_idx} is not the next position (expected {expected})"
            )
        if head in qm.outstanding:
            raise InflightModelError(
                f"queue {queue}: head {head} is still outstanding (tag {qm.outstanding[head].tag!r})"
            )
        request = Request(queue, head, tag, expected, qm.next_position)
        qm.outstanding[head] = request
        qm.next_position += 1
        return request

    def complete(self, queue: int, head: int) -> Request:
        """Record that the front-end saw ``head`` in the used ring (next used position).

        Raises :class:`InflightModelError` if no request with that head is outstanding: a
        completion of something never submitted, or a second completion.
        """
        qm = self._queue(queue)
        request = qm.outstanding.pop(head, None)
        if request is None:
            raise InflightModelError(
                f"queue {queue}: used entry for head {head}, which is not outstanding"
            )
        request.used_position = len(qm.completed)
        qm.completed.append(request)
        return request

    def outstanding(self, queue: int) -> list[Request]:
        """Requests of ``queue`` not seen completed, in avail order."""
        return sorted(self._queue(queue).outstanding.values(), key=lambda r: r.position)

    def completed(self, queue: int) -> list[Request]:
        """Requests of ``queue`` seen completed, in used-ring order."""
        return list(self._queue(queue).completed)

    def expectations(
        self, queue: int, *, region_used_idx: int, used_idx: int, last_avail_idx: int | None
    ) -> Expectation:
        """Classify heads of ``queue`` (see :class:`Expectation`).

        ``used_idx`` is the ring's used->idx (all its entries must have been fed to
        :meth:`complete`); ``region_used_idx`` is the region header's copy. Raises
        :class:`InflightModelError` if the indices contradict the model.
        """
        qm = self._queue(queue)
        n_completed = len(qm.completed)
        if used_idx % _U16 != n_completed % _U16:
            raise InflightModelError(
                f"queue {queue}: used->idx {used_idx} but {n_completed} completions were fed to the model"
            )
        # vhost-user.rst "Inflight I/O tracking": the back-end updates used_idx after
        # used->idx, so the region may lag by the size of the last batch.
        lag = (used_idx - region_used_idx) % _U16
        last_batch = (
            tuple(r.head for r in qm.completed[n_completed - lag :])
            if 0 < lag <= n_completed
            else ()
        )
        outstanding = sorted(qm.outstanding.values(), key=lambda r: r.position)
        must: dict[int, object] = {}
        may: dict[int, object] = {}
        if last_avail_idx is None:
            may.update((r.head, r.tag) for r in outstanding)
        else:
            not_popped = (qm.next_position - last_avail_idx) % _U16
            popped_limit = qm.next_position - not_popped
            for r in outstanding:
                if r.position < popped_limit:
                    must[r.head] = r.tag
        for head in last_batch:
            if head not in must:
                may.setdefault(head, next(r.tag for r in reversed(qm.completed) if r.head == head))
        order = tuple(r.head for r in outstanding if r.head in must)
        return Expectation(queue, must, may, order, last_batch)

    def check(
        self,
        region: InflightRegion,
        *,
        used_idx: int | Mapping[int, int] | Iterable[int],
        last_avail_idx: int | Mapping[int, int | None] | Iterable[int | None] | None,
    ) -> list[Finding]:
        """Compare a parsed region with the model; return every difference as a :class:`Finding`.

        ``used_idx`` and ``last_avail_idx`` are one value (single queue), a mapping
        ``{queue: value}`` or a sequence indexed by queue.
        """
        if region.num_queues != self.num_queues or region.queue_size != self.queue_size:
            raise InflightModelError(
                f"region is {region.num_queues} x {region.queue_size}, model is {self.num_queues} x {self.queue_size}"
            )
        used_map = _as_queue_map(used_idx, self.num_queues, "used_idx")
        avail_map = _as_queue_map(last_avail_idx, self.num_queues, "last_avail_idx")
        findings = validate_region(region)
        for queue in region.queues:
            findings += self._check_queue(queue, used_map[queue.queue], avail_map[queue.queue])
        return findings

    def _check_queue(
        self, queue: QueueRegion, used_idx: int | None, last_avail_idx: int | None
    ) -> list[Finding]:
        q = queue.queue
        qm = self._queue(q)
        if used_idx is None:
            raise InflightModelError(f"queue {q}: no used_idx given")
        out, last_avail_idx = _check_last_avail(queue, qm, last_avail_idx)
        if queue.version == 0:
            return out + _check_version(queue, qm)
        region_used_idx, found = self._check_used_idx(queue, qm, used_idx)
        out += found
        exp = self.expectations(
            q, region_used_idx=region_used_idx, used_idx=used_idx, last_avail_idx=last_avail_idx
        )
        if isinstance(queue, SplitQueueRegion) and exp.last_batch:
            out += _check_last_batch(queue, exp.last_batch)
        return out + _check_marks(queue, qm, exp, last_avail_idx)

    def _check_used_idx(
        self, queue: QueueRegion, qm: _QueueModel, used_idx: int
    ) -> tuple[int, list[Finding]]:
        """The used index the region's marks are judged at (split: the region header's copy,
        when it is at most one batch behind used->idx), and the finding when it is not."""
        q = queue.queue
        out: list[Finding] = []
        region_used_idx = used_idx
        if isinstance(queue, SplitQueueRegion):
            # Packed regions commit through old_* fields instead; only split has this rule.
            lag = (used_idx - queue.used_idx) % _U16
            if lag > len(qm.completed) or lag > self.queue_size:
                out.append(
                    Finding(
                        "used-idx",
                        q,
                        _header_offset(queue, "used_idx"),
                        "used_idx",
                        f"used->idx {used_idx} or at most one batch behind it",
                        str(queue.used_idx),
                    )
                )
            else:
                region_used_idx = queue.used_idx
        return region_used_idx, out


def _check_last_avail(
    queue: QueueRegion, qm: _QueueModel, last_avail_idx: int | None
) -> tuple[list[Finding], int | None]:
    """completed <= popped <= submitted for GET_VRING_BASE's num: the finding when not (the
    num is then not used further: None)."""
    q = queue.queue
    out: list[Finding] = []
    submitted = qm.next_position
    if last_avail_idx is not None:
        # The back-end cannot have completed what it did not pop, nor popped what was
        # never made available: completed <= popped <= submitted.
        not_popped = (submitted - last_avail_idx) % _U16
        if not_popped > len(qm.outstanding):
            out.append(
                Finding(
                    "last-avail-idx",
                    q,
                    queue.offset,
                    "GET_VRING_BASE num (last_avail_idx)",
                    f"between {len(qm.completed) % _U16} (completed) and {submitted % _U16} (submitted)",
                    str(last_avail_idx),
                )
            )
            last_avail_idx = None
    return out, last_avail_idx


def _check_version(queue: QueueRegion, qm: _QueueModel) -> list[Finding]:
    """A region at version 0 (the caller checked) although the ring was started and used."""
    q = queue.queue
    out: list[Finding] = []
    if qm.outstanding or qm.completed:
        out.append(
            Finding(
                "version",
                q,
                _header_offset(queue, "version"),
                "version",
                "1 once the ring has been started and used",
                "0",
            )
        )
    return out


def _check_marks(
    queue: QueueRegion, qm: _QueueModel, exp: Expectation, last_avail_idx: int | None
) -> list[Finding]:
    """The region's inflight marks against the expectation: every must-head marked, nothing
    else marked, the marked must-heads in pop (counter) order."""
    q = queue.queue
    out: list[Finding] = []
    marked = {}
    for e in queue.inflight_entries():
        head = e.index if isinstance(e, DescStateSplit) else e.id
        marked[head] = e
    for head, tag in exp.must.items():
        if head not in marked:
            out.append(
                Finding(
                    "must-be-inflight",
                    q,
                    _entry_offset(queue, head),
                    f"desc[{head}].inflight",
                    f"1 (request {tag!r} was popped and not completed)",
                    "0",
                )
            )
    for head, e in marked.items():
        if head in exp.must or head in exp.may:
            continue
        if head in qm.outstanding:
            why = f"request {qm.outstanding[head].tag!r} was not popped (last_avail_idx {last_avail_idx})"
        elif any(r.head == head for r in qm.completed):
            why = "its request completed and the region's used_idx caught up"
        else:
            why = "never submitted as a head"
        out.append(
            Finding(
                "must-not-be-inflight",
                q,
                e.offset,
                f"desc[{e.index}].inflight",
                f"0 ({why})",
                "1",
            )
        )
    ordered = [
        h
        for h in (
            x.index if isinstance(x, DescStateSplit) else x.id for x in queue.inflight_entries()
        )
        if h in exp.must
    ]
    expected_order = [h for h in exp.order if h in marked]
    if ordered != expected_order:
        out.append(
            Finding(
                "counter-order",
                q,
                queue.offset,
                "counter order of in-flight heads",
                f"pop (avail) order {expected_order}",
                str(ordered),
            )
        )
    return out


def _check_last_batch(queue: SplitQueueRegion, last_batch: tuple[int, ...]) -> list[Finding]:
    # vhost-user.rst: on completion desc[i].next = last_batch_head; last_batch_head = i, so the
    # list starting at last_batch_head names the batch, most recent first.
    walked: list[int] = []
    head = queue.last_batch_head
    for _ in range(len(last_batch)):
        if head >= len(queue.entries):
            break
        walked.append(head)
        head = queue.entries[head].next
    if sorted(walked) != sorted(last_batch):
        return [
            Finding(
                "last-batch",
                queue.queue,
                _header_offset(queue, "last_batch_head"),
                "last batch list",
                f"heads {sorted(last_batch)} (completed after the region's used_idx)",
                f"heads {sorted(walked)}",
            )
        ]
    return []


def _entry_offset(queue: QueueRegion, head: int) -> int:
    if isinstance(queue, SplitQueueRegion):
        return queue.entries[head].offset if head < len(queue.entries) else queue.offset
    for e in queue.entries:
        if e.inflight == 1 and e.id == head:
            return e.offset
    return queue.offset


def _as_queue_map(value: object, num_queues: int, name: str) -> dict[int, int | None]:
    if value is None or isinstance(value, int):
        if num_queues != 1 and value is not None:
            raise InflightModelError(f"{name}: one value given for {num_queues} queues")
        return {q: value for q in range(num_queues)}
    if isinstance(value, Mapping):
        return {q: value.get(q) for q in range(num_queues)}
    if isinstance(value, Iterable):
        items = list(value)
        if len(items) != num_queues:
            raise InflightModelError(f"{name}: {len(items)} values for {num_queues} queues")
        return dict(enumerate(items))
    raise InflightModelError(f"{name}: unsupported value {value!r}")
