"""junit.xml: parses with xml.etree, counts match the verdicts and the gate, text is escaped."""

from __future__ import annotations

import pathlib
import xml.etree.ElementTree as ET

from vhost_conformance.reports import junit
from vhost_conformance.reports.model import Verdict
from vhost_conformance.reports.sample import sample_report


def _parse(text: str) -> ET.Element:
    return ET.fromstring(text.encode("utf-8"))


def test_counts_match_verdicts_and_gate(tmp_path: pathlib.Path) -> None:
    report = sample_report()
    path = junit.write(report, tmp_path / "junit.xml")
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == len(report.cases) == int(root.get("tests", "-1"))
    counts = report.counts()
    gate = report.gate_failures()
    assert (
        int(root.get("failures", "-1"))
        == len(cases_with(root, "failure"))
        == sum(1 for c in gate if c.verdict is not Verdict.ERROR)
        == 4
    )
    assert int(root.get("errors", "-1")) == len(cases_with(root, "error")) == counts[Verdict.ERROR]
    assert (
        int(root.get("skipped", "-1"))
        == len(cases_with(root, "skipped"))
        == (counts[Verdict.SKIP] + counts[Verdict.UNSUPPORTED] + counts[Verdict.XFAIL])
    )
    # One testsuite per family, its counts adding up to the totals.
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == report.families()
    for key in ("tests", "failures", "errors", "skipped"):
        assert sum(int(s.get(key, "0")) for s in suites) == int(root.get(key, "-1"))


def cases_with(root: ET.Element, child: str) -> list[ET.Element]:
    return [tc for tc in root.iter("testcase") if tc.find(child) is not None]


def props(tc: ET.Element) -> dict[str, str]:
    return {p.get("name", ""): p.get("value", "") for p in tc.iter("property")}


def test_failing_must_carries_level_clause_and_trace() -> None:
    root = _parse(junit.render(sample_report()))
    tc = next(t for t in root.iter("testcase") if props(t).get("id") == "VU-GVB-1")
    assert tc.get("classname") == "stop"
    p = props(tc)
    assert p["level"] == "MUST"
    assert p["clause"] == 'vhost-user.rst "GET_VRING_BASE"'
    assert p["verdict"] == "fail"
    assert p["measurement.reply_ms"] == "0.8"
    failure = tc.find("failure")
    assert failure is not None and failure.get("type") == "fail"
    assert "expected last_avail_idx 7" in failure.get("message", "")
    out = tc.findtext("system-out") or ""
    assert "wire trace:" in out
    assert out.count("name=GET_VRING_BASE") == 2
    assert "t_s=0.000000  direction=fe->be  channel=main  name=GET_FEATURES" in out


def test_crash_has_log_tail_and_hostile_text_is_data() -> None:
    root = _parse(junit.render(sample_report()))
    crash = next(t for t in root.iter("testcase") if props(t).get("id") == "VU-RING-2")
    assert "Segmentation fault" in (crash.findtext("system-err") or "")
    hostile = next(t for t in root.iter("testcase") if props(t).get("id") == "VU-CFG-1")
    failure = hostile.find("failure")
    assert failure is not None
    # The markup is text after parsing; NUL and ESC (illegal in XML 1.0) are shown escaped.
    assert '<script>alert("x")</script>' in failure.get("message", "")
    assert "\\x00\\x1b" in failure.get("message", "")
    assert not list(hostile.iter("script"))


def test_non_strict_follows_strictness() -> None:
    report = sample_report()
    plain = _parse(junit.render(report))
    tc = next(t for t in plain.iter("testcase") if props(t).get("id") == "VU-FD-1")
    assert tc.find("failure") is None
    assert "does not fail the gate" in (tc.findtext("system-out") or "")
    strict = _parse(junit.render(sample_report(strict=True)))
    tc = next(t for t in strict.iter("testcase") if props(t).get("id") == "VU-FD-1")
    failure = tc.find("failure")
    assert failure is not None and failure.get("type") == "non-strict"
    # strict adds the SHOULD non-strict, the SHOULD disallowed disconnect and the flaky one
    assert int(strict.get("failures", "0")) == int(plain.get("failures", "0")) + 3


def test_xfail_is_skipped_xpass_passes_with_note() -> None:
    root = _parse(junit.render(sample_report()))
    xfail = next(t for t in root.iter("testcase") if props(t).get("id") == "VU-SVB-1")
    skipped = xfail.find("skipped")
    assert skipped is not None and "known deviation" in skipped.get("message", "")
    xpass = next(t for t in root.iter("testcase") if props(t).get("id") == "VU-RST-2")
    assert xpass.find("failure") is None and xpass.find("skipped") is None
    assert "prune it" in (xpass.findtext("system-out") or "")
    passed = next(t for t in root.iter("testcase") if props(t).get("id") == "VU-HDR-1")
    assert passed.find("system-out") is None
