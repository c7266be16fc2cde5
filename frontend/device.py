"""A front-end session: QEMU's connect, start and stop sequences against one back-end.

The message order follows what QEMU 11.1.3 sends to a vhost-user-blk back-end (recorded in
shared/docs/QEMU-TRACES.md, scenarios (a)-(e); SPEC-DIGEST 4.1-4.4) as the profile
``qemu-11.1``; ``qemu-7.2`` replays the older order (no kick injection, no STATUS messages);
``qemu-next`` tracks a proposal (protocol bit 23, GET_VRING_BASE_SKIP_DRAIN: frontend.sequences).

A :class:`Session` owns the vring eventfds and the in-flight region it received (it keeps
the region across reconnects, as QEMU does: SPEC-DIGEST 4.5); guest memory and the channel
are given to it. It never interprets the region: :mod:`.inflight` does that.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from vhost_conformance.frontend.blk import BlkCompletion, BlkDriver, BlkRequest, ModelDisk
from vhost_conformance.frontend.channel import BackendChannel, Channel
from vhost_conformance.frontend.errors import BackendHang
from vhost_conformance.frontend.errors import SessionError as SessionError
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.protocol import (
    U64,
    VRING_F_LOG,
    BlkFeature,
    Config,
    FrontendRequest,
    Inflight,
    LogBase,
    MemoryTable,
    Message,
    ProtocolFeature,
    SingleMemoryRegion,
    VirtioFeature,
    VringAddr,
    VringState,
    has,
)
from vhost_conformance.frontend.sequences import (
    GET_CONFIG_LEN,
    SEQUENCES,
    STATUS_FEATURES_OK,
    Run,
    Steps,
)
from vhost_conformance.frontend.sequences import (
    QEMU_PROTOCOL_MASK as QEMU_PROTOCOL_MASK,
)
from vhost_conformance.frontend.virtqueue import PackedVirtqueue, SplitVirtqueue, Virtqueue

F = FrontendRequest

#: Guest-visible virtio-blk features a Linux guest driver acks when offered
#: (drivers/block/virtio_blk.c feature table; MQ only with more than one queue), among those
#: QEMU 11.1.3's vhost-user-blk-pci shows the guest. Not SIZE_MAX: QEMU does not offer it to
#: the guest, so it never reaches SET_FEATURES (found by the qemu tier's fidelity check on
#: qsd 7.2, which offers bit 1: QEMU acked 0x170006e44, the emulation 0x170006e46;
#: docs/SPEC-NOTES.md "SIZE_MAX never acked").
GUEST_BLK_FEATURES = (
    BlkFeature.SEG_MAX,
    BlkFeature.GEOMETRY,
    BlkFeature.RO,
    BlkFeature.BLK_SIZE,
    BlkFeature.FLUSH,
    BlkFeature.TOPOLOGY,
    BlkFeature.CONFIG_WCE,
    BlkFeature.DISCARD,
    BlkFeature.WRITE_ZEROES,
)

QEMU_BLK_CONFIG_LEN = GET_CONFIG_LEN


@dataclass(frozen=True, slots=True)
class Profile:
    """The knobs in which QEMU releases differ, as seen by a back-end."""

    name: str
    #: write 1 to the kick eventfd after SET_VRING_KICK (QEMU-TRACES correction 5).
    inject_kick: bool
    #: GET_STATUS/SET_STATUS when STATUS (16) is negotiated (QEMU-TRACES correction 12).
    use_status: bool
    #: GET_CONFIG at connect (only at realize; a reconnect does not send it).
    config_len: int
    #: knows protocol bit 23 and message 45, GET_VRING_BASE_SKIP_DRAIN (not a release).
    skip_drain: bool = False
    #: what an unreleased profile follows (None: a QEMU release as traced).
    proposal: str | None = None


#: The proposal the ``qemu-next`` profile follows (docs/SPEC-NOTES.md "qemu-next").
QEMU_NEXT_SOURCE = (
    "PROPOSAL, not a QEMU release: p-b-o/qemu-ci docs/interop/vhost-user.rst "
    "b82b5c8c547fb49b30f60e2b3e8cae565cbf6e66 (bit 23 GET_VRING_BASE_SKIP_DRAIN, message 45); "
    "mst/qemu next 1276e6c85dcc, e58f08ccbbe5, c2f4030c42da (2026-09-11)"
)

PROFILES: dict[str, Profile] = {
    "qemu-11.1": Profile("qemu-11.1", inject_kick=True, use_status=True,
                         config_len=GET_CONFIG_LEN),
    "qemu-7.2": Profile("qemu-7.2", inject_kick=False, use_status=False,
                        config_len=GET_CONFIG_LEN),
    "qemu-next": Profile("qemu-next", inject_kick=True, use_status=True,
                         config_len=GET_CONFIG_LEN, skip_drain=True, proposal=QEMU_NEXT_SOURCE),
}


@dataclass
class InflightHandle:
    """The in-flight region's fd and mapping the front-end holds (GET_INFLIGHT_FD reply or migrated
    bytes). Parsing it is :mod:`vhost_conformance.frontend.inflight`'s job."""

    fd: int
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    map: mmap.mmap

    @classmethod
    def from_fd(
        cls, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int
    ) -> InflightHandle:
        """Map a region received from the back-end (takes ownership of ``fd``)."""
        m = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                      offset=mmap_offset)
        return cls(fd, mmap_size, mmap_offset, num_queues, queue_size, m)

    @classmethod
    def from_bytes(cls, data: bytes, num_queues: int, queue_size: int) -> InflightHandle:
        """A fresh memfd loaded with ``data`` (a migration destination: SPEC-DIGEST 6.3)."""
        fd = os.memfd_create("vc-inflight-dst", os.MFD_CLOEXEC)
        os.ftruncate(fd, len(data))
        m = mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        m[:] = data
        return cls(fd, len(data), 0, num_queues, queue_size, m)

    def read(self) -> bytes:
        """The region's bytes as they are now."""
        return bytes(self.map)

    def close(self) -> None:
        """Unmap and close the fd."""
        if not self.map.closed:
            self.map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Queue:
    """One virtqueue of the session with its notifiers."""

    index: int
    vq: Virtqueue
    kick_fd: int
    call_fd: int
    err_fd: int
    blk: BlkDriver
    started: bool = False


