"""The run's report: results of all processes merged (one behaviour, one failure), the
back-end's record (profile, probed capabilities and what QEMU would agree with it), written as
report.json, junit.xml, summary.md and report.html."""

from __future__ import annotations

import datetime
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from vhost_conformance.frontend.channel import Channel
from vhost_conformance.reports.model import BackendInfo, CaseResult, Level, Measurement, Report
from vhost_conformance.suites.model import FAMILIES
from vhost_conformance.suites.options import option
from vhost_conformance.suites.qemu_confirm import confirm as confirm_with_qemu
from vhost_conformance.suites.target import Capabilities, Profile

import vhost_conformance


def assign_see(cases: list[CaseResult]) -> list[CaseResult]:
    """One behaviour, one failure: of the bad results sharing a ``behaviour``, the first (in
    the suite's family order, then case number) owns the failure and the others get ``see`` = its id; the owner
    takes the strongest ``finding_level`` of the group, so a MUST violation a MAY case saw
    first still fails the gate as a MUST."""
    owners: dict[str, int] = {}
    out = list(cases)
    order = {Level.INFO: 0, Level.MAY: 1, Level.SHOULD: 2, Level.MUST: 3}

    def rank(i: int) -> tuple[int, int, int]:
        # the suite's family order (rings before hostile-guest), then the case number
        c = out[i]
        family = FAMILIES.index(c.family) if c.family in FAMILIES else len(FAMILIES)
        number = c.id.rsplit("-", 1)[-1]
        return (family, int(number) if number.isdigit() else 0, i)

    for i in sorted(range(len(out)), key=rank):
        case = out[i]
        if case.behaviour is None or not case.bad:
            continue
        if case.behaviour not in owners:
            owners[case.behaviour] = i
            continue
        owner = out[owners[case.behaviour]]
        levels = [lv for lv in (owner.finding_level, case.finding_level) if lv is not None]
        if case.level is not owner.level and order[case.level] > order[owner.gate_level]:
            levels.append(case.level)
        strongest = max(levels, key=lambda lv: order[lv]) if levels else None
        out[owners[case.behaviour]] = replace(owner, finding_level=strongest)
        out[i] = replace(case, see=owner.id)
    return out


def backend_info(
    name: str, profile: Profile | None, payloads: list[dict[str, Any]]
) -> BackendInfo:
    """report.json's ``backend``: the profile's command and source, the probed capabilities
    (the first payload that has them) and the number of workers."""
    caps = None
    for payload in payloads:
        if payload.get("capabilities"):
            caps = payload["capabilities"]
            break
    command = profile.command if profile is not None else None
    extra: dict[str, Any] = {}
    if profile is not None:
        extra["profile"] = profile.source
    workers = [p.get("worker") for p in payloads if p.get("worker")]
    if workers:
        extra["workers"] = len(workers)
    if caps is None:
        return BackendInfo(name=name, command=command, extra=extra)
    for key in (
        "max_mem_slots",
        "config",
        "negotiated_feature_names",
        "negotiated_protocol_feature_names",
    ):
        if caps.get(key) is not None:
            extra[key] = caps[key]
    return BackendInfo(
        name=name,
        command=command,
        features=caps["features"],
        feature_names=caps["feature_names"],
        protocol_features=caps["protocol_features"],
        protocol_feature_names=caps["protocol_feature_names"],
        negotiated_features=caps.get("negotiated_features"),
        negotiated_protocol_features=caps.get("negotiated_protocol_features"),
        queue_num=caps["queue_num"],
        extra=extra,
    )


