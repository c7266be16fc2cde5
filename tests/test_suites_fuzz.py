"""The hostile-guest, malformed and stateful-fuzzing suite families, run as a CI would.

The heavy test runs VU-FUZZ-2 (hostile descriptor chains) and VU-FUZZ-1 (message sequences)
against the reference back-end with ``VHOST_CONFORMANCE_EXAMPLES=1000`` (1,000 hostile
examples plus 200 sequences) and checks from report.json that both pass, that the examples
ran, and that the back-end's fd count stayed put. Others check that a crashing back-end gives
a ``crash`` verdict carrying hypothesis's minimal example, and the small helpers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from vhost_conformance.suites.drivers.hostile import (
    EXAMPLES_ENV,
    examples_setting,
)
from vhost_conformance.suites.drivers.procfs import process_tree_fds
from vhost_conformance.suites.test_hostile_guest import Shape

ROOT = Path(__file__).resolve().parent.parent


def run_suite(
    tmp_path: Path, selection: list[str], *, examples: int, extra: list[str] = (), timeout: float
) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """Run suite cases in a subprocess pytest; return (report.json by case id, the process)."""
    report = tmp_path / "report"
    env = dict(os.environ, **{EXAMPLES_ENV: str(examples), "VHOST_CONFORMANCE_SHRINK_SECONDS": "5"})
    # Unix socket paths must stay under 108 bytes: pytest's tmp_path can be longer than that.
    rundir = Path(tempfile.mkdtemp(prefix="vcf-", dir="/tmp"))
    env["VHOST_CONFORMANCE_RUNDIR"] = str(rundir)
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:xdist",
        f"--vhost-report={report}",
        *extra,
        *selection,
    ]
    try:
        done = subprocess.run(
            argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    path = report / "report.json"
    assert path.exists(), (
        f"no report.json; pytest said:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
    )
    data = json.loads(path.read_text())
    return {c["id"]: c for c in data["cases"]}, done


@pytest.mark.slow
def test_1000_hostile_examples_and_200_sequences_against_the_reference(tmp_path: Path) -> None:
    started = time.monotonic()
    cases, done = run_suite(
        tmp_path,
        [
            "suites/test_hostile_guest.py::test_fuzzed_descriptor_chains",
            "suites/test_fuzz_stateful.py::test_fuzzed_message_sequences",
        ],
        examples=1000,
        timeout=400,
    )
    elapsed = time.monotonic() - started
    hostile, stateful = cases["VU-FUZZ-2"], cases["VU-FUZZ-1"]
    for result in (hostile, stateful):
        assert result["verdict"] == "pass", (result["id"], result["reason"], done.stdout[-3000:])
    ran = hostile["measurements"]["examples"] + stateful["measurements"]["examples"]
    assert hostile["measurements"]["examples"] == 1000
    assert stateful["measurements"]["examples"] == 200
    assert ran >= 1000
    # no crash (the verdicts), no hang (the verdicts), no fd leak (measured in the case too)
    assert hostile["measurements"]["fds.after"] <= hostile["measurements"]["fds.before"] + 16
    # the chains were hostile: the back-end refused most of them one way or another
    outcomes = {k: v for k, v in hostile["measurements"].items() if k.startswith("outcome.")}
    assert sum(outcomes.values()) == 1000
    assert outcomes.get("outcome.needs-reset", 0) > 100
    assert stateful["measurements"].get("io", 0) > 0
    print(f"1,200 examples in {elapsed:.1f} s; hostile outcomes {outcomes}")


@pytest.mark.slow
def test_a_crashing_backend_gives_crash_with_the_minimal_sequence(tmp_path: Path) -> None:
    # the reference back-end kills itself at the 3rd request it pops: some sequence gets there
    command = (
        f"{sys.executable} -m vhost_conformance.backend --socket-path {{socket}} "
        "--disk {disk} --crash-at after-pop:3"
    )
    cases, _ = run_suite(
        tmp_path,
        ["suites/test_fuzz_stateful.py::test_fuzzed_message_sequences"],
        examples=150,
        extra=[f"--vhost-backend-cmd={command}"],
        timeout=300,
    )
    result = cases["VU-FUZZ-1"]
    assert result["verdict"] == "crash", result
    assert "died (signal 9)" in result["reason"]
    assert "minimal sequence" in result["reason"] and "state." in result["reason"]


@pytest.mark.slow
def test_a_crashing_backend_under_hostile_chains_is_a_crash(tmp_path: Path) -> None:
    command = (
        f"{sys.executable} -m vhost_conformance.backend --socket-path {{socket}} "
        "--disk {disk} --crash-at after-pop:5"
    )
    cases, _ = run_suite(
        tmp_path,
        ["suites/test_hostile_guest.py::test_fuzzed_descriptor_chains"],
        examples=30,
        extra=[f"--vhost-backend-cmd={command}"],
        timeout=300,
    )
    result = cases["VU-FUZZ-2"]
    assert result["verdict"] == "crash", result
    assert "signal 9" in result["reason"]


def test_examples_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EXAMPLES_ENV, raising=False)
    assert examples_setting() == 50
    assert examples_setting(7) == 7
    monkeypatch.setenv(EXAMPLES_ENV, "1200")
    assert examples_setting() == 1200
    for bad in ("0", "-3", "many"):
        monkeypatch.setenv(EXAMPLES_ENV, bad)
        with pytest.raises(pytest.UsageError, match=EXAMPLES_ENV):
            examples_setting()


def test_process_tree_fds_counts_children() -> None:
    mine = process_tree_fds(os.getpid())
    assert mine is not None and mine > 3
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(5)"], stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 5
        while True:
            counted = process_tree_fds(os.getpid())
            assert counted is not None
            if counted > mine or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert counted > mine
    finally:
        child.kill()
        child.wait(5)
    assert process_tree_fds(2**22 + 12345) is None


def test_protected_slots_exclude_every_written_byte() -> None:
    from vhost_conformance.suites.drivers.hostile import NEXT, WRITE, Guest
    from vhost_conformance.suites.test_hostile_guest import Desc

    guest = Guest.__new__(Guest)  # only slot() and scratch_end are used
    # a writable buffer in 'hdr' that spills into 'data' protects neither; 'status' stays
    shape = Shape((Desc("hdr", 4096, WRITE | NEXT, offset=8), Desc("status", 1)))
    assert shape.protected_slots(guest) == {"status", "table0", "table1"}
    assert Shape((Desc("hdr", 16),)).protected_slots(guest) == {
        "hdr",
        "data",
        "status",
        "table0",
        "table1",
    }


def test_an_unreplayable_non_verdict_exception_is_reported_not_flaky(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A BackendClosed escaping a rule once (hypothesis cannot replay it: the second run draws
    more steps) comes out as that exception with its sequence, never as hypothesis's
    "Inconsistent data generation" Flaky, which made VU-FUZZ-1 a suite error."""
    from vhost_conformance.frontend.channel import BackendClosed
    from vhost_conformance.suites import test_fuzz_stateful as fuzz
    from vhost_conformance.suites.drivers.hostile import Rig
    from vhost_conformance.suites.target import CommandTarget, TargetFactory, load_profile

    calls = {"n": 0}
    original = fuzz.MessageMachine._call

    def once(self: fuzz.MessageMachine, request: Any, *args: Any, **kwargs: Any) -> Any:
        if request.name == "GET_FEATURES":
            calls["n"] += 1
            if calls["n"] == 1:
                raise BackendClosed("closed once, never again")
        return original(self, request, *args, **kwargs)

    # rules are bound when the class is made: the patch goes under them, in their _call
    monkeypatch.setattr(fuzz.MessageMachine, "_call", once)
    monkeypatch.setenv("VHOST_CONFORMANCE_SHRINK_SECONDS", "3")
    made = TargetFactory(profile=load_profile("reference"),
                         rundir=Path(tempfile.mkdtemp(prefix="vcf-", dir="/tmp")))
    try:
        target = made.new("fuzz1")
        assert isinstance(target, CommandTarget)
        target.start()
        rig = Rig(target, made.capabilities(), 5.0)
        try:
            counts = fuzz.run_machine(rig, 40)
        except BackendClosed as exc:
            raised = exc
        else:
            pytest.fail(f"no BackendClosed: GET_FEATURES rules {calls}, counts {counts}")
    finally:
        made.close()
    assert "closed once" in str(raised)
    notes = "\n".join(getattr(raised, "__notes__", []))
    assert "state.get_features()" in notes, notes


