"""The ``qemu`` tier's driver: real QEMU 11.1.3 (Debian 13 root, TCG) boots the tiny guest on
the back-end under test, through the recording proxy (frontend/proxy.py), whose trace goes to
the case's report entry and whose reply verdicts are the emulated channel's.

The guest (scripts/provision-peers, PEERS.md "A tiny guest") writes a pattern to /dev/vda,
reads it back with O_DIRECT, compares, and prints ``VC-GUEST: PASS`` or ``FAIL ...`` on its
serial line (``ITER i`` after each round in loop mode), then powers off. A guest that does not
report within its deadline while QEMU runs is a ``hang`` with the serial tail.

Every QEMU, proxy thread and temporary directory is released on every path (``qemu_run``).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from vhost_conformance.frontend.channel import Channel, TraceEntry, WireTrace
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.fidelity import differences
from vhost_conformance.frontend.inflight import parse_region
from vhost_conformance.frontend.memory import DirtyLog, GuestMemory
from vhost_conformance.frontend.migration import migrate, prepare_destination
from vhost_conformance.frontend.proxy import RecordingProxy
from vhost_conformance.peers.process import PeerProcessError
from vhost_conformance.peers.provision import PeerUnavailable, peer_path
from vhost_conformance.peers.qemu import (
    GuestResult,
    QemuGuest,
    QMPFailure,
    VhostUserBlkDisk,
    start_qemu,
)
from vhost_conformance.suites.drivers import do_io
from vhost_conformance.suites.drivers.migration import destination_target
from vhost_conformance.suites.drivers.settings import env_number
from vhost_conformance.suites.model import CaseFailed, CaseHang, Unsupported
from vhost_conformance.suites.plugin import register_trace
from vhost_conformance.suites.target import (
    BackendTarget,
    CommandTarget,
    SlowIoUnsupported,
    template_fields,
)

#: Seconds the guest gets to report once QEMU runs (TCG on a loaded 2-core machine).
GUEST_DEADLINE = 90.0
#: overrides GUEST_DEADLINE (seconds): the mutation tests, whose knobs make a guest hang,
#: wait less for the verdict they expect
GUEST_DEADLINE_ENV = "VHOST_CONFORMANCE_QEMU_GUEST_DEADLINE"
#: the source disk's latency (ms) at VU-QEMU-7's switch-over; 0 runs the migration without a
#: slow disk (the switch-over then rarely finds a request in flight: a fidelity run)
SWITCHOVER_LATENCY_ENV = "VHOST_CONFORMANCE_QEMU_SWITCHOVER_MS"
SWITCHOVER_LATENCY_MS = 300


def guest_deadline() -> float:
    """Seconds a guest gets to report: ``$VHOST_CONFORMANCE_QEMU_GUEST_DEADLINE`` or 90."""
    return env_number(GUEST_DEADLINE_ENV, GUEST_DEADLINE, float, lambda v: v > 0, "seconds > 0")


def switchover_latency_ms() -> int:
    """VU-QEMU-7's source disk latency: ``$VHOST_CONFORMANCE_QEMU_SWITCHOVER_MS`` or 300."""
    return env_number(SWITCHOVER_LATENCY_ENV, SWITCHOVER_LATENCY_MS, int, lambda v: v >= 0,
                      "a whole number of milliseconds >= 0")  # fmt: skip


#: The peers the tier needs.
QEMU_PEERS = ("qemu-system-x86_64-11.1", "guest-kernel", "guest-initrd")


def need_qemu() -> None:
    """Unsupported (with the reason) when QEMU 11.1.3 or the guest is not provisioned."""
    for name in QEMU_PEERS:
        try:
            peer_path(name)
        except PeerUnavailable as exc:
            raise Unsupported("QEMU 11.1.3 and the tiny guest", str(exc)) from None


def backend_socket(target: BackendTarget) -> str:
    """The back-end's listening socket (the QEMU tier needs one QEMU can be pointed at)."""
    path = getattr(target, "socket_path", None)
    mode = getattr(getattr(target, "profile", None), "socket_mode", "listen")
    if not isinstance(path, str) or mode != "listen":
        raise Unsupported(
            "a listening socket", "QEMU's tier connects to a back-end that listens"
        )
    return path


