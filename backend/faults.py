"""Fault injection: a crash at the Nth time a named point of a request's life is reached
(``--crash-at POINT[:N]``), and random I/O errors (``--fail-rate P --seed S``).

The points, in the order a request passes them (vhost-user.rst "Inflight I/O tracking"
fixes the order of the writes between them, so a crash at any point is recoverable):

- ``after-pop``: the head was taken from the ring and marked in flight in the region;
- ``after-data``: data and status byte are in guest memory / on the disk;
- ``after-used-elem``: the used element is written, used->idx not yet;
- ``after-used-idx``: used->idx (packed: the used flags) published, region not updated;
- ``after-region-update``: the region shows the request completed, no notification yet.

Misbehaviour knobs (``--misbehave NAME[,NAME]``): each one breaks one clause of vhost-user.rst
on purpose, so the suite can show that the case judging that clause fails (tests/test_mutations.py).
:data:`MISBEHAVIOURS` names them with the clause they break.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, field

CRASH_POINTS = (
    "after-pop",
    "after-data",
    "after-used-elem",
    "after-used-idx",
    "after-region-update",
)


def parse_crash_at(text: str) -> tuple[str, int]:
    """Parse ``POINT`` or ``POINT:N`` (N >= 1, default 1)."""
    point, _, count = text.partition(":")
    if point not in CRASH_POINTS:
        raise ValueError(f"unknown crash point {point!r} (one of {', '.join(CRASH_POINTS)})")
    if not count:
        return point, 1
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"crash point count {count!r} must be a positive integer")
    return point, int(count)


#: name -> what the back-end then does wrong (one line, shown by ``--help``).
MISBEHAVIOURS: dict[str, str] = {
    "skip-used-idx-fixup": "on restart keep SET_VRING_BASE's avail index instead of "
    "used->idx + in flight (\"Inflight I/O tracking\": last_avail_idx fix-up)",
    "resubmit-head-order": "resubmit the in-flight heads in head order, not counter order",
    "ignore-inflight": "on restart ignore the in-flight region: resubmit nothing",
    "base-is-used-idx": "answer GET_VRING_BASE with the used index, not the next avail index",
    "base-reserved-bits": "garbage in bits 16-31 of the split GET_VRING_BASE reply",
    "wrong-reply-flags": "replies carry flags 0x1 (the REPLY bit 0x4 missing)",
    "no-log-used": "leave used-ring writes out of the dirty log",
    "call-after-stop": "a call signal 0.2 s after the GET_VRING_BASE reply",
    "early-drain-reply": "reply to a draining GET_VRING_BASE one request early (that one "
    "completes, used write and call, after the reply)",
    "complete-after-suspend": "with bit 20, complete one suspended request after the reply",
    "ack-zero-on-error": "a rejected request with NEED_REPLY is acked 0 (success), not 1",
    "ack-without-reply-ack": "NEED_REPLY is acked even when REPLY_ACK was not negotiated",
    "no-reply-ack": "NEED_REPLY requests get no ack at all",
    "short-config-reply": "GET_CONFIG replies to requests of at most 8 bytes carry one byte "
    "fewer than asked (a full-size read, as a capability probe makes, stays right)",
    "unknown-type-ok": "requests of a type the device does not implement complete with OK, not UNSUPP",
    "features-change": "the second and later GET_FEATURES replies drop EVENT_IDX (bit 29)",
    "wce-without-flush": "offer VIRTIO_BLK_F_CONFIG_WCE without VIRTIO_BLK_F_FLUSH",
    "used-flags-garbage": "used->flags set to 2 (only 0 or 1 are allowed; 0 with EVENT_IDX)",
    "status-not-kept": "GET_STATUS drops DRIVER_OK (0x4) from the status SET_STATUS wrote",
    "capacity-ignored": "reads and writes past the capacity complete with OK (nothing done)",
    "write-at-close": "with bit 20, suspended WRITEs reach the disk when the connection closes "
    "(after a migration: over the destination's newer data)",
    "write-after-suspend": "with bit 20, suspended WRITEs still reach the disk 0.1 s after the "
    "reply (not cancelled; no guest memory write, no completion)",
    # mut-new: memory, fds, notifications
    "rem-mem-reg-by-offset": "REM_MEM_REG matches the mmap offset too: a region named with "
    "another mmap_offset is refused (the spec: the mmap offset is ignored)",
    "rem-mem-reg-keeps-map": "REM_MEM_REG is acked but the region stays mapped and in use",
    "ignore-mmap-offset": "memory regions are mapped from offset 0 of their fd (mmap_offset "
    "ignored)",
    "regions-share-first-fd": "SET_MEM_TABLE maps every region from the first region's fd",
    "mem-slots-overstated": "ADD_MEM_REG refused beyond 16 regions while GET_MAX_MEM_SLOTS "
    "announces more",
    "keep-rem-mem-reg-fd": "an fd sent with REM_MEM_REG is kept open (leaked), not closed",
    "ignore-nofd": "the NOFD bit of SET_VRING_KICK/CALL is accepted and ignored: a NOFD ring "
    "is never polled, the replaced call fd is still signalled",
    # mut-basic (issue 10): handshake, features, config, blk I/O, ring states, reset
    "reply-version-0": "replies carry version 0 in flags bits 0-1 (flags 0x4)",
    "queue-num-reply-id": "the GET_QUEUE_NUM reply carries the request id of GET_FEATURES (1)",
    "features-byte-swapped": "GET_FEATURES answered byte-swapped, offering NOTIFY_ON_EMPTY "
    "(bit 24) as qemu-storage-daemon 11.1.3 does (swapped, bit 24 lands on bit 32)",
    "protocol-features-need-set-features": "SET_PROTOCOL_FEATURES before any SET_FEATURES is "
    "taken without effect (no protocol feature negotiated, REPLY_ACK included)",
    "bit20-without-bit12": "offer GET_VRING_BASE_INFLIGHT (20) without INFLIGHT_SHMFD (12)",
    "accept-bit20-without-bit12": "SET_PROTOCOL_FEATURES with bit 20 and without bit 12 is "
    "accepted (acked 0)",
    "no-config-feature": "protocol feature CONFIG (bit 9) not offered",
    "protocol-subset-refused": "SET_PROTOCOL_FEATURES of less than the whole offer closes the "
    "connection",
    "no-version-1": "VIRTIO_F_VERSION_1 (bit 32) not offered",
    "need-reply-extra-ack": "a request with a reply of its own sent with NEED_REPLY gets a u64 0 "
    "ack after its reply",
    "set-features-drops-protocol": "SET_FEATURES without bit 30 forgets the negotiated protocol "
    "features (REPLY_ACK acks stop)",
    "config-readonly-writable": "SET_CONFIG with flags 0 writes capacity (read-only)",
    "capacity-short": "the config's capacity is one sector less than the disk",
    "wce-not-kept": "SET_CONFIG of wce is acked but the writeback field keeps its value",
    "config-zero-limit": "config max_discard_seg 0 although DISCARD is offered",
    "config-padding-garbage": "config padding bytes unused0 (33) and unused1 (57-59) are 0xa5",
    "config-offset-ignored": "GET_CONFIG at an offset returns the bytes from offset 0",
    "config-out-of-range-bytes": "GET_CONFIG past the config space answered with as many zero "
    "bytes as asked, not with a size-0 reply",
    "reset-owner-closes": "RESET_OWNER closes the connection",
    "reset-device-keeps-rings": "RESET_DEVICE is acked but the rings keep running",
    "config-num-queues-high": "config num_queues is one more than GET_QUEUE_NUM",
    # mut-stop (issue 10): stop, suspended state, in-flight region, logging, reconnect
    "inflight-no-version": "the in-flight region is never given version 1 (its header stays 0; "
    "the marks are kept all the same)",
    "inflight-keep-marks": "completed heads stay marked in flight (inflight 1) in the region; "
    "used_idx is updated",
    "inflight-short-mmap": "GET_INFLIGHT_FD replies an mmap_size 16 bytes short of "
    "num_queues x (16 + 16 x queue size) (split)",
    "inflight-bad-size-crash": "a GET_INFLIGHT_FD or SET_INFLIGHT_FD payload that is not 24 "
    "bytes kills the back-end",
    "serve-stopped-ring": "a ring stopped by GET_VRING_BASE keeps its kick fd and still serves "
    "what the driver makes available",
    "mute-while-suspended": "once GET_VRING_BASE has stopped every ring, GET_FEATURES gets no "
    "reply (until a ring starts again)",
    "base-of-ring-0": "GET_VRING_BASE of any ring answers ring 0's next avail index",
    "log-after-stop": "0.2 s after a GET_VRING_BASE reply, every bit of the dirty log is set "
    "(a late log write; guest memory untouched)",
    "exit-on-disconnect": "the back-end exits when the front-end closes the connection",
    "no-log-base-reply": "SET_LOG_BASE gets no reply (with LOG_SHMFD it must have one)",
    "flush-no-sync": "FLUSH completes with OK without syncing the disk",
    "skip-last-batch-fixup": "on restart, a last batch that reached used->idx but not the "
    "region (used_idx behind) stays in flight: resubmitted (\"Inflight I/O tracking\" split "
    "reconnect rule)",
    "write-segments-lost": "a WRITE whose data spans several descriptors takes only the first "
    "data descriptor",
    "flush-ioerr": "FLUSH completes with IOERR",
    "get-id-ioerr": "GET_ID completes with IOERR",
    "discard-limit-ignored": "a discard beyond max_discard_sectors completes with OK (nothing "
    "done)",
    "write-zeroes-unmap-noop": "a WRITE_ZEROES with the unmap flag completes with OK and leaves "
    "the range as it was",
    "segment-flags-ignored": "discard/write-zeroes segments with unknown flags, or a discard "
    "with unmap, complete with OK (nothing done), not UNSUPP",
    "read-only-writes": "on a read-only device (--read-only) a WRITE completes with OK (nothing "
    "written)",
    "second-queue-ignored": "queues other than queue 0 are never served",
    "flush-before-writes": "WRITEs complete at once, their data reaches the disk 0.5 s later: "
    "a FLUSH completes before earlier completed writes are on the disk",
    "skip-drain-drains": "GET_VRING_BASE_SKIP_DRAIN (proposal, message 45) drains like "
    "GET_VRING_BASE instead of suspending",
    "skip-drain-reply-id": "the GET_VRING_BASE_SKIP_DRAIN reply carries request id 11 "
    "(GET_VRING_BASE's), not 45",
    "offer-skip-drain-alone": "offer bit 23 GET_VRING_BASE_SKIP_DRAIN without bit 20 (and "
    "accept it agreed alone)",
    "socket-path-equals-unknown": "the program refuses --socket-path=PATH (only --socket-path "
    "PATH is understood)",
    "no-fd-option": "the program refuses --fd=FDNUM as an unknown option",
    "init-failure-exit-0": "the program exits with status 0 when its disk cannot be opened",
    "print-capabilities-serves": "with --print-capabilities and a socket option the program "
    "prints its capabilities and then serves the socket anyway",
    "packed-read-no-data": "on a packed ring, reads complete OK with zeroed data (the disk's "
    "bytes never reach the guest's buffers)",
    "queue-num-understated": "GET_QUEUE_NUM answers one queue fewer than the device has (0 "
    "with one queue)",
    "region-desc-num-wrong": "a fresh in-flight region is initialised with desc_num one less "
    "than the queue size",
    "set-mem-table-refused": "SET_MEM_TABLE is refused: only ADD_MEM_REG maps memory (a "
    "back-end written for front-ends with CONFIGURE_MEM_SLOTS)",
    "packed-base-wrap-ignored": "SET_VRING_BASE on a packed ring ignores both wrap counters "
    "(bits 15 and 31 taken as 1)",
    "packed-base-used-half-avail": "GET_VRING_BASE on a packed ring returns the avail index and "
    "wrap counter in the used half too",
    "config-change-while-suspended": "a disk resize (SIGUSR1) sends BACKEND_CONFIG_CHANGE_MSG "
    "while every ring is stopped, too",
    "iotlb-msg-without-iommu": "a BACKEND_IOTLB_MSG miss on the back-end channel at the first "
    "kick, though VIRTIO_F_IOMMU_PLATFORM was not negotiated",
    # robustness (mut-robust): the process dies (SIGSEGV/SIGABRT), stops answering or keeps
    # fds/mappings on exactly the hostile input a case sends
    "crash-on-unexpected-request": "SIGABRT on a request it has no business handling now: an "
    "unknown id, a feature-gated request without its protocol feature, a session request "
    "before SET_OWNER",
    "trust-payload-size": "SIGSEGV on a payload whose size does not fit its request's layout "
    "(shorter: read past it; longer than the layout or the 2056-byte union: copied over it)",
    "spin-on-partial-message": "a message cut short by EOF is waited for forever: the process "
    "stops serving anyone",
    "crash-on-bad-fd-count": "SIGSEGV on a message carrying fewer fds than it needs (or a "
    "SET_MEM_TABLE of more than 8 regions)",
    "leak-surplus-fds": "fds a message carries beyond what it needs are kept open (CVE-2022-0669), "
    "the message served",
    "leak-inflight-regions": "SET_INFLIGHT_FD keeps the earlier region's mapping and fd",
    "crash-on-bad-vring-index": "SIGSEGV on a vring index the device does not have",
    "ignore-version-bits": "requests with version bits other than 1 are served",
    "accept-any-ring-size": "SET_VRING_NUM of any size is accepted (0, > 32768, not a power of 2)",
    "crash-on-stop-before-start": "SIGSEGV on GET_VRING_BASE of a ring not started (the ring "
    "pointer is not set up yet)",
    "keep-regions-on-early-close": "memory regions of a connection that ended before any ring "
    "started stay mapped and are carried into the next connection",
    "chain-overflow": "SIGSEGV when a chain has more descriptors than the queue size (a loop, a "
    "long indirect table, a wrapping packed chain): a fixed queue-size array overflows",
    "unchecked-indirect": "SIGSEGV on an indirect descriptor inside an indirect table, of length "
    "0 or not a multiple of 16, or with NEXT",
    "unchecked-desc-index": "SIGSEGV on a head, next index or packed buffer id at or beyond the "
    "queue size",
    "unchecked-gpa": "SIGSEGV on a buffer, indirect table or status byte outside guest memory",
    "trust-avail-ring": "SIGABRT when avail->idx is more than the queue size ahead or a head is "
    "made available while in flight",
    "write-readable-status": "the status byte goes to the chain's last descriptor whether or "
    "not it is device-writable",
    "crash-on-zero-length": "SIGSEGV on a zero-length buffer",
    "ignore-sigterm": "the first SIGTERM is ignored (the program ends on a second one)",
    "capabilities-not-json": "--print-capabilities prints a line of text, not JSON",
    "trust-config-range": "SIGSEGV on a GET_CONFIG/SET_CONFIG whose offset + size lies past the "
    "config space (copied from/to it unchecked)",
    "process-on-enable": "SET_VRING_ENABLE 1 on a stopped ring starts it: the ring is "
    "processed before SET_VRING_KICK",
    "rings-start-enabled": "rings are initialized enabled (a started ring is processed before "
    "any SET_VRING_ENABLE 1)",
    "kick-lost-while-disabled": "a kick that comes while the ring is disabled is dropped (not "
    "looked at on SET_VRING_ENABLE 1)",
    "disabled-ring-writes-disk": "a WRITE kicked on a started, disabled ring reaches the disk "
    "at once (guest memory untouched until SET_VRING_ENABLE 1)",
    "bit30-rings-disabled": "SET_FEATURES without bit 30 leaves the rings disabled",
    "wait-for-first-kick": "a ring started by SET_VRING_KICK is not looked at until the first "
    "kick",
    "used-idx-latched": "used->idx is read at SET_VRING_ADDR, not when the ring starts",
    "packed-wrap-stuck": "packed used descriptors are written with the wrap counter of the "
    "first lap (never flipped)",
    "event-idx-off-by-one": "with EVENT_IDX, notify when used->idx reaches used_event (one "
    "entry early), not when it passes it",
    "indirect-ioerr": "requests described by an indirect table complete with IOERR",
    "no-interrupt-ignored": "without EVENT_IDX, avail->flags NO_INTERRUPT is ignored (every "
    "batch notified)",
    "resize-not-announced": "a disk resize (SIGUSR1) is ignored: no BACKEND_CONFIG_CHANGE_MSG",
    "capacity-not-reread": "a disk resize sends BACKEND_CONFIG_CHANGE_MSG but GET_CONFIG keeps "
    "the old capacity",
    "stop-drops-unflushed-writes": "GET_VRING_BASE undoes on the disk the WRITEs completed "
    "since the last FLUSH (a volatile cache dropped at the stop)",
    "device-state-error-with-fd": "a refused SET_DEVICE_STATE_FD (bad direction or phase, or a "
    "ring still started) is answered with an error and an fd",
    "check-state-always-ok": "CHECK_DEVICE_STATE answers 0 (success) even when the loaded "
    "state could not be read",
    "advise-no-userfaultfd": "POSTCOPY_ADVISE is answered with an eventfd, not a userfaultfd",
    "backend-msg-fd-without-send-fd": "BACKEND_CONFIG_CHANGE_MSG carries an fd though "
    "BACKEND_SEND_FD was not negotiated",
    "postcopy-touches-memory": "right after the postcopy SET_MEM_TABLE ack, read the last "
    "byte of every region (a userfault the front-end must serve)",
    "postcopy-no-register": "after POSTCOPY_LISTEN the regions are never registered with the "
    "userfaultfd",
    "postcopy-no-table-reply": "SET_MEM_TABLE after POSTCOPY_LISTEN gets no reply with the bases",
    "postcopy-end-keeps-userfaultfd": "POSTCOPY_END is answered 0 but the userfaultfd stays open "
    "and the regions registered",
    "stopped-ring-enable-ignored": "SET_VRING_ENABLE on a stopped ring is ignored (its enable "
    "state is not tracked for the next start)",
    "call-swap-ignored": "SET_VRING_CALL on a started ring is acked but the old call fd keeps "
    "being signalled (the new one closed)",
    "queue-size-128": "SET_VRING_NUM is taken as 128 whatever it says",
    "used-len-not-set": "split used elements get their id but not their len (the slot's old "
    "len stays)",
    "write-len-4096": "the used len of a WRITE is 4096 (its device-writable part is the status "
    "byte)",
    "no-mq-feature": "protocol feature MQ (bit 0) not offered",
    "status-zero-ignored": "SET_STATUS 0 (the reset QEMU's stop sends) leaves the status as it "
    "was",
    "indirect-after-direct-ioerr": "a split chain of direct descriptors followed by an indirect "
    "one completes with IOERR",
    "indirect-write-flag-honoured": "an indirect descriptor with the WRITE flag set is refused "
    "(IOERR): the flag is not ignored",
    "reset-owner-drops-disk": "RESET_OWNER keeps the rings running but lets go of the disk: "
    "every later request completes with IOERR",
    "event-idx-honours-no-interrupt": "with EVENT_IDX, avail->flags NO_INTERRUPT (bit 0) still "
    "suppresses notifications",
    "wce-kept-without-flush": "SET_FEATURES with CONFIG_WCE and without FLUSH leaves writeback "
    "at 1 (writeback mode)",
    "fixed-descriptor-layout": "a split request whose header is not one 16-byte descriptor, or "
    "whose status byte shares a descriptor, completes with IOERR",
    # mut-basic: packed ring order and flags (VIRTIO 1.3 2.8.12, 2.8.15)
    "packed-out-of-ring-order": "a packed entry that is not available does not stop the "
    "device: the chain after it (found by the NEXT flags) is taken when it is available",
    "packed-used-submission-order": "packed used descriptors are written in the order the "
    "requests were taken, not in the order they completed (a fast one waits for a slow one)",
    "packed-avail-ignores-wrap": "a packed entry is taken when its AVAIL and USED bits "
    "differ, whatever the driver wrap counter (an AVAIL bit left unchanged is used)",
    "packed-used-len-late": "a packed used descriptor is written with len 0 and its USED bit; "
    "the len follows when the next batch completes",
    # issue 10: the qemu tier's stop/cont and reset (VU-QEMU-4/5)
    "restart-kick-ignored": "a ring stopped by GET_VRING_BASE is not started again by a later "
    "SET_VRING_KICK on the same connection (the kick fd is kept, the ring stays stopped)",
    "writeback-without-flush": "with FLUSH not negotiated (nor CONFIG_WCE) WRITEs still complete "
    "from the page cache, never made durable (no fdatasync)",
    "head-modulo": "a split avail entry naming a head at or beyond the queue size is taken "
    "modulo the queue size (the chain of another descriptor is served)",
}


def parse_misbehave(text: str) -> frozenset[str]:
    """Parse ``NAME[,NAME]`` of :data:`MISBEHAVIOURS`."""
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(names - MISBEHAVIOURS.keys())
    if unknown:
        raise ValueError(
            f"unknown misbehaviour {', '.join(unknown)} (one of {', '.join(MISBEHAVIOURS)})"
        )
    return names


@dataclass(slots=True)
class Faults:
    """The fault plan of one back-end process."""

    crash_point: str | None = None
    crash_after: int = 1
    fail_rate: float = 0.0
    seed: int = 0
    misbehave: frozenset[str] = frozenset()
    reached: int = 0
    #: set by the SIGTERM/SIGINT handler: ends a :meth:`hang`
    stopping: bool = False
    #: fds and mappings the leak knobs keep for the process's life
    leaked: list[object] = field(default_factory=list)
    #: keep-regions-on-early-close: the memory an early-closed connection left mapped
    carried: object | None = None
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def reach(self, point: str, times: int = 1) -> None:
        """Record that ``times`` requests reached ``point``; die on the planned one.

        The crash is SIGKILL to ourselves: no cleanup, no flush, like a real crash.
        """
        if point != self.crash_point or times <= 0:
            return
        self.reached += times
        if self.reached >= self.crash_after:
            sys.stderr.write(f"vhost-conformance-backend: crash at {point} #{self.crash_after}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
            os._exit(137)  # not reached

    def crash(self, why: str) -> None:
        """Die now as a crash does (SIGKILL to ourselves), saying why on stderr."""
        sys.stderr.write(f"vhost-conformance-backend: misbehaving: crash: {why}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        os._exit(137)  # not reached

    def die(self, name: str, what: str, sig: int = signal.SIGSEGV) -> None:
        """Misbehaviour ``name`` (switched on) kills the process with ``sig`` over ``what``:
        what a C back-end does when it trusts that input (no core file)."""
        sys.stderr.write(f"vhost-conformance-backend: misbehaving ({name}): {what}: dying\n")
        sys.stderr.flush()
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # not reached

    def hang(self, name: str, what: str) -> None:
        """Misbehaviour ``name`` stops the process serving anyone (it waits for ``what``
        forever) until SIGTERM/SIGINT, then exits 0."""
        sys.stderr.write(f"vhost-conformance-backend: misbehaving ({name}): {what}: waiting\n")
        sys.stderr.flush()
        while not self.stopping:
            time.sleep(0.05)
        raise SystemExit(0)

    def on(self, name: str) -> bool:
        """Whether misbehaviour ``name`` is switched on."""
        assert name in MISBEHAVIOURS, name
        return name in self.misbehave

    def should_fail(self) -> bool:
        """Draw whether the next request fails with IOERR."""
        return self.fail_rate > 0 and self._rng.random() < self.fail_rate
