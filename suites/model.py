"""The case model: what a conformance case is, how it is attached to a test, how it ends.

A case is a pytest test function carrying :func:`case`::

    @case("VU-HDR-2")
    def test_reply_flags_are_exactly_0x5(vhost_channel: Channel) -> None:
        ...

Its record (title, family, level, tier, clause, quote or source, requirement, required
features, ambiguity note) is declared once. New cases declare it AT the case::

    @case(
        "VU-GVB-12",
        title="...", family="stop-drain", level=MUST, tier=Tier.CONFORMANCE,
        clause=f"{RST} Ring states",
        quote="While a ring is stopped, the back-end must not process the ring at all, ...",
        requirement="...",
        requires=[P.REPLY_ACK],
    )

(interop cases give ``tier=Tier.INTEROP`` and ``source=`` instead of a quote). Older cases
still have their record in :mod:`vhost_conformance.suites.catalogue` and a bare
``@case("VU-...")`` (keywords given then are checked against the entry); an id declared at
the case and in the catalogue too is an error.

A case ends with a verdict (reports.model.Verdict), always with a reason:

- returning normally: ``pass``;
- raising :class:`CaseFailed` (a MUST violated): ``fail``, with expected and seen;
- raising :class:`CaseNonStrict` (a SHOULD violated): ``non-strict``;
- raising :class:`Unsupported` (the back-end does not offer what the case needs): ``unsupported``;
- the front-end's ``BackendHang``: ``hang``; the back-end process dying: ``crash`` (with its
  exit status or signal and the tail of its log); ``BackendClosed`` with the process alive:
  ``disconnect`` (the plugin judges per case whether the close is allowed);
  ``BackendViolation``: ``fail`` at the case's level; anything else: ``error`` (the suite
  itself failed).

An outcome may name the observed behaviour behind it (``behaviour="gvb-stopped-ring-0"``):
results of one run sharing a behaviour are counted once, the first case owning the failure
and the others carrying ``see``; ``finding_level`` gives the level of what was found when it
is stronger than the case's (a MUST violation a MAY case saw fails the gate as a MUST).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from vhost_conformance.frontend.errors import (
    BackendClosed,
    BackendHang,
    BackendNack,
    BackendViolation,
    MisuseError,
)
from vhost_conformance.frontend.protocol import BlkFeature, ProtocolFeature, VirtioFeature
from vhost_conformance.reports.model import Level, Tier, Verdict
from vhost_conformance.suites.target import (
    BackendStartFailed,
    BackendStartHang,
    Capabilities,
    Feature,
    SlowIoUnsupported,
    UsageError,
    feature_label,
)

#: Case ids: ``VU-<AREA>-<n>``, area in capitals (``VU-GVB-3``, ``VU-BACKEND-1``).
CASE_ID = re.compile(r"^VU-[A-Z]+-[0-9]+$")

#: The pytest marker name carrying the case id.
MARKER = "vhost_case"

#: The families, in the order the suite and the reports present them.
FAMILIES: tuple[str, ...] = (
    "handshake",
    "config",
    "memory",
    "rings",
    "blk-io",
    "stop-drain",
    "inflight",
    "migration",
    "double-submission",
    "suspended",
    "reconnect",
    "hostile-guest",
    "malformed",
    "fuzz",
    "device-state",
    "program",
    "qemu",  # the qemu tier: real QEMU 11.1.3 as the front-end (run only when asked)
)

MUST = Level.MUST
SHOULD = Level.SHOULD
MAY = Level.MAY
INFO = Level.INFO


class CatalogueMismatch(Exception):
    """A case module says something about a case that the catalogue does not (or vice versa)."""


@dataclass(frozen=True)
class Case:
    """One conformance case: id, title, family, level, clause, requirement (our words, one
    sentence), the features it needs, and an ambiguity note when the spec is ambiguous and we
    follow QEMU 11.1.3's behaviour.

    ``tier`` says what the verdict rests on (reports.model.Tier; left out: robustness for the
    malformed, hostile-guest and fuzz families, conformance otherwise). A conformance case
    carries ``quote``: the normative sentence(s) it enforces, verbatim from vhost-user.rst as
    QEMU 11.1.3 ships it (tests/test_spec_quotes.py checks), or a VIRTIO 1.3 sentence with
    its section in ``clause``; its ``level`` is the quote's own. An interop case carries
    ``source``: the QEMU 11.1.3 source file/function or QEMU-TRACES.md section it follows.
    ``leak``: the case measures a leak (fds, mappings): a robustness case's ``fail`` gates."""

    id: str
    title: str
    family: str
    level: Level
    clause: str
    requirement: str
    requires: tuple[Feature, ...] = ()
    ambiguity: str | None = None
    needs: tuple[str, ...] = field(default=())
    tier: Tier = None  # type: ignore[assignment]  # None: derived from the family
    quote: str | None = None
    source: str | None = None
    leak: bool = False

    def __post_init__(self) -> None:
        if self.tier is None:
            object.__setattr__(self, "tier", default_tier(self.family))
        object.__setattr__(self, "tier", Tier(self.tier))
        if not CASE_ID.match(self.id):
            raise ValueError(f"case id {self.id!r} is not of the form VU-<AREA>-<n>")
        if self.family not in FAMILIES:
            raise ValueError(f"case {self.id}: unknown family {self.family!r}; known: {FAMILIES}")
        for text, what in (
            (self.title, "title"),
            (self.clause, "clause"),
            (self.requirement, "requirement"),
        ):
            if not text.strip():
                raise ValueError(f"case {self.id}: empty {what}")
        object.__setattr__(self, "level", Level(self.level))
        unknown_needs = sorted(set(self.needs) - NEEDS)
        if unknown_needs:
            raise ValueError(
                f"case {self.id}: unknown needs {unknown_needs}; known: {sorted(NEEDS)}"
            )

    @property
    def area(self) -> str:
        """The id's area (``GVB`` for ``VU-GVB-3``)."""
        return self.id.split("-")[1]

    @property
    def number(self) -> int:
        """The id's number (3 for ``VU-GVB-3``)."""
        return int(self.id.split("-")[2])

    def missing(self, capabilities: Capabilities) -> list[Feature]:
        """The required features the back-end does not offer."""
        return capabilities.missing(self.requires)


