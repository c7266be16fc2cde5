"""Shared helpers of the hostile-guest, malformed and fuzz families (moved from test_hostile_guest.py):
the Rig that runs one back-end for many connections, the Guest on a connection, death and fd checks."""

from __future__ import annotations

import contextlib
import enum
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from vhost_conformance.frontend.blk import SECTOR_SIZE, BlkStatus
from vhost_conformance.frontend.channel import BackendClosed, BackendHang, Channel
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    PackedVirtqueue,
    SplitVirtqueue,
)
from vhost_conformance.reports.model import Verdict
from vhost_conformance.suites.drivers.procfs import process_tree_fds
from vhost_conformance.suites.drivers.settings import env_number
from vhost_conformance.suites.model import (
    CaseFailed,
    CaseHang,
    CaseOutcome,
)
from vhost_conformance.suites.target import BackendTarget, Capabilities, CommandTarget
from vhost_conformance.suites.target_errors import TargetError

NEXT = VIRTQ_DESC_F_NEXT
WRITE = VIRTQ_DESC_F_WRITE
INDIRECT = VIRTQ_DESC_F_INDIRECT

#: Environment variable: hypothesis examples per property-based case.
EXAMPLES_ENV = "VHOST_CONFORMANCE_EXAMPLES"
#: Default examples per property-based case (keeps the default suite fast).
DEFAULT_EXAMPLES = 50
#: Seconds a property-based case may spend shrinking a failure before it reports what it has
#: (``$VHOST_CONFORMANCE_SHRINK_SECONDS`` overrides it).
SHRINK_BUDGET = 30.0
SHRINK_ENV = "VHOST_CONFORMANCE_SHRINK_SECONDS"


def run_seed() -> int:
    """The seed of this run's examples: $VHOST_CONFORMANCE_SEED, else a random one."""
    import os
    import random

    raw = os.environ.get("VHOST_CONFORMANCE_SEED", "")
    return int(raw) if raw.strip().isdigit() else random.SystemRandom().getrandbits(32)


def shrink_seconds() -> float:
    """The shrink budget: ``$VHOST_CONFORMANCE_SHRINK_SECONDS`` or :data:`SHRINK_BUDGET`."""
    raw = os.environ.get(SHRINK_ENV, "").strip()
    try:
        return max(0.0, float(raw)) if raw else SHRINK_BUDGET
    except ValueError:
        raise pytest.UsageError(f"${SHRINK_ENV} must be a number of seconds, got {raw!r}") from None


#: Guest RAM of an example: region 0 for rings and request buffers (the session allocates
#: there), region 1 a small scratch area at a fixed GPA for hand-written chains, ending where
#: nothing is mapped (so "past the region's end" and "unmapped" are well defined).
RAM_SIZE = 4 << 20
#: seconds an error path waits for a dying back-end's exit status (its sockets close first)
DYING_GRACE = 1.0
SCRATCH_GPA = 0x1000_0000
SLOT = 4096
SLOTS = ("hdr", "data", "status", "table0", "table1")
SCRATCH_SIZE = SLOT * len(SLOTS)
#: How long an example waits for the back-end to react to a hostile chain.
SETTLE = 0.25
#: How long a well-formed request on the same queue may take before the queue counts as stopped.
SAME_QUEUE_WAIT = 1.0


def examples_setting(default: int = DEFAULT_EXAMPLES) -> int:
    """Examples per property-based case: ``$VHOST_CONFORMANCE_EXAMPLES`` or ``default``."""
    return env_number(EXAMPLES_ENV, default, int, lambda v: v >= 1, "a positive integer")


class Outcome(enum.Enum):
    """What the back-end did with a hostile chain (every one acceptable; crash/hang are not)."""

    OK = "completed-ok"  # used, status OK: the chain was odd but servable
    IOERR = "ioerr"  # used, status VIRTIO_BLK_S_IOERR
    UNSUPP = "unsupp"  # used, status VIRTIO_BLK_S_UNSUPP
    COMPLETED = "completed"  # used; no status byte to read in this shape
    NEEDS_RESET = "needs-reset"  # error eventfd / config change / queue stopped
    CLOSED = "closed"  # the back-end closed the connection
    IGNORED = "ignored"  # nothing used, the queue still serves well-formed requests


