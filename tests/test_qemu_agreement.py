"""run_report.qemu_agreement (report.json's negotiated features) on device types other than
block (issue 14): the session models a virtio-blk guest, so on a net or fs back-end it agrees
transport bits only, never the blk bit numbers (which mean other features there)."""

from __future__ import annotations

from vhost_conformance.frontend.protocol import BlkFeature, NetFeature, VirtioFeature
from vhost_conformance.suites.capabilities import Capabilities
from vhost_conformance.suites.run_report import qemu_agreement

TRANSPORT = (1 << VirtioFeature.VERSION_1) | (1 << VirtioFeature.RING_EVENT_IDX) | (
    1 << VirtioFeature.PROTOCOL_FEATURES
)
DEVICE_BITS = (1 << 24) - 1


def test_block_agrees_the_blk_bits_a_guest_acks() -> None:
    offered = TRANSPORT | 1 << BlkFeature.FLUSH | 1 << BlkFeature.SEG_MAX
    features, _ = qemu_agreement(Capabilities(offered, device_type="block"))
    assert features == offered


def test_net_agrees_no_blk_numbered_bit() -> None:
    # NET_F_MAC (5) is BLK_F_RO's number, bit 9 is BLK_F_FLUSH's: a blk guest would ack them
    offered = TRANSPORT | 1 << NetFeature.MAC | 1 << BlkFeature.FLUSH | 1 << BlkFeature.SEG_MAX
    features, _ = qemu_agreement(Capabilities(offered, device_type="net"))
    assert features & DEVICE_BITS == 0
    assert features == TRANSPORT
