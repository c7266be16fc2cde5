"""Result capture: what the plugin keeps of a case while it runs (its verdict, back-ends, wire
traces, figures) and how a case's outcome becomes its verdict, its pytest outcome and its
``CaseResult`` (crash, allowed or failing disconnect, non-strict, known deviation)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from vhost_conformance.frontend.channel import BackendClosed, Channel
from vhost_conformance.reports.model import CaseResult, KnownDeviations, Level, Verdict
from vhost_conformance.suites.model import (
    MARKER,
    Case,
    Classified,
    case_of,
    classify,
    resolve,
    violation_of,
)
from vhost_conformance.suites.target import BackendTarget, CommandTarget, TargetError

#: The family of the qemu tier (VU-QEMU-*), deselected unless --vhost-qemu asks for it.
QEMU_FAMILY = "qemu"
#: Wire traces kept per case (the most recent connections).
MAX_TRACES = 16

BAD = frozenset(
    {
        Verdict.FAIL,
        Verdict.HANG,
        Verdict.CRASH,
        Verdict.ERROR,
        Verdict.DISCONNECT,
        Verdict.FLAKY,
    }
)
DEVIATION_FAILURES = frozenset(
    {Verdict.FAIL, Verdict.NON_STRICT, Verdict.HANG, Verdict.CRASH, Verdict.DISCONNECT}
)

#: Families whose cases are a hostile or broken front-end: the spec's only rule there is
#: that the back-end may close the connection, so a clean close (the process alive and
#: serving the next connection) is an allowed ``disconnect``. Elsewhere a close loses the
#: device in QEMU: a ``disconnect`` there fails. (A case with ``tier = "robustness"`` in the
#: catalogue counts too.)
MAY_CLOSE_FAMILIES: frozenset[str] = frozenset({"malformed", "hostile-guest", "fuzz"})


def may_close(case: Case) -> bool:
    """True when the spec lets the back-end close the connection in *case* (robustness)."""
    return case.family in MAY_CLOSE_FAMILIES or getattr(case, "tier", None) == "robustness"


_ASSERTION = re.compile(r"[\w.-]+:\d+: [\w ]*: Assertion .* failed")


def crash_behaviour(log_tail: str | None) -> str | None:
    """The observed behaviour of a crash whose log names the failed assertion (the last one
    in the tail, e.g. ``vhost_blk.c:345: process_blk_task: Assertion ... failed``): crashes
    on the same assertion are one behaviour, counted once."""
    found = _ASSERTION.findall(log_tail or "")
    return f"assertion {found[-1]}" if found else None


class VhostNonStrictWarning(UserWarning):
    """A SHOULD was violated (verdict non-strict); --vhost-strict turns it into a failure."""


@dataclass
class CaseState:
    """What the plugin knows about one case item across its phases."""

    case: Case
    verdict: Classified | None = None
    targets: list[BackendTarget] = field(default_factory=list)
    traces: list[Any] = field(default_factory=list)
    measurements: dict[str, float] = field(default_factory=dict)
    duration: float = 0.0

    def add_trace(self, trace: object) -> None:
        """Attach a wire trace once (a channel's trace arrives on its own: observe_traces)."""
        if not any(t is trace for t in self.traces):
            self.traces.append(trace)
            # a fuzz case opens a connection per example: keep the latest ones
            del self.traces[:-MAX_TRACES]
    recorded: bool = False


#: Where a case item keeps its CaseState (set by the plugin's pytest_runtest_setup).
CASE = pytest.StashKey[CaseState]()


def case_for_item(item: pytest.Item) -> Case | None:
    """The case an item runs: from @case, or from a bare ``vhost_case`` marker via the catalogue."""
    meta = case_of(getattr(item, "function", None))
    if meta is not None:
        return meta
    marker = item.get_closest_marker(MARKER)
    if marker is None or not marker.args:
        return None
    return resolve(str(marker.args[0]))


def is_qemu_tier(item: pytest.Item) -> bool:
    """Whether the item is a case of the qemu tier (VU-QEMU-*)."""
    meta = case_for_item(item)
    return meta is not None and meta.family == QEMU_FAMILY


def register_trace(request: pytest.FixtureRequest, trace: object) -> None:
    """Attach a wire trace (anything with ``to_json()``) to the current case's report."""
    state = request.node.stash.get(CASE, None)
    if state is not None:
        state.add_trace(trace)


@dataclass
class Judge:
    """Turns what a case did into its verdict, its pytest outcome and its result record."""

    timeout: float
    strict: bool
    deviations: KnownDeviations
    #: the command re-running a case alone (the report's ``rerun``)
    rerun: Callable[[str], str]

    def died(self, state: CaseState) -> Classified | None:
        """A back-end of this case that died without being told to: crash."""
        for target in state.targets:
            if isinstance(target, CommandTarget) and target.pid is None and not target.alive():
                status = target.exit_status()
                if status is not None and not target.stopped_by_us:
                    return Classified(
                        Verdict.CRASH,
                        f"the back-end process exited with status {status} during the case",
                        status,
                        target.log_tail(),
                    )
        return None

    def judge_disconnect(self, state: CaseState, closed: Classified) -> Classified:
        """A close with the process alive: allowed where the case may close (robustness),
        once the process is seen alive and serving the next connection (GET_FEATURES
        answered); a failure elsewhere (QEMU would lose the device)."""
        if not may_close(state.case):
            return replace(
                closed,
                reason=closed.reason
                + "; not allowed here: the input was valid, QEMU would lose the device",
            )
        target = next((t for t in reversed(state.targets)), None)
        if target is None:
            return replace(closed, allowed=True, reason=closed.reason + "; allowed here")
        served = self.serves_next_connection(target)
        if isinstance(target, CommandTarget) and not target.alive():
            status = target.exit_status()
            return Classified(
                Verdict.CRASH,
                closed.reason + f" and then the process exited with status {status}",
                status,
                target.log_tail(),
            )
        if served is not None:
            return Classified(
                Verdict.FAIL,
                closed.reason + f"; the back-end then did not serve the next connection: {served}",
                None,
                closed.log_tail,
            )
        return replace(
            closed,
            allowed=True,
            reason=closed.reason
            + "; allowed here (the spec lets it close on this input): the process stayed alive"
            " and answered GET_FEATURES on the next connection",
        )

    def serves_next_connection(self, target: BackendTarget) -> str | None:
        """None when a new connection to *target* gets a GET_FEATURES reply, else why not."""
        from vhost_conformance.frontend.channel import BackendError
        from vhost_conformance.frontend.protocol import FrontendRequest

        try:
            channel = Channel(target.connect_socket(self.timeout))
        except (OSError, TargetError) as exc:
            return f"connect: {exc}"
        try:
            if channel.call(FrontendRequest.GET_FEATURES, timeout=self.timeout) is None:
                return "GET_FEATURES: no reply"
        except (BackendError, OSError) as exc:
            return f"GET_FEATURES: {type(exc).__name__}: {exc}"
        finally:
            channel.close()
        return None

    def classify_exception(self, state: CaseState, exc: BaseException) -> Classified:
        """The verdict of a case that raised ``exc`` (the back-end's state read first)."""
        alive: bool | None = None
        exit_status: int | None = None
        log_tail: str | None = None
        if isinstance(exc, BackendClosed):
            # EOF can reach us a moment before the dying process is reapable
            for target in state.targets:
                if isinstance(target, CommandTarget) and target.alive():
                    target.wait_exit(0.5)
        for target in state.targets:
            if (
                isinstance(target, CommandTarget)
                and not target.alive()
                and target.exit_status() is not None
            ) and not target.stopped_by_us:
                alive, exit_status = False, target.exit_status()
                log_tail = target.log_tail()
                break
            if isinstance(target, CommandTarget):
                alive = True
                log_tail = target.log_tail()
        classified = classify(exc, alive=alive, exit_status=exit_status, log_tail=log_tail)
        if (
            classified.verdict is Verdict.FAIL
            and state.case.level is Level.SHOULD
            and classified.finding_level is not Level.MUST
        ):
            # the verdict names what was violated: a SHOULD case's failure is non-strict
            classified = replace(classified, verdict=Verdict.NON_STRICT)
        if classified.verdict in (Verdict.FAIL, Verdict.NON_STRICT):
            classified = replace(classified, violation=violation_of(state.case, exc))
        if classified.verdict is Verdict.HANG and classified.log_tail is None:
            return replace(classified, log_tail=log_tail)
        return classified

    def apply(self, item: pytest.Item, state: CaseState, rep: pytest.TestReport) -> None:
        """Set the pytest outcome of ``rep`` from the case's verdict."""
        verdict = state.verdict
        assert verdict is not None
        deviation = self.deviations.reason_for(state.case.id)
        header = (
            f"{state.case.id} [{state.case.level.value}] {verdict.verdict.value}: {verdict.reason}"
        )
        if verdict.exit_status is not None or verdict.log_tail:
            rep.sections.append(
                (
                    "vhost back-end log tail",
                    f"exit status: {verdict.exit_status}\n{verdict.log_tail or ''}",
                )
            )
        if verdict.verdict is Verdict.DISCONNECT and verdict.allowed:
            rep.outcome = "passed"
            rep.longrepr = None
            return
        if deviation is not None and verdict.verdict in DEVIATION_FAILURES:
            rep.outcome = "skipped"
            rep.wasxfail = f"known deviation: {deviation}"
            return
        if deviation is not None and verdict.verdict is Verdict.PASS:
            rep.outcome = "passed"
            rep.wasxfail = f"known deviation now passes: {deviation}"
            return
        if verdict.verdict is Verdict.PASS:
            rep.outcome = "passed"
        elif verdict.verdict in (Verdict.UNSUPPORTED, Verdict.SKIP):
            rep.outcome = "skipped"
            path, lineno, _ = item.reportinfo()
            rep.longrepr = (
                str(path),
                (lineno or 0) + 1,
                f"{verdict.verdict.value}: {verdict.reason}",
            )
        elif verdict.verdict is Verdict.NON_STRICT:
            if self.strict:
                rep.outcome = "failed"
                rep.longrepr = f"{header} (--vhost-strict)"
            else:
                rep.outcome = "passed"
                item.warn(VhostNonStrictWarning(header))
        else:
            rep.outcome = "failed"
            if rep.longrepr is None or verdict.verdict is Verdict.CRASH:
                rep.longrepr = header if rep.longrepr is None else f"{header}\n\n{rep.longrepr}"
            else:
                rep.sections.append(("vhost verdict", header))

    def result(self, item: pytest.Item, state: CaseState) -> CaseResult | None:
        """The case's result record, once (None when it was made already or has no verdict)."""
        if state.recorded or state.verdict is None:
            return None
        state.recorded = True
        verdict = state.verdict
        deviation = self.deviations.reason_for(state.case.id)
        final = verdict.verdict
        allowed_close = final is Verdict.DISCONNECT and verdict.allowed
        if allowed_close:
            deviation = None
        elif deviation is not None and final in DEVIATION_FAILURES:
            final = Verdict.XFAIL
        elif deviation is not None and final is Verdict.PASS:
            final = Verdict.XPASS
        else:
            deviation = None
        trace: list[dict[str, Any]] | None = None
        # the qemu tier keeps real QEMU's trace on every verdict (the fidelity evidence)
        if (verdict.verdict in BAD or verdict.verdict is Verdict.NON_STRICT
                or state.case.family == QEMU_FAMILY):
            trace = []
            for wire in state.traces:
                with contextlib.suppress(Exception):
                    trace.extend(wire.to_json())
        callspec = getattr(item, "callspec", None)
        parameters: dict[str, object] = {}
        if callspec is not None:
            parameters = {
                k: v if isinstance(v, int | float | str | bool) else repr(v)
                for k, v in callspec.params.items()
            }
        result = CaseResult(
            id=state.case.id,
            title=state.case.title,
            family=state.case.family,
            level=state.case.level,
            clause=state.case.clause,
            requirement=state.case.requirement,
            tier=state.case.tier,
            quote=state.case.quote,
            source=state.case.source,
            leak=state.case.leak,
            verdict=final,
            reason=verdict.reason,
            duration_s=state.duration,
            parameters=parameters,
            measurements=dict(state.measurements),
            trace=trace,
            deviation=deviation,
            log_tail=verdict.log_tail,
            expected=None if verdict.violation is None else verdict.violation.expected,
            seen=None if verdict.violation is None else verdict.violation.seen,
            exit_status=verdict.exit_status if final is Verdict.CRASH else None,
            allowed=verdict.allowed,
            finding_level=verdict.finding_level,
            behaviour=crash_behaviour(verdict.log_tail)
            if final is Verdict.CRASH and crash_behaviour(verdict.log_tail)
            else verdict.behaviour,
            rerun=self.rerun(state.case.id)
            if (verdict.verdict in BAD or verdict.verdict is Verdict.NON_STRICT)
            and not allowed_close
            else None,
        )
        return result
