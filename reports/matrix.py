"""The matrix: several reports side by side (back-ends x cases), as HTML and Markdown.

Like Autobahn|Testsuite's index: one column per back-end, one row per case (grouped by
family; rows where the back-ends disagree are marked), with each back-end's gate, verdict
counts, and the virtio / vhost-user protocol feature bits it offered, and the run-wide
measurements compared (stop latency plotted per back-end and mode).

``python -m vhost_conformance.reports.matrix A/report.json B/report.json -o OUTDIR``
writes OUTDIR/matrix.html and OUTDIR/matrix.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence

from vhost_conformance.reports.common import (
    VERDICT_ORDER,
    case_details,
    format_params,
    format_value,
    gate_word,
    hex_bits,
    level_text,
    one_line,
    verdict_text,
)
from vhost_conformance.reports.html import DASH, STOP_LATENCY, asset, h, page, verdict_badge
from vhost_conformance.reports.markdown import md, table
from vhost_conformance.reports.model import CaseResult, Report, ReportFormatError, Verdict
from vhost_conformance.reports.svg import line_plot


def case_key(case: CaseResult) -> str:
    """The row a case goes to: its id, plus its parameters when it has any."""
    params = format_params(case.parameters)
    return f"{case.id} [{params}]" if params else case.id


def backend_labels(reports: Sequence[Report]) -> list[str]:
    """One unique column label per report: the back-end's name, numbered when repeated."""
    totals = Counter(r.backend.name for r in reports)
    seen: Counter[str] = Counter()
    labels = []
    for report in reports:
        name = report.backend.name
        seen[name] += 1
        labels.append(f"{name} ({seen[name]})" if totals[name] > 1 else name)
    return labels


class Matrix:
    """Case rows x back-end columns built from several reports."""

    def __init__(self, reports: Sequence[Report]) -> None:
        if not reports:
            raise ValueError("the matrix needs at least one report")
        self.reports = list(reports)
        self.labels = backend_labels(self.reports)
        # Rows in first-seen order, grouped by family (first-seen family order).
        self.families: dict[str, list[str]] = {}
        self.first: dict[str, CaseResult] = {}
        self.cells: list[dict[str, CaseResult]] = []
        for report in self.reports:
            column: dict[str, CaseResult] = {}
            for case in report.cases:
                key = case_key(case)
                column[key] = case
                if key not in self.first:
                    self.first[key] = case
                    self.families.setdefault(case.family, []).append(key)
            self.cells.append(column)

    def rows(self) -> list[tuple[str, list[str]]]:
        """(family, [case keys]) in display order."""
        return list(self.families.items())

    def verdicts(self, key: str) -> list[Verdict | None]:
        """The verdict of case *key* in each column (None when that run lacks it)."""
        return [col[key].verdict if key in col else None for col in self.cells]

    def differs(self, key: str) -> bool:
        """True when the back-ends do not all have the same verdict for *key*."""
        return len(set(self.verdicts(key))) > 1

    def feature_names(self, protocol: bool) -> list[str]:
        """Union of offered feature names (protocol or virtio), first-seen order."""
        names: dict[str, None] = {}
        for r in self.reports:
            b = r.backend
            names.update(dict.fromkeys(b.protocol_feature_names if protocol else b.feature_names))
        return list(names)

    def measurement_rows(self) -> list[tuple[str, list[str]]]:
        """(name [params] (unit), value per column) for every run-wide measurement."""
        rows: dict[str, list[str]] = {}
        for i, r in enumerate(self.reports):
            for m in r.measurements:
                params = format_params(m.parameters)
                label = f"{m.name} [{params}] ({m.unit})" if params else f"{m.name} ({m.unit})"
                rows.setdefault(label, [""] * len(self.reports))[i] = f"{m.value:g}"
        return list(rows.items())


def _stop_latency_plots(matrix: Matrix) -> list[str]:
    groups: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for label, report in zip(matrix.labels, matrix.reports, strict=True):
        for m in report.measurements:
            x = m.parameters.get("disk_latency_ms")
            if m.name != STOP_LATENCY or isinstance(x, bool) or not isinstance(x, int | float):
                continue
            inflight = m.parameters.get("inflight")
            mode = format_value(m.parameters.get("mode", "?"))
            group = format_value(inflight) if inflight is not None else ""
            groups[group][f"{label}: {mode}"].append((float(x), m.value))
    return [
        line_plot(
            series,
            title="stop latency" + (f", {inflight} in flight" if inflight else ""),
            x_label="disk latency (ms)",
            y_label="stop latency (ms)",
            css_class="plot plot-stop-latency",
        )
        for inflight, series in groups.items()
    ]


