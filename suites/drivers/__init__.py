"""I/O drivers and fixtures shared by the ring, block, memory, stop/drain, in-flight and logging
cases, so that a case body is a few lines of scenario.

Fixtures (usable from ``suites/conftest.py`` and, registered as a plugin module, from vendors'
own tests; they build on the plugin's ``vhost_target``, ``vhost_timeout`` and
``vhost_capabilities``):

``vhost_memory``   a :class:`GuestMemory` of :data:`GUEST_MEMORY` bytes, closed at teardown
``vhost_session``  a connected and started :class:`Session` on ``vhost_target`` (profile
                   ``qemu-11.1``, one split queue of 128) with a ``ModelDisk`` sized from the
                   config capacity; stopped (if it can be) and closed at teardown; options
                   by marker: ``@pytest.mark.vhost_session(profile="qemu-7.2", packed=True)``
``make_session``   ``make_session(target, **options)`` -> a session with options (``packed``,
                   ``num_queues``, ``event_idx``, ``indirect``, ``regions``, ``mmap_offset``,
                   ``profile``, ``inflight_migration``, ``start``, ``model``); every session it
                   made is closed at teardown and its wire trace goes to the report

Driver functions: :func:`open_session`, :func:`do_io`, :func:`write_read_verify`,
:func:`pending_io`, :func:`wait_all`, :func:`wait_popped`, :func:`expect_status`,
:func:`io_at` (a request whose buffers sit at chosen GPAs), :func:`partial_start` and
:func:`kick_and_enable` (QEMU's start cut before SET_VRING_KICK), :func:`stop_now` (QEMU's
stop, timed, memory snapshotted at the reply), :class:`InflightTracker` (the region against
the front-end's model), :func:`restart_variant` (read-only / more queues where the profile
allows it), :func:`slow_disk` (the profile's slow I/O, ``unsupported`` with its reason).

A case that needs a feature the back-end does not offer ends ``unsupported`` naming the bit
(``make_session(packed=True)`` without RING_PACKED, ...). Every wait has a deadline: a
request that never completes raises ``BackendHang`` (verdict ``hang``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pytest
from vhost_conformance.frontend.blk import (
    SECTOR_SIZE,
    BlkCompletion,
    BlkConfig,
    BlkRequest,
    BlkStatus,
    ModelDisk,
)
from vhost_conformance.frontend.channel import BackendHang, Channel
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.inflight import (
    Finding,
    InflightLayoutError,
    InflightModel,
    parse_region,
)
from vhost_conformance.frontend.inflight import InflightRegion as ParsedRegion
from vhost_conformance.frontend.memory import GuestMemory, MemorySnapshot
from vhost_conformance.frontend.protocol import (
    ProtocolFeature,
    VirtioFeature,
    has,
)
from vhost_conformance.frontend.virtqueue import SplitVirtqueue
from vhost_conformance.suites.model import CaseFailed, Unsupported
from vhost_conformance.suites.plugin import register_trace
from vhost_conformance.suites.target import (
    BackendTarget,
    Capabilities,
    CommandTarget,
    SlowIoUnsupported,
)

__all__ = [
    "COMPLETES_AFTER_REPLY",
    "GUEST_MEMORY",
    "SESSION_MARKER",
    "InflightTracker",
    "IoError",
    "MakeTarget",
    "SessionFactory",
    "Stopped",
    "call_count",
    "capacity_of",
    "close_session",
    "do_io",
    "expect_status",
    "fail_on_findings",
    "fd_count",
    "io_at",
    "kick_and_enable",
    "make_session",
    "open_session",
    "partial_start",
    "pattern",
    "pending_io",
    "pytest_configure",
    "require_command",
    "restart_variant",
    "slow_disk",
    "stop_now",
    "vhost_memory",
    "vhost_session",
    "wait_all",
    "wait_popped",
    "write_read_verify",
]

#: Guest RAM of a default session: rings, request slots and a 1 MiB data arena fit easily.
GUEST_MEMORY = 8 << 20

#: The observed behaviour "GET_VRING_BASE answered with taken requests still outstanding,
#: executed or completed after the reply": VU-GVB-3 owns it, VU-SUSP-1 and VU-DISK-1 follow.
COMPLETES_AFTER_REPLY = "completes-after-get-vring-base-reply"


class IoError(CaseFailed):
    """A request ended with a status or data the case did not allow."""


# --------------------------------------------------------------------------- sessions


def capacity_of(session: Session, fallback: int = 64 << 20) -> int:
    """The disk size in bytes from the GET_CONFIG capacity, or ``fallback`` without one."""
    if session.negotiated.config:
        size = BlkConfig.decode(session.negotiated.config).capacity_bytes
        if size:
            return size
    return fallback


def _gate(session_options: dict[str, Any], capabilities: Capabilities) -> None:
    """Unsupported naming the missing bit for options the back-end does not offer."""
    if session_options.get("packed") and not capabilities.offers(VirtioFeature.RING_PACKED):
        raise Unsupported(VirtioFeature.RING_PACKED)
    queues = int(session_options.get("num_queues", 1))
    if queues > 1:
        missing = capabilities.missing([ProtocolFeature.MQ])
        if missing:
            raise Unsupported(missing)


def open_session(
    target: BackendTarget,
    *,
    timeout: float,
    memory: GuestMemory,
    start: bool = True,
    model: bool = True,
    **options: Any,
) -> Session:
    """Connect to ``target`` and run QEMU's init (and start, unless ``start=False``).

    ``options`` go to :class:`Session` (``profile``, ``num_queues``, ``queue_size``,
    ``packed``, ``event_idx``, ``indirect``, ``inflight_migration``), except
    ``strip_protocol``: protocol features not to negotiate even when offered. With ``model`` every
    queue's driver checks reads against one ``ModelDisk`` sized from the config capacity.
    The caller closes the session (the ``make_session`` fixture does).
    """
    strip = tuple(options.pop("strip_protocol", ()))
    channel = Channel(target.connect_socket(timeout))
    session = Session(channel, memory, timeout=timeout, **options)
    try:
        with _protocol_mask_without(strip):
            session.connect()
        if model:
            disk = ModelDisk(capacity_of(session))
            session.model = disk
            for queue in session.queues:
                queue.blk.model = disk
        if start:
            session.start()
    except BaseException:
        session.close()
        raise
    return session


@contextlib.contextmanager
def _protocol_mask_without(bits: Sequence[ProtocolFeature]) -> Iterator[None]:
    """Connect as a QEMU that does not know ``bits`` (its VHOST_USER_PROTOCOL_F_MAX mask,
    hw/virtio/vhost-user.c): the session's connect masks the offer with the mask of
    frontend.sequences.agree_protocol."""
    if not bits:
        yield
        return
    from vhost_conformance.frontend import sequences

    saved = sequences.QEMU_PROTOCOL_MASK
    mask = saved
    for bit in bits:
        mask &= ~(1 << bit)
    sequences.QEMU_PROTOCOL_MASK = mask
    try:
        yield
    finally:
        sequences.QEMU_PROTOCOL_MASK = saved


def close_session(session: Session, *, stop: bool = True) -> None:
    """Stop a started session if the back-end still answers, then close it; never raises."""
    if stop and session.started and not session.channel.closed:
        old = session.timeout
        session.timeout = min(old, 2.0)
        with contextlib.suppress(Exception):
            session.stop()
        session.timeout = old
    with contextlib.suppress(Exception):
        session.close()


#: What the ``vhost_target_factory`` fixture gives a case: ``make(label)`` -> another started
#: back-end of the case (a migration destination, a restarted back-end).
MakeTarget = Callable[[str], BackendTarget]


class SessionFactory:
    """What the ``make_session`` fixture returns: ``make_session(target, **options)``."""

    def __init__(
        self, request: pytest.FixtureRequest, timeout: float, capabilities: Capabilities
    ) -> None:
        self.request = request
        self.timeout = timeout
        self.capabilities = capabilities
        self.sessions: list[Session] = []
        self.memories: list[GuestMemory] = []

    def memory(
        self,
        size: int = GUEST_MEMORY,
        *,
        regions: int = 1,
        hole: int = 1 << 20,
        mmap_offset: int = 0,
    ) -> GuestMemory:
        """A new guest RAM closed at teardown (``regions`` non-contiguous GPA ranges)."""
        memory = GuestMemory.simple(size, regions, hole=hole, mmap_offset=mmap_offset)
        self.memories.append(memory)
        return memory

    def __call__(
        self,
        target: BackendTarget,
        *,
        memory: GuestMemory | None = None,
        regions: int = 1,
        mmap_offset: int = 0,
        memory_size: int = GUEST_MEMORY,
        start: bool = True,
        model: bool = True,
        **options: Any,
    ) -> Session:
        """A connected (and started) session on ``target``; see :func:`open_session`. Its
        guest driver models the back-end's device type (``Session.device_type``)."""
        _gate(options, self.capabilities)
        options.setdefault("device_type", self.capabilities.device_type)
        if memory is None:
            memory = self.memory(memory_size, regions=regions, mmap_offset=mmap_offset)
        session = open_session(
            target, timeout=self.timeout, memory=memory, start=start, model=model, **options
        )
        register_trace(self.request, session.channel.trace)
        self.sessions.append(session)
        return session

    def reconnect(self, session: Session, target: BackendTarget) -> None:
        """QEMU's reconnect (``Session.reattach``) on a new connection to ``target``; the new
        connection's messages go to the same wire trace."""
        session.reattach(Channel(target.connect_socket(self.timeout), trace=session.channel.trace))

    def close(self) -> None:
        """Close every session, then every memory."""
        for session in self.sessions:
            close_session(session)
        for memory in self.memories:
            memory.close()
        self.sessions.clear()
        self.memories.clear()