@dataclass
class Negotiated:
    """What the connect sequence learned and agreed."""

    features: int = 0
    protocol_features_offered: int = 0
    protocol_features: int = 0
    queue_num: int | None = None
    max_mem_slots: int | None = None
    config: bytes = b""
    acked_features: int = 0
    status: int | None = None
    extra: dict[str, object] = field(default_factory=dict)


class Session:
    """One vhost-user connection driven the way QEMU drives vhost-user-blk."""

    def __init__(
        self,
        channel: Channel,
        memory: GuestMemory,
        *,
        profile: str = "qemu-11.1",
        num_queues: int = 1,
        queue_size: int = 128,
        packed: bool = False,
        event_idx: bool = True,
        indirect: bool = True,
        inflight_migration: bool = True,
        model: ModelDisk | None = None,
        timeout: float = 5.0,
        device_type: str = "block",
    ) -> None:
        if profile not in PROFILES:
            raise SessionError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
        self.channel = channel
        self.memory = memory
        self.profile = PROFILES[profile]
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.packed = packed
        self.event_idx = event_idx
        self.indirect = indirect
        self.inflight_migration = inflight_migration
        self.model = model
        self.timeout = timeout
        #: the device type whose guest driver :meth:`driver_features` models: ``block`` acks
        #: the virtio-blk bits a Linux guest acks; another type acks no device bit (its bit
        #: numbers mean other features: VIRTIO 1.3 5.1.3, 5.11.3)
        self.device_type = device_type
        if channel.trace.device_type is None:  # a case's traces already carry the probed type
            channel.trace.device_type = device_type
        self.negotiated = Negotiated()
        self.queues: list[Queue] = []
        self.inflight: InflightHandle | None = None
        self.backend_channel: BackendChannel | None = None
        self.started = False
        self._mem_sent = False
        self._start_features = 0

    # ------------------------------------------------------------------ helpers
    def call(
        self,
        request: FrontendRequest,
        payload: object | None = None,
        *,
        fds: Sequence[int] = (),
        need_reply: bool = False,
    ) -> Message | None:
        """Send one request and wait for what the protocol says comes back."""
        return self.channel.call(request, payload, fds=fds, need_reply=need_reply,  # type: ignore[arg-type]
                                 timeout=self.timeout)

    def _u64(self, request: FrontendRequest) -> int:
        reply = self.call(request)
        assert reply is not None
        return U64.decode(reply.payload).value

    @property
    def reply_ack(self) -> bool:
        """REPLY_ACK negotiated: QEMU then sets NEED_REPLY on its fixed set of messages."""
        return has(self.negotiated.protocol_features, ProtocolFeature.REPLY_ACK)

    def has_protocol(self, bit: int) -> bool:
        """True when protocol feature ``bit`` was negotiated."""
        return has(self.negotiated.protocol_features, bit)

    @property
    def skip_drain_agreed(self) -> bool:
        """Bit 23 (GET_VRING_BASE_SKIP_DRAIN, the ``qemu-next`` proposal) negotiated."""
        return self.profile.skip_drain and self.has_protocol(
            ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN)

    # ------------------------------------------------------------------ connect
    def connect(self, *, realize: bool = True, begin: str | None = None,
                until: str | None = None, without: Sequence[str] = ()) -> Negotiated:
        """vhost_dev_init and the realize's GET_CONFIG: the profile's connect sequence
        (``frontend.sequences.CONNECT``) or part of it (``begin``/``until``/``without`` step
        names, as for the start).

        ``realize=False`` is a reconnect: QEMU then does not send GET_CONFIG.
        """
        seq = SEQUENCES[self.profile.name].connect
        seq.run(self, Run(realize=realize), seq.select(begin=begin, until=until,
                                                       without=without))
        return self.negotiated

    def open_backend_channel(self) -> None:
        """SET_BACKEND_REQ_FD: make the back-end channel and hand the back-end its end."""
        self.backend_channel = BackendChannel(trace=self.channel.trace)
        self.call(F.SET_BACKEND_REQ_FD, fds=[self.backend_channel.peer_fd()],
                  need_reply=self.reply_ack)

    def make_queues(self) -> None:
        """The session's queues (rings, drivers, eventfds), once: a reconnect keeps them."""
        if self.queues:
            return
        for i in range(self.num_queues):
            vq: Virtqueue
            if self.packed:
                vq = PackedVirtqueue(self.memory, i, self.queue_size, event_idx=self.event_idx,
                                     indirect=self.indirect)
            else:
                vq = SplitVirtqueue(self.memory, i, self.queue_size, event_idx=self.event_idx,
                                    indirect=self.indirect)
            blk = BlkDriver(vq, self.memory, model=self.model)
            self.queues.append(
                Queue(i, vq, os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
                      os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
                      os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), blk)
            )

    def driver_features(self) -> int:
        """The features a Linux guest would ack, plus bit 30 (QEMU re-adds it); device bits
        only for a block device (``device_type``)."""
        offered = self.negotiated.features
        want = 0
        if self.device_type == "block":
            for bit in GUEST_BLK_FEATURES:
                want |= 1 << bit
            if self.num_queues > 1:
                want |= 1 << BlkFeature.MQ
        want |= 1 << VirtioFeature.VERSION_1
        if self.indirect:
            want |= 1 << VirtioFeature.RING_INDIRECT_DESC
        if self.event_idx:
            want |= 1 << VirtioFeature.RING_EVENT_IDX
        if self.packed:
            want |= 1 << VirtioFeature.RING_PACKED
        want |= 1 << VirtioFeature.PROTOCOL_FEATURES
        return offered & want

    # ------------------------------------------------------------------ start
    def _status(self, add: int) -> None:
        if not (self.profile.use_status and self.has_protocol(ProtocolFeature.STATUS)):
            return
        current = self._u64(F.GET_STATUS)
        self.negotiated.status = current
        if current & add != add:
            self.call(F.SET_STATUS, U64(current | add))
            self.negotiated.status = current | add

    def set_features(self, features: int) -> None:
        """SET_FEATURES (NEED_REPLY only with LOG_ALL: QEMU-TRACES correction 2)."""
        log = has(features, VirtioFeature.LOG_ALL)
        self.call(F.SET_FEATURES, U64(features), need_reply=log and self.reply_ack)
        self.negotiated.acked_features = features

    def start(
        self,
        *,
        vring_bases: Sequence[int] | None = None,
        inflight: InflightHandle | None = None,
        features: int | None = None,
    ) -> None:
        """vhost_user_blk_start (SPEC-DIGEST 4.2 as corrected by QEMU-TRACES (a)-(e)).

        ``vring_bases``: SET_VRING_BASE values (default: each queue's current avail index, 0
        on a fresh boot). ``inflight``: a region to hand over with SET_INFLIGHT_FD instead of
        asking GET_INFLIGHT_FD (a migration destination); after a reconnect the session's own
        region is reused the same way.
        """
        self.run_start(vring_bases=vring_bases, inflight=inflight, features=features)

    @property
    def sequences(self) -> tuple[Steps, Steps]:
        """This profile's (start, stop) sequences (frontend.sequences)."""
        seqs = SEQUENCES[self.profile.name]
        return seqs.start, seqs.stop

    def run_start(
        self,
        *,
        vring_bases: Sequence[int] | None = None,
        inflight: InflightHandle | None = None,
        features: int | None = None,
        begin: str | None = None,
        until: str | None = None,
        without: Sequence[str] = (),
    ) -> None:
        """Run the profile's start sequence or part of it (``begin``/``until`` step names,
        inclusive; ``without`` steps left out: frontend.sequences). The session counts as
        started once the last step ran. A part that begins later continues a part that
        stopped earlier (same features)."""
        seq = self.sequences[0]
        steps = seq.select(begin=begin, until=until, without=without)
        if self.started:
            raise SessionError("start() on a started session")
        if begin is None:
            feats = self.driver_features() if features is None else features
            self._start_features = feats
        else:
            feats = self._start_features if features is None else features
        if inflight is not None:
            if self.inflight is not None and self.inflight is not inflight:
                self.inflight.close()
            self.inflight = inflight
        seq.run(self, Run(feats, vring_bases), steps)
        if until is None or until == seq.names[-1]:
            self.started = True

    def _apply_ring_features(self, features: int) -> None:
        """Use indirect descriptors and EVENT_IDX only when ``features`` has them: a driver
        must not use a feature the device did not offer (VIRTIO 1.x 2.7.5.3.1, 2.7.7.1)."""
        for q in self.queues:
            indirect = self.indirect and has(features, VirtioFeature.RING_INDIRECT_DESC)
            event_idx = self.event_idx and has(features, VirtioFeature.RING_EVENT_IDX)
            q.vq.indirect = indirect
            if q.vq.event_idx != event_idx:
                q.vq.event_idx = event_idx
                # rewrite the driver's suppression area for the mode now in use
                q.vq.set_no_interrupt(False)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """SET_VRING_ENABLE, synchronous as QEMU makes it (ack, or a GET_FEATURES barrier)."""
        self.call(F.SET_VRING_ENABLE, VringState(index, 1 if enable else 0),
                  need_reply=self.reply_ack)
        if not self.reply_ack:
            self._u64(F.GET_FEATURES)

    def send_memory(self) -> None:
        """ADD_MEM_REG per region with CONFIGURE_MEM_SLOTS, else one SET_MEM_TABLE."""
        regions = self.memory.memory_regions()
        fds = self.memory.fds()
        if self.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            if self._mem_sent:
                return
            for region, fd in zip(regions, fds, strict=True):
                self.call(F.ADD_MEM_REG, SingleMemoryRegion(region), fds=[fd],
                          need_reply=self.reply_ack)
        else:
            self.call(F.SET_MEM_TABLE, MemoryTable(tuple(regions)), fds=fds,
                      need_reply=self.reply_ack)
        self._mem_sent = True

    def get_inflight_fd(self) -> InflightHandle | None:
        """GET_INFLIGHT_FD (num_queues, queue_size); keeps the region (none if size 0)."""
        reply = self.call(F.GET_INFLIGHT_FD, Inflight(0, 0, self.num_queues, self.queue_size))
        assert reply is not None
        info = Inflight.decode(reply.payload)
        if info.mmap_size == 0:
            for fd in reply.fds:
                os.close(fd)
            return None
        if len(reply.fds) != 1:
            for fd in reply.fds:
                os.close(fd)
            raise SessionError(f"GET_INFLIGHT_FD reply carried {len(reply.fds)} fds, expected 1")
        self.inflight = InflightHandle.from_fd(reply.fds[0], info.mmap_size, info.mmap_offset,
                                               self.num_queues, self.queue_size)
        return self.inflight

    def set_inflight_fd(self, region: InflightHandle) -> None:
        """SET_INFLIGHT_FD with the region's fd (no NEED_REPLY: QEMU-TRACES correction 2)."""
        self.call(F.SET_INFLIGHT_FD,
                  Inflight(region.mmap_size, region.mmap_offset, region.num_queues,
                           region.queue_size),
                  fds=[region.fd])

    # ------------------------------------------------------------------ stop
    def stop(self, *, skip_drain: bool = False) -> list[int]:
        """vhost_user_blk_stop: SET_VRING_ENABLE 0 per queue, GET_VRING_BASE per queue,
        SET_STATUS 0. Returns the GET_VRING_BASE ``num`` of each queue. ``skip_drain``: a
        ``qemu-next`` stop sends GET_VRING_BASE_SKIP_DRAIN instead where bit 23 was agreed."""
        return self.run_stop(skip_drain=skip_drain)

    def run_stop(self, *, begin: str | None = None, until: str | None = None,
                 without: Sequence[str] = (), skip_drain: bool = False,
                 round_trips: list[float] | None = None,
                 after: Mapping[str, Callable[[], object]] | None = None) -> list[int]:
        """Run the profile's stop sequence or part of it; returns the GET_VRING_BASE ``num``
        of each queue it asked (``round_trips`` gets each GET_VRING_BASE's round trip;
        ``after``: step name -> what runs once the step is done, as ``Steps.run``). The
        session is no longer started afterwards."""
        seq = self.sequences[1]
        steps = seq.select(begin=begin, until=until, without=without)
        if not self.started and begin is None:
            raise SessionError("stop() on a session that is not started")
        if skip_drain and not self.profile.skip_drain:
            raise SessionError(f"profile {self.profile.name} has no GET_VRING_BASE_SKIP_DRAIN")
        run = Run(skip_drain=skip_drain)
        seq.run(self, run, steps, after)
        self.started = False
        if round_trips is not None:
            round_trips.extend(run.round_trips)
        return run.bases

    def mark_stopped(self) -> None:
        """The back-end stopped the rings by other means (RESET_DEVICE, GET_VRING_BASE sent
        raw, a ring the driver no longer tracks): no clean stop sequence is owed."""
        self.started = False
        for q in self.queues:
            q.started = False

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE(index, num=0): stops the ring, returns the next avail index."""
        reply = self.call(F.GET_VRING_BASE, VringState(index, 0))
        assert reply is not None
        state = VringState.decode(reply.payload)
        self.queues[index].started = False
        return state.num

    def get_vring_base_skip_drain(self, index: int) -> int:
        """GET_VRING_BASE_SKIP_DRAIN(index, num=0), message 45 of the ``qemu-next`` proposal:
        stops the ring without drain, returns the next avail index like GET_VRING_BASE."""
        if not self.profile.skip_drain:
            raise SessionError(f"profile {self.profile.name} has no GET_VRING_BASE_SKIP_DRAIN")
        reply = self.call(F.GET_VRING_BASE_SKIP_DRAIN, VringState(index, 0))
        assert reply is not None
        state = VringState.decode(reply.payload)
        self.queues[index].started = False
        return state.num

    # ------------------------------------------------------------------ logging
    def set_writeback(self, value: int) -> None:
        """The guest toggles the cache mode: SET_CONFIG of wce alone (offset 32, 1 byte, type
        front-end), NEED_REPLY with REPLY_ACK (hw/block/vhost-user-blk.c
        vhost_user_blk_set_config, hw/virtio/vhost-user.c vhost_user_set_config)."""
        self.call(F.SET_CONFIG, Config(32, 1, 0, bytes([value])), need_reply=self.reply_ack)

    def set_log_base(self, log_fd: int, mmap_size: int, *, mmap_offset: int = 0,
                     log_guest_addrs: Sequence[int] | None = None) -> None:
        """SET_LOG_BASE (16-byte payload, one fd, u64 reply with LOG_SHMFD), then
        SET_FEATURES(+LOG_ALL) and SET_VRING_ADDR(F_LOG): QEMU-TRACES correction 3.
        QEMU sends ``mmap_offset`` 0 and each used ring's GPA as log_guest_addr; cases may
        ask for others (``log_guest_addrs``: one per queue)."""
        self.call(F.SET_LOG_BASE, LogBase(mmap_size, mmap_offset), fds=[log_fd])
        self.set_features(self.negotiated.acked_features | (1 << VirtioFeature.LOG_ALL))
        # QEMU 11.1.3's vhost_user_set_features re-adds FEATURES_OK (GET_STATUS; SET_STATUS
        # only when the bit is missing), after the LOG_ALL SET_FEATURES too (proxy trace of
        # VU-QEMU-7: SET_LOG_BASE, SET_FEATURES 0x9, GET_STATUS, SET_VRING_ADDR 0x9)
        self._status(STATUS_FEATURES_OK)
        for q in self.queues:
            addr = q.vq.vring_addr()
            used_gpa = self.memory.uaddr_to_gpa(addr.used_user_addr)
            if log_guest_addrs is not None:
                used_gpa = log_guest_addrs[q.index]
            self.call(F.SET_VRING_ADDR,
                      VringAddr(addr.index, VRING_F_LOG, addr.desc_user_addr,
                                addr.used_user_addr, addr.avail_user_addr, used_gpa),
                      need_reply=self.reply_ack)

    # ------------------------------------------------------------------ data path
    def kick(self, index: int) -> None:
        """Notify the back-end that queue ``index`` has new buffers."""
        os.eventfd_write(self.queues[index].kick_fd, 1)

    def submit(self, index: int) -> None:
        """Publish what was added to queue ``index`` and kick when the ring asks for it."""
        vq = self.queues[index].vq
        vq.publish()
        if vq.needs_kick():
            self.kick(index)

    def wait_used(self, index: int, count: int, *, timeout: float | None = None,
                  on_used: Callable[[list[tuple[object, int]]], None] | None = None
                  ) -> list[tuple[object, int]]:
        """Reap used entries of queue ``index`` until ``count`` arrived or the deadline.

        Waits on the call eventfd (and polls the ring, so a back-end that forgets to notify
        is still seen: the caller checks notifications separately). Returns what arrived;
        fewer than ``count`` means the deadline passed.
        """
        q = self.queues[index]
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        got: list[tuple[object, int]] = []
        poller = select.poll()
        poller.register(q.call_fd, select.POLLIN)
        while len(got) < count:
            used = q.vq.reap()
            if used:
                got.extend(used)
                if on_used is not None:
                    on_used(used)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if poller.poll(min(left, 0.05) * 1000):
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(q.call_fd)
        return got

    def wait_requests(self, requests: Sequence[BlkRequest], *, timeout: float | None = None
                      ) -> list[BlkCompletion]:
        """Wait until every one of ``requests`` completed (any queue); their completions in the
        order given. The one wait for requests: completions of other requests reaped meanwhile
        are kept by their queue's driver (``BlkDriver.unclaimed``) for whoever waits for them
        next. Raises ``BackendHang`` naming how many are missing at the deadline."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        wanted = {r.tag for r in requests}
        done: dict[int, BlkCompletion] = {}
        queues = sorted({r.queue for r in requests})
        for index in queues:
            unclaimed = self.queues[index].blk.unclaimed
            done.update((t, unclaimed.pop(t)) for t in wanted if t in unclaimed)
        while wanted - done.keys():
            for index in queues:
                q = self.queues[index]
                still = [r for r in requests if r.queue == index and r.tag not in done]
                if not still:
                    continue
                left = deadline - time.monotonic()
                for completion in q.blk.complete(
                    self.wait_used(index, len(still), timeout=max(0.0, min(left, 0.05)))
                ):
                    (done if completion.tag in wanted else q.blk.unclaimed)[completion.tag] = (
                        completion
                    )
            if time.monotonic() >= deadline and wanted - done.keys():
                missing = sorted(wanted - done.keys())
                raise BackendHang(
                    f"{len(missing)} of {len(wanted)} requests not completed (tags {missing[:8]})",
                    request_name="virtio-blk I/O",
                    timeout=limit,
                )
        return [done[r.tag] for r in requests]

    def wait_token(self, index: int, token: object, *, what: str,
                   timeout: float | None = None) -> int:
        """Wait until the buffer added with ``token`` (a chain built by hand, not a driver
        request) is used on queue ``index``; returns its used ``len``. Completions of the
        queue's driver reaped meanwhile are kept for whoever waits for them
        (``BlkDriver.unclaimed``). Raises ``BackendHang`` naming ``what`` at the deadline."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        blk = self.queues[index].blk
        while True:
            left = deadline - time.monotonic()
            used = self.wait_used(index, 1, timeout=max(0.0, left))
            for completion in blk.complete(used):
                blk.unclaimed[completion.tag] = completion
            for t, length in used:
                if t is token:
                    return length
            if left <= 0:
                raise BackendHang(f"{what} not completed", request_name="virtio-blk I/O",
                                  timeout=limit)

    def reap_batch(self, index: int, at_least: int, *, timeout: float | None = None
                   ) -> list[tuple[object, int]]:
        """Every used entry of queue ``index`` once at least ``at_least`` arrived (or the
        deadline passed: then what there is, maybe nothing).

        With EVENT_IDX on a split ring the device is asked for one notification, at the
        ``at_least``-th new entry (used_event = used_idx + at_least - 1: VIRTIO 1.x 2.7.10),
        instead of one per entry; the ring is read again after that store, so an entry
        written in between is not waited for. Keep ``at_least`` <= the requests in flight.
        """
        q = self.queues[index]
        vq = q.vq
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        got = vq.reap()
        batched = isinstance(vq, SplitVirtqueue) and vq.event_idx
        while len(got) < at_least:
            if batched:
                assert isinstance(vq, SplitVirtqueue)
                vq.set_used_event(vq.used_idx + at_least - len(got) - 1)
                more = vq.reap()
                if more:
                    got += more
                    continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            readable, _, _ = select.select([q.call_fd], [], [], min(left, 0.05))
            if readable:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(q.call_fd)
            got += vq.reap()
        return got

    def drain_call(self, index: int) -> int:
        """Read and return the call eventfd's counter (0 if not signalled)."""
        try:
            return os.eventfd_read(self.queues[index].call_fd)
        except BlockingIOError:
            return 0

    # ------------------------------------------------------------------ reconnect
    def reattach(self, channel: Channel) -> None:
        """Take a new connection to a restarted back-end, as QEMU's reconnect does
        (QEMU-TRACES (d)): the init messages without GET_CONFIG, then start with the region
        it kept (SET_INFLIGHT_FD, no GET_INFLIGHT_FD) and SET_VRING_BASE = the used index
        (QEMU's stop on the dead socket failed, so last_avail_idx fell back to used idx)."""
        self.channel.close()
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        self.channel = channel
        self.negotiated = Negotiated()
        self.started = False
        self._mem_sent = False
        self.connect(realize=False)
        self.start(vring_bases=[q.vq.used_idx_in_memory() for q in self.queues])

    # ------------------------------------------------------------------ teardown
    def close(self, *, keep_inflight: bool = False) -> None:
        """Close the channel and the notifiers; the region too unless ``keep_inflight``."""
        self.channel.close()
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        for q in self.queues:
            for fd in (q.kick_fd, q.call_fd, q.err_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.queues = []
        if self.inflight is not None and not keep_inflight:
            self.inflight.close()
            self.inflight = None
