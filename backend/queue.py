"""The device side of one virtqueue: its ring phase (one transition table), its vhost-user
state, and the requests taken from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from vhost_conformance.backend.inflight import (
    PackedInflight,
    SplitInflight,
)
from vhost_conformance.backend.vring import Chain, PackedRing, SplitRing
from vhost_conformance.frontend.protocol import (
    FrontendRequest,
)


@dataclass(eq=False, slots=True)
class Request:
    """One request taken from a ring (or resubmitted from the in-flight region)."""

    queue: VirtQueue
    seq: int
    chain: Chain
    #: split: the head descriptor index; packed: the head entry in the in-flight region
    #: (or -1 without a region).
    head: int
    deadline: float = 0.0
    cancelled: bool = False
    executed: bool = False
    written: int = 0
    status: int = 0

    def __lt__(self, other: Request) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)


class RingPhase(Enum):
    """Where a ring is in its life (vhost-user.rst "Ring states": stopped / started; a
    GET_VRING_BASE waiting for the drain; the driver broke it). Enabled / disabled is
    orthogonal to these and kept apart (:attr:`VirtQueue.enabled`).

    A broken ring stays broken through a stop (GET_STATUS keeps DEVICE_NEEDS_RESET) until
    SET_VRING_KICK starts it again, so the broken phases come in the three flavours."""

    STOPPED = "stopped"
    STARTED = "started"
    #: a GET_VRING_BASE waiting for the ring's requests to complete
    DRAINING = "draining"
    #: started and broken: nothing more is taken or completed
    BROKEN = "broken"
    #: broken while a GET_VRING_BASE waits: answered at the next flush
    BROKEN_DRAINING = "broken-draining"
    #: stopped after (or broken while stopped: serve-stopped-ring, complete-after-suspend)
    BROKEN_STOPPED = "broken-stopped"

    @property
    def started(self) -> bool:
        """Started by SET_VRING_KICK and not stopped since (draining and broken included)."""
        return self not in (RingPhase.STOPPED, RingPhase.BROKEN_STOPPED)

    @property
    def draining(self) -> bool:
        """A GET_VRING_BASE waits for the reply."""
        return self in (RingPhase.DRAINING, RingPhase.BROKEN_DRAINING)

    @property
    def broken(self) -> bool:
        """The driver broke the ring (the device needs reset)."""
        return self in (RingPhase.BROKEN, RingPhase.BROKEN_DRAINING, RingPhase.BROKEN_STOPPED)


class RingEvent(Enum):
    """What moves a ring from one :class:`RingPhase` to another."""

    #: SET_VRING_KICK (or process-on-enable's SET_VRING_ENABLE 1) on a stopped ring
    START = "start"
    #: GET_VRING_BASE with requests in flight that it waits for
    DRAIN = "drain"
    #: the GET_VRING_BASE reply is sent: the ring stopped
    STOP = "stop"
    #: the driver broke the ring (bad ring, bad chain, in-flight recovery failed, ...)
    BREAK = "break"
    #: the connection ended
    CLOSE = "close"


_P = RingPhase


_E = RingEvent


#: Every legal (phase, event) -> next phase; any other pair is an internal error.
RING_TRANSITIONS: Mapping[tuple[RingPhase, RingEvent], RingPhase] = {
    (_P.STOPPED, _E.START): _P.STARTED,
    (_P.BROKEN_STOPPED, _E.START): _P.STARTED,
    (_P.STARTED, _E.DRAIN): _P.DRAINING,
    (_P.BROKEN, _E.DRAIN): _P.BROKEN_DRAINING,
    (_P.STARTED, _E.STOP): _P.STOPPED,
    (_P.DRAINING, _E.STOP): _P.STOPPED,
    (_P.BROKEN, _E.STOP): _P.BROKEN_STOPPED,
    (_P.BROKEN_DRAINING, _E.STOP): _P.BROKEN_STOPPED,
    (_P.STOPPED, _E.BREAK): _P.BROKEN_STOPPED,
    (_P.STARTED, _E.BREAK): _P.BROKEN,
    (_P.DRAINING, _E.BREAK): _P.BROKEN_DRAINING,
    (_P.BROKEN, _E.BREAK): _P.BROKEN,
    (_P.BROKEN_DRAINING, _E.BREAK): _P.BROKEN_DRAINING,
    (_P.BROKEN_STOPPED, _E.BREAK): _P.BROKEN_STOPPED,
    (_P.STOPPED, _E.CLOSE): _P.STOPPED,
    (_P.STARTED, _E.CLOSE): _P.STOPPED,
    (_P.DRAINING, _E.CLOSE): _P.STOPPED,
    (_P.BROKEN, _E.CLOSE): _P.BROKEN_STOPPED,
    (_P.BROKEN_DRAINING, _E.CLOSE): _P.BROKEN_STOPPED,
    (_P.BROKEN_STOPPED, _E.CLOSE): _P.BROKEN_STOPPED,
}


class RingTransitionError(RuntimeError):
    """A (phase, event) pair not in :data:`RING_TRANSITIONS`: a bug of the back-end."""


@dataclass(eq=False, slots=True)
class VirtQueue:
    """The device side of one virtqueue and its vhost-user state."""

    index: int
    num: int = 0
    addr_flags: int = 0
    desc_uva: int = 0
    avail_uva: int = 0
    used_uva: int = 0
    log_guest_addr: int = 0
    addr_set: bool = False
    #: split: free-running 16-bit next avail index; packed: ring index of the next entry.
    last_avail_idx: int = 0
    avail_wrap: bool = True
    #: split: free-running 16-bit used->idx shadow; packed: ring index + wrap counter.
    used_idx: int = 0
    used_wrap: bool = True
    phase: RingPhase = RingPhase.STOPPED
    #: SET_VRING_ENABLE's (orthogonal to the phase)
    enabled: bool = False
    #: why the ring is broken (the last _break's reason; None outside the broken phases)
    broken_reason: str | None = None
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    ring: SplitRing | PackedRing | None = None
    inflight: SplitInflight | PackedInflight | None = None
    counter: int = 1
    pending: dict[int, Request] = field(default_factory=dict)
    done: list[Request] = field(default_factory=list)
    resubmit: list[Request] = field(default_factory=list)
    #: the request the stop answers (GET_VRING_BASE, or the proposal's SKIP_DRAIN)
    stop_request: int = FrontendRequest.GET_VRING_BASE
    kicked: bool = False
    #: SET_VRING_KICK came with the NOFD bit: the avail ring is polled, no kick fd
    polled: bool = False
    #: --misbehave serve-stopped-ring: stopped by GET_VRING_BASE, still served
    serve_stopped: bool = False
    #: --misbehave wait-for-first-kick: started, not looked at before a kick
    deaf: bool = False
    #: GET_VRING_BASE stopped this ring so many times on this connection
    stops: int = 0
    #: --misbehave used-idx-latched: used->idx as read at SET_VRING_ADDR
    latched_used: int | None = None

    @property
    def runnable(self) -> bool:
        """Started, enabled, not broken, not stopping: may take new requests."""
        return self.phase is RingPhase.STARTED and self.enabled

    @property
    def started(self) -> bool:
        """The phase is a started one (read-only: :meth:`apply` moves the phase)."""
        return self.phase.started

    def apply(self, event: RingEvent, reason: str | None = None) -> RingPhase:
        """Move to the phase :data:`RING_TRANSITIONS` gives for ``event`` (BREAK records
        ``reason``; a phase that is not broken forgets it). Returns the new phase."""
        new = RING_TRANSITIONS.get((self.phase, event))
        if new is None:
            raise RingTransitionError(
                f"vring {self.index}: no ring transition for event {event.name} in phase "
                f"{self.phase.name}"
            )
        self.phase = new
        if event is RingEvent.BREAK:
            self.broken_reason = reason
        elif not new.broken:
            self.broken_reason = None
        return new
