"""The case catalogue: complete, consistent, and in step with the suite modules."""

from __future__ import annotations

import re

from vhost_conformance.reports.model import Level
from vhost_conformance.suites.catalogue import (
    CATALOGUE,
    NOT_APPLICABLE,
    all_cases,
    cases_by_family,
    defined_in_suites,
    format_catalogue,
)
from vhost_conformance.suites.model import CASE_ID, FAMILIES

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
    assert len(CATALOGUE) >= 60
    for case_id, case in CATALOGUE.items():
        assert case.id == case_id
        assert CASE_ID.match(case_id), case_id
        assert case.family in FAMILIES
        assert case.requirement.endswith("."), f"{case_id}: the requirement is one sentence"
        assert case.clause.startswith(("vhost-user.rst (QEMU 11.1.3)", "VIRTIO 1.3")), case_id


def test_every_spec_digest_id_is_a_case_or_not_applicable() -> None:
    unplaced = [i for i in SPEC_DIGEST_SECTION_10 if i not in CATALOGUE and i not in NOT_APPLICABLE]
    assert unplaced == []
    assert not set(CATALOGUE) & set(NOT_APPLICABLE)
    assert all(len(why) > 20 for why in NOT_APPLICABLE.values())


def test_test_ideas_rows_have_cases() -> None:
    areas = {case.area for case in CATALOGUE.values()}
    assert areas >= TEST_IDEAS_AREAS
    numbers = {case.area: set() for case in CATALOGUE.values()}  # type: dict[str, set[int]]
    for case in CATALOGUE.values():
        numbers[case.area].add(case.number)
    assert {6, 7, 8, 9, 10} <= numbers["INF"]
    assert {3, 4, 5} <= numbers["MIG"]


def test_levels_and_ambiguity_notes() -> None:
    levels = {case.level for case in CATALOGUE.values()}
    assert {Level.MUST, Level.SHOULD, Level.MAY} <= levels
    # where we chose QEMU 11.1.3's reading, the case says so
    assert CATALOGUE["VU-HDR-2"].ambiguity and "0x5" in CATALOGUE["VU-HDR-2"].ambiguity
    assert CATALOGUE["VU-INF-2"].ambiguity and "24" in CATALOGUE["VU-INF-2"].ambiguity
    assert CATALOGUE["VU-GVB-4"].level is Level.MAY


def test_suite_cases_match_the_catalogue() -> None:
    defined = defined_in_suites()
    assert defined, "the suite modules define cases"
    for case_id, case in defined.items():
        if case_id in CATALOGUE:
            assert CATALOGUE[case_id] == case, case_id
        else:  # the record is declared at the case (suites/model.py): it names its basis
            assert case.quote or case.source, case_id


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
    for case_id in CATALOGUE:
        assert re.search(rf"^ [ *] {re.escape(case_id)}\s", text, re.M), case_id
    for case_id in NOT_APPLICABLE:
        assert case_id in text
    assert re.search(r"^ \* VU-HDR-2\s+MUST\s+conformance\s+Reply flags are exactly 0x5$", text, re.M)
    assert "[needs protocol feature INFLIGHT_SHMFD" in text
    # the catalogue's entries and the records declared at the cases (suites/model.py)
    assert text.rstrip().endswith(f"{len(all_cases())} cases, 1 implemented (*)")
