"""The catalogue of every conformance case, planned or written, and the ids judged not
applicable to a vhost-user-blk back-end (with why).

Ids come from SPEC-DIGEST.md section 10 (``VU-<area>-n``) where a front-end can test the
requirement against a blk back-end, extended for the TEST-IDEAS.md rows (``VU-INF-6..``,
``VU-MIG-3..``, ``VU-DBL-*``, ``VU-SUSP-*``, ``VU-HOST-*``, ``VU-MAL-*``, ``VU-RECON-*``,
``VU-FUZZ-*``, ``VU-BLK-*``). Clauses name sections of docs/interop/vhost-user.rst as shipped
with QEMU 11.1.3 or of VIRTIO 1.3. Requirements are in our words. Where the spec is ambiguous
the ``ambiguity`` note says which reading we chose (QEMU 11.1.3's behaviour).

``vhost-conformance cases`` prints :func:`format_catalogue`.
"""

from __future__ import annotations

from collections.abc import Iterable

from vhost_conformance.frontend.protocol import BlkFeature as B
from vhost_conformance.frontend.protocol import ProtocolFeature as P
from vhost_conformance.frontend.protocol import VirtioFeature as V
from vhost_conformance.reports.model import Level
from vhost_conformance.suites.model import FAMILIES, INFO, MAY, MUST, SHOULD, Case, sort_key
from vhost_conformance.suites.target import Feature, feature_label

RST = "vhost-user.rst (QEMU 11.1.3)"
VIRTIO = "VIRTIO 1.3"

_QEMU_FLAGS = (
    "the spec requires the REPLY bit and version 1 only; QEMU 11.1.3 (vhost_user_read_header) "
    "rejects a reply whose flags are not exactly 0x5, so we require 0x5"
)
_INFLIGHT_24 = (
    "the spec's struct is 20 bytes; QEMU 11.1.3 sends and expects 24 (padded, bytes 20-23 "
    "zero, QEMU-TRACES.md correction 1): we send 24 and accept a 24-byte reply"
)
_MAY_SUSPEND = (
    "the spec says the back-end 'may' suspend; QEMU 11.1.3 accepts a back-end that still drains "
    "(QEMU-TRACES.md correction 11): draining passes, suspending must leave an exact record"
)
_SUSPENDED_DMA = (
    "'may suspend' does not say what happens to host I/O still running; we apply the "
    "Suspended device state rules (no guest memory writes after the reply), the reading "
    "Stefan Hajnoczi gave in the v5 review, not normative text"
)


def _c(
    case_id: str,
    title: str,
    family: str,
    level: Level,
    clause: str,
    requirement: str,
    requires: Iterable[Feature] = (),
    ambiguity: str | None = None,
    needs: Iterable[str] = (),
) -> Case:
    return Case(
        case_id, title, family, level, clause, requirement, tuple(requires), ambiguity, tuple(needs)
    )


