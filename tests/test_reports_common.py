"""Shared rendering helpers: control characters, one-line text, trace columns."""

from __future__ import annotations

from vhost_conformance.reports.common import (
    VERDICT_MEANING,
    VERDICT_ORDER,
    clean_text,
    format_params,
    is_from_backend,
    one_line,
    trace_columns,
    trace_table,
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
    trace = [{"note": "n", "name": "GET_FEATURES", "zz": 1}, {"t_s": 0.5, "direction": "<"}]
    assert trace_columns(trace) == ["t_s", "direction", "name", "note", "zz"]
    assert trace_text(trace).splitlines() == [
        "name=GET_FEATURES  note=n  zz=1",
        "t_s=0.5  direction=<",
    ]
    assert trace_text(None) == ""


def test_channel_trace_shape() -> None:
    """frontend/channel.py's entries: absolute time shown relative, payload dict as JSON."""
    trace = [
        {"time": 10.5, "direction": "fe->be", "channel": "main", "request": 11,
         "name": "GET_VRING_BASE", "flags": "0x1", "size": 8, "nfds": 0,
         "payload": {"num": 0, "index": 1}},
        {"time": 10.75, "direction": "be->fe", "channel": "main", "request": 11,
         "name": "GET_VRING_BASE", "flags": "0x5", "size": 8, "nfds": 0, "payload": None},
    ]  # fmt: skip
    columns, rows = trace_table(trace)
    assert columns[:4] == ["t_s", "direction", "channel", "name"] and "time" not in columns
    assert [r["t_s"] for r in rows] == ["0.000000", "0.250000"]
    assert rows[0]["payload"] == '{"index": 1, "num": 0}'
    assert "payload" not in rows[1]  # None shown as nothing
    assert [is_from_backend(r["direction"]) for r in rows] == [False, True]


def test_every_verdict_is_ordered_and_explained() -> None:
    assert sorted(VERDICT_ORDER) == sorted(Verdict)
    assert set(VERDICT_MEANING) == set(Verdict)
