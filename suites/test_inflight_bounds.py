"""In-flight counters stay in bounds under random submission (property-based, hypothesis).

Family: fuzz (VU-FUZZ-4). Clause: vhost-user.rst (QEMU 11.1.3) "Inflight I/O tracking": on
taking a head from the avail ring the back-end sets ``desc[i].counter`` from its global
counter, increments that, and sets ``inflight``; on completion it clears ``inflight`` after
updating the used ring, then sets the region's ``used_idx``.

Each example is a fresh session (its own region from GET_INFLIGHT_FD) driven through a drawn
sequence of batches (sizes, kinds, a pause before looking). After each batch the region is
copied *first* and the used ring reaped *after*, so the copy can only lag what we reaped:
the front-end's model (frontend/inflight.py) then allows every in-flight mark the timing
allows and nothing else (completed heads still marked once the region's used_idx caught up,
heads never submitted, flags other than 0/1, duplicate counters, desc_num, used_idx out of
range; the last-batch list only once the back-end is idle, as a copy taken while it
completes a batch shows the list half built). Across the example, every request seen in flight keeps one counter and the counters
increase in avail (submission) order. At the end every request is reaped and the region must
hold nothing in flight. Split rings, and packed rings when offered.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.errors import Flaky
from vhost_conformance.frontend.blk import SECTOR_SIZE, BlkRequest
from vhost_conformance.frontend.channel import BackendHang
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.inflight import DescStateSplit, Finding, InflightRegion
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.protocol import ProtocolFeature, VirtioFeature
from vhost_conformance.suites.clauses import RST
from vhost_conformance.suites.drivers import (
    GUEST_MEMORY,
    InflightTracker,
    MakeTarget,
    close_session,
    open_session,
    pattern,
    slow_disk,
)
from vhost_conformance.suites.drivers.hostile import (
    ShrinkBudget,
    examples_setting,
    run_seed,
    unreplayable,
)
from vhost_conformance.suites.model import (
    MUST,
    CaseFailed,
    CaseOutcome,
    Unsupported,
    case,
    confirm_finding,
)
from vhost_conformance.suites.target import BackendTarget, Capabilities, CommandTarget

#: How long a rejected mid-flight mark may take to clear before it counts (seconds).
SETTLE_S = 0.5

P = ProtocolFeature

#: Default examples (each one a session): fewer than the chain fuzzers, a session costs more.
DEFAULT_EXAMPLES = 20
#: Queue size of the fuzzed sessions; a batch (at most MAX_BATCH requests of up to three
#: descriptors) always fits once earlier requests were reaped.
QUEUE_SIZE = 128
MAX_BATCH = 24
SECTORS = 8
#: Per-request latency of the slow disk, where the profile has one.
LATENCY_MS = 20


@dataclass(frozen=True)
class Step:
    """One batch: the kinds of its requests, and the pause before the region is copied."""

    kinds: tuple[str, ...]
    pause_ms: int


def steps() -> st.SearchStrategy[tuple[Step, ...]]:
    """1..6 batches of 1..MAX_BATCH reads/writes, each followed by a pause of 0-30 ms."""
    step = st.builds(
        Step,
        st.lists(st.sampled_from(["read", "write"]), min_size=1, max_size=MAX_BATCH).map(tuple),
        st.sampled_from([0, 0, 1, 5, 15, 30]),
    )
    return st.lists(step, min_size=1, max_size=6).map(tuple)


class Run:
    """One example: the session, the tracker, and what the region said about counters."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.tracker = InflightTracker(session)
        self.order: dict[int, int] = {}  # request tag -> submission position
        self.counters: dict[int, int] = {}  # request tag -> counter seen in flight
        self.outstanding: dict[int, BlkRequest] = {}  # head -> request not yet reaped
        self.sector = 0

    def make_room(self, n: int) -> None:
        """Reap until ``n`` more requests fit in the ring (three descriptors each without
        indirect descriptors)."""
        vq = self.session.queues[0].vq
        per_request = 1 if vq.indirect else 3
        deadline = time.monotonic() + self.session.timeout
        while vq.free_count < n * per_request:
            for done in self.tracker.reap(0):
                self.outstanding.pop(done.request.head, None)
            if vq.free_count >= n * per_request:
                return
            if time.monotonic() >= deadline:
                raise BackendHang(f"{len(self.outstanding)} request(s) not completed (the "
                                  "ring is full)", request_name="virtio-blk I/O",
                                  timeout=self.session.timeout)
            time.sleep(0.002)

    def submit(self, kinds: Sequence[str]) -> None:
        """Add one request per kind (each on its own sectors), publish and kick."""
        blk = self.session.queues[0].blk
        self.make_room(len(kinds))
        batch = []
        for kind in kinds:
            at = self.sector % 4096
            self.sector += SECTORS
            if kind == "write":
                r = blk.write(at, pattern(at, SECTORS * SECTOR_SIZE))
            else:
                r = blk.read(at, SECTORS)
            self.order[r.tag] = len(self.order)
            self.outstanding[r.head] = r
            batch.append(r)
        self.tracker.submit(batch)
        self.session.submit(0)

    def look(self, what: str) -> None:
        """Copy the region and reap, then judge the copy. Split: copy first, so the copy
        can only lag what was reaped (its used_idx says how far it got). Packed regions have
        no such field the model can use: reap first, so every completion the model knows was
        visible before the copy. A mark the model rejects is judged again on fresh copies for
        up to SETTLE_S (nothing is submitted or reaped in between): a back-end caught between
        making a completion visible and clearing its mark is not at fault."""
        packed = self.session.packed
        if packed:
            self._reap()
        outstanding = dict(self.outstanding)
        region = self.tracker.region()
        if not packed:
            self._reap()
        self._counters(region, outstanding, what)
        findings = self._mid_flight_findings(region)
        # A mark still there after SETTLE_S (polled) is the back-end's; a shorter one may be a
        # back-end descheduled between its used-ring write and clearing the mark (loaded CI).
        deadline = time.monotonic() + SETTLE_S
        while findings and time.monotonic() < deadline:
            time.sleep(0.01)
            again = {(f.rule, f.field) for f in self._mid_flight_findings(self.tracker.region())}
            findings = [f for f in findings if (f.rule, f.field) in again]
        self._fail_on(findings, what)

    def _reap(self) -> None:
        for done in self.tracker.reap(0):
            self.outstanding.pop(done.request.head, None)

    def _mid_flight_findings(self, region: InflightRegion) -> list[Finding]:
        # the last-batch list is built before used->idx moves and judged against used->idx
        # as reaped: a copy taken mid-completion shows it half built; it is judged at the end
        return [f for f in self._model_findings(region) if f.rule != "last-batch"]

    def _model_findings(self, region: InflightRegion) -> list[Finding]:
        """The model's MUST findings against what was reaped (split: used->idx; packed: the
        number of completions, as InflightTracker.findings does)."""
        vq = self.session.queues[0].vq
        model = self.tracker.model
        used = len(model.completed(0)) % 0x10000 if self.session.packed else vq.used_idx
        return [f for f in model.check(region, used_idx=[used], last_avail_idx=[None])
                if f.level == "MUST"]

    def _counters(self, region: InflightRegion, outstanding: dict[int, BlkRequest],
                  what: str) -> None:
        for e in region.queues[0].inflight_entries():
            head = e.index if isinstance(e, DescStateSplit) else e.id
            r = outstanding.get(head)
            if r is None:
                continue  # the model judges marks on heads not outstanding
            seen = self.counters.setdefault(r.tag, e.counter)
            if seen != e.counter:
                raise CaseFailed(f"{what}: desc[{head}].counter of request {r.tag} changed "
                                 "while in flight", expected=seen, seen=e.counter)

    def check_counter_order(self, what: str) -> None:
        """Counters seen in flight increase with the submission order."""
        by_counter = sorted(self.counters, key=lambda tag: self.counters[tag])
        by_order = sorted(self.counters, key=lambda tag: self.order[tag])
        if by_counter != by_order:
            first = next(i for i, (a, b) in enumerate(zip(by_counter, by_order, strict=True))
                         if a != b)
            shown = ", ".join(f"request {t}: counter {self.counters[t]}"
                              for t in by_order[max(0, first - 1):first + 3])
            raise CaseFailed(f"{what}: counters of the requests seen in flight, in avail order",
                             expected="strictly increasing", seen=shown)

    def finish(self, what: str) -> None:
        """Reap every request, then the region must mark nothing in flight."""
        left = len(self.outstanding)
        if left:
            for done in self.tracker.wait(0, left):
                self.outstanding.pop(done.request.head, None)
        deadline = time.monotonic() + self.session.timeout
        while True:  # the region's used_idx may trail used->idx by one batch for a moment
            region = self.tracker.region()
            marked = region.queues[0].inflight_heads()
            findings = self._model_findings(region)
            if not marked and not findings:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        if marked:
            raise CaseFailed(f"{what}: the region once every request was reaped",
                             expected="no head in flight", seen=f"heads {marked[:8]} marked")
        self._fail_on(findings, what)

    @staticmethod
    def _fail_on(findings: Sequence[Finding], what: str) -> None:
        if findings:
            raise CaseFailed(f"{what}: {len(findings)} finding(s) in the in-flight region",
                             expected="none", seen="; ".join(str(f) for f in findings[:3]))


