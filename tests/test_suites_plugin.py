"""Acceptance tests of the pytest plugin, end to end through pytester (a throwaway test file
run by a pytest in a subprocess, the plugin loaded through its pytest11 entry point)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import time

import pytest
from test_suites_fakebackend import fake_command

pytest_plugins = ["pytester"]

VENDOR_CASES = """
import time

from vhost_conformance.frontend.protocol import FrontendRequest, ProtocolFeature
from vhost_conformance.suites.model import MUST, SHOULD, CaseNonStrict, case

META = dict(family="handshake", clause="vhost-user.rst: GET_FEATURES",
            requirement="GET_FEATURES gets a u64 reply.")


@case("VU-VENDOR-1", title="GET_FEATURES is answered", level=MUST, **META)
def test_get_features(vhost_channel, vhost_timeout):
    vhost_channel.call(FrontendRequest.GET_FEATURES, timeout=vhost_timeout)


@case("VU-VENDOR-2", title="needs in-flight tracking", level=MUST,
      requires=[ProtocolFeature.INFLIGHT_SHMFD], **META)
def test_needs_inflight(vhost_channel):
    raise AssertionError("never runs: the fake back-end does not offer bit 12")


@case("VU-VENDOR-3", title="a SHOULD the back-end misses", level=SHOULD, **META)
def test_should(vhost_target):
    raise CaseNonStrict("the back-end did not do what it should")


def test_not_a_case():
    assert 1 + 1 == 2
"""

SUICIDAL_CASES = """
import os
import signal

from vhost_conformance.suites.model import MUST, case

META = dict(family="reconnect", level=MUST, clause="none", requirement="survives.")


@case("VU-VENDOR-6", title="dies unannounced", **META)
def test_dies_unannounced(vhost_target):
    os.kill(vhost_target.pid, signal.SIGKILL)
    vhost_target.wait_exit(5)


@case("VU-VENDOR-7", title="dies as the case asked", **META)
def test_dies_as_asked(vhost_target):
    vhost_target.expect_exit()
    os.kill(vhost_target.pid, signal.SIGKILL)
    vhost_target.wait_exit(5)
"""

SLEEPING_CASE = """
import time

from vhost_conformance.suites.model import MUST, case


@case("VU-VENDOR-9", title="sleeps", family="handshake", level=MUST,
      clause="none", requirement="returns in time.")
def test_sleeps(vhost_target):
    time.sleep(60)
"""


HOOKS_CONFTEST = f"""
from vhost_conformance.reports.model import Measurement
from vhost_conformance.suites.target import CommandTarget, command_profile

FAKE = {fake_command("ok")!r}


def pytest_vhost_start_backend(config, label, workdir):
    return CommandTarget(command_profile(FAKE), workdir)


def pytest_vhost_add_measurements(config):
    return [Measurement("vendor_iops", "IOPS", 1234.0, {{"queue_depth": 32}})]


def pytest_vhost_case_result(config, item, result):
    from dataclasses import replace
    return replace(result, parameters={{**result.parameters, "vendor": "acme"}})


def pytest_vhost_report(config, report):
    from dataclasses import replace
    return replace(report, argv=["--acme"])
"""

MEASURING_CASE = """
from vhost_conformance.frontend.protocol import FrontendRequest
from vhost_conformance.suites.model import MUST, case


@case("VU-VENDOR-5", title="measures", family="handshake", level=MUST,
      clause="none", requirement="GET_FEATURES is answered.")
def test_measures(vhost_channel, vhost_timeout, vhost_measurements, vhost_case):
    vhost_channel.call(FrontendRequest.GET_FEATURES, timeout=vhost_timeout)
    vhost_measurements["get_features_ms"] = 0.25
    assert vhost_case.id == "VU-VENDOR-5"
