"""The error split (issue 13 step 5): misuse of the library derives from one base, a
back-end's fault from another, and a back-end's fault a case judged becomes one violation
record (case id, clause, level, expected, seen)."""

from __future__ import annotations

import pytest
from vhost_conformance.frontend import channel, errors, protocol
from vhost_conformance.frontend.device import SessionError
from vhost_conformance.frontend.inflight import InflightModelError
from vhost_conformance.frontend.memory import MemoryAccessError
from vhost_conformance.frontend.migration import MigrationError
from vhost_conformance.frontend.virtqueue import VirtqueueError
from vhost_conformance.reports.model import Level, Verdict
from vhost_conformance.suites.model import (
    Case,
    CaseFailed,
    CaseNonStrict,
    classify,
    violation_of,
)
from vhost_conformance.suites.target_errors import UsageError

MISUSE = [
    channel.FrontendUsageError,
    protocol.EncodeError,
    SessionError,
    VirtqueueError,
    MemoryAccessError,
    InflightModelError,
    MigrationError,
    UsageError,
]
FAULTS = [
    channel.BackendHang,
    channel.BackendClosed,
    channel.BackendViolation,
    channel.BackendNack,
]

CASE = Case(
    "VU-TEST-1",
    title="t",
    family="handshake",
    level=Level.MUST,
    clause="vhost-user.rst: Header",
    requirement="r",
)


@pytest.mark.parametrize("cls", MISUSE, ids=lambda c: c.__name__)
def test_misuse_has_one_base_and_is_never_a_fault(cls: type[Exception]) -> None:
    assert issubclass(cls, errors.MisuseError)
    assert not issubclass(cls, errors.BackendError)


@pytest.mark.parametrize("cls", FAULTS, ids=lambda c: c.__name__)
def test_faults_have_one_base_and_are_never_misuse(cls: type[Exception]) -> None:
    assert issubclass(cls, errors.BackendError)
    assert not issubclass(cls, errors.MisuseError)


def test_the_channel_names_the_same_classes() -> None:
    assert channel.BackendViolation is errors.BackendViolation
    assert protocol.ProtocolError is errors.ProtocolError


def test_misuse_is_an_error_verdict_never_a_fail() -> None:
    got = classify(VirtqueueError("queue full"))
    assert got.verdict is Verdict.ERROR
    assert "misused its library" in got.reason


def test_a_wire_violation_becomes_the_record() -> None:
    exc = channel.BackendViolation(
        "reply flags", request_name="GET_FEATURES", expected="0x5", seen="0xd"
    )
    assert classify(exc).verdict is Verdict.FAIL
    record = violation_of(CASE, exc)
    assert record is not None
    assert (record.case_id, record.clause, record.level) == (
        "VU-TEST-1", "vhost-user.rst: Header", Level.MUST,
    )
    assert (record.expected, record.seen) == ("0x5", "0xd")


def test_a_case_failure_becomes_the_record_at_its_finding_level() -> None:
    exc = CaseFailed("ring processed", expected=0, seen=3, finding_level=Level.MUST)
    record = violation_of(CASE, exc)
    assert record is not None
    assert (record.expected, record.seen, record.level) == ("0", "3", Level.MUST)
    nonstrict = violation_of(CASE, CaseNonStrict("late"))
    assert nonstrict is not None and nonstrict.expected is None


def test_no_record_for_what_is_not_a_judged_fault() -> None:
    assert violation_of(CASE, channel.BackendHang("no reply", request_name=None, timeout=1)) is None
    assert violation_of(CASE, VirtqueueError("full")) is None
    assert violation_of(CASE, RuntimeError("suite bug")) is None
