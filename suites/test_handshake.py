"""Handshake, config space and back-end program cases: what a front-end sees before any ring
runs. Each case needs only the wire codec and the channel.

Families: handshake (VU-HDR, VU-FEAT, VU-ACK, VU-MQ), config (VU-CFG), program (VU-BACKEND).
Clauses: vhost-user.rst as shipped with QEMU 11.1.3; VIRTIO 1.3 "Block Device".
"""

from __future__ import annotations

import struct

import pytest
from vhost_conformance.frontend.channel import BackendClosed, Channel
from vhost_conformance.frontend.protocol import (
    REPLY_FLAGS,
    U64,
    VERSION,
    VERSION_MASK,
    BlkFeature,
    Config,
    FrontendRequest,
    Message,
    Payload,
    ProtocolFeature,
    VirtioFeature,
    VringState,
    has,
)
from vhost_conformance.frontend.sequences import GET_CONFIG_LEN, agree_protocol
from vhost_conformance.reports.model import Tier
from vhost_conformance.suites.clauses import (
    GET_PROTOCOL_FEATURES_QUOTE,
    MULTIQUEUE_GET_QUEUE_NUM_QUOTE,
    QEMU_FLAGS,
    REPLY_ACK_PAYLOAD_QUOTE,
    REPLY_ACK_RESPOND_QUOTE,
    REPLY_ACK_SOLICITED_QUOTE,
    RST,
    VIRTIO,
    quotes,
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

#: Families this module writes completely: every catalogued case of them is here (a test
#: in tests/test_suites_catalogue.py holds the module to it).
COMPLETE_FAMILIES = ("handshake", "config", "program")

R = FrontendRequest
P = ProtocolFeature

# --------------------------------------------------------------------------- drivers


def ask(
    channel: Channel,
    request: FrontendRequest,
    payload: object = None,
    *,
    timeout: float,
    need_reply: bool = False,
) -> Message:
    """Send one request and read the next message, unvalidated (the case judges it)."""
    channel.send(request, payload, need_reply=need_reply)  # type: ignore[arg-type]
    return channel.recv(timeout, awaiting=request.name, close_surplus_fds=True)


def ask_u64(channel: Channel, request: FrontendRequest, *, timeout: float) -> int:
    """A request answered by a u64 (GET_FEATURES, GET_QUEUE_NUM, ...): its value."""
    reply = ask(channel, request, timeout=timeout)
    expect_reply_to(reply, request, size=8)
    return U64.decode(reply.payload).value


def expect_reply_to(reply: Message, request: FrontendRequest, *, size: int | None = None) -> None:
    """The reply answers ``request`` (same id) with ``size`` payload bytes."""
    if reply.request != request:
        raise CaseFailed(f"reply to {request.name} carries another request id",
                         expected=f"{int(request)} ({request.name})", seen=reply.request)
    if size is not None and len(reply.payload) != size:
        raise CaseFailed(f"{request.name} reply payload size", expected=f"{size} bytes",
                         seen=f"{len(reply.payload)} bytes")


def negotiate(channel: Channel, capabilities: Capabilities, wanted: int, *, timeout: float) -> int:
    """GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES(QEMU's agreement & wanted),
    as QEMU's init (SPEC-DIGEST 4.1 steps 1-2; the rule: frontend.sequences.agree_protocol).
    Returns the negotiated protocol features."""
    ask_u64(channel, R.GET_FEATURES, timeout=timeout)
    offered = ask_u64(channel, R.GET_PROTOCOL_FEATURES, timeout=timeout)
    chosen = agree_protocol(offered, wanted=wanted)
    channel.send(R.SET_PROTOCOL_FEATURES, U64(chosen))
    channel.protocol_features = chosen
    return chosen


def acked_before_features(
    channel: Channel, request: FrontendRequest, payload: Payload | None, timeout: float, what: str,
    expected: str,
) -> None:
    """``request`` sent with NEED_REPLY, then GET_FEATURES: the first reply must be the
    request's u64 ack (else CaseFailed ``what``/``expected``), the second GET_FEATURES'."""
    channel.send(request, payload, need_reply=True)
    reply = ask(channel, R.GET_FEATURES, timeout=timeout)
    if reply.request != request:
        raise CaseFailed(what, expected=expected,
                         seen=f"no ack: the next message answers {reply.request}")
    expect_reply_to(reply, request, size=8)
    expect_reply_to(channel.recv(timeout, awaiting="GET_FEATURES"), R.GET_FEATURES, size=8)


def bits_of(*features: ProtocolFeature) -> int:
    """The mask of the given protocol feature bits."""
    mask = 0
    for feature in features:
        mask |= 1 << feature
    return mask


ALL_PROTOCOL = (1 << (max(ProtocolFeature) + 1)) - 1


@pytest.fixture
def agreed(
    vhost_channel: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> Channel:
    """``vhost_channel`` after QEMU's feature negotiation with every protocol feature it
    knows wanted (GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES: negotiate)."""
    negotiate(vhost_channel, vhost_capabilities, ALL_PROTOCOL, timeout=vhost_timeout)
    return vhost_channel


def config_size(capabilities: Capabilities) -> int:
    """The GET_CONFIG size QEMU 11.1.3 asks for (frontend.sequences.GET_CONFIG_LEN: its
    discard/write-zeroes properties are on whatever the back-end offers)."""
    del capabilities
    return GET_CONFIG_LEN


def get_config(channel: Channel, offset: int, size: int, *, timeout: float) -> Config:
    """GET_CONFIG(offset, size) -> the Config reply, checked for id and echo of offset/size."""
    reply = ask(channel, R.GET_CONFIG, Config.request(offset, size), timeout=timeout)
    expect_reply_to(reply, R.GET_CONFIG, size=Config.HEAD_SIZE + size)
    config = Config.decode(reply.payload)
    if (config.offset, config.size) != (offset, size):
        raise CaseFailed("GET_CONFIG reply header", expected=f"offset {offset} size {size}",
                         seen=f"offset {config.offset} size {config.size}")
    return config


# --------------------------------------------------------------------------- header


@case(
    "VU-HDR-1", title="Replies carry version 1", family="handshake", level=MUST,
    clause=f"{RST} Message specification: Header",
    quote="Lower 2 bits are the version (currently 0x01)",
    requirement="Every reply from the back-end has 0x1 in flags bits 0-1.",
)
def test_replies_carry_version_1(vhost_channel: Channel, vhost_timeout: float) -> None:
    """Every reply from the back-end has 0x1 in flags bits 0-1."""
    for request in (R.GET_FEATURES, R.GET_FEATURES):
        reply = ask(vhost_channel, request, timeout=vhost_timeout)
        if reply.flags & VERSION_MASK != VERSION:
            raise CaseFailed(f"{request.name} reply version bits", expected=VERSION,
                             seen=reply.flags & VERSION_MASK)


@case(
    "VU-HDR-2", title="Reply flags are exactly 0x5", family="handshake", level=MUST,
    clause=f"{RST} Message specification: Header",
    quote="Bit 2 is the reply flag - needs to be sent on each reply from the back-end",
    requirement="Every reply sets REPLY (bit 2) and version 1 and no other flag bit, NEED_REPLY "
        "included.",
    ambiguity=QEMU_FLAGS,
)
def test_reply_flags_are_exactly_0x5(
    vhost_channel: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """Every reply sets REPLY and version 1 and no other flag bit, NEED_REPLY included."""
    requests = [(R.GET_FEATURES, False), (R.GET_FEATURES, True)]
    if vhost_capabilities.offers(VirtioFeature.PROTOCOL_FEATURES):
        requests.append((R.GET_PROTOCOL_FEATURES, False))
    for request, need_reply in requests:
        reply = ask(vhost_channel, request, timeout=vhost_timeout, need_reply=need_reply)
        if reply.flags != REPLY_FLAGS:
            raise CaseFailed(
                f"{request.name} reply flags" + (" (request had NEED_REPLY)" if need_reply else ""),
                expected=f"{REPLY_FLAGS:#x}",
                seen=f"{reply.flags:#x}",
            )


@case(
    "VU-HDR-3", title="Replies answer the request they reply to", family="handshake", level=MUST,
    clause=f"{RST} Message specification: Header",
    quote="Most of the requests don’t require replies, except for the following requests:",
    requirement="A reply carries the request id of the request it answers and the payload size of "
        "that reply's layout.",
    ambiguity="the spec implies it; QEMU 11.1.3 rejects a reply whose request id differs or whose "
        "size is not the layout's",
)
def test_replies_answer_their_request(
    vhost_channel: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """A reply carries the id of the request it answers and its layout's payload size."""
    ask_u64(vhost_channel, R.GET_FEATURES, timeout=vhost_timeout)
    if not vhost_capabilities.offers(VirtioFeature.PROTOCOL_FEATURES):
        return
    negotiate(vhost_channel, vhost_capabilities, ALL_PROTOCOL, timeout=vhost_timeout)
    if vhost_capabilities.offers(P.MQ):
        ask_u64(vhost_channel, R.GET_QUEUE_NUM, timeout=vhost_timeout)
    if vhost_capabilities.offers(P.CONFIGURE_MEM_SLOTS):
        ask_u64(vhost_channel, R.GET_MAX_MEM_SLOTS, timeout=vhost_timeout)


@case(
    "VU-HDR-4", title="Integers in host-native byte order", family="handshake", level=MUST,
    clause=f"{RST} Message specification (byte order note)",
    quote="All numbers are in the machine native byte order.",
    requirement="Feature words and indices in replies are in the host's native byte order: "
        "GET_FEATURES read natively shows at least as many of the landmarks VERSION_1 (bit 32) "
        "and PROTOCOL_FEATURES (bit 30) as the same word byte-swapped.",
)
def test_integers_are_host_native(vhost_channel: Channel, vhost_timeout: float) -> None:
    """Feature words are native-endian: both landmark bits (VERSION_1, bit 30) are counted in
    the word read natively and byte-swapped; the swapped reading must not show more of them.
    (Either landmark alone is not enough: qemu-storage-daemon 11.1.3's offer 0x175007e44
    byte-swapped still shows bit 32, from its NOTIFY_ON_EMPTY bit 24.)"""
    reply = ask(vhost_channel, R.GET_FEATURES, timeout=vhost_timeout)
    expect_reply_to(reply, R.GET_FEATURES, size=8)
    (native,) = struct.unpack("=Q", reply.payload)
    swapped = int.from_bytes(native.to_bytes(8, "little"), "big")
    landmarks = (VirtioFeature.VERSION_1, VirtioFeature.PROTOCOL_FEATURES)

    def count(word: int) -> int:
        return sum(word >> bit & 1 for bit in landmarks)

    if count(swapped) > count(native):
        raise CaseFailed(
            "GET_FEATURES byte order (landmarks VERSION_1 bit 32, PROTOCOL_FEATURES bit 30)",
            expected="host-native",
            seen=f"byte-swapped: {native:#x} read natively shows {count(native)} of them, "
            f"{swapped:#x} (swapped) shows {count(swapped)}",
        )
    if not count(native):
        raise Unsupported(
            "VERSION_1 or PROTOCOL_FEATURES", "no landmark bit to judge the byte order by"
        )


# --------------------------------------------------------------------------- features


@case(
    "VU-FEAT-1", title="Protocol features negotiable before SET_FEATURES", family="handshake",
    level=MUST,
    clause=f"{RST} Front-end message types: GET_PROTOCOL_FEATURES / SET_PROTOCOL_FEATURES",
    quote=quotes(
        "Feature bit VHOST_USER_F_PROTOCOL_FEATURES signals back-end support for "
        "VHOST_USER_GET_PROTOCOL_FEATURES and VHOST_USER_SET_PROTOCOL_FEATURES.",
        GET_PROTOCOL_FEATURES_QUOTE,
    ),
    requirement="A back-end offering bit 30 answers GET_PROTOCOL_FEATURES and accepts "
        "SET_PROTOCOL_FEATURES before any SET_FEATURES.",
    requires=[VirtioFeature.PROTOCOL_FEATURES],
)
def test_protocol_features_before_set_features(
    vhost_channel: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """With bit 30 offered, GET/SET_PROTOCOL_FEATURES work before any SET_FEATURES, and the
    protocol features set then are in force (REPLY_ACK acks a NEED_REPLY SET_OWNER)."""
    chosen = negotiate(vhost_channel, vhost_capabilities, ALL_PROTOCOL, timeout=vhost_timeout)
    if not has(chosen, P.REPLY_ACK):
        # the connection is still served after SET_PROTOCOL_FEATURES
        ask_u64(vhost_channel, R.GET_FEATURES, timeout=vhost_timeout)
        return
    acked_before_features(
        vhost_channel, R.SET_OWNER, None, vhost_timeout,
        "SET_OWNER with NEED_REPLY after SET_PROTOCOL_FEATURES (REPLY_ACK) before any "
        "SET_FEATURES", "a u64 ack (the protocol features set are in force)",
    )


@case(
    "VU-FEAT-3", title="In-band notifications need BACKEND_REQ and REPLY_ACK", family="handshake",
    level=SHOULD, clause=f"{RST} In-band notifications",
    quote="It is also considered an error to negotiate this feature without also negotiating "
        "VHOST_USER_PROTOCOL_F_BACKEND_REQ and VHOST_USER_PROTOCOL_F_REPLY_ACK",
    requirement="A back-end offering INBAND_NOTIFICATIONS closes the connection when it is "
        "negotiated without BACKEND_REQ and REPLY_ACK.",
    requires=[ProtocolFeature.INBAND_NOTIFICATIONS],
)
def test_inband_notifications_need_backend_req_and_reply_ack(
    vhost_channel: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """INBAND_NOTIFICATIONS negotiated without BACKEND_REQ and REPLY_ACK: the back-end closes."""
    wanted = ALL_PROTOCOL & ~bits_of(P.BACKEND_REQ, P.REPLY_ACK)
    negotiate(vhost_channel, vhost_capabilities, wanted, timeout=vhost_timeout)
    try:
        ask(vhost_channel, R.GET_FEATURES, timeout=vhost_timeout)
    except BackendClosed:
        return
    raise CaseNonStrict(
        "the back-end kept serving after INBAND_NOTIFICATIONS without BACKEND_REQ and REPLY_ACK"
    )


@case(
    "VU-FEAT-4", title="GET_VRING_BASE_INFLIGHT only with INFLIGHT_SHMFD", family="handshake",
    level=MUST, clause=f"{RST} Protocol features; Front-end message types: GET_VRING_BASE",
    quote="The VHOST_USER_PROTOCOL_F_GET_VRING_BASE_INFLIGHT protocol feature must only be "
        "negotiated if VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD is also negotiated.",
    requirement="A back-end that offers protocol bit 20 also offers bit 12, and refuses (a "
        "non-zero REPLY_ACK or a close) a SET_PROTOCOL_FEATURES that sets bit 20 without bit 12.",
    ambiguity="the sentence binds both sides; the back-end's share is to offer the pair together "
        "and not to take bit 20 alone: with REPLY_ACK in the same SET_PROTOCOL_FEATURES and "
        "NEED_REPLY set, an ack 0 (or no ack while the connection goes on) is taken as accepted",
)
def test_bit_20_only_with_bit_12(
    vhost_channel: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """Bit 20 offered only with bit 12; SET_PROTOCOL_FEATURES(20 without 12) is refused."""
    if not vhost_capabilities.offers(P.GET_VRING_BASE_INFLIGHT):
        return
    if not vhost_capabilities.offers(P.INFLIGHT_SHMFD):
        raise CaseFailed("protocol features offered",
                         expected="bit 12 (INFLIGHT_SHMFD) with bit 20",
                         seen=f"{vhost_capabilities.protocol_features:#x} (bit 20 without bit 12)")
    if not vhost_capabilities.offers(P.REPLY_ACK):
        return  # no way to see a refusal short of a close; the offer was judged
    ask_u64(vhost_channel, R.GET_FEATURES, timeout=vhost_timeout)
    ask_u64(vhost_channel, R.GET_PROTOCOL_FEATURES, timeout=vhost_timeout)
    # bit 23 (GET_VRING_BASE_SKIP_DRAIN, a proposal) needs bit 12 too: left out, so that the
    # only rule the value breaks is 20 without 12
    wrong = vhost_capabilities.protocol_features & ~bits_of(
        P.INFLIGHT_SHMFD, P.GET_VRING_BASE_SKIP_DRAIN
    )
    try:
        vhost_channel.send(R.SET_PROTOCOL_FEATURES, U64(wrong), need_reply=True)
        reply = ask(vhost_channel, R.GET_FEATURES, timeout=vhost_timeout)
    except BackendClosed:
        return  # refused by closing (vhost-user.rst "Communication")
    if reply.request == R.SET_PROTOCOL_FEATURES:
        expect_reply_to(reply, R.SET_PROTOCOL_FEATURES, size=8)
        if U64.decode(reply.payload).value != 0:
            return  # refused
        seen = "acked 0 (accepted)"
    else:
        seen = "no ack and the connection goes on (accepted)"
    raise CaseFailed(f"SET_PROTOCOL_FEATURES {wrong:#x} (bit 20 without bit 12, NEED_REPLY)",
                     expected="a non-zero ack or a close", seen=seen)


@case(
    "VU-FEAT-5", title="A blk back-end offers CONFIG", family="handshake", level=MUST,
    tier=Tier.INTEROP, clause=f"{RST} Protocol features: CONFIG",
    source="hw/virtio/vhost-user.c vhost_user_backend_init: a device that expects CONFIG "
        "(vhost-user-blk does) refuses a back-end without it: “vhost-user device expecting "
        "VHOST_USER_PROTOCOL_F_CONFIG but the vhost-user backend does not support it.”",
    requirement="A vhost-user-blk back-end offers protocol feature CONFIG (bit 9).",
    requires=[VirtioFeature.PROTOCOL_FEATURES],
    ambiguity="the spec does not require CONFIG; QEMU 11.1.3's vhost-user-blk refuses to "
        "initialise without it (vhost_user_backend_init), so a blk back-end is useless to QEMU "
        "without it",
)
def test_blk_backend_offers_config(vhost_capabilities: Capabilities) -> None:
    """A vhost-user-blk back-end offers protocol feature CONFIG (QEMU refuses it otherwise)."""
    if not vhost_capabilities.offers(P.CONFIG):
        raise CaseFailed("protocol features offered", expected="CONFIG (bit 9)",
                         seen=f"{vhost_capabilities.protocol_features:#x}")


@case(
    "VU-FEAT-6", title="IOMMU_PLATFORM comes with BACKEND_REQ and REPLY_ACK", family="handshake",
    level=MUST, tier=Tier.INTEROP, clause=f"{RST} IOMMU support",
    source="hw/virtio/vhost-user.c vhost_user_backend_init: with VIRTIO_F_IOMMU_PLATFORM QEMU "
        "11.1.3 refuses a back-end lacking BACKEND_REQ or REPLY_ACK: “IOMMU support requires "
        "reply-ack and backend-req protocol features.”",
    requirement="A back-end offering VIRTIO_F_IOMMU_PLATFORM also offers BACKEND_REQ and "
        "REPLY_ACK.",
    requires=[VirtioFeature.IOMMU_PLATFORM],
    ambiguity="stated as QEMU's init check (it fails otherwise); the IOTLB miss path needs the "
        "back-end channel and acks",
)
def test_iommu_platform_comes_with_backend_req_and_reply_ack(
    vhost_capabilities: Capabilities,
) -> None:
    """IOMMU_PLATFORM offered: BACKEND_REQ and REPLY_ACK offered too."""
    missing = vhost_capabilities.missing([P.BACKEND_REQ, P.REPLY_ACK])
    if missing:
        raise CaseFailed("protocol features offered with IOMMU_PLATFORM",
                         expected="BACKEND_REQ and REPLY_ACK",
                         seen=f"missing {', '.join(f.name for f in missing)}")


@case(
    "VU-FEAT-8", title="GET_FEATURES is constant on a connection", family="handshake", level=SHOULD,
    tier=Tier.INTEROP, clause=f"{RST} Front-end message types: GET_FEATURES",
    source="hw/virtio/vhost-user.c vhost_user_backend_init and hw/virtio/vhost.c vhost_dev_init: "
        "QEMU 11.1.3 reads GET_FEATURES at connect and again after a reconnect and keeps the "
        "first answer as what the device offers (QEMU-TRACES.md (a), (d)); the spec does not say "
        "the value is constant",
    requirement="GET_FEATURES returns the same value before SET_OWNER, after it, and after "
        "SET_FEATURES.",
    ambiguity="not stated; QEMU 11.1.3 reads it twice at init and again as a barrier after "
        "SET_VRING_ENABLE",
)
def test_get_features_is_constant(
    vhost_channel: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """GET_FEATURES gives one value before SET_OWNER, after it, and after SET_FEATURES."""
    seen = [ask_u64(vhost_channel, R.GET_FEATURES, timeout=vhost_timeout)]
    if vhost_capabilities.offers(VirtioFeature.PROTOCOL_FEATURES):
        negotiate(vhost_channel, vhost_capabilities, ALL_PROTOCOL, timeout=vhost_timeout)
    vhost_channel.send(R.SET_OWNER)
    seen.append(ask_u64(vhost_channel, R.GET_FEATURES, timeout=vhost_timeout))
    vhost_channel.send(R.SET_FEATURES, U64(seen[0] & ~(1 << VirtioFeature.LOG_ALL)))
    seen.append(ask_u64(vhost_channel, R.GET_FEATURES, timeout=vhost_timeout))
    if len(set(seen)) != 1:
        raise CaseNonStrict(
            "GET_FEATURES changed on one connection: " + " -> ".join(f"{v:#x}" for v in seen)
        )


@case(
    "VU-FEAT-9", title="A subset of the offered protocol features is accepted", family="handshake",
    level=MUST, clause=f"{RST} Protocol features", quote=GET_PROTOCOL_FEATURES_QUOTE,
    requirement="SET_PROTOCOL_FEATURES with a subset of the offer (as QEMU strips bits it does "
        "not use) is accepted and the session works.",
    requires=[VirtioFeature.PROTOCOL_FEATURES],
)
def test_subset_of_protocol_features_accepted(
    vhost_channel: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """SET_PROTOCOL_FEATURES with a subset of the offer is accepted; the session goes on."""
    # QEMU strips bits it does not use (e.g. 20 without inflight-migration=on, 17 outside Xen).
    subset = bits_of(P.MQ, P.REPLY_ACK, P.CONFIG)
    negotiate(vhost_channel, vhost_capabilities, subset, timeout=vhost_timeout)
    vhost_channel.send(R.SET_OWNER)
    ask_u64(vhost_channel, R.GET_FEATURES, timeout=vhost_timeout)


@case(
    "VU-FEAT-10", title="VERSION_1 offered", family="handshake", level=MUST,
    clause=f"{VIRTIO} 6.2 Device Requirements: Reserved Feature Bits",
    quote="A device MUST offer VIRTIO_F_VERSION_1.",
    requirement="A vhost-user-blk back-end offers VIRTIO_F_VERSION_1 (a modern device).",
)
def test_version_1_offered(vhost_capabilities: Capabilities) -> None:
    """A vhost-user-blk back-end offers VIRTIO_F_VERSION_1."""
    if not vhost_capabilities.offers(VirtioFeature.VERSION_1):
        raise CaseFailed("VIRTIO_F_VERSION_1 (bit 32)", expected="offered",
                         seen=f"features {vhost_capabilities.features:#x}")


@case(
    "VU-FEAT-11", title="FLUSH offered with CONFIG_WCE", family="handshake", level=MUST,
    clause="VIRTIO 1.3 5.2.5.2 Block Device: Device Initialization (device requirements)",
    quote="Devices SHOULD always offer VIRTIO_BLK_F_FLUSH, and MUST offer it if they offer "
        "VIRTIO_BLK_F_CONFIG_WCE.",
    requirement="A back-end offering VIRTIO_BLK_F_CONFIG_WCE (bit 11) offers VIRTIO_BLK_F_FLUSH "
        "(bit 9); one offering neither is non-strict (the SHOULD).",
)
def test_flush_offered_with_config_wce(vhost_channel: Channel, vhost_timeout: float) -> None:
    """GET_FEATURES: CONFIG_WCE implies FLUSH; FLUSH is offered in any case (SHOULD). Asked
    on the case's own connection, so that its wire trace shows the reply judged."""
    features = ask_u64(vhost_channel, R.GET_FEATURES, timeout=vhost_timeout)
    flush = has(features, BlkFeature.FLUSH)
    if has(features, BlkFeature.CONFIG_WCE) and not flush:
        raise CaseFailed("VIRTIO_BLK_F_FLUSH (bit 9) with CONFIG_WCE (bit 11) offered",
                         expected="offered", seen=f"features {features:#x}")
    if not flush:
        raise CaseNonStrict(f"VIRTIO_BLK_F_FLUSH (bit 9) not offered: features {features:#x}")


# --------------------------------------------------------------------------- REPLY_ACK


@case(
    "VU-ACK-1", title="REPLY_ACK: one u64 ack per NEED_REPLY request", family="handshake",
    level=MUST, clause=f"{RST} REPLY_ACK",
    quote=quotes(REPLY_ACK_RESPOND_QUOTE, REPLY_ACK_PAYLOAD_QUOTE,
                 "It does not need to be acknowledged by VHOST_USER_SET_FEATURES."),
    requirement="With REPLY_ACK negotiated, a request without a reply of its own sent with "
        "NEED_REPLY gets exactly one u64 reply, 0 on success; still after a SET_FEATURES without "
        "bit 30 (protocol features do not need to be acknowledged by SET_FEATURES).",
    requires=[ProtocolFeature.REPLY_ACK],
)
def test_need_reply_gets_one_ack(
    agreed: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """NEED_REPLY on requests without a reply of their own: exactly one u64 ack, 0."""
    for request, payload in ((R.SET_OWNER, None), (R.SET_VRING_NUM, VringState(0, 128))):
        reply = ask(agreed, request, payload, timeout=vhost_timeout, need_reply=True)
        expect_reply_to(reply, request, size=8)
        status = U64.decode(reply.payload).value
        if status != 0:
            raise CaseFailed(f"{request.name} ack status", expected=0, seen=status)
    # exactly one: the next message must answer the next request
    reply = ask(agreed, R.GET_FEATURES, timeout=vhost_timeout)
    expect_reply_to(reply, R.GET_FEATURES, size=8)
    # vhost-user.rst GET_PROTOCOL_FEATURES: "It does not need to be acknowledged by
    # VHOST_USER_SET_FEATURES." REPLY_ACK stays negotiated after a SET_FEATURES without bit 30.
    features = vhost_capabilities.features & ~(
        (1 << VirtioFeature.PROTOCOL_FEATURES) | (1 << VirtioFeature.LOG_ALL)
    )
    agreed.send(R.SET_FEATURES, U64(features))
    acked_before_features(
        agreed, R.SET_VRING_NUM, VringState(0, 128), vhost_timeout,
        "SET_VRING_NUM with NEED_REPLY after SET_FEATURES without bit 30",
        "a u64 ack (REPLY_ACK still negotiated)",
    )


@case(
    "VU-ACK-2", title="REPLY_ACK: defined replies unchanged by NEED_REPLY", family="handshake",
    level=MUST, clause=f"{RST} REPLY_ACK", quote=REPLY_ACK_SOLICITED_QUOTE,
    requirement="A request that has a reply of its own gets exactly that reply, once, whether or "
        "not NEED_REPLY is set.",
    requires=[ProtocolFeature.REPLY_ACK],
)
def test_need_reply_does_not_change_defined_replies(
    agreed: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """NEED_REPLY on GET_FEATURES / GET_PROTOCOL_FEATURES: the defined reply, once."""
    for request in (R.GET_FEATURES, R.GET_PROTOCOL_FEATURES):
        reply = ask(agreed, request, timeout=vhost_timeout, need_reply=True)
        expect_reply_to(reply, request, size=8)
    features = ask(agreed, R.GET_FEATURES, timeout=vhost_timeout)
    expect_reply_to(features, R.GET_FEATURES, size=8)
    if U64.decode(features.payload).value != vhost_capabilities.features:
        raise CaseFailed("GET_FEATURES after NEED_REPLY requests (an extra reply came first?)",
                         expected=f"{vhost_capabilities.features:#x}",
                         seen=f"{U64.decode(features.payload).value:#x}")


@case(
    "VU-ACK-3", title="No ack without REPLY_ACK negotiated", family="handshake", level=SHOULD,
    tier=Tier.INTEROP, clause=f"{RST} REPLY_ACK",
    source="hw/virtio/vhost-user.c process_message_reply / vhost_user_read_header: QEMU 11.1.3 "
        "sets NEED_REPLY only with REPLY_ACK negotiated and reads a reply only where it asked for "
        "one; an unasked reply is read as the answer to its next request and rejected (wrong "
        "request id). The spec (“Most of the requests don’t require replies”) says nothing for "
        "NEED_REPLY without REPLY_ACK",
    requirement="With REPLY_ACK not negotiated, NEED_REPLY on a request without a reply of its "
        "own produces no reply.",
    ambiguity="the spec defines acks only when REPLY_ACK is negotiated; an unasked ack "
        "desynchronises QEMU's reply reading",
)
def test_no_ack_without_reply_ack(
    vhost_channel: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """REPLY_ACK not negotiated: NEED_REPLY on SET_OWNER produces no reply."""
    if vhost_capabilities.offers(VirtioFeature.PROTOCOL_FEATURES):
        negotiate(
            vhost_channel,
            vhost_capabilities,
            ALL_PROTOCOL & ~bits_of(P.REPLY_ACK),
            timeout=vhost_timeout,
        )
    vhost_channel.send(R.SET_OWNER, need_reply=True)
    reply = ask(vhost_channel, R.GET_FEATURES, timeout=vhost_timeout)
    if reply.request == R.SET_OWNER:
        raise CaseNonStrict(
            "SET_OWNER with NEED_REPLY was acked although REPLY_ACK was not negotiated"
        )
    expect_reply_to(reply, R.GET_FEATURES, size=8)


@case(
    "VU-ACK-4", title="Rejected requests are acked non-zero", family="handshake", level=SHOULD,
    clause=f"{RST} REPLY_ACK", quote=REPLY_ACK_PAYLOAD_QUOTE,
    requirement="A request the back-end rejects (a vring index it does not have), sent with "
        "NEED_REPLY, is acked with a non-zero u64 rather than 0.",
    requires=[ProtocolFeature.REPLY_ACK],
)
def test_rejected_request_is_acked_non_zero(
    agreed: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """SET_VRING_NUM for a queue the back-end does not have, NEED_REPLY: a non-zero ack."""
    queues = vhost_capabilities.queue_num or 1
    bogus = max(queues, 200)
    try:
        reply = ask(
            agreed,
            R.SET_VRING_NUM,
            VringState(bogus, 128),
            timeout=vhost_timeout,
            need_reply=True,
        )
    except BackendClosed:
        return  # refusing by closing is allowed (vhost-user.rst "Communication")
    expect_reply_to(reply, R.SET_VRING_NUM, size=8)
    if U64.decode(reply.payload).value == 0:
        raise CaseNonStrict(f"SET_VRING_NUM for vring {bogus} (of {queues}) was acked 0 (success)")


@case(
    "VU-MQ-1", title="GET_QUEUE_NUM answers the number of queues", family="handshake", level=MUST,
    clause=f"{RST} Multiple queue support", quote=MULTIQUEUE_GET_QUEUE_NUM_QUOTE,
    requirement="With MQ offered, GET_QUEUE_NUM returns at least 1, and the blk config's "
        "num_queues does not exceed it.",
    requires=[ProtocolFeature.MQ],
)
def test_get_queue_num(
    agreed: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """GET_QUEUE_NUM >= 1, and the config's num_queues does not exceed it."""
    queue_num = ask_u64(agreed, R.GET_QUEUE_NUM, timeout=vhost_timeout)
    if queue_num < 1:
        raise CaseFailed("GET_QUEUE_NUM", expected=">= 1", seen=queue_num)
    if vhost_capabilities.offers(P.CONFIG) and vhost_capabilities.offers(BlkFeature.MQ):
        config = get_config(agreed, 0, 36, timeout=vhost_timeout)
        (num_queues,) = struct.unpack_from("<H", config.data, 34)
        if not 1 <= num_queues <= queue_num:
            raise CaseFailed("config num_queues vs GET_QUEUE_NUM", expected=f"1..{queue_num}",
                             seen=num_queues)


@case(
    "VU-MQ-3", title="MQ offered", family="handshake", level=SHOULD,
    clause=f"{RST} Multiple queue support",
    quote="Back-ends should always implement the VHOST_USER_PROTOCOL_F_MQ protocol feature, even "
        "for devices with a fixed number of virtqueues, since it is simple to implement and "
        "offers a degree of introspection.",
    requirement="A back-end offering bit 30 offers protocol feature MQ (bit 0).",
    requires=[VirtioFeature.PROTOCOL_FEATURES],
)
def test_mq_offered(vhost_capabilities: Capabilities) -> None:
    """GET_PROTOCOL_FEATURES has MQ (bit 0)."""
    if not vhost_capabilities.offers(P.MQ):
        offered = vhost_capabilities.protocol_features
        raise CaseNonStrict(f"protocol feature MQ (bit 0) not offered: {offered:#x}")


# --------------------------------------------------------------------------- config space


@case(
    "VU-CFG-1", title="GET_CONFIG reply size equals the request's", family="config", level=MUST,
    clause=f"{RST} Front-end message types: GET_CONFIG",
    quote="When VHOST_USER_PROTOCOL_F_CONFIG is negotiated, this message is submitted by the "
        "vhost-user front-end to fetch the contents of the virtio device configuration space, "
        "vhost-user back-end’s payload size MUST match the front-end’s request, vhost-user "
        "back-end uses zero length of payload to indicate an error to the vhost-user front-end.",
    requirement="GET_CONFIG is answered with the offset and size of the request and exactly size "
        "bytes of config (size 0 only to signal an error); a GET_CONFIG of 200 bytes from offset "
        "0, more than any virtio-blk config space holds, gets the size-0 error reply (or a "
        "close), not bytes.",
    requires=[ProtocolFeature.CONFIG],
    ambiguity="the spec does not say which requests are errors; one larger than the device's "
        "config space (VIRTIO 1.3 struct virtio_blk_config is 96 bytes with every optional field) "
        "can only be one, and the sentence names the size-0 reply as how an error is told. The "
        "size is what is judged, not the offset: qemu-storage-daemon and DPDK's vhost_blk ignore "
        "the offset (VU-CFG-6)",
)
def test_get_config_reply_size(
    agreed: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """GET_CONFIG is answered with the request's offset and size and exactly size bytes; one
    larger than the config space gets a size-0 reply."""
    for size in (config_size(vhost_capabilities), 8):
        get_config(agreed, 0, size, timeout=vhost_timeout)
    try:
        reply = ask(agreed, R.GET_CONFIG, Config.request(0, 200), timeout=vhost_timeout)
    except BackendClosed:
        return  # a refusal by closing (vhost-user.rst "Communication")
    expect_reply_to(reply, R.GET_CONFIG)
    if len(reply.payload) > Config.HEAD_SIZE:
        config = Config.decode(reply.payload)
        if config.size:
            raise CaseFailed(
                "GET_CONFIG(offset 0, size 200), larger than any virtio-blk config space",
                expected="a reply of size 0 (the error) or a close",
                seen=f"size {config.size}, {len(config.data)} bytes",
            )


@case(
    "VU-CFG-6", title="GET_CONFIG honours the offset", family="config", level=SHOULD,
    clause=f"{RST} Front-end message types: GET_CONFIG",
    quote="offset: a 32-bit offset of virtio device’s configuration space",
    requirement="A GET_CONFIG at a non-zero offset returns the config bytes at that offset.",
    requires=[ProtocolFeature.CONFIG],
    ambiguity="the payload names an offset into the config space, but QEMU 11.1.3 always reads "
        "from offset 0 and libvhost-user and rte_vhost were seen to ignore the offset: a back-end "
        "that ignores it is non-strict",
)
def test_get_config_honours_the_offset(
    agreed: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """A GET_CONFIG at an offset returns the bytes found there in a read from offset 0."""
    size = config_size(vhost_capabilities)
    whole = get_config(agreed, 0, size, timeout=vhost_timeout).data
    for offset, part_size in ((20, 4), (size - 4, 4)):
        part = get_config(agreed, offset, part_size, timeout=vhost_timeout).data
        if part != whole[offset : offset + part_size]:
            raise CaseNonStrict(
                f"GET_CONFIG(offset {offset}, size {part_size}) returned {part.hex()}, the config "
                f"holds {whole[offset : offset + part_size].hex()} there"
                + (
                    " (the bytes at offset 0: the offset is ignored)"
                    if part == whole[:part_size]
                    else ""
                )
            )


def _capacity(channel: Channel, timeout: float) -> int:
    (capacity,) = struct.unpack("<Q", get_config(channel, 0, 8, timeout=timeout).data)
    return int(capacity)


@case(
    "VU-CFG-2", title="Read-only config fields are not written", family="config", level=MUST,
    clause=f"{RST} Front-end message types: SET_CONFIG",
    quote="The vhost-user back-end must check the flags field, and back-ends MUST NOT accept "
        "SET_CONFIG for read-only configuration space fields unless the live migration bit is set.",
    requirement="SET_CONFIG of capacity (read-only) with flags 0 is rejected or ignored: "
        "GET_CONFIG still shows the old value.",
    requires=[ProtocolFeature.CONFIG],
)
def test_read_only_config_not_written(agreed: Channel, vhost_timeout: float) -> None:
    """SET_CONFIG of capacity with flags 0 leaves capacity as it was."""
    # after SET_OWNER, as QEMU sends SET_CONFIG: a back-end refusing every request before
    # SET_OWNER would otherwise pass without judging the read-only rule
    agreed.send(R.SET_OWNER)
    before = _capacity(agreed, vhost_timeout)
    write = Config(0, 8, 0, struct.pack("<Q", before + 8))
    acked = has(agreed.protocol_features, P.REPLY_ACK)
    try:
        agreed.send(R.SET_CONFIG, write, need_reply=acked)
        if acked:
            reply = agreed.recv(vhost_timeout, awaiting="SET_CONFIG")
            expect_reply_to(reply, R.SET_CONFIG, size=8)
        after = _capacity(agreed, vhost_timeout)
    except BackendClosed:
        return  # refusing by closing the connection is allowed (vhost-user.rst "Communication")
    if after != before:
        raise CaseFailed("capacity after SET_CONFIG of a read-only field", expected=before,
                         seen=after)


@case(
    "VU-CFG-3", title="Capacity matches the disk", family="config", level=SHOULD, tier=Tier.INTEROP,
    clause=f"{VIRTIO} Block Device: Device configuration layout",
    source="hw/block/vhost-user-blk.c vhost_user_blk_realize: QEMU 11.1.3 reads the config by "
        "GET_CONFIG and the guest sees its capacity as the disk size; VIRTIO 1.3 5.2.4 only "
        "defines capacity as “in 512-byte sectors”, it cannot know the disk behind it",
    requirement="The config's capacity is the disk size in 512-byte sectors.",
    requires=[ProtocolFeature.CONFIG], needs=["command"],
)
def test_capacity_matches_disk(
    vhost_channel: Channel, vhost_target: BackendTarget, vhost_capabilities: Capabilities,
    vhost_timeout: float
) -> None:
    """The config's capacity is the disk size in 512-byte sectors."""
    if not isinstance(vhost_target, CommandTarget):
        raise Unsupported("a back-end command", "the disk size is only known for back-ends we run")
    negotiate(vhost_channel, vhost_capabilities, ALL_PROTOCOL, timeout=vhost_timeout)
    capacity = _capacity(vhost_channel, vhost_timeout)
    expected = vhost_target.profile.disk_size // 512
    if capacity != expected:
        raise CaseNonStrict(f"capacity {capacity} sectors, the disk has {expected}")


@case(
    "VU-CFG-4", title="Writeback cache toggle", family="config", level=MUST, tier=Tier.INTEROP,
    clause=f"{VIRTIO} Block Device: Device configuration layout (wce)",
    source="hw/block/vhost-user-blk.c vhost_user_blk_set_config: QEMU 11.1.3 writes wce with "
        "SET_CONFIG (offset of wce, 1 byte, VHOST_SET_CONFIG_TYPE_FRONTEND) when the guest "
        "toggles the cache mode; VIRTIO 1.3 5.2.5 describes the field, it states no device "
        "requirement",
    requirement="With CONFIG_WCE offered, SET_CONFIG of wce (offset 32, 1 byte) as QEMU sends it "
        "is accepted and read back.",
    requires=[ProtocolFeature.CONFIG, BlkFeature.CONFIG_WCE],
)
def test_writeback_cache_toggle(
    agreed: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """SET_CONFIG of wce (offset 32, 1 byte, flags 0) as QEMU sends it reads back."""
    agreed.send(R.SET_OWNER)
    features = vhost_capabilities.features & ~(1 << VirtioFeature.LOG_ALL)
    agreed.send(R.SET_FEATURES, U64(features))
    # QEMU reads the config from offset 0 and writes wce alone (SPEC-DIGEST section 8)
    before = get_config(agreed, 0, 33, timeout=vhost_timeout).data[32]
    wanted = 0 if before else 1
    acked = has(agreed.protocol_features, P.REPLY_ACK)
    agreed.send(R.SET_CONFIG, Config(32, 1, 0, bytes([wanted])), need_reply=acked)
    if acked:
        reply = agreed.recv(vhost_timeout, awaiting="SET_CONFIG")
        expect_reply_to(reply, R.SET_CONFIG, size=8)
        if U64.decode(reply.payload).value != 0:
            raise CaseFailed("SET_CONFIG wce ack", expected=0, seen=U64.decode(reply.payload).value)
    after = get_config(agreed, 0, 33, timeout=vhost_timeout).data[32]
    if after != wanted:
        raise CaseFailed("wce after SET_CONFIG", expected=wanted, seen=after)


@case(
    "VU-CFG-5", title="Config fields exist for offered features", family="config", level=MUST,
    tier=Tier.INTEROP, clause=f"{VIRTIO} Block Device: Device configuration layout",
    source="hw/block/vhost-user-blk.c vhost_user_blk_realize / virtio_blk config: QEMU 11.1.3 "
        "passes the back-end's config to the guest unchanged, and a guest driver (VIRTIO 1.3 "
        "5.2.5.1 driver requirements) relies on seg_max, blk_size and the discard/write-zeroes "
        "limits of offered features",
    requirement="Fields gated by offered blk features (seg_max, blk_size, discard and "
        "write-zeroes limits) are non-zero where the spec requires it.",
    requires=[ProtocolFeature.CONFIG],
)
def test_config_fields_of_offered_features(
    agreed: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """Fields gated by offered blk features hold usable values."""
    data = get_config(agreed, 0, config_size(vhost_capabilities), timeout=vhost_timeout).data
    # VIRTIO 1.3 "Block Device: Device configuration layout" (offsets: SPEC-DIGEST section 8)
    checks = [
        (BlkFeature.SEG_MAX, "seg_max", 12, "<I"),
        (BlkFeature.BLK_SIZE, "blk_size", 20, "<I"),
        (BlkFeature.DISCARD, "max_discard_sectors", 36, "<I"),
        (BlkFeature.DISCARD, "max_discard_seg", 40, "<I"),
        (BlkFeature.WRITE_ZEROES, "max_write_zeroes_sectors", 48, "<I"),
        (BlkFeature.WRITE_ZEROES, "max_write_zeroes_seg", 52, "<I"),
    ]
    for feature, name, offset, fmt in checks:
        if vhost_capabilities.offers(feature) and offset + 4 <= len(data):
            (value,) = struct.unpack_from(fmt, data, offset)
            if value == 0:
                raise CaseFailed(f"config {name} with {feature.name} offered", expected="> 0",
                                 seen=0)
            if name == "blk_size" and (value < 512 or value & (value - 1)):
                raise CaseFailed("config blk_size", expected="a power of 2 >= 512", seen=value)


@case(
    "VU-CFG-7", title="Config padding bytes are zero", family="config", level=MUST,
    clause=f"{VIRTIO} 5.2.5.2 Block Device: Device Initialization (device requirements)",
    quote="The device MUST initialize padding bytes unused0 and unused1 to 0.",
    requirement="GET_CONFIG shows unused0 (offset 33) as 0, and unused1 (offsets 57-59) as 0 when "
        "a 60-byte read is answered.",
    requires=[ProtocolFeature.CONFIG],
    ambiguity="QEMU 11.1.3 reads 57 bytes, so unused1 is read by a 60-byte GET_CONFIG of our own; "
        "a back-end whose config ends before byte 60 answers it with size 0 and only unused0 is "
        "judged",
)
def test_config_padding_is_zero(
    agreed: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """unused0 (33) and unused1 (57..59) of the virtio-blk config read 0."""
    data = get_config(agreed, 0, config_size(vhost_capabilities), timeout=vhost_timeout).data
    padding = {"unused0": data[33:34]}
    reply = ask(agreed, R.GET_CONFIG, Config.request(0, 60), timeout=vhost_timeout)
    expect_reply_to(reply, R.GET_CONFIG)
    if len(reply.payload) >= Config.HEAD_SIZE + 60:
        padding["unused1"] = Config.decode(reply.payload).data[57:60]
    wrong = {name: raw.hex() for name, raw in padding.items() if any(raw)}
    if wrong:
        raise CaseFailed("virtio-blk config padding", expected="0 in " + " and ".join(padding),
                         seen=", ".join(f"{name} {value}" for name, value in wrong.items()))


@case(
    "VU-CFG-9", title="Writethrough when CONFIG_WCE comes without FLUSH", family="config",
    level=MUST,
    clause=f"{VIRTIO} 5.2.5.2 Block Device: Device Initialization (device requirements)",
    quote="If VIRTIO_BLK_F_CONFIG_WCE is negotiated but VIRTIO_BLK_F_FLUSH is not, the device "
        "MUST initialize writeback to 0.",
    requirement="After SET_FEATURES with VIRTIO_BLK_F_CONFIG_WCE and without VIRTIO_BLK_F_FLUSH "
        "(and SET_STATUS FEATURES_OK where STATUS is negotiated), the config's writeback byte "
        "(offset 32) reads 0.",
    requires=[ProtocolFeature.CONFIG, BlkFeature.CONFIG_WCE],
    ambiguity="QEMU 11.1.3 passes the guest's feature choice on in SET_FEATURES; a guest acking "
        "CONFIG_WCE without FLUSH (Linux acks both) is what the case plays",
)
def test_writethrough_without_flush(
    vhost_channel: Channel, vhost_capabilities: Capabilities, vhost_timeout: float
) -> None:
    """SET_FEATURES with CONFIG_WCE, without FLUSH: writeback (offset 32) reads 0."""
    chosen = negotiate(vhost_channel, vhost_capabilities, ALL_PROTOCOL, timeout=vhost_timeout)
    vhost_channel.send(R.SET_OWNER)
    features = vhost_capabilities.features & ~(
        (1 << VirtioFeature.LOG_ALL) | (1 << BlkFeature.FLUSH)
    )
    vhost_channel.send(R.SET_FEATURES, U64(features))
    if has(chosen, P.STATUS):
        vhost_channel.send(R.SET_STATUS, U64(0x0B))  # ACKNOWLEDGE | DRIVER | FEATURES_OK
    writeback = get_config(vhost_channel, 0, 33, timeout=vhost_timeout).data[32]
    if writeback != 0:
        raise CaseFailed("config writeback after SET_FEATURES with CONFIG_WCE, without FLUSH",
                         expected="0 (writethrough)", seen=writeback)
