"""The case catalogue: complete, consistent, and in step with the suite modules."""

from __future__ import annotations

import re

from vhost_conformance.reports.model import Level
from vhost_conformance.suites import catalogue
from vhost_conformance.suites.catalogue import (
    NOT_APPLICABLE,
    all_cases,
    cases_by_family,
    defined_in_suites,
    format_catalogue,
)
from vhost_conformance.suites.model import CASE_ID, FAMILIES

#: Every case: the records declared at the cases and the planned entries of the catalogue.
ALL = {c.id: c for c in all_cases()}

# SPEC-DIGEST.md section 10, every id of its table (copied here so the test stands alone).
SPEC_DIGEST_SECTION_10 = [
    "VU-HDR-1",
    "VU-HDR-2",
    "VU-HDR-3",
    "VU-HDR-4",
    "VU-ACK-1",
    "VU-ACK-2",
    "VU-FD-1",
    "VU-FD-2",
    "VU-FD-3",
    "VU-FD-4",
    "VU-FEAT-1",
    "VU-FEAT-2",
    "VU-FEAT-3",
    "VU-FEAT-4",
    "VU-FEAT-5",
    "VU-FEAT-6",
    "VU-FEAT-7",
    "VU-MQ-1",
    "VU-MQ-2",
    "VU-RING-1",
    "VU-RING-2",
    "VU-RING-3",
    "VU-RING-4",
    "VU-RING-5",
    "VU-RING-6",
    "VU-GVB-1",
    "VU-GVB-2",
    "VU-GVB-3",
    "VU-GVB-4",
    "VU-GVB-5",
    "VU-GVB-6",
    "VU-GVB-7",
    "VU-SVB-1",
    "VU-MEM-1",
    "VU-MEM-2",
    "VU-MEM-3",
    "VU-LOG-1",
    "VU-LOG-2",
    "VU-INF-1",
    "VU-INF-2",
    "VU-INF-3",
    "VU-INF-4",
    "VU-INF-5",
    "VU-CFG-1",
    "VU-CFG-2",
    "VU-DS-1",
    "VU-DS-2",
    "VU-SHM-1",
    "VU-SHM-2",
    "VU-MIG-1",
    "VU-MIG-2",
    "VU-RST-1",
    "VU-RST-2",
    "VU-CONN-1",
    "VU-CONN-2",
    "VU-BACKEND-1",
]

# Areas the TEST-IDEAS.md rows were mapped to.
TEST_IDEAS_AREAS = {"DBL", "SUSP", "HOST", "MAL", "RECON", "FUZZ"}


def test_catalogue_is_large_and_ids_are_well_formed() -> None:
    assert len(ALL) >= 60
    for case_id, case in ALL.items():
        assert case.id == case_id
        assert CASE_ID.match(case_id), case_id
        assert case.family in FAMILIES
        assert case.requirement.endswith("."), f"{case_id}: the requirement is one sentence"
        if case.clause.startswith("vhost-user.rst (post-11.1 proposal)"):
            # the qemu-next cases (suites/test_skip_drain.py): not 11.1.3 text, so interop
            # with the proposal cited as their source
            assert case.tier.value == "interop" and case.source, case_id
            continue
        assert case.clause.startswith(("vhost-user.rst (QEMU 11.1.3)", "VIRTIO 1.3")), case_id


def test_every_spec_digest_id_is_a_case_or_not_applicable() -> None:
    unplaced = [i for i in SPEC_DIGEST_SECTION_10 if i not in ALL and i not in NOT_APPLICABLE]
    assert unplaced == []
    assert not set(ALL) & set(NOT_APPLICABLE)
    assert all(len(why) > 20 for why in NOT_APPLICABLE.values())


def test_test_ideas_rows_have_cases() -> None:
    areas = {case.area for case in ALL.values()}
    assert areas >= TEST_IDEAS_AREAS
    numbers = {case.area: set() for case in ALL.values()}  # type: dict[str, set[int]]
    for case in ALL.values():
        numbers[case.area].add(case.number)
    assert {6, 7, 8, 9, 10} <= numbers["INF"]
    assert {3, 4, 5} <= numbers["MIG"]


