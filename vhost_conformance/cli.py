"""The ``vhost-conformance`` command: run, report, cases, backends, probe.

Exit codes (every command): 0 success (``run``: no MUST failure after known deviations),
1 a MUST failure (or a SHOULD one with ``--strict``), 2 usage or environment error, with a
one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import vhost_conformance

if TYPE_CHECKING:
    from vhost_conformance.reports.model import Report

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A usage or environment error: printed as one line, exit 2."""


# --------------------------------------------------------------------------- back-end selection


def _add_backend_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("back-end under test (default: the reference back-end)")
    g.add_argument("--backend", metavar="NAME",
                   help="built-in profile: reference, qsd, qsd-11.1, dpdk-vhost-blk")
    g.add_argument("--backend-cmd", metavar="CMD",
                   help="command template with {socket} (required), {disk}, {workdir}")
    g.add_argument("--profile", metavar="FILE", help="a TOML profile file")
    g.add_argument("--backend-connects", action="store_true",
                   help="the back-end connects to our socket instead of listening")


def _profile(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Resolve the back-end options into a suites.target Profile (raises CliError)."""
    from vhost_conformance.suites.target import TargetError, command_profile, load_profile

    chosen = [o for o in ("backend", "backend_cmd", "profile") if getattr(args, o, None)]
    if len(chosen) > 1:
        raise CliError("give only one of --backend, --backend-cmd, --profile")
    try:
        if args.backend_cmd:
            return command_profile(args.backend_cmd,
                                   "connect" if args.backend_connects else "listen")
        if args.profile:
            if not os.access(args.profile, os.R_OK):
                raise CliError(f"cannot read profile file {args.profile}")
            return load_profile(args.profile)
        return load_profile(args.backend or "reference")
    except TargetError as exc:
        raise CliError(str(exc)) from None


def _backend_pytest_args(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    if args.backend_cmd:
        out += ["--vhost-backend-cmd", args.backend_cmd]
    elif args.profile:
        out += ["--vhost-profile", args.profile]
    else:
        out += ["--vhost-backend", args.backend or "reference"]
    if args.backend_connects:
        out.append("--vhost-backend-connects")
    return out


# --------------------------------------------------------------------------- commands


#: Pre-flight deadlines: the back-end must listen within PREFLIGHT_START_S and answer
#: GET_FEATURES within PREFLIGHT_REPLY_S (with the stop, well under 20 s in all).
PREFLIGHT_START_S = 10.0
PREFLIGHT_REPLY_S = 5.0


def _tail_line(text: str | None, limit: int = 300) -> str:
    """The last lines of a log as one line (`` | `` between lines), at most *limit* chars."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()][-3:]
    flat = " | ".join(lines)
    return flat if len(flat) <= limit else "\u2026" + flat[-limit:]


def preflight(profile) -> None:  # type: ignore[no-untyped-def]
    """Start one instance of *profile* and ask GET_FEATURES; CliError (one line naming the
    command, the exit status and the log tail) when it cannot start, never listens, or does
    not answer. A back-end that connects to us is checked by the suite itself."""
    import shlex

    from vhost_conformance.frontend.channel import BackendError, Channel
    from vhost_conformance.frontend.protocol import FrontendRequest
    from vhost_conformance.suites.target import (
        BackendStartHang,
        CommandTarget,
        TargetError,
        TargetFactory,
    )

    if profile.socket_mode != "listen" or profile.command is None:
        return
    factory = TargetFactory(profile=profile, worker="preflight", start_timeout=PREFLIGHT_START_S)
    try:
        target = factory.new("preflight")
        argv = target.argv() if isinstance(target, CommandTarget) else None
        command = shlex.join(argv) if argv else profile.command
        try:
            socket_path = target.start()
        except TargetError as exc:
            status = None if isinstance(exc, BackendStartHang) else target.exit_status()
            status = getattr(exc, "exit_status", None) or status
            tail = getattr(exc, "log_tail", "") or target.log_tail()
            what = (
                f"exited with status {status}"
                if status is not None
                else f"did not listen within {PREFLIGHT_START_S:g} s (still running)"
            )
            raise CliError(
                f"pre-flight: back-end {profile.name} could not be started: `{command}` {what}; "
                f"log tail: {_tail_line(tail) or '(empty)'}"
            ) from None
        try:
            channel = Channel.connect(socket_path, timeout=PREFLIGHT_REPLY_S)
            try:
                reply = channel.call(FrontendRequest.GET_FEATURES, timeout=PREFLIGHT_REPLY_S)
            finally:
                channel.close()
            if reply is None:
                raise BackendError("no reply")
        except (BackendError, OSError) as exc:
            if isinstance(target, CommandTarget):
                target.wait_exit(0.5)
            status = None if target.alive() else target.exit_status()
            state = f"exit status {status}" if status is not None else "still running"
            raise CliError(
                f"pre-flight: back-end {profile.name} did not answer GET_FEATURES within "
                f"{PREFLIGHT_REPLY_S:g} s: `{command}` ({state}): {exc}; "
                f"log tail: {_tail_line(target.log_tail()) or '(empty)'}"
            ) from None
    finally:
        factory.close()


def _prepare_report_dir(args: argparse.Namespace) -> Path:
    """The report folder, made and checked writable (the caller's relative paths made absolute
    first), the known-deviations file checked, an old report.json removed."""
    from vhost_conformance.reports.model import KnownDeviations

    # The suite runs from the report folder (below): every path the caller gave relative to
    # their own directory is made absolute first, or pytest would look for it under the folder.
    report_dir = Path(args.report).absolute()
    for name in ("known_deviations", "profile"):
        if getattr(args, name, None):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=report_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise CliError(f"report folder {report_dir} is not writable: {exc.strerror}") from None
    if args.known_deviations:
        try:
            KnownDeviations.load(args.known_deviations)
        except Exception as exc:
            raise CliError(f"known-deviations file {args.known_deviations}: {exc}") from None
    (report_dir / "report.json").unlink(missing_ok=True)
    return report_dir


def _suite_args(args: argparse.Namespace, report_dir: Path) -> list[str]:
    """The pytest command line of ``run``."""
    pytest_args = [
        "--pyargs", "vhost_conformance.suites",
        "-p", "no:cacheprovider",
        "--rootdir", str(report_dir),
        "-o", "addopts=",
        "-o", "testpaths=",
        "--vhost-report", str(report_dir),
        "--vhost-timeout", str(args.timeout),
        *_backend_pytest_args(args),
    ]
    if args.strict:
        pytest_args.append("--vhost-strict")
    if args.qemu:
        pytest_args.append("--vhost-qemu")
    if args.set_mem_table:
        pytest_args.append("--vhost-set-mem-table")
    if args.known_deviations:
        pytest_args += ["--vhost-known-deviations", args.known_deviations]
    if args.k:
        pytest_args += ["-k", args.k]
    for case_id in args.case or ():
        pytest_args += ["--vhost-case", case_id]
    for tiers in args.tier or ():
        pytest_args += ["--vhost-tier", tiers]
    if args.n and args.n != "0":
        pytest_args += ["-n", args.n]
    pytest_args += ["-q"] if not args.verbose else ["-v"]
    pytest_args += ["-rN", "--no-header", "-W", "ignore::pytest.PytestAssertRewriteWarning"]
    return pytest_args


def _print_summary(report: Report, report_dir: Path) -> None:
    """The lines ``run`` prints after the suite: counts, the qemu tier's time, QEMU's word."""
    counts = report.counts()
    summary = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()) if n)
    print(f"vhost-conformance: {len(report.cases)} cases against {report.backend.name}: "
          f"{summary}; report in {report_dir}")
    qemu = [c for c in report.cases if c.family == "qemu"]
    if qemu:  # the tier's budget: 4 minutes on 2 cores against the reference back-end
        print(f"vhost-conformance: qemu tier: {len(qemu)} cases in "
              f"{sum(c.duration_s for c in qemu):.0f} s")
    held = Counter(c.qemu_confirmed for c in report.cases if c.qemu_confirmed is not None)
    if held:
        print("vhost-conformance: findings held against real QEMU 11.1.3: "
              + ", ".join(f"{n} {what}" for what, n in sorted(held.items())))