"""


def _report(path: pathlib.Path) -> dict[str, dict[str, object]]:
    data = json.loads((path / "report.json").read_text())
    return {case["id"]: case for case in data["cases"]}


def _run(pytester: pytest.Pytester, *args: str, timeout: float = 180) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=timeout)


def test_crashing_backend_gives_crash_with_exit_status(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_vendor=VENDOR_CASES)
    report = pytester.path / "report"
    result = _run(
        pytester,
        "-k",
        "get_features or not_a_case",
        f"--vhost-backend-cmd={fake_command('die')}",
        f"--vhost-report={report}",
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*VU-VENDOR-1 [[]MUST[]] crash*status 3*"])
    case = _report(report)["VU-VENDOR-1"]
    assert case["verdict"] == "crash"
    assert "status 3" in str(case["reason"])
    assert "exiting on purpose" in str(case["log_tail"])
    assert case["trace"], "a crashed case carries its wire trace"
    assert {p.name for p in report.iterdir()} >= {
        "report.json",
        "junit.xml",
        "summary.md",
        "report.html",
    }


def test_signal_death_is_a_crash_with_the_signal(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_vendor=VENDOR_CASES)
    report = pytester.path / "report"
    result = _run(
        pytester,
        "-k",
        "get_features",
        f"--vhost-backend-cmd={fake_command('segv')}",
        f"--vhost-report={report}",
    )
    result.assert_outcomes(failed=1)
    case = _report(report)["VU-VENDOR-1"]
    assert case["verdict"] == "crash"
    assert "status -11" in str(case["reason"])


def test_death_after_a_passing_case_is_a_crash_unless_expected(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suicide=SUICIDAL_CASES)
    report = pytester.path / "report"
    result = _run(pytester, f"--vhost-backend-cmd={fake_command('ok')}", f"--vhost-report={report}")
    result.assert_outcomes(passed=1, failed=1)
    cases = _report(report)
    assert cases["VU-VENDOR-6"]["verdict"] == "crash"
    assert "status -9" in str(cases["VU-VENDOR-6"]["reason"])
    assert cases["VU-VENDOR-7"]["verdict"] == "pass"


def test_silent_backend_gives_hang_within_the_deadline(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_vendor=VENDOR_CASES)
    report = pytester.path / "report"
    started = time.monotonic()
    result = _run(
        pytester,
        "-k",
        "get_features",
        f"--vhost-backend-cmd={fake_command('hang')}",
        "--vhost-timeout=1",
        f"--vhost-report={report}",
    )
    elapsed = time.monotonic() - started
    result.assert_outcomes(failed=1)
    case = _report(report)["VU-VENDOR-1"]
    assert case["verdict"] == "hang", case
    assert "GET_FEATURES" in str(case["reason"])
    assert elapsed < 60, f"a 1 s reply deadline took {elapsed:.1f} s to give hang"


def test_case_watchdog_gives_hang(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_sleepy=SLEEPING_CASE)
    report = pytester.path / "report"
    started = time.monotonic()
    result = _run(
        pytester,
        f"--vhost-backend-cmd={fake_command('ok')}",
        "--vhost-case-timeout=2",
        f"--vhost-report={report}",
    )
    result.assert_outcomes(failed=1)
    assert _report(report)["VU-VENDOR-9"]["verdict"] == "hang"
    assert time.monotonic() - started < 50


def test_pass_unsupported_and_non_strict(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_vendor=VENDOR_CASES)
    report = pytester.path / "report"
    result = _run(
        pytester, "-rs", f"--vhost-backend-cmd={fake_command('ok')}", f"--vhost-report={report}"
    )
    result.assert_outcomes(passed=3, skipped=1, warnings=1)
    result.stdout.fnmatch_lines(
        ["vhost-conformance: back-end command (--vhost-backend-cmd; it listens)"]
    )
    result.stdout.fnmatch_lines(
        ["*unsupported: the back-end does not offer protocol feature INFLIGHT_SHMFD (bit 12)*"]
    )
    cases = _report(report)
    assert cases["VU-VENDOR-1"]["verdict"] == "pass"
    assert cases["VU-VENDOR-2"]["verdict"] == "unsupported"
    assert cases["VU-VENDOR-3"]["verdict"] == "non-strict"
    assert "test_not_a_case" not in json.dumps(cases), "only case tests are reported"
    backend = json.loads((report / "report.json").read_text())["backend"]
    assert "REPLY_ACK" in backend["protocol_feature_names"], backend


def test_strict_makes_non_strict_fail(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_vendor=VENDOR_CASES)
    result = _run(
        pytester, "-k", "should", f"--vhost-backend-cmd={fake_command('ok')}", "--vhost-strict"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*VU-VENDOR-3 [[]SHOULD[]] non-strict*--vhost-strict*"])


def test_known_deviation_turns_failure_into_xfail(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_vendor=VENDOR_CASES)
    deviations = pytester.path / "deviations.toml"
    deviations.write_text('[[deviation]]\nid = "VU-VENDOR-1"\nreason = "dies on purpose"\n')
    report = pytester.path / "report"
    result = _run(
        pytester,
        "-k",
        "get_features",
        f"--vhost-backend-cmd={fake_command('die')}",
        f"--vhost-known-deviations={deviations}",
        f"--vhost-report={report}",
    )
    result.assert_outcomes(xfailed=1)
    case = _report(report)["VU-VENDOR-1"]
    assert (case["verdict"], case["deviation"]) == ("xfail", "dies on purpose")


def test_handshake_suite_fails_bad_reply_flags(pytester: pytest.Pytester) -> None:
    report = pytester.path / "report"
    result = _run(
        pytester,
        "--pyargs",
        "vhost_conformance.suites.test_handshake",
        "-k",
        "reply_flags or version_1",
        f"--vhost-backend-cmd={fake_command('badflags')}",
        f"--vhost-report={report}",
    )
    # the capability probe does not judge flags; VU-HDR-2 does
    cases = _report(report)
    assert cases["VU-HDR-2"]["verdict"] == "fail"
    assert "expected 0x5, seen 0xd" in str(cases["VU-HDR-2"]["reason"])
    # the violation record reaches the report: what was expected and what was seen
    assert (cases["VU-HDR-2"]["expected"], cases["VU-HDR-2"]["seen"]) == ("0x5", "0xd")
    assert cases["VU-HDR-1"]["verdict"] == "pass", "version bits of 0xd are still 1"
    result.assert_outcomes(passed=2, failed=1)


def test_results_of_xdist_workers_are_merged(pytester: pytest.Pytester) -> None:
    report = pytester.path / "report"
    result = _run(
        pytester,
        "-n",
        "2",
        "--pyargs",
        "vhost_conformance.suites.test_handshake",
        f"--vhost-backend-cmd={fake_command('ok')}",
        f"--vhost-report={report}",
    )
    cases = _report(report)
    from vhost_conformance.suites import test_handshake
    from vhost_conformance.suites.model import defined_cases

    assert set(cases) == set(defined_cases(vars(test_handshake).values()))
    assert all(c["verdict"] in ("pass", "unsupported", "non-strict") for c in cases.values()), {
        i: (c["verdict"], c["reason"]) for i, c in cases.items()
    }
    assert result.ret == 0


@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_vendor_hooks_and_measurements(pytester: pytest.Pytester, workers: list[str]) -> None:
    pytester.makeconftest(HOOKS_CONFTEST)
    pytester.makepyfile(test_measure=MEASURING_CASE)
    report = pytester.path / "report"
    # the profile says reference; the vendor's hook runs the fake back-end instead
    result = _run(pytester, *workers, "--vhost-backend=reference", f"--vhost-report={report}")
    result.assert_outcomes(passed=1)
    data = json.loads((report / "report.json").read_text())
    (case,) = data["cases"]
    assert case["measurements"] == {"get_features_ms": 0.25}
    assert case["parameters"] == {"vendor": "acme"}
    assert [m["name"] for m in data["measurements"]] == ["vendor_iops"], "once, not per process"
    assert data["argv"] == ["--acme"]


def test_unrelated_runs_are_not_disturbed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_one():\n    assert True\n")
    result = _run(pytester)
    result.assert_outcomes(passed=1)
    assert "vhost-conformance:" not in result.stdout.str()
    assert not (pytester.path / "report").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vhost-backend-cmd=my-server --disk {disk}"], "*no {socket} placeholder*"),
        (["--vhost-backend-cmd=my-server --socket {sock}"], "*unknown placeholder(s) {sock}*"),
        (["--vhost-backend=no-such-backend"], "*unknown back-end profile 'no-such-backend'*"),
        (["--vhost-backend=qsd", "--vhost-backend-cmd=x {socket}"], "*give only one of*"),
    ],
)
def test_usage_errors_are_clear(pytester: pytest.Pytester, args: list[str], message: str) -> None:
    pytester.makepyfile(test_plain="def test_one():\n    assert True\n")
    result = _run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def _reference_backend_missing() -> bool:
    return importlib.util.find_spec("vhost_conformance.backend.__main__") is None


@pytest.mark.skipif(
    _reference_backend_missing(),
    reason="the reference back-end (backend/__main__.py) is not there yet",
)
def test_suite_runs_against_the_reference_backend(pytester: pytest.Pytester) -> None:
    """The CI proof: the whole default suite, two workers, against the reference back-end;
    every case passes or is unsupported (no fail, hang, crash, error, non-strict, xfail)."""
    report = pytester.path / "report"
    started = time.monotonic()
    result = _run(
        pytester,
        "-n",
        "2",
        "--pyargs",
        "vhost_conformance.suites",
        "--vhost-backend=reference",
        f"--vhost-report={report}",
        timeout=900,
    )
    wall = time.monotonic() - started
    data = json.loads((report / "report.json").read_text())
    results = data["cases"]
    outcomes = result.parseoutcomes()
    ran = sum(outcomes.get(k, 0) for k in ("passed", "failed", "skipped", "xfailed", "xpassed"))
    counts: dict[str, int] = {}
    for c in results:
        counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    print(f"full suite against the reference back-end, -n 2: {wall:.1f} s wall, {counts}")
    assert len(results) == ran > 100, "every case the run collected is in report.json"
    bad = [
        (c["id"], c["parameters"], c["verdict"], c["reason"])
        for c in results
        if c["verdict"] not in ("pass", "unsupported")
    ]
    assert not bad
    assert result.ret == 0
    import pkgutil

    import vhost_conformance.suites as suites
    from vhost_conformance.suites.model import MUST, defined_cases

    musts = set()
    for module in pkgutil.iter_modules(suites.__path__):
        if module.name.startswith("test_"):
            mod = importlib.import_module(f"vhost_conformance.suites.{module.name}")
            musts |= {i for i, c in defined_cases(vars(mod).values()).items()
                      if c.level is MUST and c.family != "qemu"}  # fmt: skip
    assert musts and musts <= {c["id"] for c in results}, "every MUST case ran"
    assert not any(c["family"] == "qemu" for c in results), "the qemu tier runs only when asked"
    names = {(m["name"], m["parameters"].get("mode")) for m in data["measurements"]}
    assert names >= {("stop_latency_ms", "drain"), ("migration_downtime_ms", "drain")}


VENDOR_SESSION_TEST = """
from vhost_conformance.frontend.protocol import VirtioFeature
from vhost_conformance.suites.drivers import do_io


