"""Findings held against real QEMU (suites/qemu_confirm.py, report keys ``qemu_case`` and
``qemu_confirmed``): the table names real cases, each failing emulated case gets yes / no /
not reachable / not run from the VU-QEMU results of the same run, the key survives the JSON
round trip and every rendering shows it. No back-end or QEMU runs here (the end-to-end run is
in tests/test_qemu_tier.py)."""

from __future__ import annotations

import json
import pathlib
import xml.etree.ElementTree as ET

import pytest
from vhost_conformance.reports import html, junit, markdown
from vhost_conformance.reports.model import (
    QEMU_CONFIRMED,
    SCHEMA_VERSION,
    BackendInfo,
    CaseResult,
    Report,
    ReportFormatError,
    Tier,
)
from vhost_conformance.suites import catalogue
from vhost_conformance.suites.qemu_confirm import (
    NO,
    NOT_REACHABLE,
    NOT_RUN,
    QEMU_REPRODUCES,
    YES,
    confirm,
    parse_spec,
)


def _result(case_id: str, verdict: str, family: str = "rings", **extra: object) -> CaseResult:
    return CaseResult(id=case_id, title=f"{case_id} title", family=family, level="MUST",
                      clause="c", requirement="r", verdict=verdict, **extra)  # type: ignore[arg-type]  # fmt: skip


def _qemu(case_id: str, verdict: str, **params: str) -> CaseResult:
    return _result(case_id, verdict, family="qemu", tier=Tier.INTEROP, parameters=dict(params))


def test_table_names_implemented_cases() -> None:
    """Every key is an implemented emulated case; every value an implemented VU-QEMU case,
    with parameters that case is run with."""
    implemented = catalogue.defined_in_suites()
    from vhost_conformance.suites import test_qemu

    for emulated, (spec, why) in QEMU_REPRODUCES.items():
        assert emulated in implemented and not emulated.startswith("VU-QEMU-"), emulated
        qemu_id, params = parse_spec(spec)
        assert qemu_id in implemented, spec
        assert why, emulated
        if params:  # the only parametrized VU-QEMU case: VU-QEMU-7, inflight on/off
            assert qemu_id == "VU-QEMU-7" and set(params) == {"inflight"}, spec
            assert params["inflight"] in ("on", "off"), spec
    assert test_qemu.test_qemu_live_migration.__name__  # the module defines the cases named


def test_values_are_the_schema_values() -> None:
    assert (YES, NO, NOT_REACHABLE, NOT_RUN) == QEMU_CONFIRMED


@pytest.mark.parametrize(
    ("qemu_results", "expected"),
    [
        ([_qemu("VU-QEMU-2", "hang")], YES),
        ([_qemu("VU-QEMU-2", "pass")], NO),
        ([_qemu("VU-QEMU-2", "unsupported")], NOT_REACHABLE),
        ([_qemu("VU-QEMU-2", "error")], NOT_REACHABLE),
        ([_qemu("VU-QEMU-1", "pass")], NOT_RUN),  # the tier ran, but not VU-QEMU-2
    ],
    ids=["confirmed", "refuted", "unsupported", "error", "case-not-run"],
)
def test_confirm_by_verdict(qemu_results: list[CaseResult], expected: str) -> None:
    """VU-RING-9 (packed I/O) is reproduced by VU-QEMU-2: its verdict decides."""
    cases = confirm([_result("VU-RING-9", "fail"), *qemu_results], tier_ran=True)
    assert cases[0].qemu_case == "VU-QEMU-2"
    assert cases[0].qemu_confirmed == expected
    assert all(c.qemu_confirmed is None for c in cases[1:]), "VU-QEMU results are not confirmed"


def test_confirm_by_parameters() -> None:
    """VU-GVB-3 (no drain) is VU-QEMU-7 with inflight-migration off only."""
    results = [_qemu("VU-QEMU-7", "pass", inflight="on"), _qemu("VU-QEMU-7", "hang", inflight="off")]
    (gvb3, mig3, *_) = confirm([_result("VU-GVB-3", "fail"), _result("VU-MIG-3", "fail"),
                                *results], tier_ran=True)  # fmt: skip
    assert (gvb3.qemu_case, gvb3.qemu_confirmed) == ("VU-QEMU-7[inflight=off]", YES)
    assert (mig3.qemu_case, mig3.qemu_confirmed) == ("VU-QEMU-7[inflight=on]", NO)


def test_without_the_tier_every_finding_says_not_run() -> None:
    """No --qemu and no VU-QEMU case in the run: ``not run``, reachable or not; a pass, an
    allowed disconnect and an unsupported case get no key at all."""
    cases = confirm([_result("VU-RING-9", "fail"), _result("VU-HOST-1", "crash"),
                     _result("VU-BLK-1", "pass"), _result("VU-MAL-1", "disconnect", allowed=True),
                     _result("VU-RING-9", "unsupported")], tier_ran=False)  # fmt: skip
    assert [c.qemu_confirmed for c in cases] == [NOT_RUN, NOT_RUN, None, None, None]
    assert [c.qemu_case for c in cases[:2]] == ["VU-QEMU-2", None]


def test_unreachable_with_the_tier() -> None:
    """A hostile-guest finding: QEMU's guest never builds a descriptor loop."""
    (host1,) = confirm([_result("VU-HOST-1", "crash")], tier_ran=True)
    assert (host1.qemu_case, host1.qemu_confirmed) == (None, NOT_REACHABLE)


def _report() -> Report:
    cases = confirm([_result("VU-RING-9", "fail", reason="no completion"),
                     _qemu("VU-QEMU-2", "hang"), _result("VU-RECON-2", "non-strict")],
                    tier_ran=True)  # fmt: skip
    return Report(suite_version="0", started="2026-12-03T00:00:00Z", duration_s=1.0,
                  backend=BackendInfo(name="b"), cases=cases)  # fmt: skip


def test_round_trip_and_schema(tmp_path: pathlib.Path) -> None:
    """The keys are written, read back, and a wrong value is rejected naming the key."""
    report = _report()
    path = report.save(tmp_path / "report.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    ring9 = data["cases"][0]
    assert (ring9["qemu_case"], ring9["qemu_confirmed"]) == ("VU-QEMU-2", "yes")
    assert Report.load(path).to_json() == report.to_json()
    ring9["qemu_confirmed"] = "maybe"
    path.write_text(json.dumps(data))
    with pytest.raises(ReportFormatError, match=r"cases\[0\]\.qemu_confirmed"):
        Report.load(path)


def test_renderings_show_it() -> None:
    """HTML (case details), Markdown (its own table), JUnit (properties and failure text)."""
    report = _report()
    page = html.render(report)
    assert "confirmed by QEMU:</b> yes (VU-QEMU-2)" in page
    assert "not run (VU-QEMU-6; run --qemu)" in page  # VU-RECON-2: VU-QEMU-6 was not in the run
    summary = markdown.render(report)
    assert "### Findings held against real QEMU 11.1.3 (2)" in summary
    assert "| VU-RING-9 | fail | VU-QEMU-2 | yes |" in summary
    root = ET.fromstring(junit.render(report))
    props = {p.get("name"): p.get("value")
             for tc in root.iter("testcase") if "VU-RING-9" in (tc.get("name") or "")
             for p in tc.iter("property")}  # fmt: skip
    assert props["qemu_case"] == "VU-QEMU-2" and props["qemu_confirmed"] == "yes"
    failure = next(tc for tc in root.iter("testcase") if "VU-RING-9" in (tc.get("name") or ""))
    assert "confirmed by QEMU: yes (VU-QEMU-2)" in ET.tostring(failure, encoding="unicode")

