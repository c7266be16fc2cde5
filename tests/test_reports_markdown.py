"""summary.md: counts, the cases failing the gate with clause and reason, measurements; escaping."""

from __future__ import annotations

import dataclasses
import re

from vhost_conformance.reports import markdown
from vhost_conformance.reports.model import BackendInfo, CaseResult, Level, Report, Verdict
from vhost_conformance.reports.sample import sample_report


def section(text: str, title: str) -> list[str]:
    """The table rows under the heading that starts with *title*."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"### {title}"))
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("###"):
            break
        if line.startswith("| ") and not line.startswith("|---"):
            rows.append(line)
    return rows[1:]  # without the header row


def cells(row: str) -> list[str]:
    """Split a table row on unescaped pipes."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]


def test_summary_content() -> None:
    report = sample_report()
    text = markdown.render(report)
    assert text.startswith("## vhost-conformance: reference: \u274c FAIL")
    counts = report.counts()
    for v in Verdict:
        assert f"| {v.value} | {counts[v]} |" in text
    failing = section(text, "Cases failing the gate")
    assert len(failing) == len(report.gate_failures()) == 5
    gvb = next(cells(r) for r in failing if cells(r)[0] == "VU-GVB-1")
    assert gvb[2:5] == ["MUST conformance", 'vhost-user.rst "GET\\_VRING\\_BASE"', "**fail**"]
    assert "expected last\\_avail\\_idx 7" in gvb[5]
    assert [cells(r)[0] for r in section(text, "Other problems")] == [
        "VU-FD-1", "VU-MAL-2", "VU-RST-1", "VU-FUZZ-1", "VU-GVB-4",
    ]  # fmt: skip
    assert [cells(r)[0] for r in section(text, "Known deviations that now pass")] == ["VU-RST-2"]
    assert len(section(text, "Measurements")) == len(report.measurements)


def test_hostile_text_cannot_break_out() -> None:
    text = markdown.render(sample_report())
    assert "<script>" not in text and "<img" not in text and "\x00" not in text
    assert "&lt;script&gt;" in text
    # A reason with pipes and newlines stays one row of six cells.
    evil = CaseResult(
        "VU-X-1", "t|i\ntle", "f", Level.MUST, "c", "r", Verdict.FAIL, reason="a | b\n| c |"
    )
    r = Report(suite_version="0", started="s", duration_s=0, backend=BackendInfo("b"), cases=[evil])
    rows = section(markdown.render(r), "Cases failing the gate")
    assert len(rows) == 1 and len(cells(rows[0])) == 6


def test_passing_run_says_so() -> None:
    report = sample_report()
    passing = dataclasses.replace(
        report, cases=[c for c in report.cases if c.verdict is Verdict.PASS]
    )
    text = markdown.render(passing)
    assert "\u2705 PASS" in text
    assert "### Cases failing the gate (0)\n\nNone." in text
    assert "Other problems" not in text


def test_long_tables_are_cut() -> None:
    many = [
        CaseResult(f"VU-X-{i}", "t", "f", Level.MUST, "c", "r", Verdict.FAIL) for i in range(250)
    ]
    r = Report(suite_version="0", started="s", duration_s=0, backend=BackendInfo("b"), cases=many)
    rows = section(markdown.render(r), "Cases failing the gate (250)")
    assert len(rows) == markdown.MAX_ROWS + 1
    assert cells(rows[-1])[0] == "\u2026 and 50 more (see report.html)"
