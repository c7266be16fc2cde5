"""In-flight region rules (vhost-user.rst "Inflight I/O tracking"), split and packed, on a
region built in memory: what gets resubmitted, in which order, after a crash at every
point of a request's life."""

from __future__ import annotations

import struct

import pytest
from vhost_conformance.backend.inflight import (
    InflightError,
    PackedDescCopy,
    PackedInflight,
    SplitInflight,
    queue_region_size,
    queue_region_stride,
)


def test_strides_match_libvhost_user_and_dpdk() -> None:
    assert queue_region_stride(128, packed=False) == 2112
    for q in (1, 2, 3, 4, 5, 64, 127, 128, 256, 1024):
        split = queue_region_stride(q, packed=False)
        assert split % 64 == 0 and split >= queue_region_size(q, packed=False)
        assert split == -(-(16 * q + 16) // 64) * 64  # DPDK's formula gives the same
        packed = queue_region_stride(q, packed=True)
        assert packed == -(-(32 * q + 29) // 64) * 64
        assert packed >= queue_region_size(q, packed=True)


def _split(q: int = 8) -> tuple[bytearray, SplitInflight]:
    buf = bytearray(queue_region_stride(q, packed=False))
    region = SplitInflight(buf, 0, q)
    region.initialize(0)
    return buf, region


def test_split_layout_bytes() -> None:
    buf, region = _split(8)
    assert struct.unpack_from("<QHHHH", buf, 0) == (0, 1, 8, 0, 0)
    region.mark_popped(5, 7)
    assert buf[16 + 16 * 5] == 1
    assert struct.unpack_from("<Q", buf, 16 + 16 * 5 + 8)[0] == 7
    region.link_batch([5, 3])
    assert struct.unpack_from("<H", buf, 16 + 16 * 3 + 6)[0] == 5  # desc[3].next = 5
    assert region.last_batch_head == 3
    region.clear_batch([5, 3], 2)
    assert buf[16 + 16 * 5] == 0 and region.used_idx == 2


def test_split_fresh_region_is_initialised() -> None:
    buf = bytearray(2112)
    region = SplitInflight(buf, 0, 128)
    assert region.recover(17) == ([], 1)
    assert region.version == 1 and region.header_desc_num == 128 and region.used_idx == 17


def test_split_resubmits_in_counter_order_head_zero_included() -> None:
    _buf, region = _split(8)
    for head, counter in ((6, 12), (0, 10), (3, 11)):
        region.mark_popped(head, counter)
    heads, next_counter = region.recover(0)
    assert heads == [0, 3, 6]  # TEST-IDEAS 4: head 0 with used_idx 0 too
    assert next_counter == 13


@pytest.mark.parametrize(
    "point, resubmitted",
    [
        ("after-pop", [2, 4]),
        ("after-data", [2, 4]),
        ("after-used-elem", [2, 4]),
        ("after-used-idx", [4]),
        ("after-region-update", [4]),
    ],
)
def test_split_crash_points(point: str, resubmitted: list[int]) -> None:
    """Heads 1 (done earlier), 2 and 4 popped; 2 completes in a batch with nothing else;
    the back-end dies at ``point`` of head 2's completion. used->idx in guest memory is
    what the ring shows at that moment."""
    _buf, region = _split(8)
    region.mark_popped(1, 1)
    region.link_batch([1])
    region.clear_batch([1], 1)
    region.mark_popped(2, 2)
    region.mark_popped(4, 3)
    ring_used_idx = 1
    if point in ("after-used-idx", "after-region-update"):
        region.link_batch([2])
        ring_used_idx = 2
        if point == "after-region-update":
            region.clear_batch([2], 2)
    elif point == "after-used-elem":
        region.link_batch([2])
    heads, _ = region.recover(ring_used_idx)
    assert heads == resubmitted
    assert region.used_idx == ring_used_idx


def test_split_batch_fixup_clears_the_whole_last_batch() -> None:
    _buf, region = _split(8)
    for head in (0, 1, 2, 5):
        region.mark_popped(head, head + 1)
    region.link_batch([5, 0, 2])  # batch of 3 reached the used ring, region not updated
    heads, _ = region.recover(3)
    assert heads == [1]


def test_split_rejects_inconsistent_regions() -> None:
    buf, region = _split(8)
    struct.pack_into("<H", buf, 10, 16)
    with pytest.raises(InflightError, match="desc_num 16"):
        region.recover(0)
    buf, region = _split(8)
    with pytest.raises(InflightError, match="more than the queue size"):
        region.recover(100)
    buf, region = _split(8)
    struct.pack_into("<H", buf, 8, 7)
    with pytest.raises(InflightError, match="version 7"):
        region.recover(0)


# ---------------------------------------------------------------------------- packed


def _packed(q: int = 8) -> tuple[bytearray, PackedInflight]:
    buf = bytearray(queue_region_stride(q, packed=True))
    region = PackedInflight(buf, 0, q)
    region.initialize(0, True)
    return buf, region


def _d(n: int, last: bool = True) -> PackedDescCopy:
    return PackedDescCopy(0x1000 * n, 512, n, 0 if last else 1)


def test_packed_layout_bytes() -> None:
    buf, region = _packed(4)
    assert struct.unpack_from("<QHHHHHHBB", buf, 0) == (0, 1, 4, 0, 0, 0, 0, 1, 1)
    head = region.record_chain([_d(7, last=False), _d(9)], counter=5)
    assert head == 0
    inflight, _nxt, last, num, counter, did, _flags, length, addr = struct.unpack_from(
        "<BxHHHQHHIQ", buf, 32
    )
    assert (inflight, last, num, counter, did, length, addr) == (1, 1, 2, 5, 7, 512, 0x7000)
    assert region.free_head == 2 and region.old_free_head == 2
    assert region.chain_of(0) == (_d(7, last=False), _d(9))


def _ring_flags(used: dict[int, bool]) -> object:
    """Descriptor ring flags: entries in ``used`` carry AVAIL=USED=wrap; others the
    available pattern for wrap counter 1 (AVAIL=1, USED=0)."""

    def flags_at(idx: int) -> int:
        if idx in used:
            return 0x8080 if used[idx] else 0
        return 0x0080

    return flags_at


@pytest.mark.parametrize(
    "point, resubmitted",
    [
        ("after-pop", [0, 2]),
        ("after-used-elem", [0, 2]),
        ("after-region-used", [0, 2]),
        ("after-used-flags", [2]),
        ("after-region-update", [2]),
    ],
)
def test_packed_crash_points(point: str, resubmitted: list[int]) -> None:
    """Chains A (entries 0-1, 2 descriptors) and B (entry 2) in flight; A completes alone
    and the back-end dies at ``point``."""
    _buf, region = _packed(8)
    a = region.record_chain([_d(1, last=False), _d(2)], counter=1)
    b = region.record_chain([_d(3)], counter=2)
    assert (a, b) == (0, 2)
    used: dict[int, bool] = {}
    if point != "after-pop":
        region.link_batch([a])
        if point != "after-used-elem":
            region.set_used(2, True)
            if point != "after-region-used":
                used[0] = True  # the used flags of ring entry 0 were written
                if point == "after-region-update":
                    region.clear_batch([a])
    chains, next_counter, used_idx, used_wrap = region.recover(_ring_flags(used))
    assert [c.entry for c in chains] == resubmitted
    assert used_wrap is True
    assert used_idx == (2 if 0 in used else 0)
    if 0 in resubmitted:
        assert chains[0].descs == (_d(1, last=False), _d(2))
    assert next_counter == 3


def test_packed_resubmits_in_counter_order() -> None:
    _buf, region = _packed(8)
    first = region.record_chain([_d(1)], counter=9)
    second = region.record_chain([_d(2)], counter=4)
    chains, _, _, _ = region.recover(_ring_flags({}))
    assert [c.entry for c in chains] == [second, first]


def test_packed_free_list_exhaustion_is_an_error() -> None:
    _buf, region = _packed(2)
    region.record_chain([_d(1), _d(2)][:1], counter=1)
    region.record_chain([_d(3)], counter=2)
    with pytest.raises(InflightError, match="exhausted"):
        region.record_chain([_d(4)], counter=3)
