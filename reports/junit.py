"""junit.xml: one <testsuite> per case family, one <testcase> per case.

JUnit's red mirrors the gate (``Report.gate_failures`` at the run's own strictness):

- a case that fails the gate is a ``<failure type="VERDICT">`` (``<error>`` for the
  verdict ``error``, the suite's own failure);
- skip, unsupported and xfail are ``<skipped>`` (as pytest's junitxml does for xfail);
- pass, xpass, and a bad verdict that does not fail the gate (e.g. ``non-strict``
  without --strict, a hang on a MAY case) pass, with the verdict in the properties and a
  warning in system-out.

Properties per case: id, verdict, level, clause, requirement, deviation, parameters.
system-out holds the reason and the wire trace of every case that is not a plain pass;
system-err the back-end's log tail.
"""

from __future__ import annotations

import os
import pathlib
import xml.etree.ElementTree as ET

from vhost_conformance.reports.common import (
    case_details,
    clean_text,
    format_params,
    level_text,
    one_line,
    trace_text,
    verdict_text,
)
from vhost_conformance.reports.model import CaseResult, Report, Verdict

_SKIPPED = frozenset({Verdict.SKIP, Verdict.UNSUPPORTED, Verdict.XFAIL})


def _kind(case: CaseResult, gate_ids: set[int]) -> str:
    """'failure', 'error', 'skipped' or 'passed' for *case*."""
    if id(case) in gate_ids:
        return "error" if case.verdict is Verdict.ERROR else "failure"
    if case.verdict in _SKIPPED:
        return "skipped"
    return "passed"


def to_element(report: Report) -> ET.Element:
    """The <testsuites> element for *report*."""
    gate_ids = {id(c) for c in report.gate_failures()}
    suites = ET.Element("testsuites", name=f"vhost-conformance: {clean_text(report.backend.name)}")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    total_time = 0.0
    for family in report.families():
        cases = [c for c in report.cases if c.family == family]
        suite = ET.SubElement(suites, "testsuite", name=clean_text(family))
        suite.set("timestamp", report.started)
        counts = {"tests": len(cases), "failures": 0, "errors": 0, "skipped": 0}
        time = 0.0
        for case in cases:
            kind = _kind(case, gate_ids)
            if kind == "failure":
                counts["failures"] += 1
            elif kind == "error":
                counts["errors"] += 1
            elif kind == "skipped":
                counts["skipped"] += 1
            time += case.duration_s
            _testcase(suite, case, kind)
        for key, value in counts.items():
            suite.set(key, str(value))
            totals[key] += value
        suite.set("time", f"{time:.3f}")
        total_time += time
    for key, value in totals.items():
        suites.set(key, str(value))
    suites.set("time", f"{report.duration_s:.3f}")
    return suites


def _testcase(parent: ET.Element, case: CaseResult, kind: str) -> None:
    title = f"{case.id} {case.title}".strip()
    params = format_params(case.parameters)
    if params:
        title += f" [{params}]"
    tc = ET.SubElement(
        parent,
        "testcase",
        classname=clean_text(case.family),
        name=clean_text(title),
        time=f"{case.duration_s:.3f}",
    )
    props = ET.SubElement(tc, "properties")
    for name, value in (
        ("id", case.id),
        ("verdict", case.verdict.value),
        ("level", case.level.value),
        ("tier", case.tier.value),
        ("quote", case.quote),
        ("source", case.source),
        ("clause", case.clause),
        ("requirement", case.requirement),
        ("deviation", case.deviation),
        ("parameters", params or None),
        ("verdict_shown", verdict_text(case) if verdict_text(case) != case.verdict.value else None),
        ("qemu_case", case.qemu_case),
        ("qemu_confirmed", case.qemu_confirmed),
        *((f"{k.replace(' ', '_').replace('-', '_')}", v) for k, v in case_details(case)),
    ):
        if value is not None:
            ET.SubElement(props, "property", name=name, value=clean_text(value))
    for mname in sorted(case.measurements):
        ET.SubElement(
            props,
            "property",
            name=f"measurement.{clean_text(mname)}",
            value=f"{case.measurements[mname]:g}",
        )
    message = one_line(
        f"{verdict_text(case)}: {case.reason}" if case.reason else verdict_text(case)
    )
    if kind in ("failure", "error"):
        el = ET.SubElement(tc, kind, type=case.verdict.value, message=message)
        details = "".join(f"\n{k}: {v}" for k, v in case_details(case))
        el.text = clean_text(
            f"{level_text(case)} {case.clause}\n{case.requirement}\n{case.reason}{details}".strip()
        )
    elif kind == "skipped":
        text = f"{case.verdict.value}: {case.reason}" if case.reason else case.verdict.value
        if case.deviation:
            text += f" (known deviation: {case.deviation})"
        ET.SubElement(tc, "skipped", message=one_line(text))
    if case.verdict is not Verdict.PASS:
        out = [f"verdict: {verdict_text(case)}"]
        if kind == "passed" and case.verdict is not Verdict.XPASS:
            out[0] += " (WARNING: does not fail the gate at this strictness)"
        if case.verdict is Verdict.XPASS:
            out.append(f"known deviation now passes, prune it: {case.deviation}")
        if case.reason:
            out.append(f"reason: {case.reason}")
        out += [f"{k}: {v}" for k, v in case_details(case)]
        if case.trace:
            out.append("wire trace:")
            out.append(trace_text(case.trace))
        ET.SubElement(tc, "system-out").text = clean_text("\n".join(out))
    if case.log_tail:
        ET.SubElement(tc, "system-err").text = clean_text(case.log_tail)


def render(report: Report) -> str:
    """junit.xml text (UTF-8, with an XML declaration)."""
    root = to_element(report)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write(report: Report, path: str | os.PathLike[str]) -> pathlib.Path:
    """Write junit.xml to *path*; return it."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(report), encoding="utf-8")
    return target
