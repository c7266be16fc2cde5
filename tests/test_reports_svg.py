"""The inline SVG charts: ticks, scaling, empty and non-finite data, escaping."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from vhost_conformance.reports.svg import bar_chart, line_plot, nice_ticks

SVG = "{http://www.w3.org/2000/svg}"


def test_nice_ticks() -> None:
    assert nice_ticks(0, 50) == [0, 10, 20, 30, 40, 50]
    assert nice_ticks(0, 0.9) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ticks = nice_ticks(0, 101)
    assert ticks[0] == 0 and ticks[-1] >= 101
    assert nice_ticks(5, 5)[-1] > 5  # degenerate range widened
    assert nice_ticks(math.nan, 1) == [0.0, 1.0]


def test_line_plot_is_valid_svg_with_points_in_the_frame() -> None:
    svg = line_plot(
        {"drain": [(0, 0.4), (50, 62.9)], "no-drain<&>": [(0, 0.3), (50, 0.4), (60, math.nan)]},
        title="t <b>", x_label="x", y_label="y",
    )  # fmt: skip
    root = ET.fromstring(svg)  # well-formed XML, names escaped
    circles = list(root.iter(f"{SVG}circle"))
    assert len(circles) == 4  # the NaN point dropped
    for c in circles:
        assert 0 <= float(c.get("cx", "-1")) <= float(root.get("width", "0"))
        assert 0 <= float(c.get("cy", "-1")) <= float(root.get("height", "0"))
    series = [g.get("data-series") for g in root.iter(f"{SVG}g")]
    assert series == ["drain", "no-drain<&>"]
    # Higher values are drawn higher (smaller y).
    drain = [c for c in circles][:2]
    assert float(drain[1].get("cy", "0")) < float(drain[0].get("cy", "0"))


def test_empty_charts_say_so() -> None:
    assert "no data" in line_plot({}, title="t", x_label="x", y_label="y")
    assert "no data" in bar_chart([("a", math.inf)], title="t", value_label="v")


def test_bar_chart() -> None:
    root = ET.fromstring(
        bar_chart([("drain", 40.0), ("no-drain", 10.0)], title="d", value_label="ms")
    )
    widths = [float(r.get("width", "0")) for r in root.iter(f"{SVG}rect")]
    assert len(widths) == 2 and widths[0] == 4 * widths[1]