def run_example(target: BackendTarget, timeout: float, layout: str,
                sequence: Sequence[Step]) -> int:
    """One example on a fresh session; CaseFailed on the first violation. Returns how many
    requests were seen in flight (their counters judged)."""
    memory = GuestMemory.simple(GUEST_MEMORY)
    session: Session | None = None
    try:
        session = open_session(target, timeout=timeout, memory=memory, model=False,
                               packed=layout == "packed", queue_size=QUEUE_SIZE)
        run = Run(session)
        for n, step in enumerate(sequence):
            run.submit(step.kinds)
            if step.pause_ms:
                time.sleep(step.pause_ms / 1000)
            run.look(f"after batch {n + 1} of {len(sequence)}")
        run.finish("at the end")
        run.check_counter_order("across the example")
        return len(run.counters)
    finally:
        if session is not None:
            close_session(session)
        memory.close()


def fuzz_inflight_bounds(target: BackendTarget, timeout: float, layouts: Sequence[str],
                         examples: int, *, fresh: Callable[[], BackendTarget] | None = None,
                         seed: int | None = None) -> tuple[int, int]:
    """Run ``examples`` hypothesis examples; returns how many ran and how many requests were
    seen in flight. The first failure is reported as hypothesis shrank it (or as it ran,
    when it cannot be replayed), once replayed on ``fresh()`` (a fresh back-end instance):
    ``flaky`` with the example and seed when it does not reproduce there."""
    budget = ShrinkBudget()  # $VHOST_CONFORMANCE_SHRINK_SECONDS
    ran = 0
    seen = 0
    first: tuple[Exception, str] | None = None
    last: tuple[str, Sequence[Step]] | None = None
    first_example: tuple[str, Sequence[Step]] | None = None

    def confirmed(exc: CaseOutcome, example: tuple[str, Sequence[Step]] | None) -> CaseOutcome:
        if fresh is None or example is None:
            return exc
        layout, sequence = example
        return confirm_finding(
            exc, lambda: run_example(fresh(), timeout, layout, sequence),
            sequence=f"layout={layout!r}, steps={sequence!r}", seed=seed)

    @settings(max_examples=examples, deadline=None, database=None, print_blob=True,
              report_multiple_bugs=False, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate, Phase.shrink])
    @given(data=st.data())
    def example(data: st.DataObject) -> None:
        nonlocal ran, first, seen
        if budget.exhausted():
            return
        layout = data.draw(st.sampled_from(list(layouts)), label="layout")
        sequence = data.draw(steps(), label="steps")
        ran += 1
        nonlocal last, first_example
        last = (layout, sequence)
        try:
            seen += run_example(target, timeout, layout, sequence)
        except CaseOutcome as exc:
            budget.failed()
            if first is None:
                first = (exc, f"layout={layout!r}, steps={sequence!r}")
                first_example = (layout, sequence)
            raise type(exc)(f"{exc.reason}\nexample: layout={layout!r}, "
                            f"steps={sequence!r}") from None
        except Exception as exc:
            budget.failed()
            if first is None:
                first = (exc, f"layout={layout!r}, steps={sequence!r}")
            raise
        except BaseException:
            budget.failed()
            raise

    if seed is not None:
        hypothesis_seed(seed)(example)
    try:
        example()
    except CaseOutcome as exc:
        raise confirmed(exc, last) from None
    except Flaky as flaky:
        outcome, shown = first if first is not None else (flaky, "")
        if not isinstance(outcome, CaseOutcome):
            raise unreplayable(flaky, first, "first failing example (hypothesis could not "
                               "replay it): ") from None
        raise confirmed(
            type(outcome)(f"{outcome.reason}\nfirst failing example (hypothesis could not "
                          f"replay it: the back-end's timing differs run to run): {shown}"),
            first_example) from None
    return ran, seen


