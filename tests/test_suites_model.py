"""The case model: metadata, the @case decorator, outcomes and the verdict mapping."""

from __future__ import annotations

import pytest
from vhost_conformance.frontend.channel import (
    BackendClosed,
    BackendHang,
    BackendNack,
    BackendViolation,
)
from vhost_conformance.frontend.protocol import BlkFeature, ProtocolFeature, VirtioFeature
from vhost_conformance.reports.model import Level, Verdict
from vhost_conformance.suites import catalogue
from vhost_conformance.suites.model import (
    MARKER,
    MUST,
    Case,
    CaseFailed,
    CaseHang,
    CaseNonStrict,
    CatalogueMismatch,
    Unsupported,
    case,
    case_of,
    classify,
    defined_cases,
    require,
    resolve,
    sort_key,
)
from vhost_conformance.suites.target import (
    BackendStartFailed,
    BackendStartHang,
    Capabilities,
    SlowIoUnsupported,
    UsageError,
)


def test_case_validates_its_metadata() -> None:
    good = Case("VU-X-1", "t", "handshake", Level.MUST, "c", "r.")
    assert (good.area, good.number) == ("X", 1)
    with pytest.raises(ValueError, match="not of the form"):
        Case("GVB-3", "t", "handshake", Level.MUST, "c", "r.")
    with pytest.raises(ValueError, match="unknown family"):
        Case("VU-X-1", "t", "nonsense", Level.MUST, "c", "r.")
    with pytest.raises(ValueError, match="empty requirement"):
        Case("VU-X-1", "t", "handshake", Level.MUST, "c", " ")
    with pytest.raises(ValueError, match="unknown needs"):
        Case("VU-X-1", "t", "handshake", Level.MUST, "c", "r.", needs=("a-pony",))
    assert sorted(["VU-GVB-10", "VU-GVB-2"], key=sort_key) == ["VU-GVB-2", "VU-GVB-10"]


_PLANNED = Case(
    "VU-GVB-99",
    "a planned case",
    "stop-drain",
    Level.MUST,
    "vhost-user.rst (QEMU 11.1.3) Ring states",
    "r.",
    requires=(ProtocolFeature.INFLIGHT_SHMFD, ProtocolFeature.GET_VRING_BASE_INFLIGHT),
)


def test_case_decorator_attaches_the_record_and_a_marker() -> None:
    @case(
        "VU-VENDOR-3",
        title="t",
        family="stop-drain",
        level=MUST,
        clause="vhost-user.rst (QEMU 11.1.3) Ring states",
        quote="q",
        requirement="r.",
    )
    def scenario() -> None:
        """Not run."""

    meta = case_of(scenario)
    assert meta is not None and meta.id == "VU-VENDOR-3" and meta.quote == "q"
    assert meta.tier.value == "conformance"
    marks = [m for m in getattr(scenario, "pytestmark", []) if m.name == MARKER]
    assert [m.args for m in marks] == [("VU-VENDOR-3",)]


def test_case_keywords_must_agree_with_the_catalogue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(catalogue.CATALOGUE, "VU-GVB-99", _PLANNED)
    assert resolve("VU-GVB-99", level=MUST) is _PLANNED
    with pytest.raises(
        CatalogueMismatch, match=r"level is .*SHOULD.* here but .*MUST.* in the catalogue"
    ):
        resolve("VU-GVB-99", level=Level.SHOULD)
    with pytest.raises(CatalogueMismatch, match="requires"):
        resolve("VU-GVB-99", requires=[ProtocolFeature.INFLIGHT_SHMFD])
    with pytest.raises(CatalogueMismatch, match="unknown keyword 'colour'"):
        resolve("VU-GVB-99", colour="blue")
    with pytest.raises(CatalogueMismatch, match="not applicable"):
        resolve("VU-SHM-1")
    with pytest.raises(CatalogueMismatch, match="one source of truth"):
        resolve(
            "VU-GVB-99",
            title="t",
            family="stop-drain",
            level=MUST,
            clause="c",
            requirement="r.",
        )
    with pytest.raises(CatalogueMismatch, match="must give title"):
        resolve("VU-GVB-98")

def test_vendor_cases_give_their_own_metadata() -> None:
    with pytest.raises(
        CatalogueMismatch, match="must give title, family, level, clause, requirement"
    ):
        resolve("VU-ACME-1")
    meta = resolve(
        "VU-ACME-1",
        title="t",
        family="blk-io",
        level="SHOULD",
        clause="c",
        requirement="r.",
        requires=[BlkFeature.DISCARD],
    )
    assert meta.level is Level.SHOULD and meta.requires == (BlkFeature.DISCARD,)


_RECORD = dict(title="t", family="handshake", level=MUST, clause="c", quote="q", requirement="r.")


