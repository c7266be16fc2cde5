"""Text the case records share: the two specs' names for clauses and the ambiguity notes
used by more than one case (see docs/ARCHITECTURE.md "How a case declares its record")."""

from __future__ import annotations


def quotes(*sentences: str) -> str:
    """A case's quote made of several sentences of its clause, one per line."""
    return "\n".join(sentences)


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
ADVISORY_CONVENTIONS = (
    "the section is advisory as a whole ('a good idea to follow when possible') while its "
    "sentences say 'must': a violation is non-strict"
)

# vhost-user.rst sentences quoted by more than one case (verbatim, one sentence a line;
# tests/test_spec_quotes.py checks them against the shipped text).
#: vhost-user.rst REPLY_ACK.
REPLY_ACK_RESPOND_QUOTE = (
    "This indicates that the back-end MUST respond with a Payload VhostUserMsg indicating success "
    "or failure."
)
#: vhost-user.rst REPLY_ACK.
REPLY_ACK_PAYLOAD_QUOTE = (
    "The payload should be set to zero on success or non-zero on failure, unless the message "
    "already has an explicit reply body."
)
#: vhost-user.rst REPLY_ACK.
REPLY_ACK_SOLICITED_QUOTE = (
    "For the message types that already solicit a reply from the back-end, the presence of "
    "VHOST_USER_PROTOCOL_F_REPLY_ACK or need_reply bit being set brings no behavioural change."
)
#: vhost-user.rst Backend program conventions.
BACKEND_CONVENTIONS_QUOTE = (
    "However, it is a good idea to follow the conventions listed here when possible."
)
#: vhost-user.rst Ring states.
RING_STARTED_ENABLED_QUOTE = (
    "started and enabled: The back-end must process the ring normally, i.e. process all requests "
    "and execute them."
)
#: vhost-user.rst Multiple queue support.
MULTIQUEUE_GET_QUEUE_NUM_QUOTE = (
    "The max number of queues the back-end supports can be queried with message "
    "VHOST_USER_GET_QUEUE_NUM."
)
#: vhost-user.rst Front-end message types: GET_VRING_BASE.
GET_VRING_BASE_DRAIN_QUOTE = (
    "By default, the back-end must complete all inflight I/O requests for the specified vring "
    "before stopping it."
)
#: vhost-user.rst Front-end message types: GET_VRING_BASE.
GET_VRING_BASE_INFLIGHT_QUOTE = (
    "If the VHOST_USER_PROTOCOL_F_GET_VRING_BASE_INFLIGHT protocol feature has been negotiated, "
    "the back-end may suspend in-flight I/O requests and record them as described in Inflight I/O "
    "tracking instead of completing them before stopping the vring."
)
#: vhost-user.rst Front-end message types: SET_INFLIGHT_FD.
SET_INFLIGHT_FD_QUOTE = (
    "When VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD protocol feature has been successfully negotiated, "
    "this message is submitted by the front-end to send the shared inflight buffer back to the "
    "back-end so that the back-end could get inflight I/O after a crash or restart."
)
#: vhost-user.rst Inflight I/O tracking.
INFLIGHT_TRACKING_QUOTE = "To track inflight I/O, the queue region should be processed as follows:"
#: vhost-user.rst Inflight I/O tracking.
INFLIGHT_USED_IDX_QUOTE = (
    "If the value of used_idx does not match the idx value of used ring (means the inflight field "
    "of DescStateSplit entries in last batch may be incorrect), Subtract the value of used_idx "
    "from the idx value of used ring to get last batch size of DescStateSplit entries"
)
#: vhost-user.rst Memory region description.
MEMORY_REGION_MAP_QUOTE = (
    "Guest addresses map to the vhost memory region containing that guest address."
)
#: vhost-user.rst Front-end message types: GET_PROTOCOL_FEATURES.
GET_PROTOCOL_FEATURES_QUOTE = (
    "Back-ends that report VHOST_USER_F_PROTOCOL_FEATURES must support this message even before "
    "VHOST_USER_SET_FEATURES was called."
)
#: vhost-user.rst Front-end message types: GET_VRING_BASE.
GET_VRING_BASE_STOPS_QUOTE = "Stops the vring and returns the current descriptor index or indices:"
#: vhost-user.rst Front-end message types: GET_VRING_BASE.
GET_VRING_BASE_SPLIT_QUOTE = (
    "For a split virtqueue, returns only the 16-bit next descriptor index to process in the "
    "Available Ring."
)
#: vhost-user.rst Suspended device state.
SUSPENDED_STATE_QUOTE = (
    "While all vrings are stopped, the device is suspended. In addition to not processing any "
    "vring (because they are stopped), the device must:\n"
    "not write to any guest memory regions, not send any notifications to the guest, not send any "
    "messages to the front-end, still process and reply to messages from the front-end."
)
#: vhost-user.rst Inflight I/O tracking.
INFLIGHT_RESUBMIT_QUOTE = "Resubmit inflight DescStateSplit entries in order of their counter value"
#: vhost-user.rst Migration.
MIGRATION_LOG_QUOTE = "Log starts at the supplied offset in the supplied file descriptor."
#: vhost-user.rst Front-end message types: ADD_MEM_REG.
ADD_MEM_REG_QUOTE = (
    "The message payload contains a memory region descriptor struct, describing a region of guest "
    "memory which the back-end device must map in."
)
#: vhost-user.rst Ring states.
RING_STOPPED_QUOTE = (
    "While a ring is stopped, the back-end must not process the ring at all, regardless of whether "
    "it is enabled or disabled."
)
#: vhost-user.rst Ring states.
RING_STARTED_DISABLED_QUOTE = (
    "started and disabled: The back-end must process the ring without causing any side effects."
)
#: vhost-user.rst Front-end message types: SET_VRING_BASE.
SET_VRING_BASE_SPLIT_QUOTE = (
    "For a split virtqueue, sets only the next descriptor index to process in the Available Ring. "
    "The device is supposed to read the next index in the Used Ring from the respective vring "
    "structure in guest memory."
)
#: vhost-user.rst GET_VRING_BASE and SET_INFLIGHT_FD: the three sentences an in-flight
#: migration case quotes together.
INFLIGHT_MIGRATION_QUOTE = "\n".join(
    (GET_VRING_BASE_DRAIN_QUOTE, GET_VRING_BASE_INFLIGHT_QUOTE, SET_INFLIGHT_FD_QUOTE)
)