@pytest.fixture
def make_session(
    request: pytest.FixtureRequest, vhost_timeout: float, vhost_capabilities: Capabilities
) -> Iterator[SessionFactory]:
    """``make_session(target, **options)`` -> a started session; all closed at teardown."""
    factory = SessionFactory(request, vhost_timeout, vhost_capabilities)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def vhost_memory() -> Iterator[GuestMemory]:
    """Guest RAM of :data:`GUEST_MEMORY` bytes in one region at GPA 0."""
    memory = GuestMemory.simple(GUEST_MEMORY)
    try:
        yield memory
    finally:
        memory.close()


#: Marker giving ``vhost_session`` its options: ``@pytest.mark.vhost_session(profile="qemu-7.2")``.
SESSION_MARKER = "vhost_session"


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``vhost_session`` marker (this module is also a plugin module)."""
    config.addinivalue_line(
        "markers",
        f"{SESSION_MARKER}(**options): options of the vhost_session fixture (profile, "
        "packed, num_queues, event_idx, indirect, inflight_migration, regions, ...)",
    )


@pytest.fixture
def vhost_session(
    request: pytest.FixtureRequest, make_session: SessionFactory, vhost_target: BackendTarget,
    vhost_memory: GuestMemory,
) -> Session:
    """A connected and started session on ``vhost_target`` (QEMU 11.1.3 sequence unless the
    ``vhost_session`` marker says otherwise, e.g. ``profile="qemu-7.2"``)."""
    marker = request.node.get_closest_marker(SESSION_MARKER)
    options: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    if {"regions", "mmap_offset", "memory_size"} & options.keys():
        return make_session(vhost_target, **options)
    return make_session(vhost_target, memory=vhost_memory, **options)


# --------------------------------------------------------------------------- back-end variants


def restart_variant(
    target: BackendTarget, *, read_only: bool = False, queues: int | None = None
) -> None:
    """Restart ``target`` as a read-only device and/or with ``queues`` queues, where the
    profile's command is one we know how to change: the reference back-end (``--read-only``,
    ``--queues N``) and qemu-storage-daemon (``writable=off``, ``num-queues=N``). Anything
    else: :class:`Unsupported` naming what the profile cannot do."""
    what = " and ".join(
        ([f"{queues} queues"] if queues else []) + (["a read-only device"] if read_only else [])
    )
    if not isinstance(target, CommandTarget) or target.profile.command is None:
        raise Unsupported(what, "the suite does not run this back-end itself")
    profile = target.profile
    command = profile.command
    assert command is not None

    def change(template: str) -> str:
        if "vhost_conformance.backend" in template:
            return (
                template
                + (" --read-only" if read_only else "")
                + (f" --queues {queues}" if queues else "")
            )
        if "type=vhost-user-blk" in template and "writable=on" in template:
            export = "writable=off" if read_only else "writable=on"
            if queues:
                export += f",num-queues={queues}"
            return template.replace("writable=on", export)
        raise Unsupported(what, f"profile {profile.name!r} gives no way to configure it")

    slow = profile.slow_io
    if slow.command is not None:
        slow = dataclasses.replace(slow, command=change(slow.command))
    target.profile = dataclasses.replace(profile, command=change(command), slow_io=slow)
    target.restart()


@contextlib.contextmanager
def slow_disk(target: BackendTarget, latency_ms: int) -> Iterator[None]:
    """Run ``target`` with ``latency_ms`` per request inside the block (the profile's
    ``[slow_io]``: reference ``--latency``, qemu-storage-daemon null-co ``latency-ns``);
    :class:`Unsupported` with the profile's reason where it cannot be slow (DPDK).

    For a back-end we run, this costs one restart: the slow command line is rendered into
    the profile and the back-end restarted once; leaving the block restores the profile
    for the next start without restarting (``BackendTarget.slow_io`` would restart it again,
    which a case that is done with it does not need). Other targets use ``slow_io``.
    """
    if not isinstance(target, CommandTarget) or target.profile.command is None:
        try:
            context = target.slow_io(latency_ms)
            context.__enter__()
        except SlowIoUnsupported as exc:
            raise Unsupported("slow I/O", str(exc)) from None
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                context.__exit__(None, None, None)
        return
    profile = target.profile
    slow = profile.slow_io
    route = profile.slow_io_route()
    if route is None:
        raise Unsupported("slow I/O", f"back-end {profile.name!r}: {profile.slow_io_unsupported()}")
    if route == "disk":
        # the watched disk (suites/watched.py): the latency sits in the filesystem under {disk}
        watching = target.watched_disk(latency_ms, relaunch=False)
        try:
            watching.__enter__()
        except SlowIoUnsupported as exc:
            raise Unsupported("slow I/O", str(exc)) from None
        try:
            yield
        finally:
            watching.__exit__(None, None, None)
        return
    values = {"latency_ms": str(latency_ms), "latency_ns": str(latency_ms * 1_000_000)}

    def fill(template: str) -> str:
        for key, value in values.items():
            template = template.replace("{" + key + "}", value)
        return template

    assert profile.command is not None
    if slow.command is not None:
        command = fill(slow.command)
    else:
        command = f"{profile.command} {fill(slow.args or '')}"
    target.profile = dataclasses.replace(profile, command=command)
    try:
        target.restart()
        yield
    finally:
        target.profile = profile


# --------------------------------------------------------------------------- I/O


def pattern(seed: int, size: int) -> bytes:
    """``size`` bytes that differ per seed and per sector (so misplaced sectors show)."""
    out = bytearray()
    sector = 0
    while len(out) < size:
        head = f"vc seed {seed} sector {sector} ".encode()
        out += (head * (SECTOR_SIZE // len(head) + 1))[:SECTOR_SIZE]
        sector += 1
    return bytes(out[:size])


def split_ring(session: Session, queue: int = 0, *,
               why: str = "the case reads fields only a split ring has") -> SplitVirtqueue:
    """Queue ``queue``'s ring, for a case that reads split-only fields of it (used ring GPA,
    avail_event, used->flags, the published avail->idx) or builds split chains by hand:
    Unsupported (``why``) on a packed ring."""
    vq = session.queues[queue].vq
    if not isinstance(vq, SplitVirtqueue):
        raise Unsupported("a split ring", why)
    return vq


def wait_all(
    session: Session, requests: Sequence[BlkRequest], *, timeout: float | None = None
) -> list[BlkCompletion]:
    """Wait until every one of ``requests`` completed (any queue): ``Session.wait_requests``,
    the front-end's one wait for requests."""
    return session.wait_requests(requests, timeout=timeout)


