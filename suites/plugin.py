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
``--vhost-set-mem-table``       a front-end without CONFIGURE_MEM_SLOTS (QEMU 11.1.3 then sends
                                SET_MEM_TABLE, not ADD_MEM_REG): every session's memory goes
                                by SET_MEM_TABLE; cases that need the bit end unsupported
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
import os
import signal
import threading
import time
from collections.abc import Generator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from vhost_conformance.frontend.channel import WireTrace, observe_traces
from vhost_conformance.frontend.protocol import ProtocolFeature
from vhost_conformance.reports.model import (
    CaseResult,
    KnownDeviations,
    Measurement,
    Verdict,
)
from vhost_conformance.suites import newhooks, watched
from vhost_conformance.suites.capture import (
    CASE,
    CaseState,
    Judge,
    case_for_item,
    is_qemu_tier,
)
from vhost_conformance.suites.capture import QEMU_FAMILY as QEMU_FAMILY
from vhost_conformance.suites.capture import VhostNonStrictWarning as VhostNonStrictWarning
from vhost_conformance.suites.capture import crash_behaviour as crash_behaviour
from vhost_conformance.suites.capture import may_close as may_close
from vhost_conformance.suites.capture import register_trace as register_trace
from vhost_conformance.suites.model import MARKER, Case, CaseHang, Classified, Unsupported
from vhost_conformance.suites.options import (
    add_options,
    backend_chosen,
    option,
    profile_from_options,
    rerun_command,
)
from vhost_conformance.suites.options import parse_tiers as parse_tiers
from vhost_conformance.suites.run_report import assign_see as assign_see
from vhost_conformance.suites.run_report import backend_info, capabilities_payload, write_report
from vhost_conformance.suites.run_report import qemu_agreement as qemu_agreement
from vhost_conformance.suites.target import (
    BLK_REQUEST_CASES,
    CONTROL_PLANE_FAMILIES,
    BackendTarget,
    Capabilities,
    TargetError,
    TargetFactory,
    UsageError,
)

#: The module of the I/O fixtures, loaded as a plugin module by :func:`pytest_configure`.
DRIVERS_PLUGIN = "vhost_conformance.suites.drivers"
#: The module of the plugin's own fixtures (vhost_target, vhost_channel, ...), loaded likewise.
FIXTURES_PLUGIN = "vhost_conformance.suites.fixtures"

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

#: workeroutput key carrying a worker's results to the controller.
WORKER_KEY = "vhost_conformance"


