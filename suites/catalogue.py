"""The catalogue: the planned cases not written yet, the ids judged not applicable to a
vhost-user-blk back-end (with why), and the view of every case (:func:`all_cases`).

A written case declares its record (id, title, family, level, tier, clause, quote or source,
requirement, ...) at its ``@case`` in the case module (docs/ARCHITECTURE.md "How a case
declares its record"); :func:`all_cases` collects those records and the planned entries.

Ids come from SPEC-DIGEST.md section 10 (``VU-<area>-n``) where a front-end can test the
requirement against a blk back-end, extended for the TEST-IDEAS.md rows (``VU-INF-6..``,
``VU-MIG-3..``, ``VU-DBL-*``, ``VU-SUSP-*``, ``VU-HOST-*``, ``VU-MAL-*``, ``VU-RECON-*``,
``VU-FUZZ-*``, ``VU-BLK-*``). Clauses name sections of docs/interop/vhost-user.rst as shipped
with QEMU 11.1.3 or of VIRTIO 1.3. Requirements are in our words. Where the spec is ambiguous
the ``ambiguity`` note says which reading we chose (QEMU 11.1.3's behaviour).

``vhost-conformance cases`` prints :func:`format_catalogue`.
"""

from __future__ import annotations

from collections.abc import Iterable

from vhost_conformance.reports.model import Level
from vhost_conformance.suites.clauses import RST as RST
from vhost_conformance.suites.clauses import VIRTIO as VIRTIO
from vhost_conformance.suites.model import FAMILIES, Case, sort_key
from vhost_conformance.suites.target import Feature, feature_label


def _c(
    case_id: str,
    title: str,
    family: str,
    level: Level,
    clause: str,
    requirement: str,
    requires: Iterable[Feature] = (),
    ambiguity: str | None = None,
    needs: Iterable[str] = (),
) -> Case:
    return Case(
        case_id, title, family, level, clause, requirement, tuple(requires), ambiguity, tuple(needs)
    )


#: Planned cases not written yet (a written case declares its record at its ``@case``; an id
#: both here and declared at a case is a CatalogueMismatch).
_CASES: list[Case] = []

#: The planned cases, by id.
CATALOGUE: dict[str, Case] = {}
for _case in _CASES:
    if _case.id in CATALOGUE:
        raise ValueError(f"catalogue: {_case.id} listed twice")
    CATALOGUE[_case.id] = _case

#: SPEC-DIGEST section 10 ids that a front-end cannot test against a blk back-end, with why.
NOT_APPLICABLE: dict[str, str] = {
    "VU-FEAT-2": "a front-end obligation (bit 30 hidden from the guest): the back-end never sees the guest",
    "VU-FEAT-7": "a front-end behaviour (QEMU keeps bit 30 in every SET_FEATURES): nothing for a back-end to do",
    "VU-MQ-2": "a front-end obligation (not relying on MQ for fixed-queue devices)",
    "VU-FD-1": "a front-end obligation (fds with the header's first byte); our channel always does it",
    "VU-MEM-1": "a front-end obligation (no overlapping regions); hostile overlaps are VU-MAL-5/VU-HOST-5",
    "VU-MEM-3": "a front-end obligation (no POSTCOPY_* with CONFIGURE_MEM_SLOTS)",
    "VU-RING-6": "a front-end behaviour (when QEMU sends SET_VRING_ENABLE and how it waits); the ack itself is VU-ACK-1",
    "VU-GVB-2": "a front-end obligation (num = 0 in GET_VRING_BASE); every case sends 0",
    "VU-GVB-6": "a front-end behaviour (QEMU's stop sequence); the back-end's side is VU-GVB-11",
    "VU-INF-3": "a front-end behaviour (when QEMU asks for a new region); the back-end's side is VU-INF-12",
    "VU-MIG-1": "the front-end's migration stream (vmstate subsection), which a back-end never sees",
    "VU-MIG-2": "a front-end behaviour on the destination; the back-end's side is VU-MIG-3",
    "VU-CONN-1": "a front-end obligation (closing on a bad reply)",
    "VU-CONN-2": "permission for the back-end (may close in exceptional cases), nothing to fail; closing on bad input is allowed in VU-MAL-*",
    "VU-SHM-1": "VIRTIO Shared Memory Regions: virtio-blk has none, so SHMEM is not for a blk back-end",
    "VU-SHM-2": "VIRTIO Shared Memory Regions: virtio-blk has none, so GET_SHMEM_CONFIG is not for a blk back-end",
}

