"""The vhost-conformance pytest plugin (registered through the ``pytest11`` entry point).

It is loaded by every pytest run in an environment with the package installed, so it stays
out of the way: it adds options and a marker, and acts only on tests that carry a case
(``@case("VU-...")`` from :mod:`vhost_conformance.suites.model`, or the ``vhost_case`` marker).

Options (group "vhost-conformance"):

``--vhost-backend NAME``        a built-in profile (``reference`` (default), ``qsd``,
                                ``qsd-11.1``, ``dpdk-vhost-blk``)
``--vhost-profile FILE``        a TOML profile file with the same keys
``--vhost-backend-cmd CMD``     a command template (``{socket}`` required, ``{disk}``,
                                ``{workdir}``)
``--vhost-backend-socket PATH`` a back-end someone else runs, listening on PATH
``--vhost-backend-connects``    the back-end connects to us: we listen on ``{socket}``
                                (or on ``--vhost-backend-socket``)
``--vhost-strict``              ``non-strict`` (a SHOULD violated), interop failures and
                                every other bad verdict fail the run
``--vhost-tier T[,T]``          only cases of these tiers (conformance, interop, robustness)
``--vhost-report DIR``          write report.json, junit.xml, summary.md, report.html there
``--vhost-known-deviations F``  TOML/JSON list of expected failures (``[[deviation]] id, reason``)
``--vhost-timeout S``           deadline of each reply (default 5 s)
``--vhost-qemu``                also the qemu tier (VU-QEMU-*, real QEMU 11.1.3; off by default)
``--vhost-case-timeout S``      deadline of a whole case (default 120 s) -> ``hang``

Fixtures for case code and for vendors' own tests:

``vhost_target``          a started back-end of its own (own socket, disk, work dir); a back-end
                          that crashed is not reused: every case gets a fresh one
``vhost_channel``         a ``frontend.channel.Channel`` connected to ``vhost_target``
``vhost_capabilities``    what the back-end offers (probed once per worker)
``vhost_case``            the current case's metadata (``model.Case``)
``vhost_timeout``         the reply deadline in seconds
``vhost_target_factory``  make more back-ends for one case (a migration destination)
``vhost_measurements``    ``dict[str, float]`` of this case's figures, copied to report.json
``vhost_measure``         ``measure(name, value, unit="ms", **parameters)``: a run-wide figure
                          (``report.measurements``, plotted by report.html: ``stop_latency_ms``
                          with ``mode``/``disk_latency_ms``/``inflight``, ``migration_downtime_ms``)
``vhost_backend_targets`` the per-worker TargetFactory (session scope)

The I/O fixtures of :mod:`vhost_conformance.suites.drivers` (``vhost_session``,
``vhost_memory``, ``make_session``, ...) are loaded too (a plugin module of their own), so a
vendor's test file anywhere can ask for them.

Verdicts -> pytest: pass -> passed; fail/hang/crash/error -> failed; unsupported/skip ->
skipped with the reason; non-strict -> passed with a VhostNonStrictWarning (failed with
--vhost-strict); a known deviation turns fail/non-strict/hang/crash into xfail and pass into
xpass. Results of all xdist workers reach the controller through ``workeroutput`` and are
written there with ``reports.write_all``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from vhost_conformance.frontend.channel import BackendClosed, Channel, observe_traces
from vhost_conformance.reports.model import (
    BackendInfo,
    CaseResult,
    KnownDeviations,
    Level,
    Measurement,
    Report,
    Tier,
    Verdict,
)
from vhost_conformance.suites import newhooks, watched
from vhost_conformance.suites.model import (
    FAMILIES,
    MARKER,
    Case,
    CaseHang,
    Classified,
    Unsupported,
    case_of,
    classify,
    resolve,
)
from vhost_conformance.suites.qemu_confirm import confirm as confirm_with_qemu
from vhost_conformance.suites.target import (
    BackendTarget,
    Capabilities,
    CommandTarget,
    Profile,
    TargetError,
    TargetFactory,
    UsageError,
    command_profile,
    connecting_profile,
    load_profile,
)

import vhost_conformance

#: The module of the I/O fixtures, loaded as a plugin module by :func:`pytest_configure`.
DRIVERS_PLUGIN = "vhost_conformance.suites.drivers"

#: Mean seconds per case of the families that take longest (measured against the reference
#: back-end, -n 2): in xdist workers these run first. Families not named here weigh 0.
SLOW_FAMILIES: dict[str, float] = {
    "migration": 1.6,
    "double-submission": 1.5,
    "fuzz": 1.4,
    "reconnect": 0.9,
    "blk-io": 0.8,
    "inflight": 0.8,
    "suspended": 0.75,
    "memory": 0.65,
    "malformed": 0.6,
}

#: The family of the qemu tier (VU-QEMU-*), deselected unless --vhost-qemu asks for it.
QEMU_FAMILY = "qemu"

#: workeroutput key carrying a worker's results to the controller.
WORKER_KEY = "vhost_conformance"

_BAD = frozenset(
    {
        Verdict.FAIL,
        Verdict.HANG,
        Verdict.CRASH,
        Verdict.ERROR,
        Verdict.DISCONNECT,
        Verdict.FLAKY,
    }
)
_DEVIATION_FAILURES = frozenset(
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


def assign_see(cases: list[CaseResult]) -> list[CaseResult]:
    """One behaviour, one failure: of the bad results sharing a ``behaviour``, the first (in
    the suite's family order, then case number) owns the failure and the others get ``see`` = its id; the owner
    takes the strongest ``finding_level`` of the group, so a MUST violation a MAY case saw
    first still fails the gate as a MUST."""
    owners: dict[str, int] = {}
    out = list(cases)
    order = {Level.INFO: 0, Level.MAY: 1, Level.SHOULD: 2, Level.MUST: 3}

    def rank(i: int) -> tuple[int, int, int]:
        # the suite's family order (rings before hostile-guest), then the case number
        c = out[i]
        family = FAMILIES.index(c.family) if c.family in FAMILIES else len(FAMILIES)
        number = c.id.rsplit("-", 1)[-1]
        return (family, int(number) if number.isdigit() else 0, i)

    for i in sorted(range(len(out)), key=rank):
        case = out[i]
        if case.behaviour is None or not case.bad:
            continue
        if case.behaviour not in owners:
            owners[case.behaviour] = i
            continue
        owner = out[owners[case.behaviour]]
        levels = [lv for lv in (owner.finding_level, case.finding_level) if lv is not None]
        if case.level is not owner.level and order[case.level] > order[owner.gate_level]:
            levels.append(case.level)
        strongest = max(levels, key=lambda lv: order[lv]) if levels else None
        out[owners[case.behaviour]] = replace(owner, finding_level=strongest)
        out[i] = replace(case, see=owner.id)
    return out


class VhostNonStrictWarning(UserWarning):
    """A SHOULD was violated (verdict non-strict); --vhost-strict turns it into a failure."""


# --------------------------------------------------------------------------- options


def pytest_addoption(parser: pytest.Parser) -> None:
    """The vhost-conformance options."""
    group = parser.getgroup("vhost-conformance", "vhost-user back-end conformance")
    group.addoption(
        "--vhost-backend",
        metavar="NAME",
        default=None,
        help="built-in back-end profile (reference, qsd, qsd-11.1, dpdk-vhost-blk); default reference",
    )
    group.addoption(
        "--vhost-profile",
        metavar="FILE",
        default=None,
        help="TOML profile file of the back-end under test",
    )
    group.addoption(
        "--vhost-backend-cmd",
        metavar="CMD",
        default=None,
        help="command template of the back-end: {socket} (required), {disk}, {workdir}",
    )
    group.addoption(
        "--vhost-backend-socket",
        metavar="PATH",
        default=None,
        help="socket of a back-end someone else runs (with --vhost-backend-connects: where we listen)",
    )
    group.addoption(
        "--vhost-backend-connects",
        action="store_true",
        default=False,
        help="the back-end connects to our socket instead of listening",
    )
    group.addoption(
        "--vhost-strict",
        action="store_true",
        default=False,
        help="non-strict verdicts (SHOULD violated) fail the run",
    )
    group.addoption(
        "--vhost-report",
        metavar="DIR",
        default=None,
        help="write report.json, junit.xml, summary.md and report.html into DIR",
    )
    group.addoption(
        "--vhost-known-deviations",
        metavar="FILE",
        default=None,
        help="TOML or JSON file of known deviations (expected failures, with reasons)",
    )
    group.addoption(
        "--vhost-timeout",
        metavar="S",
        type=float,
        default=5.0,
        help="deadline of each reply from the back-end, seconds (default 5)",
    )
    group.addoption(
        "--vhost-case",
        metavar="ID",
        action="append",
        default=[],
        help="run only this case (exact id; repeatable): the re-run command of a report",
    )
    group.addoption(
        "--vhost-tier",
        metavar="T[,T]",
        action="append",
        default=[],
        help="run only cases of these tiers (conformance, interop, robustness; repeatable)",
    )
    group.addoption(
        "--vhost-qemu",
        action="store_true",
        default=False,
        help="also run the qemu tier (VU-QEMU-*: real QEMU 11.1.3 boots a guest on the back-end)",
    )
    group.addoption(
        "--vhost-case-timeout",
        metavar="S",
        type=float,
        default=120.0,
        help="deadline of a whole case, seconds (default 120); passing it is a hang",
    )


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Add the hook specs of newhooks.py."""
    pluginmanager.add_hookspecs(newhooks)


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker and the per-run state (validating the options early)."""
    config.addinivalue_line(
        "markers", f"{MARKER}(id): the test is the vhost-conformance case with this id"
    )
    state = VhostRun(config)
    config.stash[_RUN] = state
    config.pluginmanager.register(state, "vhost-conformance-run")
    # the shared I/O fixtures (vhost_session, vhost_memory, make_session, ...) for vendors'
    # own tests outside the package; a no-op when ``-p`` already loaded the module
    config.pluginmanager.import_plugin(DRIVERS_PLUGIN)


# --------------------------------------------------------------------------- per-run state


@dataclass
class _CaseState:
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


_RUN = pytest.StashKey["VhostRun"]()
_CASE = pytest.StashKey[_CaseState]()
#: Wire traces kept per case (the most recent connections).
MAX_TRACES = 16


def _option(config: pytest.Config, name: str) -> Any:
    return config.getoption(name)


def profile_from_options(config: pytest.Config) -> tuple[Profile | None, str | None]:
    """The back-end under test chosen by the options: (profile, external socket)."""
    backend = _option(config, "vhost_backend")
    profile_file = _option(config, "vhost_profile")
    command = _option(config, "vhost_backend_cmd")
    socket_path = _option(config, "vhost_backend_socket")
    connects = bool(_option(config, "vhost_backend_connects"))
    chosen = [
        n
        for n, v in (
            ("--vhost-backend", backend),
            ("--vhost-profile", profile_file),
            ("--vhost-backend-cmd", command),
        )
        if v
    ]
    if len(chosen) > 1:
        raise pytest.UsageError(f"give only one of {', '.join(chosen)}")
    if socket_path and chosen:
        raise pytest.UsageError(
            f"--vhost-backend-socket names a back-end someone else runs: drop {chosen[0]}"
        )
    try:
        if socket_path:
            if connects:
                return Profile(
                    name="external",
                    command=None,
                    socket_mode="connect",
                    socket=socket_path,
                    source="--vhost-backend-socket",
                ), None
            return None, socket_path
        if command:
            return command_profile(command, "connect" if connects else "listen"), None
        profile = load_profile(profile_file or backend or "reference")
        return (connecting_profile(profile) if connects else profile), None
    except UsageError as exc:
        raise pytest.UsageError(str(exc)) from None


class VhostRun:
    """The plugin's state for one pytest process (controller or xdist worker)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.strict = bool(_option(config, "vhost_strict"))
        self.timeout = float(_option(config, "vhost_timeout"))
        self.case_timeout = float(_option(config, "vhost_case_timeout"))
        report_dir = _option(config, "vhost_report")
        self.report_dir = Path(report_dir) if report_dir else None
        explicit = any(
            _option(config, name)
            for name in (
                "vhost_backend",
                "vhost_profile",
                "vhost_backend_cmd",
                "vhost_backend_socket",
            )
        )
        self.default_profile_error: str | None = None
        try:
            self.profile, self.external_socket = profile_from_options(config)
        except pytest.UsageError as exc:
            if explicit:
                raise
            # the built-in default could not load: unrelated test runs must not fail for it;
            # a case that needs a back-end will say why
            self.profile, self.external_socket = None, None
            self.default_profile_error = str(exc)
        self.deviations = self._deviations(_option(config, "vhost_known_deviations"))
        self.results: list[CaseResult] = []
        #: run-wide figures the cases of this process measured (``vhost_measure``)
        self.measured: list[Measurement] = []
        self.worker_payloads: list[dict[str, Any]] = []
        self.started = time.time()
        self._factory: TargetFactory | None = None
        self.worker = os.environ.get("PYTEST_XDIST_WORKER", "main")

    def _deviations(self, path: str | None) -> KnownDeviations:
        entries: dict[str, str] = {}
        sources = []
        if self.profile is not None and self.profile.deviations:
            entries.update({d.case: d.reason for d in self.profile.deviations})
            sources.append(self.profile.source)
        if path:
            try:
                loaded = KnownDeviations.load(path)
            except (OSError, ValueError) as exc:
                raise pytest.UsageError(f"--vhost-known-deviations {path}: {exc}") from None
            entries.update(loaded.deviations)
            sources.append(path)
        return KnownDeviations(entries, ", ".join(sources) or None)

    @property
    def is_worker(self) -> bool:
        """True in a pytest-xdist worker."""
        return hasattr(self.config, "workerinput")

    @property
    def backend_name(self) -> str:
        """The name of the back-end under test, for the report."""
        if self.profile is not None:
            return self.profile.name
        return f"external:{self.external_socket}"

    def factory(self) -> TargetFactory:
        """The per-worker TargetFactory, created on first use (plain test runs never make one)."""
        if self._factory is None:
            if self.default_profile_error is not None:
                raise UsageError(f"no back-end under test: {self.default_profile_error}")
            hook = self.config.hook

            def maker(label: str, workdir: Path) -> BackendTarget | None:
                made: BackendTarget | None = hook.pytest_vhost_start_backend(
                    config=self.config, label=label, workdir=workdir
                )
                return made

            self._factory = TargetFactory(
                profile=self.profile,
                external_socket=self.external_socket,
                worker=self.worker,
                maker=maker,
            )
        return self._factory

    def capabilities_if_probed(self) -> Capabilities | None:
        """The probed capabilities, without probing."""
        if self._factory is None:
            return None
        return self._factory._capabilities

    # -- hooks -----------------------------------------------------------------------

    def pytest_report_header(self, config: pytest.Config) -> str | None:
        """Name the back-end under test, when the options chose one (quiet otherwise)."""
        if not any(
            _option(config, name)
            for name in (
                "vhost_backend",
                "vhost_profile",
                "vhost_backend_cmd",
                "vhost_backend_socket",
            )
        ):
            return None
        where = self.profile.source if self.profile is not None else "external socket"
        mode = self.profile.socket_mode if self.profile is not None else "listen"
        strict = ", strict" if self.strict else ""
        return f"vhost-conformance: back-end {self.backend_name} ({where}; it {mode}s{strict})"

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(
        self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        """In an xdist worker: the families known to take longest run first (a stable sort, the
        same in every worker, so xdist's load scheduling ends with short cases and the workers
        finish together). Where cases will run: pre-started back-ends are launched now."""
        tiers = parse_tiers(_option(config, "vhost_tier") or ())
        if tiers:
            keep_t: list[pytest.Item] = []
            drop_t: list[pytest.Item] = []
            for item in items:
                meta = _case_for_item(item)
                (keep_t if meta is None or meta.tier in tiers else drop_t).append(item)
            if drop_t:
                config.hook.pytest_deselected(items=drop_t)
                items[:] = keep_t
        wanted = set(_option(config, "vhost_case") or ())
        if wanted:
            keep: list[pytest.Item] = []
            drop: list[pytest.Item] = []
            for item in items:
                meta = _case_for_item(item)
                (keep if meta is not None and meta.id in wanted else drop).append(item)
            if drop:
                config.hook.pytest_deselected(items=drop)
                items[:] = keep
        elif not _option(config, "vhost_qemu"):
            # the qemu tier runs only when asked (--vhost-qemu, or its ids with --vhost-case)
            tiered = [item for item in items if _is_qemu_tier(item)]
            if tiered:
                config.hook.pytest_deselected(items=tiered)
                items[:] = [item for item in items if not _is_qemu_tier(item)]
        cases = [item for item in items if _case_for_item(item) is not None]
        if not cases:
            return
        if self.is_worker:

            def weight(item: pytest.Item) -> float:
                meta = _case_for_item(item)
                return SLOW_FAMILIES.get(meta.family, 0.0) if meta is not None else 0.0

            items.sort(key=weight, reverse=True)
        runs_cases = self.is_worker or not _xdist_controller(config)
        if runs_cases and self.default_profile_error is None and not config.option.collectonly:
            with contextlib.suppress(TargetError):
                self.factory().warm()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        """For a case: check what it needs (features, slow I/O, ...) before any fixture runs."""
        meta = _case_for_item(item)
        if meta is None:
            return
        state = item.stash[_CASE] = _CaseState(meta)
        # every channel the case's fixtures and body open registers its wire trace
        observe_traces(state.add_trace)
        self._check_device_type(meta)
        self._check_needs(meta)
        if meta.requires:
            missing = meta.missing(self.factory().capabilities())
            if missing:
                raise Unsupported(missing)

    def _check_device_type(self, meta: Case) -> None:
        from vhost_conformance.suites.target import BLK_REQUEST_CASES, CONTROL_PLANE_FAMILIES

        kind = self.factory().device_type().name if self.profile is not None else "block"
        if kind != "block" and meta.id in BLK_REQUEST_CASES:
            raise Unsupported(
                "a virtio-blk device",
                f"the back-end is a {kind} device; this case checks with virtio-blk requests",
            )
        if kind != "block" and meta.family not in CONTROL_PLANE_FAMILIES:
            raise Unsupported(
                "a virtio-blk device",
                f"the back-end is a {kind} device; the {meta.family} family drives virtio-blk "
                "(requests or its config space): only the control-plane families "
                f"({', '.join(sorted(CONTROL_PLANE_FAMILIES))}) run on other device types",
            )

    def _check_needs(self, meta: Case) -> None:
        profile = self.profile
        for need in meta.needs:
            if need == "command" and (profile is None or profile.command is None):
                raise Unsupported(
                    "a back-end command", "the suite does not run this back-end itself"
                )
            if need == "slow-io" and (profile is None or profile.slow_io_route() is None):
                why = profile.slow_io_unsupported() if profile is not None else "an external back-end"
                raise Unsupported("slow I/O", why)
            if need == "slow-io" and profile is not None and profile.slow_io_route() == "disk":
                reason = watched.unavailable()
                if reason is not None:
                    raise Unsupported("slow I/O", f"the watched disk: {reason}")
            if need == "shared-disk" and (profile is None or not profile.shares_disk):
                raise Unsupported(
                    "a disk two instances can share", "the profile says shares_disk = false"
                )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, object, object]:
        """Run a case under its whole-case deadline (SIGALRM, main thread only)."""
        if _CASE not in item.stash or self.case_timeout <= 0:
            return (yield)
        if threading.current_thread() is not threading.main_thread():
            return (yield)

        def expire(signum: int, frame: FrameType | None) -> None:
            raise CaseHang(
                f"the case did not finish within --vhost-case-timeout={self.case_timeout:g} s"
            )

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, self.case_timeout)
        try:
            return (yield)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        """Turn a case's outcome into its verdict, and the verdict into the pytest outcome."""
        rep = yield
        state = item.stash.get(_CASE, None)
        if state is None:
            return rep
        state.duration += call.duration
        if call.when == "teardown":
            observe_traces(None)
            if state.verdict is None and call.excinfo is not None:
                state.verdict = Classified(
                    Verdict.ERROR, f"teardown failed: {call.excinfo.exconly()}"
                )
                self._apply(item, state, rep)
            self._record(item, state)
            return rep
        if state.verdict is not None:  # setup already decided it
            return rep
        if call.excinfo is not None:
            state.verdict = self._classify_exception(state, call.excinfo.value)
            if state.verdict.verdict is Verdict.DISCONNECT:
                state.verdict = self._judge_disconnect(state, state.verdict)
        elif call.when == "call":
            state.verdict = self._died(state) or Classified(Verdict.PASS, "the requirement held")
        else:
            return rep
        self._apply(item, state, rep)
        return rep

    def _died(self, state: _CaseState) -> Classified | None:
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

    def _judge_disconnect(self, state: _CaseState, closed: Classified) -> Classified:
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
        served = self._serves_next_connection(target)
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

    def _serves_next_connection(self, target: BackendTarget) -> str | None:
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

    def _classify_exception(self, state: _CaseState, exc: BaseException) -> Classified:
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
        if classified.verdict is Verdict.HANG and classified.log_tail is None:
            return replace(classified, log_tail=log_tail)
        return classified

    def _apply(self, item: pytest.Item, state: _CaseState, rep: pytest.TestReport) -> None:
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
        if deviation is not None and verdict.verdict in _DEVIATION_FAILURES:
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

    def _record(self, item: pytest.Item, state: _CaseState) -> None:
        if state.recorded or state.verdict is None:
            return
        state.recorded = True
        verdict = state.verdict
        deviation = self.deviations.reason_for(state.case.id)
        final = verdict.verdict
        allowed_close = final is Verdict.DISCONNECT and verdict.allowed
        if allowed_close:
            deviation = None
        elif deviation is not None and final in _DEVIATION_FAILURES:
            final = Verdict.XFAIL
        elif deviation is not None and final is Verdict.PASS:
            final = Verdict.XPASS
        else:
            deviation = None
        trace: list[dict[str, Any]] | None = None
        # the qemu tier keeps real QEMU's trace on every verdict (the fidelity evidence)
        if (verdict.verdict in _BAD or verdict.verdict is Verdict.NON_STRICT
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
            exit_status=verdict.exit_status if final is Verdict.CRASH else None,
            allowed=verdict.allowed,
            finding_level=verdict.finding_level,
            behaviour=crash_behaviour(verdict.log_tail)
            if final is Verdict.CRASH and crash_behaviour(verdict.log_tail)
            else verdict.behaviour,
            rerun=self.rerun_command(state.case.id)
            if (verdict.verdict in _BAD or verdict.verdict is Verdict.NON_STRICT)
            and not allowed_close
            else None,
        )
        replaced = self.config.hook.pytest_vhost_case_result(
            config=self.config, item=item, result=result
        )
        self.results.append(replaced if isinstance(replaced, CaseResult) else result)

    # -- collection of results -----------------------------------------------------------

    def rerun_command(self, case_id: str) -> str:
        """The one command that re-runs *case_id* alone against this run's back-end."""
        import shlex

        args = ["vhost-conformance", "run"]
        for option, flag in (
            ("vhost_backend", "--backend"),
            ("vhost_profile", "--profile"),
            ("vhost_backend_cmd", "--backend-cmd"),
        ):
            value = _option(self.config, option)
            if value:
                args += [flag, str(value)]
        if _option(self.config, "vhost_backend_connects"):
            args.append("--backend-connects")
        if len(args) == 2:
            args += ["--backend", self.profile.name if self.profile is not None else "reference"]
        args += ["--case", case_id, "-n", "0", "--report", f"rerun-{case_id}"]
        return shlex.join(args)

    def _measurements(self) -> list[Measurement]:
        found: list[Measurement] = list(self.measured)
        for batch in self.config.hook.pytest_vhost_add_measurements(config=self.config):
            found.extend(batch or [])
        return found

    def _backend_info(self, payloads: list[dict[str, Any]]) -> BackendInfo:
        caps = None
        for payload in payloads:
            if payload.get("capabilities"):
                caps = payload["capabilities"]
                break
        command = self.profile.command if self.profile is not None else None
        extra: dict[str, Any] = {}
        if self.profile is not None:
            extra["profile"] = self.profile.source
        workers = [p.get("worker") for p in payloads if p.get("worker")]
        if workers:
            extra["workers"] = len(workers)
        if caps is None:
            return BackendInfo(name=self.backend_name, command=command, extra=extra)
        for key in (
            "max_mem_slots",
            "config",
            "negotiated_feature_names",
            "negotiated_protocol_feature_names",
        ):
            if caps.get(key) is not None:
                extra[key] = caps[key]
        return BackendInfo(
            name=self.backend_name,
            command=command,
            features=caps["features"],
            feature_names=caps["feature_names"],
            protocol_features=caps["protocol_features"],
            protocol_feature_names=caps["protocol_feature_names"],
            negotiated_features=caps.get("negotiated_features"),
            negotiated_protocol_features=caps.get("negotiated_protocol_features"),
            queue_num=caps["queue_num"],
            extra=extra,
        )

    def _payload(self) -> dict[str, Any]:
        caps = self.capabilities_if_probed()
        return {
            "worker": self.worker,
            "results": [r.to_dict() for r in self.results],
            # asked only where cases ran (an idle xdist worker adds nothing)
            "measurements": [m.to_dict() for m in self._measurements()] if self.results else [],
            "capabilities": None if caps is None else _capabilities_payload(caps),
        }

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        """xdist controller: a worker finished; keep its results."""
        output = getattr(node, "workeroutput", None) or {}
        payload = output.get(WORKER_KEY)
        if isinstance(payload, dict):
            self.worker_payloads.append(payload)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Stop the worker's back-ends; hand results to the controller or write the report."""
        if self._factory is not None:
            self._factory.close()
        if self.is_worker:
            output: dict[str, Any] = getattr(self.config, "workeroutput")  # noqa: B009
            output[WORKER_KEY] = self._payload()
            return
        # an xdist controller runs no case itself: the workers' payloads are the whole run
        payloads = self.worker_payloads or [self._payload()]
        self.write_report(payloads)

    def write_report(self, payloads: list[dict[str, Any]]) -> Path | None:
        """Merge the payloads of this process and the workers and write the report files."""
        cases = [CaseResult.from_dict(c) for p in payloads for c in p.get("results", [])]
        if self.report_dir is None:
            return None
        cases.sort(key=lambda c: (c.family, c.id))
        cases = assign_see(cases)
        # per failing emulated case: did real QEMU confirm it (suites/qemu_confirm.py)
        cases = confirm_with_qemu(cases, tier_ran=bool(_option(self.config, "vhost_qemu")))
        report = Report(
            suite_version=vhost_conformance.__version__,
            started=datetime.datetime.fromtimestamp(self.started, datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
            duration_s=time.time() - self.started,
            backend=self._backend_info(payloads),
            cases=cases,
            measurements=[
                Measurement.from_dict(m) for p in payloads for m in p.get("measurements", [])
            ],
            strict=self.strict,
            argv=list(sys.argv[1:]),
        )
        replaced = self.config.hook.pytest_vhost_report(config=self.config, report=report)
        if isinstance(replaced, Report):
            report = replaced
        try:
            from vhost_conformance.reports import write_all
        except ImportError:  # pragma: no cover - renderers missing: the JSON is the truth
            return report.save(self.report_dir / "report.json")
        return write_all(report, self.report_dir)["json"]


def qemu_agreement(caps: Capabilities) -> tuple[int, int]:
    """What a QEMU 11.1.3-like session (``frontend.device.Session`` defaults: one split queue,
    EVENT_IDX, INDIRECT, inflight-migration=on) agrees with a back-end offering ``caps``:
    (the virtio features of SET_FEATURES, the protocol features of SET_PROTOCOL_FEATURES)."""
    import socket as _socket

    from vhost_conformance.frontend.device import Session
    from vhost_conformance.frontend.memory import GuestMemory
    from vhost_conformance.frontend.protocol import VirtioFeature, has
    from vhost_conformance.frontend.sequences import agree_protocol

    protocol = 0
    if has(caps.features, VirtioFeature.PROTOCOL_FEATURES):
        protocol = agree_protocol(caps.protocol_features)  # what Session.connect sends
    ours, theirs = _socket.socketpair()
    theirs.close()
    channel = Channel(ours)
    try:
        session = Session(channel, GuestMemory())
        session.negotiated.features = caps.features
        features = session.driver_features()
    finally:
        channel.close()
    return features, protocol


def _capabilities_payload(caps: Capabilities) -> dict[str, Any]:
    """What report.json's ``backend`` says about the probed back-end (JSON-able)."""
    from vhost_conformance.frontend.protocol import (
        ProtocolFeature,
        device_feature_names,
        feature_names,
    )

    features, protocol = qemu_agreement(caps)
    return {
        "features": caps.features,
        "feature_names": caps.feature_names(),
        "protocol_features": caps.protocol_features,
        "protocol_feature_names": caps.protocol_feature_names(),
        "queue_num": caps.queue_num,
        "negotiated_features": features,
        "negotiated_protocol_features": protocol,
        "negotiated_feature_names": device_feature_names(features, caps.device_type),
        "negotiated_protocol_feature_names": feature_names(protocol, ProtocolFeature),
        "max_mem_slots": caps.max_mem_slots,
        "config": _config_summary(caps) or None,
    }


def _config_summary(caps: Capabilities) -> dict[str, object]:
    """The virtio-blk config fields every layout has (VIRTIO 1.x 5.2.4), from the probe."""
    import struct

    config = caps.config
    if config is None or len(config) < 36:
        return {}
    capacity, size_max, seg_max = struct.unpack_from("<QII", config, 0)
    (blk_size,) = struct.unpack_from("<I", config, 20)
    (num_queues,) = struct.unpack_from("<H", config, 34)
    return {
        "config_len": len(config),
        "capacity_sectors": capacity,
        "size_max": size_max,
        "seg_max": seg_max,
        "blk_size": blk_size,
        "num_queues": num_queues,
    }


def _xdist_controller(config: pytest.Config) -> bool:
    """True in the pytest process that hands cases to xdist workers (it runs none itself)."""
    numprocesses = getattr(config.option, "numprocesses", None)
    dist = getattr(config.option, "dist", "no")
    return not hasattr(config, "workerinput") and bool(numprocesses) and dist != "no"


def parse_tiers(values: Iterable[str]) -> frozenset[Tier]:
    """The tiers named by ``--vhost-tier``/``--tier`` values (each a comma-separated list);
    an unknown name is a usage error naming the known ones."""
    tiers: set[Tier] = set()
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if not name:
                continue
            try:
                tiers.add(Tier(name))
            except ValueError:
                known = ", ".join(t.value for t in Tier)
                raise pytest.UsageError(f"unknown tier {name!r} (known: {known})") from None
    return frozenset(tiers)


def _case_for_item(item: pytest.Item) -> Case | None:
    """The case an item runs: from @case, or from a bare ``vhost_case`` marker via the catalogue."""
    meta = case_of(getattr(item, "function", None))
    if meta is not None:
        return meta
    marker = item.get_closest_marker(MARKER)
    if marker is None or not marker.args:
        return None
    return resolve(str(marker.args[0]))


def _is_qemu_tier(item: pytest.Item) -> bool:
    meta = _case_for_item(item)
    return meta is not None and meta.family == QEMU_FAMILY


def register_trace(request: pytest.FixtureRequest, trace: object) -> None:
    """Attach a wire trace (anything with ``to_json()``) to the current case's report."""
    state = request.node.stash.get(_CASE, None)
    if state is not None:
        state.add_trace(trace)


# --------------------------------------------------------------------------- fixtures


def _run(config: pytest.Config) -> VhostRun:
    return config.stash[_RUN]


@pytest.fixture(scope="session")
def vhost_backend_targets(pytestconfig: pytest.Config) -> TargetFactory:
    """The per-worker TargetFactory: one back-end per case, capabilities probed once."""
    return _run(pytestconfig).factory()


@pytest.fixture(scope="session")
def vhost_timeout(pytestconfig: pytest.Config) -> float:
    """The deadline of each reply from the back-end, seconds (--vhost-timeout)."""
    return _run(pytestconfig).timeout


@pytest.fixture
def vhost_capabilities(vhost_backend_targets: TargetFactory) -> Capabilities:
    """What the back-end under test offers (probed once per worker, cached)."""
    return vhost_backend_targets.capabilities()


@pytest.fixture
def vhost_case(request: pytest.FixtureRequest) -> Case | None:
    """The current test's case metadata, or None for a test that is not a case."""
    return _case_for_item(request.node)


@pytest.fixture
def vhost_target_factory(
    request: pytest.FixtureRequest, vhost_backend_targets: TargetFactory
) -> Iterator[Callable[[str], BackendTarget]]:
    """``make(label)`` -> a started back-end of this case; all are stopped at teardown."""
    made: list[BackendTarget] = []
    state = request.node.stash.get(_CASE, None)

    def make(label: str = "extra") -> BackendTarget:
        target = vhost_backend_targets.new(label)
        made.append(target)
        if state is not None:
            state.targets.append(target)
        target.start()
        return target

    try:
        yield make
    finally:
        for target in made:
            with contextlib.suppress(TargetError, OSError):
                vhost_backend_targets.release(target)


@pytest.fixture
def vhost_target(
    request: pytest.FixtureRequest, vhost_target_factory: Callable[[str], BackendTarget]
) -> BackendTarget:
    """A started back-end under test, this case's own (fresh for every case)."""
    meta = _case_for_item(request.node)
    return vhost_target_factory(meta.id if meta is not None else request.node.name)


@pytest.fixture
def vhost_channel(
    request: pytest.FixtureRequest, vhost_target: BackendTarget, vhost_timeout: float
) -> Iterator[Channel]:
    """A front-end Channel connected to ``vhost_target``; its wire trace goes to the report."""
    channel = Channel(vhost_target.connect_socket(vhost_timeout))
    register_trace(request, channel.trace)
    try:
        yield channel
    finally:
        channel.close()


@pytest.fixture
def vhost_measure(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``measure(name, value, unit="ms", **parameters)``: add a run-wide figure to
    ``report.measurements`` (the case id is added to its parameters as ``case``)."""
    run = _run(request.config)
    meta = _case_for_item(request.node)

    def measure(name: str, value: float, unit: str = "ms", **parameters: object) -> None:
        params: dict[str, object] = dict(parameters)
        if meta is not None:
            params.setdefault("case", meta.id)
        run.measured.append(
            Measurement(name=name, unit=unit, value=float(value), parameters=params)
        )

    return measure


@pytest.fixture
def vhost_measurements(request: pytest.FixtureRequest) -> dict[str, float]:
    """This case's measurements (name -> value), copied into its CaseResult."""
    state = request.node.stash.get(_CASE, None)
    if state is None:
        return {}
    measurements: dict[str, float] = state.measurements
    return measurements
