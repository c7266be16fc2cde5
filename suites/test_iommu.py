"""IOMMU support: IOTLB messages (vhost-user.rst (QEMU 11.1.3) "IOMMU support",
"Back-end message types: VHOST_USER_BACKEND_IOTLB_MSG").

Family: memory (VU-IOMMU-*). No back-end the suite runs (the reference, qemu-storage-daemon
7.2 and 11.1.3, DPDK's vhost_blk, contrib vhost-user-blk) offers VIRTIO_F_IOMMU_PLATFORM, so
the IOTLB exchange itself (IOTLB_MSG acks, miss and access-fail payloads, ring addresses as
IOVAs: SPEC-AUDIT V07, V40, V41, V42) has no case yet: it could only be written blind. What
every back-end can be held to is the other side: without IOMMU_PLATFORM, no IOTLB traffic.
"""

from __future__ import annotations

from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.protocol import BackendRequest, ProtocolFeature, VirtioFeature
from vhost_conformance.suites.clauses import RST
from vhost_conformance.suites.drivers import SessionFactory, do_io, stop_now
from vhost_conformance.suites.model import SHOULD, CaseNonStrict, Unsupported, case
from vhost_conformance.suites.target import BackendTarget


@case(
    "VU-IOMMU-1", title="No BACKEND_IOTLB_MSG without IOMMU_PLATFORM", family="memory",
    level=SHOULD, clause=f"{RST} Back-end message types: VHOST_USER_BACKEND_IOTLB_MSG",
    requires=[ProtocolFeature.BACKEND_REQ],
    quote="This request should be send only when VIRTIO_F_IOMMU_PLATFORM feature has been "
        "successfully negotiated.",
    requirement="With the back-end channel set up and VIRTIO_F_IOMMU_PLATFORM not negotiated, I/O "
        "on a running ring and its stop bring no BACKEND_IOTLB_MSG.",
)
def test_no_iotlb_msg_without_iommu_platform(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """I/O without IOMMU_PLATFORM: no IOTLB message on the back-end channel."""
    session: Session = make_session(vhost_target, start=False)
    if session.backend_channel is None:
        raise Unsupported(ProtocolFeature.BACKEND_REQ, "no back-end channel was set up")
    session.start(features=session.driver_features() & ~(1 << VirtioFeature.IOMMU_PLATFORM))
    do_io(session, 4)
    stop_now(session)
    channel = session.backend_channel
    iotlb = [m for m in channel.messages() if m.request == BackendRequest.IOTLB_MSG]
    if iotlb:
        raise CaseNonStrict(
            f"{len(iotlb)} BACKEND_IOTLB_MSG on the back-end channel (first payload "
            f"{bytes(iotlb[0].payload).hex()}) though VIRTIO_F_IOMMU_PLATFORM was not "
            "negotiated"
        )
