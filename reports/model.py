"""The result model: one run of the suite against one back-end, as report.json holds it.

report.json is the truth; junit.xml, summary.md, report.html and the matrix are renderings
of a :class:`Report`. Every class here is a frozen dataclass with ``to_dict()`` (JSON-able,
stable key order: fields in declaration order, free-form dicts sorted by key) and
``from_dict()`` (validating; errors name the key path). The schema is documented, key by
key, in ``docs/report-schema.md``; bump :data:`SCHEMA_VERSION` when it changes.
"""

from __future__ import annotations

import enum
import fnmatch
import json
import math
import os
import pathlib
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

SCHEMA_VERSION = "2.3"
# Readers accept any 2.x (minor versions only add optional keys) and 1.x (a subset of 2.0:
# no disconnect/flaky verdicts, no see/rerun/finding_level/exit_status/allowed keys).
_SCHEMA_MAJOR = "2"
_SCHEMA_MAJORS_READ = frozenset({"1", "2"})


class ReportFormatError(ValueError):
    """report.json or a known-deviations file is malformed: the message names file and key."""


class Level(enum.StrEnum):
    """RFC 2119 level of the requirement a case checks."""

    MUST = "MUST"
    SHOULD = "SHOULD"
    MAY = "MAY"
    INFO = "INFO"


class Tier(enum.StrEnum):
    """What a case's verdict rests on (docs/report-schema.md "Tiers").

    ``conformance``: a quoted MUST/SHOULD/MAY sentence of the spec; ``interop``: what QEMU
    11.1.3 does where the spec is silent (cited from its source or QEMU-TRACES.md);
    ``robustness``: a hostile or broken front-end (malformed messages, hostile guests, fuzz),
    where the spec's only rule is that the back-end may close the connection.
    """

    CONFORMANCE = "conformance"
    INTEROP = "interop"
    ROBUSTNESS = "robustness"


class Verdict(enum.StrEnum):
    """Outcome of one case (DESIGN.md "Cases and verdicts")."""

    PASS = "pass"
    FAIL = "fail"  # a MUST violated
    NON_STRICT = "non-strict"  # a SHOULD violated
    UNSUPPORTED = "unsupported"  # the back-end does not offer what the case needs
    SKIP = "skip"  # the environment lacks something (a peer, a privilege)
    HANG = "hang"  # a deadline passed with no answer
    CRASH = "crash"  # the back-end process died (exit status or signal in exit_status)
    DISCONNECT = "disconnect"  # the back-end closed the connection, its process alive
    FLAKY = "flaky"  # a finding that did not reproduce on a fresh back-end
    ERROR = "error"  # the suite itself failed
    XFAIL = "xfail"  # a known deviation that failed as expected
    XPASS = "xpass"  # a known deviation that now passes


# Verdicts that mean "the back-end did something wrong" (or could not be judged: error).
# ``disconnect`` is bad only where the case does not allow the close (CaseResult.bad).
BAD_VERDICTS: frozenset[Verdict] = frozenset(
    {
        Verdict.FAIL,
        Verdict.NON_STRICT,
        Verdict.HANG,
        Verdict.CRASH,
        Verdict.ERROR,
        Verdict.DISCONNECT,
        Verdict.FLAKY,
    }
)
# A known deviation turns these into xfail; `error` stays: it is the suite's failure, not the
# back-end's deviation showing.
_DEVIATION_FAILURES: frozenset[Verdict] = frozenset(
    {Verdict.FAIL, Verdict.NON_STRICT, Verdict.HANG, Verdict.CRASH, Verdict.DISCONNECT}
)
# These on a MUST case (or a MUST-level finding, finding_level) fail the gate whatever
# --strict says; a disconnect only when the case does not allow it.
_GATE_BLOCKING: frozenset[Verdict] = frozenset(
    {Verdict.FAIL, Verdict.HANG, Verdict.CRASH, Verdict.ERROR, Verdict.DISCONNECT}
)
# These on a robustness case fail the gate at any level: the back-end died or stopped
# answering under hostile input (the spec lets it close the connection, nothing more).
_ROBUSTNESS_BLOCKING: frozenset[Verdict] = frozenset({Verdict.HANG, Verdict.CRASH})


