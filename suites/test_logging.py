"""Dirty page logging: what the back-end writes while a migration runs is marked in the log.

Family: migration (VU-LOG-*). Clause: vhost-user.rst (QEMU 11.1.3) "Migration" (the log is a
bitmap of 4 KiB pages, bit ``p % 8`` of byte ``p / 8``; used-ring writes are logged at
``log_guest_addr`` when VHOST_VRING_F_LOG is set). Logging starts as QEMU 11.1.3 starts it in
a running session: SET_LOG_BASE, SET_FEATURES(+LOG_ALL), SET_VRING_ADDR(F_LOG)
(QEMU-TRACES.md correction 3).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest
from vhost_conformance.frontend.blk import SECTOR_SIZE, BlkRequest
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.memory import LOG_PAGE_SIZE, DirtyLog
from vhost_conformance.frontend.protocol import ProtocolFeature, VirtioFeature
from vhost_conformance.suites.clauses import MIGRATION_LOG_QUOTE, RST, quotes
from vhost_conformance.suites.drivers import (
    SessionFactory,
    expect_status,
    pattern,
    pending_io,
    slow_disk,
    split_ring,
    stop_now,
    wait_all,
    wait_popped,
)
from vhost_conformance.suites.model import MUST, SHOULD, CaseFailed, Unsupported, case
from vhost_conformance.suites.target import BackendTarget

#: Latency of the requests VU-LOG-2 holds in flight at the stop.
HELD_LATENCY_MS = 100


@pytest.fixture
def dirty_log(vhost_session: Session) -> Iterator[DirtyLog]:
    """A log for the session's memory, handed over the way QEMU 11.1.3 starts logging."""
    log = DirtyLog.for_memory(vhost_session.memory)
    try:
        vhost_session.set_log_base(log.fd, log.mmap_size)
        yield log
    finally:
        log.close()


