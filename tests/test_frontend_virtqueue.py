"""Driver-side split and packed virtqueues against a tiny device written here from the VIRTIO
1.x rules (it reads and writes the rings in guest memory directly, as a back-end would)."""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.protocol import VringAddr
from vhost_conformance.frontend.virtqueue import (
    PackedVirtqueue,
    SplitVirtqueue,
    Virtqueue,
    VirtqueueError,
    vring_need_event,
)

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
F_AVAIL, F_USED = 1 << 7, 1 << 15
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
MiB = 1 << 20


@dataclass
class Chain:
    """What the device popped: the head (split) or buffer id (packed), its elements
    ``(addr, len, writable)``, and for packed the ring slots it took."""

    head: int
    elems: list[tuple[int, int, bool]]
    slots: int = 1
    indirect: bool = False


class SplitDevice:
    """The device side of a split ring (VIRTIO 1.x 2.7), enough for the tests."""

    def __init__(self, memory: GuestMemory, vq: SplitVirtqueue, *, event_idx: bool) -> None:
        self.m = memory
        self.n = vq.size
        self.desc, self.avail, self.used = vq.desc_gpa, vq.avail_gpa, vq.used_gpa
        self.event_idx = event_idx
        self.last_avail = 0
        self.used_idx = 0
        self.notified_at = 0  # used idx at the last "interrupt" decision

    def u16(self, gpa: int) -> int:
        return int(U16.unpack(self.m.read(gpa, 2))[0])

    def avail_idx(self) -> int:
        return self.u16(self.avail + 2)

    def pop(self) -> list[Chain]:
        out = []
        idx = self.avail_idx()
        while self.last_avail != idx:
            head = self.u16(self.avail + 4 + 2 * (self.last_avail % self.n))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
            out.append(self.walk(head))
        if self.event_idx:
            self.m.write(self.used + 4 + 8 * self.n, U16.pack(self.last_avail))
        return out

    def walk(self, head: int) -> Chain:
        addr, length, flags, nxt = DESC.unpack(self.m.read(self.desc + 16 * head, 16))
        if flags & F_INDIRECT:
            elems = []
            i = 0
            while True:
                a, ln, f, nx = DESC.unpack(self.m.read(addr + 16 * i, 16))
                elems.append((a, ln, bool(f & F_WRITE)))
                if not f & F_NEXT:
                    break
                i = nx
            assert len(elems) == length // 16
            return Chain(head, elems, indirect=True)
        elems = [(addr, length, bool(flags & F_WRITE))]
        seen = 1
        while flags & F_NEXT:
            addr, length, flags, nxt2 = DESC.unpack(self.m.read(self.desc + 16 * nxt, 16))
            elems.append((addr, length, bool(flags & F_WRITE)))
            nxt = nxt2
            seen += 1
            assert seen <= self.n, "descriptor loop"
        return Chain(head, elems)

    def push(self, head: int, length: int) -> None:
        self.m.write(self.used + 4 + 8 * (self.used_idx % self.n), struct.pack("<II", head, length))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.m.write(self.used + 2, U16.pack(self.used_idx))

    def complete(self, chain: Chain, length: int) -> None:
        self.push(chain.head, length)

    def should_interrupt(self) -> bool:
        old, new = self.notified_at, self.used_idx
        self.notified_at = new
        if self.event_idx:
            return vring_need_event(self.u16(self.avail + 4 + 2 * self.n), new, old)
        return not self.u16(self.avail) & 1

    def set_no_notify(self, on: bool) -> None:
        self.m.write(self.used, U16.pack(1 if on else 0))


