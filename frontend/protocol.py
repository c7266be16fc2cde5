"""vhost-user wire codec: message ids, feature bits, payload layouts, a sans-IO framer.

Pure encode/decode over ``bytes`` (and fd numbers carried alongside); no sockets, no
timing. Shared by the front-end and the reference back-end (the only front-end module
the back-end may import).

Byte order: vhost-user uses the machine's native byte order ("All numbers are in the
machine native byte order", vhost-user.rst "Message Specification"). Both peers run on
one host; this suite supports little-endian hosts only (x86_64, arm64), so every layout
below is spelled with ``struct`` format ``'<'`` (explicit sizes, no implicit alignment).

Sources: SPEC-DIGEST.md sections 1-3, corrected by QEMU-TRACES.md (what QEMU 11.1.3 sent);
QEMU hw/virtio/vhost-user.c; docs/interop/vhost-user.rst (QEMU 11.1.3).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, Self

from vhost_conformance.frontend.errors import MisuseError
from vhost_conformance.frontend.errors import ProtocolError as ProtocolError

# --------------------------------------------------------------------------------------
# Framing constants (vhost-user.rst "Header"; QEMU vhost-user.c VHOST_USER_*_MASK)

HEADER_SIZE = 12
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
#: Flags QEMU accepts on a reply, exactly (vhost_user_read_header: anything else is -EPROTO).
REPLY_FLAGS = VERSION | FLAG_REPLY
#: Most fds one message carries: SET_MEM_TABLE's VHOST_MEMORY_BASELINE_NREGIONS and the
#: back-end channel's VHOST_USER_BACKEND_MAX_FDS are both 8.
MAX_FDS = 8
#: sizeof(VhostUserPayload) in QEMU 11.1: its largest member is VhostUserShMemConfig
#: (u32 nregions, u32 padding, u64 memory_sizes[256]) = 2056 bytes.
MAX_PAYLOAD_SIZE = 2056
#: VHOST_MEMORY_BASELINE_NREGIONS: regions in one SET_MEM_TABLE.
MAX_MEM_REGIONS = 8
#: VHOST_USER_MAX_CONFIG_SIZE: largest GET_CONFIG/SET_CONFIG region.
MAX_CONFIG_SIZE = 256
#: VHOST_USER_MAX_SHMEM_REGIONS: entries of VhostUserShMemConfig.memory_sizes.
MAX_SHMEM_REGIONS = 256

#: SET_VRING_ADDR flags bit 0 (VHOST_VRING_F_LOG): log used-ring writes.
VRING_F_LOG = 1
#: SET_VRING_KICK/CALL/ERR u64 (and VringArea u64): bit 8 = no fd accompanies the message.
VRING_NOFD_MASK = 0x100
#: ... and bits 0-7 = the vring index.
VRING_IDX_MASK = 0xFF


# --------------------------------------------------------------------------------------
# Errors




class MalformedMessage(ProtocolError):
    """Bytes that are not a valid vhost-user message.

    ``request_name`` names the message (or None when unknown), ``expected`` and ``seen``
    what the layout required and what the bytes held.
    """

    def __init__(
        self,
        what: str,
        *,
        request_name: str | None = None,
        expected: object = None,
        seen: object = None,
    ) -> None:
        self.what = what
        self.request_name = request_name
        self.expected = expected
        self.seen = seen
        super().__init__(what)

    def __str__(self) -> str:
        text = f"{self.request_name}: {self.what}" if self.request_name else self.what
        if self.expected is not None or self.seen is not None:
            text += f" (expected {self.expected}, seen {self.seen})"
        return text

    def for_request(self, request_name: str) -> Self:
        """Return a copy of this error that names the message it was found in."""
        copy = type(self).__new__(type(self))
        copy.__dict__.update(self.__dict__)
        Exception.__init__(copy, *self.args)
        copy.request_name = request_name
        return copy


class MalformedPayload(MalformedMessage):
    """A payload whose size or contents do not fit its layout (``layout`` names it)."""

    def __init__(
        self,
        what: str,
        *,
        layout: str,
        request_name: str | None = None,
        expected: object = None,
        seen: object = None,
    ) -> None:
        self.layout = layout
        super().__init__(
            f"payload '{layout}': {what}",
            request_name=request_name,
            expected=expected,
            seen=seen,
        )


class UnknownRequest(MalformedMessage):
    """A header whose request id is not in the table of the channel it arrived on."""


class EncodeError(ValueError, MisuseError):
    """A value that does not fit its field when encoding (misuse, not a peer's fault)."""


# --------------------------------------------------------------------------------------
# Request ids and feature bits


class FrontendRequest(enum.IntEnum):
    """Front-end -> back-end requests on the main socket (vhost-user.rst, QEMU 11.1 ids)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44
    # Not in QEMU 11.1.3: the GET_VRING_BASE_SKIP_DRAIN proposal (protocol bit 23), as the
    # newest indexed vhost-user.rst has it (p-b-o/qemu-ci docs/interop/vhost-user.rst
    # b82b5c8c547f; mst's next branch 1276e6c85dcc). Only the ``qemu-next`` front-end profile
    # sends it. yc-libvhost-server PR #48 uses id 44 for it, which 11.1.3 gives GET_SHMEM_CONFIG.
    GET_VRING_BASE_SKIP_DRAIN = 45


class BackendRequest(enum.IntEnum):
    """Back-end -> front-end requests on the SET_BACKEND_REQ_FD channel (BACKEND_ prefix dropped)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class ProtocolFeature(enum.IntEnum):
    """VHOST_USER_PROTOCOL_F_* bit numbers (QEMU 11.1: 0..22; 23 is the post-11.1 proposal)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    GET_VRING_BASE_INFLIGHT = 20
    GPA_ADDRESSES = 21
    SHMEM = 22
    # The 11.1.3 feature table spells bit 22 VHOST_USER_PROTOCOL_F_SHMEM_MAP (SPEC-DIGEST
    # "Version note"); an alias, so ProtocolFeature(22).name stays "SHMEM".
    SHMEM_MAP = 22
    # Not in QEMU 11.1.3 (it masks bits >= 23 off): the proposal's bit for message 45, "must
    # only be negotiated if both" bits 20 and 12 are (p-b-o/qemu-ci vhost-user.rst b82b5c8c547f).
    GET_VRING_BASE_SKIP_DRAIN = 23


class VirtioFeature(enum.IntEnum):
    """Transport/ring feature bits that matter to vhost-user-blk (VIRTIO 1.x, vhost)."""

    NOTIFY_ON_EMPTY = 24
    LOG_ALL = 26  # VHOST_F_LOG_ALL
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 32
    IOMMU_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    NOTIFICATION_DATA = 38
    RING_RESET = 40


class BlkFeature(enum.IntEnum):
    """virtio-blk device feature bits (VIRTIO_BLK_F_*)."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    LIFETIME = 15
    SECURE_ERASE = 16
    ZONED = 17


class NetFeature(enum.IntEnum):
    """virtio-net device feature bits (VIRTIO 1.3 5.1.3 "Feature bits"; GSO is 5.1.3.1's
    legacy bit)."""

    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GSO = 6
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    CTRL_RX_EXTRA = 20
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23
    DEVICE_STATS = 50
    VQ_NOTF_COAL = 52
    NOTF_COAL = 53
    GUEST_USO4 = 54
    GUEST_USO6 = 55
    HOST_USO = 56
    HASH_REPORT = 57
    GUEST_HDRLEN = 59
    RSS = 60
    RSC_EXT = 61
    STANDBY = 62
    SPEED_DUPLEX = 63


class FsFeature(enum.IntEnum):
    """virtio-fs device feature bits (VIRTIO 1.3 5.11.3 "Feature bits")."""

    NOTIFICATION = 0


#: The device feature bits per vhost-user device type, by the ``type`` names of
#: ``--print-capabilities`` (vhost-user.rst "Backend program conventions").
DEVICE_FEATURES: dict[str, type[enum.IntEnum]] = {
    "block": BlkFeature,
    "net": NetFeature,
    "fs": FsFeature,
}


def device_feature_names(value: int, device_type: str) -> list[str]:
    """Name the virtio bits of ``value``: transport bits, then the device type's own (an
    unknown type's device bits stay ``bit<N>``)."""
    tables: list[type[enum.IntEnum]] = [VirtioFeature]
    if device_type in DEVICE_FEATURES:
        tables.append(DEVICE_FEATURES[device_type])
    return feature_names(value, *tables)


def bits(value: int) -> list[int]:
    """Return the numbers of the bits set in ``value``, lowest first."""
    if value < 0:
        raise EncodeError(f"bits: negative value {value}")
    return [n for n in range(value.bit_length()) if value >> n & 1]


def feature_names(value: int, *enums: type[enum.IntEnum]) -> list[str]:
    """Name every set bit of ``value`` by the first enum that has it, else ``bit<N>``."""
    names: list[str] = []
    for n in bits(value):
        for table in enums:
            try:
                names.append(table(n).name)
                break
            except ValueError:
                continue
        else:
            names.append(f"bit{n}")
    return names


def has(value: int, bit: int) -> bool:
    """True when bit number ``bit`` is set in ``value``."""
    return bool(value >> int(bit) & 1)


# --------------------------------------------------------------------------------------
# Header


_HEADER = struct.Struct("<III")


@dataclass(frozen=True, slots=True)
class Header:
    """The 12-byte message header: request id, flags, payload size."""

    request: int
    flags: int
    size: int

    def encode(self) -> bytes:
        """Return the 12 header bytes."""
        try:
            return _HEADER.pack(self.request, self.flags, self.size)
        except struct.error as exc:
            raise EncodeError(f"header field out of range in {self}: {exc}") from None

    @classmethod
    def decode(cls, data: bytes) -> Header:
        """Decode exactly 12 bytes (no validation of the values)."""
        if len(data) != HEADER_SIZE:
            raise MalformedMessage(
                "header size", expected=f"{HEADER_SIZE} bytes", seen=f"{len(data)} bytes"
            )
        request, flags, size = _HEADER.unpack(data)
        return cls(request, flags, size)

    @property
    def version(self) -> int:
        """Flags bits 0-1 (must be 1)."""
        return self.flags & VERSION_MASK

    @property
    def is_reply(self) -> bool:
        """Flags bit 2 (REPLY)."""
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        """Flags bit 3 (NEED_REPLY)."""
        return bool(self.flags & FLAG_NEED_REPLY)


# --------------------------------------------------------------------------------------
# Payload layouts


class Payload(Protocol):
    """What every payload class provides."""

    LAYOUT: ClassVar[str]

    def encode(self) -> bytes:
        """Return the payload bytes."""
        ...


class PayloadType(Protocol):
    """A payload class (the values of the request/reply tables)."""

    LAYOUT: ClassVar[str]

    def decode(self, data: bytes) -> Any:
        """Decode payload bytes."""
        ...


def _pack(layout: str, fmt: struct.Struct, *values: int) -> bytes:
    try:
        return fmt.pack(*values)
    except struct.error as exc:
        raise EncodeError(f"payload '{layout}': field out of range in {values}: {exc}") from None


def _check_size(layout: str, data: bytes, *sizes: int) -> None:
    if len(data) not in sizes:
        want = " or ".join(f"{s}" for s in sizes)
        raise MalformedPayload(
            "size", layout=layout, expected=f"{want} bytes", seen=f"{len(data)} bytes"
        )


_U64 = struct.Struct("<Q")
_U32X2 = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class U64:
    """A single u64 (features, kick/call/err index+NOFD, REPLY_ACK status, ...)."""

    LAYOUT: ClassVar[str] = "u64"
    SIZE: ClassVar[int] = 8
    value: int

    def encode(self) -> bytes:
        """Return 8 bytes."""
        return _pack(self.LAYOUT, _U64, self.value)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode exactly 8 bytes."""
        _check_size(cls.LAYOUT, data, cls.SIZE)
        return cls(_U64.unpack(data)[0])

    @property
    def vring_index(self) -> int:
        """Bits 0-7 (SET_VRING_KICK/CALL/ERR)."""
        return self.value & VRING_IDX_MASK

    @property
    def nofd(self) -> bool:
        """Bit 8 (SET_VRING_KICK/CALL/ERR: no fd sent)."""
        return bool(self.value & VRING_NOFD_MASK)


@dataclass(frozen=True, slots=True)
class VringState:
    """struct vhost_vring_state: index u32, num u32 (ring size, base, enable, endian)."""

    LAYOUT: ClassVar[str] = "vring state"
    SIZE: ClassVar[int] = 8
    index: int
    num: int

    def encode(self) -> bytes:
        """Return 8 bytes."""
        return _pack(self.LAYOUT, _U32X2, self.index, self.num)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode exactly 8 bytes."""
        _check_size(cls.LAYOUT, data, cls.SIZE)
        return cls(*_U32X2.unpack(data))


def packed_base(avail_idx: int, avail_wrap: bool, used_idx: int, used_wrap: bool) -> int:
    """Compose a packed-ring vring base ``num``.

    vhost-user.rst "Vring descriptor indices for packed virtqueues": bits 0-14 last avail
    index, bit 15 avail (driver) wrap counter, bits 16-30 last used index, bit 31 used
    (device) wrap counter.
    """
    for name, idx in (("avail_idx", avail_idx), ("used_idx", used_idx)):
        if not 0 <= idx < 0x8000:
            raise EncodeError(f"packed_base: {name} {idx} does not fit 15 bits")
    return avail_idx | int(avail_wrap) << 15 | used_idx << 16 | int(used_wrap) << 31


def split_packed_base(num: int) -> tuple[int, bool, int, bool]:
    """Split a packed-ring vring base into (avail_idx, avail_wrap, used_idx, used_wrap)."""
    return (num & 0x7FFF, bool(num >> 15 & 1), num >> 16 & 0x7FFF, bool(num >> 31 & 1))


_VRING_ADDR = struct.Struct("<IIQQQQ")


@dataclass(frozen=True, slots=True)
class VringAddr:
    """struct vhost_vring_addr (SET_VRING_ADDR), 40 bytes."""

    LAYOUT: ClassVar[str] = "vring address"
    SIZE: ClassVar[int] = 40
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    def encode(self) -> bytes:
        """Return 40 bytes."""
        return _pack(
            self.LAYOUT,
            _VRING_ADDR,
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode exactly 40 bytes."""
        _check_size(cls.LAYOUT, data, cls.SIZE)
        return cls(*_VRING_ADDR.unpack(data))


_MEM_REGION = struct.Struct("<QQQQ")


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One memory region description, 32 bytes (without XEN_MMAP)."""

    LAYOUT: ClassVar[str] = "memory region"
    SIZE: ClassVar[int] = 32
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def encode(self) -> bytes:
        """Return 32 bytes."""
        return _pack(
            self.LAYOUT,
            _MEM_REGION,
            self.guest_phys_addr,
            self.memory_size,
            self.userspace_addr,
            self.mmap_offset,
        )

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode exactly 32 bytes."""
        _check_size(cls.LAYOUT, data, cls.SIZE)
        return cls(*_MEM_REGION.unpack(data))


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """SET_MEM_TABLE: nregions u32, padding u32, then nregions region descriptions.

    vhost-user.rst "Multiple Memory regions description": "num regions" (32-bit), then
    "padding: 32-bit" (the text requires no value: we send 0 and ignore what we receive),
    then region0 .. region7 ("regions field contains 8 regions"). QEMU
    (vhost_user_set_mem_table) sends only the used ones: hdr.size = 8 + 32 * nregions.
    Decoding accepts that size and the full 8-slot size (8 + 32 * 8 = 264, entries past
    nregions ignored), which front-ends built on the C struct send.
    """

    LAYOUT: ClassVar[str] = "memory regions description"
    regions: tuple[MemoryRegion, ...]

    def encode(self) -> bytes:
        """Return 8 + 32 * nregions bytes (QEMU's size)."""
        if not 1 <= len(self.regions) <= MAX_MEM_REGIONS:
            raise EncodeError(
                f"payload '{self.LAYOUT}': {len(self.regions)} regions, must be 1..{MAX_MEM_REGIONS}"
            )
        return _U32X2.pack(len(self.regions), 0) + b"".join(r.encode() for r in self.regions)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode 8 + 32 * nregions bytes, or the full 264-byte struct."""
        if len(data) < 8:
            raise MalformedPayload(
                "size", layout=cls.LAYOUT, expected="at least 8 bytes", seen=f"{len(data)} bytes"
            )
        nregions, _padding = _U32X2.unpack_from(data)
        if not 1 <= nregions <= MAX_MEM_REGIONS:
            raise MalformedPayload(
                "nregions", layout=cls.LAYOUT, expected=f"1..{MAX_MEM_REGIONS}", seen=nregions
            )
        exact = 8 + MemoryRegion.SIZE * nregions
        full = 8 + MemoryRegion.SIZE * MAX_MEM_REGIONS
        _check_size(f"{cls.LAYOUT} with nregions={nregions}", data, exact, full)
        regions = tuple(
            MemoryRegion.decode(data[off : off + MemoryRegion.SIZE])
            for off in range(8, exact, MemoryRegion.SIZE)
        )
        return cls(regions)


@dataclass(frozen=True, slots=True)
class SingleMemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region (40 bytes)."""

    LAYOUT: ClassVar[str] = "single memory region description"
    SIZE: ClassVar[int] = 40
    region: MemoryRegion

    def encode(self) -> bytes:
        """Return 40 bytes (padding 0)."""
        return _U64.pack(0) + self.region.encode()

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode exactly 40 bytes (the padding value is ignored)."""
        _check_size(cls.LAYOUT, data, cls.SIZE)
        return cls(MemoryRegion.decode(data[8:]))


_U64X2 = struct.Struct("<QQ")


@dataclass(frozen=True, slots=True)
class LogBase:
    """SET_LOG_BASE log description: mmap_size u64, mmap_offset u64 (16 bytes)."""

    LAYOUT: ClassVar[str] = "log description"
    SIZE: ClassVar[int] = 16
    mmap_size: int
    mmap_offset: int

    def encode(self) -> bytes:
        """Return 16 bytes."""
        return _pack(self.LAYOUT, _U64X2, self.mmap_size, self.mmap_offset)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode exactly 16 bytes."""
        _check_size(cls.LAYOUT, data, cls.SIZE)
        return cls(*_U64X2.unpack(data))


_CONFIG_HEAD = struct.Struct("<III")


@dataclass(frozen=True, slots=True)
class Config:
    """GET_CONFIG / SET_CONFIG: offset u32, size u32, flags u32, then ``size`` bytes."""

    LAYOUT: ClassVar[str] = "device config space"
    HEAD_SIZE: ClassVar[int] = 12
    #: flags value for a config write during live migration (VHOST_SET_CONFIG_TYPE_MIGRATION).
    FLAG_MIGRATION: ClassVar[int] = 1
    offset: int
    size: int
    flags: int
    data: bytes

    def encode(self) -> bytes:
        """Return 12 + size bytes (``data`` must hold exactly ``size`` bytes)."""
        if len(self.data) != self.size or self.size > MAX_CONFIG_SIZE:
            raise EncodeError(
                f"payload '{self.LAYOUT}': size {self.size} with {len(self.data)} data bytes"
                f" (must be equal and <= {MAX_CONFIG_SIZE})"
            )
        return _pack(self.LAYOUT, _CONFIG_HEAD, self.offset, self.size, self.flags) + self.data

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode 12 + size bytes, size <= 256."""
        if len(data) < cls.HEAD_SIZE:
            raise MalformedPayload(
                "size", layout=cls.LAYOUT, expected="at least 12 bytes", seen=f"{len(data)} bytes"
            )
        offset, size, flags = _CONFIG_HEAD.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise MalformedPayload(
                "size field", layout=cls.LAYOUT, expected=f"<= {MAX_CONFIG_SIZE}", seen=size
            )
        _check_size(f"{cls.LAYOUT} with size={size}", data, cls.HEAD_SIZE + size)
        return cls(offset, size, flags, bytes(data[cls.HEAD_SIZE :]))

    @classmethod
    def request(cls, offset: int, size: int, flags: int = 0) -> Config:
        """A GET_CONFIG request: ``size`` zero bytes of data, as QEMU sends it."""
        return cls(offset, size, flags, bytes(size))


_INFLIGHT = struct.Struct("<QQHH")


@dataclass(frozen=True, slots=True)
class Inflight:
    """GET_INFLIGHT_FD / SET_INFLIGHT_FD in-flight description.

    The C struct is mmap_size u64, mmap_offset u64, num_queues u16, queue_size u16 = 20
    bytes, but QEMU 11.1.3 sends (and expects) 24: the struct padded to 8-byte alignment,
    bytes 20-23 zero (QEMU-TRACES.md correction 1). We encode 24; decode accepts 20 or 24.
    """

    LAYOUT: ClassVar[str] = "inflight description"
    SIZE: ClassVar[int] = 24
    PACKED_SIZE: ClassVar[int] = 20
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def encode(self) -> bytes:
        """Return 24 bytes (20 + 4 zero padding)."""
        return (
            _pack(
                self.LAYOUT,
                _INFLIGHT,
                self.mmap_size,
                self.mmap_offset,
                self.num_queues,
                self.queue_size,
            )
            + b"\0" * 4
        )

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode 20 or 24 bytes (padding value ignored)."""
        _check_size(cls.LAYOUT, data, cls.SIZE, cls.PACKED_SIZE)
        return cls(*_INFLIGHT.unpack_from(data))


_U64X3 = struct.Struct("<QQQ")


@dataclass(frozen=True, slots=True)
class VringArea:
    """BACKEND_VRING_HOST_NOTIFIER_MSG: u64 (bits 0-7 index, bit 8 NOFD), size, offset."""

    LAYOUT: ClassVar[str] = "vring area description"
    SIZE: ClassVar[int] = 24
    u64: int
    size: int
    offset: int

    def encode(self) -> bytes:
        """Return 24 bytes."""
        return _pack(self.LAYOUT, _U64X3, self.u64, self.size, self.offset)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode exactly 24 bytes."""
        _check_size(cls.LAYOUT, data, cls.SIZE)
        return cls(*_U64X3.unpack(data))

    @property
    def vring_index(self) -> int:
        """Bits 0-7 of the u64."""
        return self.u64 & VRING_IDX_MASK

    @property
    def nofd(self) -> bool:
        """Bit 8 of the u64: no fd, unmap the notifier."""
        return bool(self.u64 & VRING_NOFD_MASK)


# linux/vhost_types.h struct vhost_iotlb_msg: __u64 iova, size, uaddr; __u8 perm, type;
# sizeof = 32 (26 bytes of fields, 6 bytes of tail padding to 8-byte alignment).
_IOTLB = struct.Struct("<QQQBB6x")


@dataclass(frozen=True, slots=True)
class IotlbMsg:
    """struct vhost_iotlb_msg (IOTLB_MSG / BACKEND_IOTLB_MSG), 32 bytes."""

    LAYOUT: ClassVar[str] = "IOTLB message"
    SIZE: ClassVar[int] = 32
    PERM_NONE: ClassVar[int] = 0
    PERM_RO: ClassVar[int] = 1
    PERM_WO: ClassVar[int] = 2
    PERM_RW: ClassVar[int] = 3
    TYPE_MISS: ClassVar[int] = 1
    TYPE_UPDATE: ClassVar[int] = 2
    TYPE_INVALIDATE: ClassVar[int] = 3
    TYPE_ACCESS_FAIL: ClassVar[int] = 4
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int

    def encode(self) -> bytes:
        """Return 32 bytes (tail padding 0)."""
        return _pack(self.LAYOUT, _IOTLB, self.iova, self.size, self.uaddr, self.perm, self.type)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode exactly 32 bytes."""
        _check_size(cls.LAYOUT, data, cls.SIZE)
        return cls(*_IOTLB.unpack(data))


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer:
    """SET_DEVICE_STATE_FD: direction u32 (0 save, 1 load), phase u32 (0 stopped)."""

    LAYOUT: ClassVar[str] = "device state transfer parameters"
    SIZE: ClassVar[int] = 8
    DIRECTION_SAVE: ClassVar[int] = 0
    DIRECTION_LOAD: ClassVar[int] = 1
    PHASE_STOPPED: ClassVar[int] = 0
    direction: int
    phase: int

    def encode(self) -> bytes:
        """Return 8 bytes."""
        return _pack(self.LAYOUT, _U32X2, self.direction, self.phase)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode exactly 8 bytes."""
        _check_size(cls.LAYOUT, data, cls.SIZE)
        return cls(*_U32X2.unpack(data))


@dataclass(frozen=True, slots=True)
class Shared:
    """VhostUserShared: a 16-byte UUID (its components are big-endian, kept as raw bytes)."""

    LAYOUT: ClassVar[str] = "shared object UUID"
    SIZE: ClassVar[int] = 16
    uuid: bytes

    def encode(self) -> bytes:
        """Return the 16 UUID bytes."""
        if len(self.uuid) != self.SIZE:
            raise EncodeError(f"payload '{self.LAYOUT}': uuid has {len(self.uuid)} bytes, not 16")
        return bytes(self.uuid)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode exactly 16 bytes."""
        _check_size(cls.LAYOUT, data, cls.SIZE)
        return cls(bytes(data))


_SHMEM_MAP = struct.Struct("<B7xQQQQ")


@dataclass(frozen=True, slots=True)
class ShmemMap:
    """BACKEND_SHMEM_MAP/UNMAP: shmid u8, padding[7], fd_offset, shm_offset, len, flags u64."""

    LAYOUT: ClassVar[str] = "MMAP request"
    SIZE: ClassVar[int] = 40
    FLAG_RW: ClassVar[int] = 1
    shmid: int
    fd_offset: int
    shm_offset: int
    len: int
    flags: int

    def encode(self) -> bytes:
        """Return 40 bytes (padding 0)."""
        return _pack(
            self.LAYOUT,
            _SHMEM_MAP,
            self.shmid,
            self.fd_offset,
            self.shm_offset,
            self.len,
            self.flags,
        )

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode exactly 40 bytes."""
        _check_size(cls.LAYOUT, data, cls.SIZE)
        return cls(*_SHMEM_MAP.unpack(data))


_SHMEM_CONFIG = struct.Struct(f"<II{MAX_SHMEM_REGIONS}Q")


@dataclass(frozen=True, slots=True)
class ShmemConfig:
    """GET_SHMEM_CONFIG reply: nregions u32, padding u32, memory_sizes[256] u64 (2056 bytes).

    ``memory_sizes`` is indexed by shmid and always holds 256 entries (shorter tuples given
    to the constructor are padded with zeros).
    """

    LAYOUT: ClassVar[str] = "shared memory regions config"
    SIZE: ClassVar[int] = 2056
    nregions: int
    memory_sizes: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        sizes = tuple(self.memory_sizes)
        if len(sizes) > MAX_SHMEM_REGIONS:
            raise EncodeError(
                f"payload '{self.LAYOUT}': {len(sizes)} memory sizes, at most {MAX_SHMEM_REGIONS}"
            )
        object.__setattr__(self, "memory_sizes", sizes + (0,) * (MAX_SHMEM_REGIONS - len(sizes)))

    def encode(self) -> bytes:
        """Return 2056 bytes."""
        return _pack(self.LAYOUT, _SHMEM_CONFIG, self.nregions, 0, *self.memory_sizes)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode 8 + 8 * k bytes, k <= 256 (missing memory sizes are 0).

        QEMU sends and reads the whole 2056-byte struct, but its reader
        (vhost_user_get_shmem_config) does not check the size, and rust-vmm's front-end
        reads the 8-byte head then ``nregions`` u64 values: a back-end may send fewer.
        """
        if len(data) < 8 or len(data) % 8 or len(data) > cls.SIZE:
            raise MalformedPayload(
                "size",
                layout=cls.LAYOUT,
                expected=f"8 + 8 * k bytes, k <= {MAX_SHMEM_REGIONS} (usually {cls.SIZE})",
                seen=f"{len(data)} bytes",
            )
        nregions, _padding = _U32X2.unpack_from(data)
        sizes = struct.unpack_from(f"<{(len(data) - 8) // 8}Q", data, 8)
        return cls(nregions, tuple(sizes))


@dataclass(frozen=True, slots=True)
class Raw:
    """A payload this codec does not model (e.g. crypto sessions): the bytes as they are."""

    LAYOUT: ClassVar[str] = "raw bytes"
    data: bytes

    def encode(self) -> bytes:
        """Return the bytes."""
        return bytes(self.data)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Accept any bytes."""
        return cls(bytes(data))


#: Every payload class, for tests and tooling.
PAYLOAD_CLASSES: tuple[type, ...] = (
    U64,
    VringState,
    VringAddr,
    MemoryRegion,
    MemoryTable,
    SingleMemoryRegion,
    LogBase,
    Config,
    Inflight,
    VringArea,
    IotlbMsg,
    DeviceStateTransfer,
    Shared,
    ShmemMap,
    ShmemConfig,
    Raw,
)


# --------------------------------------------------------------------------------------
# Tables (SPEC-DIGEST 2.1 / 2.2, corrected by QEMU-TRACES.md)

_F = FrontendRequest
_B = BackendRequest

#: The payload a front-end sends with each request (None = empty payload).
REQUEST_PAYLOAD: dict[FrontendRequest, type | None] = {
    _F.GET_FEATURES: None,
    _F.SET_FEATURES: U64,
    _F.SET_OWNER: None,
    _F.RESET_OWNER: None,
    _F.SET_MEM_TABLE: MemoryTable,
    # The spec table says u64, but QEMU (vhost_user_set_log_base) always sends the
    # 16-byte log description; the trace shows size 16.
    _F.SET_LOG_BASE: LogBase,
    _F.SET_LOG_FD: None,
    _F.SET_VRING_NUM: VringState,
    _F.SET_VRING_ADDR: VringAddr,
    _F.SET_VRING_BASE: VringState,
    _F.GET_VRING_BASE: VringState,
    _F.SET_VRING_KICK: U64,
    _F.SET_VRING_CALL: U64,
    _F.SET_VRING_ERR: U64,
    _F.GET_PROTOCOL_FEATURES: None,
    _F.SET_PROTOCOL_FEATURES: U64,
    _F.GET_QUEUE_NUM: None,
    _F.SET_VRING_ENABLE: VringState,
    _F.SEND_RARP: U64,
    _F.NET_SET_MTU: U64,
    _F.SET_BACKEND_REQ_FD: None,
    _F.IOTLB_MSG: IotlbMsg,
    _F.SET_VRING_ENDIAN: VringState,
    _F.GET_CONFIG: Config,
    _F.SET_CONFIG: Config,
    _F.CREATE_CRYPTO_SESSION: Raw,
    _F.CLOSE_CRYPTO_SESSION: U64,
    _F.POSTCOPY_ADVISE: None,
    _F.POSTCOPY_LISTEN: None,
    _F.POSTCOPY_END: None,
    _F.GET_INFLIGHT_FD: Inflight,
    _F.SET_INFLIGHT_FD: Inflight,
    _F.GPU_SET_SOCKET: None,
    _F.RESET_DEVICE: None,
    _F.VRING_KICK: VringState,
    _F.GET_MAX_MEM_SLOTS: None,
    _F.ADD_MEM_REG: SingleMemoryRegion,
    _F.REM_MEM_REG: SingleMemoryRegion,
    _F.SET_STATUS: U64,
    _F.GET_STATUS: None,
    _F.GET_SHARED_OBJECT: Shared,
    _F.SET_DEVICE_STATE_FD: DeviceStateTransfer,
    _F.CHECK_DEVICE_STATE: None,
    _F.GET_SHMEM_CONFIG: None,
    _F.GET_VRING_BASE_SKIP_DRAIN: VringState,
}

#: The defined reply body of each request (absent = no defined reply; a reply to such a
#: request can only be a REPLY_ACK u64). Conditions on protocol features: has_defined_reply.
REPLY_PAYLOAD: dict[FrontendRequest, type | None] = {
    _F.GET_FEATURES: U64,
    _F.SET_MEM_TABLE: MemoryTable,  # only while postcopy is listening
    _F.SET_LOG_BASE: U64,  # only with LOG_SHMFD
    _F.GET_VRING_BASE: VringState,
    _F.GET_PROTOCOL_FEATURES: U64,
    _F.GET_QUEUE_NUM: U64,
    _F.IOTLB_MSG: U64,
    _F.GET_CONFIG: Config,
    _F.CREATE_CRYPTO_SESSION: Raw,
    _F.POSTCOPY_ADVISE: None,  # empty body, the userfaultfd as its fd
    _F.POSTCOPY_END: U64,
    _F.GET_INFLIGHT_FD: Inflight,
    _F.GET_MAX_MEM_SLOTS: U64,
    _F.GET_STATUS: U64,
    _F.GET_SHARED_OBJECT: U64,
    _F.SET_DEVICE_STATE_FD: U64,
    _F.CHECK_DEVICE_STATE: U64,
    _F.GET_SHMEM_CONFIG: ShmemConfig,
    # "Identical to VHOST_USER_GET_VRING_BASE" (the proposal's text): the same reply
    _F.GET_VRING_BASE_SKIP_DRAIN: VringState,
}

#: The payload a back-end sends with each back-end request (None = empty payload).
BACKEND_REQUEST_PAYLOAD: dict[BackendRequest, type | None] = {
    _B.IOTLB_MSG: IotlbMsg,
    _B.CONFIG_CHANGE_MSG: None,
    _B.VRING_HOST_NOTIFIER_MSG: VringArea,
    _B.VRING_CALL: VringState,
    _B.VRING_ERR: VringState,
    _B.SHARED_OBJECT_ADD: Shared,
    _B.SHARED_OBJECT_REMOVE: Shared,
    _B.SHARED_OBJECT_LOOKUP: Shared,
    _B.SHMEM_MAP: ShmemMap,
    _B.SHMEM_UNMAP: ShmemMap,
}

#: Defined replies on the back-end channel (others: REPLY_ACK u64 when NEED_REPLY).
BACKEND_REPLY_PAYLOAD: dict[BackendRequest, type | None] = {
    _B.SHARED_OBJECT_LOOKUP: U64,
}


class FdRule(enum.Enum):
    """How many fds a message carries."""

    NONE = "0"
    ONE = "1"
    #: 0 or 1 by the VRING_NOFD_MASK bit of the u64 (set = no fd).
    NOFD_BIT = "0 or 1 by the NOFD bit"
    #: one per region of the memory table.
    PER_REGION = "1 per region"
    #: 0 or 1, the receiver must tolerate (and close) one.
    ZERO_OR_ONE = "0 or 1"
    #: GET_INFLIGHT_FD reply: 1 unless mmap_size is 0.
    ONE_UNLESS_EMPTY = "1 unless mmap_size is 0"


#: Fds carried by each front-end request (vhost-user.rst per message; SPEC-DIGEST 2.1).
FD_EXPECTATIONS: dict[FrontendRequest, FdRule] = {r: FdRule.NONE for r in FrontendRequest}
FD_EXPECTATIONS.update(
    {
        _F.SET_MEM_TABLE: FdRule.PER_REGION,
        _F.SET_LOG_BASE: FdRule.ONE,
        _F.SET_LOG_FD: FdRule.ONE,
        _F.SET_VRING_KICK: FdRule.NOFD_BIT,
        _F.SET_VRING_CALL: FdRule.NOFD_BIT,
        _F.SET_VRING_ERR: FdRule.NOFD_BIT,
        _F.SET_BACKEND_REQ_FD: FdRule.ONE,
        _F.SET_INFLIGHT_FD: FdRule.ONE,
        _F.GPU_SET_SOCKET: FdRule.ONE,
        _F.ADD_MEM_REG: FdRule.ONE,
        # "The front-end SHOULD NOT send an fd; the back-end MAY accept one and must close it".
        _F.REM_MEM_REG: FdRule.ZERO_OR_ONE,
        _F.SET_DEVICE_STATE_FD: FdRule.ONE,
    }
)

#: Fds carried by the reply of a front-end request (absent = none).
REPLY_FD_EXPECTATIONS: dict[FrontendRequest, FdRule] = {
    _F.GET_INFLIGHT_FD: FdRule.ONE_UNLESS_EMPTY,
    _F.POSTCOPY_ADVISE: FdRule.ONE,
    _F.GET_SHARED_OBJECT: FdRule.ZERO_OR_ONE,
    # u64 bit 8 set = the back-end returns no fd (vhost-user.rst SET_DEVICE_STATE_FD).
    _F.SET_DEVICE_STATE_FD: FdRule.NOFD_BIT,
}

#: Fds carried by each back-end request.
BACKEND_FD_EXPECTATIONS: dict[BackendRequest, FdRule] = {r: FdRule.NONE for r in BackendRequest}
BACKEND_FD_EXPECTATIONS.update(
    {
        _B.VRING_HOST_NOTIFIER_MSG: FdRule.NOFD_BIT,
        _B.SHMEM_MAP: FdRule.ONE,
    }
)

#: Fds carried by the front-end's reply to a back-end request.
BACKEND_REPLY_FD_EXPECTATIONS: dict[BackendRequest, FdRule] = {
    _B.SHARED_OBJECT_LOOKUP: FdRule.ZERO_OR_ONE,
}


def expected_fd_count(rule: FdRule, payload: bytes) -> tuple[int, int]:
    """Return (min, max) fds a message with ``payload`` carries under ``rule``."""
    if rule is FdRule.NONE:
        return (0, 0)
    if rule is FdRule.ONE:
        return (1, 1)
    if rule is FdRule.ZERO_OR_ONE:
        return (0, 1)
    if rule is FdRule.NOFD_BIT:
        if len(payload) < 8:
            return (0, 1)
        n = 0 if _U64.unpack_from(payload)[0] & VRING_NOFD_MASK else 1
        return (n, n)
    if rule is FdRule.PER_REGION:
        if len(payload) < 4:
            return (0, MAX_FDS)
        n = min(struct.unpack_from("<I", payload)[0], MAX_FDS)
        return (n, n)
    # ONE_UNLESS_EMPTY: mmap_size is the first u64.
    if len(payload) < 8:
        return (0, 1)
    n = 0 if _U64.unpack_from(payload)[0] == 0 else 1
    return (n, n)


def has_defined_reply(
    request: int, protocol_features: int, *, postcopy_listening: bool = False
) -> bool:
    """True when ``request`` (a front-end request) is answered with a reply body of its own.

    vhost-user.rst "requests that always require a reply": GET_FEATURES,
    GET_PROTOCOL_FEATURES, GET_VRING_BASE, SET_LOG_BASE (if LOG_SHMFD), GET_INFLIGHT_FD
    (if INFLIGHT_SHMFD); plus every request whose reply QEMU reads (GET_QUEUE_NUM,
    GET_CONFIG, GET_MAX_MEM_SLOTS, GET_STATUS, IOTLB_MSG, POSTCOPY_*, ...). SET_MEM_TABLE is
    answered only while postcopy is listening. Such replies come whether or not
    NEED_REPLY is set, and replace the REPLY_ACK ack.
    """
    try:
        req = FrontendRequest(request)
    except ValueError:
        return False
    if req not in REPLY_PAYLOAD:
        return False
    if req is FrontendRequest.SET_LOG_BASE:
        return has(protocol_features, ProtocolFeature.LOG_SHMFD)
    if req is FrontendRequest.SET_MEM_TABLE:
        return postcopy_listening
    return True


def expects_ack(request: int, flags: int, protocol_features: int) -> bool:
    """True when a REPLY_ACK u64 answers this request: NEED_REPLY set, REPLY_ACK negotiated,
    and no defined reply body (vhost-user.rst "REPLY_ACK")."""
    return (
        bool(flags & FLAG_NEED_REPLY)
        and has(protocol_features, ProtocolFeature.REPLY_ACK)
        and not has_defined_reply(request, protocol_features)
    )


def request_name(request: int, channel: Literal["main", "backend"] = "main") -> str:
    """The request's name on ``channel`` (``BACKEND_`` prefixed on the back-end channel),
    or ``request<N>`` when unknown."""
    try:
        if channel == "backend":
            return "BACKEND_" + BackendRequest(request).name
        return FrontendRequest(request).name
    except ValueError:
        return f"request{request}"


def payload_layout(
    request: int, *, is_reply: bool, channel: Literal["main", "backend"] = "main"
) -> type | None:
    """The payload class of a message by the tables (None = empty payload).

    A reply to a request without a defined reply body is a REPLY_ACK u64. Raises
    UnknownRequest for ids not in the channel's table.
    """
    try:
        if channel == "backend":
            breq = BackendRequest(request)
            if is_reply:
                return BACKEND_REPLY_PAYLOAD.get(breq, U64)
            return BACKEND_REQUEST_PAYLOAD[breq]
        freq = FrontendRequest(request)
    except ValueError:
        raise UnknownRequest(
            f"unknown request id on the {channel} channel",
            expected="1..10" if channel == "backend" else "1..44",
            seen=request,
        ) from None
    if is_reply:
        return REPLY_PAYLOAD.get(freq, U64)
    return REQUEST_PAYLOAD[freq]


# --------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class Message:
    """One message: header fields, payload bytes and the fds that came with it."""

    request: int
    flags: int
    payload: bytes
    fds: tuple[int, ...] = ()

    def encode(self) -> bytes:
        """Return header + payload bytes (fds travel separately)."""
        return Header(self.request, self.flags, len(self.payload)).encode() + bytes(self.payload)

    @property
    def header(self) -> Header:
        """The header this message encodes to."""
        return Header(self.request, self.flags, len(self.payload))

    @property
    def is_reply(self) -> bool:
        """REPLY flag set."""
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        """NEED_REPLY flag set."""
        return bool(self.flags & FLAG_NEED_REPLY)

    def name(self, channel: Literal["main", "backend"] = "main") -> str:
        """The request's name on ``channel``."""
        return request_name(self.request, channel)

    def decoded(self, *, channel: Literal["main", "backend"] = "main") -> object | None:
        """Decode the payload by the tables (reply layout when REPLY is set).

        Returns None for an empty layout; raises MalformedPayload (naming the message) when
        the bytes do not fit, UnknownRequest for an id not in the channel's table.
        """
        layout = payload_layout(self.request, is_reply=self.is_reply, channel=channel)
        if (
            channel == "main"
            and self.is_reply
            and self.request == FrontendRequest.SET_MEM_TABLE
            and len(self.payload) == U64.SIZE
        ):
            layout = U64  # the usual REPLY_ACK; the region table comes only in postcopy
        name = self.name(channel) + (" reply" if self.is_reply else "")
        if layout is None:
            if self.payload:
                raise MalformedPayload(
                    "size",
                    layout="empty",
                    request_name=name,
                    expected="0 bytes",
                    seen=f"{len(self.payload)} bytes",
                )
            return None
        decode: Callable[[bytes], object] = layout.decode  # type: ignore[attr-defined]
        try:
            return decode(self.payload)
        except MalformedMessage as exc:
            raise exc.for_request(name) from None


def _payload_bytes(payload: Payload | bytes | None) -> bytes:
    if payload is None:
        return b""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    return payload.encode()


def encode_request(
    request: int, payload: Payload | bytes | None = None, *, need_reply: bool = False
) -> bytes:
    """Header (flags 0x1, or 0x9 with NEED_REPLY) + payload bytes of a request."""
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return Message(int(request), flags, _payload_bytes(payload)).encode()


def encode_reply(request: int, payload: Payload | bytes | None = None) -> bytes:
    """Header (flags exactly 0x5: REPLY | version 1) + payload bytes of a reply."""
    return Message(int(request), REPLY_FLAGS, _payload_bytes(payload)).encode()


class MessageParser:
    """Sans-IO framer: feed received bytes (and the fds received with them), take messages.

    Fd attribution follows Linux AF_UNIX stream semantics: a recvmsg that returns fds ends
    with the data of the sendmsg that carried them, which starts with the first byte of a
    message (vhost-user.rst: fds go with the header's first byte). So the fds fed with a
    chunk belong to the last message that starts inside that chunk, or, if no message
    starts inside it, to the message the chunk belongs to. Readers that read exactly one
    header, then exactly one payload (as Channel does) never see a chunk span two messages.
    """

    def __init__(
        self, channel: Literal["main", "backend"] = "main", *, any_version: bool = False
    ) -> None:
        self.channel: Literal["main", "backend"] = channel
        #: accept any header version (the reference back-end's ignore-version-bits knob)
        self.any_version = any_version
        self._buffer = bytearray()
        self._consumed = 0  # stream offset of _buffer[0]
        self._fed = 0  # stream offset after the last byte fed
        # (chunk start, chunk end, fds) not yet given to a message
        self._fd_groups: list[tuple[int, int, tuple[int, ...]]] = []

    @property
    def pending_bytes(self) -> int:
        """Bytes fed but not yet returned as part of a message."""
        return len(self._buffer)

    @property
    def pending_fds(self) -> tuple[int, ...]:
        """Fds received but not yet attached to a message (the caller owns them)."""
        return tuple(fd for _s, _e, fds in self._fd_groups for fd in fds)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add bytes received from the peer and the fds received with them."""
        start = self._fed
        self._buffer += data
        self._fed += len(data)
        if fds:
            self._fd_groups.append((start, self._fed, tuple(fds)))

    def peek_header(self) -> Header | None:
        """The next message's header once 12 bytes are buffered (validated), else None."""
        if len(self._buffer) < HEADER_SIZE:
            return None
        header = Header.decode(bytes(self._buffer[:HEADER_SIZE]))
        self._validate(header)
        return header

    def _validate(self, header: Header) -> None:
        name = request_name(header.request, self.channel)
        table: type[enum.IntEnum] = BackendRequest if self.channel == "backend" else FrontendRequest
        try:
            table(header.request)
        except ValueError:
            raise UnknownRequest(
                f"unknown request id on the {self.channel} channel",
                request_name=name,
                expected=f"1..{max(table)}",
                seen=header.request,
            ) from None
        if header.version != VERSION and not self.any_version:
            raise MalformedMessage(
                "header version (flags bits 0-1)",
                request_name=name,
                expected=VERSION,
                seen=f"{header.version} (flags {header.flags:#x})",
            )
        if header.size > MAX_PAYLOAD_SIZE:
            raise MalformedMessage(
                "header size field",
                request_name=name,
                expected=f"<= {MAX_PAYLOAD_SIZE} bytes",
                seen=f"{header.size} bytes",
            )

    def next_message(self) -> Message | None:
        """Return the next complete message, or None when more bytes are needed."""
        header = self.peek_header()
        if header is None or len(self._buffer) < HEADER_SIZE + header.size:
            return None
        total = HEADER_SIZE + header.size
        end = self._consumed + total
        payload = bytes(self._buffer[HEADER_SIZE:total])
        del self._buffer[:total]
        self._consumed = end
        fds: list[int] = []
        keep: list[tuple[int, int, tuple[int, ...]]] = []
        for group in self._fd_groups:
            g_start, g_end, g_fds = group
            # A chunk that reaches past this message holds the start of a later one,
            # which its fds belong to (see the class docstring).
            if g_start < end and g_end <= end:
                fds.extend(g_fds)
            else:
                keep.append(group)
        self._fd_groups = keep
        return Message(header.request, header.flags, payload, tuple(fds))

    def buffered(self, n: int) -> bytes:
        """The first ``n`` bytes fed and not yet returned (fewer when fewer are buffered)."""
        return bytes(self._buffer[:n])

    def take_pending_fds(self) -> tuple[int, ...]:
        """Remove and return fds not attached to any message (e.g. at EOF), for closing."""
        fds = self.pending_fds
        self._fd_groups = []
        return fds
