"""frontend/accounting.py with synthetic events: the test plays the device by writing used
entries straight into a split ring in guest memory, so the ledger sees exactly what a buggy
back-end would produce (double completion across hops, a lost request, a completion of a head
never made available, wrong data, guest writes and notifications while suspended)."""

from __future__ import annotations

import os
import struct

import pytest
from vhost_conformance.frontend.accounting import (
    Ledger,
    SuspendedState,
    changed_ranges,
    landmarks_of,
)
from vhost_conformance.frontend.blk import (
    SECTOR_SIZE,
    BlkCompletion,
    BlkDriver,
    BlkRequest,
    BlkStatus,
    ModelDisk,
)
from vhost_conformance.frontend.inflight import build_split_region, parse_region
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.virtqueue import SplitVirtqueue

QUEUE_SIZE = 16
DISK = 1 << 20


class FakeDevice:
    """Writes used entries of a split ring the way a device does (no validation)."""

    def __init__(self, memory: GuestMemory, vq: SplitVirtqueue) -> None:
        self.memory = memory
        self.vq = vq
        self.used_idx = 0

    def use(self, head: int, length: int = 1, status: int = BlkStatus.OK,
            request: BlkRequest | None = None, data: bytes | None = None) -> None:
        """Complete ``head``: status byte and data (when a request is given), used elem,
        used->idx + 1."""
        if request is not None:
            if request.status_gpa is not None:
                self.memory.write(request.status_gpa, bytes([status]))
            if data is not None:
                off = 0
                for gpa, n in request.in_data_bufs:
                    self.memory.write(gpa, data[off : off + n])
                    off += n
        slot = self.vq.used_gpa + 4 + 8 * (self.used_idx % self.vq.size)
        self.memory.write(slot, struct.pack("<II", head, length))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.memory.write(self.vq.used_gpa + 2, struct.pack("<H", self.used_idx))


@pytest.fixture
def rig():  # type: ignore[no-untyped-def]
    memory = GuestMemory.simple(4 << 20)
    vq = SplitVirtqueue(memory, 0, QUEUE_SIZE)
    model = ModelDisk(DISK)
    blk = BlkDriver(vq, memory, model=model, data_chunk=64 << 10)
    yield memory, vq, blk, model, FakeDevice(memory, vq)
    memory.close()


def test_exactly_once_has_no_findings(rig) -> None:  # type: ignore[no-untyped-def]
    _memory, vq, blk, model, dev = rig
    ledger = Ledger(model)
    w = blk.write(0, b"\x11" * SECTOR_SIZE)
    r = blk.read(8, 1)
    for req in (w, r):
        ledger.submit(req)
    vq.publish()
    dev.use(w.head, request=w)
    dev.use(r.head, request=r, data=bytes(SECTOR_SIZE), length=SECTOR_SIZE + 1)
    done = ledger.harvest(vq, blk.complete)
    assert [c.tag for c in done] == [w.tag, r.tag]
    assert ledger.findings() == []
    summary = ledger.summary()
    assert summary.exactly_once and summary.completed_per_hop == {"source": 2}
    assert ledger.check_disk(lambda off, n: memory_disk(model, off, n)) == []


