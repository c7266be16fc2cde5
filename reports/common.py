"""Helpers shared by the renderings: verdict order and wording, text cleaning, traces."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from vhost_conformance.reports.model import CaseResult, Measurement, Report, Verdict

# Order in summaries: the bad news first, then the rest.
VERDICT_ORDER: tuple[Verdict, ...] = (
    Verdict.FAIL,
    Verdict.CRASH,
    Verdict.HANG,
    Verdict.DISCONNECT,
    Verdict.ERROR,
    Verdict.NON_STRICT,
    Verdict.FLAKY,
    Verdict.XPASS,
    Verdict.XFAIL,
    Verdict.UNSUPPORTED,
    Verdict.SKIP,
    Verdict.PASS,
)

VERDICT_MEANING: dict[Verdict, str] = {
    Verdict.PASS: "the requirement holds",
    Verdict.FAIL: "a MUST requirement is violated",
    Verdict.NON_STRICT: "a SHOULD requirement is violated (fails the gate only with --strict)",
    Verdict.UNSUPPORTED: "the back-end does not offer what the case needs",
    Verdict.SKIP: "the environment lacks something the case needs",
    Verdict.HANG: "the back-end missed a deadline",
    Verdict.CRASH: "the back-end process died (its exit status or signal is shown)",
    Verdict.DISCONNECT: (
        "the back-end closed the connection, its process alive: allowed (pass-like) where "
        "the spec lets it close on bad input, a failure where QEMU would lose the device"
    ),
    Verdict.FLAKY: "a finding that did not reproduce on a fresh back-end (sequence and seed shown)",
    Verdict.ERROR: "the suite itself failed",
    Verdict.XFAIL: "a known deviation failed as expected",
    Verdict.XPASS: "a known deviation now passes: prune it from the list",
}

# Keys a wire-trace entry may carry, in display order; any other key is shown after these.
# frontend/channel.py TraceEntry.to_dict writes time (monotonic seconds), direction
# ("fe->be" / "be->fe"), channel, request (number), name, flags, size, nfds, payload, note;
# t_s, fds, payload_hex and decoded are accepted from other producers.
TRACE_KEYS: tuple[str, ...] = (
    "t_s",
    "direction",
    "channel",
    "name",
    "request",
    "flags",
    "size",
    "nfds",
    "fds",
    "payload",
    "payload_hex",
    "decoded",
    "note",
)

# C0 controls except tab/newline, DEL, C1 controls, and the non-characters XML 1.0 forbids.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def clean_text(text: str | None) -> str:
    """*text* with control characters shown as ``\\xNN`` (safe for XML 1.0 and terminals)."""
    if not text:
        return ""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def one_line(text: str | None, limit: int = 300) -> str:
    """*text* cleaned, whitespace collapsed to single spaces, cut at *limit* characters."""
    flat = " ".join(clean_text(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "\u2026"


def format_value(value: object) -> str:
    """A parameter or trace value as short text (JSON for containers)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Mapping | list | tuple):
        return clean_text(json.dumps(value, sort_keys=True, default=str))
    return clean_text(str(value))


def format_params(params: Mapping[str, object]) -> str:
    """``key=value, ...`` in key order, empty for no parameters."""
    return ", ".join(f"{k}={format_value(params[k])}" for k in sorted(params))


