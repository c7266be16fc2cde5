"""The matrix over three back-ends: columns, rows, disagreements, features, counts, CLI."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from html.parser import HTMLParser

import pytest
from vhost_conformance.reports import matrix
from vhost_conformance.reports.model import BackendInfo, Measurement, Report, Verdict
from vhost_conformance.reports.sample import sample_report


def three_reports() -> list[Report]:
    reference = sample_report("reference")
    # qsd: all pass, no INFLIGHT_SHMFD / GET_VRING_BASE_INFLIGHT, VU-INF-5 unsupported.
    qsd_cases = [
        dataclasses.replace(
            c,
            verdict=Verdict.UNSUPPORTED if c.id == "VU-INF-5" else Verdict.PASS,
            reason="",
            deviation=None,
        )
        for c in reference.cases
    ]
    qsd = dataclasses.replace(
        reference,
        backend=BackendInfo(
            "qsd-11.1", "qemu-storage-daemon ...", features=1 << 32,
            feature_names=["VIRTIO_F_VERSION_1"], protocol_features=(1 << 3) | (1 << 9),
            protocol_feature_names=["REPLY_ACK", "CONFIG"],
        ),
        cases=qsd_cases,
        measurements=[Measurement("stop_latency_ms", "ms", 3.0,
                                  {"mode": "drain", "disk_latency_ms": 5, "inflight": 16})],
    )  # fmt: skip
    # dpdk: a subset of cases (an older suite), one extra case of its own.
    extra = dataclasses.replace(reference.cases[0], id="VU-PKD-1", family="packed")
    dpdk = dataclasses.replace(
        reference,
        backend=dataclasses.replace(reference.backend, name="dpdk-vhost-blk"),
        cases=[*reference.cases[:4], extra],
        measurements=[],
    )
    return [reference, qsd, dpdk]


class Cells(HTMLParser):
    """Per matrix row (data-case): the data-verdict of each cell, '' for a missing case."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self.differs: set[str] = set()
        self._row: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("data-case"):
            self._row = a["data-case"] or ""
            self.rows[self._row] = []
            if a.get("class") == "differs":
                self.differs.add(self._row)
        elif tag == "td" and self._row and "cell" in (a.get("class") or ""):
            self.rows[self._row].append(a.get("data-verdict") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None


def test_html_matrix_rows_columns_and_differences() -> None:
    reports = three_reports()
    text = matrix.render_html(reports)
    cells = Cells()
    cells.feed(text)
    union = {matrix.case_key(c) for r in reports for c in r.cases}
    assert set(cells.rows) == union and len(union) == 20
    for key, verdicts in cells.rows.items():
        expected = [
            next((c.verdict.value for c in r.cases if matrix.case_key(c) == key), "")
            for r in reports
        ]
        assert verdicts == expected, key
    assert cells.rows["VU-HDR-1"] == ["pass", "pass", "pass"]
    assert cells.rows["VU-PKD-1"] == ["", "", "pass"]
    assert "VU-HDR-1" not in cells.differs
    assert {"VU-GVB-1 [queue_size=128, ring=split]", "VU-PKD-1", "VU-INF-5"} <= cells.differs
    assert "VU-INF-5" in cells.differs  # unsupported vs unsupported vs missing
    # Back-end table: one row per back-end with its counts and gate.
    for label, r in zip(["reference", "qsd-11.1", "dpdk-vhost-blk"], reports, strict=True):
        zero = ' class="zero"'
        counts = "".join(
            f"<td{zero if r.counts()[v] == 0 else ''}>{r.counts()[v]}</td>"
            for v in matrix.VERDICT_ORDER
        )
        assert f"<tr><td>{label}</td>" in text and counts in text
    assert text.count('class="gate gate-pass"') == 1  # qsd
    # Offered protocol features: INFLIGHT_SHMFD offered by reference and dpdk, not qsd.
    row = re.search(r"<tr><td><code>INFLIGHT_SHMFD</code></td>(.*?)</tr>", text)
    assert row and row.group(1).count("bit-on") == 2 and row.group(1).count("bit-off") == 1
    assert "0x0000000000000208" in text  # qsd's protocol feature word
    # The stop-latency plot compares back-ends: reference's two modes and qsd's drain.
    assert 'data-series="qsd-11.1: drain"' in text and 'data-series="reference: no-drain"' in text
    assert text.count("<script") == 1  # ours: the "only differing rows" toggle


def test_markdown_matrix() -> None:
    text = matrix.render_markdown(three_reports())
    assert "| case | family | level | reference | qsd-11.1 | dpdk-vhost-blk |" in text
    assert "| VU-HDR-1 | handshake | MUST conformance | pass | pass | pass |" in text
    assert "| \u2260 VU-PKD-1 | packed | MUST conformance | \u2014 | \u2014 | pass |" in text
    assert "| INFLIGHT\\_SHMFD | yes | \u2014 | yes |" in text
    assert "<script>" not in text


def test_duplicate_names_are_numbered() -> None:
    a, b = sample_report("x"), sample_report("x")
    assert matrix.backend_labels([a, b, sample_report("y")]) == ["x (1)", "x (2)", "y"]


def test_cli(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = []
    for i, r in enumerate(three_reports()):
        paths.append(str(r.save(tmp_path / f"r{i}" / "report.json")))
    assert matrix.main([*paths, "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "matrix.html").read_text().startswith("<!DOCTYPE html>")
    assert "dpdk-vhost-blk" in (tmp_path / "out" / "matrix.md").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": "1.0"}))
    assert matrix.main([paths[0], str(bad), "-o", str(tmp_path / "out2")]) == 2
    assert f"{bad}: report: missing required key" in capsys.readouterr().err
    with pytest.raises(ValueError):
        matrix.Matrix([])