class BackendCrashed(CaseOutcome):
    """The back-end process died during an example (it was restarted for the next one)."""

    verdict = Verdict.CRASH


# --------------------------------------------------------------------------- back-end health


def backend_fds(target: BackendTarget) -> int | None:
    """Open fds of the back-end under test (its whole process tree), None if unknown."""
    pid = getattr(target, "pid", None)
    if not isinstance(pid, int):
        return None
    return process_tree_fds(pid)


def died(target: BackendTarget) -> str | None:
    """A description of the back-end's death (exit status, log tail), None while it lives."""
    if not isinstance(target, CommandTarget):
        return None
    if target.alive():
        return None
    status = target.exit_status()
    if target.stopped_by_us:
        return None
    tail = target.log_tail(12)
    how = f"signal {-status}" if status is not None and status < 0 else f"status {status}"
    return f"the back-end process died ({how}); log tail:\n{tail}"


# --------------------------------------------------------------------------- a guest


@dataclass
class Guest:
    """One example's front-end: guest RAM (ring region + scratch region) and a started session."""

    memory: GuestMemory
    session: Session
    seq: int

    @property
    def vq(self) -> SplitVirtqueue | PackedVirtqueue:
        """Queue 0's driver-side ring."""
        vq = self.session.queues[0].vq
        assert isinstance(vq, SplitVirtqueue | PackedVirtqueue)
        return vq

    def slot(self, name: str) -> int:
        """GPA of scratch slot ``name``."""
        return SCRATCH_GPA + SLOT * SLOTS.index(name)

    @property
    def scratch_end(self) -> int:
        """First GPA after the scratch region: nothing is mapped there."""
        return SCRATCH_GPA + SCRATCH_SIZE

    def good_io(self, timeout: float) -> None:
        """A write and a read-back of 8 sectors on queue 0 (raises CaseFailed/BackendHang)."""
        sector = (self.seq % 512) * 8
        data = bytes((self.seq + i) & 0xFF for i in range(8 * SECTOR_SIZE))
        blk = self.session.queues[0].blk
        write = blk.write(sector, data)
        self.session.submit(0)
        [done] = self.session.wait_requests([write], timeout=timeout)
        if done.status != BlkStatus.OK:
            raise CaseFailed(
                "a well-formed write after the hostile chain", expected="OK", seen=done.status
            )
        read = blk.read(sector, 8)
        self.session.submit(0)
        [back] = self.session.wait_requests([read], timeout=timeout)
        if back.status != BlkStatus.OK or back.data != data:
            raise CaseFailed(
                "a well-formed read-back after the hostile chain",
                expected="status OK and the data written",
                seen=f"status {back.status}",
            )