_CASES: list[Case] = [
    # ---------------------------------------------------------------- handshake: header
    _c(
        "VU-HDR-1",
        "Replies carry version 1",
        "handshake",
        MUST,
        f"{RST} Message specification: Header",
        "Every reply from the back-end has 0x1 in flags bits 0-1.",
    ),
    _c(
        "VU-HDR-2",
        "Reply flags are exactly 0x5",
        "handshake",
        MUST,
        f"{RST} Message specification: Header",
        "Every reply sets REPLY (bit 2) and version 1 and no other flag bit, NEED_REPLY included.",
        ambiguity=_QEMU_FLAGS,
    ),
    _c(
        "VU-HDR-3",
        "Replies answer the request they reply to",
        "handshake",
        MUST,
        f"{RST} Message specification: Header",
        "A reply carries the request id of the request it answers and the payload size of that reply's layout.",
        ambiguity="the spec implies it; QEMU 11.1.3 rejects a reply whose request id differs or whose size is not the layout's",
    ),
    _c(
        "VU-HDR-4",
        "Integers in host-native byte order",
        "handshake",
        MUST,
        f"{RST} Message specification (byte order note)",
        "Feature words and indices in replies are in the host's native byte order (VERSION_1 appears at bit 32 of GET_FEATURES).",
    ),
    # ---------------------------------------------------------------- handshake: features
    _c(
        "VU-FEAT-1",
        "Protocol features negotiable before SET_FEATURES",
        "handshake",
        MUST,
        f"{RST} Front-end message types: GET_PROTOCOL_FEATURES / SET_PROTOCOL_FEATURES",
        "A back-end offering bit 30 answers GET_PROTOCOL_FEATURES and accepts SET_PROTOCOL_FEATURES before any SET_FEATURES.",
        requires=[V.PROTOCOL_FEATURES],
    ),
    _c(
        "VU-FEAT-3",
        "In-band notifications need BACKEND_REQ and REPLY_ACK",
        "handshake",
        SHOULD,
        f"{RST} In-band notifications",
        "A back-end offering INBAND_NOTIFICATIONS closes the connection when it is negotiated without BACKEND_REQ and REPLY_ACK.",
        requires=[P.INBAND_NOTIFICATIONS],
    ),
    _c(
        "VU-FEAT-4",
        "GET_VRING_BASE_INFLIGHT only with INFLIGHT_SHMFD",
        "handshake",
        MUST,
        f"{RST} Protocol features; Front-end message types: GET_VRING_BASE",
        "A back-end that offers protocol bit 20 also offers bit 12.",
    ),
    _c(
        "VU-FEAT-5",
        "A blk back-end offers CONFIG",
        "handshake",
        MUST,
        f"{RST} Protocol features: CONFIG",
        "A vhost-user-blk back-end offers protocol feature CONFIG (bit 9).",
        requires=[V.PROTOCOL_FEATURES],
        ambiguity="the spec does not require CONFIG; QEMU 11.1.3's vhost-user-blk refuses to initialise without it (vhost_user_backend_init), so a blk back-end is useless to QEMU without it",
    ),
    _c(
        "VU-FEAT-6",
        "IOMMU_PLATFORM comes with BACKEND_REQ and REPLY_ACK",
        "handshake",
        MUST,
        f"{RST} IOMMU support",
        "A back-end offering VIRTIO_F_IOMMU_PLATFORM also offers BACKEND_REQ and REPLY_ACK.",
        requires=[V.IOMMU_PLATFORM],
        ambiguity="stated as QEMU's init check (it fails otherwise); the IOTLB miss path needs the back-end channel and acks",
    ),
    _c(
        "VU-FEAT-8",
        "GET_FEATURES is constant on a connection",
        "handshake",
        SHOULD,
        f"{RST} Front-end message types: GET_FEATURES",
        "GET_FEATURES returns the same value before SET_OWNER, after it, and after SET_FEATURES.",
        ambiguity="not stated; QEMU 11.1.3 reads it twice at init and again as a barrier after SET_VRING_ENABLE",
    ),
    _c(
        "VU-FEAT-9",
        "A subset of the offered protocol features is accepted",
        "handshake",
        MUST,
        f"{RST} Protocol features",
        "SET_PROTOCOL_FEATURES with a subset of the offer (as QEMU strips bits it does not use) is accepted and the session works.",
        requires=[V.PROTOCOL_FEATURES],
    ),
    _c(
        "VU-FEAT-10",
        "VERSION_1 offered",
        "handshake",
        SHOULD,
        f"{VIRTIO} Feature Bits: VIRTIO_F_VERSION_1",
        "A vhost-user-blk back-end offers VIRTIO_F_VERSION_1 (a modern device).",
    ),
    # ---------------------------------------------------------------- handshake: REPLY_ACK
    _c(
        "VU-ACK-1",
        "REPLY_ACK: one u64 ack per NEED_REPLY request",
        "handshake",
        MUST,
        f"{RST} REPLY_ACK",
        "With REPLY_ACK negotiated, a request without a reply of its own sent with NEED_REPLY gets exactly one u64 reply, 0 on success.",
        requires=[P.REPLY_ACK],
    ),
    _c(
        "VU-ACK-2",
        "REPLY_ACK: defined replies unchanged by NEED_REPLY",
        "handshake",
        MUST,
        f"{RST} REPLY_ACK",
        "A request that has a reply of its own gets exactly that reply, once, whether or not NEED_REPLY is set.",
        requires=[P.REPLY_ACK],
    ),
    _c(
        "VU-ACK-3",
        "No ack without REPLY_ACK negotiated",
        "handshake",
        SHOULD,
        f"{RST} REPLY_ACK",
        "With REPLY_ACK not negotiated, NEED_REPLY on a request without a reply of its own produces no reply.",
        ambiguity="the spec defines acks only when REPLY_ACK is negotiated; an unasked ack desynchronises QEMU's reply reading",
    ),
    _c(
        "VU-ACK-4",
        "Rejected requests are acked non-zero",
        "handshake",
        SHOULD,
        f"{RST} REPLY_ACK",
        "A request the back-end rejects (a vring index it does not have), sent with NEED_REPLY, is acked with a non-zero u64 rather than 0.",
        requires=[P.REPLY_ACK],
    ),
    # ---------------------------------------------------------------- handshake: queues
    _c(
        "VU-MQ-1",
        "GET_QUEUE_NUM answers the number of queues",
        "handshake",
        MUST,
        f"{RST} Multiple queue support",
        "With MQ offered, GET_QUEUE_NUM returns at least 1, and the blk config's num_queues does not exceed it.",
        requires=[P.MQ],
    ),
    # ---------------------------------------------------------------- config space
    _c(
        "VU-CFG-1",
        "GET_CONFIG reply size equals the request's",
        "config",
        MUST,
        f"{RST} Front-end message types: GET_CONFIG",
        "GET_CONFIG is answered with the offset and size of the request and exactly size bytes of config (size 0 only to signal an error).",
        requires=[P.CONFIG],
    ),
    _c(
        "VU-CFG-2",
        "Read-only config fields are not written",
        "config",
        MUST,
        f"{RST} Front-end message types: SET_CONFIG",
        "SET_CONFIG of capacity (read-only) with flags 0 is rejected or ignored: GET_CONFIG still shows the old value.",
        requires=[P.CONFIG],
    ),
    _c(
        "VU-CFG-3",
        "Capacity matches the disk",
        "config",
        SHOULD,
        f"{VIRTIO} Block Device: Device configuration layout",
        "The config's capacity is the disk size in 512-byte sectors.",
        requires=[P.CONFIG],
        needs=["command"],
    ),
    _c(
        "VU-CFG-4",
        "Writeback cache toggle",
        "config",
        MUST,
        f"{VIRTIO} Block Device: Device configuration layout (wce)",
        "With CONFIG_WCE offered, SET_CONFIG of wce (offset 32, 1 byte) as QEMU sends it is accepted and read back.",
        requires=[P.CONFIG, B.CONFIG_WCE],
    ),
    _c(
        "VU-CFG-5",
        "Config fields exist for offered features",
        "config",
        MUST,
        f"{VIRTIO} Block Device: Device configuration layout",
        "Fields gated by offered blk features (seg_max, blk_size, discard and write-zeroes limits) are non-zero where the spec requires it.",
        requires=[P.CONFIG],
    ),
    _c(
        "VU-CFG-6",
        "GET_CONFIG honours the offset",
        "config",
        SHOULD,
        f"{RST} Front-end message types: GET_CONFIG",
        "A GET_CONFIG at a non-zero offset returns the config bytes at that offset.",
        requires=[P.CONFIG],
        ambiguity="the payload names an offset into the config space, but QEMU 11.1.3 always reads from offset 0 and libvhost-user and rte_vhost were seen to ignore the offset: a back-end that ignores it is non-strict",
    ),
    # ---------------------------------------------------------------- memory
    _c(
        "VU-FD-2",
        "SET_MEM_TABLE: one fd per region, up to 8",
        "memory",
        MUST,
        f"{RST} Front-end message types: SET_MEM_TABLE",
        "SET_MEM_TABLE with 1 to 8 regions and one fd each is accepted and the memory is used for I/O.",
    ),
    _c(
        "VU-FD-3",
        "Back-end channel fds only with BACKEND_SEND_FD",
        "memory",
        MUST,
        f"{RST} Back-end communication",
        "Messages on the back-end channel carry at most 8 fds, and fds only if BACKEND_SEND_FD was negotiated.",
        requires=[P.BACKEND_REQ],
    ),
    _c(
        "VU-FD-4",
        "REM_MEM_REG fds are closed",
        "memory",
        MUST,
        f"{RST} Front-end message types: REM_MEM_REG",
        "An fd sent with REM_MEM_REG is accepted or refused but closed: the back-end's fd count does not grow.",
        requires=[P.CONFIGURE_MEM_SLOTS],
        needs=["command"],
    ),
    _c(
        "VU-MEM-2",
        "GPA_ADDRESSES: guest-physical ring addresses",
        "memory",
        MUST,
        f"{RST} Memory region description; Vring address description",
        "With GPA_ADDRESSES negotiated, regions whose user address duplicates the guest address and ring addresses given as GPAs work.",
        requires=[P.GPA_ADDRESSES],
    ),
    _c(
        "VU-MEM-4",
        "Regions with mmap_offset, GPA != HVA, holes",
        "memory",
        MUST,
        f"{RST} Memory region description",
        "Data written at a GPA in a region with non-zero mmap_offset, a user address unlike its GPA and gaps between regions reads back right.",
    ),
    _c(
        "VU-MEM-5",
        "Memory slots beyond 8",
        "memory",
        MUST,
        f"{RST} Front-end message types: GET_MAX_MEM_SLOTS / ADD_MEM_REG",
        "8 regions by SET_MEM_TABLE, a 9th by ADD_MEM_REG, then up to GET_MAX_MEM_SLOTS regions are accepted and usable.",
        requires=[P.CONFIGURE_MEM_SLOTS],
    ),
    _c(
        "VU-MEM-6",
        "REM_MEM_REG of a region in use",
        "memory",
        MUST,
        f"{RST} Front-end message types: REM_MEM_REG",
        "Removing a region a queued descriptor still points into ends in an error status or a safe completion, never a crash.",
        requires=[P.CONFIGURE_MEM_SLOTS],
    ),
    _c(
        "VU-MEM-7",
        "ADD_MEM_REG as QEMU 11.1.3 sends it",
        "memory",
        MUST,
        f"{RST} Front-end message types: ADD_MEM_REG",
        "With CONFIGURE_MEM_SLOTS, a start that sends ADD_MEM_REG (NEED_REPLY) instead of SET_MEM_TABLE works.",
        requires=[P.CONFIGURE_MEM_SLOTS],
    ),
    # ---------------------------------------------------------------- rings
    _c(
        "VU-RING-1",
        "Rings start stopped and disabled",
        "rings",
        MUST,
        f"{RST} Ring states",
        "A request made available before SET_VRING_KICK is not processed.",
    ),
    _c(
        "VU-RING-2",
        "A stopped ring is not processed",
        "rings",
        MUST,
        f"{RST} Ring states",
        "After GET_VRING_BASE, requests made available and kicked are not processed until the ring is started again.",
    ),
    _c(
        "VU-RING-3",
        "Started but disabled rings have no side effects",
        "rings",
        MUST,
        f"{RST} Ring states",
        "A started ring disabled by SET_VRING_ENABLE 0 writes nothing a guest can see.",
        ambiguity="'processed without side effects' is written for net; for blk we require no used-ring writes and no disk writes",
    ),
    _c(
        "VU-RING-4",
        "Without bit 30 rings are enabled at once",
        "rings",
        MUST,
        f"{RST} Ring states",
        "After SET_FEATURES without VHOST_USER_F_PROTOCOL_FEATURES the rings are enabled: I/O works with no SET_VRING_ENABLE.",
    ),
    _c(
        "VU-RING-5",
        "A ring starts on SET_VRING_KICK",
        "rings",
        SHOULD,
        f"{RST} Ring states",
        "A request already available when SET_VRING_KICK arrives is processed without an injected kick.",
        ambiguity="older text started rings on the first kick; 11.1.3 starts them on SET_VRING_KICK and says back-ends SHOULD NOT rely on the injected kick",
    ),
    _c(
        "VU-RING-7",
        "A kick before SET_VRING_ENABLE is not lost",
        "rings",
        MUST,
        f"{RST} Ring states",
        "A request kicked while the ring is started but disabled completes after SET_VRING_ENABLE 1 with no second kick.",
    ),
    _c(
        "VU-RING-8",
        "used->idx is read at start, not latched early",
        "rings",
        MUST,
        f"{RST} Ring states",
        "When the front-end zeroes used->idx after SET_VRING_ADDR and before the first kick, the first completion lands in used slot 0.",
    ),
    _c(
        "VU-RING-9",
        "Packed ring I/O",
        "rings",
        MUST,
        f"{VIRTIO} Packed Virtqueues",
        "With RING_PACKED negotiated, reads and writes complete with the used flags and ids the packed layout prescribes.",
        requires=[V.RING_PACKED],
    ),
    _c(
        "VU-RING-10",
        "EVENT_IDX notification suppression",
        "rings",
        MUST,
        f"{VIRTIO} Split Virtqueues: Used Buffer Notification Suppression",
        "With RING_EVENT_IDX negotiated, the back-end signals the call fd exactly when used_event asks for it.",
        requires=[V.RING_EVENT_IDX],
    ),
    _c(
        "VU-RING-11",
        "Indirect descriptors",
        "rings",
        MUST,
        f"{VIRTIO} Split Virtqueues: Indirect Descriptors",
        "With RING_INDIRECT_DESC negotiated, a request described by an indirect table completes like a direct one.",
        requires=[V.RING_INDIRECT_DESC],
    ),
    _c(
        "VU-RING-12",
        "NO_INTERRUPT honoured without EVENT_IDX",
        "rings",
        SHOULD,
        f"{VIRTIO} Split Virtqueues: Used Buffer Notification Suppression",
        "Without EVENT_IDX, avail->flags NO_INTERRUPT suppresses call signals (NOTIFY_ON_EMPTY aside).",
    ),
    _c(
        "VU-SVB-1",
        "SET_VRING_BASE sets only the next avail index",
        "rings",
        MUST,
        f"{RST} Front-end message types: SET_VRING_BASE",
        "After SET_VRING_BASE n the back-end takes the next request from avail slot n and continues used->idx from guest memory.",
    ),
    # ---------------------------------------------------------------- blk I/O
    _c(
        "VU-BLK-1",
        "Write, then read back",
        "blk-io",
        MUST,
        f"{VIRTIO} Block Device: Device Operation",
        "Data written with VIRTIO_BLK_T_OUT reads back unchanged with VIRTIO_BLK_T_IN, status OK.",
    ),
    _c(
        "VU-BLK-2",
        "FLUSH",
        "blk-io",
        MUST,
        f"{VIRTIO} Block Device: Device Operation",
        "With FLUSH offered, VIRTIO_BLK_T_FLUSH completes with status OK.",
        requires=[B.FLUSH],
    ),
    _c(
        "VU-BLK-3",
        "Unknown request types are UNSUPP",
        "blk-io",
        MUST,
        f"{VIRTIO} Block Device: Device Operation",
        "A request of a type the device does not implement completes with VIRTIO_BLK_S_UNSUPP.",
    ),
    _c(
        "VU-BLK-4",
        "I/O beyond capacity fails",
        "blk-io",
        MUST,
        f"{VIRTIO} Block Device: Device Operation",
        "A read or write past the capacity completes with VIRTIO_BLK_S_IOERR and touches nothing.",
    ),
    _c(
        "VU-BLK-5",
        "GET_ID",
        "blk-io",
        SHOULD,
        f"{VIRTIO} Block Device: Device Operation",
        "VIRTIO_BLK_T_GET_ID fills at most 20 bytes and completes OK or UNSUPP.",
    ),
    _c(
        "VU-BLK-6",
        "DISCARD",
        "blk-io",
        MUST,
        f"{VIRTIO} Block Device: Device Operation",
        "With DISCARD offered, a discard within max_discard_sectors completes OK; one beyond it is rejected.",
        requires=[B.DISCARD],
    ),
    _c(
        "VU-BLK-7",
        "WRITE_ZEROES",
        "blk-io",
        MUST,
        f"{VIRTIO} Block Device: Device Operation",
        "With WRITE_ZEROES offered, the range reads back as zeroes.",
        requires=[B.WRITE_ZEROES],
    ),
    _c(
        "VU-BLK-8",
        "Read-only device refuses writes",
        "blk-io",
        MUST,
        f"{VIRTIO} Block Device: Device Operation",
        "A device that offers RO (the profile's read-only variant) completes writes with VIRTIO_BLK_S_IOERR and leaves the data unchanged.",
        ambiguity="the back-end under test does not offer RO by default: the case restarts it read-only where the profile knows how (reference --read-only, qemu-storage-daemon writable=off) and is unsupported elsewhere",
    ),
    _c(
        "VU-BLK-9",
        "I/O on every queue",
        "blk-io",
        MUST,
        f"{RST} Multiple queue support",
        "With several queues, requests on each queue complete on that queue.",
        requires=[P.MQ, B.MQ],
    ),
    # ---------------------------------------------------------------- stop / drain
    _c(
        "VU-GVB-1",
        "GET_VRING_BASE returns the next avail index",
        "stop-drain",
        MUST,
        f"{RST} Front-end message types: GET_VRING_BASE",
        "After N requests were taken, GET_VRING_BASE returns N (split: 16 bits of num) and stops the ring.",
    ),
    _c(
        "VU-GVB-3",
        "GET_VRING_BASE drains in-flight I/O",
        "stop-drain",
        MUST,
        f"{RST} Front-end message types: GET_VRING_BASE",
        "Without bit 20 negotiated, the reply comes only after every request taken from the ring has completed.",
        needs=["slow-io"],
    ),
    _c(
        "VU-GVB-4",
        "With bit 20 in-flight I/O may be suspended",
        "stop-drain",
        MAY,
        f"{RST} Front-end message types: GET_VRING_BASE; Inflight I/O tracking",
        "With bit 20 negotiated, a back-end that replies before its requests complete marks exactly those heads in flight in the region.",
        requires=[P.INFLIGHT_SHMFD, P.GET_VRING_BASE_INFLIGHT],
        ambiguity=_MAY_SUSPEND,
        needs=["slow-io"],
    ),
    _c(
        "VU-GVB-5",
        "Suspended device: no writes, no signals, still answers",
        "stop-drain",
        MUST,
        f"{RST} Suspended device state",
        "Once every ring is stopped, the back-end writes no guest memory, signals nothing, and still answers front-end messages.",
    ),
    _c(
        "VU-GVB-7",
        "GET_VRING_BASE reply is 8 bytes",
        "stop-drain",
        MUST,
        f"{RST} Front-end message types: GET_VRING_BASE",
        "The GET_VRING_BASE reply has the request's id and exactly an 8-byte vring state payload for the asked index.",
    ),
    _c(
        "VU-GVB-8",
        "A second GET_VRING_BASE and a restart agree",
        "stop-drain",
        MUST,
        f"{RST} Front-end message types: GET_VRING_BASE / SET_VRING_BASE",
        "A second GET_VRING_BASE returns the same index, and after SET_VRING_BASE with it and a restart I/O resumes at that slot.",
    ),
    _c(
        "VU-GVB-9",
        "Late completions after GET_VRING_BASE are silent",
        "stop-drain",
        MUST,
        f"{RST} Suspended device state",
        "Completions of I/O still running when the ring stopped write nothing and signal nothing, even after the call fd was closed.",
        requires=[P.INFLIGHT_SHMFD, P.GET_VRING_BASE_INFLIGHT],
        ambiguity=_SUSPENDED_DMA,
        needs=["slow-io"],
    ),
    _c(
        "VU-GVB-10",
        "Packed GET_VRING_BASE carries both indices",
        "stop-drain",
        MUST,
        f"{RST} Front-end message types: GET_VRING_BASE (packed)",
        "With RING_PACKED, GET_VRING_BASE returns the avail and used indices and both wrap counters.",
        requires=[V.RING_PACKED],
    ),
    _c(
        "VU-GVB-11",
        "Stop order of QEMU 11.1.3",
        "stop-drain",
        MUST,
        f"{RST} Ring states",
        "SET_VRING_ENABLE 0 then GET_VRING_BASE num 0, as QEMU 11.1.3 stops a device, is answered for every ring.",
    ),
    # ---------------------------------------------------------------- in-flight tracking
    _c(
        "VU-INF-1",
        "GET_INFLIGHT_FD returns a region",
        "inflight",
        MUST,
        f"{RST} Front-end message types: GET_INFLIGHT_FD",
        "GET_INFLIGHT_FD returns one fd with an mmap_size of at least num_queues x (16 + 16 x queue_size) (split), or size 0 and no fd.",
        requires=[P.INFLIGHT_SHMFD],
        ambiguity=_INFLIGHT_24,
    ),
    _c(
        "VU-INF-2",
        "SET_INFLIGHT_FD as QEMU sends it",
        "inflight",
        MUST,
        f"{RST} Front-end message types: SET_INFLIGHT_FD",
        "SET_INFLIGHT_FD with one fd and QEMU 11.1.3's 24-byte payload is accepted and the region used.",
        requires=[P.INFLIGHT_SHMFD],
        ambiguity=_INFLIGHT_24,
    ),
    _c(
        "VU-INF-4",
        "Fresh regions are initialised to version 1",
        "inflight",
        MUST,
        f"{RST} Inflight I/O tracking",
        "A zeroed region (version 0) is set to version 1 with desc_num = queue size once the ring starts.",
        requires=[P.INFLIGHT_SHMFD],
    ),
    _c(
        "VU-INF-5",
        "Resubmission in counter order",
        "inflight",
        MUST,
        f"{RST} Inflight I/O tracking",
        "After a restart, entries marked in flight are resubmitted in increasing counter order, once the last batch is fixed up when used_idx differs from used->idx.",
        requires=[P.INFLIGHT_SHMFD],
        needs=["command"],
    ),
    _c(
        "VU-INF-6",
        "Per-queue region layout",
        "inflight",
        MUST,
        f"{RST} Inflight I/O tracking",
        "Each queue's header has version 1 and desc_num equal to the queue size, at a stride of mmap_size / num_queues.",
        requires=[P.INFLIGHT_SHMFD],
        ambiguity="the spec does not fix the per-queue stride (64-byte aligned in some back-ends, 16 + 16 x Q in others): we derive it from mmap_size / num_queues",
    ),
    _c(
        "VU-INF-7",
        "Region follows every pop and completion",
        "inflight",
        MUST,
        f"{RST} Inflight I/O tracking",
        "inflight is 1 with a fresh counter for each taken head and 0 after its completion; used_idx follows used->idx.",
        requires=[P.INFLIGHT_SHMFD],
    ),
    _c(
        "VU-INF-8",
        "Head 0 is resubmitted too",
        "inflight",
        MUST,
        f"{RST} Inflight I/O tracking",
        "After a restart with head 0 in flight and used_idx 0, head 0 is resubmitted like any other.",
        requires=[P.INFLIGHT_SHMFD],
        needs=["command"],
    ),
    _c(
        "VU-INF-9",
        "Wrong in-flight payload sizes are refused safely",
        "inflight",
        MUST,
        f"{RST} Front-end message types: GET_INFLIGHT_FD / SET_INFLIGHT_FD",
        "GET/SET_INFLIGHT_FD with a short, empty or oversized payload gets an error or a closed connection, never a crash; a new connection works.",
        requires=[P.INFLIGHT_SHMFD],
    ),
    _c(
        "VU-INF-10",
        "SET_INFLIGHT_FD twice",
        "inflight",
        MUST,
        f"{RST} Front-end message types: SET_INFLIGHT_FD",
        "A second SET_INFLIGHT_FD (a new region of the size GET_INFLIGHT_FD gave) replaces the first without leaking the old mapping's fd or crashing.",
        requires=[P.INFLIGHT_SHMFD],
        needs=["command"],
    ),
    _c(
        "VU-INF-11",
        "Packed in-flight region",
        "inflight",
        MUST,
        f"{RST} Inflight I/O tracking (packed)",
        "With RING_PACKED, the packed region's free list, old_* fields and counters follow the rules, and a restart resubmits in counter order.",
        requires=[P.INFLIGHT_SHMFD, V.RING_PACKED],
    ),
    _c(
        "VU-INF-12",
        "In-flight region kept across reconnect",
        "inflight",
        MUST,
        f"{RST} Front-end message types: SET_INFLIGHT_FD",
        "On a new connection given the old region by SET_INFLIGHT_FD (no GET_INFLIGHT_FD), as QEMU does after a reconnect, pending heads are resubmitted.",
        requires=[P.INFLIGHT_SHMFD],
    ),
    # ---------------------------------------------------------------- migration
    _c(
        "VU-LOG-1",
        "Dirty log of used-ring writes",
        "migration",
        MUST,
        f"{RST} Migration",
        "With LOG_ALL and a shared log, every used-ring write and data-buffer write sets its 4 KiB page's bit.",
        requires=[P.LOG_SHMFD, V.LOG_ALL],
    ),
    _c(
        "VU-LOG-2",
        "No log updates after the source stops",
        "migration",
        MUST,
        f"{RST} Migration",
        "After GET_VRING_BASE on the source the dirty log does not change.",
        requires=[P.LOG_SHMFD, V.LOG_ALL],
    ),
    _c(
        "VU-MIG-3",
        "Destination resubmits the migrated in-flight requests",
        "migration",
        MUST,
        f"{RST} Inflight I/O tracking; Front-end message types: GET_VRING_BASE",
        "A destination given the migrated region by SET_INFLIGHT_FD and the migrated SET_VRING_BASE completes every suspended request once.",
        requires=[P.INFLIGHT_SHMFD, P.GET_VRING_BASE_INFLIGHT],
        needs=["slow-io"],
    ),
    _c(
        "VU-MIG-4",
        "Source region equals the front-end's model",
        "migration",
        MUST,
        f"{RST} Inflight I/O tracking",
        "After a no-drain GET_VRING_BASE, the region's bytes equal the front-end's model of what is in flight.",
        requires=[P.INFLIGHT_SHMFD, P.GET_VRING_BASE_INFLIGHT],
        ambiguity=_MAY_SUSPEND,
        needs=["slow-io"],
    ),
    _c(
        "VU-MIG-5",
        "Drain migration keeps the data",
        "migration",
        MUST,
        f"{RST} Migration",
        "Data written through the source before a drained stop reads back through a destination on the same disk.",
        needs=["shared-disk"],
    ),
    _c(
        "VU-MIG-6",
        "SET_LOG_BASE is answered",
        "migration",
        MUST,
        f"{RST} Front-end message types: SET_LOG_BASE",
        "With LOG_SHMFD, SET_LOG_BASE with the 16-byte log description and one fd gets its reply (payload N/A in the spec: any size) before the deadline.",
        requires=[P.LOG_SHMFD],
    ),
    _c(
        "VU-MIG-7",
        "Migration sequence of QEMU 11.1.3",
        "migration",
        MUST,
        f"{RST} Migration",
        "SET_LOG_BASE, SET_FEATURES(+LOG_ALL) and SET_VRING_ADDR(F_LOG) mid-session, as QEMU 11.1.3 sends them with NEED_REPLY, are each acked and I/O continues.",
        requires=[P.LOG_SHMFD, P.REPLY_ACK, V.LOG_ALL],
    ),
    _c(
        "VU-MIG-8",
        "Stop latency and downtime, drain vs no-drain",
        "migration",
        INFO,
        f"{RST} Front-end message types: GET_VRING_BASE",
        "Measured, not judged: the GET_VRING_BASE round trip and the migration downtime with requests held on a slow disk, draining and (with bit 20) suspending; every held request still completes once.",
        needs=["slow-io"],
    ),
    # ---------------------------------------------------------------- double submission
    _c(
        "VU-DBL-1",
        "No double completion across stop and restart",
        "double-submission",
        MUST,
        f"{RST} Front-end message types: GET_VRING_BASE / SET_VRING_BASE",
        "Across GET_VRING_BASE, SET_VRING_BASE and restart on one back-end, every request tag completes exactly once.",
    ),
    _c(
        "VU-DBL-2",
        "Exactly once across in-flight migration",
        "double-submission",
        MUST,
        f"{RST} Inflight I/O tracking",
        "With bit 20, each request completes exactly once across source and destination: never on both.",
        requires=[P.INFLIGHT_SHMFD, P.GET_VRING_BASE_INFLIGHT],
        needs=["slow-io"],
    ),
    _c(
        "VU-DBL-3",
        "Exactly once across a crash",
        "double-submission",
        MUST,
        f"{RST} Inflight I/O tracking",
        "Killing the back-end with K requests outstanding, restarting and reconnecting completes each of them exactly once.",
        requires=[P.INFLIGHT_SHMFD],
        needs=["command", "slow-io"],
    ),
    _c(
        "VU-DBL-4",
        "Completed requests are not resubmitted",
        "double-submission",
        MUST,
        f"{RST} Inflight I/O tracking",
        "A request already in the used ring on the source is not completed again on the destination or after a reconnect.",
        requires=[P.INFLIGHT_SHMFD],
    ),
    # ---------------------------------------------------------------- suspended state
    _c(
        "VU-SUSP-1",
        "No guest memory writes while suspended",
        "suspended",
        MUST,
        f"{RST} Suspended device state",
        "Guest memory snapshotted at the last GET_VRING_BASE reply is unchanged after the slow disk's latency has passed.",
        needs=["slow-io"],
    ),
    _c(
        "VU-SUSP-2",
        "No call signals while suspended",
        "suspended",
        MUST,
        f"{RST} Suspended device state",
        "No call eventfd is signalled after the last GET_VRING_BASE reply.",
        needs=["slow-io"],
    ),
    _c(
        "VU-SUSP-3",
        "No back-end channel messages while suspended",
        "suspended",
        MUST,
        f"{RST} Suspended device state",
        "Nothing arrives on the back-end channel after the last GET_VRING_BASE reply.",
        requires=[P.BACKEND_REQ],
    ),
    _c(
        "VU-SUSP-4",
        "Front-end messages answered while suspended",
        "suspended",
        MUST,
        f"{RST} Suspended device state",
        "While suspended, GET_FEATURES, GET_CONFIG and GET_VRING_BASE are still answered.",
    ),
    _c(
        "VU-SUSP-5",
        "No late DMA after a no-drain stop",
        "suspended",
        MUST,
        f"{RST} Suspended device state",
        "With bit 20, data buffers of requests left in flight are not written after the GET_VRING_BASE reply.",
        requires=[P.INFLIGHT_SHMFD, P.GET_VRING_BASE_INFLIGHT],
        ambiguity=_SUSPENDED_DMA,
        needs=["slow-io"],
    ),
    # ---------------------------------------------------------------- reconnect / reset
    _c(
        "VU-RECON-1",
        "A new connection after the front-end leaves",
        "reconnect",
        SHOULD,
        f"{RST} Communication",
        "After the front-end closes the socket, the back-end accepts a new connection and reaches a working state.",
        ambiguity="not stated; QEMU 11.1.3 reconnects (reconnect-ms) and relies on it",
    ),
    _c(
        "VU-RECON-2",
        "Reconnect with SET_VRING_BASE = used idx",
        "reconnect",
        MUST,
        f"{RST} Inflight I/O tracking",
        "After a crash, a new back-end given the old region and SET_VRING_BASE = used->idx (QEMU's fallback) resubmits and completes what was pending.",
        requires=[P.INFLIGHT_SHMFD],
        needs=["command"],
    ),
    _c(
        "VU-RECON-3",
        "QEMU 7.2 message order",
        "reconnect",
        MUST,
        f"{RST} Ring states",
        "The start and stop sequences of QEMU 7.2 (profile qemu-7.2) work like those of 11.1.",
    ),
    _c(
        "VU-RECON-4",
        "Front-end vanishes mid-request",
        "reconnect",
        MUST,
        f"{RST} Communication",
        "Closing the socket with requests in flight leaves the back-end alive and able to serve a new connection.",
    ),
    _c(
        "VU-RST-1",
        "RESET_OWNER is harmless",
        "reconnect",
        SHOULD,
        f"{RST} Front-end message types: RESET_OWNER",
        "RESET_OWNER is ignored or disables all rings; the back-end stays alive and answers.",
    ),
    _c(
        "VU-RST-2",
        "RESET_DEVICE resets to the initial state",
        "reconnect",
        MUST,
        f"{RST} Front-end message types: RESET_DEVICE",
        "With RESET_DEVICE negotiated, it disables all rings and resets device state while keeping ownership.",
        requires=[P.RESET_DEVICE],
    ),
    # ---------------------------------------------------------------- hostile guest
    _c(
        "VU-HOST-1",
        "Descriptor loop",
        "hostile-guest",
        MUST,
        f"{VIRTIO} Split Virtqueues: The Virtqueue Descriptor Table",
        "A descriptor chain that loops is refused (error status, device broken or ignored), with no crash or hang.",
    ),
    _c(
        "VU-HOST-2",
        "Chain longer than the queue",
        "hostile-guest",
        MUST,
        f"{VIRTIO} Split Virtqueues",
        "A chain of more descriptors than the queue size (split: through an indirect table; packed: wrapping the ring) gets an error, a stopped queue, a closed connection or is served, never a crash or hang.",
        ambiguity="VIRTIO 1.3 forbids the driver such chains but does not say what the device does; QEMU's own virtqueue serves an indirect table of any length, so serving it passes",
    ),
    _c(
        "VU-HOST-3",
        "Indirect inside indirect",
        "hostile-guest",
        MUST,
        f"{VIRTIO} Split Virtqueues: Indirect Descriptors",
        "An indirect table holding an INDIRECT descriptor is refused without a crash.",
        requires=[V.RING_INDIRECT_DESC],
    ),
    _c(
        "VU-HOST-4",
        "next out of range",
        "hostile-guest",
        MUST,
        f"{VIRTIO} Split Virtqueues",
        "A descriptor whose next index is beyond the table is refused without a crash.",
    ),
    _c(
        "VU-HOST-5",
        "Buffers outside guest memory",
        "hostile-guest",
        MUST,
        f"{RST} Memory region description",
        "A buffer that crosses a region's end or lies at an unmapped GPA is refused; no host memory is read or written.",
    ),
    _c(
        "VU-HOST-6",
        "avail->idx jumps past the queue size",
        "hostile-guest",
        MUST,
        f"{VIRTIO} Split Virtqueues: The Virtqueue Available Ring",
        "An avail->idx more than queue size ahead of the last one is refused without a crash or hang.",
    ),
    _c(
        "VU-HOST-7",
        "Wrong buffer directions",
        "hostile-guest",
        MUST,
        f"{VIRTIO} Block Device: Device Operation",
        "A device-writable header or a device-readable status byte gets an error or is ignored; nothing is written to the read-only buffer.",
    ),
    _c(
        "VU-HOST-8",
        "Head index beyond the queue",
        "hostile-guest",
        MUST,
        f"{VIRTIO} Split Virtqueues: The Virtqueue Available Ring",
        "An avail entry naming a head at or beyond the queue size is refused without a crash.",
    ),
    _c(
        "VU-HOST-9",
        "Flood of submissions",
        "hostile-guest",
        MUST,
        f"{VIRTIO} Split Virtqueues",
        "Making available and kicking far more requests than the queue holds, without waiting, leaves the back-end alive and correct.",
    ),
    _c(
        "VU-HOST-10",
        "Bad indirect table length",
        "hostile-guest",
        MUST,
        f"{VIRTIO} Split Virtqueues: Indirect Descriptors",
        "An indirect descriptor whose len is 0 or not a multiple of 16, or that also has NEXT, is refused without a crash or hang.",
        requires=[V.RING_INDIRECT_DESC],
    ),
    _c(
        "VU-HOST-11",
        "Zero-length buffers",
        "hostile-guest",
        MUST,
        f"{VIRTIO} Block Device: Device Operation",
        "A zero-length header, data or status buffer gets an error status, a completion, a stopped queue or a closed connection, never a crash or hang.",
    ),
    # ---------------------------------------------------------------- malformed messages
    _c(
        "VU-MAL-1",
        "Unknown request id",
        "malformed",
        MUST,
        f"{RST} Communication",
        "A request id the back-end does not know gets an error or a closed connection, never a crash; a new connection works.",
    ),
    _c(
        "VU-MAL-2",
        "Payload size not the layout's",
        "malformed",
        MUST,
        f"{RST} Message specification",
        "A request whose size does not match its layout (e.g. SET_VRING_NUM with 4 bytes) is refused without a crash.",
    ),
    _c(
        "VU-MAL-3",
        "Header size beyond any payload",
        "malformed",
        MUST,
        f"{RST} Message specification: Header",
        "A header announcing more payload than any message has makes the back-end close or refuse, without a crash.",
    ),
    _c(
        "VU-MAL-4",
        "Wrong version bits",
        "malformed",
        SHOULD,
        f"{RST} Message specification: Header",
        "A request with version bits other than 1 is refused.",
    ),
    _c(
        "VU-MAL-5",
        "SET_MEM_TABLE fds do not match regions",
        "malformed",
        MUST,
        f"{RST} Front-end message types: SET_MEM_TABLE",
        "SET_MEM_TABLE with fewer or more fds than regions, or more than 8 regions, is refused without a crash or leak.",
    ),
    _c(
        "VU-MAL-6",
        "Surplus fds are not leaked",
        "malformed",
        MUST,
        f"{RST} Communication",
        "1,000 messages carrying fds they should not leave the back-end's open fd count bounded (CVE-2022-0669).",
        needs=["command"],
    ),
    _c(
        "VU-MAL-7",
        "Bad ring sizes",
        "malformed",
        SHOULD,
        f"{RST} Front-end message types: SET_VRING_NUM",
        "SET_VRING_NUM with 0, a size beyond 32768, or (split) not a power of 2 is refused.",
    ),
    _c(
        "VU-MAL-8",
        "Vring index out of range",
        "malformed",
        MUST,
        f"{RST} Front-end message types",
        "SET_VRING_* and GET_VRING_BASE naming a queue the back-end does not have are refused without a crash.",
    ),
    _c(
        "VU-MAL-9",
        "Truncated message, then close",
        "malformed",
        MUST,
        f"{RST} Communication",
        "A header followed by part of its payload and a close leaves the back-end alive for a new connection.",
    ),
    _c(
        "VU-MAL-10",
        "GET_CONFIG beyond the config space",
        "malformed",
        MUST,
        f"{RST} Front-end message types: GET_CONFIG",
        "GET_CONFIG with size over 256 or offset+size past the config gets a size-0 error reply or a refusal, without a crash.",
        requires=[P.CONFIG],
    ),
    _c(
        "VU-MAL-11",
        "Requests for features not negotiated",
        "malformed",
        MUST,
        f"{RST} Protocol features",
        "GET_INFLIGHT_FD, GET_CONFIG or ADD_MEM_REG sent without their protocol feature negotiated are refused without a crash.",
    ),
    _c(
        "VU-MAL-12",
        "Missing fds",
        "malformed",
        MUST,
        f"{RST} Communication",
        "A message that must carry an fd (SET_VRING_KICK/CALL/ERR without the NOFD bit, ADD_MEM_REG, SET_INFLIGHT_FD, SET_BACKEND_REQ_FD, SET_LOG_BASE) sent without one is refused without a crash.",
    ),
    _c(
        "VU-MAL-13",
        "GET_INFLIGHT_FD with a short payload",
        "malformed",
        MUST,
        f"{RST} Front-end message types: GET_INFLIGHT_FD",
        "GET_INFLIGHT_FD or SET_INFLIGHT_FD with no payload or a truncated one gets an error or a closed connection, never a crash; a new connection works.",
        requires=[P.INFLIGHT_SHMFD],
    ),
    _c(
        "VU-MAL-14",
        "SET_INFLIGHT_FD twice, two regions",
        "malformed",
        MUST,
        f"{RST} Inflight I/O tracking",
        "Repeated SET_INFLIGHT_FD alternating two regions (each of the size GET_INFLIGHT_FD gave) leaks no fd or mapping and the last region is the one the back-end tracks requests in.",
        requires=[P.INFLIGHT_SHMFD],
        needs=["command"],
    ),
    _c(
        "VU-MAL-15",
        "Messages before SET_OWNER",
        "malformed",
        MUST,
        f"{RST} Front-end message types: SET_OWNER",
        "Session messages (SET_FEATURES, memory, SET_VRING_*) sent before SET_OWNER are refused or accepted, never a crash; a new connection works.",
    ),
    _c(
        "VU-MAL-16",
        "NEED_REPLY on every start-up message",
        "malformed",
        MUST,
        f"{RST} REPLY_ACK",
        "With REPLY_ACK negotiated, NEED_REPLY on every message of QEMU's start-up sequence yields exactly one reply per message: its defined reply, or else one u64 ack.",
        requires=[P.REPLY_ACK],
    ),
    _c(
        "VU-MAL-17",
        "NEED_REPLY without REPLY_ACK on every message",
        "malformed",
        SHOULD,
        f"{RST} REPLY_ACK",
        "With REPLY_ACK not negotiated, NEED_REPLY on every message of QEMU's start-up sequence yields the defined replies only, no ack.",
        ambiguity="the spec gives need_reply a meaning only with REPLY_ACK; an unasked ack desynchronises QEMU's reply reading",
    ),
    # ---------------------------------------------------------------- stateful fuzzing
    _c(
        "VU-FUZZ-1",
        "Fuzzed start sequences",
        "fuzz",
        MUST,
        f"{RST} Communication",
        "Any order and subset of the start-up messages (hypothesis) never crashes or hangs the back-end.",
    ),
    _c(
        "VU-FUZZ-2",
        "Fuzzed descriptor chains",
        "fuzz",
        MUST,
        f"{VIRTIO} Split Virtqueues",
        "Arbitrary descriptor chains (loops, lengths, flags, addresses) never crash or hang the back-end.",
    ),
    _c(
        "VU-FUZZ-3",
        "Disconnect at every message boundary",
        "fuzz",
        SHOULD,
        f"{RST} Communication",
        "Disconnecting after any message of the start-up sequence leaves a back-end that a new connection brings to a working state.",
        ambiguity="reconnection is not required by the spec; QEMU relies on it",
    ),
    _c(
        "VU-FUZZ-4",
        "In-flight counters stay in bounds",
        "fuzz",
        MUST,
        f"{RST} Inflight I/O tracking",
        "Under random submission and completion order the region's counters stay increasing and its entries match the outstanding heads.",
        requires=[P.INFLIGHT_SHMFD],
    ),
    # ---------------------------------------------------------------- device state
    _c(
        "VU-DS-1",
        "SET_DEVICE_STATE_FD: error or fd, not both",
        "device-state",
        MUST,
        f"{RST} Front-end message types: SET_DEVICE_STATE_FD",
        "The reply never reports an error and returns an fd at once; a returned fd is the one to use.",
        requires=[P.DEVICE_STATE],
    ),
    _c(
        "VU-DS-2",
        "State transfer is a pipe, checked after",
        "device-state",
        MUST,
        f"{RST} Migrating back-end state",
        "The state is written to / read from the transfer fd until EOF, and CHECK_DEVICE_STATE then reports success.",
        requires=[P.DEVICE_STATE],
    ),
    # ---------------------------------------------------------------- back-end program
    _c(
        "VU-BACKEND-1",
        "Exits on SIGTERM, does not daemonize",
        "program",
        SHOULD,
        f"{RST} Backend program conventions",
        "The back-end program stays in the foreground as the process we started and exits on SIGTERM.",
        needs=["command"],
        ambiguity="the section is advisory as a whole ('a good idea to follow when possible') while its sentences say 'must': a violation is non-strict",
    ),
    _c(
        "VU-BACKEND-2",
        "--print-capabilities",
        "program",
        SHOULD,
        f"{RST} Backend program conventions",
        "The program prints its capabilities as JSON with type 'block' on --print-capabilities and exits 0.",
        needs=["command"],
        ambiguity="the section is advisory as a whole ('a good idea to follow when possible') while its sentences say 'must': a violation is non-strict",
    ),
]