def test_levels_and_ambiguity_notes() -> None:
    levels = {case.level for case in ALL.values()}
    assert {Level.MUST, Level.SHOULD, Level.MAY} <= levels
    # where we chose QEMU 11.1.3's reading, the case says so
    assert ALL["VU-HDR-2"].ambiguity and "0x5" in ALL["VU-HDR-2"].ambiguity
    assert ALL["VU-INF-2"].ambiguity and "24" in ALL["VU-INF-2"].ambiguity
    assert ALL["VU-GVB-4"].level is Level.MAY


def test_suite_cases_match_the_catalogue() -> None:
    # one source of truth per case: a written case declares its record at its @case, the
    # catalogue lists only planned ids (none of them written) and not-applicable ones
    defined = defined_in_suites()
    assert defined, "the suite modules define cases"
    assert not set(catalogue.CATALOGUE) & set(defined), "written cases left in the catalogue"
    assert not set(defined) & set(NOT_APPLICABLE)
    for case_id, case in defined.items():
        assert case.quote or case.source or case.tier.value == "robustness", case_id


def test_every_collected_case_has_a_record() -> None:
    # a test function carrying the vhost_case marker (bare or through @case) has a record,
    # and no two functions claim one id (defined_cases raises on a duplicate)
    import importlib
    import pkgutil

    import vhost_conformance.suites as suites_package
    from vhost_conformance.suites.model import MARKER, case_of

    seen: dict[str, str] = {}
    for info in pkgutil.iter_modules(suites_package.__path__):
        if not info.name.startswith("test_"):
            continue
        module = importlib.import_module(f"vhost_conformance.suites.{info.name}")
        for name, obj in vars(module).items():
            marks = [m for m in getattr(obj, "pytestmark", []) if m.name == MARKER]
            if not marks or getattr(obj, "__module__", None) != module.__name__:
                continue
            meta = case_of(obj)
            assert meta is not None, f"{info.name}.{name} is marked but has no record"
            assert meta.id not in seen, f"{meta.id}: {seen.get(meta.id)} and {name}"
            seen[meta.id] = name
    assert set(seen) == set(defined_in_suites())


def test_tiers_and_bases() -> None:
    # conformance: a quote at the quote's level; interop: a cited source; robustness: the
    # hostile-input families (and the few cases of other families that test hostile input)
    tiers = {c.tier.value for c in ALL.values()}
    assert tiers == {"conformance", "interop", "robustness"}
    for case in ALL.values():
        if case.tier.value == "conformance":
            assert case.quote, f"{case.id}: a conformance case quotes its sentence"
        if case.tier.value == "interop":
            assert case.source, f"{case.id}: an interop case cites QEMU's behaviour"
    assert ALL["VU-MAL-1"].tier.value == "robustness"
    assert ALL["VU-FEAT-5"].tier.value == "interop"
    assert ALL["VU-MAL-6"].leak


def _claimed_complete_families() -> dict[str, str]:
    import importlib
    import pkgutil

    import vhost_conformance.suites as suites_package

    claimed: dict[str, str] = {}
    for info in pkgutil.iter_modules(suites_package.__path__):
        if info.name.startswith("test_"):
            module = importlib.import_module(f"vhost_conformance.suites.{info.name}")
            for family in getattr(module, "COMPLETE_FAMILIES", ()):
                claimed[family] = info.name
    return claimed


def test_families_claimed_complete_are_written_completely() -> None:
    # "and vice versa": a suite module that claims a family (COMPLETE_FAMILIES) defines every
    # catalogued case of it; families still being written make no claim yet.
    defined = defined_in_suites()
    claimed = _claimed_complete_families()
    assert {"handshake", "config", "program"} <= set(claimed)
    grouped = cases_by_family()
    for family, module in claimed.items():
        missing = [c.id for c in grouped[family] if c.id not in defined]
        assert missing == [], f"family {family} (claimed by {module}): catalogued but not written"


def test_format_catalogue_lists_everything() -> None:
    text = format_catalogue(["VU-HDR-2"])
    for case_id in ALL:
        assert re.search(rf"^ [ *] {re.escape(case_id)}\s", text, re.M), case_id
    for case_id in NOT_APPLICABLE:
        assert case_id in text
    assert re.search(r"^ \* VU-HDR-2\s+MUST\s+conformance\s+Reply flags are exactly 0x5$", text, re.M)
    assert "[needs protocol feature INFLIGHT_SHMFD" in text
    # the catalogue's entries and the records declared at the cases (suites/model.py)
    assert text.rstrip().endswith(f"{len(all_cases())} cases, 1 implemented (*)")
