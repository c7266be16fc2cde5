"""Stop latency (the GET_VRING_BASE round trip) of the reference back-end, drain vs no-drain.

A benchmark, not a test: for each disk latency (``--latency`` of the back-end) and each number
of requests in flight, N 4 KiB reads are made available on one split queue and kicked; once
the back-end has popped them all (it wrote avail_event = avail->idx, EVENT_IDX), the front-end
stops the ring as QEMU 11.1.3 does (SET_VRING_ENABLE 0, then GET_VRING_BASE: timed; the
requests not yet in the used ring when GET_VRING_BASE is sent are reported as "outst.": with a
1 ms disk most finish while SET_VRING_ENABLE 0 is handled). "drain"
is a session that does not negotiate protocol bit 20 (the back-end must finish every request
first: vhost-user.rst GET_VRING_BASE), "no-drain" one that does (the back-end may suspend them
in the in-flight region: SPEC-DIGEST 6.1). After each stop the ring is started again (a
suspended request is resubmitted from the region) and everything is harvested before the next
sample. Prints a table with medians and the drain / no-drain ratio and writes the figures as
JSON.

    .venv/bin/python bench/stop_latency.py [--reps 5] [--json stop-latency.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

from vhost_conformance.frontend.channel import Channel
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.migration import stop_like_qemu
from vhost_conformance.frontend.protocol import ProtocolFeature
from vhost_conformance.frontend.virtqueue import SplitVirtqueue
from vhost_conformance.peers.process import spawn

LATENCIES_MS = (1, 10, 100)
IN_FLIGHT = (1, 32, 128)
MODES = ("drain", "no-drain")
TIMEOUT = 10.0


def wait_popped(vq: SplitVirtqueue, timeout: float = TIMEOUT) -> float:
    """Wait until the device's avail_event reaches the published avail->idx; seconds taken."""
    t0 = time.monotonic()
    while vq.avail_event != vq.published_idx:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"back-end did not pop up to avail idx {vq.published_idx} "
                               f"(avail_event {vq.avail_event})")
        time.sleep(0.0002)
    return time.monotonic() - t0


def sample(s: Session, n: int) -> dict[str, float]:
    """One stop with ``n`` reads in flight; restarts the ring and harvests everything."""
    q = s.queues[0]
    vq = q.vq
    assert isinstance(vq, SplitVirtqueue)
    for i in range(n):
        q.blk.read(i * 8, 8)
    s.submit(0)
    wait_popped(vq)
    at_gvb: list[int] = []
    stop = stop_like_qemu(s, before_get_vring_base=lambda: at_gvb.append(
        (vq.published_idx - vq.used_idx_in_memory()) & 0xFFFF))
    outstanding = at_gvb[0]
    used_at_reply = vq.used_idx_in_memory()
    s.start(vring_bases=stop.vring_bases)
    done = q.blk.complete(s.wait_used(0, n, timeout=TIMEOUT))
    if len(done) != n or any(c.status != 0 for c in done):
        raise RuntimeError(f"{len(done)} of {n} requests completed after the restart "
                           f"(statuses {[c.status for c in done]})")
    return {"gvb_ms": stop.stop_latency * 1e3, "stop_ms": stop.seconds * 1e3,
            "outstanding_at_stop": float(outstanding),
            "completed_during_stop": float((used_at_reply - (vq.published_idx - outstanding))
                                           & 0xFFFF)}


def run_cell(sock: pathlib.Path, mode: str, reps: int) -> dict[int, list[dict[str, float]]]:
    """Samples for every in-flight count, one connection in ``mode``."""
    out: dict[int, list[dict[str, float]]] = {}
    with GuestMemory.simple(16 << 20) as memory:
        s = Session(Channel.connect(sock, timeout=TIMEOUT), memory, timeout=TIMEOUT,
                    inflight_migration=(mode == "no-drain"))
        try:
            s.connect()
            if s.has_protocol(ProtocolFeature.GET_VRING_BASE_INFLIGHT) != (mode == "no-drain"):
                raise RuntimeError(f"{mode}: bit 20 negotiation did not go as asked")
            s.start()
            for n in IN_FLIGHT:
                sample(s, n)  # warm-up
                out[n] = [sample(s, n) for _ in range(reps)]
            s.stop()
        finally:
            s.close()
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the grid, print the table, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="samples per cell (median reported)")
    p.add_argument("--json", default="stop-latency.json", help="where to write the figures")
    args = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vc-stop-bench-") as tmp:
        for latency in LATENCIES_MS:
            sock = pathlib.Path(tmp) / f"ref-{latency}.sock"
            proc = spawn([sys.executable, "-m", "vhost_conformance.backend", "--socket-path",
                          str(sock), "--ram-disk", "64M", "--latency", str(latency)],
                         pathlib.Path(tmp) / f"ref-{latency}.log", name="reference-backend")
            with proc:
                proc.wait_for_socket(sock, TIMEOUT)
                for mode in MODES:
                    for n, samples in run_cell(sock, mode, args.reps).items():
                        gvb = [x["gvb_ms"] for x in samples]
                        rows.append({
                            "backend": "reference", "latency_ms": latency, "in_flight": n,
                            "mode": mode, "samples_gvb_ms": gvb,
                            "median_gvb_ms": statistics.median(gvb),
                            "median_stop_ms": statistics.median(x["stop_ms"] for x in samples),
                            "median_outstanding_at_stop": statistics.median(
                                x["outstanding_at_stop"] for x in samples),
                            "median_completed_during_stop": statistics.median(
                                x["completed_during_stop"] for x in samples),
                        })
    by = {(r["latency_ms"], r["in_flight"], r["mode"]): r for r in rows}
    print("Stop latency = GET_VRING_BASE round trip, reference back-end, split ring, median of "
          f"{args.reps}")
    print(f"{'disk ms':>7} {'in flight':>9} {'outst.':>6} {'drain ms':>9} {'no-drain ms':>11} "
          f"{'drain/no-drain':>14}")
    for latency in LATENCIES_MS:
        for n in IN_FLIGHT:
            d, nd = by[(latency, n, "drain")], by[(latency, n, "no-drain")]
            ratio = d["median_gvb_ms"] / nd["median_gvb_ms"] if nd["median_gvb_ms"] else float("inf")
            print(f"{latency:>7} {n:>9} {d['median_outstanding_at_stop']:>6.0f} "
                  f"{d['median_gvb_ms']:>9.2f} {nd['median_gvb_ms']:>11.2f} {ratio:>14.1f}")
    pathlib.Path(args.json).write_text(json.dumps(
        {"benchmark": "stop-latency", "unit": "ms", "reps": args.reps, "rows": rows},
        indent=2) + "\n")
    print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
