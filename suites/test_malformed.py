"""Malformed messages, fd abuse, REPLY_ACK on every message, and disconnects mid start-up.

Families: malformed (VU-MAL-*), memory (VU-FD-4), fuzz (VU-FUZZ-3). TEST-IDEAS.md rows 6, 7, 8,
19, 20. Clauses: vhost-user.rst (QEMU 11.1.3) "Communication", "Message specification",
"REPLY_ACK", per-message sections.

Outcome rules (vhost-user.rst "Communication" lets a back-end close on bad input): after bad
input an error reply (a non-zero REPLY_ACK, a size-0 GET_CONFIG), a closed connection, or the
input ignored are all acceptable; the back-end dying is a ``crash``, no longer answering a
``hang``; and afterwards a new connection must reach a working state (init, start, a write
read back). Where the back-end's pid is known, its open fds (the whole process tree, for
wrapper scripts) must stay bounded.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator, Sequence

from vhost_conformance.frontend.channel import (
    BackendClosed,
    BackendHang,
    BackendNack,
    BackendViolation,
    Channel,
)
from vhost_conformance.frontend.device import InflightHandle, Session
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.frontend.protocol import (
    U64,
    VRING_NOFD_MASK,
    Config,
    FrontendRequest,
    Inflight,
    MemoryRegion,
    Message,
    ProtocolFeature,
    SingleMemoryRegion,
    VirtioFeature,
    VringAddr,
    VringState,
    has,
)
from vhost_conformance.frontend.sequences import agree_protocol
from vhost_conformance.reports.model import Tier
from vhost_conformance.suites.clauses import (
    REPLY_ACK_RESPOND_QUOTE,
    REPLY_ACK_SOLICITED_QUOTE,
    RST,
    quotes,
)
from vhost_conformance.suites.drivers.hostile import (
    RAM_SIZE,
    BackendCrashed,
    Rig,
    backend_fds,
    died,
)
from vhost_conformance.suites.model import (
    MUST,
    SHOULD,
    CaseFailed,
    CaseNonStrict,
    Unsupported,
    case,
)
from vhost_conformance.suites.target import BackendTarget, Capabilities, CommandTarget

F = FrontendRequest
P = ProtocolFeature

#: Growth of the back-end's open fds we tolerate over a case (lazily opened files, logs).
FD_SLACK = 16


# --------------------------------------------------------------------------- drivers


def header(request: int, size: int, flags: int = 0x1) -> bytes:
    """A raw 12-byte header (any values)."""
    return struct.pack("<III", request & 0xFFFF_FFFF, flags & 0xFFFF_FFFF, size & 0xFFFF_FFFF)


def raw(request: int, payload: bytes = b"", flags: int = 0x1) -> bytes:
    """A raw message whose header announces exactly ``payload``."""
    return header(request, len(payload), flags) + payload


def memfd(size: int = 4096, name: str = "vc-malformed") -> int:
    """A fresh memfd of ``size`` bytes (the caller closes it)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@contextlib.contextmanager
def memfds(n: int, size: int = 4096) -> Iterator[list[int]]:
    """``n`` memfds, closed afterwards."""
    fds = [memfd(size) for _ in range(n)]
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


class Link:
    """A raw connection to the back-end under test that reconnects when the back-end closed
    it, counting how often it did."""

    def __init__(self, target: BackendTarget, capabilities: Capabilities, timeout: float) -> None:
        self.target = target
        self.capabilities = capabilities
        self.timeout = timeout
        self.closes = 0
        self.channel: Channel | None = None

    def open(self, *, protocol: int | None = None, owner: bool = True) -> Channel:
        """A new connection: GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES
        (``protocol`` & offer, default all QEMU knows), SET_OWNER unless ``owner=False``."""
        self.close()
        channel = Channel(self.target.connect_socket(self.timeout))
        self.channel = channel
        channel.call(F.GET_FEATURES, timeout=self.timeout)
        if self.capabilities.offers(VirtioFeature.PROTOCOL_FEATURES):
            # asked on every connection, as QEMU does: rust-vmm's vhost (virtiofsd) enables
            # REPLY_ACK only for protocol features it offered on this connection (without it,
            # VU-FD-4's NEED_REPLY got no reply)
            reply = channel.call(F.GET_PROTOCOL_FEATURES, timeout=self.timeout)
            assert reply is not None  # a request with a reply of its own
            offered = U64.decode(reply.payload).value
            # QEMU's rule, the one Session.connect uses (frontend.sequences.agree_protocol)
            chosen = agree_protocol(offered, wanted=protocol)
            channel.call(F.SET_PROTOCOL_FEATURES, U64(chosen), timeout=self.timeout)
            channel.protocol_features = chosen
        if owner:
            channel.call(F.SET_OWNER, timeout=self.timeout)
        return channel

    def close(self) -> None:
        """Close the current connection."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def ensure(self, **kwargs: object) -> Channel:
        """The current connection, or a new one if the back-end closed it."""
        if self.channel is None or self.channel.closed:
            return self.open(**kwargs)  # type: ignore[arg-type]
        return self.channel

    def probe(self) -> str:
        """After bad input: ``"answered"`` (GET_FEATURES still answered; replies to the bad
        input are read past) or ``"closed"``. A back-end that answers nothing: BackendHang."""
        channel = self.channel
        assert channel is not None
        try:
            channel.send(F.GET_FEATURES)
            deadline = time.monotonic() + self.timeout
            for _ in range(4):
                # read raw: a reply to bad input may carry an id our codec refuses to parse
                request, flags = _read_any(channel.sock, deadline, self.timeout)
                if request == F.GET_FEATURES and flags & 0x4:
                    return "answered"
        except BackendClosed:
            self.closes += 1
            self.close()
            return "closed"
        raise CaseFailed(
            "after bad input the back-end sent several replies that answer nothing we asked"
        )

    def send_bad(self, data: bytes, fds: Sequence[int] = ()) -> str:
        """Send raw bytes and probe; a back-end that closed before we could send: closed."""
        channel = self.ensure()
        try:
            channel.send_raw(data, fds)
        except BackendClosed:
            self.closes += 1
            self.close()
            return "closed"
        return self.probe()


def works_afterwards(target: BackendTarget, capabilities: Capabilities, timeout: float) -> None:
    """The back-end lives and a new connection reaches a working state (init, start, a write
    read back): CaseFailed/hang/crash otherwise."""
    Rig(target, capabilities, timeout, restart=False).final_check()


def fds_bounded(target: BackendTarget, before: int | None, what: str) -> None:
    """CaseFailed when the back-end's fd count grew by more than FD_SLACK since ``before``."""
    if before is None:
        return
    after = backend_fds(target)
    if after is not None and after > before + FD_SLACK:
        raise CaseFailed(f"back-end open fds after {what}", expected=f"<= {before + FD_SLACK}",
                         seen=f"{after} (from {before})")