def _html_backends(mx: Matrix) -> list[str]:
    """The back-ends table: gate, verdict counts, offered bits, suite version, start time."""
    body = [
        '<h2 id="backends">Back-ends</h2>',
        '<div class="scroll"><table class="backends"><tr><th>back-end</th><th>gate</th>'
        + "".join(f"<th>{verdict_badge(v.value)}</th>" for v in VERDICT_ORDER)
        + "<th>features offered</th><th>protocol features offered</th><th>suite</th>"
        "<th>started</th></tr>",
    ]
    for label, r in zip(mx.labels, mx.reports, strict=True):
        counts = r.counts()
        gate = gate_word(r)
        body.append(
            f"<tr><td>{h(label)}</td>"
            f'<td><span class="gate gate-{gate.lower()}">{gate}</span></td>'
            + "".join(
                f'<td class="zero">{counts[v]}</td>' if counts[v] == 0 else f"<td>{counts[v]}</td>"
                for v in VERDICT_ORDER
            )
            + f"<td><code>{hex_bits(r.backend.features)}</code></td>"
            f"<td><code>{hex_bits(r.backend.protocol_features)}</code></td>"
            f"<td>{h(r.suite_version)}</td><td>{h(r.started)}</td></tr>"
        )
    body.append("</table></div>")
    return body


def _html_features(mx: Matrix, head_cells: str) -> list[str]:
    """One table per kind of bits (protocol, virtio): which back-end offers which."""
    body: list[str] = []
    for protocol, title in (
        (True, "Protocol features offered"),
        (False, "Virtio features offered"),
    ):
        names = mx.feature_names(protocol)
        if not names:
            continue
        body.append(f"<h2>{title}</h2>")
        body.append(f'<table class="features"><tr><th>feature</th>{head_cells}</tr>')
        for name in names:
            cells = []
            for r in mx.reports:
                offered = name in (
                    r.backend.protocol_feature_names if protocol else r.backend.feature_names
                )
                cells.append(
                    '<td class="bit-on">\u2713</td>'
                    if offered
                    else '<td class="bit-off">\u2014</td>'
                )
            body.append(f"<tr><td><code>{h(name)}</code></td>{''.join(cells)}</tr>")
        body.append("</table>")
    return body


def _html_case_cell(case: CaseResult | None) -> str:
    """One verdict cell; its title is the reason (and deviation, details)."""
    if case is None:
        return f'<td class="cell">{verdict_badge(None)}</td>'
    tip = one_line(
        f"{case.reason}"
        + (f" (known deviation: {case.deviation})" if case.deviation else "")
        + "".join(f" [{k}: {v}]" for k, v in case_details(case)),
        500,
    )
    return (
        f'<td class="cell" data-verdict="{h(case.verdict.value)}" title="{h(tip)}">'
        f"{verdict_badge(case.verdict.value, verdict_text(case))}</td>"
    )


def _html_cases(mx: Matrix, head_cells: str) -> list[str]:
    """The case matrix, by family, with the filter for rows where the back-ends differ."""
    body = [
        '<h2 id="cases">Cases</h2>',
        '<p class="muted">A marked row: the back-ends disagree. Hover a verdict for its reason.</p>',
        '<nav id="filters"><label><input type="checkbox" id="only-differs"> only cases where '
        "the back-ends differ</label>"
        f'<span id="shown-count">{len(mx.first)} of {len(mx.first)} cases shown</span></nav>',
        f'<table class="matrix"><tr><th>case</th><th>title</th><th>level</th>{head_cells}</tr>',
    ]
    for family, keys in mx.rows():
        body.append(f'<tr class="family"><th colspan="{3 + len(mx.labels)}">{h(family)}</th></tr>')
        for key in keys:
            first = mx.first[key]
            cls = ' class="differs"' if mx.differs(key) else ""
            cells = "".join(_html_case_cell(col.get(key)) for col in mx.cells)
            body.append(
                f'<tr{cls} data-case="{h(key)}"><th class="case-id">{h(key)}</th>'
                f"<td>{h(first.title)}</td><td>{h(level_text(first))}</td>{cells}</tr>"
            )
    body.append("</table>")
    return body