def expect_status(
    completions: Iterable[BlkCompletion], status: int = BlkStatus.OK, what: str = "request"
) -> None:
    """Every completion has ``status`` and (for reads) data the model accepts."""
    for c in completions:
        if c.status != status:
            name = _status_name(c.status)
            raise IoError(
                f"{what} (type {c.request.type}, sector {c.request.sector}, queue "
                f"{c.request.queue}, head {c.request.head}) status",
                expected=_status_name(status),
                seen=name,
            )
        if c.mismatches:
            raise IoError(
                f"{what} read back other data",
                expected="the data written",
                seen="; ".join(str(m) for m in c.mismatches[:3]),
            )


def _status_name(status: int) -> str:
    try:
        return f"{BlkStatus(status).name} ({status})"
    except ValueError:
        return f"{status:#x} (not a virtio-blk status; 0xff = not written)"


def pending_io(
    session: Session,
    n: int,
    *,
    queue: int = 0,
    kind: str = "read",
    sector: int = 0,
    nsectors: int = 8,
) -> list[BlkRequest]:
    """Submit ``n`` requests (``read`` or ``write``) on ``queue`` and return them without
    waiting (on a slow disk they stay in flight)."""
    blk = session.queues[queue].blk
    requests = []
    for i in range(n):
        at = sector + i * nsectors
        if kind == "write":
            requests.append(blk.write(at, pattern(at, nsectors * SECTOR_SIZE)))
        else:
            requests.append(blk.read(at, nsectors))
    session.submit(queue)
    return requests


