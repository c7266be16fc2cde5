"""What a back-end offers, probed over the wire the way QEMU's init asks (never assumed from
its name): :class:`Capabilities`, :func:`probe_capabilities`, and the feature bits a case can
require (:data:`Feature`)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

from vhost_conformance.frontend.protocol import (
    BlkFeature,
    FrontendRequest,
    Message,
    MessageParser,
    ProtocolFeature,
    VirtioFeature,
    device_feature_names,
    encode_request,
    feature_names,
    has,
)
from vhost_conformance.suites.device_type import DEFAULT_DEVICE_TYPE
from vhost_conformance.suites.target_errors import (
    BackendStartFailed,
    BackendStartHang,
    TargetError,
)

#: A feature bit a case can require: the enums of the wire codec (bit numbers).
Feature = ProtocolFeature | VirtioFeature | BlkFeature


def feature_label(feature: Feature) -> str:
    """``protocol feature INFLIGHT_SHMFD (bit 12)`` and the like, for unsupported verdicts."""
    if isinstance(feature, ProtocolFeature):
        kind = "protocol feature"
    elif isinstance(feature, BlkFeature):
        kind = "virtio-blk feature"
    else:
        kind = "virtio feature"
    return f"{kind} {feature.name} (bit {int(feature)})"


@dataclass(frozen=True)
class Capabilities:
    """What a back-end offers, as probed over the wire (never assumed from its name)."""

    features: int
    protocol_features: int = 0
    queue_num: int | None = None
    max_mem_slots: int | None = None
    config: bytes | None = None
    #: the device type the names of device feature bits come from (suites.device_type)
    device_type: str = DEFAULT_DEVICE_TYPE

    def offers(self, feature: Feature) -> bool:
        """Whether the back-end offers ``feature`` (virtio bits in GET_FEATURES, protocol bits
        in GET_PROTOCOL_FEATURES, which is only meaningful with bit 30)."""
        if isinstance(feature, ProtocolFeature):
            return has(self.features, VirtioFeature.PROTOCOL_FEATURES) and has(
                self.protocol_features, feature
            )
        return has(self.features, feature)

    def missing(self, features: Iterable[Feature]) -> list[Feature]:
        """The ones among ``features`` the back-end does not offer, in the given order."""
        return [f for f in features if not self.offers(f)]

    def feature_names(self) -> list[str]:
        """Names of the offered virtio bits (transport and the device type's)."""
        return device_feature_names(self.features, self.device_type)

    def protocol_feature_names(self) -> list[str]:
        """Names of the offered protocol bits."""
        return feature_names(self.protocol_features, ProtocolFeature)


def _exchange(
    sock: socket.socket, parser: MessageParser, data: bytes, deadline: float, what: str
) -> Message:
    """Send one request and read one message back, within the deadline."""
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        sock.sendall(data)
        while True:
            message = parser.next_message()
            if message is not None:
                return message
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(4096)
            if not chunk:
                raise BackendStartFailed(
                    f"capability probe: the back-end closed the connection after {what}", None, ""
                )
            parser.feed(chunk)
    except TimeoutError:
        raise BackendStartHang(
            f"capability probe: no reply to {what} before the deadline", ""
        ) from None
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise BackendStartFailed(
            f"capability probe: connection lost at {what}: {exc}", None, ""
        ) from None


def probe_capabilities(
    sock: socket.socket, timeout: float = 5.0, *, device_type: str = DEFAULT_DEVICE_TYPE
) -> Capabilities:
    """Ask a fresh connection what it offers, the way QEMU's init does (SPEC-DIGEST 4.1):
    GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, and for a
    block device GET_CONFIG with the virtio-blk size (QEMU's vhost-user-net and -fs front-ends
    ask no config of the back-end)."""
    from vhost_conformance.frontend.protocol import U64, Config
    from vhost_conformance.frontend.sequences import GET_CONFIG_LEN, agree_protocol

    deadline = time.monotonic() + timeout
    parser = MessageParser()

    def ask_u64(request: FrontendRequest) -> int:
        reply = _exchange(sock, parser, encode_request(request), deadline, request.name)
        if len(reply.payload) != 8:
            raise TargetError(
                f"capability probe: {request.name} reply has {len(reply.payload)} payload bytes, expected 8"
            )
        return U64.decode(reply.payload).value

    features = ask_u64(FrontendRequest.GET_FEATURES)
    caps = Capabilities(features, device_type=device_type)
    if not has(features, VirtioFeature.PROTOCOL_FEATURES):
        return caps
    protocol = ask_u64(FrontendRequest.GET_PROTOCOL_FEATURES)
    known = agree_protocol(protocol)  # what Session.connect sends
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    sock.sendall(encode_request(FrontendRequest.SET_PROTOCOL_FEATURES, U64(known)))
    queue_num = max_slots = None
    config = None
    if has(protocol, ProtocolFeature.MQ):
        queue_num = ask_u64(FrontendRequest.GET_QUEUE_NUM)
    if has(protocol, ProtocolFeature.CONFIGURE_MEM_SLOTS):
        max_slots = ask_u64(FrontendRequest.GET_MAX_MEM_SLOTS)
    if has(protocol, ProtocolFeature.CONFIG) and device_type == "block":
        size = GET_CONFIG_LEN  # the size the session asks (frontend.sequences)
        reply = _exchange(
            sock,
            parser,
            encode_request(FrontendRequest.GET_CONFIG, Config.request(0, size)),
            deadline,
            "GET_CONFIG",
        )
        with contextlib.suppress(Exception):
            config = Config.decode(reply.payload).data
    return Capabilities(features, protocol, queue_num, max_slots, config, device_type)
