"""report.html without a browser: self-contained, escaped, CSP-pinned, every case present.

The browser test (filters working, no console errors) is test_reports_html_browser.py.
"""

from __future__ import annotations

import base64
import hashlib
import re
from html.parser import HTMLParser

from vhost_conformance.reports import html
from vhost_conformance.reports.model import Measurement
from vhost_conformance.reports.sample import sample_report


class Collector(HTMLParser):
    """Tags with attributes, and the text of <script>/<style>."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline: dict[str, list[str]] = {"script": [], "style": []}
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in self.inline:
            self._in = tag
            self.inline[tag].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == self._in:
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in:
            self.inline[self._in][-1] += data


def parse(text: str) -> Collector:
    c = Collector()
    c.feed(text)
    c.close()
    return c


def test_self_contained_no_fetches() -> None:
    doc = parse(html.render(sample_report()))
    for tag, attrs in doc.tags:
        for name in ("src", "href", "action", "srcset", "poster", "data"):
            value = attrs.get(name)
            assert value is None or value.startswith(("data:", "#")), f"<{tag} {name}={value!r}>"
        assert tag not in ("iframe", "object", "embed", "img", "base"), tag
        if tag == "link":
            assert attrs.get("href", "").startswith("data:")  # type: ignore[union-attr]
    assert len(doc.inline["script"]) == 1 and len(doc.inline["style"]) == 1


def test_csp_pins_the_inline_script_and_style() -> None:
    text = html.render(sample_report())
    doc = parse(text)
    csp = next(a["content"] for t, a in doc.tags if t == "meta" and a.get("http-equiv"))
    assert csp is not None and "default-src 'none'" in csp

    def digest(s: str) -> str:
        return "sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()

    assert f"script-src '{digest(doc.inline['script'][0])}'" in csp
    assert f"style-src '{digest(doc.inline['style'][0])}'" in csp
    assert "unsafe-inline" not in csp


def test_hostile_text_is_escaped() -> None:
    text = html.render(sample_report())
    assert text.count("<script") == 1  # ours only
    assert "<img" not in text and "</details></td></tr><img" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert "\x00" not in text and "\x1b" not in text and "\\x00\\x1b" in text
    # Markup in a back-end's name lands in title/header as text.
    evil = sample_report(backend_name='"><script>x()</script>')
    assert html.render(evil).count("<script") == 1


def test_every_case_and_its_fields() -> None:
    report = sample_report()
    doc = parse(html.render(report))
    bodies = [a for t, a in doc.tags if t == "tbody" and "case" in (a.get("class") or "")]
    assert [b["data-case-id"] for b in bodies] == [c.id for c in report.cases]
    assert [b["data-verdict"] for b in bodies] == [c.verdict.value for c in report.cases]
    assert [b["data-family"] for b in bodies] == [c.family for c in report.cases]
    assert len({b["id"] for b in bodies}) == len(bodies)  # unique DOM ids
    text = html.render(report)
    for c in report.cases:
        assert html.h(c.requirement) in text and html.h(c.clause) in text
    # Filter buttons for each present verdict, each family in the select.
    buttons = [a.get("data-filter-verdict") for t, a in doc.tags if t == "button"]
    assert set(buttons) >= {v.value for v, n in report.counts().items() if n} | {"", "problems"}
    options = [a.get("value") for t, a in doc.tags if t == "option"]
    assert set(report.families()) <= set(options)
    # Traces: one collapsible per case with a trace, rows = messages + header.
    assert text.count('<details class="trace">') == sum(1 for c in report.cases if c.trace)


def test_plots() -> None:
    text = html.render(sample_report())
    assert text.count('class="plot plot-stop-latency"') == 2  # inflight 16 and 64
    assert text.count('class="plot plot-downtime"') == 1
    stop = re.findall(r"<svg[^>]*plot-stop-latency.*?</svg>", text)
    assert all(s.count("<polyline") == 2 for s in stop)  # drain and no-drain
    assert all(s.count("<circle") == 8 for s in stop)  # 4 disk latencies x 2 modes
    assert "16 requests in flight" in stop[0] and "64 requests in flight" in stop[1]


def test_no_measurements_no_plots() -> None:
    import dataclasses

    bare = dataclasses.replace(sample_report(), measurements=[])
    text = html.render(bare)
    assert "<svg" not in text and 'id="measurements"' not in text
    only_iops = dataclasses.replace(bare, measurements=[Measurement("iops", "1/s", 1.0)])
    text = html.render(only_iops)
    assert "<svg" not in text and 'id="measurements"' in text
