"""report.html: one self-contained file (inline CSS, JS and SVG; no network, no assets).

Sections: the run and the back-end (offered and negotiated feature bits), verdict counts
that double as filter buttons, filters by family / level / text, every case with its
requirement, reason and collapsible wire trace, and inline SVG plots of the measurements
(stop latency against disk latency, drain vs no-drain; migration downtime).

Everything that came from a back-end or a case is escaped. A Content-Security-Policy
allows only this file's own script and style (by hash) and ``data:`` images, so even a
missed escape could not run script or load anything.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pathlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

from vhost_conformance.reports.common import (
    VERDICT_MEANING,
    VERDICT_ORDER,
    basis_lines,
    case_details,
    clean_text,
    format_params,
    format_value,
    gate_word,
    hex_bits,
    is_from_backend,
    is_problem,
    level_text,
    trace_table,
    verdict_text,
)
from vhost_conformance.reports.model import CaseResult, Level, Measurement, Report
from vhost_conformance.reports.svg import bar_chart, line_plot

_HERE = pathlib.Path(__file__).resolve().parent

DASH = "\u2014"
STOP_LATENCY = "stop_latency_ms"
MIGRATION_DOWNTIME = "migration_downtime_ms"


def h(text: object) -> str:
    """Escape *text* for HTML text and attribute values (control characters made visible)."""
    return escape(clean_text(text if isinstance(text, str) else format_value(text)), quote=True)


def asset(name: str) -> str:
    """The text of report.css / report.js beside this module."""
    return (_HERE / name).read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()


def page(title: str, body: str, *, script: str | None = None) -> str:
    """A complete HTML document with the inline stylesheet, *body*, and optionally *script*.

    The CSP pins the style and script by hash and forbids every fetch except data: images.
    """
    css = asset("report.css")
    csp = [
        "default-src 'none'",
        f"style-src '{_sha256(css)}'",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
    ]
    if script is not None:
        csp.append(f"script-src '{_sha256(script)}'")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{"; ".join(csp)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{h(title)}</title>",
        f"<style>{css}</style>",
        "</head><body>",
        body,
    ]
    if script is not None:
        parts.append(f"<script>{script}</script>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def verdict_badge(verdict: str | None, text: str | None = None) -> str:
    """A coloured verdict label (class ``verdict v-<verdict>``)."""
    if verdict is None:
        return '<span class="verdict v-none">\u2014</span>'
    return f'<span class="verdict v-{h(verdict)}">{h(text or verdict)}</span>'


def feature_rows(report: Report) -> list[tuple[str, str]]:
    """(label, html) rows describing the back-end's feature words."""
    b = report.backend
    return [
        (
            "features offered",
            f"<code>{hex_bits(b.features)}</code> {h(', '.join(b.feature_names))}",
        ),
        (
            "protocol features offered",
            f"<code>{hex_bits(b.protocol_features)}</code> {h(', '.join(b.protocol_feature_names))}",
        ),
        ("features negotiated", f"<code>{hex_bits(b.negotiated_features)}</code>"),
        (
            "protocol features negotiated",
            f"<code>{hex_bits(b.negotiated_protocol_features)}</code>",
        ),
        ("queues", h(b.queue_num if b.queue_num is not None else "\u2014")),
    ]


