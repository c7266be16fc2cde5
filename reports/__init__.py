"""Result model (report.json) and its renderings: JUnit, HTML, Markdown, the matrix.

``write_all(report, outdir)`` writes report.json (the truth), junit.xml, summary.md and
report.html; ``vhost_conformance.reports.matrix`` renders several reports side by side.
"""

from __future__ import annotations

import os
import pathlib

from vhost_conformance.reports import html, junit, markdown
from vhost_conformance.reports.model import (
    BackendInfo,
    CaseResult,
    KnownDeviations,
    Level,
    Measurement,
    Report,
    ReportFormatError,
    Verdict,
)

__all__ = [
    "BackendInfo",
    "CaseResult",
    "KnownDeviations",
    "Level",
    "Measurement",
    "Report",
    "ReportFormatError",
    "Verdict",
    "write_all",
]

FILE_NAMES = {
    "json": "report.json",
    "junit": "junit.xml",
    "markdown": "summary.md",
    "html": "report.html",
}


def write_all(report: Report, outdir: str | os.PathLike[str]) -> dict[str, pathlib.Path]:
    """Write report.json, junit.xml, summary.md and report.html into *outdir* (created).

    Returns ``{"json": path, "junit": path, "markdown": path, "html": path}``.
    """
    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "json": report.save(out / FILE_NAMES["json"]),
        "junit": junit.write(report, out / FILE_NAMES["junit"]),
        "markdown": markdown.write(report, out / FILE_NAMES["markdown"]),
        "html": html.write(report, out / FILE_NAMES["html"]),
    }