def _pages(gpa: int, n: int) -> set[int]:
    return set(range(gpa // LOG_PAGE_SIZE, (gpa + n - 1) // LOG_PAGE_SIZE + 1))


def _written_pages(session: Session, requests: list[BlkRequest]) -> dict[int, str]:
    """Pages the device must have written: read buffers, status bytes, the used ring."""
    pages: dict[int, str] = {}
    for r in requests:
        for gpa, n in r.in_data_bufs:
            for page in _pages(gpa, n):
                pages.setdefault(page, f"read buffer of request {r.tag}")
        if r.status_gpa is not None:
            pages.setdefault(r.status_gpa // LOG_PAGE_SIZE, f"status byte of request {r.tag}")
    vq = session.queues[0].vq
    used_gpa = getattr(vq, "used_gpa", None)
    if isinstance(used_gpa, int):
        # used->idx and the first used elements written (split used ring)
        for page in _pages(used_gpa, 4 + 8 * len(requests)):
            pages.setdefault(page, "used ring")
    return pages


@case(
    "VU-LOG-1", title="Dirty log of used-ring writes", family="migration", level=SHOULD,
    clause=f"{RST} Migration",
    quote=quotes(
        "All the modifications to memory pointed by vring “descriptor” should be marked.",
        "Modifications to “used” vring should be marked if VHOST_VRING_F_LOG is part of "
        "ring’s flags.",
        MIGRATION_LOG_QUOTE,
    ),
    requirement="With LOG_ALL and a shared log, every used-ring write and data-buffer write sets "
        "its 4 KiB page's bit.",
    requires=[ProtocolFeature.LOG_SHMFD, VirtioFeature.LOG_ALL],
)
def test_every_device_write_is_logged(vhost_session: Session, dirty_log: DirtyLog) -> None:
    """With LOG_ALL and a shared log, every used-ring and data-buffer write is marked."""
    session = vhost_session
    blk = session.queues[0].blk
    requests = [blk.write(64, pattern(70, 8 * SECTOR_SIZE))]
    requests += [blk.read(64, 8), blk.read(2048, 16, segments=3)]
    session.submit(0)
    expect_status(wait_all(session, requests), what="request while logging")
    time.sleep(0.02)
    dirty = dirty_log.dirty_pages()
    missing = {p: why for p, why in _written_pages(session, requests).items() if p not in dirty}
    if missing:
        page, why = sorted(missing.items())[0]
        raise CaseFailed(
            f"dirty log bit of page {page} (GPA {page * LOG_PAGE_SIZE:#x}, {why}) at byte "
            f"{page // 8} bit {page % 8}", expected="set", seen=f"clear ({len(missing)} "
            f"page(s) missing; {len(dirty)} marked)")
    _used_ring_logged_at_log_guest_addr(session)


def _used_ring_logged_at_log_guest_addr(session: Session) -> None:
    """The used ring shares its page with the requests' status bytes, so the check above
    cannot tell a logged used ring from an unlogged one. vhost-user.rst "Migration": "when
    logging modifications to the used ring (when VHOST_VRING_F_LOG is set for this ring),
    log_guest_addr should be used to calculate the log offset: the write to first byte of
    the used ring is logged at this offset from log start" (and it "might be outside the
    legal guest physical address range"). A second log, at mmap_offset 4096 in its file,
    with log_guest_addr on a page nothing else writes: that page must be marked."""
    spare = session.memory.alloc(LOG_PAGE_SIZE, LOG_PAGE_SIZE)
    log = DirtyLog.for_memory(session.memory, mmap_offset=LOG_PAGE_SIZE)
    try:
        session.set_log_base(log.fd, log.mmap_size, mmap_offset=log.mmap_offset,
                             log_guest_addrs=[spare] * session.num_queues)
        blk = session.queues[0].blk
        requests = [blk.read(128, 8)]
        session.submit(0)
        expect_status(wait_all(session, requests), what="read while logging")
        time.sleep(0.02)
        dirty = log.dirty_pages()
        page = spare // LOG_PAGE_SIZE
        if page not in dirty:
            raise CaseFailed(
                f"dirty log (mmap_offset {log.mmap_offset}) bit of page {page}: log_guest_addr "
                f"{spare:#x} of the used ring (used ring at GPA "
                f"{split_ring(session).used_gpa:#x})",
                expected="set (used->idx and a used element written)",
                seen=f"clear ({len(dirty)} page(s) marked)")
        data = _written_pages(session, requests)
        missing = sorted(p for p, why in data.items() if p not in dirty and why != "used ring")
        if missing:
            raise CaseFailed(f"dirty log with mmap_offset {log.mmap_offset}: page {missing[0]}",
                             expected="set", seen=f"clear ({len(missing)} page(s) missing)")
    finally:
        log.close()


@case(
    "VU-LOG-2", title="No log updates after the source stops", family="migration", level=MUST,
    clause=f"{RST} Migration", quote="No further update must be done before rings are restarted.",
    requirement="After GET_VRING_BASE on the source the dirty log does not change: with requests "
        "held in flight at the stop, the log as it was at the reply is unchanged after their disk "
        "latency has passed.",
    requires=[ProtocolFeature.LOG_SHMFD, VirtioFeature.LOG_ALL],
)
def test_no_log_updates_after_stop(
    vhost_target: BackendTarget, make_session: SessionFactory
) -> None:
    """After GET_VRING_BASE on the source the dirty log does not change.

    Requests are held in flight on the slow disk at the stop (without slow I/O, DPDK's RAM
    disk, nothing is held); the log is read right after the last reply and never cleared, so
    a late write by a request that completes (or is cancelled) after the reply, or a log
    update of any other kind, shows as a bit that was clear at the reply and is set later."""
    slow = contextlib.ExitStack()
    try:
        slow.enter_context(slow_disk(vhost_target, HELD_LATENCY_MS))
        held = True
    except Unsupported:
        held = False
    with slow:
        session = make_session(vhost_target, model=False)
        log = DirtyLog.for_memory(session.memory)
        try:
            session.set_log_base(log.fd, log.mmap_size)
            blk = session.queues[0].blk
            first = blk.read(0, 8)
            session.submit(0)
            expect_status(wait_all(session, [first]), what="read while logging")
            requests = pending_io(session, 2, sector=64) if held else []
            if held:
                wait_popped(session, 0, settle=0.1)
            at_reply: set[int] = set()
            stop_now(session, requests, at_reply=lambda: at_reply.update(log.dirty_pages()))
            late = blk.read(8, 8)
            session.queues[0].vq.publish()
            session.kick(0)
            time.sleep(2 * HELD_LATENCY_MS / 1000 + 0.1)
            grown = sorted(log.dirty_pages() - at_reply)
            if grown:
                raise CaseFailed(
                    f"dirty log {2 * HELD_LATENCY_MS + 100} ms after the last GET_VRING_BASE "
                    f"reply ({len(requests)} request(s) in flight at the stop)",
                    expected=f"unchanged ({len(at_reply)} page(s) marked at the reply)",
                    seen=f"{len(grown)} more page(s) marked, first {grown[0]} (GPA "
                    f"{grown[0] * LOG_PAGE_SIZE:#x})")
            blk.abandon(late.tag)
        finally:
            log.close()
