"""frontend/device: the messages a Session sends are the ones QEMU 11.1.3 sends.

- against qemu-storage-daemon 11.1 (the back-end of the recorded trace), the decoded
  connect + start + stop sequence equals ``boot-io-poweroff-qsd.jsonl`` (QEMU-TRACES (a))
  message by message: names, flags, sizes, fd counts and payloads, with the front-end's own
  user addresses replaced by what they must relate to;
- against the reference back-end (it offers STATUS, INFLIGHT_SHMFD and bit 20): the STATUS
  ordering of QEMU-TRACES correction 12, on first start and after a reconnect, and the
  bit-20 negotiation of (b).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import pathlib
import random
import signal
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from vhost_conformance.frontend.blk import SECTOR_SIZE, ModelDisk
from vhost_conformance.frontend.channel import (
    BackendHang,
    Channel,
    TraceEntry,
    WireTrace,
    describe_payload,
)
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.protocol import Message, ProtocolFeature, has
from vhost_conformance.frontend.sequences import GET_CONFIG_LEN
from vhost_conformance.peers.qsd import FileDisk, create_raw_image, start_qsd

from tests.test_frontend_peers_io import TIMEOUT, need, reference_backend

QEMU_TRACE = pathlib.Path("/work/shared/data/qemu-11.1.3/boot-io-poweroff-qsd.jsonl")
#: The traced guest: 256 MiB of RAM in one region at GPA 0 (QEMU-TRACES (a)).
TRACE_RAM = 256 << 20
#: The traced disk: GET_CONFIG capacity 131072 sectors = 64 MiB.
TRACE_DISK = 64 << 20
#: The traced GET_VRING_BASE reply: 129 requests went through the queue during boot.
TRACE_REQUESTS = 129

#: Fields that hold the front-end's own (user) addresses: they differ from run to run.
_UADDR_FIELDS = ("desc_user_addr", "used_user_addr", "avail_user_addr")


# ------------------------------------------------------------------------------------------
# Normalising a message for comparison


class Regions:
    """The guest RAM regions a connection announced (GPA, size, user address)."""

    def __init__(self) -> None:
        self.regions: list[tuple[int, int, int]] = []

    def add(self, region: dict[str, Any]) -> None:
        self.regions.append(
            (int(region["guest_phys_addr"]), int(region["memory_size"]),
             int(region["userspace_addr"]))
        )

    def uaddr_to_gpa(self, uaddr: int) -> int | None:
        for gpa, size, user in self.regions:
            if user <= uaddr < user + size:
                return gpa + uaddr - user
        return None


def normalise(direction: str, name: str, flags: int, size: int, nfds: int,
              payload: dict[str, Any] | None, regions: Regions) -> str:
    """One line per message. A user address becomes ``uaddr->GPA`` (its GPA under the
    regions announced so far, or ``uaddr->?``); SET_VRING_ADDR's log_guest_addr becomes
    ``=gpa(used)`` when it is the used ring's GPA, as QEMU sends it."""
    body: dict[str, Any] | None = None if payload is None else json.loads(json.dumps(payload))
    if body is not None and name in ("ADD_MEM_REG",) and direction == "fe->be":
        region = body["region"]
        regions.add(region)
        region["userspace_addr"] = "uaddr"
    if body is not None and name == "SET_MEM_TABLE" and direction == "fe->be":
        for region in body["regions"]:
            regions.add(region)
            region["userspace_addr"] = "uaddr"
    if body is not None and name == "SET_VRING_ADDR" and direction == "fe->be":
        used_gpa = regions.uaddr_to_gpa(int(body["used_user_addr"]))
        for key in _UADDR_FIELDS:
            gpa = regions.uaddr_to_gpa(int(body[key]))
            body[key] = "uaddr->?" if gpa is None else "uaddr->GPA"
        if used_gpa is not None and int(body["log_guest_addr"]) == used_gpa:
            body["log_guest_addr"] = "=gpa(used)"
    text = "" if body is None else " " + json.dumps(body, sort_keys=True, separators=(",", ":"))
    return f"{direction} {name} flags={flags:#x} size={size} fds={nfds}{text}"