#: Every planned case, by id.
CATALOGUE: dict[str, Case] = {}
for _case in _CASES:
    if _case.id in CATALOGUE:
        raise ValueError(f"catalogue: {_case.id} listed twice")
    CATALOGUE[_case.id] = _case

#: SPEC-DIGEST section 10 ids that a front-end cannot test against a blk back-end, with why.
NOT_APPLICABLE: dict[str, str] = {
    "VU-FEAT-2": "a front-end obligation (bit 30 hidden from the guest): the back-end never sees the guest",
    "VU-FEAT-7": "a front-end behaviour (QEMU keeps bit 30 in every SET_FEATURES): nothing for a back-end to do",
    "VU-MQ-2": "a front-end obligation (not relying on MQ for fixed-queue devices)",
    "VU-FD-1": "a front-end obligation (fds with the header's first byte); our channel always does it",
    "VU-MEM-1": "a front-end obligation (no overlapping regions); hostile overlaps are VU-MAL-5/VU-HOST-5",
    "VU-MEM-3": "a front-end obligation (no POSTCOPY_* with CONFIGURE_MEM_SLOTS)",
    "VU-RING-6": "a front-end behaviour (when QEMU sends SET_VRING_ENABLE and how it waits); the ack itself is VU-ACK-1",
    "VU-GVB-2": "a front-end obligation (num = 0 in GET_VRING_BASE); every case sends 0",
    "VU-GVB-6": "a front-end behaviour (QEMU's stop sequence); the back-end's side is VU-GVB-11",
    "VU-INF-3": "a front-end behaviour (when QEMU asks for a new region); the back-end's side is VU-INF-12",
    "VU-MIG-1": "the front-end's migration stream (vmstate subsection), which a back-end never sees",
    "VU-MIG-2": "a front-end behaviour on the destination; the back-end's side is VU-MIG-3",
    "VU-CONN-1": "a front-end obligation (closing on a bad reply)",
    "VU-CONN-2": "permission for the back-end (may close in exceptional cases), nothing to fail; closing on bad input is allowed in VU-MAL-*",
    "VU-SHM-1": "VIRTIO Shared Memory Regions: virtio-blk has none, so SHMEM is not for a blk back-end",
    "VU-SHM-2": "VIRTIO Shared Memory Regions: virtio-blk has none, so GET_SHMEM_CONFIG is not for a blk back-end",
}

