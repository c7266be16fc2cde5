"""Findings held against real QEMU (issue 11 item 4): which VU-QEMU case reproduces the
scenario of an emulated case, and, per failing emulated case of a run, whether real QEMU
11.1.3 confirmed the finding.

:data:`QEMU_REPRODUCES` is the one table (kept here, not in the case modules): emulated case
id -> (the VU-QEMU case whose scenario reaches the same behaviour, why). A VU-QEMU spec is a
case id, optionally with parameters, ``VU-QEMU-7[inflight=off]``; without parameters every
result of that case counts. Only scenarios QEMU 11.1.3 really drives are listed: a case whose
scenario QEMU never produces (a hostile guest, a malformed message, a feature QEMU does not
negotiate) is ``not reachable``.

:func:`confirm` fills each failing emulated result's ``qemu_case`` and ``qemu_confirmed``:

- ``yes``: the VU-QEMU case failed too (fail, hang, crash or a disconnect not allowed);
- ``no``: it passed (QEMU's scenario did not trip over the finding);
- ``not reachable``: no VU-QEMU case reaches the scenario, or it could not run on this
  back-end (unsupported, skip) or could not judge (error: a suite defect, not a verdict);
- ``not run``: the run did not include the qemu tier (``run --qemu``), or not that case.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import replace

from vhost_conformance.reports.model import CaseResult, Verdict

#: emulated case id -> (VU-QEMU case spec, why its scenario reaches the emulated one's)
QEMU_REPRODUCES: dict[str, tuple[str, str]] = {
    # every reply QEMU receives is judged by the emulated channel's validator (the proxy)
    "VU-HDR-1": ("VU-QEMU-1", "every reply to QEMU's start-up goes through the reply validator"),
    "VU-HDR-2": ("VU-QEMU-1", "every reply to QEMU's start-up goes through the reply validator"),
    "VU-HDR-3": ("VU-QEMU-1", "every reply to QEMU's start-up goes through the reply validator"),
    "VU-ACK-1": ("VU-QEMU-1", "QEMU sets NEED_REPLY on its memory-table and in-flight messages"),
    "VU-CFG-1": ("VU-QEMU-1", "QEMU reads the config space (GET_CONFIG) at realize"),
    "VU-FEAT-10": ("VU-QEMU-1", "QEMU's virtio-blk device needs VERSION_1"),
    "VU-INF-1": ("VU-QEMU-1", "QEMU asks for the in-flight region (GET_INFLIGHT_FD) at start"),
    "VU-INF-2": ("VU-QEMU-1", "QEMU hands the region back (SET_INFLIGHT_FD) at start"),
    "VU-MEM-7": ("VU-QEMU-1", "QEMU 11.1.3 sends its memory table as ADD_MEM_REG"),
    "VU-GVB-11": ("VU-QEMU-1", "QEMU stops the ring at power-off in its own order"),
    # the guest's I/O
    "VU-BLK-1": ("VU-QEMU-1", "the guest writes, reads back with O_DIRECT and compares"),
    "VU-RING-5": ("VU-QEMU-1", "QEMU starts the ring with SET_VRING_KICK, then the guest kicks"),
    "VU-RING-10": ("VU-QEMU-1", "the Linux guest negotiates EVENT_IDX and waits for its used event"),
    "VU-RING-11": ("VU-QEMU-1", "the Linux guest's virtio-blk uses indirect descriptors"),
    "VU-RING-9": ("VU-QEMU-2", "the same guest I/O on a packed ring (packed=on)"),
    "VU-MQ-1": ("VU-QEMU-3", "QEMU refuses num-queues above GET_QUEUE_NUM"),
    "VU-BLK-9": ("VU-QEMU-3", "two queues, one per vCPU, both serving the guest"),
    # stop and start on one connection (QMP stop/cont)
    "VU-GVB-1": ("VU-QEMU-4", "cont restarts the ring at the base GET_VRING_BASE returned"),
    "VU-GVB-8": ("VU-QEMU-4", "QEMU stops and restarts the ring on the same connection"),
    "VU-SVB-1": ("VU-QEMU-4", "cont sets the base again (SET_VRING_BASE) after the stop"),
    "VU-DBL-1": ("VU-QEMU-4", "a request completed twice across stop/cont corrupts the guest's I/O"),
    # reset
    "VU-RST-2": ("VU-QEMU-5", "system_reset resets the device (RESET_DEVICE) and boots again"),
    # kill and reconnect
    "VU-RECON-2": ("VU-QEMU-6", "QEMU reconnects (reconnect-ms) and restarts at used->idx"),
    "VU-DBL-3": ("VU-QEMU-6", "the guest's requests in flight at the kill complete once"),
    "VU-INF-5": ("VU-QEMU-6", "the restarted back-end resubmits what the region marks in flight"),
    "VU-INF-8": ("VU-QEMU-6", "the restarted back-end resubmits what the region marks in flight"),
    "VU-INF-12": ("VU-QEMU-6", "QEMU hands the same region to the restarted back-end"),
    # live migration
    "VU-GVB-3": ("VU-QEMU-7[inflight=off]", "requests in flight at the switch-over, drained"),
    "VU-MIG-5": ("VU-QEMU-7[inflight=off]", "a drain migration with requests in flight"),
    "VU-MIG-7": ("VU-QEMU-7", "QEMU 11.1.3's own migration sequence"),
    "VU-LOG-1": ("VU-QEMU-7", "the destination's guest needs the used ring the log made QEMU copy"),
    "VU-MIG-3": ("VU-QEMU-7[inflight=on]", "the destination resubmits the migrated region"),
    "VU-DBL-2": ("VU-QEMU-7[inflight=on]", "requests suspended at the switch-over complete once"),
    "VU-GVB-4": ("VU-QEMU-7[inflight=on]", "with bit 20 the source suspends its requests"),
    # migration to a file: the region in the stream
    "VU-MIG-4": ("VU-QEMU-8", "QEMU carries the source's region in the stream; it is validated"),
    "VU-INF-4": ("VU-QEMU-8", "the region in the stream is checked by the region validator"),
    "VU-INF-6": ("VU-QEMU-8", "the region in the stream is checked by the region validator"),
}

#: The values of ``qemu_confirmed``.
YES, NO, NOT_REACHABLE, NOT_RUN = "yes", "no", "not reachable", "not run"

#: Verdicts of an emulated case that are a finding to confirm.
FINDINGS = frozenset({Verdict.FAIL, Verdict.NON_STRICT, Verdict.HANG, Verdict.CRASH,
                      Verdict.DISCONNECT, Verdict.FLAKY, Verdict.XFAIL})  # fmt: skip
#: Verdicts of a VU-QEMU case that confirm (a disconnect only when not allowed).
_CONFIRMING = frozenset({Verdict.FAIL, Verdict.HANG, Verdict.CRASH, Verdict.DISCONNECT,
                         Verdict.XFAIL})  # fmt: skip

_SPEC = re.compile(r"^(VU-QEMU-\d+)(?:\[([^\]]*)\])?$")

QEMU_FAMILY = "qemu"


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``VU-QEMU-7[inflight=off]`` -> (``VU-QEMU-7``, {``inflight``: ``off``})."""
    match = _SPEC.match(spec)
    if match is None:
        raise ValueError(f"not a VU-QEMU case spec: {spec!r}")
    params: dict[str, str] = {}
    for part in filter(None, (match.group(2) or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{spec!r}: parameter {part!r} is not key=value")
        params[key.strip()] = value.strip()
    return match.group(1), params


def is_finding(case: CaseResult) -> bool:
    """A failing emulated result (the qemu tier's own cases are never confirmed)."""
    if case.family == QEMU_FAMILY or case.verdict not in FINDINGS:
        return False
    return not (case.verdict is Verdict.DISCONNECT and case.allowed)


def _matching(spec: str, results: Sequence[CaseResult]) -> list[CaseResult]:
    case_id, params = parse_spec(spec)
    return [r for r in results if r.id == case_id
            and all(str(r.parameters.get(k)) == v for k, v in params.items())]  # fmt: skip


def _confirms(result: CaseResult) -> bool:
    if result.verdict is Verdict.DISCONNECT and result.allowed:
        return False
    return result.verdict in _CONFIRMING


def judge(spec: str | None, qemu_results: Sequence[CaseResult], tier_ran: bool) -> str:
    """What the VU-QEMU results say about a finding whose scenario ``spec`` reaches."""
    if not tier_ran:
        return NOT_RUN
    if spec is None:
        return NOT_REACHABLE
    found = _matching(spec, qemu_results)
    if not found:
        return NOT_RUN
    if any(_confirms(r) for r in found):
        return YES
    if any(r.verdict in (Verdict.PASS, Verdict.XPASS) for r in found):
        return NO
    return NOT_REACHABLE


def confirm(cases: Iterable[CaseResult], tier_ran: bool) -> list[CaseResult]:
    """``cases`` with ``qemu_case`` and ``qemu_confirmed`` set on each failing emulated
    result; ``tier_ran``: the run included the qemu tier (``--vhost-qemu``, or VU-QEMU cases
    selected by id)."""
    out = list(cases)
    qemu_results = [c for c in out if c.family == QEMU_FAMILY]
    tier_ran = tier_ran or bool(qemu_results)
    for i, case in enumerate(out):
        if not is_finding(case):
            continue
        spec = QEMU_REPRODUCES.get(case.id, (None, ""))[0]
        out[i] = replace(case, qemu_case=spec,
                         qemu_confirmed=judge(spec, qemu_results, tier_ran))  # fmt: skip
    return out