@dataclass
class QemuRun:
    """One QEMU with the guest on the back-end under test, through a recording proxy."""

    guest: QemuGuest
    proxy: RecordingProxy
    workdir: pathlib.Path
    disk: VhostUserBlkDisk
    notes: list[str] = field(default_factory=list)

    def wait_result(self, timeout: float | None = None) -> GuestResult:
        """The guest's verdict; ``CaseHang`` with the serial tail when it does not come while
        QEMU runs, ``CaseFailed`` when QEMU exits without one."""
        timeout = guest_deadline() if timeout is None else timeout
        try:
            return self.guest.wait_for_result(timeout=timeout)
        except PeerProcessError:
            tail = "\n".join(self.guest.serial().splitlines()[-15:])
            if self.guest.process.alive():
                raise CaseHang(
                    f"the guest did not report within {timeout:g} s; serial tail:\n{tail}"
                ) from None
            self.check_replies()  # the likeliest cause: a reply QEMU rejected
            raise CaseFailed(
                "QEMU 11.1.3 with the guest",
                expected="the guest's VC-GUEST verdict, then a clean power-off",
                seen=f"QEMU exited without it ({self.guest.process.describe()}); QEMU's last "
                f"lines:\n{self.qemu_tail()}",
            ) from None

    def expect_pass(self, timeout: float | None = None) -> GuestResult:
        """Wait for the guest; fail unless it passed, QEMU exited 0 and every back-end reply
        QEMU saw passes the emulated channel's validator."""
        timeout = guest_deadline() if timeout is None else timeout
        result = self.wait_result(timeout)
        self.check_replies()
        if not result.passed:
            raise CaseFailed(
                "the guest's write, read-back and compare on the vhost-user-blk disk",
                expected="VC-GUEST: PASS",
                seen=f"VC-GUEST: {result.marker}",
            )
        status = self.guest.process.wait(10)
        if status != 0:
            raise CaseFailed("QEMU's exit after the guest powered off", expected="0", seen=status)
        return result

    def qemu_tail(self, lines: int = 6) -> str:
        """The last lines of QEMU's own log (stderr)."""
        return "\n".join(self.guest.process.log_tail().splitlines()[-lines:])

    def check_replies(self) -> None:
        """Fail when the proxy's reply validator found a reply QEMU 11.1.3 rejects."""
        if self.proxy.violations:
            raise CaseFailed(
                "the back-end's replies to QEMU 11.1.3 (the emulated channel's validator)",
                expected="every reply valid",
                seen="; ".join(self.proxy.violations[:3]),
            )

    def names(self, direction: str = "fe->be") -> list[str]:
        """The message names the proxy saw in ``direction`` so far."""
        return [e.name for e in self.proxy.trace.entries() if e.direction == direction]

    def inflight_heads(self, queue_size: int, packed: bool) -> list[int] | None:
        """The heads the latest in-flight region marks in flight on queue 0 (None without a
        region: INFLIGHT_SHMFD not negotiated)."""
        if not self.proxy.inflight_fds:
            return None
        fd = self.proxy.inflight_fds[-1]
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
        region = parse_region(data, num_queues=self.disk.num_queues, queue_size=queue_size,
                              packed=packed)  # fmt: skip
        return region.queues[0].inflight_heads()


@contextlib.contextmanager
def qemu_run(
    request: pytest.FixtureRequest,
    target: BackendTarget,
    *,
    num_queues: int = 1,
    packed: bool = False,
    reconnect_ms: int | None = None,
    inflight_migration: bool = False,
    mode: str = "once",
    iters: int = 1,
    blocks: int | None = None,
    smp: int = 1,
    extra: Sequence[str] = (),
    name: str = "guest",
    incoming: str | None = None,
    memory_mb: int = 256,
) -> Iterator[QemuRun]:
    """QEMU 11.1.3 booting the guest on ``target`` through a recording proxy whose trace is
    registered for the case's report. Everything is stopped and removed on exit."""
    need_qemu()
    socket_path = backend_socket(target)
    # short: a Unix socket path must stay under 108 bytes
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="vcq-"))
    # QEMU drives the back-end as a vhost-user-blk device: its feature bits named as blk's
    proxy = RecordingProxy(workdir / "p.sock", socket_path, trace=WireTrace("block"),
                           connect_timeout=10.0)
    register_trace(request, proxy.trace)
    guest: QemuGuest | None = None
    try:
        proxy.start()
        disk = VhostUserBlkDisk(
            workdir / "p.sock", num_queues=num_queues, packed=packed,
            reconnect_ms=reconnect_ms, inflight_migration=inflight_migration,
        )  # fmt: skip
        args = [*(["-smp", str(smp)] if smp > 1 else []), *extra]
        guest = start_qemu(workdir, [disk], name=name, mode=mode, iters=iters, blocks=blocks,
                           extra_args=args, max_lifetime=300, incoming=incoming,
                           memory_mb=memory_mb)  # fmt: skip
        yield QemuRun(guest, proxy, workdir, disk)
    finally:
        try:
            if guest is not None:
                guest.terminate()
        finally:
            with contextlib.suppress(Exception):
                proxy.close()
            shutil.rmtree(workdir, ignore_errors=True)