def _read_any(sock: socket.socket, deadline: float, timeout: float) -> tuple[int, int]:
    """Read one whole message of any id (its fds closed): (request, flags). BackendClosed at
    EOF, BackendHang at the deadline."""
    import array

    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendHang(
                    "no reply to GET_FEATURES after bad input",
                    request_name="GET_FEATURES",
                    timeout=timeout,
                )
            sock.settimeout(left)
            try:
                data, anc, _flags, _addr = sock.recvmsg(n - len(buf), socket.CMSG_SPACE(64 * 4))
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                raise BackendClosed("connection reset") from None
            finally:
                sock.settimeout(None)
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(cdata[: len(cdata) - len(cdata) % 4])
                    for fd in fds:
                        os.close(fd)
            if not data:
                raise BackendClosed("EOF")
            buf += data
        return buf

    request, flags, size = struct.unpack("<III", exact(12))
    if size > 1 << 16:
        raise CaseFailed("a reply header after bad input", expected="a payload size <= 2056",
                         seen=f"{size} bytes (request {request}, flags {flags:#x})")
    if size:
        exact(size)
    return request, flags


def _run_variants(link: Link, variants: Sequence[tuple[str, bytes, int]]) -> list[str]:
    """Send each (name, bytes, number of memfds to attach) on a connection, probing after each;
    a back-end that died is a crash naming the variant."""
    seen = []
    for name, data, nfds in variants:
        with memfds(nfds) as fds:
            try:
                outcome = _send_one(link, data, fds)  # a close may be a death in progress
            finally:
                _crashed_after(link.target, name)
        seen.append(f"{name}: {outcome}")
    return seen


def variants_then_works(
    case_id: str,
    target: BackendTarget,
    capabilities: Capabilities,
    timeout: float,
    variants: Sequence[tuple[str, bytes, int]],
) -> None:
    """The variants on one new connection (:func:`_run_variants`), then a new connection that
    must work; prints what each variant got."""
    link = Link(target, capabilities, timeout)
    link.open()
    seen = _run_variants(link, variants)
    link.close()
    works_afterwards(target, capabilities, timeout)
    print(f"{case_id}: " + "; ".join(seen))


def _send_one(link: Link, data: bytes, fds: Sequence[int]) -> str:
    """send_bad, then a moment for a back-end that closed to be seen dead if it is dying."""
    outcome = link.send_bad(data, fds)
    if outcome == "closed" and isinstance(link.target, CommandTarget):
        link.target.wait_exit(0.1)
    return outcome


def _crashed_after(target: BackendTarget, what: str) -> None:
    """BackendCrashed naming ``what`` when the back-end process died."""
    if isinstance(target, CommandTarget) and target.alive():
        return
    if isinstance(target, CommandTarget):
        target.wait_exit(0.5)
    death = died(target)
    if death is not None:
        raise BackendCrashed(f"after {what}: {death}")


# --------------------------------------------------------------------------- header and sizes