#: What a case may need from the back-end under test besides feature bits.
NEEDS = frozenset(
    {
        "slow-io",  # the profile can make the back-end's I/O slow (drain cases)
        "shared-disk",  # two instances can share one disk (migration with data)
        "command",  # we run the back-end ourselves (restart, kill, signals)
    }
)


#: Families whose cases are robustness cases unless they say otherwise.
ROBUSTNESS_FAMILIES = frozenset({"malformed", "hostile-guest", "fuzz"})


def default_tier(family: str) -> Tier:
    """The tier of a case that does not name one: robustness for the hostile-input families."""
    return Tier.ROBUSTNESS if family in ROBUSTNESS_FAMILIES else Tier.CONFORMANCE


def sort_key(case_id: str) -> tuple[str, int]:
    """Order ids by area, then number (``VU-GVB-2`` before ``VU-GVB-10``)."""
    _, area, number = case_id.split("-")
    return (area, int(number))


# --------------------------------------------------------------------------- outcomes


class CaseOutcome(Exception):
    """Base of the outcomes case code raises; carries the verdict and the reason."""

    verdict: Verdict = Verdict.ERROR

    def __init__(
        self,
        reason: str,
        *,
        behaviour: str | None = None,
        finding_level: Level | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.behaviour = behaviour
        self.finding_level = finding_level


class CaseFailed(CaseOutcome):
    """The back-end violated the case's requirement (a MUST, or the case's level)."""

    verdict = Verdict.FAIL

    def __init__(
        self,
        reason: str,
        *,
        expected: object = None,
        seen: object = None,
        behaviour: str | None = None,
        finding_level: Level | None = None,
    ) -> None:
        details = reason
        if expected is not None or seen is not None:
            details = f"{reason}: expected {expected!s}, seen {seen!s}"
        super().__init__(details, behaviour=behaviour, finding_level=finding_level)
        self.expected = expected
        self.seen = seen


class CaseNonStrict(CaseOutcome):
    """The back-end violated a SHOULD: reported, fails the run only with --vhost-strict."""

    verdict = Verdict.NON_STRICT


class CaseHang(CaseOutcome):
    """The case's own deadline passed (the plugin's watchdog): the back-end stopped answering."""

    verdict = Verdict.HANG


class CaseFlaky(CaseOutcome):
    """A fuzz finding that did not reproduce on a fresh back-end instance: ``flaky``, with
    the sequence and seed in the reason (fails the gate only with --strict)."""

    verdict = Verdict.FLAKY


def confirm_finding(
    exc: CaseOutcome, replay: Callable[[], object], *, sequence: str, seed: int | None
) -> CaseOutcome:
    """The outcome to report for the fuzz finding *exc*, after *replay* (the same sequence on
    a fresh back-end instance) ran: *exc* noted "reproduced" when the replay fails too, a
    :class:`CaseFlaky` naming the sequence and seed when it passes. A crash stays a crash
    (the process did die), noted as not reproduced."""
    where = f"seed {seed}" if seed is not None else "seed: none (an explicit example)"
    try:
        replay()
    except CaseOutcome as again:
        note = f"\nreproduced on a fresh back-end instance ({again.verdict.value}; {where})"
        return type(exc)(exc.reason + note, behaviour=exc.behaviour, finding_level=exc.finding_level)
    except Exception as again:
        note = (
            f"\nreproduced on a fresh back-end instance ({type(again).__name__}: {again}; "
            f"{where})"
        )
        return type(exc)(exc.reason + note, behaviour=exc.behaviour, finding_level=exc.finding_level)
    if exc.verdict is Verdict.CRASH:
        return type(exc)(
            exc.reason + f"\nthe same sequence on a fresh back-end instance did not crash ({where})"
        )
    return CaseFlaky(
        f"did not reproduce on a fresh back-end instance: first seen as {exc.verdict.value}: "
        f"{exc.reason}\nsequence: {sequence}\n{where} (re-run with VHOST_CONFORMANCE_SEED={seed})"
        if seed is not None
        else f"did not reproduce on a fresh back-end instance: first seen as "
        f"{exc.verdict.value}: {exc.reason}\nsequence: {sequence}\n{where}"
    )


class Unsupported(CaseOutcome):
    """The back-end does not offer what the case needs (a feature bit, slow I/O, ...)."""

    verdict = Verdict.UNSUPPORTED

    def __init__(
        self, missing: str | Feature | Sequence[Feature], reason: str | None = None
    ) -> None:
        if isinstance(missing, str):
            names = [missing]
        elif isinstance(missing, ProtocolFeature | VirtioFeature | BlkFeature):
            names = [feature_label(missing)]
        else:
            names = [feature_label(f) for f in missing]
        self.missing = names
        text = "the back-end does not offer " + ", ".join(names)
        super().__init__(f"{text}: {reason}" if reason else text)


def require(capabilities: Capabilities, *features: Feature) -> None:
    """Raise Unsupported naming every one of ``features`` the back-end does not offer."""
    missing = capabilities.missing(features)
    if missing:
        raise Unsupported(missing)


@dataclass(frozen=True)
class Violation:
    """The one record of a back-end's fault a case found: the case, the clause and level it
    was judged under, what was expected and what was seen, and what was wrong. Made from a
    case's :class:`CaseFailed`/:class:`CaseNonStrict` and from the front-end's
    ``BackendViolation``/``BackendNack`` alike (:func:`violation_of`)."""

    case_id: str
    clause: str
    level: Level
    what: str
    expected: str | None = None
    seen: str | None = None


def violation_of(case: Case, exc: BaseException) -> Violation | None:
    """The violation record of ``exc`` raised by ``case``, or None when ``exc`` is not a
    back-end's fault the case judged (a hang, a close, a misuse, the suite's own error)."""
    expected: object = None
    seen: object = None
    level = case.level
    if isinstance(exc, CaseFailed | CaseNonStrict):
        what = exc.reason
        if isinstance(exc, CaseFailed):
            expected, seen = exc.expected, exc.seen
        level = exc.finding_level or level
    elif isinstance(exc, BackendViolation):
        what = str(exc)
        expected, seen = exc.expected, exc.seen
    elif isinstance(exc, BackendNack):
        what, expected, seen = str(exc), "REPLY_ACK status 0", f"status {exc.status:#x}"
    else:
        return None
    return Violation(
        case.id,
        case.clause,
        level,
        what,
        None if expected is None else str(expected),
        None if seen is None else str(seen),
    )


@dataclass(frozen=True)
class Classified:
    """An exception turned into a verdict, a reason, and what the back-end left behind
    (``violation``: the record of the back-end's fault, on a fail or non-strict)."""

    verdict: Verdict
    reason: str
    exit_status: int | None = None
    log_tail: str | None = None
    behaviour: str | None = None
    finding_level: Level | None = None
    allowed: bool = False
    violation: Violation | None = None


def classify(
    exc: BaseException,
    *,
    alive: bool | None = None,
    exit_status: int | None = None,
    log_tail: str | None = None,
) -> Classified:
    """Map what ended a case to its verdict (see the module docstring).

    ``alive``/``exit_status``/``log_tail`` describe the back-end process after the case (None
    when unknown, e.g. an external socket): a dead process turns any failure into ``crash``.
    """
    died = alive is False
    crash_details = ""
    if died:
        crash_details = f" (back-end process exited with status {exit_status})"
    if isinstance(exc, CaseOutcome):
        if died and exc.verdict in (Verdict.FAIL, Verdict.NON_STRICT):
            return Classified(Verdict.CRASH, exc.reason + crash_details, exit_status, log_tail)
        if died and exc.verdict is Verdict.CRASH:
            return Classified(
                Verdict.CRASH, exc.reason, exit_status, log_tail, behaviour=exc.behaviour
            )
        return Classified(
            exc.verdict,
            exc.reason,
            behaviour=exc.behaviour,
            finding_level=exc.finding_level,
        )
    if isinstance(exc, SlowIoUnsupported):
        return Classified(Verdict.UNSUPPORTED, str(exc))
    if isinstance(exc, BackendStartFailed):
        return Classified(Verdict.CRASH, str(exc), exc.exit_status, exc.log_tail)
    if isinstance(exc, BackendStartHang):
        return Classified(Verdict.HANG, str(exc), None, exc.log_tail)
    if isinstance(exc, UsageError):
        return Classified(Verdict.ERROR, f"usage error: {exc}")
    if isinstance(exc, pytest.skip.Exception):
        return Classified(Verdict.SKIP, str(getattr(exc, "msg", exc)))
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, BackendClosed) or died:
        if died:
            return Classified(Verdict.CRASH, text + crash_details, exit_status, log_tail)
        return Classified(
            Verdict.DISCONNECT,
            text + " (the back-end closed the connection; its process is alive)",
            None,
            log_tail,
        )
    if isinstance(exc, BackendHang):
        return Classified(Verdict.HANG, text, None, log_tail)
    if isinstance(exc, BackendViolation | BackendNack):
        return Classified(Verdict.FAIL, text)
    if isinstance(exc, MisuseError):
        return Classified(Verdict.ERROR, f"the suite failed (it misused its library): {text}")
    return Classified(Verdict.ERROR, f"the suite failed: {text}")