def _relative_time(trace: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Entries with an absolute ``time`` given a ``t_s`` relative to the first entry instead."""
    times = [
        e["time"]
        for e in trace
        if isinstance(e.get("time"), int | float) and not isinstance(e.get("time"), bool)
    ]
    if not times or any("t_s" in e for e in trace):
        return [dict(e) for e in trace]
    start = min(times)
    out = []
    for entry in trace:
        entry = dict(entry)
        t = entry.pop("time", None)
        if isinstance(t, int | float) and not isinstance(t, bool):
            entry = {"t_s": f"{t - start:.6f}", **entry}
        out.append(entry)
    return out


def trace_columns(trace: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys present in *trace*: the known ones in TRACE_KEYS order, then the others."""
    present: dict[str, None] = {}
    for entry in trace:
        present.update(dict.fromkeys(entry))
    known = [k for k in TRACE_KEYS if k in present]
    return known + sorted(k for k in present if k not in TRACE_KEYS)


def trace_table(trace: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a wire trace for display: absolute ``time`` made relative to the
    first message (``t_s``), every value as short text, missing values absent."""
    entries = _relative_time(trace)
    columns = trace_columns(entries)
    rows = [
        {k: format_value(e[k]) for k in columns if k in e and e[k] is not None} for e in entries
    ]
    return columns, rows


def is_from_backend(direction: object) -> bool:
    """True for a back-end -> front-end message ("be->fe", "back-end->front-end", "<")."""
    return isinstance(direction, str) and direction.startswith(("be", "back-end", "<"))


def trace_text(trace: Sequence[Mapping[str, Any]] | None) -> str:
    """The wire trace as plain text, one message per line (for junit system-out)."""
    if not trace:
        return ""
    columns, rows = trace_table(trace)
    return "\n".join("  ".join(f"{k}={row[k]}" for k in columns if k in row) for row in rows)


def is_problem(case: CaseResult) -> bool:
    """A verdict someone should look at (a bad one counted here, a follower, or xpass)."""
    return case.bad or case.see is not None or case.verdict is Verdict.XPASS


def verdict_text(case: CaseResult) -> str:
    """The verdict as shown: ``disconnect (allowed)``, ``fail (see VU-X-1)``, ``flaky``,
    ``fail (MUST finding)`` for a MUST violation a weaker case saw."""
    text = case.verdict.value
    notes = []
    if case.verdict is Verdict.DISCONNECT:
        notes.append("allowed" if case.allowed else "not allowed")
    if case.exit_status is not None and case.verdict is Verdict.CRASH:
        notes.append(exit_status_text(case.exit_status))
    if case.see is not None:
        notes.append(f"see {case.see}")
    if case.finding_level is not None and case.gate_level is not case.level:
        notes.append(f"{case.gate_level.value} finding")
    return f"{text} ({', '.join(notes)})" if notes else text


def exit_status_text(status: int) -> str:
    """``exit status 3`` or ``signal 11`` (a negative status is the signal that killed it)."""
    return f"signal {-status}" if status < 0 else f"exit status {status}"


def case_details(case: CaseResult) -> list[tuple[str, str]]:
    """(label, text) pairs every rendering shows for a case besides its reason: the exit
    status, the case it follows from, the finding's level, whether real QEMU confirmed it, the
    command that re-runs it."""
    out: list[tuple[str, str]] = []
    if case.exit_status is not None:
        out.append(("exit status", exit_status_text(case.exit_status)))
    if case.verdict is Verdict.DISCONNECT:
        out.append(
            (
                "disconnect",
                "allowed here (the spec lets the back-end close on this input; it stayed "
                "alive and served the next connection)"
                if case.allowed
                else "not allowed here (QEMU would lose the device)",
            )
        )
    if case.see is not None:
        out.append(("see", f"follows from {case.see} (same observed behaviour, counted there)"))
    if case.finding_level is not None and case.gate_level is not case.level:
        out.append(("finding level", f"{case.gate_level.value} (gated as such)"))
    if case.qemu_confirmed is not None:
        out.append(("confirmed by QEMU", qemu_confirmed_text(case)))
    if case.rerun:
        out.append(("re-run", case.rerun))
    return out


def qemu_confirmed_text(case: CaseResult) -> str:
    """Whether real QEMU 11.1.3 confirmed this failing emulated case, and by which VU-QEMU
    case: ``yes (VU-QEMU-2)``, ``not reachable``, ``not run (VU-QEMU-6; run --qemu)``."""
    value = case.qemu_confirmed or ""
    if case.qemu_case is None:
        return value if value != "not run" else "not run (run --qemu)"
    if value == "not run":
        return f"not run ({case.qemu_case}; run --qemu)"
    return f"{value} ({case.qemu_case})"


def level_text(case: CaseResult) -> str:
    """The case's level and tier as the tables show them: ``MUST conformance``."""
    return f"{case.level.value} {case.tier.value}"


def basis_lines(case: CaseResult) -> list[tuple[str, str]]:
    """What the verdict rests on: the spec quote (conformance) or the cited QEMU behaviour
    (interop), as (label, text) pairs; empty when the case has neither."""
    out: list[tuple[str, str]] = []
    if case.quote:
        out.append(("spec", case.quote))
    if case.source:
        out.append(("QEMU 11.1.3", case.source))
    return out


def hex_bits(value: int | None) -> str:
    """A feature word as 0x%016x, or an em dash for None."""
    return "\u2014" if value is None else f"0x{value:016x}"


def measurement_label(m: Measurement) -> str:
    """``name (unit) [params]`` for tables."""
    params = format_params(m.parameters)
    return f"{m.name} [{params}]" if params else m.name


def gate_word(report: Report) -> str:
    """PASS or FAIL for the run's own strictness."""
    return "FAIL" if report.gate() else "PASS"