def cmd_run(args: argparse.Namespace) -> int:
    """Run the conformance suite against one back-end and write the report."""
    import pytest

    from vhost_conformance.reports.model import Report

    profile = _profile(args)  # validates the back-end options before anything starts
    _check_tiers(args.tier or ())
    report_dir = _prepare_report_dir(args)
    if not args.no_preflight:
        preflight(profile)
    pytest_args = _suite_args(args, report_dir)
    # Run from the report folder so no project conftest or ini of the caller's cwd interferes.
    cwd = os.getcwd()
    try:
        os.chdir(report_dir)
        rc = pytest.main(pytest_args)
    finally:
        os.chdir(cwd)
    report_file = report_dir / "report.json"
    if int(rc) in (pytest.ExitCode.USAGE_ERROR, pytest.ExitCode.INTERNAL_ERROR):
        raise CliError(f"the suite could not run (pytest exit {int(rc)}): see the messages above")
    if int(rc) == pytest.ExitCode.NO_TESTS_COLLECTED:
        raise CliError("no case selected (check -k)")
    if not report_file.exists():
        raise CliError(f"the suite wrote no {report_file}")
    report = Report.load(report_file)
    _print_summary(report, report_dir)
    return report.gate(args.strict)


def cmd_report(args: argparse.Namespace) -> int:
    """Render the matrix of several report.json files."""
    import vhost_conformance.reports.matrix as matrix
    from vhost_conformance.reports.model import ReportFormatError

    try:
        reports = matrix.load(args.reports)
    except (OSError, ReportFormatError, ValueError) as exc:
        raise CliError(f"cannot read report: {exc}") from None
    out = Path(args.output)
    try:
        written = matrix.write(reports, out)
    except OSError as exc:
        raise CliError(f"cannot write the matrix into {out}: {exc.strerror}") from None
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return EXIT_OK


