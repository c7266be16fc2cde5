"""QEMU 11.1.3 (Debian 13 root) as a real vhost-user-blk front-end: the tiny guest booted under
TCG against a back-end socket, a synchronous QMP helper, and ``qemu-img bench`` through libblkio.

Recipes: PEERS.md "Debian 13 root with QEMU 11.1.3" and "A tiny guest". KVM does not work on
these machines, so always ``-accel tcg``; qboot instead of SeaBIOS, whose own virtio-blk driver
would be an extra client of the back-end. Never ``x-query-virtio-status`` (QEMU 11.1.3 asserts
on a vhost-user-blk device).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import pathlib
import re
import subprocess
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from qemu.qmp import QMPClient
from vhost_conformance.peers.process import (
    PeerProcessError,
    Supervised,
    TerminatesOnExit,
    spawn,
    wait_for_text,
)
from vhost_conformance.peers.provision import peer_path

# Inside the Debian 13 root.
QBOOT = "/usr/share/qemu/qboot.rom"
# The guest's marker lines on ttyS0 (scripts/provision-peers, guest /init).
MARKER_RE = r"^VC-GUEST: (PASS|FAIL[^\r\n]*)"  # the serial line ends in \r\n
ITER_RE = re.compile(r"^VC-GUEST: ITER (\d+)", re.MULTILINE)
# Hard lifetime of any QEMU we start, should the test process itself die.
DEFAULT_MAX_LIFETIME = 600.0
FORBIDDEN_QMP = frozenset({"x-query-virtio-status"})

T = TypeVar("T")


class QMPFailure(Exception):
    """A QMP command failed, timed out, or the connection could not be made."""


@dataclass(frozen=True)
class VhostUserBlkDisk:
    """One ``vhost-user-blk-pci`` device of the guest, connected to ``socket``."""

    socket: pathlib.Path
    num_queues: int = 1
    packed: bool = False
    # QEMU 11 property; negotiates protocol feature 20 only if the back-end offers 20 and 12.
    inflight_migration: bool = False
    # chardev reconnect-ms (11.x spelling of reconnect=): reconnect after a back-end restart.
    reconnect_ms: int | None = None
    # More device properties, e.g. ("queue-size=128",).
    properties: tuple[str, ...] = ()

    def args(self, index: int) -> list[str]:
        """The -chardev and -device arguments for device number ``index``."""
        chardev = f"socket,id=vc{index},path={self.socket}"
        if self.reconnect_ms is not None:
            chardev += f",reconnect-ms={int(self.reconnect_ms)}"
        device = f"vhost-user-blk-pci,id=vblk{index},chardev=vc{index},num-queues={self.num_queues}"
        if self.packed:
            device += ",packed=on"
        if self.inflight_migration:
            device += ",inflight-migration=on"
        for prop in self.properties:
            device += f",{prop}"
        return ["-chardev", chardev, "-device", device]


@dataclass(frozen=True)
class GuestResult:
    """What the guest reported on its serial line."""

    passed: bool
    marker: str  # "PASS" or "FAIL <why>"
    seconds: float  # from QEMU's start to the marker
    iterations: int  # the last "VC-GUEST: ITER i" seen (0 in once mode)
    serial: str = field(repr=False, default="")


def guest_kernel_args(
    mode: str = "once",
    iters: int = 1,
    blocks: int | None = None,
    delay: float | None = None,
    extra: str = "",
) -> str:
    """The kernel command line selecting the guest's mode (once, loop, hold)."""
    if mode not in {"once", "loop", "hold"}:
        raise ValueError(f"guest mode {mode!r}: expected once, loop or hold")
    # cryptomgr.notests: the kernel's crypto self-tests cost ~0.5 s under TCG.
    args = f"console=ttyS0 panic=-1 quiet cryptomgr.notests vc.mode={mode} vc.iters={int(iters)}"
    if blocks is not None:
        args += f" vc.blocks={int(blocks)}"
    if delay is not None:
        args += f" vc.delay={delay:g}"
    if extra:
        args += f" {extra}"
    return args