def qmp(run: QemuRun, command: str, **arguments: object) -> object:
    """One QMP command (never ``x-query-virtio-status``); a failure is the case's ``error``."""
    try:
        return run.guest.qmp().execute(command, arguments or None)
    except QMPFailure as exc:
        raise RuntimeError(f"QMP {command}: {exc}") from None


def wait_iteration(run: QemuRun, iteration: int, timeout: float | None = None) -> None:
    """Wait until the guest reported loop round ``iteration``; a hang with the serial tail if
    it does not while QEMU runs."""
    timeout = guest_deadline() if timeout is None else timeout
    try:
        run.guest.wait_for_iteration(iteration, timeout)
    except PeerProcessError:
        tail = "\n".join(run.guest.serial().splitlines()[-15:])
        if run.guest.process.alive():
            raise CaseHang(
                f"the guest did not reach round {iteration} within {timeout:g} s; serial "
                f"tail:\n{tail}"
            ) from None
        run.check_replies()
        raise CaseFailed("QEMU 11.1.3 with the guest", expected=f"guest round {iteration}",
                         seen=f"QEMU exited; its last lines:\n{run.qemu_tail()}\n"
                         f"serial tail:\n{tail}") from None  # fmt: skip


def settle(seconds: float) -> None:
    """Let the guest run for ``seconds`` (a pause between QMP commands; not an assertion)."""
    time.sleep(seconds)


# --------------------------------------------------------------------------- fidelity

#: The emulated scenarios the fidelity check replays: each is a list of steps on a Session
#: configured as QEMU 11.1.3's vhost-user-blk-pci device is by default (one queue of 128,
#: inflight-migration off, 256 MiB of guest RAM in one region). ``kill-restart``: SIGKILL of
#: the back-end, a restart, and QEMU's reconnect (``Session.reattach``: the init messages
#: without GET_CONFIG, the kept region, SET_VRING_BASE = used idx).
FIDELITY_SCENARIOS: dict[str, tuple[str, ...]] = {
    "boot": ("connect", "start", "io", "stop"),
    "stop-cont": ("connect", "start", "io", "stop", "start", "io", "stop"),
    "reconnect": ("connect", "start", "io", "kill-restart", "io", "stop"),
}


def emulated_trace(make_target: Callable[[str], BackendTarget], scenario: str,
                   timeout: float = 5.0) -> list[TraceEntry]:  # fmt: skip
    """Run ``scenario`` with the emulated front-end on a fresh instance of the back-end under
    test; its wire trace (every connection of it, in order)."""
    target = make_target(f"fidelity-{scenario}")
    trace = WireTrace()
    with GuestMemory.simple(256 << 20, regions=1) as memory:
        session = Session(Channel(target.connect_socket(timeout), trace=trace), memory,
                          queue_size=128, inflight_migration=False, timeout=timeout)  # fmt: skip
        try:
            for step in FIDELITY_SCENARIOS[scenario]:
                if step == "connect":
                    session.connect()
                elif step == "start":
                    session.start()
                elif step == "io":
                    do_io(session, 2)
                elif step == "stop":
                    session.stop()
                elif step == "kill-restart":
                    _kill_and_restart(target, timeout)
                    session.reattach(Channel(target.connect_socket(timeout), trace=trace))
        finally:
            session.close()
    return trace.entries()


def _kill_and_restart(target: BackendTarget, timeout: float) -> None:
    if not isinstance(target, CommandTarget):
        raise Unsupported("the reconnect fidelity check", "the suite does not run this back-end")
    target.send_signal(signal.SIGKILL)
    if target.wait_exit(10) is None:
        raise RuntimeError("the back-end did not die within 10 s of SIGKILL")
    target.restart()