class PackedDevice:
    """The device side of a packed ring (VIRTIO 1.x 2.8)."""

    def __init__(self, memory: GuestMemory, vq: PackedVirtqueue) -> None:
        self.m = memory
        self.n = vq.size
        self.ring = vq.desc_gpa
        self.driver_event = vq.driver_event_gpa
        self.device_event = vq.device_event_gpa
        self.last_avail, self.avail_wrap = 0, 1
        self.used_idx, self.used_wrap = 0, 1

    def pop(self) -> list[Chain]:
        out: list[Chain] = []
        while True:
            addr, length, buf_id, flags = DESC.unpack(self.m.read(self.ring + 16 * self.last_avail, 16))
            avail, used = bool(flags & F_AVAIL), bool(flags & F_USED)
            if not (avail == bool(self.avail_wrap) and used != bool(self.avail_wrap)):
                return out
            if flags & F_INDIRECT:
                elems = []
                for i in range(length // 16):
                    a, ln, _, f = DESC.unpack(self.m.read(addr + 16 * i, 16))
                    elems.append((a, ln, bool(f & F_WRITE)))
                chain = Chain(buf_id, elems, 1, indirect=True)
                self.advance(1)
            else:
                elems = [(addr, length, bool(flags & F_WRITE))]
                slots = 1
                self.advance(1)
                while flags & F_NEXT:
                    addr, length, buf_id, flags = DESC.unpack(
                        self.m.read(self.ring + 16 * self.last_avail, 16))
                    elems.append((addr, length, bool(flags & F_WRITE)))
                    slots += 1
                    self.advance(1)
                    assert slots <= self.n
                chain = Chain(buf_id, elems, slots)  # buffer id of the last descriptor
            out.append(chain)

    def advance(self, k: int) -> None:
        self.last_avail += k
        if self.last_avail >= self.n:
            self.last_avail -= self.n
            self.avail_wrap ^= 1

    def complete(self, chain: Chain, length: int) -> None:
        """Write one used descriptor for the whole chain at the used index, skip its slots."""
        flags = (F_AVAIL | F_USED if self.used_wrap else 0) | (F_WRITE if length else 0)
        pos = self.ring + 16 * self.used_idx
        self.m.write(pos, struct.pack("<QIH", 0, length, chain.head))
        self.m.write(pos + 14, U16.pack(flags))
        self.used_idx += chain.slots
        if self.used_idx >= self.n:
            self.used_idx -= self.n
            self.used_wrap ^= 1

    def set_event(self, flags: int, off_wrap: int = 0) -> None:
        self.m.write(self.device_event, struct.pack("<HH", off_wrap, flags))

    def driver_event_state(self) -> tuple[int, int]:
        off_wrap, flags = struct.unpack("<HH", self.m.read(self.driver_event, 4))
        return off_wrap, flags


Device = SplitDevice | PackedDevice


def make(kind: str, memory: GuestMemory, size: int, *, event_idx: bool = False,
         indirect: bool = False) -> tuple[SplitVirtqueue | PackedVirtqueue, Device]:
    if kind == "split":
        svq = SplitVirtqueue(memory, 0, size, event_idx=event_idx, indirect=indirect)
        return svq, SplitDevice(memory, svq, event_idx=event_idx)
    pvq = PackedVirtqueue(memory, 0, size, event_idx=event_idx, indirect=indirect)
    return pvq, PackedDevice(memory, pvq)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.simple(4 * MiB, regions=2) as mem:
        yield mem


KINDS = ["split", "packed"]


@pytest.mark.parametrize("kind", KINDS)
def test_both_satisfy_the_protocol(memory: GuestMemory, kind: str) -> None:
    vq, _ = make(kind, memory, 8)
    assert isinstance(vq, Virtqueue)
    assert vq.packed == (kind == "packed")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("indirect", [False, True])
def test_device_sees_readable_then_writable_buffers(memory: GuestMemory, kind: str,
                                                    indirect: bool) -> None:
    vq, dev = make(kind, memory, 8, indirect=indirect)
    buf = [memory.alloc(64) for _ in range(4)]
    h1 = vq.add([(buf[0], 16), (buf[1], 32)], [(buf[2], 64), (buf[3], 1)], "a")
    h2 = vq.add([(buf[0], 8)], [], "b")
    assert dev.pop() == []  # nothing is visible before publish
    vq.publish()
    chains = dev.pop()
    assert [c.head for c in chains] == [h1, h2]
    assert chains[0].elems == [(buf[0], 16, False), (buf[1], 32, False),
                               (buf[2], 64, True), (buf[3], 1, True)]
    assert chains[0].indirect == indirect
    assert chains[1].elems == [(buf[0], 8, False)] and not chains[1].indirect
    assert set(vq.in_flight) == {h1, h2}
    # complete out of order
    dev.complete(chains[1], 0)
    dev.complete(chains[0], 65)
    assert vq.reap() == [("b", 0), ("a", 65)]
    assert vq.in_flight == {} and vq.free_count == 8
    assert vq.violations == []
    assert vq.reap() == []


@pytest.mark.parametrize("kind", KINDS)
def test_full_queue_raises_library_error(memory: GuestMemory, kind: str) -> None:
    vq, _ = make(kind, memory, 4)
    buf = memory.alloc(16)
    vq.add([(buf, 1), (buf, 1)], [(buf, 1)], 0)
    with pytest.raises(VirtqueueError, match="free"):
        vq.add([(buf, 1)], [(buf, 1)], 1)
    with pytest.raises(VirtqueueError, match="at least one"):
        vq.add([], [], 2)


def run_rounds(vq: SplitVirtqueue | PackedVirtqueue, dev: Device, memory: GuestMemory,
               rng: random.Random, requests: int, *, max_bufs: int = 3) -> list[int]:
    """Submit ``requests`` requests in random batches; the device completes random subsets in
    random order; returns the tokens in the order the driver reaped them."""
    bufs = [memory.alloc(512) for _ in range(max_bufs)]
    held: list[Chain] = []  # popped by the device, not completed yet
    reaped: list[int] = []
    token = 0
    while len(reaped) < requests:
        # driver: add as many as fit (random batch), publish once
        for _ in range(rng.randint(0, 4)):
            nbuf = rng.randint(1, max_bufs)
            if token >= requests or vq.free_count < (1 if vq.indirect and nbuf > 1 else nbuf):
                break
            vq.add([(bufs[i], 32) for i in range(nbuf - 1)], [(bufs[-1], 100)], token)
            token += 1
        vq.publish()
        # device: pop, then complete a random subset in random order
        held += dev.pop()
        rng.shuffle(held)
        k = rng.randint(0, len(held)) if token < requests else len(held)
        for chain in held[:k]:
            dev.complete(chain, 100)
        del held[:k]
        for tok, length in vq.reap():
            assert length == 100
            assert isinstance(tok, int)
            reaped.append(tok)
    return reaped


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("indirect", [False, True])
def test_many_rounds_wrap_around_every_request_completes_once(
    memory: GuestMemory, kind: str, event_idx: bool, indirect: bool
) -> None:
    size = 8 if kind == "split" else 7  # packed sizes need not be powers of 2
    vq, dev = make(kind, memory, size, event_idx=event_idx, indirect=indirect)
    reaped = run_rounds(vq, dev, memory, random.Random(1), 50 * size)
    assert sorted(reaped) == list(range(50 * size))
    assert vq.violations == [] and vq.in_flight == {} and vq.free_count == size


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(KINDS), size_log=st.integers(0, 5), event_idx=st.booleans(),
       indirect=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_property_random_traffic(kind: str, size_log: int, event_idx: bool, indirect: bool,
                                 seed: int) -> None:
    size = 1 << size_log
    if kind == "packed" and size > 2:
        size -= 1
    with GuestMemory.simple(2 * MiB, regions=3) as mem:
        vq, dev = make(kind, mem, size, event_idx=event_idx, indirect=indirect)
        max_bufs = min(3, size) if not indirect else 3
        reaped = run_rounds(vq, dev, mem, random.Random(seed), 6 * size + 3, max_bufs=max_bufs)
        assert sorted(reaped) == list(range(6 * size + 3))
        assert vq.violations == []


def test_split_indices_run_past_65535(memory: GuestMemory) -> None:
    """avail->idx and used->idx are free-running u16s; they wrap at 2^16 without a hitch."""
    vq, dev = make("split", memory, 4)
    buf = memory.alloc(16)
    for _ in range(70000 // 4):
        for t in range(4):
            vq.add([(buf, 16)], [], t)
        vq.publish()
        for chain in dev.pop():
            dev.complete(chain, 0)
        assert len(vq.reap()) == 4
    assert vq.last_avail_idx == (70000 // 4 * 4) & 0xFFFF
    assert vq.used_idx == vq.last_avail_idx and vq.violations == []


def test_split_event_idx_kick_and_interrupt_suppression(memory: GuestMemory) -> None:
    vq, dev = make("split", memory, 8, event_idx=True)
    assert isinstance(vq, SplitVirtqueue) and isinstance(dev, SplitDevice)
    buf = memory.alloc(16)
    vq.add([(buf, 16)], [], 0)
    vq.publish()
    assert vq.needs_kick()  # avail_event 0 lies in [0, 1)
    assert not vq.needs_kick()  # nothing new since
    chains = dev.pop()  # device writes avail_event = 1
    assert vq.avail_event == 1
    vq.add([(buf, 16)], [], 1)
    vq.publish()
    assert vq.needs_kick()  # avail_event 1 in [1, 2)
    vq.add([(buf, 16)], [], 2)
    vq.publish()
    assert not vq.needs_kick()  # the device has not caught up: 1 not in [2, 3)
    chains += dev.pop()
    # used_event: the driver asks for an interrupt on the next used entry after reaping
    dev.complete(chains[0], 0)
    assert dev.should_interrupt()  # used_event 0 in [0, 1)
    assert vq.reap() == [(0, 0)]
    dev.complete(chains[1], 0)
    assert dev.should_interrupt()  # the driver moved used_event to 1
    vq.set_no_interrupt(True)
    assert vq.reap() == [(1, 0)]
    dev.complete(chains[2], 0)
    assert not dev.should_interrupt()  # used_event stayed at 1 while disabled
    vq.set_used_event(2)
    dev.notified_at = 2
    assert vq.reap() == [(2, 0)]


def test_split_no_event_idx_uses_flags(memory: GuestMemory) -> None:
    vq, dev = make("split", memory, 8)
    assert isinstance(vq, SplitVirtqueue) and isinstance(dev, SplitDevice)
    buf = memory.alloc(16)
    vq.add([(buf, 16)], [], 0)
    vq.publish()
    assert vq.needs_kick()
    dev.set_no_notify(True)
    assert vq.used_flags == 1
    vq.add([(buf, 16)], [], 1)
    vq.publish()
    assert not vq.needs_kick()
    chains = dev.pop()
    dev.complete(chains[0], 0)
    assert dev.should_interrupt()
    vq.set_no_interrupt(True)
    dev.complete(chains[1], 0)
    assert not dev.should_interrupt()
    vq.set_no_interrupt(False)
    assert [t for t, _ in vq.reap()] == [0, 1]


def test_packed_event_suppression(memory: GuestMemory) -> None:
    vq, dev = make("packed", memory, 4, event_idx=True)
    assert isinstance(vq, PackedVirtqueue) and isinstance(dev, PackedDevice)
    buf = memory.alloc(16)
    # driver event: DESC at used index 0, wrap 1 (interrupt on the first used descriptor)
    assert dev.driver_event_state() == (1 << 15, 2)
    vq.add([(buf, 16)], [], 0)
    vq.publish()
    assert vq.needs_kick()  # device event ENABLE (zeroed)
    dev.set_event(1)  # DISABLE
    vq.add([(buf, 16)], [], 1)
    vq.publish()
    assert not vq.needs_kick()
    dev.set_event(2, 3 | 1 << 15)  # DESC: notify when descriptor 3 (wrap 1) is made available
    vq.add([(buf, 16)], [], 2)
    vq.publish()
    assert not vq.needs_kick()  # published index 2 only
    vq.add([(buf, 16)], [], 3)
    vq.publish()
    assert vq.needs_kick()  # index 3 now available
    for chain in dev.pop():
        dev.complete(chain, 0)
    assert [t for t, _ in vq.reap()] == [0, 1, 2, 3]
    assert vq.last_used_idx == 0 and vq.used_wrap_counter == 0
    assert dev.driver_event_state() == (0, 2)  # next used at 0 in wrap phase 0
    # a DESC event in the previous wrap phase: driver wrap is 0 now, event for index 1 wrap 0
    dev.set_event(2, 1)
    vq.add([(buf, 16)], [], 4)
    vq.publish()
    assert not vq.needs_kick()
    vq.add([(buf, 16)], [], 5)
    vq.publish()
    assert vq.needs_kick()
    vq.set_no_interrupt(True)
    assert dev.driver_event_state()[1] == 1
    vq.set_no_interrupt(False)
    assert dev.driver_event_state()[1] == 2


def test_packed_wrap_counters_and_vring_base(memory: GuestMemory) -> None:
    vq, dev = make("packed", memory, 5)
    assert isinstance(vq, PackedVirtqueue)
    assert vq.vring_base() == (1 << 15) | (1 << 31)  # both wrap counters start at 1
    buf = memory.alloc(16)
    vq.add([(buf, 1), (buf, 1)], [(buf, 1)], "a")  # 3 slots
    vq.add([(buf, 1), (buf, 1)], [], "b")  # 2 slots: the ring is full, driver wraps to 0
    assert vq.next_avail_idx == 0 and vq.avail_wrap_counter == 0
    vq.publish()
    chains = dev.pop()
    assert [c.slots for c in chains] == [3, 2]
    assert vq.used_idx_in_memory() == (0 | 1 << 15) * 0x10001
    dev.complete(chains[1], 0)  # completes "b" first: written at used index 0, skips 2
    assert vq.used_idx_in_memory() == (2 | 1 << 15) * 0x10001
    assert vq.reap() == [("b", 0)]
    assert vq.last_used_idx == 2 and vq.free_count == 2
    dev.complete(chains[0], 0)
    assert vq.reap() == [("a", 0)]
    assert vq.last_used_idx == 0 and vq.used_wrap_counter == 0
    assert vq.vring_base() == 0  # idx 0, both wrap counters 0
    assert vq.used_idx_in_memory() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_device_violations_are_recorded_not_raised(memory: GuestMemory, kind: str) -> None:
    vq, dev = make(kind, memory, 8)
    buf = memory.alloc(64)
    vq.add([(buf, 16)], [(buf, 8)], "a")
    vq.add([(buf, 16)], [(buf, 8)], "b")
    vq.publish()
    chains = dev.pop()
    dev.complete(chains[0], 9)  # len beyond the 8 writable bytes
    dev.complete(chains[0], 0)  # the same buffer used twice
    assert vq.reap() == [("a", 9)]
    whats = [v.what for v in vq.violations]
    assert any("exceeds" in w for w in whats)
    assert any("not in flight" in w for w in whats)
    assert all(v.queue == 0 and v.clause.startswith("VIRTIO") for v in vq.violations)
    assert "expected" in str(vq.violations[0])


def test_split_out_of_range_id_and_idx_jump(memory: GuestMemory) -> None:
    vq, dev = make("split", memory, 8)
    assert isinstance(vq, SplitVirtqueue) and isinstance(dev, SplitDevice)
    buf = memory.alloc(64)
    vq.add([(buf, 16)], [], "a")
    vq.publish()
    dev.pop()
    dev.push(77, 0)
    assert vq.reap() == []
    assert "out of range" in vq.violations[0].what
    memory.write(vq.used_gpa + 2, U16.pack(dev.used_idx + 100))
    vq.reap()
    assert "more entries than the queue holds" in vq.violations[1].what


def test_used_idx_is_zeroed_even_on_dirty_memory() -> None:
    with GuestMemory.simple(MiB) as mem:
        mem.fill(0, MiB, 0xFF)
        vq = SplitVirtqueue(mem, 0, 16)
        assert mem.read(vq.used_gpa, 6 + 8 * 16) == bytes(6 + 8 * 16)
        assert vq.used_idx_in_memory() == 0
        assert mem.read(vq.avail_gpa, 4) == bytes(4)


@pytest.mark.parametrize("kind", KINDS)
def test_vring_addr_carries_user_addresses(memory: GuestMemory, kind: str) -> None:
    vq, _ = make(kind, memory, 8)
    addr = vq.vring_addr()
    assert isinstance(addr, VringAddr) and addr.index == 0 and addr.flags == 0
    for uaddr in (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr):
        assert memory.uaddr_to_gpa(uaddr) != uaddr
    assert memory.uaddr_to_gpa(addr.desc_user_addr) == vq.desc_gpa
    used_gpa = memory.uaddr_to_gpa(addr.used_user_addr)
    assert addr.log_guest_addr == used_gpa  # QEMU sends the used ring's GPA
    gpa = vq.vring_addr(1, 0x1234, gpa_addresses=True)
    assert gpa.desc_user_addr == vq.desc_gpa and gpa.flags == 1 and gpa.log_guest_addr == 0x1234


def test_split_layout_alignment_and_sizes(memory: GuestMemory) -> None:
    vq = SplitVirtqueue(memory, 3, 256)
    assert vq.desc_gpa % 16 == 0 and vq.avail_gpa % 2 == 0 and vq.used_gpa % 4 == 0
    assert vq.vring_base() == 0 and vq.index == 3
    with pytest.raises(VirtqueueError, match="power of 2"):
        SplitVirtqueue(memory, 0, 12)
    with pytest.raises(VirtqueueError, match="out of range"):
        PackedVirtqueue(memory, 0, 40000)


def test_split_raw_access_builds_hostile_chains(memory: GuestMemory) -> None:
    vq, dev = make("split", memory, 8)
    assert isinstance(vq, SplitVirtqueue) and isinstance(dev, SplitDevice)
    d = vq.take_descriptors(2)
    assert vq.free_count == 6
    vq.write_desc(d[0], 0x1000, 16, F_NEXT, d[1])
    vq.write_desc(d[1], 0x2000, 1, F_WRITE | F_NEXT, 9)  # next out of range
    vq.push_avail(d[0], "hostile", chain=d)
    vq.push_avail(200)  # a head out of range, untracked
    vq.publish()
    assert dev.avail_idx() == 2
    raw = DESC.unpack(memory.read(vq.desc_gpa + 16 * d[1], 16))
    assert raw == (0x2000, 1, F_WRITE | F_NEXT, 9)
    assert dev.u16(vq.avail_gpa + 6) == 200
    vq.set_avail_idx(1000)  # jump by more than the queue size
    assert dev.avail_idx() == 1000 and vq.last_avail_idx == 1000
    dev.push(d[0], 1)
    assert vq.reap() == [("hostile", 1)]
    assert vq.free_count == 8
    with pytest.raises(VirtqueueError):
        vq.write_desc(8, 0, 0, 0, 0)


def test_packed_raw_access(memory: GuestMemory) -> None:
    vq, dev = make("packed", memory, 4)
    assert isinstance(vq, PackedVirtqueue) and isinstance(dev, PackedDevice)
    vq.write_desc(0, 0x3000, 8, vq.avail_flags() | F_WRITE, 2)
    vq.push_avail(2, "raw", writable=8)
    chains = dev.pop()
    assert [(c.head, c.elems) for c in chains] == [(2, [(0x3000, 8, True)])]
    dev.complete(chains[0], 8)
    assert vq.reap() == [("raw", 8)]
    vq.set_avail_idx(3 | 0 << 15)
    assert vq.next_avail_idx == 3 and vq.avail_wrap_counter == 0


def test_packed_publish_hold_first_and_flags(memory: GuestMemory) -> None:
    """publish(hold_first=True) exposes the later heads only; write_flags / ring_bytes touch
    one entry's flags and read its 16 bytes."""
    vq, dev = make("packed", memory, 8)
    assert isinstance(vq, PackedVirtqueue) and isinstance(dev, PackedDevice)
    vq.add([(0x3000, 16)], [(0x3100, 1)], "first")
    vq.add([(0x3200, 16)], [(0x3300, 1)], "second")
    vq.publish(hold_first=True)
    assert struct.unpack_from("<H", vq.ring_bytes(0), 14)[0] == 0  # head 0 not written
    assert struct.unpack_from("<H", vq.ring_bytes(2), 14)[0] & (1 << 7)  # head 2 available
    vq.write_flags(0, 1)
    assert vq.ring_bytes(0)[14:] == b"\x01\x00" and dev.pop() == []
    vq.publish()  # the held head
    assert [c.head for c in dev.pop()] == [0, 1]
    with pytest.raises(VirtqueueError):
        vq.write_flags(8, 0)
    with pytest.raises(VirtqueueError):
        vq.ring_bytes(-1)


@pytest.mark.parametrize("kind", KINDS)
def test_micro_benchmark_32_requests(memory: GuestMemory, kind: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """add + publish + needs_kick + reap of 32 requests (3 descriptors each); the device side
    is a minimal used-ring writer outside the timed part. Prints the figure; asserts only that
    everything completed."""
    vq, dev = make(kind, memory, 128)
    hdr, data, status = memory.alloc(16), memory.alloc(4096), memory.alloc(1)
    rounds = 200
    driver_time = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(32):
            vq.add([(hdr, 16)], [(data, 4096), (status, 1)], i)
        vq.publish()
        vq.needs_kick()
        t1 = time.perf_counter()
        for chain in dev.pop():
            dev.complete(chain, 4097)
        t2 = time.perf_counter()
        got = vq.reap()
        t3 = time.perf_counter()
        assert len(got) == 32
        driver_time += (t1 - t0) + (t3 - t2)
    per_request_us = driver_time / (rounds * 32) * 1e6
    with capsys.disabled():
        print(f"\n[{kind}] driver add+publish+kick-check+reap: {per_request_us:.2f} us/request "
              f"({1 / (per_request_us * 1e-6):,.0f} requests/s driver-side)")
    assert vq.violations == []


@pytest.mark.parametrize("kind", KINDS)
def test_vring_base_of_a_fresh_queue_ignores_buffers_published_before_start(
    memory: GuestMemory, kind: str
) -> None:
    """TEST-IDEAS #12 (kick before enable): buffers published before the ring starts must
    still be processed, so the base sent is the ring's start, not the driver's avail index."""
    vq, dev = make(kind, memory, 8)
    fresh = 0 if kind == "split" else (1 << 15) * 0x10001
    assert vq.vring_base() == fresh
    buf = memory.alloc(16)
    vq.add([(buf, 16)], [], 0)
    vq.add([(buf, 16)], [], 1)
    vq.publish()
    assert vq.vring_base() == fresh
    for chain in dev.pop():
        dev.complete(chain, 0)
    drained = 2 if kind == "split" else (2 | 1 << 15) * 0x10001
    assert vq.vring_base() == drained  # everything used: base == the driver's avail position
    vq.reap()
    assert vq.vring_base() == drained


@pytest.mark.parametrize("kind", KINDS)
def test_used_idx_matches_the_low_half_of_used_idx_in_memory(memory: GuestMemory,
                                                             kind: str) -> None:
    vq, dev = make(kind, memory, 4)
    buf = memory.alloc(16)
    for round_ in range(5):  # across wrap-arounds
        vq.add([(buf, 16)], [], round_)
        vq.add([(buf, 16)], [], round_)
        vq.publish()
        chains = dev.pop()
        assert vq.used_idx_in_memory() & 0xFFFF == vq.used_idx
        dev.complete(chains[0], 0)
        assert vq.used_idx_in_memory() & 0xFFFF != vq.used_idx  # something new
        dev.complete(chains[1], 0)
        assert len(vq.reap()) == 2
        assert vq.used_idx_in_memory() & 0xFFFF == vq.used_idx


@pytest.mark.parametrize("kind", KINDS)
def test_add_indirect_takes_a_caller_built_table(memory: GuestMemory, kind: str) -> None:
    vq, dev = make(kind, memory, 4)
    header, data, status = memory.alloc(16), memory.alloc(512), memory.alloc(1)
    table = memory.alloc(3 * 16, 16)
    if kind == "split":
        descs = [DESC.pack(header, 16, F_NEXT, 1), DESC.pack(data, 512, F_NEXT | F_WRITE, 2),
                 DESC.pack(status, 1, F_WRITE, 3)]
    else:  # packed table entries: addr, len, id, flags (no chaining)
        descs = [DESC.pack(header, 16, 0, 0), DESC.pack(data, 512, 0, F_WRITE),
                 DESC.pack(status, 1, 0, F_WRITE)]
    memory.write(table, b"".join(descs))
    heads = [vq.add_indirect(table, 3, 513, f"t{i}") for i in range(4)]
    assert len(set(heads)) == 4 and vq.free_count == 0
    with pytest.raises(VirtqueueError, match="free"):
        vq.add_indirect(table, 3, 513, "one too many")
    assert dev.pop() == []  # nothing visible before publish
    vq.publish()
    chains = dev.pop()
    assert [c.head for c in chains] == heads
    for chain in chains:
        assert chain.indirect and chain.slots == 1
        assert chain.elems == [(header, 16, False), (data, 512, True), (status, 1, True)]
    for chain in reversed(chains):
        dev.complete(chain, 513)
    assert vq.reap() == [(f"t{i}", 513) for i in (3, 2, 1, 0)]
    assert vq.in_flight == {} and vq.free_count == 4 and vq.violations == []
    # a len beyond the writable bytes the caller declared is the device's violation
    vq.add_indirect(table, 3, 513, "x")
    vq.publish()
    [chain] = dev.pop()
    dev.complete(chain, 514)
    assert vq.reap() == [("x", 514)]
    clause = "VIRTIO 1.x 2.7.8.2" if kind == "split" else "VIRTIO 1.x 2.8.6"
    assert [(v.clause, v.seen) for v in vq.violations] == [(clause, "len 514")]


def test_split_reap_batch_across_the_ring_end_keeps_the_device_order(
        memory: GuestMemory) -> None:
    vq, dev = make("split", memory, 8)
    buf = memory.alloc(64)
    for round_ in range(5):  # used entries 0..5, then batches that wrap at 8
        tokens = [f"r{round_}-{i}" for i in range(6)]
        for t in tokens:
            vq.add([], [(buf + 16, 8)], t)
        vq.publish()
        chains = dev.pop()
        order = [3, 0, 5, 1, 4, 2]
        for k in order:
            dev.complete(chains[k], k)
        assert vq.reap() == [(tokens[k], k) for k in order]
        assert vq.free_count == 8 and vq.violations == []
    assert vq.used_idx == 30


@pytest.mark.parametrize("kind", KINDS)
def test_add_indirect_many_is_all_or_none(memory: GuestMemory, kind: str) -> None:
    vq, dev = make(kind, memory, 4)
    status = memory.alloc(1)
    table = memory.alloc(16, 16)
    entry = (DESC.pack(status, 1, F_WRITE, 0) if kind == "split"
             else DESC.pack(status, 1, 0, F_WRITE))
    memory.write(table, entry)
    vq.add_indirect(table, 1, 1, "first")
    with pytest.raises(VirtqueueError, match="4 "):
        vq.add_indirect_many([table] * 4, 1, 1, ["a", "b", "c", "d"])
    with pytest.raises(VirtqueueError, match="tables for"):
        vq.add_indirect_many([table], 1, 1, ["a", "b"])
    assert vq.free_count == 3 and len(vq.in_flight) == 1  # nothing of the failed calls
    heads = vq.add_indirect_many([table] * 3, 1, 1, ["a", "b", "c"])
    assert len(set(heads)) == 3 and vq.free_count == 0
    vq.publish()
    chains = dev.pop()
    assert [c.head for c in chains][1:] == heads
    assert all(c.elems == [(status, 1, True)] and c.indirect for c in chains)
    for chain in chains:
        dev.complete(chain, 1)
    assert vq.reap() == [("first", 1), ("a", 1), ("b", 1), ("c", 1)]
    assert vq.free_count == 4 and vq.violations == []
