"""The result model: JSON round trip, validation errors, verdict counts, the gate, deviations."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import stat

import pytest
from vhost_conformance.reports.model import (
    SCHEMA_VERSION,
    BackendInfo,
    CaseResult,
    KnownDeviations,
    Level,
    Measurement,
    Report,
    ReportFormatError,
    Verdict,
    field_names,
)
from vhost_conformance.reports.sample import HOSTILE, sample_report


def case(case_id: str, verdict: Verdict, level: Level = Level.MUST, **kw: object) -> CaseResult:
    return CaseResult(
        case_id,
        f"title {case_id}",
        "fam",
        level,
        "clause",
        "req",
        verdict,
        **kw,  # type: ignore[arg-type]
    )


def report(*cases: CaseResult, strict: bool = False) -> Report:
    return Report(
        suite_version="0.1.0",
        started="2026-11-26T06:00:00Z",
        duration_s=1.0,
        backend=BackendInfo("b"),
        cases=list(cases),
        strict=strict,
    )


def test_round_trip_through_a_file_is_exact(tmp_path: pathlib.Path) -> None:
    original = sample_report()
    path = original.save(tmp_path / "out" / "report.json")
    loaded = Report.load(path)
    assert loaded == original
    assert loaded.cases[2].trace == original.cases[2].trace
    assert HOSTILE in loaded.cases[-3].reason  # hostile text (NUL, ESC, markup) survives as data
    # Saving the loaded report gives byte-identical JSON: stable key order.
    assert loaded.save(tmp_path / "again.json").read_bytes() == path.read_bytes()
    assert not list(tmp_path.glob("out/.report.json.*")), "temporary file left behind"


def test_save_respects_the_umask(tmp_path: pathlib.Path) -> None:
    old = os.umask(0o022)
    try:
        path = sample_report().save(tmp_path / "report.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_key_order_is_the_documented_one() -> None:
    data = sample_report().to_dict()
    assert list(data) == [
        "schema_version", "suite_version", "started", "duration_s", "strict", "argv",
        "backend", "counts", "gate", "cases", "measurements",
    ]  # fmt: skip
    assert list(data["cases"][0]) == field_names(CaseResult)
    assert list(data["backend"]) == field_names(BackendInfo)
    assert list(data["measurements"][0]) == field_names(Measurement)
    assert list(data["cases"][2]["parameters"]) == ["queue_size", "ring"]  # sorted
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["counts"]["fail"] == 3 and data["gate"] == 1


def test_enums_accept_their_strings() -> None:
    c = CaseResult("VU-X-1", "t", "f", "SHOULD", "c", "r", "non-strict")  # type: ignore[arg-type]
    assert c.level is Level.SHOULD and c.verdict is Verdict.NON_STRICT
    with pytest.raises(ValueError):
        CaseResult("VU-X-1", "t", "f", "MUST", "c", "r", "passed")  # type: ignore[arg-type]


def test_non_json_parameters_are_refused_by_key() -> None:
    bad = case("VU-X-1", Verdict.PASS, parameters={"ring": object()})
    with pytest.raises(TypeError, match=r"case VU-X-1\.parameters\.ring: object"):
        bad.to_dict()


def test_bytes_paths_and_nan_become_json() -> None:
    c = case(
        "VU-X-1", Verdict.PASS,
        parameters={"payload": b"\x01\xff", "disk": pathlib.Path("/d"), "t": (1, 2)},
        measurements={"lat": math.nan},
    )  # fmt: skip
    d = c.to_dict()
    assert d["parameters"] == {"disk": "/d", "payload": "01ff", "t": [1, 2]}
    assert d["measurements"] == {"lat": None}
    json.dumps(d, allow_nan=False)
    assert math.isnan(CaseResult.from_dict(d).measurements["lat"])


def test_counts_have_every_verdict() -> None:
    r = sample_report()
    counts = r.counts()
    assert list(counts) == list(Verdict)
    assert sum(counts.values()) == len(r.cases)
    assert all(counts[v] >= 1 for v in Verdict)
    assert counts[Verdict.FAIL] == 3 and counts[Verdict.PASS] == 5


@pytest.mark.parametrize(
    ("verdict", "level", "plain", "strict"),
    [
        (Verdict.PASS, Level.MUST, 0, 0),
        (Verdict.FAIL, Level.MUST, 1, 1),
        (Verdict.HANG, Level.MUST, 1, 1),
        (Verdict.CRASH, Level.MUST, 1, 1),
        (Verdict.ERROR, Level.MUST, 1, 1),
        (Verdict.NON_STRICT, Level.SHOULD, 0, 1),
        (Verdict.HANG, Level.SHOULD, 0, 1),
        (Verdict.FAIL, Level.MAY, 0, 1),
        (Verdict.UNSUPPORTED, Level.MUST, 0, 0),
        (Verdict.SKIP, Level.MUST, 0, 0),
        (Verdict.XFAIL, Level.MUST, 0, 0),
        (Verdict.XPASS, Level.MUST, 0, 0),
    ],
)
def test_gate(verdict: Verdict, level: Level, plain: int, strict: int) -> None:
    r = report(case("VU-OK-1", Verdict.PASS), case("VU-X-1", verdict, level))
    assert r.gate(strict=False) == plain
    assert r.gate(strict=True) == strict
    # Without an argument the run's own strictness decides.
    assert dataclasses.replace(r, strict=True).gate() == strict
    assert r.gate() == plain


def test_gate_failures_lists_the_blocking_cases() -> None:
    r = sample_report()
    assert sorted(c.id for c in r.gate_failures()) == [
        "VU-ACK-1", "VU-CFG-1", "VU-GVB-1", "VU-MEM-2", "VU-RING-2",
    ]  # fmt: skip
    assert "VU-FD-1" in {c.id for c in r.gate_failures(strict=True)}
    assert report().gate() == 0  # no cases: nothing failed


def _write(tmp_path: pathlib.Path, data: object, name: str = "report.json") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_load_names_file_and_missing_key(tmp_path: pathlib.Path) -> None:
    data = sample_report().to_dict()
    del data["cases"][3]["verdict"]
    path = _write(tmp_path, data)
    with pytest.raises(ReportFormatError) as e:
        Report.load(path)
    assert str(path) in str(e.value)
    assert "report.cases[3]: missing required key 'verdict'" in str(e.value)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("backend"), "report: missing required key 'backend'"),
        (lambda d: d.pop("cases"), "report: missing required key 'cases'"),
        (lambda d: d["backend"].pop("name"), "report.backend: missing required key 'name'"),
        (lambda d: d.update(schema_version="3.0"), "'3.0' is not supported"),
        (lambda d: d["cases"][0].update(verdict="passed"), "'passed' is not a Verdict"),
        (lambda d: d["cases"][0].update(level="must"), "'must' is not a Level"),
        (
            lambda d: d["backend"].update(features="0x1"),
            "report.backend.features: expected an integer",
        ),
        (
            lambda d: d["backend"].update(features=True),
            "report.backend.features: expected an integer",
        ),
        (lambda d: d.update(strict="yes"), "report.strict: expected true or false"),
        (lambda d: d["cases"][0].update(trace=["x"]), "report.cases[0].trace: expected an array"),
        (
            lambda d: d["measurements"][1].pop("value"),
            "report.measurements[1]: missing required key 'value'",
        ),
        (lambda d: d.update(cases={}), "report.cases: expected an array"),
    ],
)
def test_load_rejects_malformed(tmp_path: pathlib.Path, mutate: object, message: str) -> None:
    data = sample_report().to_dict()
    mutate(data)  # type: ignore[operator]
    with pytest.raises(ReportFormatError, match=None) as e:
        Report.load(_write(tmp_path, data))
    assert message in str(e.value)


def test_load_rejects_non_json(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("{not json")
    with pytest.raises(ReportFormatError, match=r"report\.json: not JSON"):
        Report.load(path)


def test_minor_versions_load_and_derived_keys_are_ignored(tmp_path: pathlib.Path) -> None:
    data = sample_report().to_dict()
    data["schema_version"] = "2.7"
    data["counts"] = {"nonsense": 1}
    loaded = Report.load(_write(tmp_path, data))
    assert loaded.schema_version == "2.7"
    assert loaded.counts()[Verdict.FAIL] == 3


# --- known deviations -----------------------------------------------------------------

TOML = """
# deviations of the back-end under test
[[deviation]]
id = "VU-GVB-1"
reason = "returns 0 after reset, issue #12"