def _check_tiers(values: list[str] | tuple[str, ...]) -> None:
    """Raise CliError for a ``--tier`` value naming no tier."""
    from vhost_conformance.reports.model import Tier

    known = {t.value for t in Tier}
    for value in values:
        for name in value.split(","):
            if name.strip() and name.strip() not in known:
                raise CliError(f"--tier: unknown tier {name.strip()!r} (known: {', '.join(sorted(known))})")


def cmd_cases(args: argparse.Namespace) -> int:
    """Print the case catalogue (``--json``: one object per case, see docs/report-schema.md
    "cases --json")."""
    from vhost_conformance.suites import catalogue

    implemented = _implemented_case_ids()
    if args.json:
        rows = [catalogue.case_record(c, c.id in implemented) for c in catalogue.all_cases()]
        print(json.dumps(rows, indent=1))
    else:
        print(catalogue.format_catalogue(implemented))
    return EXIT_OK


def _implemented_case_ids() -> set[str]:
    """Ids that have a case function in the installed suite modules."""
    import importlib
    import pkgutil

    import vhost_conformance.suites as suites_pkg
    from vhost_conformance.suites.model import case_of

    ids: set[str] = set()
    for mod in pkgutil.iter_modules(suites_pkg.__path__):
        if not mod.name.startswith("test_"):
            continue
        module = importlib.import_module(f"vhost_conformance.suites.{mod.name}")
        for obj in vars(module).values():
            c = case_of(obj)
            if c is not None:
                ids.add(c.id)
    return ids


def cmd_backends(args: argparse.Namespace) -> int:
    """List the known back-end profiles and whether each can run here."""
    from vhost_conformance.suites.target import builtin_profile_names, cache_dir, load_profile

    rows: list[dict[str, object]] = []
    for name in builtin_profile_names():
        profile = load_profile(name)
        missing = profile.missing_needs({"python": sys.executable, "cache": str(cache_dir())})
        rows.append({"name": name, "description": profile.description,
                     "available": not missing, "missing": missing})
        if not args.json:
            state = "available" if not missing else "missing: " + "; ".join(missing)
            print(f"{name:16} {state}\n{'':16} {profile.description}")
    if args.json:
        print(json.dumps(rows, indent=1))
    return EXIT_OK


def cmd_probe(args: argparse.Namespace) -> int:
    """Connect like QEMU and print what the back-end offers, as JSON."""
    from vhost_conformance.frontend.blk import BlkConfig
    from vhost_conformance.frontend.channel import BackendError, Channel
    from vhost_conformance.frontend.device import Session, SessionError
    from vhost_conformance.frontend.memory import GuestMemory
    from vhost_conformance.frontend.protocol import (
        ProtocolError,
        ProtocolFeature,
        device_feature_names,
        feature_names,
    )
    from vhost_conformance.suites.target import TargetError, TargetFactory

    profile = _profile(args)
    if profile.socket_mode == "connect":
        raise CliError("probe of a back-end that connects to us: not supported yet, "
                       "run it in listen mode")
    factory = TargetFactory(profile=profile, worker="probe")
    try:
        kind = factory.device_type()
        blk = kind.name == "block"
        target = factory.new("probe")
        try:
            socket_path = target.start()
        except TargetError as exc:
            tail = getattr(exc, "log_tail", "") or target.log_tail()
            last = tail.strip().splitlines()[-1] if tail.strip() else ""
            raise CliError(f"back-end {profile.name} could not be started: {exc}"
                           + (f" (log: {last})" if last else "")) from None
        memory = GuestMemory.simple(16 << 20)
        try:
            channel = Channel.connect(socket_path, timeout=args.timeout)
            session = Session(channel, memory, timeout=args.timeout)
            # GET_CONFIG (at realize) with virtio-blk's size only on a block device: QEMU's
            # vhost-user-net and -fs front-ends ask the back-end for no config
            n = session.connect(realize=blk)
            out: dict[str, object] = {
                "backend": profile.name,
                "device_type": kind.name,
                "device_type_from": kind.source,
                "features": n.features,
                "feature_names": device_feature_names(n.features, kind.name),
                "protocol_features": n.protocol_features_offered,
                "protocol_feature_names": feature_names(n.protocol_features_offered,
                                                        ProtocolFeature),
                "queue_num": n.queue_num,
                "max_mem_slots": n.max_mem_slots,
            }
            if n.config and blk:
                cfg = BlkConfig.decode(n.config)
                out["config"] = {k: v for k, v in _config_dict(cfg).items() if v is not None}
            if blk and session.has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
                session.set_features(session.driver_features())
                region = session.get_inflight_fd()
                out["inflight_mmap_size"] = region.mmap_size if region is not None else 0
            session.close()
        except (BackendError, ProtocolError, SessionError, OSError) as exc:
            raise CliError(f"back-end {profile.name} did not answer the probe: {exc}") from None
        finally:
            memory.close()
    finally:
        factory.close()
    print(json.dumps(out, indent=2))
    return EXIT_OK