@case(
    "VU-FUZZ-4", title="In-flight counters stay in bounds", family="fuzz", level=MUST,
    clause=f"{RST} Inflight I/O tracking",
    requirement="Under random submission and completion order the region's counters stay "
        "increasing and its entries match the outstanding heads.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD],
)
def test_inflight_counters_stay_in_bounds(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float,
    vhost_measurements: dict[str, float], vhost_target_factory: MakeTarget
) -> None:
    """Random batches of reads and writes, the region copied at random moments: marks only
    on outstanding heads, counters stable while in flight and increasing in avail order,
    nothing in flight at the end."""
    layouts = ["split"]
    if vhost_capabilities.offers(VirtioFeature.RING_PACKED):
        layouts.append("packed")
    # with the profile's slow disk requests stay in flight long enough to be seen; without
    # one (DPDK) the region is still judged, it just marks fewer requests
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(slow_disk(vhost_target, LATENCY_MS))
        vhost_measurements["latency_ms"] = float(LATENCY_MS)
    except Unsupported:
        vhost_measurements["latency_ms"] = 0.0
    with stack:
        # a layout on which not even one read completes is left out (blk-io reports it)
        for layout in layouts[1:]:
            try:
                run_example(vhost_target, vhost_timeout, layout, (Step(("read",), 0),))
            except BackendHang as exc:
                layouts.remove(layout)
                vhost_measurements[f"excluded.{layout}"] = 1.0
                print(f"VU-FUZZ-4: {layout} rings left out: {exc}")
                if isinstance(vhost_target, CommandTarget):
                    vhost_target.restart()
        started = time.monotonic()
        seed = run_seed()
        vhost_measurements["seed"] = float(seed)

        def fresh() -> BackendTarget:
            # a fresh instance, with the slow disk the examples ran with when there is one
            replica = vhost_target_factory("replay")
            with contextlib.suppress(Unsupported):
                stack.enter_context(slow_disk(replica, LATENCY_MS))
            return replica

        ran, seen = fuzz_inflight_bounds(vhost_target, vhost_timeout, layouts,
                                         examples_setting(DEFAULT_EXAMPLES), fresh=fresh,
                                         seed=seed)
    vhost_measurements["examples"] = float(ran)
    vhost_measurements["requests_seen_in_flight"] = float(seen)
    vhost_measurements["seconds"] = round(time.monotonic() - started, 2)