def memory_disk(model: ModelDisk, offset: int, length: int) -> bytes:
    """What a disk that did exactly what the model says holds."""
    return model.expected(offset // SECTOR_SIZE, length // SECTOR_SIZE)


def test_lost_request_reported_only_when_final(rig) -> None:  # type: ignore[no-untyped-def]
    _, vq, blk, model, dev = rig
    ledger = Ledger(model)
    a = blk.write(0, b"\x22" * SECTOR_SIZE)
    b = blk.write(1, b"\x33" * SECTOR_SIZE)
    ledger.submit(a)
    ledger.submit(b)
    vq.publish()
    dev.use(a.head, request=a)
    ledger.harvest(vq, blk.complete)
    assert ledger.findings(final=False) == []
    [lost] = ledger.findings()
    assert (lost.kind, lost.tag, lost.queue, lost.head) == ("lost", b.tag, 0, b.head)
    assert "never completed" in lost.what and "OUT sector 1" in lost.what
    assert ledger.summary().lost == 1 and not ledger.summary().exactly_once
    # a write that never completed may have left old or new data: both pass the disk check
    assert ledger.check_disk(lambda off, n: memory_disk(model, off, n)) == []


def test_completion_again_on_destination_names_tag_and_hops(rig) -> None:  # type: ignore[no-untyped-def]
    _, vq, blk, model, dev = rig
    ledger = Ledger(model)
    w = blk.write(4, b"\x44" * SECTOR_SIZE)
    ledger.submit(w)
    vq.publish()
    dev.use(w.head, request=w)
    ledger.harvest(vq, blk.complete)
    ledger.enter("destination")
    # the destination back-end resubmits what the source already completed
    dev.use(w.head, request=w)
    assert ledger.harvest(vq, blk.complete) == []
    [f] = ledger.findings()
    assert f.kind == "completed-again" and f.tag == w.tag and f.head == w.head
    assert "on destination" in f.what and "(on source)" in f.what
    assert ledger.summary().stray == 1


def test_double_completion_recorded_twice(rig) -> None:  # type: ignore[no-untyped-def]
    _, _vq, blk, model, _ = rig
    ledger = Ledger(model)
    w = blk.write(2, b"\x55" * SECTOR_SIZE)
    ledger.submit(w)
    c = BlkCompletion(w, BlkStatus.OK, 1, None)
    ledger.complete([c])
    ledger.enter("restart-1")
    ledger.complete([c])
    [f] = ledger.findings()
    assert f.kind == "double" and f.tag == w.tag
    assert "2 times, on source, then restart-1" in f.what
    assert ledger.summary().double == 1


def test_unknown_head_and_error_status(rig) -> None:  # type: ignore[no-untyped-def]
    _, vq, blk, model, dev = rig
    ledger = Ledger(model)
    w = blk.write(3, b"\x66" * SECTOR_SIZE)
    ledger.submit(w)
    vq.publish()
    dev.use(w.head, request=w, status=BlkStatus.IOERR)
    dev.use(QUEUE_SIZE - 1)  # never made available
    ledger.harvest(vq, blk.complete)
    kinds = {f.kind: f for f in ledger.findings()}
    assert set(kinds) == {"status", "unknown-head"}
    assert kinds["status"].level == "SHOULD" and "IOERR" in kinds["status"].what
    assert kinds["unknown-head"].head == QUEUE_SIZE - 1


def test_read_mismatch_and_disk_mismatch(rig) -> None:  # type: ignore[no-untyped-def]
    _, vq, blk, model, dev = rig
    ledger = Ledger(model)
    w = blk.write(0, b"\x77" * SECTOR_SIZE)
    ledger.submit(w)
    vq.publish()
    dev.use(w.head, request=w)
    ledger.harvest(vq, blk.complete)
    r = blk.read(0, 1)
    ledger.submit(r)
    vq.publish()
    dev.use(r.head, request=r, data=b"\x78" * SECTOR_SIZE, length=SECTOR_SIZE + 1)
    ledger.harvest(vq, blk.complete)
    [f] = ledger.findings()
    assert f.kind == "data" and f.tag == r.tag and "sector 0" in f.what
    disk = bytearray(memory_disk(model, 0, 8 * SECTOR_SIZE))
    disk[10] ^= 1
    [g] = ledger.check_disk(lambda off, n: bytes(disk[off : off + n]))
    assert g.kind == "data" and g.tag == w.tag and "sector 0 on disk" in g.what


def test_oracle_note_on_lost_request(rig) -> None:  # type: ignore[no-untyped-def]
    _, vq, blk, model, _ = rig
    ledger = Ledger(model)
    a = blk.write(0, b"\x01" * SECTOR_SIZE)
    b = blk.write(1, b"\x02" * SECTOR_SIZE)
    ledger.submit(a)
    ledger.submit(b)
    region = parse_region(
        build_split_region(QUEUE_SIZE, 1, entries={0: {a.head: (1, 0, 5)}}),
        num_queues=1, queue_size=QUEUE_SIZE, packed=False)
    ledger.note_oracle(region, [dict(vq.in_flight)])
    found = {f.tag: f for f in ledger.findings()}
    assert "marked in flight in the region after the crash on source" in found[a.tag].where
    assert "not marked" in found[b.tag].where


def test_suspended_state_detects_writes_and_notifications(rig) -> None:  # type: ignore[no-untyped-def]
    memory, vq, blk, _model, dev = rig
    r = blk.read(0, 1)
    vq.publish()
    call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        os.eventfd_write(call_fd, 1)  # before the reply: drained by begin()
        state = SuspendedState.begin(memory, landmarks_of(memory, [(vq, [r])]),
                                     call_fds=[call_fd])
        assert state.compare(memory.snapshot()) == []
        # a late completion: data copied into the guest buffer, used entry, a signal
        dev.use(r.head, request=r, data=b"\x99" * SECTOR_SIZE, length=SECTOR_SIZE + 1)
        os.eventfd_write(call_fd, 1)
        found = state.compare(memory.snapshot())
    finally:
        os.close(call_fd)
    kinds = [f.kind for f in found]
    assert kinds.count("suspended-notify") == 1
    writes = [f for f in found if f.kind == "suspended-write"]
    wheres = " | ".join(f.where for f in writes)
    assert "data buffer of tag" in wheres and "status byte" in wheres and "used ring" in wheres
    assert any(f.tag == r.tag for f in writes)


def test_changed_ranges_exact() -> None:
    with GuestMemory.simple(1 << 16, regions=2) as memory:
        before = memory.snapshot()
        gpa = memory.regions[1].guest_phys_addr + 100
        memory.write(gpa, b"xy")
        assert changed_ranges(before, memory.snapshot()) == [(gpa, 2)]
        assert changed_ranges(before, before) == []


def test_submit_twice_and_unknown_completion_are_misuse(rig) -> None:  # type: ignore[no-untyped-def]
    _, _, blk, model, _ = rig
    ledger = Ledger(model)
    w = blk.write(0, b"\x01" * SECTOR_SIZE)
    ledger.submit(w)
    with pytest.raises(ValueError, match="submitted twice"):
        ledger.submit(w)
    other = blk.write(1, b"\x01" * SECTOR_SIZE)
    with pytest.raises(ValueError, match="never submitted"):
        ledger.complete([BlkCompletion(other, 0, 1, None)])
    with pytest.raises(ValueError, match="ModelDisk"):
        Ledger().check_disk(lambda off, n: b"")
