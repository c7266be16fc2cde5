"""Hooks a vendor's conftest.py or plugin can implement to customise the suite without forking.

They are added to pytest by the vhost-conformance plugin (``pytest_addhooks``); implement them
like any pytest hook, by name, in a ``conftest.py``::

    def pytest_vhost_start_backend(config, label, workdir):
        # our back-end needs a config file written first
        (workdir / "my.conf").write_text(...)
        return CommandTarget(load_profile("my-profile.toml"), workdir)

- ``pytest_vhost_start_backend``: make the back-end under test for one case (or for the
  capability probe, ``label == "probe"``); return None to let the profile decide.
- ``pytest_vhost_case_result``: see (and replace) each case's result as it is recorded.
- ``pytest_vhost_add_measurements``: add run-wide figures to report.json (stop latency,
  migration downtime, IOPS measured by the vendor's own tools).
- ``pytest_vhost_report``: last look at the whole report before it is written.

All of them run in the process that runs the cases (each pytest-xdist worker), except
``pytest_vhost_report``, which runs where the report is written (the controller).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from vhost_conformance.reports.model import CaseResult, Measurement, Report
    from vhost_conformance.suites.target import BackendTarget


@pytest.hookspec(firstresult=True)
def pytest_vhost_start_backend(
    config: pytest.Config, label: str, workdir: Path
) -> BackendTarget | None:
    """Return the back-end under test for one case (not necessarily started: the plugin calls
    ``start()``), owning ``workdir``; or None to use the profile / command-line options.

    ``label`` is the case id (or ``probe`` for the one instance that probes capabilities).
    """


@pytest.hookspec(firstresult=True)
def pytest_vhost_case_result(
    config: pytest.Config, item: pytest.Item, result: CaseResult
) -> CaseResult | None:
    """Called when a case's result is recorded; return a replacement CaseResult (e.g. with
    parameters or measurements added) or None to keep it."""


def pytest_vhost_add_measurements(config: pytest.Config) -> list[Measurement] | None:
    """Return run-wide measurements to add to report.json; called at the end of the run in each
    process that ran cases (each busy pytest-xdist worker, or the one pytest process)."""


@pytest.hookspec(firstresult=True)
def pytest_vhost_report(config: pytest.Config, report: Report) -> Report | None:
    """Called with the merged report just before it is written; return a replacement or None."""