def pytest_addoption(parser: pytest.Parser) -> None:
    """The vhost-conformance options (suites/options.py)."""
    add_options(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Add the hook specs of newhooks.py."""
    pluginmanager.add_hookspecs(newhooks)


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker and the per-run state (validating the options early)."""
    config.addinivalue_line(
        "markers", f"{MARKER}(id): the test is the vhost-conformance case with this id"
    )
    state = VhostRun(config)
    config.stash[RUN] = state
    config.pluginmanager.register(state, "vhost-conformance-run")
    # the plugin's fixtures, then the shared I/O fixtures (vhost_session, vhost_memory,
    # make_session, ...) for vendors' own tests outside the package; each a no-op when ``-p``
    # already loaded the module
    config.pluginmanager.import_plugin(FIXTURES_PLUGIN)
    config.pluginmanager.import_plugin(DRIVERS_PLUGIN)


#: Where the plugin keeps its VhostRun (one per pytest process).
RUN = pytest.StashKey["VhostRun"]()


class VhostRun:
    """The plugin's state for one pytest process (controller or xdist worker)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.strict = bool(option(config, "vhost_strict"))
        #: --vhost-set-mem-table: no session negotiates CONFIGURE_MEM_SLOTS (QEMU-TRACES 4)
        self.set_mem_table = bool(option(config, "vhost_set_mem_table"))
        if self.set_mem_table:
            from vhost_conformance.frontend import sequences

            sequences.QEMU_PROTOCOL_MASK &= ~(1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
        self.timeout = float(option(config, "vhost_timeout"))
        self.case_timeout = float(option(config, "vhost_case_timeout"))
        report_dir = option(config, "vhost_report")
        self.report_dir = Path(report_dir) if report_dir else None
        explicit = backend_chosen(config)
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
        self.deviations = self._deviations(option(config, "vhost_known_deviations"))
        self.judge = Judge(self.timeout, self.strict, self.deviations, self.rerun_command)
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
        if not backend_chosen(config):
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
        tiers = parse_tiers(option(config, "vhost_tier") or ())
        if tiers:
            keep_t: list[pytest.Item] = []
            drop_t: list[pytest.Item] = []
            for item in items:
                meta = case_for_item(item)
                (keep_t if meta is None or meta.tier in tiers else drop_t).append(item)
            if drop_t:
                config.hook.pytest_deselected(items=drop_t)
                items[:] = keep_t
        wanted = set(option(config, "vhost_case") or ())
        if wanted:
            keep: list[pytest.Item] = []
            drop: list[pytest.Item] = []
            for item in items:
                meta = case_for_item(item)
                (keep if meta is not None and meta.id in wanted else drop).append(item)
            if drop:
                config.hook.pytest_deselected(items=drop)
                items[:] = keep
        elif not option(config, "vhost_qemu"):
            # the qemu tier runs only when asked (--vhost-qemu, or its ids with --vhost-case)
            tiered = [item for item in items if is_qemu_tier(item)]
            if tiered:
                config.hook.pytest_deselected(items=tiered)
                items[:] = [item for item in items if not is_qemu_tier(item)]
        cases = [item for item in items if case_for_item(item) is not None]
        if not cases:
            return
        if self.is_worker:

            def weight(item: pytest.Item) -> float:
                meta = case_for_item(item)
                return SLOW_FAMILIES.get(meta.family, 0.0) if meta is not None else 0.0

            items.sort(key=weight, reverse=True)
        runs_cases = self.is_worker or not _xdist_controller(config)
        if runs_cases and self.default_profile_error is None and not config.option.collectonly:
            with contextlib.suppress(TargetError):
                self.factory().warm()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        """For a case: check what it needs (features, slow I/O, ...) before any fixture runs."""
        meta = case_for_item(item)
        if meta is None:
            return
        state = item.stash[CASE] = CaseState(meta)
        # every channel the case's fixtures and body open registers its wire trace, whose
        # feature words are named by the back-end's device type once it is known
        kind: list[str] = []

        def observe(trace: WireTrace) -> None:
            if trace.device_type is None and kind:
                trace.device_type = kind[0]
            state.add_trace(trace)

        observe_traces(observe)
        kind.append(self._check_device_type(meta))
        self._check_needs(meta)
        if meta.requires:
            missing = meta.missing(self.factory().capabilities())
            if missing:
                raise Unsupported(missing)
            if self.set_mem_table and ProtocolFeature.CONFIGURE_MEM_SLOTS in meta.requires:
                raise Unsupported(
                    "CONFIGURE_MEM_SLOTS (bit 15) negotiated",
                    "this run drives the back-end as a front-end without the bit "
                    "(--vhost-set-mem-table)",
                )

    def _check_device_type(self, meta: Case) -> str:
        """The back-end's device type name; Unsupported for a case that needs a blk device."""
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
        return kind

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
        if CASE not in item.stash or self.case_timeout <= 0:
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
        state = item.stash.get(CASE, None)
        if state is None:
            return rep
        state.duration += call.duration
        if call.when == "teardown":
            observe_traces(None)
            if state.verdict is None and call.excinfo is not None:
                state.verdict = Classified(
                    Verdict.ERROR, f"teardown failed: {call.excinfo.exconly()}"
                )
                self.judge.apply(item, state, rep)
            self._record(item, state)
            return rep
        if state.verdict is not None:  # setup already decided it
            return rep
        if call.excinfo is not None:
            state.verdict = self.judge.classify_exception(state, call.excinfo.value)
            if state.verdict.verdict is Verdict.DISCONNECT:
                state.verdict = self.judge.judge_disconnect(state, state.verdict)
        elif call.when == "call":
            state.verdict = self.judge.died(state) or Classified(Verdict.PASS, "the requirement held")
        else:
            return rep
        self.judge.apply(item, state, rep)
        return rep

    def _record(self, item: pytest.Item, state: CaseState) -> None:
        result = self.judge.result(item, state)
        if result is None:
            return
        replaced = self.config.hook.pytest_vhost_case_result(
            config=self.config, item=item, result=result
        )
        self.results.append(replaced if isinstance(replaced, CaseResult) else result)

    # -- collection of results -----------------------------------------------------------

    def rerun_command(self, case_id: str) -> str:
        """The one command that re-runs *case_id* alone against this run's back-end."""
        return rerun_command(self.config, self.profile, case_id)

    def _measurements(self) -> list[Measurement]:
        found: list[Measurement] = list(self.measured)
        for batch in self.config.hook.pytest_vhost_add_measurements(config=self.config):
            found.extend(batch or [])
        return found

    def _payload(self) -> dict[str, Any]:
        caps = self.capabilities_if_probed()
        return {
            "worker": self.worker,
            "results": [r.to_dict() for r in self.results],
            # asked only where cases ran (an idle xdist worker adds nothing)
            "measurements": [m.to_dict() for m in self._measurements()] if self.results else [],
            "capabilities": None if caps is None else capabilities_payload(caps),
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
        if self.report_dir is None:
            return None
        return write_report(
            self.config,
            self.report_dir,
            payloads,
            started=self.started,
            strict=self.strict,
            backend=backend_info(self.backend_name, self.profile, payloads),
        )


def _xdist_controller(config: pytest.Config) -> bool:
    """True in the pytest process that hands cases to xdist workers (it runs none itself)."""
    numprocesses = getattr(config.option, "numprocesses", None)
    dist = getattr(config.option, "dist", "no")
    return not hasattr(config, "workerinput") and bool(numprocesses) and dist != "no"
