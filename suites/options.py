"""The plugin's command-line options (group "vhost-conformance") and what is read from them:
the back-end under test, the tiers, and the one command that re-runs a case."""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from typing import Any

import pytest
from vhost_conformance.reports.model import Tier
from vhost_conformance.suites.target import (
    Profile,
    UsageError,
    command_profile,
    connecting_profile,
    load_profile,
)

#: The options that choose a back-end under test (none given: the built-in default).
BACKEND_OPTIONS = ("vhost_backend", "vhost_profile", "vhost_backend_cmd", "vhost_backend_socket")


def add_options(parser: pytest.Parser) -> None:
    """Add the vhost-conformance options (group "vhost-conformance") to ``parser``."""
    group = parser.getgroup("vhost-conformance", "vhost-user back-end conformance")
    group.addoption(
        "--vhost-backend",
        metavar="NAME",
        default=None,
        help="built-in back-end profile (reference, qsd, qsd-11.1, dpdk-vhost-blk); default reference",
    )
    group.addoption(
        "--vhost-profile",
        metavar="FILE",
        default=None,
        help="TOML profile file of the back-end under test",
    )
    group.addoption(
        "--vhost-backend-cmd",
        metavar="CMD",
        default=None,
        help="command template of the back-end: {socket} (required), {disk}, {workdir}",
    )
    group.addoption(
        "--vhost-backend-socket",
        metavar="PATH",
        default=None,
        help="socket of a back-end someone else runs (with --vhost-backend-connects: where we listen)",
    )
    group.addoption(
        "--vhost-backend-connects",
        action="store_true",
        default=False,
        help="the back-end connects to our socket instead of listening",
    )
    group.addoption(
        "--vhost-strict",
        action="store_true",
        default=False,
        help="non-strict verdicts (SHOULD violated) fail the run",
    )
    group.addoption(
        "--vhost-report",
        metavar="DIR",
        default=None,
        help="write report.json, junit.xml, summary.md and report.html into DIR",
    )
    group.addoption(
        "--vhost-known-deviations",
        metavar="FILE",
        default=None,
        help="TOML or JSON file of known deviations (expected failures, with reasons)",
    )
    group.addoption(
        "--vhost-timeout",
        metavar="S",
        type=float,
        default=5.0,
        help="deadline of each reply from the back-end, seconds (default 5)",
    )
    group.addoption(
        "--vhost-case",
        metavar="ID",
        action="append",
        default=[],
        help="run only this case (exact id; repeatable): the re-run command of a report",
    )
    group.addoption(
        "--vhost-tier",
        metavar="T[,T]",
        action="append",
        default=[],
        help="run only cases of these tiers (conformance, interop, robustness; repeatable)",
    )
    group.addoption(
        "--vhost-set-mem-table",
        action="store_true",
        default=False,
        help="front-end as QEMU 11.1.3 is without CONFIGURE_MEM_SLOTS: memory goes by "
        "SET_MEM_TABLE even where the back-end offers the bit; cases needing it: unsupported",
    )
    group.addoption(
        "--vhost-qemu",
        action="store_true",
        default=False,
        help="also run the qemu tier (VU-QEMU-*: real QEMU 11.1.3 boots a guest on the back-end)",
    )
    group.addoption(
        "--vhost-case-timeout",
        metavar="S",
        type=float,
        default=120.0,
        help="deadline of a whole case, seconds (default 120); passing it is a hang",
    )


def option(config: pytest.Config, name: str) -> Any:
    """The value of the plugin option ``name`` (its dest, e.g. ``vhost_timeout``)."""
    return config.getoption(name)


def backend_chosen(config: pytest.Config) -> bool:
    """Whether an option names the back-end under test (else the default applies)."""
    return any(option(config, name) for name in BACKEND_OPTIONS)


def profile_from_options(config: pytest.Config) -> tuple[Profile | None, str | None]:
    """The back-end under test chosen by the options: (profile, external socket)."""
    backend = option(config, "vhost_backend")
    profile_file = option(config, "vhost_profile")
    command = option(config, "vhost_backend_cmd")
    socket_path = option(config, "vhost_backend_socket")
    connects = bool(option(config, "vhost_backend_connects"))
    chosen = [
        n
        for n, v in (
            ("--vhost-backend", backend),
            ("--vhost-profile", profile_file),
            ("--vhost-backend-cmd", command),
        )
        if v
    ]
    if len(chosen) > 1:
        raise pytest.UsageError(f"give only one of {', '.join(chosen)}")
    if socket_path and chosen:
        raise pytest.UsageError(
            f"--vhost-backend-socket names a back-end someone else runs: drop {chosen[0]}"
        )
    try:
        if socket_path:
            if connects:
                return Profile(
                    name="external",
                    command=None,
                    socket_mode="connect",
                    socket=socket_path,
                    source="--vhost-backend-socket",
                ), None
            return None, socket_path
        if command:
            return command_profile(command, "connect" if connects else "listen"), None
        profile = load_profile(profile_file or backend or "reference")
        return (connecting_profile(profile) if connects else profile), None
    except UsageError as exc:
        raise pytest.UsageError(str(exc)) from None


def parse_tiers(values: Iterable[str]) -> frozenset[Tier]:
    """The tiers named by ``--vhost-tier``/``--tier`` values (each a comma-separated list);
    an unknown name is a usage error naming the known ones."""
    tiers: set[Tier] = set()
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if not name:
                continue
            try:
                tiers.add(Tier(name))
            except ValueError:
                known = ", ".join(t.value for t in Tier)
                raise pytest.UsageError(f"unknown tier {name!r} (known: {known})") from None
    return frozenset(tiers)


def rerun_command(config: pytest.Config, profile: Profile | None, case_id: str) -> str:
    """The one command that re-runs *case_id* alone against this run's back-end."""
    args = ["vhost-conformance", "run"]
    for name, flag in (
        ("vhost_backend", "--backend"),
        ("vhost_profile", "--profile"),
        ("vhost_backend_cmd", "--backend-cmd"),
    ):
        value = option(config, name)
        if value:
            args += [flag, str(value)]
    if option(config, "vhost_backend_connects"):
        args.append("--backend-connects")
    if len(args) == 2:
        args += ["--backend", profile.name if profile is not None else "reference"]
    args += ["--case", case_id, "-n", "0", "--report", f"rerun-{case_id}"]
    return shlex.join(args)
