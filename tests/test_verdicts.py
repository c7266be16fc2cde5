"""The verdict vocabulary end to end (issue 9 items 3-6): ``disconnect`` judged per case,
``crash`` only for a dead process (with its status), one behaviour counted once, a MUST
finding of a MAY case failing the gate, the re-run command, and the pre-flight of ``run``.

The back-ends are the small fake of test_suites_fakebackend.py in its misbehaving modes."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import pytest
from test_suites_fakebackend import fake_command
from vhost_conformance.reports.model import CaseResult, Level, Report, Verdict
from vhost_conformance.reports.sample import sample_report
from vhost_conformance.suites.plugin import assign_see

pytest_plugins = ["pytester"]

CLOSING_CASES = """
from vhost_conformance.frontend.protocol import FrontendRequest, Message
from vhost_conformance.suites.model import MUST, case

BAD = dict(family="malformed", clause="vhost-user.rst: Communication",
           requirement="an unknown request is refused or the connection closed.")
VALID = dict(family="handshake", clause="vhost-user.rst: GET_QUEUE_NUM",
             requirement="GET_QUEUE_NUM is answered.")


@case("VU-VENDOR-20", title="an unknown request id", level=MUST, **BAD)
def test_unknown_request(vhost_channel, vhost_timeout):
    vhost_channel.call(FrontendRequest.GET_FEATURES, timeout=vhost_timeout)
    vhost_channel.send_raw(Message(0x7FF0, 1, b"").encode())
    vhost_channel.recv(vhost_timeout, awaiting="anything")


@case("VU-VENDOR-21", title="GET_QUEUE_NUM is answered", level=MUST, **VALID)
def test_queue_num(vhost_channel, vhost_timeout):
    vhost_channel.call(FrontendRequest.GET_QUEUE_NUM, timeout=vhost_timeout)
"""

FINDING_CASES = """
from vhost_conformance.suites.model import MAY, MUST, INFO, CaseFailed, case

META = dict(family="stop-drain", clause="vhost-user.rst: GET_VRING_BASE",
            requirement="GET_VRING_BASE answers the next avail index.")


@case("VU-VENDOR-30", title="a MAY case seeing a MUST violation", level=MAY, **META)
def test_may_sees_must(vhost_target):
    raise CaseFailed("GET_VRING_BASE answered the used index", expected=7, seen=3,
                     behaviour="gvb-used-index", finding_level=MUST)


@case("VU-VENDOR-31", title="the same behaviour again", level=INFO, **META)
def test_same_again(vhost_target):
    raise CaseFailed("GET_VRING_BASE answered the used index", expected=7, seen=3,
                     behaviour="gvb-used-index")
