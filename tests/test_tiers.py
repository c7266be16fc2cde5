"""Tiers (issue 9 item 2): what gates, per tier, and ``--vhost-tier`` selecting cases.

Gate rules (docs/report-schema.md "Tiers and the gate"): conformance MUST fail/hang/crash/
error/disallowed disconnect; robustness crash/hang at any level; a crash in any tier at any
level; interop otherwise never without --strict; a MUST-level finding (``finding_level``) in any tier; --strict adds every bad
verdict."""

from __future__ import annotations

import json
import pathlib

import pytest
from test_suites_fakebackend import fake_command
from vhost_conformance.reports.model import CaseResult, Level, Report, Tier, Verdict
from vhost_conformance.reports.sample import sample_report
from vhost_conformance.suites.model import Case
from vhost_conformance.suites.plugin import parse_tiers

pytest_plugins = ["pytester"]


def _result(tier: Tier, level: Level, verdict: Verdict, **extra: object) -> CaseResult:
    return CaseResult(
        id="VU-VENDOR-1",
        title="t",
        family="handshake",
        level=level,
        clause="c",
        requirement="r",
        verdict=verdict,
        tier=tier,
        **extra,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("tier", "level", "verdict", "blocking"),
    [
        (Tier.CONFORMANCE, Level.MUST, Verdict.FAIL, True),
        (Tier.CONFORMANCE, Level.MUST, Verdict.HANG, True),
        (Tier.CONFORMANCE, Level.SHOULD, Verdict.NON_STRICT, False),
        (Tier.CONFORMANCE, Level.MAY, Verdict.FAIL, False),
        (Tier.ROBUSTNESS, Level.MUST, Verdict.FAIL, False),
        (Tier.ROBUSTNESS, Level.MUST, Verdict.DISCONNECT, False),
        (Tier.ROBUSTNESS, Level.MAY, Verdict.CRASH, True),
        (Tier.ROBUSTNESS, Level.INFO, Verdict.HANG, True),
        (Tier.ROBUSTNESS, Level.MUST, Verdict.PASS, False),
        (Tier.INTEROP, Level.MUST, Verdict.FAIL, False),
        (Tier.INTEROP, Level.MUST, Verdict.CRASH, True),
        (Tier.INTEROP, Level.INFO, Verdict.CRASH, True),
        (Tier.CONFORMANCE, Level.SHOULD, Verdict.CRASH, True),
        (Tier.CONFORMANCE, Level.SHOULD, Verdict.HANG, False),
    ],
)
def test_gate_per_tier(tier: Tier, level: Level, verdict: Verdict, blocking: bool) -> None:
    result = _result(tier, level, verdict)
    assert result.blocking is blocking
    # --strict adds every bad verdict, interop included
    report = replace_cases(sample_report(), [result])
    assert report.gate(strict=False) == int(blocking)
    assert report.gate(strict=True) == int(result.bad)


def test_a_must_finding_gates_in_every_tier() -> None:
    for tier in Tier:
        result = _result(tier, Level.MAY, Verdict.FAIL, finding_level=Level.MUST)
        assert result.blocking, tier


def test_tier_quote_and_source_round_trip() -> None:
    result = _result(
        Tier.INTEROP, Level.MUST, Verdict.FAIL, quote="q", source="hw/virtio/vhost-user.c"
    )
    back = CaseResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back == result
    old = result.to_dict()
    for key in ("tier", "quote", "source"):
        del old[key]
    assert CaseResult.from_dict(old).tier is Tier.CONFORMANCE  # a 2.0 report


def test_default_tier_follows_the_family() -> None:
    def make(family: str) -> Case:
        return Case("VU-VENDOR-1", "t", family, Level.MUST, "c", "r")

    assert make("malformed").tier is Tier.ROBUSTNESS
    assert make("hostile-guest").tier is Tier.ROBUSTNESS
    assert make("fuzz").tier is Tier.ROBUSTNESS
    assert make("rings").tier is Tier.CONFORMANCE
    assert Case("VU-VENDOR-1", "t", "rings", Level.MUST, "c", "r", tier=Tier.INTEROP).tier is (
        Tier.INTEROP
    )


def test_parse_tiers() -> None:
    assert parse_tiers(["conformance,interop", "robustness"]) == frozenset(Tier)
    assert parse_tiers([]) == frozenset()
    with pytest.raises(pytest.UsageError, match="unknown tier 'conformence'"):
        parse_tiers(["conformence"])


def replace_cases(report: Report, cases: list[CaseResult]) -> Report:
    """*report* with *cases* as its only cases."""
    from dataclasses import replace

    return replace(report, cases=cases)


TIERED_CASES = """
from vhost_conformance.reports.model import Tier
from vhost_conformance.suites.model import MUST, CaseFailed, case

META = dict(clause="vhost-user.rst: Communication", requirement="r")


@case("VU-VENDOR-40", title="conformance", family="handshake", level=MUST,
      quote="Bit 2 is the reply flag", **META)
def test_conformance(vhost_target):
    pass


@case("VU-VENDOR-41", title="robustness", family="malformed", level=MUST, **META)
def test_robustness(vhost_target):
    raise CaseFailed("answered a malformed message wrongly", expected=0, seen=1)


@case("VU-VENDOR-42", title="interop", family="handshake", level=MUST, tier=Tier.INTEROP,
      source="hw/virtio/vhost-user.c vhost_user_read_header", **META)
def test_interop(vhost_target):
    raise CaseFailed("not what QEMU expects", expected=0, seen=1)
"""


def _run_tiered(pytester: pytest.Pytester, *args: str) -> tuple[int, dict[str, dict[str, object]]]:
    pytester.makepyfile(test_tiered=TIERED_CASES)
    report = pytester.path / "report"
    pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        f"--vhost-backend-cmd={fake_command('ok')}",
        f"--vhost-report={report}",
        *args,
        timeout=180,
    )
    data = json.loads((pathlib.Path(report) / "report.json").read_text())
    return data["gate"], {c["id"]: c for c in data["cases"]}


def test_robustness_and_interop_failures_do_not_gate(pytester: pytest.Pytester) -> None:
    gate, cases = _run_tiered(pytester)
    assert gate == 0
    assert {k: (c["tier"], c["verdict"]) for k, c in cases.items()} == {
        "VU-VENDOR-40": ("conformance", "pass"),
        "VU-VENDOR-41": ("robustness", "fail"),
        "VU-VENDOR-42": ("interop", "fail"),
    }
    assert cases["VU-VENDOR-40"]["quote"] == "Bit 2 is the reply flag"
    assert cases["VU-VENDOR-42"]["source"] == "hw/virtio/vhost-user.c vhost_user_read_header"


def test_tier_option_selects_and_strict_gates_interop(pytester: pytest.Pytester) -> None:
    gate, cases = _run_tiered(pytester, "--vhost-tier=interop,conformance", "--vhost-strict")
    assert sorted(cases) == ["VU-VENDOR-40", "VU-VENDOR-42"]
    assert gate == 1