# --- JSON helpers -----------------------------------------------------------------------


def _jsonable(value: object, where: str) -> Any:
    """Convert *value* to plain JSON types (dict keys sorted); raise naming *where* otherwise."""
    if value is None or isinstance(value, bool | str):
        return str(value) if isinstance(value, enum.Enum) else value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            # JSON has no NaN/Infinity; a reader in another language would choke.
            return None
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(value[k], f"{where}.{k}") for k in sorted(value, key=str)}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(items)]
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-able ({value!r:.80})")


class _Reader:
    """Typed access to one JSON object, with errors naming the key path."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise ReportFormatError(f"{where}: expected an object, got {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.where = where

    def _get(self, key: str, required: bool) -> Any:
        if key not in self.data:
            if required:
                raise ReportFormatError(f"{self.where}: missing required key {key!r}")
            return None
        return self.data[key]

    def _typed(self, key: str, types: tuple[type, ...], name: str, required: bool) -> Any:
        value = self._get(key, required)
        if value is None and not required:
            return None
        # bool is an int in Python, but a JSON `true` is not a count.
        if isinstance(value, bool) and bool not in types:
            value_ok = False
        else:
            value_ok = isinstance(value, types)
        if not value_ok:
            raise ReportFormatError(
                f"{self.where}.{key}: expected {name}, got {type(value).__name__} {value!r:.60}"
            )
        return value

    def get_str(self, key: str, default: str | None = None) -> str:
        v = self._typed(key, (str,), "a string", default is None)
        return default if v is None else v  # type: ignore[return-value]

    def get_opt_str(self, key: str) -> str | None:
        v: str | None = self._typed(key, (str,), "a string or null", False)
        return v

    def get_int(self, key: str, default: int | None = None) -> int:
        v = self._typed(key, (int,), "an integer", default is None)
        return default if v is None else v  # type: ignore[return-value]

    def get_opt_int(self, key: str) -> int | None:
        v: int | None = self._typed(key, (int,), "an integer or null", False)
        return v

    def get_float(self, key: str, default: float | None = None) -> float:
        v = self._typed(key, (int, float), "a number", default is None)
        return float(default if v is None else v)  # type: ignore[arg-type]

    def get_opt_float(self, key: str) -> float | None:
        v = self._typed(key, (int, float), "a number or null", False)
        return None if v is None else float(v)

    def get_bool(self, key: str, default: bool | None = None) -> bool:
        v = self._typed(key, (bool,), "true or false", default is None)
        return bool(default if v is None else v)

    def get_dict(self, key: str) -> dict[str, Any]:
        v = self._typed(key, (dict,), "an object", False)
        return {} if v is None else dict(v)

    def get_list(self, key: str, required: bool = False) -> list[Any]:
        v = self._typed(key, (list,), "an array", required)
        return [] if v is None else list(v)

    def get_str_list(self, key: str) -> list[str]:
        items = self.get_list(key)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise ReportFormatError(f"{self.where}.{key}[{i}]: expected a string")
        return items

    def get_enum(self, key: str, cls: type[_E]) -> _E:
        raw = self.get_str(key)
        try:
            return cls(raw)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ReportFormatError(
                f"{self.where}.{key}: {raw!r} is not a {cls.__name__} (one of {allowed})"
            ) from None


_E = TypeVar("_E", bound=enum.StrEnum)


#: The values of a case's ``qemu_confirmed`` (docs/report-schema.md).
QEMU_CONFIRMED = ("yes", "no", "not reachable", "not run")


def _qemu_confirmed(r: _Reader, where: str) -> str | None:
    value = r.get_opt_str("qemu_confirmed")
    if value is not None and value not in QEMU_CONFIRMED:
        raise ReportFormatError(
            f"{where}.qemu_confirmed: {value!r} is not one of {', '.join(QEMU_CONFIRMED)}"
        )
    return value


# --- the model -------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseResult:
    """The outcome of one conformance case.

    ``trace`` is the wire trace (a list of JSON objects; see docs/report-schema.md for the
    keys the renderers know), ``deviation`` the known-deviation reason when one applied,
    ``log_tail`` the last lines of the back-end's log (crash, hang).

    ``exit_status`` the back-end's exit status (negative: the signal) when it died (crash);
    ``allowed`` marks a ``disconnect`` the case allows (a clean close after malformed input,
    the process alive and serving the next connection): pass-like, never bad.
    ``see`` names the case that owns this failure when both come from one observed
    behaviour (this one follows from it and does not count again); ``finding_level`` is the
    level of what was found when it is stronger than the case's own (a MUST violation seen
    by a MAY or INFO case: the gate judges it as a MUST); ``rerun`` the one command that
    re-runs this case alone; ``behaviour`` the key of the observed behaviour behind a
    failure (results sharing one are counted once, see ``see``). ``tier`` says what the
    verdict rests on (:class:`Tier`), ``quote`` the spec sentence(s) a conformance case
    enforces, ``source`` the QEMU source or trace an interop case follows, ``leak`` that the
    case measures a leak (a robustness ``fail`` then gates). ``qemu_case`` names the VU-QEMU
    case whose scenario reaches this failing emulated case's, ``qemu_confirmed`` whether real
    QEMU 11.1.3 confirmed it (:data:`QEMU_CONFIRMED`; suites/qemu_confirm.py). ``expected``
    and ``seen``: of a ``fail`` or ``non-strict`` whose violation record has them
    (suites.model.Violation), what the clause required and what the back-end did.
    """

    id: str
    title: str
    family: str
    level: Level
    clause: str
    requirement: str
    verdict: Verdict
    reason: str = ""
    duration_s: float = 0.0
    parameters: dict[str, object] = field(default_factory=dict)
    measurements: dict[str, float] = field(default_factory=dict)
    trace: list[dict[str, Any]] | None = None
    deviation: str | None = None
    log_tail: str | None = None
    exit_status: int | None = None
    allowed: bool = False
    see: str | None = None
    finding_level: Level | None = None
    rerun: str | None = None
    behaviour: str | None = None
    tier: Tier = Tier.CONFORMANCE
    quote: str | None = None
    source: str | None = None
    leak: bool = False
    qemu_case: str | None = None
    qemu_confirmed: str | None = None
    expected: str | None = None
    seen: str | None = None

    def __post_init__(self) -> None:
        if self.qemu_confirmed is not None and self.qemu_confirmed not in QEMU_CONFIRMED:
            raise ValueError(f"qemu_confirmed {self.qemu_confirmed!r}: not one of {QEMU_CONFIRMED}")
        # Accept plain strings from callers; store the enums.
        object.__setattr__(self, "level", Level(self.level))
        object.__setattr__(self, "tier", Tier(self.tier))
        object.__setattr__(self, "verdict", Verdict(self.verdict))
        if self.finding_level is not None:
            object.__setattr__(self, "finding_level", Level(self.finding_level))

    @property
    def gate_level(self) -> Level:
        """The level the gate judges this result at: the finding's when it is stronger."""
        if self.finding_level is Level.MUST:
            return Level.MUST
        if self.finding_level is Level.SHOULD and self.level in (Level.MAY, Level.INFO):
            return Level.SHOULD
        return self.level

    @property
    def bad(self) -> bool:
        """The back-end did something wrong here (or it could not be judged: error).

        A result that follows from another (``see``) is not counted again; an allowed
        disconnect is pass-like."""
        if self.see is not None:
            return False
        if self.verdict is Verdict.DISCONNECT and self.allowed:
            return False
        return self.verdict in BAD_VERDICTS

    @property
    def blocking(self) -> bool:
        """True when this result fails the gate even without --strict.

        Whatever the tier and level: a crash (the process died). Whatever the tier: a
        MUST-level finding (``finding_level``) with fail/hang/crash/error/disallowed disconnect. Conformance: the same on a MUST case. Robustness:
        crash or hang at any level, and fail of a case that measures a leak (``leak``). Interop: nothing else (reported; gates under --strict).
        """
        if not self.bad:
            return False
        if self.verdict is Verdict.CRASH:
            return True  # the process died, whatever the case's tier or level: QEMU loses the device
        if self.finding_level is Level.MUST and self.verdict in _GATE_BLOCKING:
            return True
        if self.tier is Tier.CONFORMANCE:
            return self.gate_level is Level.MUST and self.verdict in _GATE_BLOCKING
        if self.tier is Tier.ROBUSTNESS:
            if self.leak and self.verdict is Verdict.FAIL:
                return True
            return self.verdict in _ROBUSTNESS_BLOCKING
        return False

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict, keys in field order."""
        w = f"case {self.id}"
        return {
            "id": self.id,
            "title": self.title,
            "family": self.family,
            "level": self.level.value,
            "clause": self.clause,
            "requirement": self.requirement,
            "verdict": self.verdict.value,
            "reason": self.reason,
            "duration_s": _jsonable(float(self.duration_s), f"{w}.duration_s"),
            "parameters": _jsonable(self.parameters, f"{w}.parameters"),
            "measurements": _jsonable(
                {k: float(v) for k, v in self.measurements.items()}, f"{w}.measurements"
            ),
            "trace": None if self.trace is None else _jsonable(self.trace, f"{w}.trace"),
            "deviation": self.deviation,
            "log_tail": self.log_tail,
            "exit_status": self.exit_status,
            "allowed": self.allowed,
            "see": self.see,
            "finding_level": None if self.finding_level is None else self.finding_level.value,
            "rerun": self.rerun,
            "behaviour": self.behaviour,
            "tier": self.tier.value,
            "quote": self.quote,
            "source": self.source,
            "leak": self.leak,
            "qemu_case": self.qemu_case,
            "qemu_confirmed": self.qemu_confirmed,
            "expected": self.expected,
            "seen": self.seen,
        }

    @classmethod
    def from_dict(cls, data: object, where: str = "case") -> CaseResult:
        """Build from a dict as ``to_dict`` writes it; raise ReportFormatError naming the key."""
        r = _Reader(data, where)
        trace = r._get("trace", False)
        if trace is not None and (
            not isinstance(trace, list) or not all(isinstance(e, dict) for e in trace)
        ):
            raise ReportFormatError(f"{where}.trace: expected an array of objects or null")
        measurements = r.get_dict("measurements")
        for k, v in measurements.items():
            if isinstance(v, bool) or not isinstance(v, int | float | None):
                raise ReportFormatError(f"{where}.measurements.{k}: expected a number")
        return cls(
            id=r.get_str("id"),
            title=r.get_str("title"),
            family=r.get_str("family"),
            level=r.get_enum("level", Level),
            clause=r.get_str("clause"),
            requirement=r.get_str("requirement"),
            verdict=r.get_enum("verdict", Verdict),
            reason=r.get_str("reason", ""),
            duration_s=r.get_float("duration_s", 0.0),
            parameters=r.get_dict("parameters"),
            measurements={
                k: (math.nan if v is None else float(v)) for k, v in measurements.items()
            },
            trace=trace,
            deviation=r.get_opt_str("deviation"),
            log_tail=r.get_opt_str("log_tail"),
            exit_status=r.get_opt_int("exit_status"),
            allowed=r.get_bool("allowed", False),
            see=r.get_opt_str("see"),
            finding_level=(
                None
                if r._get("finding_level", False) is None
                else r.get_enum("finding_level", Level)
            ),
            rerun=r.get_opt_str("rerun"),
            behaviour=r.get_opt_str("behaviour"),
            tier=(
                Tier.CONFORMANCE
                if r._get("tier", False) is None
                else r.get_enum("tier", Tier)
            ),
            quote=r.get_opt_str("quote"),
            source=r.get_opt_str("source"),
            leak=r.get_bool("leak", False),
            qemu_case=r.get_opt_str("qemu_case"),
            qemu_confirmed=_qemu_confirmed(r, where),
            expected=r.get_opt_str("expected"),
            seen=r.get_opt_str("seen"),
        )


@dataclass(frozen=True)
class BackendInfo:
    """What the back-end under test is and what it offered / what was negotiated."""

    name: str
    command: str | None = None
    features: int = 0
    feature_names: list[str] = field(default_factory=list)
    protocol_features: int = 0
    protocol_feature_names: list[str] = field(default_factory=list)
    negotiated_features: int | None = None
    negotiated_protocol_features: int | None = None
    queue_num: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict, keys in field order."""
        return {
            "name": self.name,
            "command": self.command,
            "features": self.features,
            "feature_names": list(self.feature_names),
            "protocol_features": self.protocol_features,
            "protocol_feature_names": list(self.protocol_feature_names),
            "negotiated_features": self.negotiated_features,
            "negotiated_protocol_features": self.negotiated_protocol_features,
            "queue_num": self.queue_num,
            "extra": _jsonable(self.extra, "backend.extra"),
        }

    @classmethod
    def from_dict(cls, data: object, where: str = "backend") -> BackendInfo:
        """Build from a dict as ``to_dict`` writes it; raise ReportFormatError naming the key."""
        r = _Reader(data, where)
        return cls(
            name=r.get_str("name"),
            command=r.get_opt_str("command"),
            features=r.get_int("features", 0),
            feature_names=r.get_str_list("feature_names"),
            protocol_features=r.get_int("protocol_features", 0),
            protocol_feature_names=r.get_str_list("protocol_feature_names"),
            negotiated_features=r.get_opt_int("negotiated_features"),
            negotiated_protocol_features=r.get_opt_int("negotiated_protocol_features"),
            queue_num=r.get_opt_int("queue_num"),
            extra=r.get_dict("extra"),
        )


