"""frontend/migration.py against the reference back-end: live migration between two reference
back-ends on one disk file with 128 requests in flight on a 100 ms disk (with bit 20 the stop
takes milliseconds, without it about the disk latency; every request completes exactly once,
data equals the model, the source writes nothing after its last GET_VRING_BASE reply), and
SIGKILL at every crash point of the reference back-end followed by restart + reconnect."""

from __future__ import annotations

import itertools
import pathlib
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from vhost_conformance.frontend.accounting import Ledger
from vhost_conformance.frontend.blk import SECTOR_SIZE, BlkRequest, ModelDisk
from vhost_conformance.frontend.channel import Channel
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.migration import (
    harvest_all,
    migrate,
    move_guest_ram,
    prepare_destination,
    reconnect,
)
from vhost_conformance.frontend.protocol import ProtocolFeature, has
from vhost_conformance.peers.process import Supervised, spawn

DISK = 16 << 20
TIMEOUT = 10.0
LATENCY_MS = 100
IN_FLIGHT = 128
REQ_SECTORS = 8  # 4 KiB per request


@contextmanager
def reference_backend(sock: pathlib.Path, disk: pathlib.Path, *args: str) -> Iterator[Supervised]:
    """``python -m vhost_conformance.backend`` on ``sock`` serving ``disk``; reaped at exit."""
    sock.unlink(missing_ok=True)
    process = spawn([sys.executable, "-m", "vhost_conformance.backend", "--socket-path",
                     str(sock), "--disk", str(disk), *args],
                    sock.with_name(sock.name + ".log"), name="reference-backend")
    with process:
        process.wait_for_socket(sock, TIMEOUT)
        yield process


def make_disk(path: pathlib.Path, seed: str) -> ModelDisk:
    """A disk file with random content and the model that knows it."""
    data = random.Random(seed).randbytes(DISK)
    path.write_bytes(data)
    model = ModelDisk(DISK)
    model.load(data)
    return model


def read_file(path: pathlib.Path):  # type: ignore[no-untyped-def]
    """``read_at(offset, length)`` over an image file."""
    def read_at(offset: int, length: int) -> bytes:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(length)
    return read_at


def submit_mix(session: Session, ledger: Ledger, n: int, rng: random.Random,
               first_slot: int = 0) -> list[BlkRequest]:
    """``n`` requests on queue 0, half writes half reads, each on its own 4 KiB slot."""
    q = session.queues[0]
    out = []
    for i in range(n):
        sector = (first_slot + i) * REQ_SECTORS
        if i % 2 == 0:
            r = q.blk.write(sector, rng.randbytes(REQ_SECTORS * SECTOR_SIZE))
        else:
            r = q.blk.read(sector, REQ_SECTORS)
        ledger.submit(r, avail_idx=(q.vq.last_avail_idx - 1) & 0xFFFF if not session.packed
                      else None)
        out.append(r)
    session.submit(0)
    return out


def collect(session: Session, ledger: Ledger, count: int, timeout: float = TIMEOUT) -> int:
    """Harvest queue 0 until ``count`` completions were recorded or the deadline passed."""
    q = session.queues[0]
    got = 0
    deadline = time.monotonic() + timeout
    while got < count and time.monotonic() < deadline:
        used = session.wait_used(0, 1, timeout=min(0.2, max(0.0, deadline - time.monotonic())))
        done = q.blk.complete(used)
        ledger.complete(done)
        ledger.absorb_violations(q.vq)
        got += len(done)
    return got


def quiet(session: Session, ledger: Ledger, seconds: float) -> int:
    """Watch queue 0 for ``seconds`` more; anything arriving is recorded (a double shows up as
    a stray used entry)."""
    q = session.queues[0]
    used = session.wait_used(0, 1 << 16, timeout=seconds)
    done = q.blk.complete(used)
    ledger.complete(done)
    ledger.absorb_violations(q.vq)
    return len(used)


