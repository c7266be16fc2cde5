"""QEMU's message sequences as data: one definition per front-end profile.

Each sequence (start, stop) is an ordered tuple of named :class:`Step`; a caller runs all of
it or part of it (``until="SET_VRING_ADDR"``, ``begin="SET_VRING_KICK"``, ``without=...``)
through :meth:`vhost_conformance.frontend.device.Session.start` / ``stop``, which keep the
session's state. Steps marked ``per_queue`` that follow each other run queue by queue (QEMU's
start sends NUM, BASE, ADDR, KICK for queue 0, then for queue 1: QEMU-TRACES (c)).

The negotiation rule (what QEMU agrees of a back-end's protocol offer) and the GET_CONFIG
size are defined here once too: :func:`agree_protocol`, :data:`GET_CONFIG_LEN`. The connect
(init) messages are :meth:`Session.connect`; a reconnect is ``Session.reattach`` (connect
without GET_CONFIG, then the start sequence with the kept region).

Sources: shared/docs/QEMU-TRACES.md (a)-(e) and corrections 2, 5, 12 (QEMU 11.1.3 as
recorded); ``qemu-7.2`` has no kick injection and no STATUS messages.

``qemu-next`` TRACKS A PROPOSAL, not a release: QEMU 11.1.3's sequences plus protocol bit 23
``GET_VRING_BASE_SKIP_DRAIN`` and message 45 as the newest indexed vhost-user.rst has them
(p-b-o/qemu-ci docs/interop/vhost-user.rst b82b5c8c547fb49b30f60e2b3e8cae565cbf6e66) and mst's
next branch queued them (1276e6c85dcc "vhost-user: add GET_VRING_BASE_SKIP_DRAIN message",
e58f08ccbbe5, c2f4030c42da; p-b-o/qemu-ci hw/virtio/vhost.c 1040dc581d92
do_vhost_virtqueue_stop: ``skip_drain`` sends message 45 in place of GET_VRING_BASE, per
queue). A stop asked with ``skip_drain`` (QEMU: inflight-migration on and the run state
FINISH_MIGRATE) sends GET_VRING_BASE_SKIP_DRAIN where bit 23 was agreed; every other stop
sends GET_VRING_BASE, which in that text always drains. docs/SPEC-NOTES.md "qemu-next".
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vhost_conformance.frontend.errors import SessionError
from vhost_conformance.frontend.protocol import (
    U64,
    Config,
    FrontendRequest,
    ProtocolFeature,
    VirtioFeature,
    VringState,
    has,
)

if TYPE_CHECKING:
    from vhost_conformance.frontend.device import Queue, Session

F = FrontendRequest

#: virtio status bits (VIRTIO 1.x 2.1).
STATUS_ACKNOWLEDGE = 0x1
STATUS_DRIVER = 0x2
STATUS_DRIVER_OK = 0x4
STATUS_FEATURES_OK = 0x8
STATUS_ALL = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK

#: Protocol features QEMU 11.1.3 knows (VHOST_USER_PROTOCOL_F_MAX = 23: bits 0..22);
#: it masks the back-end's offer with this (SPEC-DIGEST 3.1 "QEMU front-end negotiation").
QEMU_PROTOCOL_MASK = (1 << 23) - 1

#: What the ``qemu-next`` profile knows beyond :data:`QEMU_PROTOCOL_MASK`: bit 23 (proposal).
SKIP_DRAIN_BIT = 1 << ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN

#: config_len QEMU 11.1.3's vhost-user-blk asks with GET_CONFIG: its discard and write-zeroes
#: properties are on by default, so the size table (hw/block/virtio-blk-common.c) gives 57
#: whatever the back-end offers (QEMU-TRACES (a) and correction 6). The session and the
#: capability probe both use this.
GET_CONFIG_LEN = 57


def agree_protocol(offered: int, *, inflight_migration: bool = True,
                   wanted: int | None = None, skip_drain: bool = False) -> int:
    """The protocol features QEMU 11.1.3 sends with SET_PROTOCOL_FEATURES for ``offered``:
    the offer masked with what QEMU knows, XEN_MMAP dropped, bit 20 only with
    inflight-migration=on and bit 12 offered (hw/virtio/vhost-user.c
    vhost_user_backend_init; QEMU-TRACES (b)). ``wanted`` masks the result further (a case
    that negotiates a subset).

    ``skip_drain`` (the ``qemu-next`` profile) knows bit 23 too and agrees it only with bits
    20 and 12 agreed ("must only be negotiated if both ... are also negotiated", the
    proposal's text). [INFERRED] that its gate is the same inflight-migration rule as bit
    20's: the series' vhost-user.c negotiation is not in the index."""
    mask = QEMU_PROTOCOL_MASK | (SKIP_DRAIN_BIT if skip_drain else 0)
    agreed = offered & mask
    agreed &= ~(1 << ProtocolFeature.XEN_MMAP)
    if not (inflight_migration and has(offered, ProtocolFeature.INFLIGHT_SHMFD)):
        agreed &= ~(1 << ProtocolFeature.GET_VRING_BASE_INFLIGHT)
    if not has(agreed, ProtocolFeature.GET_VRING_BASE_INFLIGHT):
        agreed &= ~SKIP_DRAIN_BIT
    if wanted is not None:
        agreed &= wanted
        if not has(agreed, ProtocolFeature.GET_VRING_BASE_INFLIGHT):
            agreed &= ~SKIP_DRAIN_BIT
    return agreed


#: Steps some profiles leave out; naming them in ``without`` is fine on any profile.
OPTIONAL_STEPS = frozenset(
    {"SET_STATUS FEATURES_OK", "GET_STATUS", "inject kick", "SET_STATUS DRIVER_OK", "SET_STATUS 0"}
)


@dataclass
class Run:
    """What one run of a sequence works with and what it gives back."""

    features: int = 0
    vring_bases: Sequence[int] | None = None
    bases: list[int] = field(default_factory=list)
    #: stop without drain (QEMU: a migration's switch-over with inflight-migration on)
    skip_drain: bool = False
    #: each GET_VRING_BASE round trip, in seconds (what a switch-over waits for)
    round_trips: list[float] = field(default_factory=list)
    #: the connect of a device being realized (False: a reconnect, which sends no GET_CONFIG)
    realize: bool = True


@dataclass(frozen=True, slots=True)
class Step:
    """One named step; ``per_queue`` steps take the queue, the others ``None``."""

    name: str
    action: Callable[[Session, Run, Queue | None], None]
    per_queue: bool = False


@dataclass(frozen=True, slots=True)
class Steps:
    """An ordered sequence of steps, run whole or in part."""

    name: str
    steps: tuple[Step, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """The step names in order."""
        return tuple(s.name for s in self.steps)

    def select(self, *, begin: str | None = None, until: str | None = None,
               without: Sequence[str] = ()) -> tuple[Step, ...]:
        """The steps from ``begin`` through ``until`` (inclusive), minus ``without``;
        an unknown name is a ValueError (a typo must not run the whole sequence)."""
        names = self.names
        for n in (begin, until, *(w for w in without if w not in OPTIONAL_STEPS)):
            if n is not None and n not in names:
                raise ValueError(f"{self.name} has no step {n!r}; steps: {', '.join(names)}")
        lo = names.index(begin) if begin is not None else 0
        hi = names.index(until) + 1 if until is not None else len(names)
        return tuple(s for s in self.steps[lo:hi] if s.name not in without)

    def run(self, session: Session, run: Run, steps: Sequence[Step],
            after: Mapping[str, Callable[[], object]] | None = None) -> None:
        """Run ``steps`` (from :meth:`select`) in order; consecutive per-queue steps run
        queue by queue. ``after``: step name -> what runs once that step is done (for a
        per-queue step: done for every queue); a name the sequence lacks is a ValueError
        unless a profile may leave the step out."""
        hooks = dict(after or {})
        for name in hooks:
            if name not in self.names and name not in OPTIONAL_STEPS:
                raise ValueError(f"{self.name} has no step {name!r}; steps: {', '.join(self.names)}")
        i = 0
        while i < len(steps):
            j = i + 1
            if steps[i].per_queue:
                while j < len(steps) and steps[j].per_queue:
                    j += 1
                for q in session.queues:
                    for step in steps[i:j]:
                        step.action(session, run, q)
            else:
                steps[i].action(session, run, None)
            for step in steps[i:j]:
                hook = hooks.get(step.name)
                if hook is not None:
                    hook()
            i = j


# ----------------------------------------------------------------------- connect steps
# vhost_dev_init: the init messages (SPEC-DIGEST 4.1; QEMU-TRACES (a), (d)). The protocol
# steps run only when the first GET_FEATURES offered bit 30, each of the later ones only when
# its protocol feature was agreed.
def _get_features(session: Session, _run: Run, _q: Queue | None) -> None:
    session.negotiated.features = session._u64(F.GET_FEATURES)


def _offers_protocol(session: Session) -> bool:
    return has(session.negotiated.features, VirtioFeature.PROTOCOL_FEATURES)


def _get_protocol_features(session: Session, _run: Run, _q: Queue | None) -> None:
    if _offers_protocol(session):
        session.negotiated.protocol_features_offered = session._u64(F.GET_PROTOCOL_FEATURES)


def _set_protocol_features(session: Session, _run: Run, _q: Queue | None) -> None:
    if not _offers_protocol(session):
        return
    n = session.negotiated
    agreed = agree_protocol(n.protocol_features_offered,
                            inflight_migration=session.inflight_migration,
                            skip_drain=session.profile.skip_drain)
    session.call(F.SET_PROTOCOL_FEATURES, U64(agreed))
    n.protocol_features = agreed
    session.channel.protocol_features = agreed


def _get_queue_num(session: Session, _run: Run, _q: Queue | None) -> None:
    if _offers_protocol(session) and session.has_protocol(ProtocolFeature.MQ):
        n = session.negotiated
        n.queue_num = session._u64(F.GET_QUEUE_NUM)
        if n.queue_num < session.num_queues:
            raise SessionError(
                f"back-end offers {n.queue_num} queues, the session wants {session.num_queues}")


def _get_max_mem_slots(session: Session, _run: Run, _q: Queue | None) -> None:
    if _offers_protocol(session) and session.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
        session.negotiated.max_mem_slots = session._u64(F.GET_MAX_MEM_SLOTS)


def _backend_req_fd(session: Session, _run: Run, _q: Queue | None) -> None:
    if _offers_protocol(session) and session.has_protocol(ProtocolFeature.BACKEND_REQ):
        session.open_backend_channel()


def _set_owner(session: Session, _run: Run, _q: Queue | None) -> None:
    session.call(F.SET_OWNER)


def _make_queues(session: Session, _run: Run, _q: Queue | None) -> None:
    session.make_queues()


def _vring_err(session: Session, _run: Run, q: Queue | None) -> None:
    assert q is not None
    session.call(F.SET_VRING_ERR, U64(q.index), fds=[q.err_fd], need_reply=session.reply_ack)


def _get_config(session: Session, run: Run, _q: Queue | None) -> None:
    if run.realize and session.has_protocol(ProtocolFeature.CONFIG):
        reply = session.call(F.GET_CONFIG, Config.request(0, session.profile.config_len))
        assert reply is not None
        session.negotiated.config = Config.decode(reply.payload).data


# ----------------------------------------------------------------------- start steps
def _set_features(session: Session, run: Run, _q: Queue | None) -> None:
    session._apply_ring_features(run.features)
    session.set_features(run.features)


def _features_ok(session: Session, _run: Run, _q: Queue | None) -> None:
    session._status(STATUS_FEATURES_OK)


def _inflight(session: Session, _run: Run, _q: Queue | None) -> None:
    if session.has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
        if session.inflight is None:
            session.get_inflight_fd()
        if session.inflight is not None:
            session.set_inflight_fd(session.inflight)


def _vring_call(session: Session, _run: Run, q: Queue | None) -> None:
    assert q is not None
    session.call(F.SET_VRING_CALL, U64(q.index), fds=[q.call_fd], need_reply=session.reply_ack)


def _get_status(session: Session, _run: Run, _q: Queue | None) -> None:
    if session.has_protocol(ProtocolFeature.STATUS):
        session.negotiated.status = session._u64(F.GET_STATUS)


def _memory(session: Session, _run: Run, _q: Queue | None) -> None:
    session.send_memory()


def _vring_num(session: Session, _run: Run, q: Queue | None) -> None:
    assert q is not None
    session.call(F.SET_VRING_NUM, VringState(q.index, session.queue_size))


def _vring_base(session: Session, run: Run, q: Queue | None) -> None:
    assert q is not None
    base = run.vring_bases[q.index] if run.vring_bases is not None else q.vq.vring_base()
    session.call(F.SET_VRING_BASE, VringState(q.index, base))


def _vring_addr(session: Session, _run: Run, q: Queue | None) -> None:
    assert q is not None
    session.call(F.SET_VRING_ADDR, q.vq.vring_addr())


def _vring_kick(session: Session, _run: Run, q: Queue | None) -> None:
    assert q is not None
    session.call(F.SET_VRING_KICK, U64(q.index), fds=[q.kick_fd], need_reply=session.reply_ack)
    q.started = True


def _inject_kick(_session: Session, _run: Run, q: Queue | None) -> None:
    assert q is not None
    os.eventfd_write(q.kick_fd, 1)


def _enable(session: Session, run: Run, _q: Queue | None) -> None:
    # SET_VRING_ENABLE only when bit 30 was negotiated (vhost-user.rst "Ring states").
    if has(run.features, VirtioFeature.PROTOCOL_FEATURES):
        for q in session.queues:
            session.set_vring_enable(q.index, True)


def _driver_ok(session: Session, _run: Run, _q: Queue | None) -> None:
    session._status(STATUS_ALL)


# ----------------------------------------------------------------------- stop steps
def _disable(session: Session, _run: Run, _q: Queue | None) -> None:
    if has(session.negotiated.acked_features, VirtioFeature.PROTOCOL_FEATURES):
        for q in session.queues:
            session.set_vring_enable(q.index, False)


def _get_vring_base(session: Session, run: Run, q: Queue | None) -> None:
    assert q is not None
    sent = time.monotonic()
    if run.skip_drain and session.skip_drain_agreed:
        run.bases.append(session.get_vring_base_skip_drain(q.index))
    else:
        run.bases.append(session.get_vring_base(q.index))
    run.round_trips.append(time.monotonic() - sent)


def _reset_status(session: Session, _run: Run, _q: Queue | None) -> None:
    if session.has_protocol(ProtocolFeature.STATUS):
        session.call(F.SET_STATUS, U64(0))
        session.negotiated.status = 0


#: QEMU's connect (vhost_dev_init, then the device's realize asking its config), the same for
#: every profile; "queues" sends nothing (it makes the session's queues and their eventfds).
CONNECT = Steps("connect", (
    Step("GET_FEATURES", _get_features),
    Step("GET_PROTOCOL_FEATURES", _get_protocol_features),
    Step("SET_PROTOCOL_FEATURES", _set_protocol_features),
    Step("GET_QUEUE_NUM", _get_queue_num),
    Step("GET_MAX_MEM_SLOTS", _get_max_mem_slots),
    Step("SET_BACKEND_REQ_FD", _backend_req_fd),
    Step("SET_OWNER", _set_owner),
    Step("GET_FEATURES again", _get_features),
    Step("queues", _make_queues),
    Step("SET_VRING_CALL", _vring_call, per_queue=True),
    Step("SET_VRING_ERR", _vring_err, per_queue=True),
    Step("GET_CONFIG", _get_config),
))


@dataclass(frozen=True, slots=True)
class ProfileSequences:
    """The sequences of one front-end profile."""

    start: Steps
    stop: Steps
    connect: Steps = CONNECT


def _sequences(*, status: bool, inject_kick: bool) -> ProfileSequences:
    def only(flag: bool, *steps: Step) -> tuple[Step, ...]:
        return steps if flag else ()

    start = (
        Step("SET_FEATURES", _set_features),
        *only(status, Step("SET_STATUS FEATURES_OK", _features_ok)),
        Step("SET_INFLIGHT_FD", _inflight),
        Step("SET_VRING_CALL", _vring_call, per_queue=True),
        Step("SET_FEATURES again", _set_features),
        *only(status, Step("GET_STATUS", _get_status)),
        Step("memory", _memory),
        Step("SET_VRING_NUM", _vring_num, per_queue=True),
        Step("SET_VRING_BASE", _vring_base, per_queue=True),
        Step("SET_VRING_ADDR", _vring_addr, per_queue=True),
        Step("SET_VRING_KICK", _vring_kick, per_queue=True),
        *only(inject_kick, Step("inject kick", _inject_kick, per_queue=True)),
        Step("SET_VRING_ENABLE 1", _enable),
        *only(status, Step("SET_STATUS DRIVER_OK", _driver_ok)),
    )
    stop = (
        Step("SET_VRING_ENABLE 0", _disable),
        Step("GET_VRING_BASE", _get_vring_base, per_queue=True),
        *only(status, Step("SET_STATUS 0", _reset_status)),
    )
    return ProfileSequences(Steps("start", start), Steps("stop", stop))


#: The sequences per front-end profile name (frontend.device.PROFILES).
SEQUENCES: dict[str, ProfileSequences] = {
    "qemu-11.1": _sequences(status=True, inject_kick=True),
    "qemu-7.2": _sequences(status=False, inject_kick=False),
    # the proposal: 11.1.3's order; the GET_VRING_BASE step sends message 45 when asked
    "qemu-next": _sequences(status=True, inject_kick=True),
}
