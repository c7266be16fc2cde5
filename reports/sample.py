"""A synthetic report with every verdict, for the renderers' tests and for previews.

``python -m vhost_conformance.reports.sample OUTDIR`` writes its renderings to OUTDIR. The
values are made up (clauses and ids are real ones from SPEC-DIGEST section 10); nothing
here is a measurement of any back-end.
"""

from __future__ import annotations

import sys

from vhost_conformance.reports.model import (
    BackendInfo,
    CaseResult,
    Level,
    Measurement,
    Report,
    Verdict,
)

HOSTILE = (
    '<script>alert("x")</script> & </details></td></tr><img src=x onerror=alert(1)> \x00\x1b[31m'
)

# A failing GET_VRING_BASE exchange, in the shape frontend/channel.py's
# WireTrace.to_json() gives (time is time.monotonic(); the renderers show it relative).
FAILING_TRACE: list[dict[str, object]] = [
    {"time": 1000.0001, "direction": "fe->be", "channel": "main", "request": 1,
     "name": "GET_FEATURES", "flags": "0x1", "size": 0, "nfds": 0, "payload": None},
    {"time": 1000.0003, "direction": "be->fe", "channel": "main", "request": 1,
     "name": "GET_FEATURES", "flags": "0x5", "size": 8, "nfds": 0,
     "payload": {"u64": 0x140000000}},
    {"time": 1000.0102, "direction": "fe->be", "channel": "main", "request": 11,
     "name": "GET_VRING_BASE", "flags": "0x1", "size": 8, "nfds": 0,
     "payload": {"index": 0, "num": 0}},
    {"time": 1000.0110, "direction": "be->fe", "channel": "main", "request": 11,
     "name": "GET_VRING_BASE", "flags": "0x5", "size": 8, "nfds": 0,
     "payload": {"index": 0, "num": 0},
     "note": "num 0, expected last_avail_idx 7 " + HOSTILE},
]  # fmt: skip


def _case(
    case_id: str,
    verdict: Verdict,
    *,
    family: str,
    level: Level = Level.MUST,
    reason: str = "",
    **kw: object,
) -> CaseResult:
    return CaseResult(
        id=case_id,
        title=f"{case_id} synthetic case",
        family=family,
        level=level,
        clause='vhost-user.rst "GET_VRING_BASE"' if "GVB" in case_id else "vhost-user.rst",
        requirement=f"Requirement text of {case_id}.",
        verdict=verdict,
        reason=reason,
        duration_s=0.25,
        **kw,  # type: ignore[arg-type]
    )


