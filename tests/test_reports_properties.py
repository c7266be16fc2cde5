"""Property tests: any text a back-end can put in a case survives JSON and every rendering."""

from __future__ import annotations

import dataclasses
import tempfile
import xml.etree.ElementTree as ET

from hypothesis import given, settings
from hypothesis import strategies as st
from vhost_conformance.reports import html, junit, markdown, matrix, write_all
from vhost_conformance.reports.model import Measurement, Report
from vhost_conformance.reports.sample import sample_report

TEXT = st.text(st.characters(exclude_categories=()), max_size=60)  # surrogates included
BASE = sample_report()


@settings(max_examples=60, deadline=None)
@given(reason=TEXT, title=TEXT, note=TEXT, family=TEXT)
def test_any_text_round_trips_and_renders(reason: str, title: str, note: str, family: str) -> None:
    case = dataclasses.replace(
        BASE.cases[2],
        reason=reason,
        title=title,
        family=family or "f",
        trace=[{"direction": "be->fe", "name": "X", "note": note}],
        log_tail=note,
    )
    hostile_plot = Measurement(
        "stop_latency_ms", "ms", 1.0, {"mode": note, "disk_latency_ms": 1, "inflight": title}
    )
    report = dataclasses.replace(
        BASE, cases=[case, *BASE.cases[3:5]], measurements=[*BASE.measurements, hostile_plot]
    )
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_all(report, tmp)
        for p in paths.values():
            p.read_bytes().decode("utf-8")  # every file is valid UTF-8
        assert Report.load(paths["json"]) == report
        matrix.write([report, BASE], tmp)
    ET.fromstring(junit.render(report).encode("utf-8"))  # always well-formed XML 1.0
    page = html.render(report)
    assert page.count("<script") == 1 and "<img" not in page
    for text in (reason, title, note):
        if "<" in text:
            assert html.h(text) in page
    md = markdown.render(report)
    assert all(ch not in md for ch in "\x00\x1b")
    assert matrix.render_html([report, BASE]).count("<script") == 1
