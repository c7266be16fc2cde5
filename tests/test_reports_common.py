"""Shared rendering helpers: control characters, one-line text, trace columns."""

from __future__ import annotations

from vhost_conformance.reports.common import (
    VERDICT_MEANING,
    VERDICT_ORDER,
    clean_text,
    format_params,
    one_line,
    trace_columns,
    trace_text,
)
from vhost_conformance.reports.model import Verdict


def test_clean_text_shows_controls() -> None:
    assert clean_text("a\x00b\x1b\x7f\tc\nd") == "a\\x00b\\x1b\\x7f\tc\nd"
    assert clean_text(None) == ""
    assert clean_text("\ud800") == "\\xd800"


def test_one_line() -> None:
    assert one_line("a\n  b\tc") == "a b c"
    assert one_line("x" * 10, 5) == "xxxx\u2026"


def test_params_and_trace() -> None:
    assert format_params({"ring": "split", "depth": 2.0}) == "depth=2, ring=split"
    trace = [{"note": "n", "request": "GET_FEATURES", "zz": 1}, {"t_s": 0.5, "direction": "<"}]
    assert trace_columns(trace) == ["t_s", "direction", "request", "note", "zz"]
    assert trace_text(trace).splitlines() == [
        "request=GET_FEATURES  note=n  zz=1",
        "t_s=0.5  direction=<",
    ]
    assert trace_text(None) == ""


def test_every_verdict_is_ordered_and_explained() -> None:
    assert sorted(VERDICT_ORDER) == sorted(Verdict)
    assert set(VERDICT_MEANING) == set(Verdict)