[[deviation]]
id = "VU-HDR-*"
reason = "header flags bug"

[[deviation]]
id = "VU-MEM-2"
reason = "suite errors are not deviations"

[[deviation]]
id = "VU-NOPE-9"
reason = "stale entry"
"""


def test_deviations_from_toml_and_json(tmp_path: pathlib.Path) -> None:
    toml_path = tmp_path / "deviations.toml"
    toml_path.write_text(TOML)
    from_toml = KnownDeviations.load(toml_path)
    assert from_toml.deviations["VU-GVB-1"] == "returns 0 after reset, issue #12"
    json_path = _write(
        tmp_path, {"deviation": [{"id": k, "reason": v} for k, v in from_toml.deviations.items()]},
        "deviations.json",
    )  # fmt: skip
    assert KnownDeviations.load(json_path).deviations == from_toml.deviations
    bare = _write(tmp_path, [{"id": "VU-A-1", "reason": "r"}], "bare.json")
    assert KnownDeviations.load(bare).deviations == {"VU-A-1": "r"}


def test_deviations_apply(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "d.toml"
    path.write_text(TOML)
    devs = KnownDeviations.load(path)
    before = sample_report()
    assert before.gate() == 1
    after = devs.apply(before)
    by_id = {c.id: c for c in after.cases}
    gvb = by_id["VU-GVB-1"]
    assert gvb.verdict is Verdict.XFAIL
    assert gvb.reason == "GET_VRING_BASE.num was 0, expected last_avail_idx 7"  # kept
    assert gvb.deviation == "returns 0 after reset, issue #12"
    assert by_id["VU-HDR-1"].verdict is Verdict.XPASS  # glob, and it passed
    assert by_id["VU-HDR-1"].deviation == "header flags bug"
    assert by_id["VU-MEM-2"].verdict is Verdict.ERROR  # the suite's failure stays
    assert by_id["VU-INF-5"].verdict is Verdict.UNSUPPORTED
    assert before.cases[2].verdict is Verdict.FAIL  # the input is not modified
    assert devs.unused(before) == ["VU-NOPE-9"]
    assert {c.id for c in after.gate_failures()} == {
        "VU-ACK-1",
        "VU-CFG-1",
        "VU-MEM-2",
        "VU-RING-2",
    }


def test_deviations_turn_the_gate_green() -> None:
    r = report(
        case("VU-A-1", Verdict.FAIL), case("VU-B-1", Verdict.CRASH), case("VU-C-1", Verdict.PASS)
    )
    assert r.gate() == 1
    devs = KnownDeviations({"VU-A-1": "a", "VU-B-1": "b", "VU-C-1": "c"})
    applied = devs.apply(r)
    assert applied.gate() == 0
    assert [c.verdict for c in applied.cases] == [Verdict.XFAIL, Verdict.XFAIL, Verdict.XPASS]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[deviation]]\nid = 'VU-A-1'\n", "deviation[0]: missing required key 'reason'"),
        ("[[deviation]]\nid = 'VU-A-1'\nreason = ''\n", "id and reason must be non-empty"),
        (
            "[[deviation]]\nid='VU-A-1'\nreason='x'\n[[deviation]]\nid='VU-A-1'\nreason='y'\n",
            "deviation[1]: id 'VU-A-1' listed twice",
        ),
        ("deviations = []\n", "unknown top-level key(s) ['deviations']"),
        ("[[deviation]\n", "cannot parse"),
    ],
)
def test_deviation_errors_name_file_and_entry(
    tmp_path: pathlib.Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ReportFormatError) as e:
        KnownDeviations.load(path)
    assert str(path) in str(e.value)
    assert message in str(e.value)
