"""write_all and the sample report's command line."""

from __future__ import annotations

import pathlib
import xml.etree.ElementTree as ET

from vhost_conformance.reports import FILE_NAMES, Report, write_all
from vhost_conformance.reports.sample import main, sample_report


def test_write_all(tmp_path: pathlib.Path) -> None:
    report = sample_report()
    paths = write_all(report, tmp_path / "out")
    assert set(paths) == {"json", "junit", "markdown", "html"}
    assert {p.name for p in paths.values()} == set(FILE_NAMES.values())
    assert Report.load(paths["json"]) == report
    ET.parse(paths["junit"])
    assert paths["markdown"].read_text().startswith("## vhost-conformance")
    assert paths["html"].read_text().startswith("<!DOCTYPE html>")


def test_sample_main(tmp_path: pathlib.Path) -> None:
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "report.html").exists()
    assert main([]) == 2