for _id in NOT_APPLICABLE:
    if _id in CATALOGUE:
        raise ValueError(f"catalogue: {_id} is both a case and not applicable")


def all_cases() -> list[Case]:
    """Every case, in id order: the records declared at the cases (``@case`` with the full
    record) and the catalogue's entries not yet moved there."""
    merged = dict(CATALOGUE)
    merged.update(defined_in_suites())
    return sorted(merged.values(), key=lambda c: sort_key(c.id))


def case_record(entry: Case, implemented: bool = True) -> dict[str, object]:
    """One case as ``vhost-conformance cases --json`` prints it (docs/report-schema.md)."""
    return {
        "id": entry.id,
        "title": entry.title,
        "family": entry.family,
        "tier": entry.tier.value,
        "level": entry.level.value,
        "clause": entry.clause,
        "quote": entry.quote,
        "source": entry.source,
        "requirement": entry.requirement,
        "requires": [feature_label(f) for f in entry.requires],
        "needs": list(entry.needs),
        "ambiguity": entry.ambiguity,
        "implemented": implemented,
    }


def cases_by_family() -> dict[str, list[Case]]:
    """The catalogue grouped by family (families in model.FAMILIES order, ids in id order)."""
    grouped: dict[str, list[Case]] = {family: [] for family in FAMILIES}
    for entry in all_cases():
        grouped[entry.family].append(entry)
    return {family: entries for family, entries in grouped.items() if entries}


