"""Stateful fuzzing: a hypothesis state machine over vhost-user message sequences.

Family fuzz (VU-FUZZ-1). Clause: vhost-user.rst (QEMU 11.1.3) "Communication", "Ring states".

Each example is a sequence of rules on one back-end process (reused; restarted only after it
died, which is a ``crash``): QEMU's init on a fresh connection, then SET_* messages in any
order, rings started, stopped (GET_VRING_BASE, also on rings never started), restarted,
enabled and disabled, GET_CONFIG, in-flight region set-up, reconnects, and I/O in between.
Some rules are slightly invalid (SET_VRING_NUM with a bad size, SET_VRING_ADDR/BASE on a
started ring, a kick before the ring is set up): after one, the back-end may close the
connection or stop the ring. Invariants: the back-end never dies; whatever needs an answer
is answered within the deadline (or the connection is closed); I/O on a ring started by valid
messages only completes, and every read returns what the model disk says.

A failure reports hypothesis's minimal sequence (the ``state.*`` steps) and a
``@reproduce_failure`` blob in the verdict's reason.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any, ClassVar

from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.errors import Flaky, HypothesisException
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from vhost_conformance.frontend.blk import SECTOR_SIZE, ModelDisk
from vhost_conformance.frontend.channel import BackendClosed, BackendHang, Channel
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.protocol import (
    U64,
    Config,
    FrontendRequest,
    ProtocolFeature,
    VringState,
)
from vhost_conformance.suites.clauses import RST
from vhost_conformance.suites.drivers import MakeTarget, capacity_of, pattern, wait_all
from vhost_conformance.suites.drivers.hostile import (
    DYING_GRACE,
    RAM_SIZE,
    Rig,
    ShrinkBudget,
    backend_fds,
    examples_setting,
    run_seed,
    unreplayable,
)
from vhost_conformance.suites.model import (
    MUST,
    CaseFailed,
    CaseHang,
    CaseOutcome,
    case,
    confirm_finding,
)
from vhost_conformance.suites.target import BackendTarget, Capabilities
from vhost_conformance.suites.target_errors import TargetError

F = FrontendRequest
P = ProtocolFeature

#: Rules per example.
STEPS = 18
#: Sectors the I/O rules use (a small window, so reads meet earlier writes).
WINDOW = 64


def _guarded(function: Callable[..., None]) -> Callable[..., None]:
    """A rule body that does nothing once the shrink budget is spent and notes failures."""

    @functools.wraps(function)
    def wrapper(self: MessageMachine, *args: Any, **kwargs: Any) -> None:
        if self.budget.exhausted():
            return
        if self.closed and function.__name__ not in ("connect", "reconnect", "alive"):
            # no preconditions (they would make hypothesis's draws depend on the back-end's
            # timing): a rule on a closed connection does nothing
            return
        shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
        if function.__name__ != "alive":
            self.steps.append(f"state.{function.__name__}({shown})")
            self.calls.append((function.__name__, args, kwargs))
            type(self).last_calls = self.calls
        try:
            function(self, *args, **kwargs)
        except Exception as exc:
            self._note_failure(exc)
            raise
        except BaseException:
            self.budget.failed()
            raise

    return wrapper


#: One rule call of an example: the rule's name, its positional and keyword arguments.
Call = tuple[str, tuple[Any, ...], dict[str, Any]]


class _Closed(Exception):
    """The back-end closed the connection (allowed); the machine must reconnect."""


class MessageMachine(RuleBasedStateMachine):
    """Message sequences against ``rig`` (set as a class attribute before a run)."""

    rig: ClassVar[Rig]
    model: ClassVar[ModelDisk | None] = None
    budget: ClassVar[ShrinkBudget]
    counts: ClassVar[dict[str, int]] = {}
    #: the first failing example (its exception and steps), for failures hypothesis cannot
    #: replay: any exception, not only a CaseOutcome (a BackendClosed or OSError escaping a
    #: rule once made the replay run longer than the first run, and hypothesis's
    #: "Inconsistent data generation" Flaky came out as the case's verdict, a suite error)
    first_failure: ClassVar[tuple[Exception, list[str]] | None] = None
    #: the rule calls (name, args, kwargs) of the first failing and of the latest example:
    #: replayed on a fresh back-end instance before a finding is reported
    first_calls: ClassVar[list[Call]] = []
    last_calls: ClassVar[list[Call]] = []

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[str] = []
        self.calls: list[Call] = []
        self.memory: GuestMemory | None = None
        self.session: Session | None = None
        self.closed = True
        self.reset_state()

    def reset_state(self) -> None:
        """What the front-end knows about queue 0 on the current connection."""
        self.features_set = False
        self.mem_sent = False
        self.num_set = False
        self.addr_set = False
        self.base_set = False
        self.call_set = False
        self.kicked = False
        self.enabled = False
        self.driver_ok = False
        self.inflight_set = False
        self.tainted = False

    # -- plumbing ----------------------------------------------------------------------

    def _note_failure(self, exc: Exception) -> None:
        """Spend the shrink budget from now on; keep the first failure, its steps and calls."""
        if isinstance(exc, HypothesisException):
            return  # hypothesis's own control flow, not the back-end's doing
        self.budget.failed()
        cls = type(self)
        if cls.first_failure is None:
            cls.first_failure = (exc, list(self.steps))
            cls.first_calls = list(self.calls)

    def _count(self, what: str) -> None:
        type(self).counts[what] = type(self).counts.get(what, 0) + 1

    def _close(self) -> None:
        if self.session is not None:
            with contextlib.suppress(Exception):
                self.session.close()
            self.session = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self.closed = True

    def _call(self, request: FrontendRequest, payload: object = None, **kwargs: Any) -> Any:
        """One request through the session; a closed connection is allowed (noted)."""
        assert self.session is not None
        try:
            return self.session.call(request, payload, **kwargs)
        except BackendClosed:
            self._count("closed")
            self._close()
            raise _Closed from None
        except BackendHang as exc:
            self.rig.check_alive(grace=DYING_GRACE)
            raise CaseHang(f"{request.name} not answered: {exc}") from None

    def _do(self, step: Any) -> None:
        with contextlib.suppress(_Closed):
            step()

    @property
    def running(self) -> bool:
        """Queue 0 started (kick) after a valid set-up, and enabled."""
        return (
            not self.closed
            and not self.tainted
            and self.kicked
            and self.enabled
            and self.features_set
            and self.mem_sent
            and self.num_set
            and self.addr_set
            and self.base_set
            and self.call_set
            # with STATUS negotiated the device serves the rings only after DRIVER_OK
            # (VIRTIO 1.3 3.1.1; QEMU-TRACES correction 12: QEMU sets it last in its start)
            and (self.driver_ok or not self._has(P.STATUS))
        )

    def _has(self, bit: int) -> bool:
        return self.session is not None and self.session.has_protocol(bit)

    # -- rules -------------------------------------------------------------------------

    @initialize()
    @_guarded
    def connect(self) -> None:
        """QEMU's init on a fresh connection."""
        self.reconnect()

    @rule()
    @_guarded
    def reconnect(self) -> None:
        """Close and reconnect (QEMU's init again; the disk is kept)."""
        self._close()
        self.reset_state()
        rig = self.rig
        self.memory = GuestMemory.simple(RAM_SIZE)
        try:
            channel = Channel(rig.target.connect_socket(rig.timeout))
            self.session = Session(channel, self.memory, timeout=rig.timeout)
            self.session.connect()
        except BackendHang as exc:
            rig.check_alive(grace=DYING_GRACE)
            raise CaseHang(f"init on a new connection: {exc}") from None
        except (BackendClosed, OSError, TargetError) as exc:
            # TargetError: the socket refuses connections, its back-end dead (a rule's doing)
            rig.check_alive(grace=DYING_GRACE)
            raise CaseFailed(f"init on a new connection failed: {exc}") from None
        if self.model is None:
            type(self).model = ModelDisk(capacity_of(self.session))
        self.session.queues[0].blk.model = self.model
        self.closed = False
        self._count("connections")

    @rule()
    @_guarded
    def set_features(self) -> None:
        """SET_FEATURES with what a Linux guest acks (valid at any time)."""
        assert self.session is not None

        def step() -> None:
            assert self.session is not None
            features = self.session.driver_features()
            self.session._apply_ring_features(features)
            self._call(F.SET_FEATURES, U64(features))
            self.session.negotiated.acked_features = features
            self.features_set = True

        self._do(step)

    @rule()
    @_guarded
    def send_memory(self) -> None:
        """The memory table (ADD_MEM_REG with CONFIGURE_MEM_SLOTS, else SET_MEM_TABLE), once."""
        if self.mem_sent:
            return

        def step() -> None:
            assert self.session is not None
            try:
                self.session.send_memory()
            except BackendClosed:
                self._close()
                raise _Closed from None
            self.mem_sent = True

        self._do(step)

    @rule()
    @_guarded
    def inflight_region(self) -> None:
        """GET_INFLIGHT_FD + SET_INFLIGHT_FD when INFLIGHT_SHMFD was negotiated."""
        assert self.session is not None
        if self.kicked or not self.session.has_protocol(P.INFLIGHT_SHMFD):
            return

        def step() -> None:
            assert self.session is not None
            try:
                region = self.session.inflight or self.session.get_inflight_fd()
                if region is not None:
                    self.session.set_inflight_fd(region)
                self.inflight_set = True
            except BackendClosed:
                self._close()
                raise _Closed from None

        self._do(step)

    @rule(num=st.sampled_from([128, 128, 128, 0, 100, 32769]))
    @_guarded
    def set_vring_num(self, num: int) -> None:
        """SET_VRING_NUM: the queue's size, or (slightly invalid) a bad one, or on a started ring."""
        if num != 128 or self.kicked:
            self.tainted = True

        def step() -> None:
            self._call(F.SET_VRING_NUM, VringState(0, num))
            self.num_set = True

        self._do(step)

    @rule()
    @_guarded
    def set_vring_addr(self) -> None:
        """SET_VRING_ADDR (slightly invalid on a started ring, or before the memory table)."""
        if self.kicked or not self.mem_sent:
            self.tainted = True

        def step() -> None:
            assert self.session is not None
            self._call(F.SET_VRING_ADDR, self.session.queues[0].vq.vring_addr())
            self.addr_set = True

        self._do(step)

    @rule()
    @_guarded
    def set_vring_base(self) -> None:
        """SET_VRING_BASE with the ring's next avail index (slightly invalid when started)."""
        if self.kicked:
            self.tainted = True

        def step() -> None:
            assert self.session is not None
            self._call(F.SET_VRING_BASE, VringState(0, self.session.queues[0].vq.vring_base()))
            self.base_set = True

        self._do(step)

    @rule(which=st.sampled_from([F.SET_VRING_CALL, F.SET_VRING_ERR]))
    @_guarded
    def set_vring_call_or_err(self, which: FrontendRequest) -> None:
        """SET_VRING_CALL / SET_VRING_ERR with the queue's eventfd (valid at any time)."""

        def step() -> None:
            assert self.session is not None
            q = self.session.queues[0]
            fd = q.call_fd if which == F.SET_VRING_CALL else q.err_fd
            self._call(which, U64(0), fds=[fd], need_reply=self.session.reply_ack)
            if which == F.SET_VRING_CALL:
                self.call_set = True

        self._do(step)

    @rule()
    @_guarded
    def set_vring_kick(self) -> None:
        """SET_VRING_KICK: the ring starts (slightly invalid before the ring is set up)."""
        if not (
            self.features_set
            and self.mem_sent
            and self.num_set
            and self.addr_set
            and self.base_set
            and self.call_set
        ):
            self.tainted = True

        def step() -> None:
            assert self.session is not None
            q = self.session.queues[0]
            self._call(F.SET_VRING_KICK, U64(0), fds=[q.kick_fd], need_reply=self.session.reply_ack)
            self.session.kick(0)  # QEMU injects a kick (QEMU-TRACES correction 5)
            self.kicked = True

        self._do(step)

    @rule(enable=st.booleans())
    @_guarded
    def set_vring_enable(self, enable: bool) -> None:
        """SET_VRING_ENABLE 0/1 (valid at any time once bit 30 is negotiated)."""

        def step() -> None:
            assert self.session is not None
            self.session.set_vring_enable(0, enable)
            self.enabled = enable

        try:
            self._do(step)
        except BackendClosed:
            self._close()

    @rule(value=st.sampled_from([0x0, 0x8, 0xF]))
    @_guarded
    def set_status(self, value: int) -> None:
        """SET_STATUS (QEMU: FEATURES_OK after SET_FEATURES, 0xF last in start, 0 at stop)."""
        if not self._has(P.STATUS):
            return
        self._do(lambda: self._call(F.SET_STATUS, U64(value)))
        self.driver_ok = bool(value & 0x4)

    @rule(n=st.integers(1, 4), first=st.integers(0, WINDOW - 8), write=st.booleans())
    @_guarded
    def start_like_qemu(self, n: int, first: int, write: bool) -> None:
        """The rest of QEMU's start in its order (SPEC-DIGEST 4.2): whatever of SET_FEATURES,
        SET_VRING_CALL, memory, SET_VRING_NUM/BASE/ADDR, SET_VRING_KICK (+ injected kick) and
        SET_VRING_ENABLE 1 is missing for queue 0; then I/O if the ring runs."""
        steps: list[tuple[bool, Callable[[], object]]] = [
            (self.features_set, self.set_features),
            (self.inflight_set or self.kicked, self.inflight_region),
            (self.call_set, lambda: self.set_vring_call_or_err(F.SET_VRING_CALL)),
            (self.mem_sent, self.send_memory),
            (self.num_set, lambda: self.set_vring_num(128)),
            (self.base_set or self.kicked, self.set_vring_base),
            (self.addr_set, self.set_vring_addr),
            (self.kicked, self.set_vring_kick),
            (self.enabled, lambda: self.set_vring_enable(True)),
            (self.driver_ok, lambda: self.set_status(0xF)),
        ]
        for done, step in steps:
            if self.closed:
                return
            if not done:
                step()
        self.io(n, first, write)

    @rule()
    @_guarded
    def get_vring_base(self) -> None:
        """GET_VRING_BASE (stops the ring; on a ring never started it must still answer)."""

        def step() -> None:
            reply = self._call(F.GET_VRING_BASE, VringState(0, 0))
            if reply is None or len(reply.payload) != 8:
                raise CaseFailed("GET_VRING_BASE reply", expected="8 bytes", seen=reply)
            # a stopped ring is restarted the way QEMU does it (vhost_virtqueue_start):
            # SET_VRING_CALL, NUM, BASE, ADDR, then KICK; restarting with less is slightly
            # invalid (libvhost-user closes the call fd on GET_VRING_BASE, DPDK forgets the
            # ring addresses)
            self.kicked = False
            self.base_set = self.num_set = self.addr_set = self.call_set = False

        self._do(step)

    @rule()
    @_guarded
    def get_config(self) -> None:
        """GET_CONFIG of the 36-byte base layout when CONFIG was negotiated."""
        assert self.session is not None
        if not self.session.has_protocol(P.CONFIG):
            return
        self._do(lambda: self._call(F.GET_CONFIG, Config.request(0, 36)))

    @rule()
    @_guarded
    def get_features(self) -> None:
        """GET_FEATURES (a barrier QEMU uses)."""
        self._do(lambda: self._call(F.GET_FEATURES))

    @rule(n=st.integers(1, 4), first=st.integers(0, WINDOW - 8), write=st.booleans())
    @_guarded
    def io(self, n: int, first: int, write: bool) -> None:
        """Requests on queue 0 when it runs: each completes OK, reads match the model."""
        if not self.running:
            return
        session = self.session
        assert session is not None
        blk = session.queues[0].blk
        requests = []
        for i in range(n):
            # no two requests of a batch overlap: concurrent overlapping writes may land in
            # any order (VIRTIO orders nothing between requests in flight)
            sector = (first + 8 * i) % (WINDOW - 8)
            if write:
                requests.append(
                    blk.write(sector, pattern(time.monotonic_ns() + i, 8 * SECTOR_SIZE))
                )
            else:
                requests.append(blk.read(sector, 8))
        session.submit(0)
        try:
            done = wait_all(session, requests, timeout=self.rig.timeout)
        except BackendHang as exc:
            self.rig.check_alive(grace=DYING_GRACE)
            raise CaseHang(f"I/O on a ring started by valid messages: {exc}") from None
        for c in done:
            if c.status != 0 or c.mismatches:
                raise CaseFailed(
                    f"{'write' if write else 'read'} at sector {c.request.sector}",
                    expected="status OK and the model's data",
                    seen=f"status {c.status}, {len(c.mismatches)} mismatching sector(s)",
                )
        self._count("io")

    @invariant()
    @_guarded
    def alive(self) -> None:
        """The back-end process lives."""
        self.rig.check_alive()

    def teardown(self) -> None:
        """Close the connection; the back-end must still be alive."""
        self._close()
        try:
            self.rig.check_alive()
        except Exception as exc:
            self._note_failure(exc)
            raise