def test_status_byte_past_guest_ram_is_a_completion_not_a_suite_error() -> None:
    """A used chain whose status buffer runs past guest RAM (len 64 KiB at the status slot, as
    the fuzzer draws it) has no status byte to read: the outcome is a completion, and the
    suite does not fail with MemoryAccessError (it did once in 1000 examples)."""
    from typing import cast

    from vhost_conformance.frontend.device import Session
    from vhost_conformance.frontend.memory import GuestMemory
    from vhost_conformance.suites.drivers.hostile import (
        SCRATCH_GPA,
        SCRATCH_SIZE,
        WRITE,
        Guest,
        Outcome,
    )
    from vhost_conformance.suites.test_hostile_guest import Desc, _status_outcome

    memory = GuestMemory.create([(0, 1 << 20), (SCRATCH_GPA, SCRATCH_SIZE)])
    try:
        guest = Guest(memory, cast(Session, None), 0)
        past = Shape((Desc("hdr", 16, 0), Desc("status", 0x10000, WRITE)))
        assert _status_outcome(guest, past) == Outcome.COMPLETED
        memory.write(guest.slot("status"), bytes([1]))  # IOERR
        inside = Shape((Desc("hdr", 16, 0), Desc("status", 1, WRITE)))
        assert _status_outcome(guest, inside) == Outcome.IOERR
    finally:
        memory.close()