def qemu_args(
    disks: Sequence[VhostUserBlkDisk],
    *,
    serial_log: pathlib.Path,
    qmp_socket: pathlib.Path,
    kernel: pathlib.Path,
    initrd: pathlib.Path,
    append: str,
    memory_mb: int = 256,
    incoming: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The QEMU 11.1.3 arguments of PEERS.md's command line, plus the tiny guest."""
    args = [
        "-accel", "tcg",
        "-M", "q35",
        "-m", f"{memory_mb}M",
        "-smp", "1",
        "-nodefaults",
        "-display", "none",
        "-bios", QBOOT,
        # vhost-user needs guest RAM in a shareable fd.
        "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        "-numa", "node,memdev=mem",
    ]  # fmt: skip
    for index, disk in enumerate(disks):
        args += disk.args(index)
    args += [
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", append,
        "-serial", f"file:{serial_log}",
        "-no-reboot",
        "-qmp", f"unix:{qmp_socket},server=on,wait=off",
    ]  # fmt: skip
    if incoming is not None:
        args += ["-incoming", incoming]
    return [*args, *extra]


class QMP:
    """A synchronous QMP client over ``qemu.qmp.QMPClient``; every call has a deadline.

    The asyncio loop runs in a private thread, so this works whether or not the caller has a
    loop of its own.
    """

    def __init__(
        self, socket_path: pathlib.Path, timeout: float = 10.0, name: str = "qemu"
    ) -> None:
        self.socket = pathlib.Path(socket_path)
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-{name}", daemon=True
        )
        self._thread.start()
        self._client: QMPClient | None = None
        self._name = name

    def _run(self, coroutine: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coroutine, timeout), self._loop)
        try:
            return future.result(timeout + 1.0)
        except (TimeoutError, concurrent.futures.TimeoutError) as exc:
            future.cancel()
            raise QMPFailure(
                f"QMP {what} on {self.socket}: no answer within {timeout:.1f} s"
            ) from exc

    def connect(self, timeout: float | None = None) -> None:
        """Connect (retrying until the socket accepts, within ``timeout``) and negotiate."""
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        last: Exception | None = None
        while time.monotonic() < deadline:
            client = QMPClient(self._name)
            try:
                self._run(
                    client.connect(str(self.socket)),
                    max(0.1, deadline - time.monotonic()),
                    "connect",
                )
                self._client = client
                return
            except Exception as exc:  # ConnectError, QMPFailure: retry until the deadline
                last = exc
                time.sleep(0.05)
        raise QMPFailure(f"QMP connect to {self.socket} failed within {budget:.1f} s: {last}")

    def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run one QMP command and return its ``return`` value; raises QMPFailure on error."""
        if command in FORBIDDEN_QMP:
            raise ValueError(
                f"QMP {command} is refused here: QEMU 11.1.3 asserts on vhost-user-blk"
            )
        if self._client is None:
            self.connect()
        assert self._client is not None
        budget = self.timeout if timeout is None else timeout
        try:
            return self._run(self._client.execute(command, arguments), budget, command)
        except QMPFailure:
            raise
        except Exception as exc:
            raise QMPFailure(f"QMP {command} {dict(arguments or {})} failed: {exc}") from exc

    # The commands the suite uses.

    def query_status(self) -> dict[str, Any]:
        """``query-status``: {"running": bool, "status": "running" | "paused" | "inmigrate" ...}."""
        result: dict[str, Any] = self.execute("query-status")
        return result

    def cont(self) -> None:
        """``cont``: resume the guest."""
        self.execute("cont")

    def stop(self) -> None:
        """``stop``: pause the guest."""
        self.execute("stop")

    def migrate_incoming(self, uri: str) -> None:
        """``migrate-incoming`` on a QEMU started with ``-incoming defer``."""
        self.execute("migrate-incoming", {"uri": uri})

    def migrate_set_parameters(self, **parameters: object) -> None:
        """``migrate-set-parameters``; keyword names use _ for - (downtime_limit=300)."""
        self.execute(
            "migrate-set-parameters", {k.replace("_", "-"): v for k, v in parameters.items()}
        )

    def migrate(self, uri: str) -> None:
        """``migrate`` to ``uri`` (e.g. unix:PATH, "exec:cat > FILE")."""
        self.execute("migrate", {"uri": uri})

    def query_migrate(self) -> dict[str, Any]:
        """``query-migrate``: {"status": ..., "total-time": ms, "downtime": ms, ...}."""
        result: dict[str, Any] = self.execute("query-migrate")
        return result

    def wait_migration(self, timeout: float = 30.0) -> dict[str, Any]:
        """Poll ``query-migrate`` until completed (returned) or failed/cancelled (raises)."""
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            info = self.query_migrate()
            status = info.get("status")
            if status == "completed":
                return info
            if status in {"failed", "cancelled"}:
                raise QMPFailure(f"migration {status}: {info.get('error-desc', info)}")
            time.sleep(0.05)
        raise QMPFailure(f"migration not completed within {timeout:.1f} s; last: {info}")

    def quit(self) -> None:
        """``quit``: QEMU answers and exits; the connection going away is expected."""
        with contextlib.suppress(QMPFailure):
            self.execute("quit", timeout=5.0)

    def close(self) -> None:
        """Disconnect and stop the helper's loop thread."""
        if self._client is not None:
            client, self._client = self._client, None
            # The peer may be gone already; nothing else to release then.
            with contextlib.suppress(Exception):
                self._run(client.disconnect(), 3.0, "disconnect")
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> QMP:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class QemuGuest(TerminatesOnExit):
    """A running QEMU 11.1.3 with the tiny guest: its process, serial log and QMP socket."""

    def __init__(
        self, process: Supervised, serial_log: pathlib.Path, qmp_socket: pathlib.Path
    ) -> None:
        self.process = process
        self.serial_log = serial_log
        self.qmp_socket = qmp_socket
        self._qmp: QMP | None = None

    def qmp(self, timeout: float = 10.0) -> QMP:
        """The QMP helper, connected on first use."""
        if self._qmp is None:
            qmp = QMP(self.qmp_socket, timeout=timeout, name=self.process.name)
            try:
                qmp.connect()
            except BaseException:
                qmp.close()
                raise
            self._qmp = qmp
        return self._qmp

    def serial(self) -> str:
        """The guest's serial output so far."""
        try:
            return self.serial_log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def iterations(self) -> int:
        """The last loop round the guest reported (0 if none)."""
        found = ITER_RE.findall(self.serial())
        return int(found[-1]) if found else 0

    def wait_for_serial(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until the serial log matches ``pattern``; raises PeerProcessError otherwise."""
        return wait_for_text(self.serial_log, pattern, timeout, self.process)

    def wait_for_iteration(self, iteration: int, timeout: float) -> None:
        """Wait until the guest reported loop round ``iteration`` (or a later one)."""
        deadline = time.monotonic() + timeout
        while self.iterations() < iteration:
            if re.search(MARKER_RE, self.serial(), re.MULTILINE):
                return
            if not self.process.alive() or time.monotonic() >= deadline:
                raise PeerProcessError(
                    f"guest did not reach ITER {iteration} ({self.process.describe()}, last ITER"
                    f" {self.iterations()}); serial tail:\n{_tail(self.serial())}\n"
                    f"QEMU log tail:\n{self.process.log_tail()}"
                )
            time.sleep(0.05)

    def wait_for_result(self, timeout: float = 60.0, exit_timeout: float = 10.0) -> GuestResult:
        """Wait for ``VC-GUEST: PASS`` or ``FAIL ...``; then for QEMU to power off.

        Raises PeerProcessError (with both logs' tails) if QEMU exits or the deadline passes
        without a marker.
        """
        try:
            found = wait_for_text(self.serial_log, MARKER_RE, timeout, self.process)
        except PeerProcessError as exc:
            raise PeerProcessError(f"{exc}\nQEMU log tail:\n{self.process.log_tail()}") from None
        seconds = time.monotonic() - self.process.started
        self.process.wait(exit_timeout)
        serial = self.serial()
        return GuestResult(
            passed=found.group(1) == "PASS",
            marker=found.group(1),
            seconds=seconds,
            iterations=self.iterations(),
            serial=serial,
        )

    def terminate(self, timeout: float = 5.0) -> int:
        """Close QMP, stop QEMU (SIGTERM, then SIGKILL), reap it."""
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        return self.process.terminate(timeout)


def _tail(text: str, n: int = 20) -> str:
    return "\n".join(text.splitlines()[-n:])


def _binds(paths: Sequence[pathlib.Path]) -> dict[str, str]:
    """The environment with VC_BINDS extended by the directories of ``paths``."""
    env = dict(os.environ)
    dirs = sorted({str(pathlib.Path(p).absolute().parent) for p in paths})
    env["VC_BINDS"] = ":".join([*dirs, *filter(None, env.get("VC_BINDS", "").split(":"))])
    return env


def start_qemu(
    workdir: pathlib.Path,
    disks: Sequence[VhostUserBlkDisk],
    *,
    name: str = "qemu",
    mode: str = "once",
    iters: int = 1,
    blocks: int | None = None,
    delay: float | None = None,
    memory_mb: int = 256,
    incoming: str | None = None,
    extra_args: Sequence[str] = (),
    kernel_args: str = "",
    max_lifetime: float = DEFAULT_MAX_LIFETIME,
) -> QemuGuest:
    """Start QEMU 11.1.3 booting the tiny guest in ``mode`` against ``disks``.

    Files go to ``workdir``: NAME.serial.log, NAME.log (QEMU's stderr), NAME.qmp (QMP socket).
    ``incoming="defer"`` starts a migration destination; ``extra_args`` go to QEMU,
    ``kernel_args`` to the guest's command line. ``max_lifetime`` is a hard deadline
    (``timeout -k 5``) that holds even if this process dies. Raises PeerUnavailable if the
    root or the guest is not provisioned.
    """
    qemu = peer_path("qemu-system-x86_64-11.1")
    kernel = peer_path("guest-kernel")
    initrd = peer_path("guest-initrd")
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    serial_log = workdir / f"{name}.serial.log"
    qmp_socket = workdir / f"{name}.qmp"
    serial_log.unlink(missing_ok=True)
    qmp_socket.unlink(missing_ok=True)
    argv = [
        "timeout", "-k", "5", f"{max_lifetime:g}", str(qemu),
        *qemu_args(
            disks,
            serial_log=serial_log,
            qmp_socket=qmp_socket,
            kernel=kernel,
            initrd=initrd,
            append=guest_kernel_args(mode, iters, blocks, delay, kernel_args),
            memory_mb=memory_mb,
            incoming=incoming,
            extra=extra_args,
        ),
    ]  # fmt: skip
    env = _binds([serial_log, *(d.socket for d in disks)])
    process = spawn(argv, workdir / f"{name}.log", cwd=workdir, env=env, name=name)
    return QemuGuest(process, serial_log, qmp_socket)


def parse_bench_seconds(output: str) -> float:
    """The run time qemu-img bench prints ("Run completed in 0.123 seconds.")."""
    found = re.search(r"Run completed in ([0-9.]+) seconds", output)
    if not found:
        raise ValueError(
            f"qemu-img bench printed no 'Run completed in N seconds': {output[-500:]!r}"
        )
    return float(found.group(1))


def qemu_img_bench(
    socket_path: pathlib.Path,
    count: int = 20000,
    depth: int = 32,
    *,
    size: int = 4096,
    write: bool = False,
    timeout: float = 120.0,
) -> float:
    """IOPS of ``qemu-img bench`` (QEMU 11.1.3's libblkio driver, virtio-blk-vhost-user)
    against the vhost-user-blk back-end on ``socket_path``.

    libblkio requires REPLY_ACK, CONFIG and CONFIGURE_MEM_SLOTS from the back-end (PEERS.md).
    Raises PeerProcessError if qemu-img fails or overruns ``timeout``.
    """
    qemu_img = peer_path("qemu-img-11.1")
    socket_path = pathlib.Path(socket_path).absolute()
    argv = [
        str(qemu_img), "bench",
        "--image-opts", f"driver=virtio-blk-vhost-user,path={socket_path},cache.direct=on",
        "-c", str(int(count)), "-d", str(int(depth)), "-s", str(int(size)), "-t", "none",
    ]  # fmt: skip
    if write:
        argv.append("-w")
    try:
        done = subprocess.run(
            argv,
            env=_binds([socket_path]),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            start_new_session=True,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PeerProcessError(f"qemu-img bench on {socket_path} overran {timeout:.1f} s") from exc
    output = (done.stdout + done.stderr).decode(errors="replace")
    if done.returncode != 0:
        raise PeerProcessError(
            f"qemu-img bench on {socket_path} exited {done.returncode}: {output[-800:]}"
        )
    seconds = parse_bench_seconds(output)
    if seconds <= 0:
        raise PeerProcessError(f"qemu-img bench reported {seconds} s for {count} requests")
    return count / seconds