def _bound_machine(rig: Rig) -> type[MessageMachine]:
    machine: type[MessageMachine] = type("BoundMessageMachine", (MessageMachine,), {})
    machine.rig = rig
    machine.model = None
    machine.budget = ShrinkBudget()
    machine.counts = {}
    machine.first_failure = None
    machine.first_calls = []
    machine.last_calls = []
    return machine


def replay_calls(rig: Rig, calls: list[Call]) -> None:
    """Run one example's rule calls again, in order, on *rig*'s back-end (the invariant after
    each, the teardown at the end): raises the CaseOutcome when the finding reproduces."""
    machine = _bound_machine(rig)()
    try:
        for name, args, kwargs in calls:
            getattr(machine, name)(*args, **kwargs)
            machine.alive()
    finally:
        machine.teardown()


def run_machine(
    rig: Rig,
    examples: int,
    *,
    fresh: Callable[[], Rig] | None = None,
    seed: int | None = None,
) -> dict[str, int]:
    """Run ``examples`` sequences; returns the counts (connections, closes, I/O batches).

    A finding is replayed on ``fresh()`` (a rig on a fresh back-end instance) before it is
    raised: when it does not reproduce there it is ``flaky``, with the sequence and seed."""
    machine = _bound_machine(rig)
    if seed is not None:
        hypothesis_seed(seed)(machine)

    def confirmed(exc: CaseOutcome, calls: list[Call], shown: str) -> CaseOutcome:
        if fresh is None or not calls:
            return exc
        return confirm_finding(
            exc, lambda: replay_calls(fresh(), calls), sequence=shown, seed=seed
        )

    try:
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=examples,
                stateful_step_count=STEPS,
                deadline=None,
                database=None,
                print_blob=True,
                report_multiple_bugs=False,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
            ),
        )
    except CaseOutcome as exc:
        notes = "\n".join(getattr(exc, "__notes__", []))
        shown = type(exc)(f"{exc.reason}\nminimal sequence:\n{notes}",
                          behaviour=exc.behaviour, finding_level=exc.finding_level)
        raise confirmed(shown, list(machine.last_calls), notes) from None
    except Flaky as flaky:
        # the failure depended on the back-end's history (a restart resets it): report the
        # first failing sequence as it ran
        if machine.first_failure is None:
            raise
        first, steps = machine.first_failure
        if not isinstance(first, CaseOutcome):
            header = "sequence as first seen:\n"
            raise unreplayable(flaky, (first, "\n".join(steps)), header) from None
        shown = type(first)(
            f"{first.reason}\nminimal sequence (as first seen; hypothesis could not replay it, "
            "the back-end's state carried over from earlier examples):\n" + "\n".join(steps)
        )
        raise confirmed(shown, list(machine.first_calls), "\n".join(steps)) from None
    return dict(machine.counts)


