"""VU-FUZZ-4's checks (suites/test_inflight_bounds.py): each rule fails on a region that
breaks it (regions built by frontend/inflight.py), and one example runs clean against the
reference back-end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from vhost_conformance.frontend.inflight import InflightRegion, build_split_region, parse_region
from vhost_conformance.suites import test_inflight_bounds as fb
from vhost_conformance.suites.model import CaseFailed
from vhost_conformance.suites.target import CommandTarget, TargetFactory, load_profile

QS = 8


def _session(used_idx: int = 0) -> Any:
    vq = SimpleNamespace(used_idx=used_idx)
    return SimpleNamespace(num_queues=1, queue_size=QS, packed=False,
                           queues=[SimpleNamespace(vq=vq)])


def _region(entries: dict[int, tuple[int, int, int]], used_idx: int = 0) -> InflightRegion:
    data = build_split_region(QS, 1, entries={0: entries}, used_idx=used_idx)
    return parse_region(data, num_queues=1, queue_size=QS, packed=False)


def _request(tag: int, head: int) -> Any:
    return SimpleNamespace(tag=tag, head=head)


def test_counter_changing_while_in_flight_fails() -> None:
    run = fb.Run(_session())
    r = _request(1, 0)
    run._counters(_region({0: (1, 7, 0)}), {0: r}, "first look")
    run._counters(_region({0: (1, 7, 0)}), {0: r}, "same counter")
    with pytest.raises(CaseFailed, match=r"desc\[0\].counter of request 1 changed.*"
                       "expected 7, seen 9"):
        run._counters(_region({0: (1, 9, 0)}), {0: r}, "second look")


def test_counters_out_of_avail_order_fail() -> None:
    run = fb.Run(_session())
    run.order = {10: 0, 11: 1, 12: 2}
    run.counters = {10: 1, 11: 2, 12: 3}
    run.check_counter_order("increasing")
    run.counters = {10: 1, 11: 5, 12: 3}
    with pytest.raises(CaseFailed, match=r"strictly increasing.*request 11: counter 5"):
        run.check_counter_order("across the example")


def test_mark_on_a_head_never_submitted_is_a_finding() -> None:
    run = fb.Run(_session())
    assert run._mid_flight_findings(_region({})) == []
    findings = run._mid_flight_findings(_region({3: (1, 1, 0)}))
    assert [f.rule for f in findings] == ["must-not-be-inflight"]
    assert "never submitted" in findings[0].expected
    with pytest.raises(CaseFailed, match=r"1 finding\(s\) in the in-flight region"):
        run._fail_on(findings, "look")


def test_steps_strategy_draws_bounded_batches() -> None:
    from hypothesis import given, settings

    @settings(max_examples=30, database=None, deadline=None)
    @given(fb.steps())
    def check(sequence: tuple[fb.Step, ...]) -> None:
        assert 1 <= len(sequence) <= 6
        for step in sequence:
            assert 1 <= len(step.kinds) <= fb.MAX_BATCH
            assert set(step.kinds) <= {"read", "write"}

    check()


@pytest.fixture
def reference(tmp_path: Path) -> Iterator[CommandTarget]:
    made = TargetFactory(profile=load_profile("reference"), rundir=tmp_path / "run")
    try:
        target = made.new("bounds")
        assert isinstance(target, CommandTarget)
        target.start()
        yield target
    finally:
        made.close()


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_one_example_passes_on_the_reference(reference: CommandTarget, layout: str) -> None:
    sequence = (fb.Step(("write",) * 20, 0), fb.Step(("read", "write") * 12, 1),
                fb.Step(("read",), 5))
    seen = fb.run_example(reference, 5.0, layout, sequence)
    assert seen >= 0
    assert reference.alive()