MODES = {
    # (source back-end args, session inflight_migration, bit 20 expected)
    "bit20": ((), True, True),
    "backend-no-bit20": (("--no-inflight-migration",), True, False),
    "session-off": ((), False, False),
}


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("mode", list(MODES))
def test_migration_128_in_flight_exactly_once(tmp_path: pathlib.Path, mode: str,
                                              packed: bool) -> None:
    """Reference -> reference on a shared disk file, 128 requests in flight on a 100 ms disk.
    With bit 20 the source suspends (stop in milliseconds, the region marks all 128, the
    destination resubmits them); without it the source drains (stop about the disk latency).
    Either way: exactly once, data equals the model, the source is quiet after its reply."""
    args, inflight_migration, bit20 = MODES[mode]
    image = tmp_path / "disk.img"
    model = make_disk(image, f"mig-{mode}-{packed}")
    ledger = Ledger(model)
    rng = random.Random(f"{mode}{packed}")
    latency = ("--latency", str(LATENCY_MS))
    with (
        reference_backend(tmp_path / "src.sock", image, *latency, *args) as src_proc,
        reference_backend(tmp_path / "dst.sock", image, *latency) as dst_proc,
        GuestMemory.simple(16 << 20, regions=2) as memory,
    ):
        src = Session(Channel.connect(tmp_path / "src.sock", timeout=TIMEOUT), memory,
                      model=model, packed=packed, inflight_migration=inflight_migration,
                      timeout=TIMEOUT)
        result = None
        try:
            src.connect()
            src.start()
            assert has(src.negotiated.protocol_features,
                       ProtocolFeature.GET_VRING_BASE_INFLIGHT) == bit20
            # a first request completes on the source before the stop
            warm = submit_mix(src, ledger, 1, rng, first_slot=IN_FLIGHT + 10)
            assert collect(src, ledger, 1) == 1, warm
            dst = prepare_destination(
                src, Channel.connect(tmp_path / "dst.sock", timeout=TIMEOUT))
            submit_mix(src, ledger, IN_FLIGHT, rng)
            submitted_at = time.monotonic()  # the kick: nothing was popped before
            time.sleep(0.03)  # popped, held by the 100 ms latency
            result = migrate(src, dst, ledger=ledger)
            dst = result.destination
            stop_ms = result.stop.stop_latency * 1e3
            # no request can complete before submitted_at + latency: a drain replies after
            # that, a suspend (normally) long before
            reply_ms = (result.stop.replied_at - submitted_at) * 1e3
            if bit20:
                # GET_VRING_BASE itself takes milliseconds; what completed before it (only
                # possible when the stop came late on a loaded machine) stays on the source
                assert stop_ms < 25, f"suspending GET_VRING_BASE took {stop_ms:.1f} ms"
                n_source = result.completed_on_source_after_stop
                if reply_ms < LATENCY_MS:
                    assert n_source == 0, n_source
                assert result.vmstate is not None and result.inflight_state is not None
                assert result.inflight_state.queue_size == 128
                assert result.region_at_stop is not None
                marked = result.region_at_stop.queues[0].inflight_heads()
                assert len(marked) == IN_FLIGHT - n_source
            else:
                assert 0.9 * LATENCY_MS <= reply_ms < 5000, f"draining stop replied {reply_ms:.1f} " \
                    f"ms after the submission (GET_VRING_BASE {stop_ms:.1f} ms)"
                assert result.vmstate is None
                assert result.completed_on_source_after_stop == IN_FLIGHT
            assert result.region_findings == []
            sent = [e.name for e in dst.channel.trace.entries() if e.direction == "fe->be"]
            # QEMU-TRACES (e): the destination's order
            expected = ["GET_CONFIG", "SET_FEATURES", *(["GET_INFLIGHT_FD"] if not bit20 else []),
                        "SET_INFLIGHT_FD", "SET_VRING_CALL", "SET_FEATURES", "ADD_MEM_REG",
                        "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
                        "SET_VRING_ENABLE"]
            start = sent[sent.index("GET_CONFIG"): sent.index("SET_VRING_ENABLE") + 1]
            # one ADD_MEM_REG per region: compare runs, not counts
            runs = [n for n, _ in itertools.groupby(n for n in start if n in expected)]
            assert runs == expected, start
            # the source after switch-over: ENABLE 0, GET_VRING_BASE, (SET_STATUS 0), nothing more
            src_sent = [e.name for e in src.channel.trace.entries() if e.direction == "fe->be"]
            tail = src_sent[len(src_sent) - src_sent[::-1].index("SET_VRING_ENABLE") - 1:]
            assert tail in (["SET_VRING_ENABLE", "GET_VRING_BASE"],
                            ["SET_VRING_ENABLE", "GET_VRING_BASE", "SET_STATUS"]), tail
            bases = [e.payload for e in dst.channel.trace.entries()
                     if e.direction == "fe->be" and e.name == "SET_VRING_BASE"]
            assert bases == [{"index": 0, "num": result.stop.vring_bases[0]}]
            remaining = IN_FLIGHT - result.completed_on_source_after_stop
            assert collect(dst, ledger, remaining) == remaining
            # the driver continues on the destination: more I/O, including the same slots
            submit_mix(dst, ledger, 16, rng, first_slot=IN_FLIGHT + 20)
            assert collect(dst, ledger, 16) == 16
            assert quiet(dst, ledger, 0.3) == 0
            suspended = result.finish(LATENCY_MS / 1000 * 2)
            assert suspended == [], "\n".join(map(str, suspended))
            findings = ledger.findings()
            assert findings == [], "\n".join(map(str, findings))
            summary = ledger.summary()
            assert summary.exactly_once, summary
            assert summary.completed_per_hop["destination"] == remaining + 16
            assert summary.completed_per_hop["source"] == 1 + IN_FLIGHT - remaining
            print(f"{mode} {'packed' if packed else 'split'}: {result.downtime}; "
                  f"GET_VRING_BASE {stop_ms:.1f} ms; {summary}")
            dst.stop()
            dst.close()
        finally:
            if result is not None:
                result.finish(0)
                result.destination.close()
            else:
                src.close()
        assert src_proc.alive() and dst_proc.alive()
    disk_findings = ledger.check_disk(read_file(image))
    assert disk_findings == [], "\n".join(map(str, disk_findings))