def sample_report(backend_name: str = "reference", *, strict: bool = False) -> Report:
    """A report with each verdict at least once, a failing MUST with a wire trace, a case
    with hostile text, and stop-latency / downtime measurements for the plots."""
    cases = [
        _case("VU-HDR-1", Verdict.PASS, family="handshake"),
        _case("VU-HDR-2", Verdict.PASS, family="handshake"),
        _case(
            "VU-GVB-1",
            Verdict.FAIL,
            family="stop",
            reason="GET_VRING_BASE.num was 0, expected last_avail_idx 7",
            trace=FAILING_TRACE,
            parameters={"ring": "split", "queue_size": 128},
            measurements={"reply_ms": 0.8},
        ),
        _case("VU-GVB-3", Verdict.PASS, family="stop", parameters={"ring": "packed"}),
        _case(
            "VU-FD-1",
            Verdict.NON_STRICT,
            family="handshake",
            level=Level.SHOULD,
            reason="fds arrived with a later byte of the message",
        ),
        _case(
            "VU-INF-5",
            Verdict.UNSUPPORTED,
            family="inflight",
            reason="back-end does not offer INFLIGHT_SHMFD (protocol bit 12)",
        ),
        _case("VU-MIG-1", Verdict.SKIP, family="migration", reason="qemu-11.1 not installed"),
        _case(
            "VU-ACK-1",
            Verdict.HANG,
            family="handshake",
            reason="no reply to SET_LOG_BASE within 5.0 s",
            trace=FAILING_TRACE[:1],
        ),
        _case(
            "VU-RING-2",
            Verdict.CRASH,
            family="rings",
            reason="back-end exited with signal 11 (SIGSEGV)",
            log_tail="vring 0: desc 4096 out of range\nSegmentation fault " + HOSTILE,
            exit_status=-11,
            rerun="vhost-conformance run --backend reference --case VU-RING-2 -n 0",
        ),
        _case(
            "VU-MAL-2",
            Verdict.DISCONNECT,
            family="malformed",
            reason="the back-end closed the connection on an oversized header; allowed here",
            allowed=True,
        ),
        _case(
            "VU-RST-1",
            Verdict.DISCONNECT,
            family="reconnect",
            level=Level.SHOULD,
            reason="the back-end closed the connection after a valid SET_VRING_ADDR",
        ),
        _case(
            "VU-FUZZ-1",
            Verdict.FLAKY,
            family="fuzz",
            level=Level.SHOULD,
            reason="did not reproduce on a fresh back-end: seed 1234, sequence [...]",
        ),
        _case(
            "VU-GVB-4",
            Verdict.FAIL,
            family="stop",
            level=Level.MAY,
            reason="GET_VRING_BASE answered 0 on a stopped ring",
            see="VU-GVB-1",
            behaviour="gvb-stopped-ring-0",
        ),
        _case("VU-MEM-2", Verdict.ERROR, family="memory", reason="suite: memfd_create failed"),
        _case(
            "VU-SVB-1",
            Verdict.XFAIL,
            family="stop",
            reason="used idx read from SET_VRING_BASE",
            deviation="known issue #12, fixed in 2.0",
        ),
        _case("VU-RST-2", Verdict.XPASS, family="reconnect", deviation="was broken before 1.4"),
        _case("VU-CFG-1", Verdict.FAIL, family="config", level=Level.MUST, reason=HOSTILE),
        _case("VU-LOG-1", Verdict.PASS, family="migration", level=Level.MAY),
        _case("VU-GVB-6", Verdict.PASS, family="stop", level=Level.INFO),
    ]
    measurements = []
    for inflight in (16, 64):
        for disk_ms in (0.0, 5.0, 20.0, 50.0):
            for mode in ("drain", "no-drain"):
                value = (
                    disk_ms * (1.0 + inflight / 64) + 0.4
                    if mode == "drain"
                    else 0.3 + 0.01 * inflight
                )
                measurements.append(
                    Measurement(
                        "stop_latency_ms",
                        "ms",
                        round(value, 3),
                        {"mode": mode, "disk_latency_ms": disk_ms, "inflight": inflight},
                    )
                )
    measurements += [
        Measurement("migration_downtime_ms", "ms", 41.5, {"mode": "drain", "inflight": 64}),
        Measurement("migration_downtime_ms", "ms", 12.25, {"mode": "no-drain", "inflight": 64}),
        Measurement("iops", "1/s", 48000.0, {"block_size": 4096, "queue_depth": 32}),
    ]
    return Report(
        suite_version="0.1.0",
        started="2026-11-26T06:00:00Z",
        duration_s=12.5,
        backend=BackendInfo(
            name=backend_name,
            command="vhost-conformance-backend --socket {socket} --disk {disk}",
            features=(1 << 1) | (1 << 9) | (1 << 30) | (1 << 32),
            feature_names=[
                "VIRTIO_BLK_F_SIZE_MAX",
                "VIRTIO_BLK_F_FLUSH",
                "VHOST_USER_F_PROTOCOL_FEATURES",
                "VIRTIO_F_VERSION_1",
            ],
            protocol_features=(1 << 0) | (1 << 3) | (1 << 9) | (1 << 12) | (1 << 20),
            protocol_feature_names=[
                "MQ",
                "REPLY_ACK",
                "CONFIG",
                "INFLIGHT_SHMFD",
                "GET_VRING_BASE_INFLIGHT",
            ],
            negotiated_features=(1 << 30) | (1 << 32),
            negotiated_protocol_features=(1 << 3) | (1 << 12) | (1 << 20),
            queue_num=2,
            extra={"pid": 4242},
        ),
        cases=cases,
        measurements=measurements,
        strict=strict,
        argv=["vhost-conformance", "run", "--backend", backend_name],
    )


def main(argv: list[str] | None = None) -> int:
    """Write the sample report's renderings to the directory given as the one argument."""
    from vhost_conformance.reports import write_all

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m vhost_conformance.reports.sample OUTDIR", file=sys.stderr)
        return 2
    for kind, path in write_all(sample_report(), args[0]).items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