@dataclass(frozen=True)
class Measurement:
    """A run-wide figure, e.g. ``stop_latency_ms`` with
    ``{"mode": "drain", "disk_latency_ms": 50, "inflight": 16}``, ``migration_downtime_ms``,
    ``iops``."""

    name: str
    unit: str
    value: float
    parameters: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict, keys in field order."""
        w = f"measurement {self.name}"
        return {
            "name": self.name,
            "unit": self.unit,
            "value": _jsonable(float(self.value), f"{w}.value"),
            "parameters": _jsonable(self.parameters, f"{w}.parameters"),
        }

    @classmethod
    def from_dict(cls, data: object, where: str = "measurement") -> Measurement:
        """Build from a dict as ``to_dict`` writes it; raise ReportFormatError naming the key."""
        r = _Reader(data, where)
        value = r.get_opt_float("value")
        if "value" not in r.data:
            raise ReportFormatError(f"{where}: missing required key 'value'")
        return cls(
            name=r.get_str("name"),
            unit=r.get_str("unit"),
            value=math.nan if value is None else value,
            parameters=r.get_dict("parameters"),
        )


@dataclass(frozen=True, kw_only=True)
class Report:
    """One suite run against one back-end."""

    schema_version: str = SCHEMA_VERSION
    suite_version: str
    started: str  # ISO 8601, UTC, e.g. 2026-11-26T05:48:16Z
    duration_s: float
    backend: BackendInfo
    cases: list[CaseResult] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    strict: bool = False
    argv: list[str] = field(default_factory=list)

    # -- verdicts --------------------------------------------------------------------

    def counts(self) -> dict[Verdict, int]:
        """Number of cases per verdict, every verdict present (0 included), in enum order."""
        counts = {v: 0 for v in Verdict}
        for case in self.cases:
            counts[case.verdict] += 1
        return counts

    def gate_failures(self, strict: bool | None = None) -> list[CaseResult]:
        """The cases that fail the gate.

        Always: fail/hang/crash/error/disallowed disconnect on a MUST case or a MUST-level
        finding. With *strict* (default: the run's own ``strict``) also any bad verdict
        (non-strict, flaky, ...) at any level. A result that follows from another (``see``)
        and an allowed disconnect never fail it; nor do xfail and xpass (xpass is reported
        so the deviation list gets pruned).
        """
        if strict is None:
            strict = self.strict
        return [c for c in self.cases if c.blocking or (strict and c.bad)]

    def gate(self, strict: bool | None = None) -> int:
        """Exit status for a CI gate: 0 when no case fails the gate, 1 otherwise."""
        return 1 if self.gate_failures(strict) else 0

    def families(self) -> list[str]:
        """Case families in first-seen order."""
        return list(dict.fromkeys(c.family for c in self.cases))

    # -- JSON ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict, keys in field order (``counts`` added for readers; ignored on load)."""
        return {
            "schema_version": self.schema_version,
            "suite_version": self.suite_version,
            "started": self.started,
            "duration_s": _jsonable(float(self.duration_s), "duration_s"),
            "strict": self.strict,
            "argv": list(self.argv),
            "backend": self.backend.to_dict(),
            "counts": {v.value: n for v, n in self.counts().items()},
            "gate": self.gate(),
            "cases": [c.to_dict() for c in self.cases],
            "measurements": [m.to_dict() for m in self.measurements],
        }

    @classmethod
    def from_dict(cls, data: object, where: str = "report") -> Report:
        """Build from a dict; checks schema_version and required keys (errors name the key)."""
        r = _Reader(data, where)
        version = r.get_str("schema_version")
        if version.split(".", 1)[0] not in _SCHEMA_MAJORS_READ:
            raise ReportFormatError(
                f"{where}.schema_version: {version!r} is not supported "
                f"(this reader knows 1.x and {_SCHEMA_MAJOR}.x, current {SCHEMA_VERSION})"
            )
        cases = r.get_list("cases", required=True)
        measurements = r.get_list("measurements")
        return cls(
            schema_version=version,
            suite_version=r.get_str("suite_version"),
            started=r.get_str("started"),
            duration_s=r.get_float("duration_s"),
            strict=r.get_bool("strict", False),
            argv=r.get_str_list("argv"),
            backend=BackendInfo.from_dict(r._get("backend", True), f"{where}.backend"),
            cases=[CaseResult.from_dict(c, f"{where}.cases[{i}]") for i, c in enumerate(cases)],
            measurements=[
                Measurement.from_dict(m, f"{where}.measurements[{i}]")
                for i, m in enumerate(measurements)
            ],
        )

    def to_json(self) -> str:
        """The report as report.json text (2-space indent, trailing newline)."""
        data = self.to_dict()
        text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (e.g. a log decoded with surrogateescape) has no UTF-8 form;
            # \u escapes keep the file valid JSON and valid UTF-8, and load gives it back.
            text = json.dumps(data, indent=2, ensure_ascii=True, allow_nan=False) + "\n"
        return text

    def save(self, path: str | os.PathLike[str]) -> pathlib.Path:
        """Write report.json atomically (temp file + rename); return the path."""
        target = pathlib.Path(path)
        text = self.to_json()
        target.parent.mkdir(parents=True, exist_ok=True)
        # Not mkstemp: its 0600 would make report.json unreadable to a CI artifact step;
        # os.open with 0666 lets the umask decide, as for the other files.
        tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        """Read and validate report.json; ReportFormatError names the file and the key."""
        p = pathlib.Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ReportFormatError(f"{p}: not JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise ReportFormatError(f"{p}: not UTF-8: {e}") from None
        try:
            return cls.from_dict(data, "report")
        except ReportFormatError as e:
            raise ReportFormatError(f"{p}: {e}") from None


# --- known deviations ---------------------------------------------------------------------


@dataclass(frozen=True)
class KnownDeviations:
    """Per-back-end list of expected failures (the BoGo / tlsfuzzer way), id -> reason.

    An id may be a glob (``VU-GVB-*``, ``VU-INF-5[packed]``); exact ids win over globs.
    """

    deviations: dict[str, str] = field(default_factory=dict)
    source: str | None = None

    @classmethod
    def from_entries(
        cls, entries: Iterable[object], source: str = "<deviations>"
    ) -> KnownDeviations:
        """Build from ``[{"id": ..., "reason": ...}, ...]``; errors name the entry."""
        result: dict[str, str] = {}
        for i, entry in enumerate(entries):
            r = _Reader(entry, f"{source}: deviation[{i}]")
            dev_id = r.get_str("id")
            reason = r.get_str("reason")
            if not dev_id.strip() or not reason.strip():
                raise ReportFormatError(
                    f"{source}: deviation[{i}]: id and reason must be non-empty"
                )
            if dev_id in result:
                raise ReportFormatError(f"{source}: deviation[{i}]: id {dev_id!r} listed twice")
            result[dev_id] = reason
        return cls(result, source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KnownDeviations:
        """Read TOML (``[[deviation]] id = "VU-..." reason = "..."``) or JSON (the same shape,
        ``{"deviation": [...]}``, or a bare list); format chosen by the file suffix."""
        p = pathlib.Path(path)
        raw = p.read_bytes()
        data: object
        try:
            if p.suffix.lower() == ".json":
                data = json.loads(raw.decode("utf-8"))
            else:
                data = tomllib.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ReportFormatError(f"{p}: cannot parse: {e}") from None
        if isinstance(data, dict):
            unknown = sorted(set(data) - {"deviation"})
            if unknown:
                raise ReportFormatError(
                    f"{p}: unknown top-level key(s) {unknown}; expected 'deviation'"
                )
            entries = data.get("deviation", [])
        else:
            entries = data
        if not isinstance(entries, list):
            raise ReportFormatError(f"{p}: 'deviation' must be an array of tables/objects")
        return cls.from_entries(entries, str(p))

    def reason_for(self, case_id: str) -> str | None:
        """The deviation reason that applies to *case_id*, if any."""
        if case_id in self.deviations:
            return self.deviations[case_id]
        for pattern, reason in self.deviations.items():
            if fnmatch.fnmatchcase(case_id, pattern):
                return reason
        return None

    def apply(self, report: Report) -> Report:
        """A new report where listed failing cases are ``xfail`` and listed passing ones ``xpass``.

        The original reason stays; the deviation's reason goes to ``CaseResult.deviation``.
        ``error`` (the suite failed), skip and unsupported are left alone.
        """
        cases = []
        for case in report.cases:
            reason = self.reason_for(case.id)
            allowed = case.verdict is Verdict.DISCONNECT and case.allowed
            if reason is not None and case.verdict in _DEVIATION_FAILURES and not allowed:
                case = replace(case, verdict=Verdict.XFAIL, deviation=reason)
            elif reason is not None and case.verdict is Verdict.PASS:
                case = replace(case, verdict=Verdict.XPASS, deviation=reason)
            cases.append(case)
        return replace(report, cases=cases)

    def unused(self, report: Report) -> list[str]:
        """Deviation ids that match no case of *report* (stale entries)."""
        ids = [c.id for c in report.cases]
        return [
            d for d in self.deviations if not any(d == i or fnmatch.fnmatchcase(i, d) for i in ids)
        ]


def field_names(cls: type[object]) -> list[str]:
    """The JSON keys of one of the model's dataclasses, in order (for docs and tests)."""
    return [f.name for f in fields(cls)]  # type: ignore[arg-type]