def test_defined_cases_rejects_two_functions_for_one_id() -> None:
    @case("VU-HDR-1", **_RECORD)
    def one() -> None:
        """Not run."""

    @case("VU-HDR-1", **_RECORD)
    def two() -> None:
        """Not run."""

    with pytest.raises(CatalogueMismatch, match="defined twice"):
        defined_cases([one, two])
    assert set(defined_cases([one, len, one])) == {"VU-HDR-1"}, "a re-export is not a second case"


def test_outcomes_carry_verdict_and_reason() -> None:
    failed = CaseFailed("reply flags", expected="0x5", seen="0xd")
    assert (failed.verdict, failed.reason) == (Verdict.FAIL, "reply flags: expected 0x5, seen 0xd")
    assert CaseNonStrict("x").verdict is Verdict.NON_STRICT
    missing = Unsupported([ProtocolFeature.INFLIGHT_SHMFD, VirtioFeature.RING_PACKED])
    assert missing.verdict is Verdict.UNSUPPORTED
    assert missing.reason == (
        "the back-end does not offer protocol feature INFLIGHT_SHMFD (bit 12), "
        "virtio feature RING_PACKED (bit 34)"
    )
    assert (
        Unsupported("slow I/O", "no knob").reason == "the back-end does not offer slow I/O: no knob"
    )


def test_require_names_the_missing_bits() -> None:
    caps = Capabilities(
        features=(1 << VirtioFeature.PROTOCOL_FEATURES) | (1 << BlkFeature.FLUSH),
        protocol_features=1 << ProtocolFeature.INFLIGHT_SHMFD,
    )
    require(caps, ProtocolFeature.INFLIGHT_SHMFD, BlkFeature.FLUSH)
    with pytest.raises(Unsupported, match=r"GET_VRING_BASE_INFLIGHT \(bit 20\)$"):
        require(caps, ProtocolFeature.INFLIGHT_SHMFD, ProtocolFeature.GET_VRING_BASE_INFLIGHT)
    # protocol bits count only when bit 30 is offered
    no_bit_30 = Capabilities(features=0, protocol_features=1 << ProtocolFeature.INFLIGHT_SHMFD)
    assert no_bit_30.missing([ProtocolFeature.INFLIGHT_SHMFD]) == [ProtocolFeature.INFLIGHT_SHMFD]


@pytest.mark.parametrize(
    ("exc", "verdict", "words"),
    [
        (CaseFailed("x", expected=1, seen=2), Verdict.FAIL, "expected 1, seen 2"),
        (CaseNonStrict("should"), Verdict.NON_STRICT, "should"),
        (CaseHang("watchdog"), Verdict.HANG, "watchdog"),
        (Unsupported(ProtocolFeature.CONFIG), Verdict.UNSUPPORTED, "CONFIG (bit 9)"),
        (SlowIoUnsupported("no knob"), Verdict.UNSUPPORTED, "no knob"),
        (
            BackendHang("no reply", request_name="GET_FEATURES", timeout=1.0),
            Verdict.HANG,
            "GET_FEATURES",
        ),
        (BackendClosed("EOF", request_name="GET_FEATURES"), Verdict.DISCONNECT, "closed the connection"),
        (
            BackendViolation(
                "reply flags", request_name="GET_FEATURES", expected="0x5", seen="0xd"
            ),
            Verdict.FAIL,
            "expected 0x5, seen 0xd",
        ),
        (BackendNack(request_name="SET_OWNER", status=1), Verdict.FAIL, "status 0x1"),
        (BackendStartFailed("exited with status 2", 2, "log"), Verdict.CRASH, "status 2"),
        (BackendStartHang("did not listen", "log"), Verdict.HANG, "did not listen"),
        (UsageError("bad template"), Verdict.ERROR, "usage error: bad template"),
        (ZeroDivisionError("oops"), Verdict.ERROR, "the suite failed: ZeroDivisionError: oops"),
    ],
)
def test_classify_maps_exceptions_to_verdicts(
    exc: BaseException, verdict: Verdict, words: str
) -> None:
    result = classify(exc, alive=True)
    assert result.verdict is verdict
    assert words in result.reason


def test_a_dead_backend_turns_failures_into_crash() -> None:
    died = classify(ZeroDivisionError("x"), alive=False, exit_status=-11, log_tail="segfault")
    assert (died.verdict, died.exit_status, died.log_tail) == (Verdict.CRASH, -11, "segfault")
    assert "status -11" in died.reason
    failed = classify(CaseFailed("no reply"), alive=False, exit_status=1, log_tail="")
    assert failed.verdict is Verdict.CRASH
    # an unsupported case stays unsupported whatever the process did
    assert classify(Unsupported("x"), alive=False, exit_status=0).verdict is Verdict.UNSUPPORTED


def test_skip_from_case_code_is_skip() -> None:
    try:
        pytest.skip("needs /dev/kvm")
    except BaseException as exc:  # pytest.skip.Exception derives from BaseException
        result = classify(exc, alive=True)
    assert (result.verdict, result.reason) == (Verdict.SKIP, "needs /dev/kvm")