def test_vendor_io(vhost_session, vhost_memory):
    assert vhost_session.started and vhost_session.memory is vhost_memory
    assert vhost_session.negotiated.acked_features & (1 << VirtioFeature.VERSION_1)
    assert len(do_io(vhost_session, 2)) == 4
"""


@pytest.mark.skipif(
    _reference_backend_missing(),
    reason="the reference back-end (backend/__main__.py) is not there yet",
)
def test_drivers_fixtures_reach_a_vendors_test_outside_the_package(
    pytester: pytest.Pytester,
) -> None:
    # no -p, no conftest: the plugin itself loads suites/drivers.py as a plugin module
    pytester.makepyfile(test_vendor_io=VENDOR_SESSION_TEST)
    result = _run(pytester, "--vhost-backend=reference", "--strict-markers")
    result.assert_outcomes(passed=1)


RUNWIDE_CASE = """
from vhost_conformance.frontend.protocol import FrontendRequest
from vhost_conformance.suites.model import MUST, case


@case("VU-VENDOR-6", title="stops", family="stop-drain", level=MUST,
      clause="none", requirement="GET_FEATURES is answered.")
def test_stops(vhost_channel, vhost_timeout, vhost_measure, vhost_capabilities):
    vhost_channel.call(FrontendRequest.GET_FEATURES, timeout=vhost_timeout)
    vhost_measure("stop_latency_ms", 12.5, mode="drain", disk_latency_ms=50, inflight=4)
    vhost_measure("migration_downtime_ms", 80, mode="no-drain", inflight=4)