for _id in NOT_APPLICABLE:
    if _id in CATALOGUE:
        raise ValueError(f"catalogue: {_id} is both a case and not applicable")


def all_cases() -> list[Case]:
    """Every case, in id order: the records declared at the cases (``@case`` with the full
    record) and the catalogue's entries not yet moved there."""
    merged = dict(CATALOGUE)
    merged.update(defined_in_suites())
    return sorted(merged.values(), key=lambda c: sort_key(c.id))


def case_record(entry: Case, implemented: bool = True) -> dict[str, object]:
    """One case as ``vhost-conformance cases --json`` prints it (docs/report-schema.md)."""
    return {
        "id": entry.id,
        "title": entry.title,
        "family": entry.family,
        "tier": entry.tier.value,
        "level": entry.level.value,
        "clause": entry.clause,
        "quote": entry.quote,
        "source": entry.source,
        "requirement": entry.requirement,
        "requires": [feature_label(f) for f in entry.requires],
        "needs": list(entry.needs),
        "ambiguity": entry.ambiguity,
        "implemented": implemented,
    }


def cases_by_family() -> dict[str, list[Case]]:
    """The catalogue grouped by family (families in model.FAMILIES order, ids in id order)."""
    grouped: dict[str, list[Case]] = {family: [] for family in FAMILIES}
    for entry in all_cases():
        grouped[entry.family].append(entry)
    return {family: entries for family, entries in grouped.items() if entries}


def format_catalogue(implemented: Iterable[str] = ()) -> str:
    """The catalogue as text for ``vhost-conformance cases``: one line per case (id, level,
    title, what it needs), grouped by family, then the not-applicable ids with why.

    ``implemented``: ids that have a case function; those lines are marked ``*``.
    """
    done = set(implemented)
    lines: list[str] = []
    for family, entries in cases_by_family().items():
        lines.append(f"{family} ({len(entries)})")
        for entry in entries:
            mark = "*" if entry.id in done else " "
            needs = [feature_label(f).split(" (")[0] for f in entry.requires] + list(entry.needs)
            suffix = f"  [needs {', '.join(needs)}]" if needs else ""
            lines.append(
                f" {mark} {entry.id:<13} {entry.level.value:<6} {entry.tier.value:<11} "
                f"{entry.title}{suffix}"
            )
            lines.append(f"       {entry.clause}")
        lines.append("")
    lines.append(f"not applicable to a blk back-end ({len(NOT_APPLICABLE)})")
    for case_id in sorted(NOT_APPLICABLE, key=sort_key):
        lines.append(f"   {case_id:<13} {NOT_APPLICABLE[case_id]}")
    every = {c.id for c in all_cases()}
    lines.append("")
    lines.append(f"{len(every)} cases, {len(done & every)} implemented (*)")
    return "\n".join(lines) + "\n"


def defined_in_suites() -> dict[str, Case]:
    """The cases defined by ``@case`` in the suite modules (``vhost_conformance.suites.test_*``),
    by id. Raises CatalogueMismatch when two functions claim one id."""
    import importlib
    import pkgutil

    import vhost_conformance.suites as suites_package
    from vhost_conformance.suites.model import defined_cases

    functions: list[object] = []
    for module_info in pkgutil.iter_modules(suites_package.__path__):
        if module_info.name.startswith("test_"):
            module = importlib.import_module(f"vhost_conformance.suites.{module_info.name}")
            functions.extend(vars(module).values())
    return defined_cases(functions)