# --------------------------------------------------------------------------- the decorator

_F = TypeVar("_F", bound=Callable[..., Any])

#: Attribute set on decorated functions.
CASE_ATTRIBUTE = "__vhost_case__"


#: The keywords that make ``@case`` a full record (the case's one source of truth).
_RECORD_KEYS = ("title", "family", "level", "clause", "requirement")


def _from_keywords(case_id: str, given: dict[str, Any]) -> Case:
    missing = [k for k in _RECORD_KEYS if k not in given]
    if missing:
        raise CatalogueMismatch(
            f"case {case_id} is not in the catalogue, so @case must give "
            + ", ".join(missing)
            + " itself (a vendor's own case)"
        )
    requires = tuple(given.pop("requires", ()))
    needs = tuple(given.pop("needs", ()))
    return Case(case_id, requires=requires, needs=needs, **given)


def resolve(case_id: str, **given: Any) -> Case:
    """The Case for ``case_id``: the catalogue's entry, with ``given`` keywords checked
    against it; or, for an id the catalogue does not know, built from ``given``."""
    from vhost_conformance.suites.catalogue import CATALOGUE, NOT_APPLICABLE

    if case_id in NOT_APPLICABLE:
        raise CatalogueMismatch(
            f"case {case_id} is listed as not applicable to a blk back-end "
            f"({NOT_APPLICABLE[case_id]}): remove it from that list before writing it"
        )
    entry = CATALOGUE.get(case_id)
    if entry is None:
        return _from_keywords(case_id, dict(given))
    if all(k in given for k in _RECORD_KEYS):
        raise CatalogueMismatch(
            f"case {case_id} declares its record at the case and is in the catalogue too: "
            "delete the catalogue entry (one source of truth per case)"
        )
    for key, value in given.items():
        if key not in Case.__dataclass_fields__:
            raise CatalogueMismatch(f"@case({case_id!r}): unknown keyword {key!r}")
        have = getattr(entry, key)
        if key in ("requires", "needs"):
            value = tuple(value)
        if key == "level":
            value = Level(value)
        if key == "tier":
            value = Tier(value)
        if have != value:
            raise CatalogueMismatch(
                f"@case({case_id!r}): {key} is {value!r} here but {have!r} in the catalogue"
            )
    return entry


def case(case_id: str, **given: Any) -> Callable[[_F], _F]:
    """Mark a test function as the conformance case ``case_id`` (see the module docstring)."""
    meta = resolve(case_id, **given)

    def attach(function: _F) -> _F:
        setattr(function, CASE_ATTRIBUTE, meta)
        marked: _F = getattr(pytest.mark, MARKER)(meta.id)(function)
        return marked

    return attach


def case_of(obj: object) -> Case | None:
    """The Case attached to a test function by :func:`case`, if any."""
    meta = getattr(obj, CASE_ATTRIBUTE, None)
    return meta if isinstance(meta, Case) else None


def defined_cases(functions: Iterable[object]) -> dict[str, Case]:
    """The cases attached to ``functions`` by id; two functions claiming one id is an error."""
    found: dict[str, Case] = {}
    owners: dict[str, object] = {}
    for function in functions:
        meta = case_of(function)
        if meta is None:
            continue
        if meta.id in found and owners[meta.id] is function:
            continue  # the same function seen again (imported by another module)
        if meta.id in found:
            raise CatalogueMismatch(
                f"case {meta.id} is defined twice: {owners[meta.id]!r} and {function!r}"
            )
        found[meta.id] = meta
        owners[meta.id] = function
    return found