"""


@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_run_wide_measurements_and_negotiated_features(
    pytester: pytest.Pytester, workers: list[str]
) -> None:
    pytester.makepyfile(test_stops=RUNWIDE_CASE)
    report = pytester.path / "report"
    result = _run(
        pytester, *workers, f"--vhost-backend-cmd={fake_command('ok')}", f"--vhost-report={report}"
    )
    result.assert_outcomes(passed=1)
    data = json.loads((report / "report.json").read_text())
    assert data["measurements"] == [
        {
            "name": "stop_latency_ms",
            "unit": "ms",
            "value": 12.5,
            "parameters": {
                "case": "VU-VENDOR-6",
                "disk_latency_ms": 50,
                "inflight": 4,
                "mode": "drain",
            },
        },
        {
            "name": "migration_downtime_ms",
            "unit": "ms",
            "value": 80.0,
            "parameters": {"case": "VU-VENDOR-6", "inflight": 4, "mode": "no-drain"},
        },
    ]
    html = (report / "report.html").read_text()
    assert "plot-stop-latency" in html and "plot-downtime" in html
    backend = data["backend"]
    from vhost_conformance.frontend.protocol import BlkFeature, ProtocolFeature, VirtioFeature

    offered, agreed = backend["features"], backend["negotiated_features"]
    assert agreed is not None and agreed & ~offered == 0, "only offered bits are agreed"
    # the fake offers VERSION_1, PROTOCOL_FEATURES and CONFIG_WCE: a Linux guest acks them all
    for bit in (VirtioFeature.VERSION_1, VirtioFeature.PROTOCOL_FEATURES, BlkFeature.CONFIG_WCE):
        assert offered >> bit & 1 and agreed >> bit & 1, bit.name
    protocol = backend["negotiated_protocol_features"]
    assert protocol == backend["protocol_features"] & ((1 << 23) - 1)
    assert protocol >> ProtocolFeature.REPLY_ACK & 1
    assert "VERSION_1" in backend["extra"]["negotiated_feature_names"]
    assert backend["extra"]["config"]["capacity_sectors"] == (64 << 20) // 512
    assert backend["extra"]["workers"] == (2 if workers else 1)


def test_python_is_the_venv_one() -> None:
    # the fake back-end command runs this interpreter, which has the package installed
    assert importlib.util.find_spec("vhost_conformance") is not None, sys.executable


def test_a_failing_malformed_case_carries_the_trace_of_its_own_connection(
    pytester: pytest.Pytester,
) -> None:
    """VU-MAL-1 builds its connection by hand (test_malformed.Link, no fixture): the fake dies
    on the unknown id, and report.json still has that connection's wire trace (every channel
    a case opens registers its trace: frontend.channel.observe_traces)."""
    report = pytester.path / "report"
    _run(
        pytester,
        "--pyargs",
        "vhost_conformance.suites",
        "-k",
        "test_unknown_request_ids",
        f"--vhost-backend-cmd={fake_command('ok')}",
        f"--vhost-report={report}",
    )
    case = _report(report)["VU-MAL-1"]
    assert case["verdict"] in ("crash", "fail", "hang", "error"), case["verdict"]
    trace = case["trace"]
    assert isinstance(trace, list) and trace, "the hand-built connection's trace is in the report"
    assert "SET_OWNER" in json.dumps(trace), "it is Link.open's connection (SET_OWNER sent)"