def qemu_trace_lines(path: pathlib.Path = QEMU_TRACE) -> list[str]:
    """The recorded main-channel messages, decoded by our codec (the ``hex`` payload)."""
    regions = Regions()
    lines = []
    for raw in path.read_text().splitlines():
        entry = json.loads(raw)
        if "dir" not in entry or entry.get("chan") != "main":
            continue
        flags = int(entry["flags"], 16)
        message = Message(int(entry["req"]), flags, bytes.fromhex(entry["hex"]))
        assert len(message.payload) == entry["size"], entry
        payload = describe_payload(message, "main", "block")  # QEMU's vhost-user-blk
        lines.append(normalise(entry["dir"], entry["name"], flags, entry["size"],
                               entry["nfds"], payload, regions))
    return lines


def session_lines(entries: list[TraceEntry]) -> list[str]:
    """Our WireTrace's main-channel messages in the same form."""
    regions = Regions()
    return [
        normalise(e.direction, e.name, e.flags, e.size, e.nfds, e.payload, regions)
        for e in entries
        if e.channel == "main"
    ]


def assert_same_sequence(expected: list[str], seen: list[str], what: str) -> None:
    """Equal line lists, else a unified diff naming the first difference."""
    if expected == seen:
        return
    first = next((i for i, (a, b) in enumerate(zip(expected, seen, strict=False)) if a != b),
                 min(len(expected), len(seen)))
    diff = "\n".join(difflib.unified_diff(expected, seen, "QEMU 11.1.3", what, lineterm="", n=2))
    pytest.fail(f"{what} differs from QEMU 11.1.3 at message {first} "
                f"({len(expected)} vs {len(seen)} messages):\n{diff}")


# ------------------------------------------------------------------------------------------
# The trace comparison


def test_normalise_relates_addresses() -> None:
    """The normalisation itself: a used ring at a user address inside an announced region
    is shown as such; an address outside every region is shown as unknown."""
    regions = Regions()
    add = {"region": {"guest_phys_addr": 0, "memory_size": 0x1000_0000,
                      "userspace_addr": 0x7F00_0000_0000, "mmap_offset": 0}}
    normalise("fe->be", "ADD_MEM_REG", 9, 40, 1, add, regions)
    addr = {"index": 0, "flags": 0, "desc_user_addr": 0x7F00_0000_1000,
            "used_user_addr": 0x7F00_0000_2000, "avail_user_addr": 0x6000_0000_0000,
            "log_guest_addr": 0x2000}
    line = normalise("fe->be", "SET_VRING_ADDR", 1, 40, 0, addr, regions)
    assert '"log_guest_addr":"=gpa(used)"' in line
    assert '"avail_user_addr":"uaddr->?"' in line
    assert '"desc_user_addr":"uaddr->GPA"' in line


def test_qemu_trace_decodes_as_recorded() -> None:
    """Our codec reads the recorded payloads as the recorder did (a few key values)."""
    lines = qemu_trace_lines()
    assert len(lines) == 37
    assert lines[0] == "fe->be GET_FEATURES flags=0x1 size=0 fds=0"
    assert lines[4].startswith("fe->be SET_PROTOCOL_FEATURES")
    assert '"value":36651' in lines[4]  # 0x8f2b
    assert lines[-1].startswith("be->fe GET_VRING_BASE flags=0x5 size=8 fds=0")
    assert '"num":129' in lines[-1]