def _info_table(rows: Iterable[tuple[str, str]]) -> str:
    return (
        '<table class="info">'
        + "".join(f"<tr><td>{h(k)}</td><td>{v}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _trace_table(trace: Sequence[dict[str, Any]]) -> str:
    columns, rows = trace_table(trace)
    head = "".join(f"<th>{h(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cls = "dir-be" if is_from_backend(row.get("direction")) else "dir-fe"
        cells = "".join(f'<td class="c-{h(c)}">{h(row.get(c, ""))}</td>' for c in columns)
        body.append(f'<tr class="{cls}">{cells}</tr>')
    return f'<table class="trace"><tr>{head}</tr>{"".join(body)}</table>'


def _case_body(index: int, case: CaseResult) -> str:
    search = " ".join(
        [case.id, case.title, case.family, case.clause, case.reason, case.deviation or ""]
    ).lower()
    classes = "case problem" if is_problem(case) else "case"
    title = h(case.title)
    params = format_params(case.parameters)
    row = (
        f'<tr class="case-row"><td><code>{h(case.id)}</code></td><td>{title}'
        + (f' <span class="muted">[{h(params)}]</span>' if params else "")
        + f"</td><td>{h(case.family)}</td><td>{h(level_text(case))}</td><td>{h(case.clause)}</td>"
        f"<td>{verdict_badge(case.verdict.value, verdict_text(case))}</td>"
        f"<td>{case.duration_s:.3f} s</td></tr>"
    )
    detail = [f'<div class="req">{h(case.requirement)}</div>']
    for label, text in basis_lines(case):
        detail.append(f'<div class="quote"><b>{h(label)}:</b> <q>{h(text)}</q></div>')
    if case.reason:
        detail.append(f'<div class="reason"><b>reason:</b> {h(case.reason)}</div>')
    for label, text in case_details(case):
        shown = f"<code>{h(text)}</code>" if label == "re-run" else h(text)
        detail.append(f'<div class="reason"><b>{h(label)}:</b> {shown}</div>')
    if case.deviation:
        detail.append(f'<div class="reason"><b>known deviation:</b> {h(case.deviation)}</div>')
    if case.measurements:
        detail.append(
            '<div class="muted">measurements: '
            + h(", ".join(f"{k}={v:g}" for k, v in sorted(case.measurements.items())))
            + "</div>"
        )
    if case.trace:
        detail.append(
            f'<details class="trace"><summary>wire trace ({len(case.trace)} '
            f"message{'' if len(case.trace) == 1 else 's'})</summary>"
            f"{_trace_table(case.trace)}</details>"
        )
    if case.log_tail:
        detail.append(
            '<details class="log"><summary>back-end log tail</summary>'
            f"<pre>{h(case.log_tail)}</pre></details>"
        )
    return (
        f'<tbody class="{classes}" id="case-{index}" data-case-id="{h(case.id)}" data-verdict="{h(case.verdict.value)}" '
        f'data-family="{h(case.family)}" data-level="{h(case.level.value)}" data-tier="{h(case.tier.value)}" '
        f'data-search="{h(search)}">{row}'
        f'<tr class="case-detail"><td colspan="7">{"".join(detail)}</td></tr></tbody>'
    )


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def stop_latency_plots(measurements: Sequence[Measurement]) -> list[str]:
    """One SVG per in-flight count: stop latency against disk latency, a line per mode."""
    groups: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for m in measurements:
        if m.name != STOP_LATENCY:
            continue
        x = _number(m.parameters.get("disk_latency_ms"))
        if x is None:
            continue
        mode = str(m.parameters.get("mode", "?"))
        inflight = m.parameters.get("inflight")
        groups[format_value(inflight) if inflight is not None else ""][mode].append((x, m.value))
    plots = []
    for inflight, series in groups.items():
        # drain first, then no-drain, then anything else: stable colours across reports.
        ordered = {
            k: series[k] for k in sorted(series, key=lambda s: (s != "drain", s != "no-drain", s))
        }
        title = "GET_VRING_BASE stop latency" + (
            f", {inflight} requests in flight" if inflight else ""
        )
        plots.append(
            line_plot(
                ordered,
                title=title,
                x_label="disk latency (ms)",
                y_label="stop latency (ms)",
                css_class="plot plot-stop-latency",
            )
        )
    return plots


def downtime_plot(measurements: Sequence[Measurement]) -> str | None:
    """A bar chart of migration downtime measurements, or None when there are none."""
    bars = [
        (format_params(m.parameters) or m.name, m.value)
        for m in measurements
        if m.name == MIGRATION_DOWNTIME
    ]
    if not bars:
        return None
    return bar_chart(
        bars,
        title="migration downtime",
        value_label="downtime (ms)",
        css_class="plot plot-downtime",
    )


def measurements_table(measurements: Sequence[Measurement]) -> str:
    """All run-wide measurements as a table."""
    rows = "".join(
        f"<tr><td><code>{h(m.name)}</code></td><td>{h(format_params(m.parameters))}</td>"
        f"<td>{m.value:g}</td><td>{h(m.unit)}</td></tr>"
        for m in measurements
    )
    return (
        '<table class="measurements"><tr><th>name</th><th>parameters</th><th>value</th>'
        f"<th>unit</th></tr>{rows}</table>"
    )


def render(report: Report) -> str:
    """report.html text."""
    gate = gate_word(report)
    b = report.backend
    counts = report.counts()
    body = [
        f"<header><h1>vhost-conformance: {h(b.name)} "
        f'<span class="gate gate-{gate.lower()}" id="gate">{gate}</span></h1>'
        f'<div class="muted">{len(report.cases)} cases, {len(report.gate_failures())} failing '
        f"the gate ({'strict' if report.strict else 'not strict'})</div></header>",
        '<h2 id="summary">Run</h2>',
        _info_table(
            [
                ("back-end", h(b.name)),
                ("command", f"<code>{h(b.command or DASH)}</code>"),
                ("started", h(report.started)),
                ("duration", f"{report.duration_s:.1f} s"),
                ("suite version", h(report.suite_version)),
                ("schema version", h(report.schema_version)),
                ("strict", "yes" if report.strict else "no"),
                ("argv", f"<code>{h(' '.join(report.argv))}</code>"),
                *feature_rows(report),
                *[(f"extra: {k}", h(v)) for k, v in sorted(b.extra.items())],
            ]
        ),
        '<h2 id="verdicts">Verdicts</h2>',
        '<table class="counts"><tr><th>verdict</th><th>cases</th><th>meaning</th></tr>'
        + "".join(
            f"<tr><td>{verdict_badge(v.value)}</td><td>{counts[v]}</td>"
            f"<td>{h(VERDICT_MEANING[v])}</td></tr>"
            for v in VERDICT_ORDER
        )
        + "</table>",
    ]
    plots = stop_latency_plots(report.measurements)
    downtime = downtime_plot(report.measurements)
    if downtime:
        plots.append(downtime)
    if report.measurements:
        body.append('<h2 id="measurements">Measurements</h2>')
        if plots:
            body.append(f'<div class="plots">{"".join(plots)}</div>')
        body.append(measurements_table(report.measurements))
    families = report.families()
    buttons = ['<button type="button" data-filter-verdict="">all</button>']
    buttons.append('<button type="button" data-filter-verdict="problems">problems</button>')
    buttons += [
        f'<button type="button" data-filter-verdict="{v.value}" id="filter-{v.value}">'
        f'{verdict_badge(v.value)}<span class="n">{counts[v]}</span></button>'
        for v in VERDICT_ORDER
        if counts[v]
    ]
    body += [
        '<h2 id="cases">Cases</h2>',
        '<nav id="filters">',
        *buttons,
        '<select id="filter-family" aria-label="family"><option value="">all families</option>'
        + "".join(f'<option value="{h(f)}">{h(f)}</option>' for f in families)
        + "</select>",
        '<select id="filter-level" aria-label="level"><option value="">all levels</option>'
        + "".join(f'<option value="{lv.value}">{lv.value}</option>' for lv in Level)
        + "</select>",
        '<input id="filter-text" type="search" placeholder="search id, title, reason" '
        'aria-label="search">',
        '<button type="button" id="expand-all">expand traces</button>',
        '<button type="button" id="collapse-all">collapse traces</button>',
        f'<span id="shown-count">{len(report.cases)} of {len(report.cases)} cases shown</span>',
        "</nav>",
        '<table class="cases" id="case-table"><thead><tr><th>id</th><th>title</th><th>family</th>'
        "<th>level</th><th>clause</th><th>verdict</th><th>time</th></tr></thead>",
        *[_case_body(i, c) for i, c in enumerate(report.cases)],
        "</table>",
    ]
    return page(
        f"vhost-conformance: {b.name}: {gate}",
        "\n".join(body),
        script=asset("report.js"),
    )


def write(report: Report, path: str | os.PathLike[str]) -> pathlib.Path:
    """Write report.html to *path*; return it."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(report), encoding="utf-8")
    return target