def test_move_guest_ram_keeps_views_and_separates_source(tmp_path: pathlib.Path) -> None:
    """After the move every existing view sees the copy; writes no longer reach the source's
    memfds and the source's bytes stay as they were; the fds handed out are new."""
    with GuestMemory.simple(1 << 20, regions=2, mmap_offset=0x2000) as memory:
        gpa = memory.alloc(4096)
        view = memory.view(gpa, 4096)
        view[:4] = b"abcd"
        old_fds = memory.fds()
        ram = move_guest_ram(memory)
        try:
            assert memory.fds() != old_fds
            assert bytes(view[:4]) == b"abcd"
            view[:4] = b"wxyz"
            assert memory.read(gpa, 4) == b"wxyz"
            snap = dict(ram.snapshot().regions)
            region, off = memory.locate(gpa, 4)
            assert snap[region.guest_phys_addr][off : off + 4] == b"abcd"
        finally:
            ram.close()


CRASH_POINTS = ["after-pop", "after-data", "after-used-elem", "after-used-idx",
                "after-region-update"]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("point", CRASH_POINTS)
@pytest.mark.parametrize("nth", [1, 5])
def test_sigkill_at_crash_point_exactly_once(tmp_path: pathlib.Path, point: str, packed: bool,
                                             nth: int) -> None:
    """16 writes and reads in flight; the back-end SIGKILLs itself when the ``nth`` request
    reaches ``point`` (nth 1: head 0 with used_idx 0, spdk issue 3766); restart on the same
    disk, reconnect with the kept region: every request completes exactly once, the disk
    equals the model."""
    image = tmp_path / "disk.img"
    model = make_disk(image, f"crash-{point}-{packed}-{nth}")
    ledger = Ledger(model)
    rng = random.Random(f"{point}{packed}{nth}")
    sock = tmp_path / "b.sock"
    with GuestMemory.simple(8 << 20) as memory:
        with reference_backend(sock, image, "--crash-at", f"{point}:{nth}") as proc:
            s = Session(Channel.connect(sock, timeout=TIMEOUT), memory, model=model,
                        packed=packed, timeout=TIMEOUT)
            s.connect()
            s.start()
            reqs = submit_mix(s, ledger, 16, rng)
            assert proc.wait(TIMEOUT) == -9, proc.log_tail()
        try:
            with reference_backend(sock, image) as proc2:
                rec = reconnect(s, Channel.connect(sock, timeout=TIMEOUT), ledger=ledger)
                assert rec.oracle is not None
                if nth == 1 and point == "after-pop":
                    # the first request popped is head/id 0 and used_idx is 0
                    assert reqs[0].head == 0
                    assert 0 in rec.oracle_heads[0], rec.oracle_heads
                left = 16 - rec.harvested_before
                assert collect(s, ledger, left) == left
                assert quiet(s, ledger, 0.3) == 0
                findings = ledger.findings()
                assert findings == [], "\n".join(map(str, findings))
                summary = ledger.summary()
                assert summary.exactly_once, summary
                s.stop()
                assert proc2.alive()
        finally:
            s.close()
    disk_findings = ledger.check_disk(read_file(image))
    assert disk_findings == [], "\n".join(map(str, disk_findings))