@pytest.mark.peer("qsd-11.1")
def test_session_sequence_equals_qemu_trace(tmp_path: pathlib.Path) -> None:
    """connect + start + 129 requests + stop against qemu-storage-daemon 11.1 on a 64 MiB
    image, 256 MiB RAM in one region at GPA 0: every main-channel message (both
    directions, guest I/O excluded as it is not on the socket) equals QEMU 11.1.3's."""
    need("qsd-11.1")
    image = create_raw_image(tmp_path / "disk.img", TRACE_DISK)
    model = ModelDisk(TRACE_DISK)
    with (
        start_qsd(tmp_path / "qsd.sock", FileDisk(image), version="11.1") as peer,
        GuestMemory.create([(0, TRACE_RAM)]) as memory,
    ):
        s = Session(Channel.connect(peer.socket, timeout=TIMEOUT, trace=WireTrace()), memory,
                    model=model, profile="qemu-11.1", timeout=TIMEOUT)
        try:
            s.connect()
            s.start()
            q = s.queues[0]
            rng = random.Random(129)
            for i in range(TRACE_REQUESTS):
                if i % 2:
                    q.blk.read(8 * (i - 1), 8)
                else:
                    q.blk.write(8 * i, rng.randbytes(8 * SECTOR_SIZE))
                s.submit(0)
                done = q.blk.complete(s.wait_used(0, 1))
                assert [c.status for c in done] == [0] and not q.blk.mismatches
            assert s.stop() == [TRACE_REQUESTS]
            entries = s.channel.trace.entries()
        finally:
            s.close()
    assert_same_sequence(qemu_trace_lines(), session_lines(entries), "Session vs qsd-11.1")


# ------------------------------------------------------------------------------------------
# STATUS ordering (QEMU-TRACES correction 12) and bit 20 (b), against the reference back-end


def _sent(entries: list[TraceEntry]) -> list[tuple[str, Any]]:
    """The front-end's requests: (name, payload value or (index, num))."""
    out: list[tuple[str, Any]] = []
    for e in entries:
        if e.direction != "fe->be" or e.channel != "main":
            continue
        p = e.payload or {}
        if "index" in p and "num" in p:
            out.append((e.name, (p["index"], p["num"])))
        elif "value" in p:
            out.append((e.name, p["value"]))
        else:
            out.append((e.name, None))
    return out


def _status_replies(entries: list[TraceEntry]) -> list[int]:
    return [int((e.payload or {})["value"]) for e in entries
            if e.direction == "be->fe" and e.name == "GET_STATUS"]


def _start_stop_names(offered: int) -> list[str]:
    """The requests of QEMU 11.1.3's start and stop for one queue (QEMU-TRACES (b) with
    correction 12), from the first SET_FEATURES on."""
    names = ["SET_FEATURES", "GET_STATUS", "SET_STATUS"]
    if has(offered, ProtocolFeature.INFLIGHT_SHMFD):
        names += ["GET_INFLIGHT_FD", "SET_INFLIGHT_FD"]
    names += ["SET_VRING_CALL", "SET_FEATURES", "GET_STATUS",
              "ADD_MEM_REG" if has(offered, ProtocolFeature.CONFIGURE_MEM_SLOTS)
              else "SET_MEM_TABLE",
              "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
              "SET_VRING_ENABLE", "GET_STATUS", "SET_STATUS",
              "SET_VRING_ENABLE", "GET_VRING_BASE", "SET_STATUS"]
    return names