@case(
    "VU-FUZZ-1", title="Fuzzed start sequences", family="fuzz", level=MUST,
    clause=f"{RST} Communication",
    requirement="Any order and subset of the start-up messages (hypothesis) never crashes or "
        "hangs the back-end.",
)
def test_fuzzed_message_sequences(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float,
    vhost_measurements: dict[str, float], vhost_target_factory: MakeTarget
) -> None:
    """Message sequences in odd orders (and slightly invalid ones), with stops, restarts,
    reconnects and I/O: no crash, no hang, every completed read matches the model."""
    rig = Rig(vhost_target, vhost_capabilities, vhost_timeout)
    examples = max(1, examples_setting() // 5)
    before = backend_fds(vhost_target)
    started = time.monotonic()
    seed = run_seed()
    vhost_measurements["seed"] = float(seed)
    counts = run_machine(
        rig,
        examples,
        fresh=lambda: Rig(vhost_target_factory("replay"), vhost_capabilities, vhost_timeout),
        seed=seed,
    )
    rig.final_check()
    vhost_measurements["examples"] = float(examples)
    vhost_measurements["seconds"] = round(time.monotonic() - started, 2)
    for name, value in counts.items():
        vhost_measurements[name] = float(value)
    after = backend_fds(vhost_target)
    if before is not None and after is not None and after > before + 16:
        raise CaseFailed(f"the back-end's open fds grew over {examples} sequences (a leak)",
                         expected=f"<= {before + 16}", seen=after)
    print(f"VU-FUZZ-1: {examples} sequences: {counts}")