def emulated_migration(make_target: Callable[[str], BackendTarget], *, inflight: bool,
                       memory_mb: int, timeout: float = 5.0
                       ) -> tuple[list[TraceEntry], list[TraceEntry]]:  # fmt: skip
    """The emulated live migration as VU-QEMU-7 makes QEMU do it: the source connects, starts,
    does I/O, gets a dirty log (SET_LOG_BASE, LOG_ALL, logged rings) and stops at the
    switch-over (frontend/migration.migrate); the destination, realized before, starts with
    the source's bases (and, with ``inflight``, its region), does I/O and stops. Returns the
    (source, destination) traces."""
    source_target = make_target("fidelity-src")
    destination = destination_target(source_target, make_target)
    with contextlib.ExitStack() as stack:
        memory = stack.enter_context(GuestMemory.simple(memory_mb << 20, regions=1))
        src = Session(Channel(source_target.connect_socket(timeout)), memory, queue_size=128,
                      inflight_migration=inflight, timeout=timeout)  # fmt: skip
        stack.callback(src.close)
        src.connect()
        src.start()
        do_io(src, 2)
        dst = prepare_destination(src, Channel(destination.connect_socket(timeout)))
        stack.callback(dst.close)
        log = stack.enter_context(contextlib.closing(DirtyLog.for_memory(memory)))
        src.set_log_base(log.fd, log.mmap_size)
        result = migrate(src, dst)
        stack.callback(result.source_ram.close)
        do_io(dst, 2)
        dst.stop()
        return src.channel.trace.entries(), dst.channel.trace.entries()


def compare_traces(emulated: list[TraceEntry], real: list[TraceEntry], scenario: str,
                   measurements: dict[str, float] | None = None) -> None:  # fmt: skip
    """``emulated`` against ``real`` (frontend/fidelity.py): the counts go to
    ``measurements``; a difference raises :class:`FidelityError` (verdict ``error``)."""
    found = differences(emulated, real)
    if measurements is not None:
        measurements[f"fidelity_{scenario}_messages"] = len(real)
        measurements[f"fidelity_{scenario}_differences"] = len(found)
    if found:
        raise FidelityError(
            f"the emulated front-end's {scenario} sequence differs from QEMU 11.1.3's on this "
            "back-end (a suite defect):\n" + "\n".join(found)
        )


def check_fidelity(run: QemuRun, make_target: Callable[[str], BackendTarget], scenario: str,
                   measurements: dict[str, float] | None = None) -> None:  # fmt: skip
    """The emulated ``scenario`` against the proxy's trace of QEMU: a difference is a defect
    of the suite (``error``), listed with where the sequences part."""
    compare_traces(emulated_trace(make_target, scenario), run.proxy.trace.entries(), scenario,
                   measurements)  # fmt: skip


def settled_trace(run: QemuRun, at_least: int, timeout: float = 10.0) -> list[TraceEntry]:
    """The proxy's trace once it holds ``at_least`` messages (or the deadline passed: what it
    holds then; the comparison reports what is missing). The proxy records on its own
    thread, a little after QEMU sent."""
    deadline = time.monotonic() + timeout
    entries = run.proxy.trace.entries()
    while len(entries) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
        entries = run.proxy.trace.entries()
    return entries


class FidelityError(RuntimeError):
    """The emulation and real QEMU sent different messages (verdict ``error``)."""


@contextlib.contextmanager
def slow_same_disk(target: BackendTarget, latency_ms: int) -> Iterator[bool]:
    """Make ``target``'s I/O slow (requests stay in flight) without losing the guest's data:
    the profile's own knob when it slows the same disk (``slow_io.args``), else the watched
    disk (suites/watched.py) when the command uses ``{disk}`` (a knob that swaps the disk,
    like qsd's null-co command, would lose the data). Yields whether the I/O is slow
    (``latency_ms`` 0: never slow)."""
    if not isinstance(target, CommandTarget) or latency_ms <= 0:
        yield False
        return
    profile = target.profile
    try:
        if profile.slow_io.args is not None or profile.slow_io_route() == "disk":
            manager: contextlib.AbstractContextManager[object] = target.slow_io(latency_ms)
        elif profile.command is not None and "disk" in template_fields(profile.command):
            manager = target.watched_disk(latency_ms)
        else:
            yield False
            return
        with manager:
            yield True
    except SlowIoUnsupported:
        yield False