def do_io(
    session: Session,
    n: int,
    *,
    queue: int = 0,
    kinds: Sequence[str] = ("write", "read"),
    sector: int = 0,
    nsectors: int = 8,
    segments: int = 1,
    indirect: bool | None = None,
) -> list[BlkCompletion]:
    """``n`` rounds of ``kinds`` (``write``/``read``/``flush``) on ``queue``, each waited for;
    every status must be OK and reads must match the model."""
    blk = session.queues[queue].blk
    out: list[BlkCompletion] = []
    for i in range(n):
        at = sector + i * nsectors
        for kind in kinds:
            if kind == "write":
                request = blk.write(
                    at,
                    pattern(at + 7 * i, nsectors * SECTOR_SIZE),
                    segments=segments,
                    indirect=indirect,
                )
            elif kind == "read":
                request = blk.read(at, nsectors, segments=segments, indirect=indirect)
            elif kind == "flush":
                request = blk.flush()
            else:
                raise ValueError(f"unknown request kind {kind!r}")
            session.submit(queue)
            done = wait_all(session, [request])
            expect_status(done, what=kind)
            out += done
    return out


def write_read_verify(
    session: Session,
    sector: int,
    data: bytes,
    *,
    queue: int = 0,
    segments: int = 1,
    indirect: bool | None = None,
) -> BlkCompletion:
    """Write ``data`` at ``sector``, read it back, require OK twice and the same bytes."""
    blk = session.queues[queue].blk
    write = blk.write(sector, data, segments=segments, indirect=indirect)
    session.submit(queue)
    expect_status(wait_all(session, [write]), what="write")
    read = blk.read(sector, len(data) // SECTOR_SIZE, segments=segments, indirect=indirect)
    session.submit(queue)
    (done,) = wait_all(session, [read])
    expect_status([done], what="read")
    if done.data != data:
        first = (
            next(i for i, (a, b) in enumerate(zip(done.data or b"", data, strict=False)) if a != b)
            if done.data and len(done.data) == len(data)
            else 0
        )
        raise IoError(
            f"read of sector {sector} on queue {queue} after a write",
            expected=f"the {len(data)} bytes written",
            seen=f"{len(done.data or b'')} bytes differing from byte {first}",
        )
    return done


def wait_popped(session: Session, queue: int = 0, *, settle: float = 0.08) -> None:
    """Give the back-end time to take what was published on ``queue`` from the avail ring:
    with EVENT_IDX until avail_event reaches avail->idx (it writes it after popping, VIRTIO
    "Used Buffer Notification Suppression"), never longer than ``settle`` seconds."""
    vq = session.queues[queue].vq
    deadline = time.monotonic() + settle
    watch = has(session.negotiated.acked_features, VirtioFeature.RING_EVENT_IDX) and not vq.packed
    while time.monotonic() < deadline:
        if watch and isinstance(vq, SplitVirtqueue) and vq.avail_event == vq.published_idx:
            return
        time.sleep(0.005)


def call_count(session: Session, queue: int = 0) -> int:
    """Read (and reset) the call eventfd of ``queue``: how often it was signalled, 0 if not."""
    return session.drain_call(queue)


def fd_count(target: BackendTarget) -> int | None:
    """Open fds of the back-end process (/proc/PID/fd), None when we do not run it."""
    pid = getattr(target, "pid", None)
    if not isinstance(pid, int):
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def provoke_config_change(target: BackendTarget) -> str | None:
    """Grow the disk by 1 MiB the way the profile says, so that the back-end sends
    BACKEND_CONFIG_CHANGE_MSG: the image file grown and the profile's ``resize_signal`` sent
    (the reference back-end re-reads the size), or ``block_resize`` on the profile's QMP
    monitor (``resize_qmp``, ``resize_node``: qemu-storage-daemon). Returns None when it was
    done, else why the suite cannot provoke a back-end message here."""
    if not isinstance(target, CommandTarget) or target.profile.command is None:
        return "the suite does not run this back-end itself"
    profile = target.profile
    disk = target.values.get("disk")
    if disk is None or not os.path.isfile(disk):
        return "no disk image file to grow"
    size = os.path.getsize(disk) + (1 << 20)
    if profile.resize_signal is not None:
        os.truncate(disk, size)
        target.send_signal(getattr(signal, profile.resize_signal))
        return None
    if profile.resize_qmp is not None and profile.resize_node is not None:
        path = profile.resize_qmp.format_map(target.values)
        return qmp_block_resize(path, profile.resize_node, size)
    return f"profile {profile.name!r} names no resize_signal or resize_qmp"


def qmp_block_resize(path: str, node: str, size: int, timeout: float = 5.0) -> str | None:
    """``block_resize`` of ``node`` to ``size`` bytes over the QMP socket at ``path``: None
    when QMP returned success, else what went wrong."""
    import json
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            stream = sock.makefile("rwb")
            stream.readline()  # the greeting
            for command in ({"execute": "qmp_capabilities"},
                            {"execute": "block_resize",
                             "arguments": {"node-name": node, "size": size}}):
                stream.write(json.dumps(command).encode() + b"\n")
                stream.flush()
                while True:  # skip events
                    answer = json.loads(stream.readline() or b"{}")
                    if "event" not in answer:
                        break
                if "return" not in answer:
                    return f"QMP {command['execute']}: {answer.get('error', answer)}"
    except (OSError, ValueError) as exc:
        return f"QMP monitor {path}: {exc}"
    return None


def require_command(target: BackendTarget) -> CommandTarget:
    """The target as a CommandTarget (restart, kill), or Unsupported."""
    if not isinstance(target, CommandTarget) or target.profile.command is None:
        raise Unsupported("a back-end command", "the suite does not run this back-end itself")
    return target


def io_at(session: Session, kind: str, sector: int, data_gpa: int, length: int, *,
          scratch_gpa: int, queue: int = 0, timeout: float | None = None) -> int:
    """One ``read``/``write`` whose data buffer is at ``data_gpa`` and whose header and status
    byte are at ``scratch_gpa`` (+0, +16): for cases that place buffers in a chosen region.
    Returns the status byte (0xff: not written). Direct descriptors, waited for."""
    request_type = 1 if kind == "write" else 0  # VIRTIO_BLK_T_OUT / VIRTIO_BLK_T_IN
    session.memory.write(scratch_gpa, struct.pack("<IIQ", request_type, 0, sector))
    session.memory.write(scratch_gpa + 16, b"\xff")
    header, data, status = (scratch_gpa, 16), (data_gpa, length), (scratch_gpa + 16, 1)
    token = object()
    vq = session.queues[queue].vq
    if kind == "write":
        vq.add([header, data], [status], token, indirect=False)
    else:
        vq.add([header], [data, status], token, indirect=False)
    session.submit(queue)
    session.wait_token(queue, token, what=f"{kind} at GPA {data_gpa:#x}", timeout=timeout)
    return session.memory.read(scratch_gpa + 16, 1)[0]


# --------------------------------------------------------------------------- stopping


def partial_start(session: Session, *, vring_bases: Sequence[int] | None = None) -> None:
    """The first half of QEMU's start, up to SET_VRING_ADDR (frontend.sequences: SET_FEATURES,
    the in-flight region, SET_VRING_CALL, memory, then SET_VRING_NUM, BASE and ADDR per queue;
    ``vring_bases``: the SET_VRING_BASE values). :func:`kick_and_enable` finishes it; in
    between the rings exist in memory but are stopped (vhost-user.rst "Ring states": a ring
    starts on SET_VRING_KICK)."""
    session.run_start(vring_bases=vring_bases, until="SET_VRING_ADDR")


def kick_and_enable(
    session: Session, *, inject_kick: bool | None = None, enable: bool = True
) -> None:
    """The second half of QEMU's start, from SET_VRING_KICK: the kick per queue (plus the
    injected kick when the profile does it; ``inject_kick=False`` leaves it out), then
    SET_VRING_ENABLE 1 (unless ``enable=False``) and DRIVER_OK."""
    if inject_kick and not session.profile.inject_kick:
        raise ValueError(f"profile {session.profile.name} has no kick injection")
    without = []
    if inject_kick is False:
        without.append("inject kick")
    if not enable:
        without.append("SET_VRING_ENABLE 1")
    session.run_start(begin="SET_VRING_KICK", without=without)


@dataclasses.dataclass
class Stopped:
    """What a stop with requests outstanding left: the GET_VRING_BASE replies, how long they
    took, used->idx the moment they came, guest memory then, and the requests."""

    bases: list[int]
    elapsed: float
    used_idx_at_reply: list[int]
    snapshot: MemorySnapshot
    requests: list[BlkRequest]
    #: used->idx per queue right before the first GET_VRING_BASE(_SKIP_DRAIN) was sent
    used_idx_before: list[int] = dataclasses.field(default_factory=list)


def stop_now(session: Session, requests: Sequence[BlkRequest] = (), *,
             at_reply: Callable[[], object] | None = None, skip_drain: bool = False) -> Stopped:
    """QEMU's stop (frontend.sequences: SET_VRING_ENABLE 0 per queue, GET_VRING_BASE per
    queue, SET_STATUS 0 when the profile sends it), the GET_VRING_BASE step timed; guest
    memory is snapshotted right after the last reply and every call eventfd drained, before
    SET_STATUS 0. ``at_reply`` runs first thing after the last reply (before the snapshot,
    which takes a while for a large guest memory). ``skip_drain``: the ``qemu-next`` stop
    with GET_VRING_BASE_SKIP_DRAIN."""
    before: list[int] = []
    used: list[int] = []
    snapshot: list[MemorySnapshot] = []
    clock: list[float] = []

    def disabled() -> None:
        before.extend(q.vq.used_idx_in_memory() for q in session.queues)
        clock.append(time.monotonic())

    def replied() -> None:
        clock.append(time.monotonic())
        if at_reply is not None:
            at_reply()
        used.extend(q.vq.used_idx_in_memory() for q in session.queues)
        snapshot.append(session.memory.snapshot())
        for q in session.queues:
            session.drain_call(q.index)

    # begin named: a stop may follow a start made by hand (partial_start, kick_and_enable)
    bases = session.run_stop(begin="SET_VRING_ENABLE 0", skip_drain=skip_drain,
                             after={"SET_VRING_ENABLE 0": disabled, "GET_VRING_BASE": replied})
    elapsed = clock[1] - clock[0]
    return Stopped(bases, elapsed, used, snapshot[0], list(requests), before)


class InflightTracker:
    """The front-end's model of what the in-flight region must say (frontend/inflight.py),
    fed with every request submitted and every used entry reaped through it. Make it before
    the session's first request when :meth:`findings` is wanted (the model counts from 0)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.model = InflightModel(session.num_queues, session.queue_size)
        self.completions: list[BlkCompletion] = []

    def submit(self, requests: Sequence[BlkRequest]) -> list[BlkRequest]:
        """Record ``requests`` (already added to their rings, in avail order)."""
        for r in requests:
            self.model.submit(r.queue, r.head, r.tag)
        return list(requests)

    def reap(self, queue: int = 0) -> list[BlkCompletion]:
        """Consume what the used ring holds now, record it, return the completions."""
        return self._record(queue, self.session.queues[queue].vq.reap())

    def _record(self, queue: int, used: list[tuple[object, int]]) -> list[BlkCompletion]:
        for token, _ in used:
            if isinstance(token, BlkRequest):
                self.model.complete(queue, token.head)
        done = self.session.queues[queue].blk.complete(used)
        self.completions += done
        return done

    def wait(self, queue: int, count: int, *, timeout: float | None = None) -> list[BlkCompletion]:
        """Reap until ``count`` more completions arrived on ``queue`` (BackendHang if not):
        the session's one wait for used entries (``Session.wait_used``), each batch recorded."""
        limit = self.session.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        got: list[BlkCompletion] = []
        while len(got) < count and time.monotonic() < deadline:
            # entries of tokens not the driver's complete nothing: wait on for the rest
            self.session.wait_used(queue, count - len(got), timeout=deadline - time.monotonic(),
                                   on_used=lambda used: got.extend(self._record(queue, used)))
        if len(got) < count:
            raise BackendHang(f"{count - len(got)} of {count} requests not completed",
                              request_name="virtio-blk I/O", timeout=limit)
        return got

    def region(self) -> ParsedRegion:
        """The session's in-flight region, parsed (CaseFailed if its layout is impossible)."""
        region = self.session.inflight
        if region is None:
            raise CaseFailed(
                "in-flight region", expected="one from GET_INFLIGHT_FD", seen="none (mmap_size 0)"
            )
        try:
            return parse_region(
                region.read(),
                num_queues=region.num_queues,
                queue_size=region.queue_size,
                packed=self.session.packed,
            )
        except InflightLayoutError as exc:
            raise CaseFailed(f"in-flight region layout: {exc}") from None

    def findings(self, last_avail_idx: Sequence[int | None] | None = None) -> list[Finding]:
        """Differences between the region and the model (split rings: used->idx from memory,
        ``last_avail_idx`` the GET_VRING_BASE replies, None when there were none)."""
        queues = self.session.queues
        if self.session.packed:
            used: list[int] = [len(self.model.completed(q.index)) % 0x10000 for q in queues]
            avail: list[int | None] = [None] * len(queues)
        else:
            used = [q.vq.used_idx_in_memory() for q in queues]
            avail = list(last_avail_idx) if last_avail_idx is not None else [None] * len(queues)
        return self.model.check(self.region(), used_idx=used, last_avail_idx=avail)


def fail_on_findings(findings: Sequence[Finding], what: str) -> None:
    """CaseFailed listing the MUST findings (the first three in full)."""
    bad = [f for f in findings if f.level == "MUST"]
    if bad:
        raise CaseFailed(f"{what}: {len(bad)} finding(s): " + "; ".join(str(f) for f in bad[:3]))

