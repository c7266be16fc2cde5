"""The fixtures of the plugin (a plugin module of their own, loaded by the plugin's
``pytest_configure``): the back-end under test and its factory, a channel to it, the case's
metadata and deadline, and the case's and the run's measurements (see ``plugin``'s docstring)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
from vhost_conformance.frontend.channel import Channel
from vhost_conformance.reports.model import Measurement
from vhost_conformance.suites.capture import CASE, case_for_item, register_trace
from vhost_conformance.suites.model import Case
from vhost_conformance.suites.plugin import RUN, VhostRun
from vhost_conformance.suites.target import BackendTarget, Capabilities, TargetError, TargetFactory


def run_of(config: pytest.Config) -> VhostRun:
    """The plugin's state of this pytest process."""
    return config.stash[RUN]


@pytest.fixture(scope="session")
def vhost_backend_targets(pytestconfig: pytest.Config) -> TargetFactory:
    """The per-worker TargetFactory: one back-end per case, capabilities probed once."""
    return run_of(pytestconfig).factory()


@pytest.fixture(scope="session")
def vhost_timeout(pytestconfig: pytest.Config) -> float:
    """The deadline of each reply from the back-end, seconds (--vhost-timeout)."""
    return run_of(pytestconfig).timeout


@pytest.fixture
def vhost_capabilities(vhost_backend_targets: TargetFactory) -> Capabilities:
    """What the back-end under test offers (probed once per worker, cached)."""
    return vhost_backend_targets.capabilities()


@pytest.fixture
def vhost_case(request: pytest.FixtureRequest) -> Case | None:
    """The current test's case metadata, or None for a test that is not a case."""
    return case_for_item(request.node)


@pytest.fixture
def vhost_target_factory(
    request: pytest.FixtureRequest, vhost_backend_targets: TargetFactory
) -> Iterator[Callable[[str], BackendTarget]]:
    """``make(label)`` -> a started back-end of this case; all are stopped at teardown."""
    made: list[BackendTarget] = []
    state = request.node.stash.get(CASE, None)

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
    meta = case_for_item(request.node)
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
    run = run_of(request.config)
    meta = case_for_item(request.node)

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
    state = request.node.stash.get(CASE, None)
    if state is None:
        return {}
    measurements: dict[str, float] = state.measurements
    return measurements