def _check_status_rules(entries: list[TraceEntry], what: str) -> None:
    sent = _sent(entries)
    names = [n for n, _ in sent]
    first = names.index("SET_FEATURES")
    offered = next(int((e.payload or {})["value"]) for e in entries
                   if e.direction == "be->fe" and e.name == "GET_PROTOCOL_FEATURES")
    assert has(offered, ProtocolFeature.STATUS), f"{what}: back-end does not offer STATUS"
    assert names[first:] == _start_stop_names(offered), f"{what}: {names[first:]}"
    # GET_STATUS / SET_STATUS never carry NEED_REPLY, even with REPLY_ACK
    assert {e.flags for e in entries if e.direction == "fe->be"
            and e.name in ("GET_STATUS", "SET_STATUS")} == {0x1}, what
    # reads, then sets only what is missing: 0 -> 0x8 -> (0x8) -> 0xF, then 0 at stop
    assert [v for n, v in sent if n == "SET_STATUS"] == [0x8, 0xF, 0x0], what
    assert _status_replies(entries) == [0x0, 0x8, 0x8], what
    # nothing of a reset
    assert not {"RESET_DEVICE", "RESET_OWNER"} & set(names), what


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_status_ordering_first_start_and_reconnect(tmp_path: pathlib.Path, packed: bool) -> None:
    """Against the reference back-end: the STATUS rules of QEMU-TRACES correction 12 on the
    first connection, and again on the connection after the back-end was SIGKILLed and
    restarted (0 -> 0x8 -> 0xF repeated, SET_INFLIGHT_FD with the kept region)."""
    disk = create_raw_image(tmp_path / "disk.img", 4 << 20)
    sock = tmp_path / "ref.sock"
    model = ModelDisk(4 << 20)
    with GuestMemory.simple(4 << 20) as memory:
        trace1 = WireTrace()
        with reference_backend(sock, disk) as backend:
            s = Session(Channel.connect(sock, timeout=TIMEOUT, trace=trace1), memory,
                        model=model, packed=packed, timeout=TIMEOUT)
            try:
                s.connect()
                s.start()
                q = s.queues[0]
                q.blk.write(0, b"\x5a" * 4096)
                s.submit(0)
                assert [c.status for c in q.blk.complete(s.wait_used(0, 1))] == [0]
                s.stop()
                _check_status_rules(trace1.entries(), "first connection")
                # a new start on the same connection, then the back-end dies
                s.start(vring_bases=[q.vq.vring_base()])
                backend.signal(signal.SIGKILL)
                assert backend.wait(TIMEOUT) == -signal.SIGKILL
            except BaseException:
                s.close()
                raise
        trace2 = WireTrace()
        with reference_backend(sock, disk):
            try:
                s.reattach(Channel.connect(sock, timeout=TIMEOUT, trace=trace2))
                q.blk.read(0, 8)
                s.submit(0)
                done = q.blk.complete(s.wait_used(0, 1))
                assert [c.status for c in done] == [0] and done[0].data == b"\x5a" * 4096
                s.stop()
            finally:
                s.close()
        entries = trace2.entries()
        names = [n for n, _ in _sent(entries)]
        assert "GET_CONFIG" not in names and "GET_INFLIGHT_FD" not in names
        # the reconnect's start has SET_INFLIGHT_FD but no GET_INFLIGHT_FD: the same rules
        # with that one message fewer
        want = _start_stop_names(1 << ProtocolFeature.INFLIGHT_SHMFD
                                 | 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
        want.remove("GET_INFLIGHT_FD")
        first = names.index("SET_FEATURES")
        assert names[first:] == want, names[first:]
        assert [v for n, v in _sent(entries) if n == "SET_STATUS"] == [0x8, 0xF, 0x0]
        assert _status_replies(entries) == [0x0, 0x8, 0x8]


@pytest.mark.parametrize("offer", [True, False], ids=["backend-offers-20", "backend-no-20"])
def test_bit20_negotiation(tmp_path: pathlib.Path, offer: bool) -> None:
    """QEMU-TRACES (b): SET_PROTOCOL_FEATURES keeps bit 20 only with inflight-migration=on
    and a back-end offering it (and bit 12); with it off, nothing else differs."""
    disk = create_raw_image(tmp_path / "disk.img", 1 << 20)
    lines: dict[bool, list[str]] = {}
    for inflight_migration in (True, False):
        sock = tmp_path / f"ref-{inflight_migration}.sock"
        args = () if offer else ("--no-inflight-migration",)
        with reference_backend(sock, disk, *args), GuestMemory.simple(2 << 20) as memory:
            s = Session(Channel.connect(sock, timeout=TIMEOUT), memory,
                        inflight_migration=inflight_migration, timeout=TIMEOUT)
            try:
                n = s.connect()
                s.start()
                s.stop()
                entries = s.channel.trace.entries()
            finally:
                s.close()
        assert has(n.protocol_features_offered, ProtocolFeature.INFLIGHT_SHMFD)
        assert has(n.protocol_features_offered, ProtocolFeature.GET_VRING_BASE_INFLIGHT) == offer
        agreed = dict(_sent(entries))["SET_PROTOCOL_FEATURES"]
        assert has(agreed, ProtocolFeature.GET_VRING_BASE_INFLIGHT) == (
            offer and inflight_migration
        ), f"offer={offer} inflight-migration={inflight_migration}: {agreed:#x}"
        assert agreed & ~(1 << ProtocolFeature.GET_VRING_BASE_INFLIGHT) == (
            n.protocol_features_offered & ~(1 << ProtocolFeature.GET_VRING_BASE_INFLIGHT)
            & ~(1 << ProtocolFeature.XEN_MMAP) & ((1 << 23) - 1)
        )
        names = [name for name, _ in _sent(entries)]
        assert "GET_INFLIGHT_FD" in names and "SET_INFLIGHT_FD" in names
        lines[inflight_migration] = [
            line for line in session_lines(entries) if "SET_PROTOCOL_FEATURES" not in line
        ]
    assert_same_sequence(lines[True], lines[False], "inflight-migration=off")


@contextlib.contextmanager
def started_reference_session(tmp_path: pathlib.Path, packed: bool
                              ) -> Iterator[tuple[Session, GuestMemory]]:
    """A started session on the reference back-end with a 1 MiB disk; closed on exit."""
    disk = create_raw_image(tmp_path / "disk.img", 1 << 20)
    with reference_backend(tmp_path / "ref.sock", disk), GuestMemory.simple(4 << 20) as memory:
        s = Session(Channel.connect(tmp_path / "ref.sock", timeout=TIMEOUT), memory,
                    packed=packed, timeout=TIMEOUT)
        try:
            s.connect()
            s.start()
            yield s, memory
        finally:
            s.close()


# ------------------------------------------------------------------------------------------
# Batched reaping (the data path of bench/iops.py)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_reap_batch_collects_at_least_the_batch(tmp_path: pathlib.Path, packed: bool) -> None:
    """reap_batch waits for the asked number of completions (EVENT_IDX used_event moved
    ahead on split rings), returns all of them, and returns what there is at the deadline."""
    with started_reference_session(tmp_path, packed) as (s, _memory):
        q = s.queues[0]
        for i in range(24):
            q.blk.read(8 * i, 8)
        s.submit(0)
        got: list[tuple[object, int]] = []
        while len(got) < 24:
            more = s.reap_batch(0, min(12, 24 - len(got)), timeout=TIMEOUT)
            assert more, f"nothing within {TIMEOUT} s after {len(got)} of 24"
            got += more
        assert len(got) == 24
        assert [c.status for c in q.blk.complete(got)] == [0] * 24
        t0 = time.monotonic()
        assert s.reap_batch(0, 1, timeout=0.2) == []
        assert 0.15 < time.monotonic() - t0 < 2.0
        assert s.stop() == [q.vq.vring_base() if packed else 24]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_wait_token_keeps_the_drivers_completions(tmp_path: pathlib.Path, packed: bool) -> None:
    """wait_token returns the used len of a hand-added buffer; a driver request completed
    meanwhile is kept for wait_requests; a buffer never made available is a BackendHang."""
    with started_reference_session(tmp_path, packed) as (s, memory):
        q = s.queues[0]
        request = q.blk.read(0, 1)
        scratch = memory.alloc(4096, 4096)
        memory.write(scratch, struct.pack("<IIQ", 0, 0, 8))  # VIRTIO_BLK_T_IN, sector 8
        token = object()
        q.vq.add([(scratch, 16)], [(scratch + 512, 512), (scratch + 16, 1)], token)
        s.submit(0)
        assert s.wait_token(0, token, what="the hand-built read") == 513
        [done] = s.wait_requests([request], timeout=TIMEOUT)
        assert done.status == 0 and done.data == bytes(512)
        q.vq.add([(scratch, 16)], [(scratch + 512, 512), (scratch + 16, 1)], object())
        t0 = time.monotonic()
        with pytest.raises(BackendHang, match="the unpublished read not completed"):
            s.wait_token(0, object(), what="the unpublished read", timeout=0.2)
        assert 0.15 < time.monotonic() - t0 < 2.0


def test_connect_in_parts_sends_what_the_whole_sends(tmp_path: pathlib.Path) -> None:
    """connect(until=...) then connect(begin=...) sends the messages one connect() sends, in
    the same order, and the session starts and does I/O after it."""
    disk = create_raw_image(tmp_path / "disk.img", 1 << 20)
    sent: dict[str, list[str]] = {}
    with reference_backend(tmp_path / "ref.sock", disk):
        for how in ("whole", "parts"):
            with GuestMemory.simple(4 << 20) as memory:
                channel = Channel.connect(tmp_path / "ref.sock", timeout=TIMEOUT)
                s = Session(channel, memory, timeout=TIMEOUT)
                try:
                    if how == "whole":
                        s.connect()
                    else:
                        s.connect(until="SET_OWNER")
                        assert not s.queues and not s.negotiated.config
                        s.connect(begin="GET_FEATURES again")
                    sent[how] = [e.name for e in channel.trace.entries()
                                 if e.direction == "fe->be"]
                    assert len(s.negotiated.config) == GET_CONFIG_LEN
                    s.start()
                    request = s.queues[0].blk.read(0, 1)
                    s.submit(0)
                    [done] = s.wait_requests([request], timeout=TIMEOUT)
                    assert done.status == 0
                finally:
                    s.close()
    assert sent["parts"] == sent["whole"]
    assert sent["whole"][:3] == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES"]


def test_qemu_next_stop_sends_skip_drain_only_where_agreed(tmp_path: pathlib.Path) -> None:
    """The qemu-next profile (a proposal): bit 23 agreed with the reference back-end, a
    skip-drain stop sends GET_VRING_BASE_SKIP_DRAIN (id 45) per queue, a plain stop
    GET_VRING_BASE; the qemu-11.1 profile masks bit 23 off and has no skip-drain stop."""
    from vhost_conformance.frontend.device import SessionError

    disk = create_raw_image(tmp_path / "disk.img", 1 << 20)
    sock = tmp_path / "ref.sock"
    with reference_backend(sock, disk), GuestMemory.simple(2 << 20) as memory:
        s = Session(Channel.connect(sock, timeout=TIMEOUT), memory, profile="qemu-next",
                    timeout=TIMEOUT)
        try:
            s.connect()
            assert s.skip_drain_agreed
            s.start()
            s.stop(skip_drain=True)
            s.start()
            s.stop()
            stops = [n for n, _ in _sent(s.channel.trace.entries()) if n.startswith("GET_VRING")]
        finally:
            s.close()
        assert stops == ["GET_VRING_BASE_SKIP_DRAIN", "GET_VRING_BASE"]
        s = Session(Channel.connect(sock, timeout=TIMEOUT), memory, timeout=TIMEOUT)
        try:
            s.connect()
            assert not s.skip_drain_agreed
            assert not has(s.negotiated.protocol_features, ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN)
            s.start()
            with pytest.raises(SessionError, match="no GET_VRING_BASE_SKIP_DRAIN"):
                s.stop(skip_drain=True)
            s.stop()
        finally:
            s.close()