@case(
    "VU-MAL-1", title="Unknown request id", family="malformed", level=MUST,
    clause=f"{RST} Communication",
    requirement="A request id the back-end does not know gets an error or a closed connection, "
        "never a crash; a new connection works.",
)
def test_unknown_request_ids(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """Unknown request ids get an error or a closed connection, never a crash."""
    variants_then_works(
        "VU-MAL-1", vhost_target, vhost_capabilities, vhost_timeout,
        [
            ("id 0", raw(0), 0),
            ("id 45 (GET_VRING_BASE_SKIP_DRAIN, bit 23 not agreed)", raw(45, bytes(8)), 0),
            ("id 99 with NEED_REPLY", raw(99, flags=0x9), 0),
            ("id 0x7fffffff", raw(0x7FFF_FFFF, bytes(8)), 0),
            ("id 0xffffffff with an fd", raw(0xFFFF_FFFF), 1),
        ],
    )


def _wrong_sizes() -> list[tuple[str, bytes, int]]:
    return [
        ("SET_FEATURES with 4 bytes", raw(F.SET_FEATURES, bytes(4)), 0),
        ("SET_PROTOCOL_FEATURES with 0 bytes", raw(F.SET_PROTOCOL_FEATURES), 0),
        ("SET_VRING_NUM with 4 bytes", raw(F.SET_VRING_NUM, bytes(4)), 0),
        ("SET_VRING_BASE with 12 bytes", raw(F.SET_VRING_BASE, bytes(12)), 0),
        ("SET_VRING_ADDR with 16 bytes", raw(F.SET_VRING_ADDR, bytes(16)), 0),
        ("GET_VRING_BASE with 0 bytes", raw(F.GET_VRING_BASE), 0),
        ("SET_VRING_ENABLE with 2 bytes", raw(F.SET_VRING_ENABLE, bytes(2)), 0),
        ("SET_VRING_CALL with 4 bytes and an fd", raw(F.SET_VRING_CALL, bytes(4)), 1),
        ("GET_CONFIG with 4 bytes", raw(F.GET_CONFIG, bytes(4)), 0),
        (
            "GET_CONFIG announcing 36 config bytes, carrying 8",
            raw(F.GET_CONFIG, struct.pack("<III", 0, 36, 0) + bytes(8)),
            0,
        ),
        ("SET_MEM_TABLE with 4 bytes and an fd", raw(F.SET_MEM_TABLE, bytes(4)), 1),
        (
            "SET_MEM_TABLE saying 2 regions, carrying 1, 2 fds",
            raw(F.SET_MEM_TABLE, struct.pack("<II", 2, 0) + bytes(32)),
            2,
        ),
        ("ADD_MEM_REG with 8 bytes and an fd", raw(F.ADD_MEM_REG, bytes(8)), 1),
        ("SET_STATUS with 1 byte", raw(F.SET_STATUS, bytes(1)), 0),
        ("GET_FEATURES with an 8-byte payload", raw(F.GET_FEATURES, bytes(8)), 0),
        ("SET_OWNER with a 64-byte payload", raw(F.SET_OWNER, bytes(64)), 0),
    ]


@case(
    "VU-MAL-2", title="Payload size not the layout's", family="malformed", level=MUST,
    clause=f"{RST} Message specification",
    requirement="A request whose size does not match its layout (e.g. SET_VRING_NUM with 4 bytes) "
        "is refused without a crash.",
)
def test_wrong_payload_sizes(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """Fixed-size requests with another payload size are refused without a crash."""
    before = backend_fds(vhost_target)
    link = Link(vhost_target, vhost_capabilities, vhost_timeout)
    link.open()
    seen = _run_variants(link, _wrong_sizes())
    link.close()
    works_afterwards(vhost_target, vhost_capabilities, vhost_timeout)
    fds_bounded(vhost_target, before, "wrong-size messages")
    print("VU-MAL-2: " + "; ".join(seen))


@case(
    "VU-MAL-3", title="Header size beyond any payload", family="malformed", level=MUST,
    clause=f"{RST} Message specification: Header",
    requirement="A header announcing more payload than any message has makes the back-end close "
        "or refuse, without a crash.",
)
def test_size_beyond_any_payload(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """A header announcing more than the payload union (2056 bytes) is refused or closed."""
    link = Link(vhost_target, vhost_capabilities, vhost_timeout)
    link.open()
    seen = _run_variants(
        link,
        [
            (
                "SET_VRING_NUM announcing and carrying 4096 bytes",
                raw(F.SET_VRING_NUM, bytes(4096)),
                0,
            ),
            (
                "GET_FEATURES announcing and carrying 65536 bytes",
                raw(F.GET_FEATURES, bytes(65536)),
                0,
            ),
        ],
    )
    # a size no one will ever send in full: the back-end must not wait for it forever after
    # the connection is gone
    channel = link.ensure()
    channel.send_raw(header(F.SET_VRING_NUM, 0xFFFF_FFF0) + bytes(64))
    link.close()
    works_afterwards(vhost_target, vhost_capabilities, vhost_timeout)
    print("VU-MAL-3: " + "; ".join(seen))


@case(
    "VU-MAL-4", title="Wrong version bits", family="malformed", level=SHOULD,
    clause=f"{RST} Message specification: Header",
    requirement="A request with version bits other than 1 is refused.",
)
def test_wrong_version_bits(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """GET_FEATURES with version bits 0, 2 or 3 is refused (no reply, or a closed connection)."""
    link = Link(vhost_target, vhost_capabilities, vhost_timeout)
    accepted = []
    for flags in (0x0, 0x2, 0x3):
        channel = link.open()
        channel.send_raw(raw(F.GET_FEATURES, flags=flags))
        try:
            reply = channel.recv(min(vhost_timeout, 0.5), awaiting="GET_FEATURES (bad version)")
        except BackendClosed:
            continue
        except BackendHang:
            link.probe()  # refused silently: it must still answer a good request
            continue
        if reply.request == F.GET_FEATURES:
            accepted.append(f"{flags:#x}")
    link.close()
    works_afterwards(vhost_target, vhost_capabilities, vhost_timeout)
    if accepted:
        raise CaseNonStrict(
            "GET_FEATURES with version bits " + ", ".join(accepted) + " was answered like a "
            "valid request (vhost-user.rst: the version is 0x1)"
        )


# --------------------------------------------------------------------------- fds


@case(
    "VU-MAL-5", title="SET_MEM_TABLE fds do not match regions", family="malformed", level=MUST,
    clause=f"{RST} Front-end message types: SET_MEM_TABLE",
    requirement="SET_MEM_TABLE with fewer or more fds than regions, or more than 8 regions, is "
        "refused without a crash or leak.",
)
def test_mem_table_fds_do_not_match(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """SET_MEM_TABLE with fewer or more fds than regions, or 9 regions, is refused, no leak."""
    before = backend_fds(vhost_target)

    def table(n: int) -> bytes:
        regions = b"".join(
            MemoryRegion(i << 24, 4096, 0x7F00_0000_0000 + (i << 24), 0).encode() for i in range(n)
        )
        return raw(F.SET_MEM_TABLE, struct.pack("<II", n, 0) + regions)

    link = Link(vhost_target, vhost_capabilities, vhost_timeout)
    link.open()
    seen = _run_variants(
        link,
        [
            ("2 regions, 1 fd", table(2), 1),
            ("1 region, 2 fds", table(1), 2),
            ("1 region, no fd", table(1), 0),
            ("9 regions, 9 fds", table(9), 9),
            ("0 regions, 1 fd", table(0), 1),
        ],
    )
    link.close()
    works_afterwards(vhost_target, vhost_capabilities, vhost_timeout)
    fds_bounded(vhost_target, before, "SET_MEM_TABLE with mismatched fds")
    print("VU-MAL-5: " + "; ".join(seen))


def _require_pid(target: BackendTarget) -> int:
    count = backend_fds(target)
    if count is None:
        raise Unsupported("a process id", "the back-end's /proc/PID/fd cannot be counted here")
    return count


@case(
    "VU-MAL-6", title="Surplus fds are not leaked", family="malformed", level=MUST,
    clause=f"{RST} Communication",
    requirement="1,000 messages carrying fds they should not leave the back-end's open fd count "
        "bounded (CVE-2022-0669).",
    needs=["command"], leak=True,
)
def test_surplus_fds_are_not_leaked(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float,
    vhost_measurements: dict[str, float]
) -> None:
    """1,000 messages carrying fds they should not: the open fd count stays bounded."""
    _require_pid(vhost_target)
    link = Link(vhost_target, vhost_capabilities, vhost_timeout)
    link.open()
    kinds = [
        (F.GET_FEATURES, b""),
        (F.GET_PROTOCOL_FEATURES, b""),
        (F.SET_VRING_NUM, VringState(0, 128).encode()),
    ]
    baseline: int | None = None
    with memfds(2) as fds:
        for i in range(1000):
            if i == 20:
                baseline = backend_fds(vhost_target)
            request, payload = kinds[i % len(kinds)]
            channel = link.ensure()
            try:
                channel.send_raw(raw(request, payload), fds)
                if request != F.SET_VRING_NUM:
                    reply = channel.recv(
                        vhost_timeout, awaiting=request.name, close_surplus_fds=True
                    )
                    for fd in reply.fds:
                        os.close(fd)
            except BackendClosed:
                link.closes += 1
                link.close()
    link.probe() if link.channel is not None else None
    after = backend_fds(vhost_target)
    link.close()
    vhost_measurements["connections_closed"] = float(link.closes)
    if baseline is not None and after is not None:
        vhost_measurements["fds.baseline"] = float(baseline)
        vhost_measurements["fds.after"] = float(after)
        if after > baseline + FD_SLACK:
            raise CaseFailed(
                "back-end open fds after 1,000 messages with 2 surplus fds each (CVE-2022-0669)",
                expected=f"<= {baseline + FD_SLACK}",
                seen=f"{after} (from {baseline})",
            )
    works_afterwards(vhost_target, vhost_capabilities, vhost_timeout)


@case(
    "VU-MAL-12", title="Missing fds", family="malformed", level=MUST, clause=f"{RST} Communication",
    requirement="A message that must carry an fd (SET_VRING_KICK/CALL/ERR without the NOFD bit, "
        "ADD_MEM_REG, SET_INFLIGHT_FD, SET_BACKEND_REQ_FD, SET_LOG_BASE) sent without one is "
        "refused without a crash.",
)
def test_missing_fds(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """Messages that must carry an fd, sent without: refused without a crash."""
    caps = vhost_capabilities
    variants = [
        ("SET_VRING_KICK without NOFD, no fd", raw(F.SET_VRING_KICK, U64(0).encode()), 0),
        ("SET_VRING_CALL without NOFD, no fd", raw(F.SET_VRING_CALL, U64(0).encode()), 0),
        ("SET_VRING_ERR without NOFD, no fd", raw(F.SET_VRING_ERR, U64(0).encode()), 0),
        (
            "SET_MEM_TABLE of 1 region, no fd",
            raw(
                F.SET_MEM_TABLE,
                struct.pack("<II", 1, 0) + MemoryRegion(0, 4096, 0x7F00_0000_0000, 0).encode(),
            ),
            0,
        ),
    ]
    region = SingleMemoryRegion(MemoryRegion(0, 4096, 0x7F00_0000_0000, 0)).encode()
    if caps.offers(P.CONFIGURE_MEM_SLOTS):
        variants.append(("ADD_MEM_REG, no fd", raw(F.ADD_MEM_REG, region), 0))
    if caps.offers(P.INFLIGHT_SHMFD):
        variants.append(
            (
                "SET_INFLIGHT_FD, no fd",
                raw(F.SET_INFLIGHT_FD, Inflight(4096, 0, 1, 128).encode()),
                0,
            )
        )
    if caps.offers(P.BACKEND_REQ):
        variants.append(("SET_BACKEND_REQ_FD, no fd", raw(F.SET_BACKEND_REQ_FD), 0))
    if caps.offers(P.LOG_SHMFD):
        variants.append(("SET_LOG_BASE, no fd", raw(F.SET_LOG_BASE, bytes(16)), 0))
    variants_then_works("VU-MAL-12", vhost_target, vhost_capabilities, vhost_timeout, variants)


# --------------------------------------------------------------------------- rings and config


@case(
    "VU-MAL-7", title="Bad ring sizes", family="malformed", level=SHOULD,
    clause=f"{RST} Front-end message types: SET_VRING_NUM",
    requirement="SET_VRING_NUM with 0, a size beyond 32768, or (split) not a power of 2 is "
        "refused.",
)
def test_bad_ring_sizes(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """SET_VRING_NUM 0, 32769 and (split) 100 are refused: a non-zero ack or a close."""
    if not vhost_capabilities.offers(P.REPLY_ACK):
        raise Unsupported(
            P.REPLY_ACK, "without acks a refusal that keeps the connection is invisible"
        )
    link = Link(vhost_target, vhost_capabilities, vhost_timeout)
    accepted = []
    for num in (0, 32769, 100):
        channel = link.ensure()
        features = vhost_capabilities.features & ~(1 << VirtioFeature.RING_PACKED)
        features &= ~(1 << VirtioFeature.LOG_ALL)
        channel.call(F.SET_FEATURES, U64(features), timeout=vhost_timeout)
        try:
            channel.send(F.SET_VRING_NUM, VringState(0, num), need_reply=True)
            reply = channel.recv(vhost_timeout, awaiting="SET_VRING_NUM")
        except BackendClosed:
            link.close()
            continue
        if reply.request == F.SET_VRING_NUM and reply.payload == U64(0).encode():
            accepted.append(str(num))
    link.close()
    works_afterwards(vhost_target, vhost_capabilities, vhost_timeout)
    if accepted:
        raise CaseNonStrict("SET_VRING_NUM with size " + ", ".join(accepted) + " acked 0 (success)")


@case(
    "VU-MAL-8", title="Vring index out of range", family="malformed", level=MUST,
    clause=f"{RST} Front-end message types",
    requirement="SET_VRING_* and GET_VRING_BASE naming a queue the back-end does not have are "
        "refused without a crash.",
)
def test_vring_index_out_of_range(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """SET_VRING_* and GET_VRING_BASE naming a queue that does not exist: no crash or hang."""
    bad = max(vhost_capabilities.queue_num or 1, 200)
    addr = VringAddr(bad, 0, 0x7F00_0000_0000, 0x7F00_0000_1000, 0x7F00_0000_2000, 0x1000)
    variants_then_works(
        "VU-MAL-8", vhost_target, vhost_capabilities, vhost_timeout,
        [
            ("SET_VRING_NUM", raw(F.SET_VRING_NUM, VringState(bad, 128).encode()), 0),
            ("SET_VRING_BASE", raw(F.SET_VRING_BASE, VringState(bad, 0).encode()), 0),
            ("SET_VRING_ADDR", raw(F.SET_VRING_ADDR, addr.encode()), 0),
            ("SET_VRING_ENABLE", raw(F.SET_VRING_ENABLE, VringState(bad, 1).encode()), 0),
            ("SET_VRING_KICK index 255", raw(F.SET_VRING_KICK, U64(255).encode()), 1),
            ("SET_VRING_CALL index 255", raw(F.SET_VRING_CALL, U64(255).encode()), 1),
            (
                "SET_VRING_ERR index 255, NOFD",
                raw(F.SET_VRING_ERR, U64(255 | VRING_NOFD_MASK).encode()),
                0,
            ),
            ("GET_VRING_BASE", raw(F.GET_VRING_BASE, VringState(bad, 0).encode()), 0),
            (
                "GET_VRING_BASE index 0xffffffff",
                raw(F.GET_VRING_BASE, VringState(0xFFFF_FFFF, 0).encode()),
                0,
            ),
        ],
    )


@case(
    "VU-MAL-9", title="Truncated message, then close", family="malformed", level=MUST,
    clause=f"{RST} Communication",
    requirement="A header followed by part of its payload and a close leaves the back-end alive "
        "for a new connection.",
)
def test_truncated_message_then_close(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """Part of a message, then EOF: the back-end lives and serves a new connection."""
    before = backend_fds(vhost_target)
    link = Link(vhost_target, vhost_capabilities, vhost_timeout)
    addr = VringAddr(0, 0, 0x7F00_0000_0000, 0x7F00_0000_1000, 0x7F00_0000_2000, 0).encode()
    table = struct.pack("<II", 1, 0) + MemoryRegion(0, 4096, 0x7F00_0000_0000, 0).encode()
    for data, nfds in (
        (header(F.GET_FEATURES, 0)[:5], 0),
        (header(F.SET_VRING_ADDR, len(addr)) + addr[:10], 0),
        (header(F.SET_MEM_TABLE, len(table)) + table[:20], 1),
        (header(F.SET_VRING_CALL, 8), 1),
    ):
        channel = link.open()
        with memfds(nfds) as fds, contextlib.suppress(BackendClosed):
            channel.send_raw(data, fds)
        link.close()
    works_afterwards(vhost_target, vhost_capabilities, vhost_timeout)
    fds_bounded(vhost_target, before, "truncated messages")


@case(
    "VU-MAL-10", title="GET_CONFIG beyond the config space", family="malformed", level=MUST,
    clause=f"{RST} Front-end message types: GET_CONFIG",
    requirement="GET_CONFIG with size over 256 or offset+size past the config gets a size-0 error "
        "reply or a refusal, without a crash.",
    requires=[ProtocolFeature.CONFIG],
)
def test_get_config_beyond_config_space(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """GET_CONFIG past 256 bytes or past the config: a size-0 reply, a refusal or a close."""
    variants_then_works(
        "VU-MAL-10", vhost_target, vhost_capabilities, vhost_timeout,
        [
            (
                "offset 0 size 300",
                raw(F.GET_CONFIG, struct.pack("<III", 0, 300, 0) + bytes(300)),
                0,
            ),
            ("offset 250 size 20", raw(F.GET_CONFIG, Config(250, 20, 0, bytes(20)).encode()), 0),
            (
                "offset 0xfffffff0 size 16",
                raw(F.GET_CONFIG, Config(0xFFFF_FFF0, 16, 0, bytes(16)).encode()),
                0,
            ),
            (
                "SET_CONFIG offset 0xfffffff0 size 16",
                raw(F.SET_CONFIG, Config(0xFFFF_FFF0, 16, 0, bytes(16)).encode()),
                0,
            ),
        ],
    )


@case(
    "VU-MAL-11", title="Requests for features not negotiated", family="malformed", level=MUST,
    clause=f"{RST} Protocol features",
    requirement="GET_INFLIGHT_FD, GET_CONFIG or ADD_MEM_REG sent without their protocol feature "
        "negotiated are refused without a crash.",
)
def test_requests_for_features_not_negotiated(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """Feature-gated requests with no protocol feature negotiated: refused, no crash."""
    link = Link(vhost_target, vhost_capabilities, vhost_timeout)
    link.ensure(protocol=0)
    region = SingleMemoryRegion(MemoryRegion(0, 4096, 0x7F00_0000_0000, 0)).encode()
    seen = []
    for name, data, nfds in [
        ("GET_INFLIGHT_FD", raw(F.GET_INFLIGHT_FD, Inflight(0, 0, 1, 128).encode()), 0),
        ("GET_CONFIG", raw(F.GET_CONFIG, Config.request(0, 36).encode()), 0),
        ("ADD_MEM_REG", raw(F.ADD_MEM_REG, region), 1),
        ("GET_STATUS", raw(F.GET_STATUS), 0),
        ("GET_MAX_MEM_SLOTS", raw(F.GET_MAX_MEM_SLOTS), 0),
        ("SET_BACKEND_REQ_FD", raw(F.SET_BACKEND_REQ_FD), 1),
    ]:
        link.ensure(protocol=0)
        with memfds(nfds) as fds:
            try:
                seen.append(f"{name}: {_send_one(link, data, fds)}")
            finally:
                _crashed_after(link.target, f"{name} without its protocol feature")
    link.close()
    works_afterwards(vhost_target, vhost_capabilities, vhost_timeout)
    print("VU-MAL-11: " + "; ".join(seen))


# --------------------------------------------------------------------------- in-flight


@case(
    "VU-MAL-13", title="GET_INFLIGHT_FD with a short payload", family="malformed", level=MUST,
    clause=f"{RST} Front-end message types: GET_INFLIGHT_FD",
    requirement="GET_INFLIGHT_FD or SET_INFLIGHT_FD with no payload or a truncated one gets an "
        "error or a closed connection, never a crash; a new connection works.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD],
)
def test_inflight_messages_with_short_payloads(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """GET/SET_INFLIGHT_FD with no or truncated payloads: an error or a close, never a crash."""
    before = backend_fds(vhost_target)
    link = Link(vhost_target, vhost_capabilities, vhost_timeout)
    link.open()
    seen = _run_variants(
        link,
        [
            ("GET_INFLIGHT_FD without payload", raw(F.GET_INFLIGHT_FD), 0),
            ("GET_INFLIGHT_FD with 8 bytes", raw(F.GET_INFLIGHT_FD, bytes(8)), 0),
            (
                "GET_INFLIGHT_FD with num_queues 0",
                raw(F.GET_INFLIGHT_FD, Inflight(0, 0, 0, 128).encode()),
                0,
            ),
            (
                "GET_INFLIGHT_FD with queue_size 0",
                raw(F.GET_INFLIGHT_FD, Inflight(0, 0, 1, 0).encode()),
                0,
            ),
            ("SET_INFLIGHT_FD without payload, an fd", raw(F.SET_INFLIGHT_FD), 1),
            ("SET_INFLIGHT_FD with 12 bytes, an fd", raw(F.SET_INFLIGHT_FD, bytes(12)), 1),
            (
                "SET_INFLIGHT_FD mmap_size beyond the fd",
                raw(F.SET_INFLIGHT_FD, Inflight(1 << 30, 0, 1, 128).encode()),
                1,
            ),
            (
                "SET_INFLIGHT_FD mmap_offset beyond the fd",
                raw(F.SET_INFLIGHT_FD, Inflight(4096, 1 << 40, 1, 128).encode()),
                1,
            ),
        ],
    )
    link.close()
    works_afterwards(vhost_target, vhost_capabilities, vhost_timeout)
    fds_bounded(vhost_target, before, "malformed in-flight messages")
    print("VU-MAL-13: " + "; ".join(seen))


def _maps_named(target: BackendTarget, name: str) -> int | None:
    pid = getattr(target, "pid", None)
    if not isinstance(pid, int):
        return None
    try:
        with open(f"/proc/{pid}/maps") as f:
            return sum(1 for line in f if name in line)
    except OSError:
        return None


@case(
    "VU-MAL-14", title="SET_INFLIGHT_FD twice, two regions", family="malformed", level=MUST,
    clause=f"{RST} Inflight I/O tracking",
    requirement="Repeated SET_INFLIGHT_FD alternating two regions (each of the size "
        "GET_INFLIGHT_FD gave) leaks no fd or mapping and the last region is the one the back-end "
        "tracks requests in.",
    requires=[ProtocolFeature.INFLIGHT_SHMFD], needs=["command"], leak=True,
)
def test_set_inflight_fd_twice(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """SET_INFLIGHT_FD repeated with two regions (each of the size GET_INFLIGHT_FD gave): no
    fd/mapping leak; the last region is the one the back-end tracks in (its used_idx follows
    the ring, the other stays put).

    Both regions have the size GET_INFLIGHT_FD gave for these queues: a region 2-4 times too
    large is inconsistent with num_queues/queue_size, the spec does not ask a back-end to
    accept it (it may close the connection), so it would prove nothing here."""
    from vhost_conformance.suites.drivers import do_io

    memory = GuestMemory.simple(RAM_SIZE)
    session = Session(
        Channel(vhost_target.connect_socket(vhost_timeout)), memory, timeout=vhost_timeout
    )
    regions: list[InflightHandle] = []
    try:
        session.connect()
        features = session.driver_features()
        session.set_features(features)
        first = session.get_inflight_fd()
        if first is None:
            raise Unsupported(P.INFLIGHT_SHMFD, "GET_INFLIGHT_FD returned mmap_size 0")
        size = first.mmap_size
        regions = [
            InflightHandle.from_bytes(bytes(size), 1, session.queue_size),
            InflightHandle.from_bytes(bytes(size), 1, session.queue_size),
        ]
        before = backend_fds(vhost_target)
        maps_before = _maps_named(vhost_target, "vc-inflight-dst")
        for i in range(20):
            session.set_inflight_fd(regions[i % 2])
        session.set_inflight_fd(regions[0])  # the last one given wins
        # SET_INFLIGHT_FD has no reply: a request that has one (QEMU's GET_FEATURES barrier)
        # makes sure all 21 were handled before anything is measured. Without it nothing
        # waited for the back-end to read them: DPDK writes desc_num into each region it is
        # given (lib/vhost vhost_user_set_inflight_fd), and when that write into regions[1]
        # came after the copy below (a loaded machine) the case failed.
        session.call(F.GET_FEATURES)
        fds_bounded(vhost_target, before, "21 SET_INFLIGHT_FD")
        maps_after = _maps_named(vhost_target, "vc-inflight-dst")
        if maps_before is not None and maps_after is not None and maps_after > maps_before + 2:
            raise CaseFailed("in-flight mappings kept by the back-end after 21 SET_INFLIGHT_FD",
                             expected=f"<= {maps_before + 2}", seen=maps_after)
        loser = regions[1].read()
        session.inflight = regions[0]
        session.start(inflight=regions[0])
        do_io(session, 2)
        used = session.queues[0].vq.used_idx_in_memory()
        (region_used,) = struct.unpack_from("<H", regions[0].read(), 14)
        if region_used != used:
            raise CaseFailed("used_idx in the last region given by SET_INFLIGHT_FD", expected=used,
                             seen=region_used)
        if regions[1].read() != loser:
            raise CaseFailed(
                "an earlier SET_INFLIGHT_FD region was written after the last one replaced it",
                expected="unchanged",
                seen="changed",
            )
    finally:
        session.inflight = None
        with contextlib.suppress(Exception):
            session.close()
        for region in regions:
            region.close()
        memory.close()
    works_afterwards(vhost_target, vhost_capabilities, vhost_timeout)


# --------------------------------------------------------------------------- ordering


@case(
    "VU-MAL-15", title="Messages before SET_OWNER", family="malformed", level=MUST,
    clause=f"{RST} Front-end message types: SET_OWNER",
    requirement="Session messages (SET_FEATURES, memory, SET_VRING_*) sent before SET_OWNER are "
        "refused or accepted, never a crash; a new connection works.",
)
def test_messages_before_set_owner(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """Session messages before SET_OWNER: refused or accepted, never a crash."""
    link = Link(vhost_target, vhost_capabilities, vhost_timeout)
    seen = []
    region = SingleMemoryRegion(MemoryRegion(0, 4096, 0x7F00_0000_0000, 0)).encode()
    features = vhost_capabilities.features & ~(1 << VirtioFeature.LOG_ALL)
    for name, data, nfds in [
        ("SET_FEATURES", raw(F.SET_FEATURES, U64(features).encode()), 0),
        ("SET_VRING_NUM", raw(F.SET_VRING_NUM, VringState(0, 128).encode()), 0),
        ("SET_VRING_CALL", raw(F.SET_VRING_CALL, U64(0).encode()), 1),
        ("SET_MEM_TABLE", raw(F.SET_MEM_TABLE, struct.pack("<II", 1, 0) + region[8:]), 1),
        ("GET_VRING_BASE", raw(F.GET_VRING_BASE, VringState(0, 0).encode()), 0),
    ]:
        link.ensure(owner=False)
        with memfds(nfds) as fds:
            try:
                seen.append(f"{name}: {_send_one(link, data, fds)}")
            finally:
                _crashed_after(link.target, f"{name} before SET_OWNER")
    link.close()
    works_afterwards(vhost_target, vhost_capabilities, vhost_timeout)
    print("VU-MAL-15: " + "; ".join(seen))


class _NeedReplyEverywhere(Channel):
    """A channel that sets NEED_REPLY on every request but SET_PROTOCOL_FEATURES (whose ack
    would depend on the features it is negotiating), and optionally hides REPLY_ACK."""

    def __init__(self, sock: socket.socket, *, hide_reply_ack: bool) -> None:
        super().__init__(sock)
        self.hide_reply_ack = hide_reply_ack
        self.sent: list[str] = []
        self.echoed: set[str] = set()

    def call(self, request: int, payload: object = None, **kwargs: object) -> Message | None:
        if request == F.SET_PROTOCOL_FEATURES and self.hide_reply_ack:
            assert isinstance(payload, U64)
            payload = U64(payload.value & ~(1 << P.REPLY_ACK))
        elif request != F.SET_PROTOCOL_FEATURES:
            kwargs["need_reply"] = True
        self.sent.append(FrontendRequest(request).name)
        return super().call(request, payload, **kwargs)  # type: ignore[arg-type]

    def _validate_reply(
        self, request: FrontendRequest, sent: bytes, reply: Message, *, defined: bool
    ) -> None:
        # the reply's flags are VU-HDR-2's business: here we count replies, so a reply that
        # echoes NEED_REPLY (flags 0xd) is noted and judged as if it were 0x5
        if reply.flags == 0xD:
            self.echoed.add(request.name)
            reply = Message(reply.request, 0x5, reply.payload, reply.fds)
        super()._validate_reply(request, sent, reply, defined=defined)

    @property
    def protocol_features(self) -> int:
        return self._features

    @protocol_features.setter
    def protocol_features(self, value: int) -> None:
        hide = getattr(self, "hide_reply_ack", False)
        self._features = value & ~(1 << P.REPLY_ACK) if hide else value


def _need_reply_session(
    target: BackendTarget, timeout: float, *, hide_reply_ack: bool
) -> tuple[Session, GuestMemory, _NeedReplyEverywhere]:
    from vhost_conformance.suites.drivers import do_io

    memory = GuestMemory.simple(RAM_SIZE)
    channel = _NeedReplyEverywhere(target.connect_socket(timeout), hide_reply_ack=hide_reply_ack)
    session = Session(channel, memory, timeout=timeout)
    try:
        session.connect()
        session.start()
        do_io(session, 1)
        session.stop()
        # nothing may be left unread: the next reply answers the next request
        reply = channel.call(F.GET_FEATURES, need_reply=False, timeout=timeout)
        assert reply is not None
        time.sleep(0.05)
        with contextlib.suppress(BlockingIOError):
            extra = channel.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            if extra:
                raise CaseFailed("bytes the back-end sent that answer no request", expected="none",
                                 seen="more after the last reply")
    except BaseException:
        session.close()
        memory.close()
        raise
    return session, memory, channel


@case(
    "VU-MAL-16", title="NEED_REPLY on every start-up message", family="malformed", level=MUST,
    tier=Tier.CONFORMANCE, clause=f"{RST} REPLY_ACK",
    quote=quotes(REPLY_ACK_RESPOND_QUOTE, REPLY_ACK_SOLICITED_QUOTE),
    requirement="With REPLY_ACK negotiated, NEED_REPLY on every message of QEMU's start-up "
        "sequence yields exactly one reply per message: its defined reply, or else one u64 ack.",
    requires=[ProtocolFeature.REPLY_ACK],
)
def test_need_reply_on_every_message(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """REPLY_ACK negotiated, NEED_REPLY on every start-up, I/O and stop message: exactly one
    reply each (the defined one, or one u64 ack)."""
    try:
        session, memory, channel = _need_reply_session(
            vhost_target, vhost_timeout, hide_reply_ack=False
        )
    except BackendHang as exc:
        raise CaseFailed(f"a request sent with NEED_REPLY got no reply: {exc}") from None
    session.close()
    memory.close()
    echoed = f"; replies echoing NEED_REPLY (flags 0xd, see VU-HDR-2): {sorted(channel.echoed)}"
    print(
        f"VU-MAL-16: {len(channel.sent)} requests with NEED_REPLY, each answered once"
        + (echoed if channel.echoed else "")
    )


@case(
    "VU-MAL-17", title="NEED_REPLY without REPLY_ACK on every message", family="malformed",
    level=SHOULD, tier=Tier.INTEROP, clause=f"{RST} REPLY_ACK",
    source="hw/virtio/vhost-user.c process_message_reply / vhost_user_read_header: QEMU 11.1.3 "
        "sets NEED_REPLY only with REPLY_ACK negotiated and reads a reply only where it asked for "
        "one; an unasked reply is read as the answer to its next request and rejected (wrong "
        "request id)",
    requirement="With REPLY_ACK not negotiated, NEED_REPLY on every message of QEMU's start-up "
        "sequence yields the defined replies only, no ack.",
    ambiguity="the spec gives need_reply a meaning only with REPLY_ACK; an unasked ack "
        "desynchronises QEMU's reply reading",
)
def test_need_reply_without_reply_ack(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """REPLY_ACK not negotiated, NEED_REPLY on every message: only the defined replies."""
    from vhost_conformance.frontend.channel import BackendViolation

    try:
        session, memory, _channel = _need_reply_session(
            vhost_target, vhost_timeout, hide_reply_ack=True
        )
    except BackendViolation as exc:
        raise CaseNonStrict(f"an unasked reply came (REPLY_ACK not negotiated): {exc}") from None
    session.close()
    memory.close()


# --------------------------------------------------------------------------- disconnects


class _Cut(Exception):
    pass


class _CuttingChannel(Channel):
    """A channel that closes itself after ``limit`` messages were sent."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        super().__init__(sock)
        self.limit = limit
        self.count = 0

    def send_message(self, message: Message) -> None:
        if self.count >= self.limit:
            self.close()
            raise _Cut
        self.count += 1
        super().send_message(message)


def _start_up(target: BackendTarget, timeout: float, limit: int) -> int:
    """QEMU's init and start on a connection cut after ``limit`` messages; messages sent."""
    memory = GuestMemory.simple(RAM_SIZE)
    channel = _CuttingChannel(target.connect_socket(timeout), limit)
    session = Session(channel, memory, timeout=timeout)
    try:
        with contextlib.suppress(_Cut):
            session.connect()
            session.start()
        return channel.count
    finally:
        session.close()
        memory.close()


@case(
    "VU-FUZZ-3", title="Disconnect at every message boundary", family="fuzz", level=SHOULD,
    clause=f"{RST} Communication",
    requirement="Disconnecting after any message of the start-up sequence leaves a back-end that "
        "a new connection brings to a working state.",
    ambiguity="reconnection is not required by the spec; QEMU relies on it",
)
def test_disconnect_at_every_message_boundary(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """A connection closed after message k of QEMU's start-up, for every k: a new connection
    then reaches a working state."""
    from vhost_conformance.suites.model import CaseOutcome

    total = _start_up(vhost_target, vhost_timeout, 10_000)
    before = backend_fds(vhost_target)
    for k in range(total):
        _start_up(vhost_target, vhost_timeout, k)
        try:
            works_afterwards(vhost_target, vhost_capabilities, vhost_timeout)
        except CaseFailed as exc:
            raise CaseNonStrict(
                f"after a disconnect following message {k} of {total}: {exc.reason}"
            ) from None
        except (BackendNack, BackendViolation) as exc:
            # the new connection's start-up refused (e.g. memory the cut one left behind)
            raise CaseNonStrict(
                f"after a disconnect following message {k} of {total}, a new connection's "
                f"start-up: {type(exc).__name__}: {exc}"
            ) from None
        except CaseOutcome as exc:
            raise type(exc)(
                f"after a disconnect following message {k} of {total}: {exc.reason}"
            ) from None
    fds_bounded(vhost_target, before, f"{total} cut start-ups")
    print(f"VU-FUZZ-3: {total} boundaries")


# --------------------------------------------------------------------------- REM_MEM_REG


@case(
    "VU-FD-4", title="REM_MEM_REG fds are closed", family="memory", level=MUST,
    clause=f"{RST} Front-end message types: REM_MEM_REG",
    quote="If a file descriptor is passed, the back-end MUST close it without using it otherwise.",
    requirement="An fd sent with REM_MEM_REG is accepted or refused but closed: the back-end's fd "
        "count does not grow.",
    requires=[ProtocolFeature.CONFIGURE_MEM_SLOTS], needs=["command"],
)
def test_rem_mem_reg_fd_is_closed(
    vhost_target: BackendTarget, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """REM_MEM_REG carrying an fd, 50 times: the back-end's fd count does not grow."""
    _require_pid(vhost_target)
    link = Link(vhost_target, vhost_capabilities, vhost_timeout)
    channel = link.open()
    ack = has(channel.protocol_features, P.REPLY_ACK)
    base = backend_fds(vhost_target)
    region = SingleMemoryRegion(MemoryRegion(0x4000_0000, 1 << 20, 0x7F10_0000_0000, 0))
    with memfds(1, 1 << 20) as (fd,):
        for _ in range(50):
            channel = link.ensure()
            try:
                channel.send(F.ADD_MEM_REG, region, fds=[fd], need_reply=ack)
                if ack:
                    channel.recv(vhost_timeout, awaiting="ADD_MEM_REG")
                channel.send(F.REM_MEM_REG, region, fds=[fd], need_reply=ack)
                if ack:
                    channel.recv(vhost_timeout, awaiting="REM_MEM_REG")
            except BackendClosed:
                link.closes += 1
                link.close()
    if link.channel is not None:
        link.probe()
    fds_bounded(vhost_target, base, "50 ADD_MEM_REG + REM_MEM_REG with an fd")
    link.close()
    works_afterwards(vhost_target, vhost_capabilities, vhost_timeout)


__all__ = ["Link", "header", "raw", "works_afterwards"]
