"""What the reference back-end offers and how it behaves (:class:`BackendOptions`, filled in by the
CLI).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vhost_conformance.frontend.protocol import (
    BlkFeature,
    ProtocolFeature,
    VirtioFeature,
)


def _bit(n: int) -> int:
    return 1 << int(n)


def _mask(bits: Iterable[int]) -> int:
    """The bit mask of ``bits``."""
    value = 0
    for b in bits:
        value |= _bit(b)
    return value


#: Memory slots we offer (GET_MAX_MEM_SLOTS), as QEMU's libvhost-user.
MAX_MEM_SLOTS = 509


@dataclass(slots=True)
class BackendOptions:
    """What the back-end offers and how it behaves (the CLI fills this in)."""

    queues: int = 1
    read_only: bool = False
    blk_size: int = 512
    latency: float = 0.0
    inflight_migration: bool = True
    #: offer bit 23 GET_VRING_BASE_SKIP_DRAIN (a post-11.1 proposal) with bit 20; harmless to
    #: QEMU 11.1.3, which masks bits >= 23 off (docs/SPEC-NOTES.md "qemu-next")
    skip_drain: bool = True
    packed: bool = True
    max_mem_slots: int = MAX_MEM_SLOTS
    device_id: bytes = b"vhost-conformance"

    def virtio_features(self) -> int:
        """The virtio feature bits offered by GET_FEATURES."""
        bits = [
            VirtioFeature.VERSION_1,
            VirtioFeature.RING_INDIRECT_DESC,
            VirtioFeature.RING_EVENT_IDX,
            VirtioFeature.LOG_ALL,
            VirtioFeature.PROTOCOL_FEATURES,
            BlkFeature.SEG_MAX,
            BlkFeature.BLK_SIZE,
            BlkFeature.FLUSH,
            BlkFeature.TOPOLOGY,
            BlkFeature.CONFIG_WCE,
            BlkFeature.MQ,
            BlkFeature.DISCARD,
            BlkFeature.WRITE_ZEROES,
        ]
        if self.packed:
            bits.append(VirtioFeature.RING_PACKED)
        if self.read_only:
            bits.append(BlkFeature.RO)
        return _mask(bits)

    def protocol_features(self) -> int:
        """The protocol feature bits offered by GET_PROTOCOL_FEATURES."""
        P = ProtocolFeature
        bits = [
            P.MQ,
            P.LOG_SHMFD,
            P.REPLY_ACK,
            P.BACKEND_REQ,
            P.CONFIG,
            P.INFLIGHT_SHMFD,
            P.RESET_DEVICE,
            P.CONFIGURE_MEM_SLOTS,
            P.STATUS,
            P.DEVICE_STATE,
            P.PAGEFAULT,
        ]
        if self.inflight_migration:
            bits.append(P.GET_VRING_BASE_INFLIGHT)
            if self.skip_drain:
                bits.append(P.GET_VRING_BASE_SKIP_DRAIN)
        return _mask(bits)