"""


def _report(path: pathlib.Path) -> tuple[dict[str, dict[str, object]], dict[str, object]]:
    data = json.loads((path / "report.json").read_text())
    return {case["id"]: case for case in data["cases"]}, data


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=180)


def _closing(
    pytester: pytest.Pytester, select: str, mode: str
) -> tuple[pytest.RunResult, pathlib.Path]:
    """CLOSING_CASES matching *select* against the fake back-end in *mode*: (result, report)."""
    pytester.makepyfile(test_vendor=CLOSING_CASES)
    report = pytester.path / "report"
    result = _run(
        pytester, "-k", select, f"--vhost-backend-cmd={fake_command(mode)}",
        f"--vhost-report={report}",
    )  # fmt: skip
    return result, report


def test_a_clean_close_on_malformed_input_is_an_allowed_disconnect(
    pytester: pytest.Pytester,
) -> None:
    result, report = _closing(pytester, "unknown", "closebad")
    result.assert_outcomes(passed=1)
    cases, data = _report(report)
    case = cases["VU-VENDOR-20"]
    assert case["verdict"] == "disconnect" and case["allowed"] is True
    assert "answered GET_FEATURES on the next connection" in str(case["reason"])
    assert data["gate"] == 0
    assert "disconnect (allowed)" in (report / "summary.md").read_text()


def test_a_close_that_leaves_nobody_served_fails(pytester: pytest.Pytester) -> None:
    result, report = _closing(pytester, "unknown", "deafbad")
    result.assert_outcomes(failed=1)
    case = _report(report)[0]["VU-VENDOR-20"]
    assert case["verdict"] == "fail"
    assert "did not serve the next connection" in str(case["reason"])


def test_a_close_on_valid_input_is_a_disconnect_that_fails_the_gate(
    pytester: pytest.Pytester,
) -> None:
    result, report = _closing(pytester, "queue_num", "closevalid")
    result.assert_outcomes(failed=1)
    cases, data = _report(report)
    case = cases["VU-VENDOR-21"]
    assert case["verdict"] == "disconnect" and case["allowed"] is False
    assert case["exit_status"] is None
    assert data["gate"] == 1
    assert "--case VU-VENDOR-21" in str(case["rerun"])
    junit = (report / "junit.xml").read_text()
    assert 'type="disconnect"' in junit and "not allowed" in junit


def test_an_exiting_backend_is_a_crash_with_its_status(pytester: pytest.Pytester) -> None:
    result, report = _closing(pytester, "queue_num", "die")
    result.assert_outcomes(failed=1)
    case = _report(report)[0]["VU-VENDOR-21"]
    assert case["verdict"] == "crash" and case["exit_status"] == 3
    assert "exit status 3" in (report / "summary.md").read_text()


def test_one_behaviour_counted_once_and_a_must_finding_of_a_may_case_fails_the_gate(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_vendor=FINDING_CASES)
    report = pytester.path / "report"
    _run(pytester, f"--vhost-backend-cmd={fake_command('ok')}", f"--vhost-report={report}")
    cases, data = _report(report)
    owner, follower = cases["VU-VENDOR-30"], cases["VU-VENDOR-31"]
    assert owner["verdict"] == follower["verdict"] == "fail"
    assert owner["see"] is None and follower["see"] == "VU-VENDOR-30"
    assert owner["finding_level"] == "MUST"
    assert data["gate"] == 1
    loaded = Report.load(report / "report.json")
    assert [c.id for c in loaded.gate_failures()] == ["VU-VENDOR-30"]
    assert "see VU-VENDOR-30" in (report / "summary.md").read_text()
    assert "see VU-VENDOR-30" in (report / "report.html").read_text()


def _result(case_id: str, level: Level, verdict: Verdict, **kw: object) -> CaseResult:
    family = {"FUZZ": "fuzz", "HOST": "hostile-guest"}.get(case_id.split("-")[1], "stop-drain")
    return CaseResult(case_id, "t", family, level, "c", "r", verdict, **kw)  # type: ignore[arg-type]


def test_assign_see_keeps_the_strongest_level_on_the_owner() -> None:
    cases = assign_see(
        [
            _result("VU-A-1", Level.MAY, Verdict.FAIL, behaviour="b"),
            _result("VU-A-2", Level.MUST, Verdict.FAIL, behaviour="b"),
            _result("VU-A-3", Level.MUST, Verdict.PASS, behaviour="b"),
            _result("VU-A-4", Level.MUST, Verdict.FAIL, behaviour="other"),
        ]
    )
    assert [c.see for c in cases] == [None, "VU-A-1", None, None]
    assert cases[0].gate_level is Level.MUST and cases[0].blocking
    assert not cases[1].blocking and not cases[1].bad
    assert cases[3].blocking


def test_a_may_case_alone_does_not_block_and_an_allowed_disconnect_is_not_bad() -> None:
    assert not _result("VU-A-1", Level.MAY, Verdict.FAIL).blocking
    allowed = _result("VU-A-2", Level.MUST, Verdict.DISCONNECT, allowed=True)
    assert not allowed.bad and not allowed.blocking
    assert _result("VU-A-3", Level.MUST, Verdict.DISCONNECT).blocking


def test_schema_1_reports_still_load(tmp_path: pathlib.Path) -> None:
    data = sample_report().to_dict()
    data["schema_version"] = "1.0"
    for case in data["cases"]:
        for key in ("exit_status", "allowed", "see", "finding_level", "rerun", "behaviour"):
            case.pop(key)
    data["cases"] = [c for c in data["cases"] if c["verdict"] not in ("disconnect", "flaky")]
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data))
    loaded = Report.load(path)
    assert loaded.schema_version == "1.0" and all(c.see is None for c in loaded.cases)


def test_a_backend_that_cannot_start_exits_2_in_under_20_s(tmp_path: pathlib.Path) -> None:
    cmd = "sh -c 'echo no disk here >&2; exit 7' {socket}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "vhost_conformance.cli", "run", "--backend-cmd", cmd,
         "--report", str(tmp_path / "r"), "-n", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "exited with status 7" in lines[0] and "no disk here" in lines[0]
    assert "sh -c" in lines[0]
    assert elapsed < 20, f"pre-flight took {elapsed:.1f} s"


def test_a_backend_that_never_answers_exits_2_naming_it(tmp_path: pathlib.Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vhost_conformance.cli", "run",
         "--backend-cmd", fake_command("hang"), "--report", str(tmp_path / "r"), "-n", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert "did not answer GET_FEATURES" in line and "still running" in line
    assert "fake back-end listening" in line


@pytest.mark.parametrize("reproduces", [False, True])
def test_a_fuzz_finding_is_replayed_on_a_fresh_backend(
    monkeypatch: pytest.MonkeyPatch, reproduces: bool
) -> None:
    """Not reproduced on the fresh instance: flaky with the example and seed; reproduced:
    the verdict it had, noted as reproduced."""
    from vhost_conformance.suites import test_inflight_bounds as bounds
    from vhost_conformance.suites.model import CaseFailed, CaseOutcome

    targets: list[str] = []

    def run_example(target: object, timeout: float, layout: str, sequence: object) -> int:
        targets.append(str(target))
        fails_here = reproduces or target == "first instance"
        if fails_here and len(sequence) >= 2:  # type: ignore[arg-type]
            raise CaseFailed("counter changed in flight", expected=1, seen=2)
        return 0

    monkeypatch.setattr(bounds, "run_example", run_example)
    monkeypatch.setenv("VHOST_CONFORMANCE_SHRINK_SECONDS", "5")
    with pytest.raises(CaseOutcome) as info:
        bounds.fuzz_inflight_bounds(
            "first instance", 1.0, ["split"], 30,  # type: ignore[arg-type]
            fresh=lambda: "fresh instance", seed=1234,  # type: ignore[arg-type,return-value]
        )  # fmt: skip
    text = info.value.reason
    assert "fresh instance" in targets
    if reproduces:
        assert info.value.verdict is Verdict.FAIL
        assert "reproduced on a fresh back-end instance" in text
    else:
        assert info.value.verdict is Verdict.FLAKY
        assert "did not reproduce on a fresh back-end instance" in text
        assert "first seen as fail: counter changed in flight" in text
        assert "seed 1234" in text and "steps=" in text


def test_crashes_on_the_same_assertion_are_one_behaviour() -> None:
    from vhost_conformance.suites.plugin import crash_behaviour

    tail = "VHOST_CONFIG: (/tmp/x/{}/vhost.socket) new device\nvhost-blk: vhost_blk.c:345: "
    tail += "process_blk_task: Assertion `sizeof(*task->req) == task->iovs[0].iov_len' failed.\n"
    first, second = crash_behaviour(tail.format("a")), crash_behaviour(tail.format("b"))
    assert first is not None and first == second and "vhost_blk.c:345" in first
    assert crash_behaviour("Segmentation fault") is None
    cases = assign_see(
        [
            _result("VU-FUZZ-2", Level.MUST, Verdict.CRASH, behaviour=first),
            _result("VU-HOST-6", Level.MUST, Verdict.CRASH, behaviour=second),
        ]
    )
    # the suite's family order: hostile-guest before fuzz, whatever the report order
    assert [c.see for c in cases] == ["VU-HOST-6", None]


def _run_cases(
    backend: str, peer: str, cases: list[str], tmp_path: pathlib.Path
) -> dict[str, dict[str, object]]:
    """`vhost-conformance run --case ...` against a real peer; the report's cases by id
    (skipped when the peer is not provisioned)."""
    from vhost_conformance.peers.provision import available

    if not available(peer):
        pytest.skip(f"{peer} not provisioned: run ./scripts/provision-peers")
    selection = [arg for case_id in cases for arg in ("--case", case_id)]
    done = subprocess.run(
        [sys.executable, "-m", "vhost_conformance.cli", "run", "--backend", backend,
         "--report", str(tmp_path / "r"), "-n", "0", *selection],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return _report(tmp_path / "r")[0]


def test_qsd_stop_without_drain_is_counted_once(tmp_path: pathlib.Path) -> None:
    # qemu-storage-daemon 11.1.3 answers GET_VRING_BASE before its requests complete and
    # completes them afterwards: VU-GVB-3 owns that, VU-SUSP-1 follows from it
    cases = _run_cases("qsd-11.1", "qsd-11.1", ["VU-GVB-3", "VU-SUSP-1"], tmp_path)
    assert cases["VU-GVB-3"]["verdict"] == "fail" and cases["VU-GVB-3"]["see"] is None
    assert "vhost-conformance run --backend qsd-11.1 --case VU-GVB-3" in str(
        cases["VU-GVB-3"]["rerun"]
    )
    assert cases["VU-SUSP-1"]["see"] == "VU-GVB-3"


def test_dpdk_verdicts_that_were_the_suites_fault(tmp_path: pathlib.Path) -> None:
    # SET_LOG_BASE's reply payload is N/A (DPDK replies with 0 bytes); regions of the size
    # GET_INFLIGHT_FD gave. (VU-RING-5, also fixed, is left out here: it allows the back-end
    # 1 s, too tight a window to assert on a loaded CI machine.)
    # VU-MAL-14 on DPDK moved between runs on a loaded machine until the case waited (a
    # GET_FEATURES barrier) for its 21 SET_INFLIGHT_FD to be handled before copying the regions:
    # DPDK writes desc_num into each region it is given (docs/FINDINGS.md)
    cases = _run_cases("dpdk-vhost-blk", "dpdk-vhost-blk", ["VU-MIG-6", "VU-MAL-14"], tmp_path)
    assert {k: v["verdict"] for k, v in cases.items()} == {
        "VU-MIG-6": "pass",
        "VU-MAL-14": "pass",
    }, {k: {f: x for f, x in v.items() if f != "trace"} for k, v in cases.items()}