class Rig:
    """A back-end reused across examples: a fresh connection (and guest) per example; a
    back-end that died is restarted, and the example that killed it is a crash."""

    def __init__(
        self,
        target: BackendTarget,
        capabilities: Capabilities,
        timeout: float,
        *,
        restart: bool = True,
    ) -> None:
        self.target = target
        self.capabilities = capabilities
        self.timeout = timeout
        self.restart = restart
        self.seq = 0
        self.outcomes: dict[str, int] = {}
        self.crashes = 0
        #: hostile submissions so far (none: a failing fresh connection is not their fault)
        self.hostile = 0

    def check_alive(self, grace: float = 0.0) -> None:
        """Raise BackendCrashed (after restarting it, if allowed) when the back-end died.

        ``grace``: on an error path (a reset connection, a missing reply) the back-end may be
        dying: its sockets close before its exit status can be reaped, so wait up to this long
        for it to exit before calling it alive."""
        if grace > 0 and isinstance(self.target, CommandTarget) and self.target.alive():
            self.target.wait_exit(grace)
        death = died(self.target)
        if death is None:
            return
        self.crashes += 1
        if self.restart:
            self.target.restart()
        raise BackendCrashed(death)

    @contextlib.contextmanager
    def guest(self, *, packed: bool) -> Iterator[Guest]:
        """A started session on a fresh connection with a scratch region; the first thing it
        does is a well-formed write/read (so every example checks the previous one's aftermath)."""
        self.seq += 1
        memory = GuestMemory.create([(0, RAM_SIZE), (SCRATCH_GPA, SCRATCH_SIZE)])
        session: Session | None = None
        try:
            try:
                channel = Channel(self.target.connect_socket(self.timeout))
                session = Session(
                    channel, memory, timeout=self.timeout, packed=packed, event_idx=True
                )
                session.connect()
                session.start()
                guest = Guest(memory, session, self.seq)
                guest.good_io(self.timeout)
            except (BackendClosed, BackendHang, OSError, TargetError) as exc:
                # TargetError: the socket refused connections (a back-end restarted after a
                # crash, dead again before it listened): the death is the verdict
                if isinstance(self.target, CommandTarget) and self.hostile:
                    # a back-end dying of the previous shape may not be reapable yet
                    self.target.wait_exit(0.5)
                self.check_alive()
                if not self.hostile:
                    what = "packed" if packed else "split"
                    # the same behaviour VU-RING-9 (packed) / the I/O cases (split) own
                    raise CaseHang(
                        f"before any hostile chain, a well-formed request on a fresh connection "
                        f"({what} ring, QEMU 11.1.3's start) did not complete: the back-end does "
                        f"not serve I/O on a {what} ring at all ({type(exc).__name__}: {exc})",
                        behaviour=f"no-io-on-{what}-ring",
                    ) from None
                if isinstance(exc, BackendHang):
                    raise CaseHang(f"a new connection after the previous example: {exc}") from None
                raise CaseFailed(
                    "a new connection after the previous example does not reach a working "
                    f"state: {type(exc).__name__}: {exc}"
                ) from None
            yield guest
        finally:
            if session is not None:
                with contextlib.suppress(Exception):
                    session.close()
            memory.close()

    def record(self, outcome: Outcome) -> None:
        """Count an outcome."""
        self.outcomes[outcome.value] = self.outcomes.get(outcome.value, 0) + 1

    def final_check(self) -> None:
        """After the last example: the back-end lives and a new connection works."""
        self.check_alive()
        with self.guest(packed=False):
            pass




class ShrinkBudget:
    """Stop spending time once a failure was seen and ``seconds`` passed: later examples pass
    untried, so hypothesis reports the smallest failure found so far."""

    def __init__(self, seconds: float | None = None) -> None:
        """``seconds`` defaults to the setting (:func:`shrink_seconds`)."""
        self.seconds = shrink_seconds() if seconds is None else seconds
        self.first_failure: float | None = None

    def exhausted(self) -> bool:
        """True once the budget after the first failure is spent."""
        return (
            self.first_failure is not None and time.monotonic() - self.first_failure > self.seconds
        )

    def failed(self) -> None:
        """Note a failing example."""
        if self.first_failure is None:
            self.first_failure = time.monotonic()


def unreplayable(
    flaky: Exception, first: tuple[Exception, str] | None, header: str
) -> Exception:
    """What to raise when hypothesis could not replay a failure (``flaky``): the first failure
    as it ran, ``header`` and ``shown`` (its example) added; ``flaky`` itself when none was
    seen. A suite verdict (CaseOutcome) keeps its type; any other exception (BackendClosed,
    OSError...) is re-raised with the example as a note, for the plugin to classify: before,
    it surfaced as hypothesis's Flaky ("Inconsistent data generation"), a suite error."""
    if first is None:
        return flaky
    exc, shown = first
    if isinstance(exc, CaseOutcome):
        return type(exc)(f"{exc.reason}\n{header}{shown}", behaviour=exc.behaviour,
                         finding_level=exc.finding_level)
    exc.add_note(f"{header}{shown}")
    return exc