def _config_dict(cfg: object) -> dict[str, object]:
    import dataclasses

    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return dict(vars(cfg))


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(
        prog="vhost-conformance",
        description="Conformance suite for vhost-user back-ends (vhost-user-blk, in-flight "
                    "migration). Exit codes: 0 ok, 1 a MUST failure, 2 usage/environment error.",
    )
    parser.add_argument("--version", action="version",
                        version=f"vhost-conformance {vhost_conformance.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the suite against a back-end and write the report",
                         description="Run the conformance suite against one back-end.")
    _add_backend_options(run)
    run.add_argument("--report", metavar="DIR", default="vhost-conformance-report",
                     help="report folder (default ./vhost-conformance-report)")
    run.add_argument("-k", metavar="EXPR", help="only cases matching this pytest -k expression")
    run.add_argument("--case", metavar="ID", action="append",
                     help="only this case (exact id, repeatable): a report's re-run command")
    run.add_argument("--no-preflight", action="store_true",
                     help="skip the pre-flight start + GET_FEATURES of the back-end")
    run.add_argument("-n", metavar="N", default="auto",
                     help="parallel workers (pytest-xdist; default auto, 0 = none)")
    run.add_argument("--tier", metavar="T[,T]", action="append",
                     help="only cases of these tiers: conformance, interop, robustness")
    run.add_argument("--strict", action="store_true",
                     help="SHOULD, interop and every other bad verdict fail the run")
    run.add_argument("--qemu", action="store_true",
                     help="also run the qemu tier (VU-QEMU-*: real QEMU 11.1.3 boots a guest on the "
                     "back-end; ~10-30 s a case under TCG)")
    run.add_argument("--set-mem-table", action="store_true",
                     help="drive the back-end as QEMU 11.1.3 does without CONFIGURE_MEM_SLOTS: "
                     "memory by SET_MEM_TABLE (cases that need the bit: unsupported)")
    run.add_argument("--known-deviations", metavar="FILE",
                     help="TOML/JSON list of known deviations (expected failures)")
    run.add_argument("--timeout", type=float, default=5.0, metavar="S",
                     help="deadline of each back-end reply (default 5 s)")
    run.add_argument("-v", "--verbose", action="store_true", help="one line per case")
    run.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="render a matrix of several runs",
                         description="Render the matrix (HTML and Markdown) of several "
                                     "report.json files.")
    rep.add_argument("reports", nargs="+", metavar="REPORT_JSON")
    rep.add_argument("-o", "--output", default="vhost-conformance-matrix", metavar="DIR",
                     help="output folder (default ./vhost-conformance-matrix)")
    rep.set_defaults(func=cmd_report)

    cases = sub.add_parser("cases", help="list the case catalogue",
                           description="List every case: id, level, clause, title.")
    cases.add_argument("--json", action="store_true")
    cases.set_defaults(func=cmd_cases)

    be = sub.add_parser("backends", help="list known back-ends and whether they are available",
                        description="List the built-in back-end profiles.")
    be.add_argument("--json", action="store_true")
    be.set_defaults(func=cmd_backends)

    probe = sub.add_parser("probe", help="connect like QEMU and print what a back-end offers",
                           description="Start (or connect to) a back-end, run QEMU's init "
                                       "sequence and print its features as JSON.")
    _add_backend_options(probe)
    probe.add_argument("--timeout", type=float, default=10.0, metavar="S")
    probe.set_defaults(func=cmd_probe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vhost-conformance`` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"vhost-conformance {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. piped into head
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"vhost-conformance {args.command}: interrupted", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
