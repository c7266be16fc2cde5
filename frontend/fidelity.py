"""Fidelity: the emulated front-end's message sequence held against real QEMU 11.1.3's, as the
recording proxy (frontend/proxy.py) saw it on the same back-end.

Both traces are :class:`frontend.channel.TraceEntry` lists. Each message is reduced to what
must agree: direction, name, flags, payload size, fd count, and the payload fields that are
deterministic for a given back-end and device configuration (feature words, queue numbers and
sizes, ring indices and bases at start, status values, in-flight region geometry, config
offsets and sizes, region sizes and guest addresses; never host addresses, and never a
GET_VRING_BASE reply's base, which counts the I/O done). ``differences`` lists where the two
sequences part, one line each; an empty list means the emulation sent what QEMU sent.

Messages the emulation has no counterpart for by design are dropped from the real trace
before the comparison, each kind with its reason (:data:`GUEST_DRIVEN`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vhost_conformance.frontend.channel import TraceEntry

#: Messages of the real trace that come from the guest's driver, which the emulation does not
#: model: RESET_DEVICE (QEMU 11.1.3 vhost_user_blk_reset on the guest driver's device resets
#: at probe, and at the power-off after the last stop).
GUEST_DRIVEN: dict[str, str] = {
    "RESET_DEVICE": "the guest driver's virtio reset (probe, power-off): no guest driver in the "
    "emulation",
}

#: name -> the payload keys that are deterministic (for both directions unless noted).
DETERMINISTIC: dict[str, tuple[str, ...]] = {
    "GET_FEATURES": ("value",),
    "SET_FEATURES": ("value",),
    "GET_PROTOCOL_FEATURES": ("value",),
    "SET_PROTOCOL_FEATURES": ("value",),
    "GET_QUEUE_NUM": ("value",),
    "GET_MAX_MEM_SLOTS": ("value",),
    "SET_VRING_NUM": ("index", "num"),
    "SET_VRING_BASE": ("index",),  # num: 0 at the first start, then what the I/O left
    "SET_VRING_ENABLE": ("index", "num"),
    "SET_VRING_ADDR": ("index", "flags"),
    "SET_STATUS": ("value",),
    "GET_STATUS": ("value",),
    "GET_INFLIGHT_FD": ("mmap_offset", "mmap_size", "num_queues", "queue_size"),
    "SET_INFLIGHT_FD": ("mmap_offset", "mmap_size", "num_queues", "queue_size"),
    "GET_CONFIG": ("offset", "size", "flags"),
    "ADD_MEM_REG": ("region.guest_phys_addr", "region.memory_size"),
}


@dataclass(frozen=True)
class Shape:
    """What must agree about one message."""

    direction: str
    name: str
    flags: int
    size: int
    nfds: int
    payload: tuple[tuple[str, object], ...]

    def __str__(self) -> str:
        fields = " ".join(f"{k}={v}" for k, v in self.payload)
        return (f"{self.direction} {self.name} flags={self.flags:#x} size={self.size} "
                f"fds={self.nfds}{' ' + fields if fields else ''}")  # fmt: skip


def _field(payload: dict[str, object] | None, path: str) -> object:
    value: object = payload
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def shape(entry: TraceEntry) -> Shape:
    """The comparable shape of one trace entry."""
    keys = DETERMINISTIC.get(entry.name, ())
    if entry.name == "GET_VRING_BASE" and entry.direction == "fe->be":
        keys = ("index", "num")
    if entry.direction == "be->fe" and entry.name in ("SET_VRING_BASE", "SET_VRING_ADDR"):
        keys = ()
    payload = tuple((k, _field(entry.payload, k)) for k in keys)
    return Shape(entry.direction, entry.name, entry.flags, entry.size, entry.nfds, payload)


def comparable(entries: Iterable[TraceEntry], *, real: bool) -> list[Shape]:
    """The shapes of ``entries`` on the main channel (from the real trace: without the
    guest-driven messages and their replies)."""
    out = []
    for entry in entries:
        if entry.channel != "main":
            continue
        if real and entry.name in GUEST_DRIVEN:
            continue
        out.append(shape(entry))
    return out


def differences(emulated: Sequence[TraceEntry], real: Sequence[TraceEntry],
                limit: int = 10) -> list[str]:  # fmt: skip
    """Where the emulated sequence and QEMU's part: one line per differing position (at most
    ``limit``), then a line for a length difference; ``[]`` when they agree."""
    mine = comparable(emulated, real=False)
    theirs = comparable(real, real=True)
    out: list[str] = []
    for i, (a, b) in enumerate(zip(mine, theirs, strict=False)):
        if a != b:
            out.append(f"message {i}: emulated {a} / QEMU {b}")
            if len(out) >= limit:
                return out
    if len(mine) != len(theirs):
        longer, who = (mine, "emulated") if len(mine) > len(theirs) else (theirs, "QEMU")
        extra = longer[min(len(mine), len(theirs)):]
        out.append(f"{who} has {len(extra)} more message(s): "
                   + "; ".join(str(s) for s in extra[:4]))  # fmt: skip
    return out
