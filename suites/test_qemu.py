"""The ``qemu`` tier (VU-QEMU-*): real QEMU 11.1.3 (Debian 13 root, TCG) as the front-end of
the back-end under test, the tiny guest writing, reading back and comparing on the
vhost-user-blk disk (suites/drivers/qemu.py). Run only when asked (``vhost-conformance run
--qemu``, pytest ``--vhost-qemu``): each case boots a guest (~10 s under TCG).

Every case goes through the recording proxy (frontend/proxy.py): its trace is the case's wire
trace in the report, and each back-end reply QEMU received is judged by the validator the
emulated cases use (frontend/channel.validate_reply); a reply it rejects fails the case even
when QEMU carried on. What a case asserts about QEMU's own messages is a check of the
scenario (an ``error`` if QEMU did not do what the scenario needs), not of the back-end.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from collections.abc import Callable

import pytest
from vhost_conformance.frontend.inflight import parse_region, validate_region
from vhost_conformance.frontend.protocol import BlkFeature as B
from vhost_conformance.frontend.protocol import ProtocolFeature as P
from vhost_conformance.frontend.protocol import VirtioFeature as V
from vhost_conformance.frontend.proxy import ProxyError
from vhost_conformance.frontend.vmstate import (
    extract_device_section,
    find_inflight_subsection,
    read_stream,
)
from vhost_conformance.peers.qemu import QMPFailure
from vhost_conformance.reports.model import Tier
from vhost_conformance.suites.drivers import MakeTarget
from vhost_conformance.suites.drivers.migration import destination_target
from vhost_conformance.suites.drivers.qemu import (
    check_fidelity,
    compare_traces,
    emulated_migration,
    guest_deadline,
    qemu_run,
    qmp,
    settle,
    settled_trace,
    slow_same_disk,
    switchover_latency_ms,
    wait_iteration,
)
from vhost_conformance.suites.model import MUST, CaseFailed, Unsupported, case
from vhost_conformance.suites.target import BackendTarget, Capabilities, CommandTarget


@case(
    "VU-QEMU-1", title="QEMU 11.1.3 guest I/O on a split ring", family="qemu", level=MUST,
    tier=Tier.INTEROP,
    clause="VIRTIO 1.3 5.2 Block Device; vhost-user.rst (QEMU 11.1.3) Starting and stopping rings",
    source="QEMU-TRACES.md (a); hw/block/vhost-user-blk.c vhost_user_blk_start/stop",
    requirement="Under real QEMU 11.1.3 the guest's writes read back identical with O_DIRECT, "
        "QEMU powers off cleanly, and every reply QEMU receives passes the reply validator.",
)
def test_qemu_split_io(request: pytest.FixtureRequest, vhost_target: BackendTarget,
                       vhost_target_factory: MakeTarget,
                       vhost_measurements: dict[str, float]) -> None:  # fmt: skip
    """QEMU 11.1.3 boots the guest on a split ring: 16 blocks written, read back with O_DIRECT
    and compared; QEMU powers off cleanly (GET_VRING_BASE at the stop)."""
    with qemu_run(request, vhost_target) as run:
        result = run.expect_pass()
        if "GET_VRING_BASE" not in run.names():
            raise RuntimeError("QEMU powered off without stopping the ring (no GET_VRING_BASE)")
        # fidelity: the emulation's connect, start, I/O, stop against QEMU's on this back-end
        check_fidelity(run, vhost_target_factory, "boot", vhost_measurements)
    vhost_measurements["guest_seconds"] = round(result.seconds, 2)


@case(
    "VU-QEMU-2", title="QEMU 11.1.3 guest I/O on a packed ring", family="qemu", level=MUST,
    tier=Tier.INTEROP, clause="VIRTIO 1.3 2.8 Packed Virtqueues",
    source="QEMU-TRACES.md (b); hw/virtio/vhost.c vhost_virtqueue_start (packed base)",
    requirement="With packed=on the guest's writes read back identical under real QEMU 11.1.3.",
    requires=[V.RING_PACKED],
)
def test_qemu_packed_io(request: pytest.FixtureRequest, vhost_target: BackendTarget,
                        vhost_measurements: dict[str, float]) -> None:  # fmt: skip
    """The same guest I/O on a packed ring (``packed=on``; only where RING_PACKED is offered)."""
    with qemu_run(request, vhost_target, packed=True) as run:
        result = run.expect_pass()
    vhost_measurements["guest_seconds"] = round(result.seconds, 2)


@case(
    "VU-QEMU-3", title="QEMU 11.1.3 guest I/O on two queues", family="qemu", level=MUST,
    tier=Tier.INTEROP, clause="vhost-user.rst (QEMU 11.1.3) Multiple queue support",
    source="QEMU-TRACES.md (c); hw/block/vhost-user-blk.c num-queues",
    requirement="With num-queues=2 and two vCPUs both vrings serve the guest's I/O correctly "
        "under real QEMU 11.1.3.",
    requires=[B.MQ, P.MQ],
)
def test_qemu_two_queues(request: pytest.FixtureRequest, vhost_target: BackendTarget,
                         vhost_capabilities: Capabilities,
                         vhost_measurements: dict[str, float]) -> None:  # fmt: skip
    """``num-queues=2`` with ``-smp 2`` (Linux maps a queue per CPU, so QEMU starts both
    vrings); where the back-end offers MQ and GET_QUEUE_NUM says 2 or more, or its profile
    can run it with 2 (``queues_args``: the reference back-end's ``--queues 2``)."""
    queues = vhost_capabilities.queue_num
    with contextlib.ExitStack() as stack:
        if queues is None or queues < 2:
            if not isinstance(vhost_target, CommandTarget) or not vhost_target.profile.queues_args:
                raise Unsupported("two queues", f"GET_QUEUE_NUM says {queues} and the profile "
                                  "has no queues_args to run more")  # fmt: skip
            stack.enter_context(vhost_target.queues(2))
            vhost_measurements["restarted_with_queues"] = 2
        run = stack.enter_context(qemu_run(request, vhost_target, num_queues=2, smp=2))
        result = run.expect_pass()
        kicks = run.names().count("SET_VRING_KICK")
        if kicks < 2:
            raise RuntimeError(f"QEMU started {kicks} vring(s), the scenario needs 2")
        if "GET_QUEUE_NUM" not in run.names():
            raise RuntimeError("QEMU did not ask GET_QUEUE_NUM (the scenario needs MQ)")
    vhost_measurements["guest_seconds"] = round(result.seconds, 2)


@case(
    "VU-QEMU-4", title="QMP stop/cont during guest I/O", family="qemu", level=MUST,
    tier=Tier.INTEROP,
    clause="vhost-user.rst (QEMU 11.1.3) Starting and stopping rings; Inflight I/O tracking",
    source="hw/block/vhost-user-blk.c vhost_user_blk_set_status (vm state change: stop/start on "
        "one connection)",
    requirement="After QEMU stops the device (GET_VRING_BASE) and starts it again on the same "
        "connection the guest's I/O completes with correct data.",
)
def test_qemu_stop_cont_during_io(request: pytest.FixtureRequest,
                                  vhost_target: BackendTarget,
                                  vhost_target_factory: MakeTarget,
                                  vhost_measurements: dict[str, float]) -> None:  # fmt: skip
    """QMP ``stop`` while the guest loops over write/read-back rounds, then ``cont``: QEMU
    stops the device (GET_VRING_BASE) and starts it again on the same connection (with
    INFLIGHT_SHMFD a second SET_INFLIGHT_FD); every round still compares."""
    with qemu_run(request, vhost_target, mode="loop", iters=4, blocks=4) as run:
        wait_iteration(run, 1)
        stops = run.names().count("GET_VRING_BASE")
        qmp(run, "stop")
        run.proxy.wait_for_message("GET_VRING_BASE", timeout=20, count=stops + 1)
        settle(0.3)
        kicks = run.names().count("SET_VRING_KICK")
        qmp(run, "cont")
        run.proxy.wait_for_message("SET_VRING_KICK", timeout=20, count=kicks + 1)
        run.expect_pass()
        if len(run.proxy.connections) != 1:
            raise CaseFailed("the connection across stop/cont", expected="one connection",
                             seen=f"{len(run.proxy.connections)}: "
                             f"{[c.end_reason for c in run.proxy.connections]}")  # fmt: skip
        check_fidelity(run, vhost_target_factory, "stop-cont", vhost_measurements)


@case(
    "VU-QEMU-5", title="QMP system_reset during guest I/O", family="qemu", level=MUST,
    tier=Tier.INTEROP, clause="vhost-user.rst (QEMU 11.1.3) Starting and stopping rings",
    source="hw/block/vhost-user-blk.c vhost_user_blk_reset (a fresh in-flight region)",
    requirement="After a system_reset during I/O the device starts again for the rebooted guest, "
        "whose I/O completes with correct data.",
)
def test_qemu_system_reset(request: pytest.FixtureRequest, vhost_target: BackendTarget) -> None:
    """QMP ``system_reset`` while the guest does I/O: QEMU resets the device and the guest
    boots again on the same connection (a fresh in-flight region when INFLIGHT_SHMFD is
    negotiated); the second boot's rounds compare."""
    with qemu_run(request, vhost_target, mode="loop", iters=3, blocks=4,
                  extra=["-action", "reboot=reset"]) as run:  # fmt: skip
        wait_iteration(run, 1)
        starts = run.names().count("SET_VRING_KICK")
        qmp(run, "system_reset")
        run.proxy.wait_for_message("SET_VRING_KICK", timeout=guest_deadline(), count=starts + 1)
        run.expect_pass()
        if run.guest.serial().count("VC-GUEST: ITER 1") < 2:
            raise RuntimeError("the guest did not boot a second time after system_reset")


@case(
    "VU-QEMU-6", title="SIGKILL of the back-end during guest I/O, restart, QEMU reconnects",
    family="qemu", level=MUST, tier=Tier.INTEROP,
    clause="vhost-user.rst (QEMU 11.1.3) Inflight I/O tracking",
    source="QEMU-TRACES.md (d); hw/block/vhost-user-blk.c vhost_user_blk_event (reconnect)",
    requirement="A back-end restarted after SIGKILL with requests in flight completes the guest's "
        "I/O with correct data once QEMU (reconnect-ms) hands the in-flight region back.",
    needs=["command", "shared-disk"],
)
def test_qemu_backend_killed_and_restarted(request: pytest.FixtureRequest,
                                           vhost_target: BackendTarget,
                                           vhost_target_factory: MakeTarget,
                                           vhost_measurements: dict[str, float]) -> None:  # fmt: skip
    """SIGKILL of the back-end while the guest does I/O, then a restart on the same disk: QEMU
    (``reconnect-ms=500``) reconnects, hands the in-flight region back, and the guest's rounds
    complete with correct data (a request lost in the kill hangs the guest: ``hang``). The
    fidelity check holds the emulated kill and reconnect against QEMU's two connections."""
    assert isinstance(vhost_target, CommandTarget)
    # slow I/O keeps requests in flight, where the profile slows the same disk (a profile
    # whose slow variant is another command, e.g. qsd's null-co, would lose the guest's data)
    with contextlib.ExitStack() as stack:
        slow = stack.enter_context(slow_same_disk(vhost_target, 50))
        # a fast back-end gets more rounds: the guest must still be busy at the kill
        run = stack.enter_context(qemu_run(request, vhost_target, mode="loop",
                                           iters=4 if slow else 40, blocks=4,
                                           reconnect_ms=500))  # fmt: skip
        wait_iteration(run, 1)
        heads = run.inflight_heads(queue_size=128, packed=False)
        deadline = time.monotonic() + (20 if slow else 2)
        while heads is not None and not heads and time.monotonic() < deadline:
            time.sleep(0.002)
            heads = run.inflight_heads(queue_size=128, packed=False)
        if not run.guest.process.alive():
            raise RuntimeError("the guest finished before the kill (the scenario needs I/O)")
        vhost_target.send_signal(signal.SIGKILL)
        if vhost_target.wait_exit(10) is None:
            raise RuntimeError("the back-end did not die within 10 s of SIGKILL")
        if heads is not None:
            vhost_measurements["inflight_at_kill"] = len(heads)
        vhost_measurements["slow_disk"] = float(slow)
        vhost_target.restart()
        try:
            run.proxy.wait_for_connections(2, timeout=30)
        except ProxyError:
            ends = [c.end_reason for c in run.proxy.connections]
            raise CaseFailed("QEMU's reconnection to the restarted back-end (reconnect-ms=500)",
                             expected="a second connection within 30 s",
                             seen=f"connections: {ends}; {run.guest.process.describe()}, its "
                             f"last lines:\n{run.qemu_tail(4)}\nback-end alive: "
                             f"{vhost_target.alive()}; its log:\n{vhost_target.log_tail(8)}"
                             ) from None  # fmt: skip
        result = run.wait_result()
        run.check_replies()
        if not result.passed:
            raise CaseFailed("the guest's rounds across the back-end's kill and restart",
                             expected="VC-GUEST: PASS", seen=f"VC-GUEST: {result.marker}")  # fmt: skip
        reconnect = [e.name for e in run.proxy.trace.entries()
                     if e.direction == "fe->be" and e.note == "connection 2"]  # fmt: skip
        if "SET_INFLIGHT_FD" in run.names() and "SET_INFLIGHT_FD" not in reconnect:
            raise RuntimeError("QEMU reconnected without handing the in-flight region back")
        status = run.guest.process.wait(10)  # the power-off's stop ends QEMU's trace
        if status != 0:
            raise CaseFailed("QEMU's exit after the guest powered off", expected="0", seen=status)
        check_fidelity(run, vhost_target_factory, "reconnect", vhost_measurements)



@case(
    "VU-QEMU-7", title="Live migration between two instances under QEMU 11.1.3, requests in flight",
    family="qemu", level=MUST, tier=Tier.INTEROP,
    clause="vhost-user.rst (QEMU 11.1.3) Migration; Inflight I/O tracking",
    source="QEMU-TRACES.md (e); hw/block/vhost-user-blk.c inflight-migration (protocol feature 20)",
    requirement="A live migration with the switch-over during guest I/O completes and the guest's "
        "I/O completes with correct data on the destination instance, with inflight-migration on "
        "and off.",
    needs=["shared-disk"],
)
@pytest.mark.parametrize("inflight", ["on", "off"])
def test_qemu_live_migration(request: pytest.FixtureRequest, vhost_target: BackendTarget,
                             vhost_target_factory: MakeTarget,
                             vhost_capabilities: Capabilities,
                             vhost_measurements: dict[str, float],
                             vhost_measure: Callable[..., None], inflight: str) -> None:  # fmt: skip
    """Two QEMUs (the destination ``-incoming defer``), one back-end instance each on one disk.
    The migration is throttled until the guest runs its rounds (and, where the region shows
    it, until a request is in flight), then the switch-over is forced; the guest must pass on
    the destination. QEMU's downtime (query-migrate) is measured, on and off side by side.
    Fidelity: the emulated migration's source and destination sequences against QEMU's."""
    on = inflight == "on"
    if on:  # QEMU negotiates bit 20 only when the back-end offers it and INFLIGHT_SHMFD
        missing = vhost_capabilities.missing([P.INFLIGHT_SHMFD, P.GET_VRING_BASE_INFLIGHT])
        if missing:
            raise Unsupported(missing, "inflight-migration=on needs them")
    with contextlib.ExitStack() as stack:
        slow = stack.enter_context(slow_same_disk(vhost_target, switchover_latency_ms()))
        destination = destination_target(vhost_target, vhost_target_factory)
        memory_mb = 96
        guest = functools.partial(qemu_run, request, mode="loop", iters=3 if slow else 40,
                                  blocks=2, memory_mb=memory_mb, inflight_migration=on)
        src = stack.enter_context(guest(vhost_target, name="src"))
        dst = stack.enter_context(guest(destination, name="dst", incoming="defer"))
        wait_iteration(src, 1)
        vhost_measurements["slow_disk"] = float(slow)
        uri = f"unix:{src.workdir}/mig.sock"
        qmp(dst, "migrate-incoming", uri=uri)
        qmp(src, "migrate-set-parameters", **{"max-bandwidth": 1 << 20, "downtime-limit": 300})
        qmp(src, "migrate", uri=uri)
        heads = src.inflight_heads(queue_size=128, packed=False)
        deadline = time.monotonic() + 20
        while heads is not None and not heads and time.monotonic() < deadline:
            time.sleep(0.002)
            heads = src.inflight_heads(queue_size=128, packed=False)
        qmp(src, "migrate-set-parameters",
            **{"max-bandwidth": 1 << 40, "avail-switchover-bandwidth": 1 << 40})  # fmt: skip
        try:
            info = src.guest.qmp().wait_migration(timeout=90)
        except QMPFailure as exc:
            raise CaseFailed("the live migration", expected="completed",
                             seen=f"{exc}; {src.guest.process.describe()}; QEMU's last lines:"
                             f"\n{src.qemu_tail()}") from None  # fmt: skip
        if heads is not None:
            vhost_measurements["inflight_at_switchover"] = len(heads)
        downtime = info.get("downtime")
        if isinstance(downtime, int | float):
            vhost_measurements["downtime_ms"] = float(downtime)
            vhost_measure("qemu_migration_downtime_ms", float(downtime),
                          inflight_migration=inflight, slow_source=slow)  # fmt: skip
        src.check_replies()
        # fidelity: the emulated migration's source against QEMU's (complete at switch-over)
        mine_src, mine_dst = emulated_migration(vhost_target_factory, inflight=on,
                                                memory_mb=memory_mb)  # fmt: skip
        compare_traces(mine_src, settled_trace(src, len(mine_src)), "migration_source",
                       vhost_measurements)  # fmt: skip
        dst.expect_pass()
        compare_traces(mine_dst, dst.proxy.trace.entries(), "migration_destination",
                       vhost_measurements)  # fmt: skip


@case(
    "VU-QEMU-8", title="Migration to a file with inflight-migration=on: the region in the stream",
    family="qemu", level=MUST, tier=Tier.INTEROP,
    clause="vhost-user.rst (QEMU 11.1.3) Inflight I/O tracking",
    source="hw/block/vhost-user-blk.c vmstate vhost-user-blk/inflight (QEMU 11.1.3)",
    requirement="With inflight-migration=on, the in-flight region QEMU carries in the migration "
        "stream (the back-end's, after GET_VRING_BASE) passes the region format rules.",
    requires=[P.INFLIGHT_SHMFD, P.GET_VRING_BASE_INFLIGHT],
)
def test_qemu_migration_stream_region(request: pytest.FixtureRequest, vhost_target: BackendTarget,
                                      vhost_measurements: dict[str, float]) -> None:  # fmt: skip
    """QEMU migrates the running guest to ``exec:cat > FILE``; the stream's
    ``vhost-user-blk/inflight`` subsection is decoded (frontend/vmstate.py) and its region
    checked by frontend/inflight.py's validator."""
    with contextlib.ExitStack() as stack:
        # requests in flight when QEMU stops the device
        stack.enter_context(slow_same_disk(vhost_target, 100))
        # enough rounds that the guest is still busy when the migration ends
        run = stack.enter_context(qemu_run(request, vhost_target, mode="loop", iters=40,
                                           blocks=2, memory_mb=96, inflight_migration=True))  # fmt: skip
        wait_iteration(run, 1)
        stream = run.workdir / "stream.bin"
        qmp(run, "migrate", uri=f"exec:cat > {stream}")
        try:
            run.guest.qmp().wait_migration(timeout=90)
        except QMPFailure as exc:
            raise CaseFailed("the migration to a file", expected="completed",
                             seen=f"{exc}; {run.guest.process.describe()}; QEMU's last lines:"
                             f"\n{run.qemu_tail()}") from None  # fmt: skip
        run.check_replies()
        data = read_stream(extract_device_section(stream.read_bytes(), "vhost-user-blk"))
        state, _, _ = find_inflight_subsection(data)
    if not state.size:
        raise CaseFailed("the vhost-user-blk/inflight subsection", expected="a region",
                         seen=f"size {state.size}")  # fmt: skip
    region = parse_region(state.buffer, num_queues=1, queue_size=state.queue_size, packed=False)
    findings = validate_region(region)
    vhost_measurements["region_bytes"] = state.size
    vhost_measurements["inflight_in_stream"] = len(region.queues[0].inflight_heads())
    if findings:
        raise CaseFailed("the in-flight region in the migration stream",
                         expected="no format finding", seen="; ".join(map(str, findings[:3])))  # fmt: skip