def write_report(
    config: pytest.Config,
    report_dir: Path,
    payloads: list[dict[str, Any]],
    *,
    started: float,
    strict: bool,
    backend: BackendInfo,
) -> Path:
    """Merge the payloads of the processes of a run and write the report files into
    ``report_dir`` (``pytest_vhost_report`` may replace the report); the report.json path."""
    cases = [CaseResult.from_dict(c) for p in payloads for c in p.get("results", [])]
    cases.sort(key=lambda c: (c.family, c.id))
    cases = assign_see(cases)
    # per failing emulated case: did real QEMU confirm it (suites/qemu_confirm.py)
    cases = confirm_with_qemu(cases, tier_ran=bool(option(config, "vhost_qemu")))
    report = Report(
        suite_version=vhost_conformance.__version__,
        started=datetime.datetime.fromtimestamp(started, datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        ),
        duration_s=time.time() - started,
        backend=backend,
        cases=cases,
        measurements=[
            Measurement.from_dict(m) for p in payloads for m in p.get("measurements", [])
        ],
        strict=strict,
        argv=list(sys.argv[1:]),
    )
    replaced = config.hook.pytest_vhost_report(config=config, report=report)
    if isinstance(replaced, Report):
        report = replaced
    try:
        from vhost_conformance.reports import write_all
    except ImportError:  # pragma: no cover - renderers missing: the JSON is the truth
        return report.save(report_dir / "report.json")
    return write_all(report, report_dir)["json"]


def qemu_agreement(caps: Capabilities) -> tuple[int, int]:
    """What a QEMU 11.1.3-like session (``frontend.device.Session`` defaults: one split queue,
    EVENT_IDX, INDIRECT, inflight-migration=on) agrees with a back-end offering ``caps``:
    (the virtio features of SET_FEATURES, the protocol features of SET_PROTOCOL_FEATURES).
    The session models a virtio-blk guest: on another device type it acks transport bits only
    (``Session.device_type``), not the blk bit numbers, which mean other features there."""
    import socket as _socket

    from vhost_conformance.frontend.device import Session
    from vhost_conformance.frontend.memory import GuestMemory
    from vhost_conformance.frontend.protocol import VirtioFeature, has
    from vhost_conformance.frontend.sequences import agree_protocol

    protocol = 0
    if has(caps.features, VirtioFeature.PROTOCOL_FEATURES):
        protocol = agree_protocol(caps.protocol_features)  # what Session.connect sends
    ours, theirs = _socket.socketpair()
    theirs.close()
    channel = Channel(ours)
    try:
        session = Session(channel, GuestMemory(), device_type=caps.device_type)
        session.negotiated.features = caps.features
        features = session.driver_features()
    finally:
        channel.close()
    return features, protocol


def capabilities_payload(caps: Capabilities) -> dict[str, Any]:
    """What report.json's ``backend`` says about the probed back-end (JSON-able)."""
    from vhost_conformance.frontend.protocol import (
        ProtocolFeature,
        device_feature_names,
        feature_names,
    )

    features, protocol = qemu_agreement(caps)
    return {
        "features": caps.features,
        "feature_names": caps.feature_names(),
        "protocol_features": caps.protocol_features,
        "protocol_feature_names": caps.protocol_feature_names(),
        "queue_num": caps.queue_num,
        "negotiated_features": features,
        "negotiated_protocol_features": protocol,
        "negotiated_feature_names": device_feature_names(features, caps.device_type),
        "negotiated_protocol_feature_names": feature_names(protocol, ProtocolFeature),
        "max_mem_slots": caps.max_mem_slots,
        "config": config_summary(caps) or None,
    }


def config_summary(caps: Capabilities) -> dict[str, object]:
    """The virtio-blk config fields every layout has (VIRTIO 1.x 5.2.4), from the probe."""
    import struct

    config = caps.config
    if config is None or len(config) < 36:
        return {}
    capacity, size_max, seg_max = struct.unpack_from("<QII", config, 0)
    (blk_size,) = struct.unpack_from("<I", config, 20)
    (num_queues,) = struct.unpack_from("<H", config, 34)
    return {
        "config_len": len(config),
        "capacity_sectors": capacity,
        "size_max": size_max,
        "seg_max": seg_max,
        "blk_size": blk_size,
        "num_queues": num_queues,
    }
