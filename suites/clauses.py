"""Text the case records share: the two specs' names for clauses and the ambiguity notes
used by more than one case (see docs/ARCHITECTURE.md "How a case declares its record")."""

from __future__ import annotations

#: Prefix of a clause in vhost-user.rst as QEMU 11.1.3 ships it.
RST = "vhost-user.rst (QEMU 11.1.3)"
#: Prefix of a clause in VIRTIO 1.3 (followed by the section number).
VIRTIO = "VIRTIO 1.3"

QEMU_FLAGS = (
    "the spec requires the REPLY bit and version 1 only; QEMU 11.1.3 (vhost_user_read_header) "
    "rejects a reply whose flags are not exactly 0x5, so we require 0x5"
)
INFLIGHT_24 = (
    "the spec's struct is 20 bytes; QEMU 11.1.3 sends and expects 24 (padded, bytes 20-23 "
    "zero, QEMU-TRACES.md correction 1): we send 24 and accept a 24-byte reply"
)
MAY_SUSPEND = (
    "the spec says the back-end 'may' suspend; QEMU 11.1.3 accepts a back-end that still drains "
    "(QEMU-TRACES.md correction 11): draining passes, suspending must leave an exact record"
)
SUSPENDED_DMA = (
    "'may suspend' does not say what happens to host I/O still running; we apply the "
    "Suspended device state rules (no guest memory writes after the reply), the reading "
    "Stefan Hajnoczi gave in the v5 review, not normative text"
)