def format_catalogue(implemented: Iterable[str] = ()) -> str:
    """The catalogue as text for ``vhost-conformance cases``: one line per case (id, level,
    title, what it needs), grouped by family, then the not-applicable ids with why.

    ``implemented``: ids that have a case function; those lines are marked ``*``.
    """
    done = set(implemented)
    lines: list[str] = []
    for family, entries in cases_by_family().items():
        lines.append(f"{family} ({len(entries)})")
        for entry in entries:
            mark = "*" if entry.id in done else " "
            needs = [feature_label(f).split(" (")[0] for f in entry.requires] + list(entry.needs)
            suffix = f"  [needs {', '.join(needs)}]" if needs else ""
            lines.append(
                f" {mark} {entry.id:<13} {entry.level.value:<6} {entry.tier.value:<11} "
                f"{entry.title}{suffix}"
            )
            lines.append(f"       {entry.clause}")
        lines.append("")
    lines.append(f"not applicable to a blk back-end ({len(NOT_APPLICABLE)})")
    for case_id in sorted(NOT_APPLICABLE, key=sort_key):
        lines.append(f"   {case_id:<13} {NOT_APPLICABLE[case_id]}")
    every = {c.id for c in all_cases()}
    lines.append("")
    lines.append(f"{len(every)} cases, {len(done & every)} implemented (*)")
    return "\n".join(lines) + "\n"


def defined_in_suites() -> dict[str, Case]:
    """The cases defined by ``@case`` in the suite modules (``vhost_conformance.suites.test_*``),
    by id. Raises CatalogueMismatch when two functions claim one id."""
    import importlib
    import pkgutil

    import vhost_conformance.suites as suites_package
    from vhost_conformance.suites.model import defined_cases

    functions: list[object] = []
    for module_info in pkgutil.iter_modules(suites_package.__path__):
        if module_info.name.startswith("test_"):
            module = importlib.import_module(f"vhost_conformance.suites.{module_info.name}")
            functions.extend(vars(module).values())
    return defined_cases(functions)
