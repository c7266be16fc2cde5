"""summary.md: a short Markdown summary for a CI step summary (GitHub, GitLab, Forgejo).

Counts per verdict, the cases that fail the gate with clause and reason, the other
problems (non-strict, xpass), per failing emulated case whether real QEMU confirmed it, and
the run-wide measurements. Text from back-ends is
escaped: Markdown markup and raw HTML both come out literally.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Iterable

from vhost_conformance.reports.common import (
    VERDICT_MEANING,
    VERDICT_ORDER,
    case_details,
    format_params,
    gate_word,
    hex_bits,
    level_text,
    one_line,
    verdict_text,
)
from vhost_conformance.reports.model import CaseResult, Report, Verdict

# Inline markup only: the text always sits inside a line (table cell, sentence), so block
# markers (#, -, >) cannot start a block.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def md(text: str | None, limit: int = 300) -> str:
    """*text* on one line, with HTML and Markdown markup neutralised (safe in a table cell)."""
    flat = one_line(text, limit)
    flat = flat.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", flat)


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    """A Markdown table; cells must already be escaped."""
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# GitHub caps a step summary at 1 MiB; a long table is cut, the JSON and HTML have it all.
MAX_ROWS = 200


def _capped(rows: list[list[str]], width: int) -> list[list[str]]:
    if len(rows) <= MAX_ROWS:
        return rows
    more = [f"\u2026 and {len(rows) - MAX_ROWS} more (see report.html)"] + [""] * (width - 1)
    return [*rows[:MAX_ROWS], more]


def _case_rows(cases: Iterable[CaseResult]) -> list[list[str]]:
    return _capped(_case_rows_all(cases), 6)


def _case_rows_all(cases: Iterable[CaseResult]) -> list[list[str]]:
    return [
        [
            md(c.id, 80),
            md(c.title, 120),
            level_text(c),
            md(c.clause, 120),
            f"**{md(verdict_text(c), 80)}**",
            md(" ".join([c.reason, *(f"[{k}: {v}]" for k, v in case_details(c))])),
        ]
        for c in cases
    ]


def render(report: Report) -> str:
    """summary.md text."""
    gate = gate_word(report)
    mark = "\u2705" if gate == "PASS" else "\u274c"
    b = report.backend
    lines = [
        f"## vhost-conformance: {md(b.name, 100)}: {mark} {gate}",
        "",
        f"{len(report.cases)} cases in {report.duration_s:.1f} s, started {md(report.started, 40)}, "
        f"suite {md(report.suite_version, 40)}, {'strict' if report.strict else 'not strict'}.",
        "",
        f"Features offered {hex_bits(b.features)}, protocol features offered "
        f"{hex_bits(b.protocol_features)}"
        + (f" ({md(', '.join(b.protocol_feature_names), 400)})" if b.protocol_feature_names else "")
        + ".",
        "",
    ]
    counts = report.counts()
    lines += table(
        ["verdict", "cases", "meaning"],
        [[v.value, str(counts[v]), VERDICT_MEANING[v]] for v in VERDICT_ORDER if counts[v]],
    )
    failing = report.gate_failures()
    lines += ["", f"### Cases failing the gate ({len(failing)})", ""]
    if failing:
        lines += table(["id", "title", "level", "clause", "verdict", "reason"], _case_rows(failing))
    else:
        lines.append("None.")
    failing_ids = {id(c) for c in failing}
    others = [
        c
        for c in report.cases
        if id(c) not in failing_ids
        and (c.bad or c.see is not None or c.verdict is Verdict.DISCONNECT)
    ]
    if others:
        lines += [
            "",
            f"### Other problems, not failing the gate (followers and allowed disconnects included) ({len(others)})",
            "",
        ]
        lines += table(["id", "title", "level", "clause", "verdict", "reason"], _case_rows(others))
    xpass = [c for c in report.cases if c.verdict is Verdict.XPASS]
    if xpass:
        lines += ["", f"### Known deviations that now pass ({len(xpass)}): prune them", ""]
        lines += table(
            ["id", "title", "deviation"],
            [[md(c.id, 80), md(c.title, 120), md(c.deviation)] for c in xpass],
        )
    xfail = [c for c in report.cases if c.verdict is Verdict.XFAIL]
    if xfail:
        lines += ["", f"### Known deviations, failing as expected ({len(xfail)})", ""]
        lines += table(
            ["id", "title", "deviation", "reason"],
            [[md(c.id, 80), md(c.title, 120), md(c.deviation), md(c.reason)] for c in xfail],
        )
    confirmed = [c for c in report.cases if c.qemu_confirmed is not None]
    if confirmed:
        lines += ["", f"### Findings held against real QEMU 11.1.3 ({len(confirmed)})", ""]
        lines += table(
            ["id", "verdict", "VU-QEMU case", "confirmed by QEMU"],
            _capped([[md(c.id, 80), md(verdict_text(c), 80), md(c.qemu_case or "\u2014", 80),
                      md(c.qemu_confirmed, 40)] for c in confirmed], 4),
        )  # fmt: skip
    if report.measurements:
        lines += ["", "### Measurements", ""]
        lines += table(
            ["name", "parameters", "value", "unit"],
            [
                [md(m.name, 80), md(format_params(m.parameters)), f"{m.value:g}", md(m.unit, 20)]
                for m in report.measurements
            ],
        )
    return "\n".join(lines) + "\n"


def write(report: Report, path: str | os.PathLike[str]) -> pathlib.Path:
    """Write summary.md to *path*; return it."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(report), encoding="utf-8")
    return target