def _html_measurements(mx: Matrix, head_cells: str) -> list[str]:
    """The measurements (stop-latency plots, then the table), or nothing."""
    measurement_rows = mx.measurement_rows()
    if not measurement_rows:
        return []
    body = ['<h2 id="measurements">Measurements</h2>']
    plots = _stop_latency_plots(mx)
    if plots:
        body.append(f'<div class="plots">{"".join(plots)}</div>')
    body.append(f'<table class="measurements"><tr><th>measurement</th>{head_cells}</tr>')
    for label, values in measurement_rows:
        body.append(
            f"<tr><td>{h(label)}</td>"
            + "".join(f"<td>{h(v or DASH)}</td>" for v in values)
            + "</tr>"
        )
    body.append("</table>")
    return body


def render_html(reports: Sequence[Report]) -> str:
    """matrix.html text: one self-contained page (inline CSS, SVG and a small filter script)."""
    mx = Matrix(reports)
    head_cells = "".join(f'<th class="backend">{h(label)}</th>' for label in mx.labels)
    body = [
        f"<header><h1>vhost-conformance matrix: {len(mx.reports)} back-ends, "
        f"{len(mx.first)} cases</h1></header>",
        *_html_backends(mx),
        *_html_features(mx, head_cells),
        *_html_cases(mx, head_cells),
        *_html_measurements(mx, head_cells),
    ]
    return page("vhost-conformance matrix", "\n".join(body), script=asset("matrix.js"))


def render_markdown(reports: Sequence[Report]) -> str:
    """matrix.md text: the back-ends, their offered protocol features, and the case matrix."""
    mx = Matrix(reports)
    cols = [md(label, 60) for label in mx.labels]
    lines = [f"## vhost-conformance matrix: {len(mx.reports)} back-ends, {len(mx.first)} cases", ""]
    lines += table(
        ["back-end", "gate", *[v.value for v in VERDICT_ORDER], "features", "protocol features"],
        [
            [
                col,
                gate_word(r),
                *[str(r.counts()[v]) for v in VERDICT_ORDER],
                hex_bits(r.backend.features),
                hex_bits(r.backend.protocol_features),
            ]
            for col, r in zip(cols, mx.reports, strict=True)
        ],
    )
    names = mx.feature_names(protocol=True)
    if names:
        lines += ["", "### Protocol features offered", ""]
        lines += table(
            ["feature", *cols],
            [
                [md(n, 60)]
                + ["yes" if n in r.backend.protocol_feature_names else "\u2014" for r in mx.reports]
                for n in names
            ],
        )
    lines += ["", "### Cases (rows marked \u2260 differ between back-ends)", ""]
    rows = []
    for _family, keys in mx.rows():
        for key in keys:
            first = mx.first[key]
            mark = "\u2260 " if mx.differs(key) else ""
            rows.append(
                [f"{mark}{md(key, 120)}", md(first.family, 40), level_text(first)]
                + [md(verdict_text(col[key]), 60) if key in col else "\u2014" for col in mx.cells]
            )
    lines += table(["case", "family", "level", *cols], rows)
    measurement_rows = mx.measurement_rows()
    if measurement_rows:
        lines += ["", "### Measurements", ""]
        lines += table(
            ["measurement", *cols],
            [
                [md(label, 200)] + [v or "\u2014" for v in values]
                for label, values in measurement_rows
            ],
        )
    return "\n".join(lines) + "\n"


def load(paths: Sequence[str | os.PathLike[str]]) -> list[Report]:
    """Load several report.json files (errors name the file and key)."""
    return [Report.load(p) for p in paths]


def write(reports: Sequence[Report], outdir: str | os.PathLike[str]) -> dict[str, pathlib.Path]:
    """Write matrix.html and matrix.md into *outdir*; return ``{"html": ..., "markdown": ...}``."""
    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    html_path = out / "matrix.html"
    md_path = out / "matrix.md"
    html_path.write_text(render_html(reports), encoding="utf-8")
    md_path.write_text(render_markdown(reports), encoding="utf-8")
    return {"html": html_path, "markdown": md_path}


def main(argv: Sequence[str] | None = None) -> int:
    """``matrix REPORT.json... -o OUTDIR``: write the matrix; 2 on unreadable input."""
    parser = argparse.ArgumentParser(prog="python -m vhost_conformance.reports.matrix")
    parser.add_argument("reports", nargs="+", help="report.json files, one per back-end run")
    parser.add_argument("-o", "--outdir", default=".", help="where matrix.html/.md go")
    args = parser.parse_args(argv)
    try:
        reports = load(args.reports)
    except (OSError, ReportFormatError) as e:
        print(f"matrix: {e}", file=sys.stderr)
        return 2
    for kind, path in write(reports, args.outdir).items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