@pytest.mark.parametrize("bit20", [True, False], ids=["bit20", "drain"])
def test_migration_two_queues(tmp_path: pathlib.Path, bit20: bool) -> None:
    """Two queues (QEMU-TRACES (c): ENABLE 0 for both, then GET_VRING_BASE for both), 32
    requests in flight on each: one subsection for both queues' regions, a SET_VRING_BASE per
    queue on the destination, exactly once on both queues."""
    image = tmp_path / "disk.img"
    model = make_disk(image, f"mq-{bit20}")
    ledger = Ledger(model)
    rng = random.Random(f"mq{bit20}")
    args = ("--latency", str(LATENCY_MS), "--queues", "2")
    with (
        reference_backend(tmp_path / "src.sock", image, *args),
        reference_backend(tmp_path / "dst.sock", image, *args),
        GuestMemory.simple(16 << 20) as memory,
    ):
        src = Session(Channel.connect(tmp_path / "src.sock", timeout=TIMEOUT), memory,
                      model=model, num_queues=2, inflight_migration=bit20, timeout=TIMEOUT)
        src.connect()
        src.start()
        dst = prepare_destination(src, Channel.connect(tmp_path / "dst.sock", timeout=TIMEOUT))
        held = []
        for qi, q in enumerate(src.queues):
            for i in range(32):
                sector = (qi * 64 + i) * REQ_SECTORS
                r = (q.blk.write(sector, rng.randbytes(REQ_SECTORS * SECTOR_SIZE)) if i % 2
                     else q.blk.read(sector, REQ_SECTORS))
                ledger.submit(r)
                held.append(r)
            src.submit(qi)
        time.sleep(0.03)
        result = migrate(src, dst, ledger=ledger)
        try:
            src_sent = [e.name for e in src.channel.trace.entries() if e.direction == "fe->be"]
            assert src_sent[-5:-1] == ["SET_VRING_ENABLE", "SET_VRING_ENABLE", "GET_VRING_BASE",
                                       "GET_VRING_BASE"], src_sent[-6:]
            assert (result.vmstate is not None) == bit20
            if bit20:
                assert result.inflight_state is not None
                assert result.region_at_stop is not None
                assert [len(q.inflight_heads()) for q in result.region_at_stop.queues] == [32, 32]
            assert result.region_findings == []
            deadline = time.monotonic() + TIMEOUT
            while any(not ledger.completions[r.tag] for r in held) and \
                    time.monotonic() < deadline:
                harvest_all(result.destination, ledger)
                time.sleep(0.005)
            time.sleep(0.3)
            harvest_all(result.destination, ledger)
            assert result.finish(LATENCY_MS / 1000 * 2) == []
            findings = ledger.findings()
            assert findings == [], "\n".join(map(str, findings))
            assert ledger.summary().exactly_once
            bases = [e.payload for e in result.destination.channel.trace.entries()
                     if e.direction == "fe->be" and e.name == "SET_VRING_BASE"]
            assert bases == [{"index": i, "num": n} for i, n in enumerate(result.stop.vring_bases)]
        finally:
            result.finish(0)
            result.destination.close()
    assert ledger.check_disk(read_file(image)) == []


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_sigterm_restart_with_requests_held_exactly_once(tmp_path: pathlib.Path,
                                                         packed: bool) -> None:
    """A graceful restart (SIGTERM) while 32 requests are held on a 100 ms disk: what the
    back-end did not complete before it exited is marked in the region the front-end kept and
    resubmitted by the restarted back-end: exactly once, disk equals the model."""
    image = tmp_path / "disk.img"
    model = make_disk(image, f"term-{packed}")
    ledger = Ledger(model)
    rng = random.Random(f"term{packed}")
    sock = tmp_path / "t.sock"
    latency = ("--latency", str(LATENCY_MS))
    with GuestMemory.simple(8 << 20) as memory:
        with reference_backend(sock, image, *latency) as proc:
            s = Session(Channel.connect(sock, timeout=TIMEOUT), memory, model=model,
                        packed=packed, timeout=TIMEOUT)
            s.connect()
            s.start()
            submit_mix(s, ledger, 32, rng)
            time.sleep(0.03)
            assert proc.terminate() == 0, proc.log_tail()
        try:
            with reference_backend(sock, image, *latency):
                rec = reconnect(s, Channel.connect(sock, timeout=TIMEOUT), ledger=ledger,
                                hop="restart")
                assert len(rec.oracle_heads[0]) == 32 - rec.harvested_before, rec.oracle_heads
                assert collect(s, ledger, 32 - rec.harvested_before) == 32 - rec.harvested_before
                assert quiet(s, ledger, 0.3) == 0
                findings = ledger.findings()
                assert findings == [], "\n".join(map(str, findings))
                s.stop()
        finally:
            s.close()
    assert ledger.check_disk(read_file(image)) == []
