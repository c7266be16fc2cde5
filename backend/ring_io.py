"""Rings and I/O of one connection: building and starting rings (with in-flight recovery),
stopping them (GET_VRING_BASE's reply), popping requests, executing them on the disk and
completing them (used ring, in-flight region, notification), and the event-loop turn.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import signal
import struct

from vhost_conformance.backend import blk
from vhost_conformance.backend.core import POLL_INTERVAL, DeviceCore, _close, _signal, log
from vhost_conformance.backend.inflight import (
    Buffer,
    InflightError,
    PackedDescCopy,
    PackedInflight,
    SplitInflight,
)
from vhost_conformance.backend.memory import GuestMemoryError, full_barrier
from vhost_conformance.backend.queue import Request, RingEvent, RingPhase, VirtQueue
from vhost_conformance.backend.vring import Chain, PackedRing, RingError, SplitRing
from vhost_conformance.frontend.protocol import (
    VERSION,
    VRING_F_LOG,
    BackendRequest,
    FrontendRequest,
    Header,
    VirtioFeature,
    VringState,
    packed_base,
)


class RingIo(DeviceCore):
    """Rings and I/O (see the module docstring)."""

    def _base_of(self, q: VirtQueue) -> int:
        if self.faults.on("base-of-ring-0") and q.index != 0:
            return self._base_of(self.queues[0])
        if self.faults.on("base-is-used-idx"):
            if self.packed:
                return packed_base(q.used_idx, q.used_wrap, q.used_idx, q.used_wrap)
            return q.used_idx & 0xFFFF
        if self.packed:
            if self.faults.on("packed-base-used-half-avail"):
                return packed_base(q.last_avail_idx, q.avail_wrap, q.last_avail_idx, q.avail_wrap)
            return packed_base(q.last_avail_idx, q.avail_wrap, q.used_idx, q.used_wrap)
        return q.last_avail_idx & 0xFFFF

    def _stop_reply_id(self, q: VirtQueue) -> int:
        """The request id the stop's reply carries (misbehaviour: GET_VRING_BASE's for 45)."""
        if (q.stop_request == FrontendRequest.GET_VRING_BASE_SKIP_DRAIN
                and self.faults.on("skip-drain-reply-id")):
            return FrontendRequest.GET_VRING_BASE
        return q.stop_request

    def _stop(self, q: VirtQueue) -> None:
        log.info("vring %d stopped at avail index %#x", q.index, self._base_of(q))
        q.apply(RingEvent.STOP)
        q.stops += 1
        q.polled = False
        q.resubmit.clear()
        self._all_stopped = self.suspended
        if self.faults.on("stop-drops-unflushed-writes"):
            self._drop_unflushed()
        if self.faults.on("log-after-stop") and self.dirty_log is not None:
            self._late_logs.append(self.clock() + 0.2)
        q.serve_stopped = self.faults.on("serve-stopped-ring")
        if q.kick_fd >= 0 and not q.serve_stopped:
            if self.watcher is not None:
                self.watcher.unwatch(q.kick_fd)
            _close(q.kick_fd)
            q.kick_fd = -1
        base = self._base_of(q)
        if not self.packed and self.faults.on("base-reserved-bits"):
            base |= 0xA5A50000
        self._reply(self._stop_reply_id(q), VringState(q.index, base).encode())
        if self.faults.on("call-after-stop") and q.call_fd >= 0:
            # late enough that the front-end has drained the call fd after the reply
            # (a copy: the front-end may replace the call fd meanwhile, as QEMU does)
            self._late_calls.append((self.clock() + 0.2, os.dup(q.call_fd)))

    def _build_ring(self, q: VirtQueue) -> None:
        """(Re)translate the ring's addresses; a failure marks the queue broken."""
        try:
            if not q.addr_set or q.num == 0:
                raise RingError(f"vring {q.index} started without SET_VRING_NUM/SET_VRING_ADDR")
            indirect = self._has_feature(VirtioFeature.RING_INDIRECT_DESC)
            event_idx = self._has_feature(VirtioFeature.RING_EVENT_IDX)
            layout = PackedRing if self.packed else SplitRing
            q.ring = layout(self.memory, q.num, q.desc_uva, q.avail_uva, q.used_uva,
                            indirect=indirect, event_idx=event_idx, faults=self.faults)
        except RingError as exc:
            q.ring = None
            self._break(q, str(exc))

    def _start(self, q: VirtQueue) -> None:
        """SET_VRING_KICK starts the ring (vhost-user.rst "Ring states"): read used->idx,
        run the in-flight recovery ("When reconnecting") and queue the resubmissions."""
        q.apply(RingEvent.START)
        q.serve_stopped = False
        self._all_stopped = False
        self.ever_started = True
        q.pending.clear()
        q.done.clear()
        q.resubmit.clear()
        q.kicked = True
        q.deaf = self.faults.on("wait-for-first-kick")
        self._build_ring(q)
        if q.ring is None:
            return
        try:
            self._bind_inflight(q)
            # A region an earlier session set up (reconnect after a crash, migration
            # destination, restart after a stop) may hide completions the earlier back-end
            # published but never notified (death between used->idx and the call): notify
            # once, or the guest waits forever. Spurious notifications are harmless; libvhost-user
            # does the same on SET_VRING_CALL ("in case of I/O hang after reconnecting").
            earlier = q.inflight is not None and q.inflight.version != 0
            if isinstance(q.ring, SplitRing):
                q.used_idx = q.ring.used_idx()
                if self.faults.on("used-idx-latched") and q.latched_used is not None:
                    q.used_idx = q.latched_used
                if isinstance(q.inflight, SplitInflight):
                    self._recover_split(q, q.ring, q.inflight)
            elif isinstance(q.ring, PackedRing) and isinstance(q.inflight, PackedInflight):
                self._recover_packed(q, q.ring, q.inflight)
            if earlier and not q.phase.broken:
                _signal(q.call_fd)
        except (InflightError, RingError, GuestMemoryError) as exc:
            self._break(q, f"in-flight recovery: {exc}")

    def _misbehave_desc_num(self, buf: Buffer, offset: int, desc_num: int) -> None:
        """``region-desc-num-wrong``: the fresh region's header says one entry fewer (both
        layouts keep desc_num as u16 at byte 10 of the queue's region)."""
        if self.faults.on("region-desc-num-wrong"):
            struct.pack_into("<H", buf, offset + 10, (desc_num - 1) & 0xFFFF)

    def _recover_split(self, q: VirtQueue, ring: SplitRing, region: SplitInflight) -> None:
        fresh = region.version == 0
        heads, q.counter = region.recover(
            q.used_idx, fix_last_batch=not self.faults.on("skip-last-batch-fixup"))
        if fresh:
            if self.faults.on("inflight-no-version"):
                region.forget_version()
            self._misbehave_desc_num(region.buf, region.offset, region.desc_num)
            return
        if self.faults.on("ignore-inflight"):
            log.warning("vring %d: misbehaving: ignoring in-flight heads %s", q.index, heads)
            return
        if self.faults.on("resubmit-head-order"):
            heads = sorted(heads)
        # libvhost-user vu_check_queue_inflights: last_avail_idx = used->idx + in flight;
        # this is what makes a reconnect (SET_VRING_BASE = used idx) not pop twice.
        expected = (q.used_idx + len(heads)) & 0xFFFF
        if expected != q.last_avail_idx:
            log.info(
                "vring %d: last_avail_idx %d from the region (used->idx %d + %d in flight), "
                "SET_VRING_BASE said %d",
                q.index,
                expected,
                q.used_idx,
                len(heads),
                q.last_avail_idx,
            )
        if not self.faults.on("skip-used-idx-fixup"):
            q.last_avail_idx = expected
        for head in heads:
            chain = ring.read_chain(head)
            if chain.fatal:
                self._break(q, f"resubmitted head {head}: {chain.fatal}")
                return
            q.resubmit.append(self._new_request(q, chain, head))
        if heads:
            log.info("vring %d: resubmitting heads %s (counter order)", q.index, heads)

    def _recover_packed(self, q: VirtQueue, ring: PackedRing, region: PackedInflight) -> None:
        if region.version == 0:
            region.initialize(q.used_idx, q.used_wrap)
            if self.faults.on("inflight-no-version"):
                region.forget_version()
            self._misbehave_desc_num(region.buf, region.offset, region.desc_num)
            q.counter = 1
            return
        chains, q.counter, q.used_idx, q.used_wrap = region.recover(ring.flags_at)
        if self.faults.on("ignore-inflight"):
            chains = []
        total = sum(len(c.descs) for c in chains)
        idx, wrap = q.used_idx + total, q.used_wrap
        while idx >= q.num:
            idx -= q.num
            wrap = not wrap
        q.last_avail_idx, q.avail_wrap = idx, wrap
        for c in chains:
            chain = Chain(c.entry, ndescs=len(c.descs))
            ring.chain_from_descs(chain, [(d.addr, d.len, d.id, d.flags) for d in c.descs])
            if chain.fatal:
                self._break(q, f"resubmitted entry {c.entry}: {chain.fatal}")
                return
            q.resubmit.append(self._new_request(q, chain, c.entry))
        if chains:
            log.info("vring %d: resubmitting %d packed chain(s)", q.index, len(chains))

    def kick(self, index: int) -> None:
        """The driver kicked queue ``index`` (the server read its eventfd)."""
        if 0 <= index < len(self.queues):
            q = self.queues[index]
            q.deaf = False
            if self.faults.on("disabled-ring-writes-disk") and q.started and not q.enabled:
                self._prewrite(q)
            q.kicked = True

    def _prewrite(self, q: VirtQueue) -> None:
        """--misbehave disabled-ring-writes-disk: the WRITEs made available on a started,
        disabled ring go to the disk now (the ring itself is not touched)."""
        ring = q.ring
        if not isinstance(ring, SplitRing):
            return
        idx = q.last_avail_idx
        while idx != ring.avail_idx():
            chain = ring.read_chain(ring.avail_head(idx))
            idx = (idx + 1) & 0xFFFF
            if chain.fatal or chain.error:
                continue
            payload = blk.write_payload(self.memory, chain.readable)
            if payload is not None:
                self.disk.write_from(payload[0], [memoryview(payload[1])])

    def _new_request(self, q: VirtQueue, chain: Chain, head: int) -> Request:
        self._seq += 1
        return Request(q, self._seq, chain, head)

    def _submit(self, req: Request, now: float) -> None:
        q = req.queue
        q.pending[req.seq] = req
        # the latency is the disk's: GET_ID does not touch the disk and completes at once
        # (as in qemu-storage-daemon, whose GET_ID never reaches the block layer), which
        # lets a case complete requests out of order (a GET_ID after a slow write)
        if (
            self.options.latency <= 0
            or req.chain.error is not None
            or blk.request_type(self.memory, req.chain.readable) == blk.T_GET_ID
        ):
            self._execute(req)
        else:
            req.deadline = now + self.options.latency
            heapq.heappush(self._timers, req)

    def _pop_split(self, q: VirtQueue, ring: SplitRing, now: float) -> None:
        while self._pop_split_once(q, ring, now):
            pass

    def _pop_split_once(self, q: VirtQueue, ring: SplitRing, now: float) -> bool:
        """Take what is available; True when more arrived meanwhile (EVENT_IDX re-check)."""
        avail = ring.avail_idx()
        count = (avail - q.last_avail_idx) & 0xFFFF
        if count > q.num:
            if self.faults.on("trust-avail-ring"):
                self.faults.die("trust-avail-ring", f"{count} heads available", signal.SIGABRT)
            self._break(
                q,
                f"avail->idx {avail} is {count} ahead of last_avail_idx "
                f"{q.last_avail_idx}, more than the queue size {q.num}",
            )
            return False
        inflight_heads = {r.head for r in q.pending.values()}
        for _ in range(count):
            head = ring.avail_head(q.last_avail_idx)
            chain = ring.read_chain(head)
            if chain.fatal:
                self._break(q, f"head {head} at avail slot {q.last_avail_idx}: {chain.fatal}")
                return False
            if chain.indirect and chain.error is None and (
                self.faults.on("indirect-ioerr")
                or (chain.mixed and self.faults.on("indirect-after-direct-ioerr"))
                or (chain.indirect_flags & 2 and self.faults.on("indirect-write-flag-honoured"))
            ):
                chain.error = "an indirect table (misbehaving: refused)"
            if chain.error is None and self.faults.on("fixed-descriptor-layout") and (
                not chain.readable or chain.readable[0][1] != blk.OUTHDR_SIZE
                or not chain.writable or chain.writable[-1][1] != 1
            ):
                chain.error = "not one descriptor per header and status (misbehaving)"
            if head in inflight_heads:
                if self.faults.on("trust-avail-ring"):
                    self.faults.die(
                        "trust-avail-ring", f"head {head} available twice", signal.SIGABRT
                    )
                self._break(q, f"head {head} made available again while still in flight")
                return False
            q.last_avail_idx = (q.last_avail_idx + 1) & 0xFFFF
            inflight_heads.add(head)
            if isinstance(q.inflight, SplitInflight):
                q.inflight.mark_popped(head, q.counter)
            q.counter += 1
            self.faults.reach("after-pop")
            self._submit(self._new_request(q, chain, head), now)
        if ring.event_idx:
            off = ring.set_avail_event(q.last_avail_idx)
            self._log_used(q, off, 2)
            # VIRTIO 1.2 2.7.10: the driver decides whether to kick from avail_event; a
            # buffer it added before seeing ours would not be kicked: look again.
            full_barrier()
            return ring.avail_idx() != q.last_avail_idx
        return False

    def _pop_packed(self, q: VirtQueue, ring: PackedRing, now: float) -> None:
        outstanding = sum(r.chain.ndescs for r in q.pending.values())
        while ring.is_available(q.last_avail_idx, q.avail_wrap):
            chain = ring.read_chain(q.last_avail_idx, q.avail_wrap)
            if chain.fatal:
                self._break(q, f"entry {q.last_avail_idx}: {chain.fatal}")
                return
            if outstanding + chain.ndescs > q.num:
                self._break(q, "more descriptors in flight than the queue size")
                return
            outstanding += chain.ndescs
            entry = (q.index, q.last_avail_idx, q.avail_wrap)
            idx = q.last_avail_idx + chain.ndescs
            if idx >= q.num:
                idx -= q.num
                q.avail_wrap = not q.avail_wrap
            q.last_avail_idx = idx
            if entry in self._ahead:  # packed-out-of-ring-order took it already
                self._ahead.discard(entry)
                continue
            head = -1
            if isinstance(q.inflight, PackedInflight):
                copies = [PackedDescCopy(a, ln, i, f) for a, ln, i, f in chain.ring_descs]
                try:
                    head = q.inflight.record_chain(copies, q.counter)
                except InflightError as exc:
                    self._break(q, str(exc))
                    return
            q.counter += 1
            self.faults.reach("after-pop")
            self._submit(self._new_request(q, chain, head), now)
        if self.faults.on("packed-out-of-ring-order") and not q.phase.broken:
            self._pop_ahead(q, ring, now)

    def _pop_ahead(self, q: VirtQueue, ring: PackedRing, now: float) -> None:
        """``packed-out-of-ring-order``: the entry at last_avail_idx is not available; walk
        its chain by the NEXT flags as memory holds them and take the chain after it when that
        one is available (once; it is skipped when the ring order reaches it)."""
        i, w = q.last_avail_idx, q.avail_wrap
        for _ in range(q.num):
            more = ring.flags_at(i) & 1  # VIRTQ_DESC_F_NEXT
            i += 1
            if i == q.num:
                i, w = 0, not w
            if not more:
                break
        if (q.index, i, w) in self._ahead or not ring.is_available(i, w):
            return
        chain = ring.read_chain(i, w)
        if chain.fatal:
            return
        log.warning("misbehaving: entry %d taken before entry %d", i, q.last_avail_idx)
        self._ahead.add((q.index, i, w))
        self._submit(self._new_request(q, chain, -1), now)

    def _in_submission_order(self, q: VirtQueue, batch: list[Request]) -> list[Request]:
        """``packed-used-submission-order``: of the executed requests, those taken before
        every request still executing, in the order they were taken; the others wait."""
        first_open = min((r.seq for r in q.pending.values() if not r.executed), default=None)
        ready = [r for r in batch if first_open is None or r.seq < first_open]
        q.done = [r for r in batch if not (first_open is None or r.seq < first_open)]
        return sorted(ready, key=lambda r: r.seq)

    def _misbehave_before(self, req: Request) -> bool:
        """``write-segments-lost`` (the chain loses data descriptors) and
        ``write-zeroes-unmap-noop`` (completed OK without touching the disk): True when the
        request is done."""
        if not self.faults.misbehave & {"write-segments-lost", "write-zeroes-unmap-noop"}:
            return False
        chain = req.chain
        rtype = blk.request_type(self.memory, chain.readable)
        if (self.faults.on("write-segments-lost") and rtype == blk.T_OUT
                and len(chain.readable) > 2 and chain.readable[0][1] == blk.OUTHDR_SIZE):
            # the header (one 16-byte descriptor) and the first data descriptor only
            chain.readable = chain.readable[:2]
        if (self.faults.on("write-zeroes-unmap-noop") and rtype == blk.T_WRITE_ZEROES
                and chain.status_gpa is not None):
            segment = blk.segment_flags(self.memory, chain.readable)
            if segment is not None and segment & blk.WRITE_ZEROES_F_UNMAP:
                blk.write_status(self.memory, chain.status_gpa, blk.S_OK)
                self.mark_dirty(chain.status_gpa, 1)
                req.status, req.written = blk.S_OK, 1
                return True
        return False

    def _execute(self, req: Request) -> None:
        """Run a request against the disk and guest memory (the status byte included)."""
        q = req.queue
        chain = req.chain
        req.executed = True
        if self.faults.on("stop-drops-unflushed-writes") and chain.error is None:
            self._remember_unflushed(chain)
        try:
            if chain.error is None and self._misbehave_before(req):
                pass
            elif chain.error is not None:
                log.error("vring %d head %d: %s: IOERR", q.index, chain.head, chain.error)
                status_gpa = chain.status_gpa
                assert status_gpa is not None
                blk.write_status(self.memory, status_gpa, blk.S_IOERR)
                self.mark_dirty(status_gpa, 1)
                req.status, req.written = blk.S_IOERR, 1
            elif self._held_back_write(req):
                pass
            else:
                outcome = blk.execute(
                    self.disk,
                    self.memory,
                    chain.readable,
                    chain.writable,
                    self.mark_dirty,
                    device_id=self.options.device_id,
                    writethrough=self._writethrough(),
                    fail=self.faults.should_fail(),
                )
                if outcome.status != blk.S_OK:
                    log.info(
                        "vring %d head %d: status %d: %s",
                        q.index,
                        chain.head,
                        outcome.status,
                        outcome.note,
                    )
                req.status, req.written = outcome.status, outcome.written
                self._misbehave_status(req, outcome)
                self._misbehave_data(req, outcome)
        except GuestMemoryError as exc:
            # The status byte went away (REM_MEM_REG under a queued request).
            self._break(q, f"head {chain.head}: {exc}")
            return
        self.faults.reach("after-data")
        q.done.append(req)

    def _held_back_write(self, req: Request) -> bool:
        """``flush-before-writes``: a WRITE completes OK at once while its data reaches the
        disk only 0.5 s later (a write-back cache no FLUSH waits for). Whether it did so."""
        if not self.faults.on("flush-before-writes"):
            return False
        chain = req.chain
        payload = blk.write_payload(self.memory, chain.readable)
        if payload is None or chain.status_gpa is None:
            return False
        self._late_writes.append((self.clock() + 0.5, *payload))
        blk.write_status(self.memory, chain.status_gpa, blk.S_OK)
        self.mark_dirty(chain.status_gpa, 1)
        req.status, req.written = blk.S_OK, 1
        return True

    def _remember_unflushed(self, chain: Chain) -> None:
        """``stop-drops-unflushed-writes``: keep what a WRITE overwrites (a FLUSH forgets it)."""
        rtype = blk.request_type(self.memory, chain.readable)
        if rtype == blk.T_FLUSH:
            self._unflushed.clear()
            return
        payload = blk.write_payload(self.memory, chain.readable)
        if payload is None:
            return
        offset, data = payload
        old = os.pread(self.disk.fd, len(data), offset) if offset >= 0 else b""
        self._unflushed.append((offset, old))

    def _drop_unflushed(self) -> None:
        """``stop-drops-unflushed-writes``: undo, newest first, the WRITEs since the last FLUSH."""
        while self._unflushed:
            offset, old = self._unflushed.pop()
            if old:
                self.disk.write_from(offset, [memoryview(old)])
        log.warning("misbehaving: unflushed writes dropped at the stop")

    def _misbehave_status(self, req: Request, outcome: blk.Outcome) -> None:
        """``unknown-type-ok`` and ``capacity-ignored``: report OK where the request failed."""
        rtype = blk.request_type(self.memory, req.chain.readable)
        known = rtype in blk.KNOWN_TYPES
        lie = (self.faults.on("unknown-type-ok") and outcome.status == blk.S_UNSUPP
               and not known) or (
            self.faults.on("capacity-ignored") and outcome.status == blk.S_IOERR
            and rtype in (blk.T_IN, blk.T_OUT) and "capacity" in outcome.note) or (
            self.faults.on("discard-limit-ignored") and outcome.status == blk.S_IOERR
            and rtype == blk.T_DISCARD and "max" in outcome.note) or (
            self.faults.on("segment-flags-ignored") and outcome.status == blk.S_UNSUPP
            and rtype in (blk.T_DISCARD, blk.T_WRITE_ZEROES)) or (
            self.faults.on("read-only-writes") and outcome.status == blk.S_IOERR
            and rtype == blk.T_OUT and "read-only" in outcome.note)
        if lie and req.chain.status_gpa is not None:
            blk.write_status(self.memory, req.chain.status_gpa, blk.S_OK)
            req.status = blk.S_OK
        fail = (self.faults.on("flush-ioerr") and rtype == blk.T_FLUSH) or (
            self.faults.on("get-id-ioerr") and rtype == blk.T_GET_ID) or self._disk_dropped
        if fail and req.chain.status_gpa is not None:
            blk.write_status(self.memory, req.chain.status_gpa, blk.S_IOERR)
            req.status, req.written = blk.S_IOERR, 1

    def _misbehave_data(self, req: Request, outcome: blk.Outcome) -> None:
        """``packed-read-no-data``: a read on a packed ring leaves zeros where the disk's
        bytes belong (the status byte, the last writable byte, keeps its OK)."""
        if not (self.packed and self.faults.on("packed-read-no-data")):
            return
        if outcome.status != blk.S_OK:
            return
        if blk.request_type(self.memory, req.chain.readable) != blk.T_IN:
            return
        left = sum(n for _g, n in req.chain.writable) - 1
        for gpa, n in req.chain.writable:
            k = min(n, left)
            if k <= 0:
                break
            for mm, off, seg in self.memory.gpa_segments(gpa, k):
                mm[off : off + seg] = bytes(seg)
            left -= k

    def _log_used(self, q: VirtQueue, offset: int, length: int) -> None:
        """Log a write to the used ring (vhost-user.rst "Migration": with
        VHOST_VRING_F_LOG, at log_guest_addr + offset)."""
        if not self.logging or self.faults.on("no-log-used"):
            return
        if q.addr_flags & VRING_F_LOG:
            self.mark_dirty(q.log_guest_addr + offset, length)

    def _complete_split(self, q: VirtQueue, ring: SplitRing, batch: list[Request]) -> None:
        heads = [r.head for r in batch]
        region = q.inflight if isinstance(q.inflight, SplitInflight) else None
        if region is not None:
            region.link_batch(heads)
        old = q.used_idx
        for r in batch:
            off = ring.write_used(q.used_idx, r.head, self._used_len(ring, q.used_idx, r))
            self._log_used(q, off, 8)
            q.used_idx = (q.used_idx + 1) & 0xFFFF
            self.faults.reach("after-used-elem")
        ring.set_used_idx(q.used_idx)
        self._log_used(q, 2, 2)
        if self.faults.on("used-flags-garbage"):
            ring.set_used_flags(0x2)
            self._log_used(q, 0, 2)
        self.faults.reach("after-used-idx", len(batch))
        if region is not None:
            region.clear_batch([] if self.faults.on("inflight-keep-marks") else heads, q.used_idx)
        self.faults.reach("after-region-update", len(batch))
        if self._misbehave_notify(ring, old, q.used_idx):
            _signal(q.call_fd)

    def _complete_packed(self, q: VirtQueue, ring: PackedRing, batch: list[Request]) -> None:
        region = q.inflight if isinstance(q.inflight, PackedInflight) else None
        entries = [r.head for r in batch]
        if region is not None:
            region.link_batch(entries)
        old = q.used_idx
        first = (q.used_idx, q.used_wrap)
        stuck = self.faults.on("packed-wrap-stuck")
        if stuck:
            first = (q.used_idx, True)
        late = self.faults.on("packed-used-len-late")
        if late:
            # the previous batch's lens, written after its USED bits
            for entry, length in self._late_lens.pop(q.index, []):
                ring.write_used_len(entry, length)
        for k, r in enumerate(batch):
            if late:
                self._late_lens.setdefault(q.index, []).append((q.used_idx, r.written))
            off = ring.write_used(
                q.used_idx, r.chain.buffer_id, 0 if late else r.written, q.used_wrap or stuck,
                flags_too=k > 0,
            )
            self._log_ring(ring, off)
            idx = q.used_idx + r.chain.ndescs
            if idx >= q.num:
                idx -= q.num
                q.used_wrap = not q.used_wrap
            q.used_idx = idx
            self.faults.reach("after-used-elem")
        if region is not None:
            region.set_used(q.used_idx, q.used_wrap)
        # The first entry's flags last: the whole batch becomes visible at once.
        ring.write_used_flags(*first)
        self.faults.reach("after-used-idx", len(batch))
        if region is not None:
            region.clear_batch([] if self.faults.on("inflight-keep-marks") else entries)
        self.faults.reach("after-region-update", len(batch))
        if ring.should_notify(old, q.used_idx, q.used_wrap):
            _signal(q.call_fd)

    def _used_len(self, ring: SplitRing, used_idx: int, r: Request) -> int:
        """The len of a split used element: bytes written, or what ``used-len-not-set`` and
        ``write-len-4096`` put there instead."""
        if self.faults.on("used-len-not-set"):
            return ring.used_len(used_idx)
        if self.faults.on("write-len-4096") and blk.request_type(
            self.memory, r.chain.readable
        ) == blk.T_OUT:
            return 4096
        return r.written

    def _misbehave_notify(self, ring: SplitRing, old: int, new: int) -> bool:
        """Whether to signal the call fd after used entries [old, new): the ring's rule, bent
        by ``event-idx-off-by-one`` and ``no-interrupt-ignored``."""
        if (ring.event_idx and self.faults.on("event-idx-honours-no-interrupt")
                and ring.avail_flags() & 1):
            return False
        if ring.event_idx and self.faults.on("event-idx-off-by-one"):
            event = ring.used_event()
            return (new - event) & 0xFFFF <= (new - old - 1) & 0xFFFF
        if not ring.event_idx and self.faults.on("no-interrupt-ignored"):
            return True
        return ring.should_notify(old, new)

    def _log_ring(self, ring: PackedRing, offset: int) -> None:
        if not self.logging or self.faults.on("no-log-used"):
            return
        with contextlib.suppress(GuestMemoryError):
            self.mark_dirty(self.memory.uva_to_gpa(ring.desc_uva + offset), 16)

    def flush(self) -> None:
        """Complete every executed request as one batch per queue; send the GET_VRING_BASE
        replies whose drain finished."""
        for q in self.queues:
            if q.done and q.ring is not None and not q.phase.broken:
                batch, q.done = q.done, []
                if isinstance(q.ring, SplitRing):
                    self._complete_split(q, q.ring, batch)
                else:
                    if self.faults.on("packed-used-submission-order"):
                        batch = self._in_submission_order(q, batch)
                    if batch:
                        self._complete_packed(q, q.ring, batch)
                for r in batch:
                    q.pending.pop(r.seq, None)
            early = self.faults.on("early-drain-reply") and len(q.pending) == 1
            if q.phase.draining and (not q.pending or early):
                self._stop(q)
            elif q.phase is RingPhase.BROKEN_DRAINING:
                # A broken ring never completes what it holds: answer anyway.
                self._cancel_pending(q)
                self._stop(q)

    def turn(self, now: float | None = None) -> None:
        """One event-loop turn: take new requests from kicked rings, execute the due
        ones, complete them."""
        if now is None:
            now = self.clock()
        for q in self.queues:
            if q.polled:
                q.kicked = True  # polling mode: look at the avail ring every turn
            serve = q.runnable or (q.serve_stopped and not q.phase.broken)
            if not serve or not q.kicked or q.ring is None:
                if q.started and not q.enabled and self.faults.on("kick-lost-while-disabled"):
                    q.kicked = False  # dropped, not kept for SET_VRING_ENABLE 1
                continue
            if q.deaf or (q.index > 0 and self.faults.on("second-queue-ignored")):
                continue
            q.kicked = False
            if self.faults.on("iotlb-msg-without-iommu") and not self._iotlb_sent:
                self._iotlb_sent = self._send_iotlb_miss(q)
            while q.resubmit:
                self._submit(q.resubmit.pop(0), now)
            if isinstance(q.ring, SplitRing):
                self._pop_split(q, q.ring, now)
            else:
                self._pop_packed(q, q.ring, now)
        for late in [c for c in self._late_calls if c[0] <= now]:
            self._late_calls.remove(late)
            _signal(late[1])
            _close(late[1])
        for when in [t for t in self._late_logs if t <= now]:
            self._late_logs.remove(when)
            if self.dirty_log is not None:
                log.warning("misbehaving: every dirty log bit set after the stop")
                self.dirty_log.mark_all()
        for due in [w for w in self._late_writes if w[0] <= now]:
            self._late_writes.remove(due)
            self.disk.write_from(due[1], [memoryview(due[2])])
        while self._timers and self._timers[0].deadline <= now:
            req = heapq.heappop(self._timers)
            if not req.cancelled and not req.queue.phase.broken:
                self._execute(req)
        self.flush()

    def next_deadline(self) -> float | None:
        """When the next held request (or late call of call-after-stop) is due (None: none)."""
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
        due = [self._timers[0].deadline] if self._timers else []
        due += [when for when, _ in self._late_calls]
        due += [w[0] for w in self._late_writes]
        if any(q.polled and q.runnable for q in self.queues):
            due.append(self.clock() + POLL_INTERVAL)
        due += self._late_logs
        return min(due) if due else None

    @property
    def has_work(self) -> bool:
        """A ring was kicked and may have requests to take (a polled ring waits for its
        next look: :meth:`next_deadline`)."""
        return any(q.kicked and (q.runnable or q.serve_stopped) and not q.polled
                   for q in self.queues)

    def _send_iotlb_miss(self, q: VirtQueue) -> bool:
        """--misbehave iotlb-msg-without-iommu: a BACKEND_IOTLB_MSG miss (type 1) for the
        ring's descriptor table, though VIRTIO_F_IOMMU_PLATFORM was not negotiated."""
        if self.backend_fd < 0:
            return False
        payload = struct.pack("<QQQBB6x", q.desc_uva, 4096, 0, 1, 1)  # iova, size, uaddr, RO, MISS
        data = Header(BackendRequest.IOTLB_MSG, VERSION, len(payload)).encode() + payload
        try:
            os.write(self.backend_fd, data)
        except OSError as exc:
            log.error("BACKEND_IOTLB_MSG not sent: %s", exc)
            return False
        return True
