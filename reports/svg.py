"""Small inline SVG charts (no dependencies): a line plot and a bar chart.

All text goes through html.escape; the output is an ``<svg>`` element to inline in HTML.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape as _html_escape

from vhost_conformance.reports.common import clean_text


def escape(text: str) -> str:
    """*text* for SVG text and attributes: control characters made visible, markup escaped."""
    return _html_escape(clean_text(text), quote=True)


# Colour-blind-safe palette (Okabe-Ito).
PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000")

_W, _H = 560, 320
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 150, 34, 48


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 5 x 10^k steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks: list[float] = []
    t = start
    # Up to the first tick at or above hi, so every value lies inside the frame.
    while len(ticks) < 50:
        ticks.append(round(t, 12))
        if t >= hi - step * 1e-9:
            break
        t += step
    return ticks


def _fmt(v: float) -> str:
    return f"{v:g}"


@dataclass(frozen=True, slots=True)
class _Frame:
    """The plot area and its scales: data coordinates to SVG pixels."""

    x_ticks: list[float]
    y_ticks: list[float]
    pw: float = _W - _LEFT - _RIGHT
    ph: float = _H - _TOP - _BOTTOM

    def px(self, x: float) -> float:
        """The SVG x of data x."""
        x0, x1 = self.x_ticks[0], self.x_ticks[-1]
        return _LEFT + (x - x0) / ((x1 - x0) or 1.0) * self.pw

    def py(self, y: float) -> float:
        """The SVG y of data y."""
        y0, y1 = self.y_ticks[0], self.y_ticks[-1]
        return _TOP + self.ph - (y - y0) / ((y1 - y0) or 1.0) * self.ph


def _axes(frame: _Frame, x_label: str, y_label: str) -> list[str]:
    """Both axes, the grid lines with their tick labels, and the axis labels."""
    pw, ph = frame.pw, frame.ph
    axis = 'stroke="#444" stroke-width="1"'
    parts = [
        f'<line x1="{_LEFT}" y1="{_TOP + ph}" x2="{_LEFT + pw}" y2="{_TOP + ph}" {axis}/>',
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + ph}" {axis}/>',
    ]
    for t in frame.x_ticks:
        x = frame.px(t)
        parts.append(
            f'<line x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{_TOP + ph}" stroke="#ddd"/>'
        )
        parts.append(
            f'<text x="{x:.1f}" y="{_TOP + ph + 16}" text-anchor="middle" '
            f'class="tick">{_fmt(t)}</text>'
        )
    for t in frame.y_ticks:
        y = frame.py(t)
        parts.append(
            f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + pw}" y2="{y:.1f}" stroke="#ddd"/>'
        )
        parts.append(
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_fmt(t)}</text>'
        )
    parts.append(
        f'<text x="{_LEFT + pw / 2}" y="{_H - 10}" text-anchor="middle" class="axis-label">'
        f"{escape(x_label)}</text>"
    )
    parts.append(
        f'<text x="14" y="{_TOP + ph / 2}" text-anchor="middle" class="axis-label" '
        f'transform="rotate(-90 14 {_TOP + ph / 2})">{escape(y_label)}</text>'
    )
    return parts


def _series(frame: _Frame, i: int, name: str, pts: Sequence[tuple[float, float]]) -> list[str]:
    """Series number ``i``: its polyline, point markers and legend entry."""
    px, py = frame.px, frame.py
    colour = PALETTE[i % len(PALETTE)]
    coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
    parts = [
        f'<g class="series" data-series="{escape(name)}">'
        f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>'
    ]
    for x, y in pts:
        parts.append(
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{colour}">'
            f"<title>{escape(name)}: {_fmt(x)} \u2192 {_fmt(y)}</title></circle>"
        )
    parts.append("</g>")
    ly = _TOP + 14 + 18 * i
    lx = _LEFT + frame.pw + 12
    parts.append(
        f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 18}" y2="{ly - 4}" stroke="{colour}" '
        f'stroke-width="3"/><text x="{lx + 24}" y="{ly}" class="legend">{escape(name)}</text>'
    )
    return parts


def line_plot(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    css_class: str = "plot",
) -> str:
    """An SVG line plot, one polyline with point markers per series, with axes and legend.

    Points with a non-finite coordinate are dropped; an empty plot says so.
    """
    clean = {
        name: sorted((x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y))
        for name, pts in series.items()
    }
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="{escape(css_class)}" '
        f'viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
        f'aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text x="{_W / 2}" y="20" text-anchor="middle" class="plot-title">{escape(title)}</text>',
    ]
    if not xs:
        parts.append(f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle">no data</text></svg>')
        return "".join(parts)
    frame = _Frame(
        nice_ticks(min(0.0, min(xs)), max(xs)), nice_ticks(min(0.0, min(ys)), max(ys))
    )
    parts += _axes(frame, x_label, y_label)
    for i, (name, pts) in enumerate(clean.items()):
        parts += _series(frame, i, name, pts)
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(
    bars: Sequence[tuple[str, float]],
    *,
    title: str,
    value_label: str,
    css_class: str = "plot",
) -> str:
    """An SVG horizontal bar chart, one labelled bar per (label, value)."""
    finite = [(label, v) for label, v in bars if math.isfinite(v)]
    row = 24
    height = _TOP + row * max(len(finite), 1) + _BOTTOM
    label_w = 220
    pw = _W - label_w - 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="{escape(css_class)}" '
        f'viewBox="0 0 {_W} {height}" width="{_W}" height="{height}" role="img" '
        f'aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text x="{_W / 2}" y="20" text-anchor="middle" class="plot-title">{escape(title)}</text>',
    ]
    if not finite:
        parts.append(
            f'<text x="{_W / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>'
        )
        return "".join(parts)
    ticks = nice_ticks(0.0, max(max(v for _, v in finite), 0.0))
    top = ticks[-1] or 1.0
    for i, (label, v) in enumerate(finite):
        y = _TOP + row * i
        w = max(v, 0.0) / top * pw
        short = label if len(label) <= 34 else label[:33] + "\u2026"
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 16}" text-anchor="end" class="tick">'
            f"{escape(short)}</text>"
            f'<rect class="bar" x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row - 8}" '
            f'fill="{PALETTE[0]}"><title>{escape(label)}: {_fmt(v)}</title></rect>'
            f'<text x="{label_w + w + 4:.1f}" y="{y + 16}" class="tick">{_fmt(v)}</text>'
        )
    base = _TOP + row * len(finite)
    parts.append(
        f'<text x="{label_w + pw / 2}" y="{base + 30}" text-anchor="middle" '
        f'class="axis-label">{escape(value_label)}</text></svg>'
    )
    return "".join(parts)
