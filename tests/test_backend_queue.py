"""The ring-state table of the back-end (RingPhase x RingEvent -> RingPhase)."""

from __future__ import annotations

import pytest
from vhost_conformance.backend.queue import (
    RING_TRANSITIONS,
    RingEvent,
    RingPhase,
    RingTransitionError,
    VirtQueue,
)


def test_every_phase_can_break_and_close() -> None:
    """The driver can break a ring in any phase, and a connection can end in any phase."""
    for phase in RingPhase:
        assert RING_TRANSITIONS[(phase, RingEvent.BREAK)].broken
        assert not RING_TRANSITIONS[(phase, RingEvent.CLOSE)].started


def test_a_broken_ring_stays_broken_until_started() -> None:
    q = VirtQueue(0)
    q.apply(RingEvent.START)
    q.apply(RingEvent.BREAK, "bad head")
    assert q.phase is RingPhase.BROKEN and not q.runnable
    q.apply(RingEvent.DRAIN)
    q.apply(RingEvent.STOP)
    assert q.phase is RingPhase.BROKEN_STOPPED and q.broken_reason == "bad head"
    q.apply(RingEvent.START)
    assert q.phase is RingPhase.STARTED and q.broken_reason is None
    q.enabled = True
    assert q.runnable


def test_an_illegal_transition_names_phase_and_event() -> None:
    q = VirtQueue(3)
    with pytest.raises(RingTransitionError, match=r"vring 3: .* STOP in phase STOPPED"):
        q.apply(RingEvent.STOP)
    q.apply(RingEvent.START)
    with pytest.raises(RingTransitionError, match="START in phase STARTED"):
        q.apply(RingEvent.START)
    assert q.phase is RingPhase.STARTED
