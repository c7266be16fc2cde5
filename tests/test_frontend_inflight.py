"""The in-flight region: layout, parser, validator, writers and the front-end's model."""

from __future__ import annotations

import pathlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vhost_conformance.frontend.inflight import (
    PACKED_HEADER_SIZE,
    DescStateSplit,
    InflightLayoutError,
    InflightModel,
    InflightModelError,
    PackedQueueRegion,
    PackedSlot,
    SplitQueueRegion,
    build_packed_region,
    build_split_region,
    dpdk_packed_stride,
    dpdk_split_stride,
    libvhost_user_split_stride,
    minimal_queue_bytes,
    parse_region,
    validate_region,
)


def worked_example() -> bytes:
    """SPEC-DIGEST 7.3: 2 queues x 128, heads 5 (counter 7) and 9 (counter 8), used_idx 40."""
    return build_split_region(
        128, 2, entries={0: {5: (1, 7, 0), 9: (1, 8, 0)}}, used_idx={0: 40}, last_batch_head={0: 4}
    )


# ----------------------------------------------------------------------------- strides


def test_stride_formulas_known_values() -> None:
    assert libvhost_user_split_stride(128) == 2112 == 0x840
    assert dpdk_split_stride(128) == 2112
    assert dpdk_packed_stride(128) == 4160  # ALIGN_UP(32*128 + 29, 64)
    assert minimal_queue_bytes(128, packed=False) == 2064
    assert minimal_queue_bytes(128, packed=True) == 4128
    assert libvhost_user_split_stride(1) == 64
    assert dpdk_packed_stride(1) == 64


def test_split_strides_agree_and_fit_for_every_queue_size() -> None:
    # SPEC-DIGEST 5.2: the two split formulas round to the same multiple of 64.
    for q in range(1, 1025):
        assert libvhost_user_split_stride(q) == dpdk_split_stride(q)
        assert libvhost_user_split_stride(q) >= minimal_queue_bytes(q, packed=False)
        assert dpdk_packed_stride(q) >= minimal_queue_bytes(q, packed=True)
        assert libvhost_user_split_stride(q) % 64 == 0 == dpdk_packed_stride(q) % 64


# ----------------------------------------------------------------------------- parsing


def test_worked_example_bytes_and_parse() -> None:
    buf = worked_example()
    assert len(buf) == 4224
    assert buf[:16] == bytes.fromhex("0000000000000000 0100 8000 0400 2800")
    assert buf[0x60:0x70] == bytes.fromhex("01 0000000000 0000 0700000000000000")
    assert buf[0xA0:0xB0] == bytes.fromhex("01 0000000000 0000 0800000000000000")
    region = parse_region(buf, num_queues=2, queue_size=128, packed=False)
    assert region.stride == 2112
    q0, q1 = region.queues
    assert isinstance(q0, SplitQueueRegion)
    assert (q0.version, q0.desc_num, q0.last_batch_head, q0.used_idx) == (1, 128, 4, 40)
    assert q0.inflight_heads() == [5, 9]
    assert [e.offset for e in q0.inflight_entries()] == [0x60, 0xA0]
    assert q1.offset == 0x840 and q1.inflight_heads() == []
    assert validate_region(region) == []


def test_inflight_heads_are_sorted_by_counter_not_index() -> None:
    buf = build_split_region(8, 1, entries={0: {0: (1, 30, 0), 3: (1, 10, 0), 6: (1, 20, 0)}})
    region = parse_region(buf, num_queues=1, queue_size=8, packed=False)
    assert region.queues[0].inflight_heads() == [3, 6, 0]


@pytest.mark.parametrize("stride", [2064, 2112, 2176])
def test_stride_comes_from_the_buffer_length(stride: int) -> None:
    # QEMU-TRACES correction 9: back-ends differ; offsets derive from mmap_size / num_queues.
    buf = build_split_region(128, 2, stride=stride, entries={1: {0: (1, 3, 0)}}, used_idx=7)
    region = parse_region(buf, num_queues=2, queue_size=128, packed=False)
    assert region.stride == stride
    assert region.queues[1].offset == stride
    assert region.queues[1].inflight_heads() == [0]
    assert region.queues[1].entries[0].offset == stride + 16
    assert region.queues[1].used_idx == 7


def test_parse_accepts_memoryview_and_bytearray() -> None:
    buf = worked_example()
    for form in (bytearray(buf), memoryview(buf)):
        assert parse_region(form, num_queues=2, queue_size=128, packed=False).queues[
            0
        ].inflight_heads() == [5, 9]


def test_parse_reads_a_shared_mapping() -> None:
    import mmap

    buf = worked_example()
    with mmap.mmap(-1, len(buf)) as shared:
        shared[:] = buf
        region = parse_region(shared, num_queues=2, queue_size=128, packed=False)
        assert region.queues[0].inflight_heads() == [5, 9]
        shared[0x60] = 0  # the back-end clears head 5; a fresh parse sees it
        assert parse_region(shared, num_queues=2, queue_size=128, packed=False).queues[
            0
        ].inflight_heads() == [9]


def test_length_not_a_multiple_of_num_queues_is_an_error() -> None:
    with pytest.raises(InflightLayoutError, match=r"4225 bytes is not a multiple of num_queues=2"):
        parse_region(bytes(4225), num_queues=2, queue_size=128, packed=False)


def test_stride_too_small_names_the_sizes() -> None:
    with pytest.raises(InflightLayoutError, match=r"2000 bytes per queue .* needs 2064"):
        parse_region(bytes(4000), num_queues=2, queue_size=128, packed=False)
    with pytest.raises(InflightLayoutError, match=r"packed queue of 128 descriptors needs 4128"):
        parse_region(bytes(2112), num_queues=1, queue_size=128, packed=True)


@settings(max_examples=60, deadline=None)
@given(
    queue_size=st.integers(1, 64),
    num_queues=st.integers(1, 3),
    data=st.data(),
)
def test_split_writer_and_parser_round_trip(
    queue_size: int, num_queues: int, data: st.DataObject
) -> None:
    entries = {
        q: data.draw(
            st.dictionaries(
                st.integers(0, queue_size - 1),
                st.tuples(st.integers(0, 1), st.integers(0, 2**64 - 1), st.integers(0, 0xFFFF)),
                max_size=queue_size,
            )
        )
        for q in range(num_queues)
    }
    used = {q: data.draw(st.integers(0, 0xFFFF)) for q in range(num_queues)}
    extra = data.draw(st.sampled_from([0, 16, 48, 64]))
    stride = minimal_queue_bytes(queue_size, packed=False) + extra
    buf = build_split_region(queue_size, num_queues, stride=stride, entries=entries, used_idx=used)
    region = parse_region(buf, num_queues=num_queues, queue_size=queue_size, packed=False)
    for q, queue in enumerate(region.queues):
        assert isinstance(queue, SplitQueueRegion)
        assert queue.used_idx == used[q] and queue.desc_num == queue_size
        for head, (inflight, counter, nxt) in entries[q].items():
            e = queue.entries[head]
            assert (e.inflight, e.counter, e.next) == (inflight, counter, nxt)
        heads = [h for h, v in entries[q].items() if v[0] == 1]
        assert sorted(queue.inflight_heads()) == sorted(heads)


# ----------------------------------------------------------------------------- validation


def _patch(buf: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(buf)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _findings(
    buf: bytes, *, num_queues: int = 2, queue_size: int = 128, packed: bool = False
) -> list[tuple[str, int, str]]:
    region = parse_region(buf, num_queues=num_queues, queue_size=queue_size, packed=packed)
    return [(f.rule, f.offset, f.seen) for f in validate_region(region)]


def test_bad_version_is_reported_at_its_byte() -> None:
    buf = _patch(worked_example(), 2112 + 8, "=H", 2)
    assert _findings(buf) == [("version", 2112 + 8, "2")]


def test_desc_num_must_equal_queue_size_once_initialised() -> None:
    buf = _patch(worked_example(), 10, "=H", 64)
    assert _findings(buf) == [("desc-num", 10, "64")]
    # version 0 (not initialised): desc_num is not checked
    fresh = build_split_region(128, 1, version=0)
    assert _findings(fresh, num_queues=1) == []


def test_inflight_flag_must_be_0_or_1() -> None:
    buf = _patch(worked_example(), 0x10 + 16 * 3, "=B", 2)
    findings = _findings(buf)
    assert findings == [("inflight-flag", 0x10 + 16 * 3, "2")]


def test_duplicate_counters_of_inflight_entries() -> None:
    buf = build_split_region(8, 1, entries={0: {1: (1, 5, 0), 2: (1, 5, 0), 3: (0, 5, 0)}})
    region = parse_region(buf, num_queues=1, queue_size=8, packed=False)
    findings = validate_region(region)
    assert [(f.rule, f.offset) for f in findings] == [("counter-unique", 16 + 2 * 16 + 8)]
    assert "desc[1]" in findings[0].expected


def test_last_batch_head_out_of_range() -> None:
    buf = build_split_region(8, 1, last_batch_head=8)
    assert _findings(buf, num_queues=1, queue_size=8) == [("last-batch-head", 12, "8")]


def test_finding_text_names_queue_byte_field_expected_seen() -> None:
    buf = _patch(worked_example(), 2112 + 8, "=H", 7)
    (finding,) = validate_region(parse_region(buf, num_queues=2, queue_size=128, packed=False))
    text = str(finding)
    assert "queue 1" in text and "byte 2120" in text and "version" in text and "seen 7" in text


# ----------------------------------------------------------------------------- packed


def test_packed_default_region_is_valid_and_parses() -> None:
    buf = build_packed_region(16, 2)
    assert len(buf) == 2 * dpdk_packed_stride(16)
    region = parse_region(buf, num_queues=2, queue_size=16, packed=True)
    q0 = region.queues[0]
    assert isinstance(q0, PackedQueueRegion)
    assert (q0.version, q0.desc_num, q0.used_wrap_counter, q0.free_head) == (1, 16, 1, 0)
    assert [e.next for e in q0.entries] == list(range(1, 17))
    assert q0.entries[3].offset == PACKED_HEADER_SIZE + 3 * 32
    assert validate_region(region) == []


def test_packed_inflight_heads_are_buffer_ids_by_counter() -> None:
    slots = {
        0: {
            0: PackedSlot(
                inflight=1, next=1, last=1, num=2, counter=9, id=7, flags=0, len=16, addr=0x1000
            ),
            1: PackedSlot(next=4),
            2: PackedSlot(inflight=1, next=3, last=2, num=1, counter=4, id=3, len=512, addr=0x2000),
        }
    }
    buf = build_packed_region(8, 1, slots=slots, free_head=3)
    region = parse_region(buf, num_queues=1, queue_size=8, packed=True)
    q = region.queues[0]
    assert q.inflight_heads() == [3, 7]
    assert [e.index for e in q.inflight_entries()] == [2, 0]
    e0 = q.entries[0]
    assert isinstance(e0, type(q.entries[2]))
    assert (e0.len, e0.addr, e0.num, e0.last) == (16, 0x1000, 2, 1)
    assert validate_region(region) == []


def test_packed_free_list_loop_and_inflight_on_free_list() -> None:
    loop = build_packed_region(4, 1, slots={0: {2: PackedSlot(next=0)}})
    assert [
        f.rule for f in validate_region(parse_region(loop, num_queues=1, queue_size=4, packed=True))
    ] == ["free-list"]
    on_list = build_packed_region(
        4, 1, slots={0: {1: PackedSlot(inflight=1, next=2, num=1, last=1, counter=1)}}
    )
    findings = validate_region(parse_region(on_list, num_queues=1, queue_size=4, packed=True))
    assert [(f.rule, f.offset) for f in findings] == [("free-list", PACKED_HEADER_SIZE + 32)]


def test_packed_header_sanity() -> None:
    buf = build_packed_region(4, 1, used_wrap_counter=2, free_head=9)
    rules = sorted(
        f.rule for f in validate_region(parse_region(buf, num_queues=1, queue_size=4, packed=True))
    )
    assert rules == ["index-range", "index-range", "wrap-counter", "wrap-counter"]
    chain = build_packed_region(
        4, 1, free_head=4, slots={0: {0: PackedSlot(inflight=1, num=0, last=6, counter=1)}}
    )
    rules = sorted(
        f.rule
        for f in validate_region(parse_region(chain, num_queues=1, queue_size=4, packed=True))
    )
    assert rules == ["chain", "chain"]


# ----------------------------------------------------------------------------- the model


def _model_with_history(completed: int, queue_size: int = 128) -> InflightModel:
    model = InflightModel(2, queue_size)
    for i in range(completed):
        model.submit(0, 20 + i % 4, f"old{i}", i)
        model.complete(0, 20 + i % 4)
    return model


def test_model_worked_example_passes() -> None:
    model = _model_with_history(40)
    model.submit(0, 5, "a", 40)
    model.submit(0, 9, "b", 41)
    region = parse_region(worked_example(), num_queues=2, queue_size=128, packed=False)
    assert model.check(region, used_idx=[40, 0], last_avail_idx=[42, 0]) == []
    exp = model.expectations(0, region_used_idx=40, used_idx=40, last_avail_idx=42)
    assert dict(exp.must) == {5: "a", 9: "b"} and exp.order == (5, 9) and not exp.may


def test_model_popped_request_missing_from_region() -> None:
    model = _model_with_history(40)
    for head, tag in ((5, "a"), (9, "b"), (11, "c")):
        model.submit(0, head, tag)
    region = parse_region(worked_example(), num_queues=2, queue_size=128, packed=False)
    findings = model.check(region, used_idx=[40, 0], last_avail_idx=[43, 0])
    assert [(f.rule, f.offset) for f in findings] == [("must-be-inflight", 0x10 + 11 * 16)]
    assert "'c'" in findings[0].expected
    # the back-end said it popped only two: head 11 MUST NOT be marked, and is not
    assert model.check(region, used_idx=[40, 0], last_avail_idx=[42, 0]) == []
    # no GET_VRING_BASE reply (crash): an unpopped-or-not request MAY be marked
    assert model.check(region, used_idx=[40, 0], last_avail_idx=[None, None]) == []


def test_model_marked_but_not_popped_is_a_finding() -> None:
    model = _model_with_history(40)
    model.submit(0, 5, "a")
    model.submit(0, 9, "b")
    region = parse_region(worked_example(), num_queues=2, queue_size=128, packed=False)
    findings = model.check(region, used_idx=[40, 0], last_avail_idx=[41, 0])
    assert [(f.rule, f.offset) for f in findings] == [("must-not-be-inflight", 0xA0)]
    assert "not popped" in findings[0].expected


def test_model_never_submitted_head_marked() -> None:
    model = InflightModel(1, 8)
    buf = build_split_region(8, 1, entries={0: {3: (1, 1, 0)}})
    findings = model.check(
        parse_region(buf, num_queues=1, queue_size=8, packed=False), used_idx=0, last_avail_idx=0
    )
    assert [(f.rule, f.seen) for f in findings] == [("must-not-be-inflight", "1")]
    assert "never submitted" in findings[0].expected


def test_model_head_zero_in_flight_with_used_idx_zero() -> None:
    # TEST-IDEAS 4 (spdk issue 3766): head 0 with used_idx 0 must count like any other head.
    model = InflightModel(1, 8)
    model.submit(0, 0, "zero", 0)
    good = build_split_region(8, 1, entries={0: {0: (1, 0, 0)}})
    assert (
        model.check(
            parse_region(good, num_queues=1, queue_size=8, packed=False),
            used_idx=0,
            last_avail_idx=1,
        )
        == []
    )
    bad = build_split_region(8, 1)
    findings = model.check(
        parse_region(bad, num_queues=1, queue_size=8, packed=False), used_idx=0, last_avail_idx=1
    )
    assert [(f.rule, f.offset) for f in findings] == [("must-be-inflight", 16)]


def test_model_used_idx_fix_up_rule() -> None:
    # vhost-user.rst: if used_idx != used->idx the last batch is already visible; its entries
    # may still be marked. After used_idx caught up they must not be.
    model = InflightModel(1, 8)
    model.submit(0, 2, "x")
    model.submit(0, 4, "y")
    model.complete(0, 2)
    lagging = build_split_region(
        8, 1, entries={0: {2: (1, 0, 0), 4: (1, 1, 0)}}, used_idx=0, last_batch_head=2
    )
    region = parse_region(lagging, num_queues=1, queue_size=8, packed=False)
    assert model.check(region, used_idx=1, last_avail_idx=2) == []
    exp = model.expectations(0, region_used_idx=0, used_idx=1, last_avail_idx=2)
    assert exp.last_batch == (2,) and dict(exp.may) == {2: "x"} and dict(exp.must) == {4: "y"}
    committed = build_split_region(
        8, 1, entries={0: {2: (1, 0, 0), 4: (1, 1, 0)}}, used_idx=1, last_batch_head=2
    )
    findings = model.check(
        parse_region(committed, num_queues=1, queue_size=8, packed=False),
        used_idx=1,
        last_avail_idx=2,
    )
    assert [(f.rule, f.offset) for f in findings] == [("must-not-be-inflight", 16 + 2 * 16)]
    assert "completed" in findings[0].expected


def test_model_last_batch_list_must_name_the_batch() -> None:
    model = InflightModel(1, 8)
    for head in (1, 2, 3):
        model.submit(0, head, head)
    model.complete(0, 1)
    model.complete(0, 2)
    # batch of two (heads 1 then 2): last_batch_head = 2, desc[2].next = 1
    good = build_split_region(
        8, 1, entries={0: {1: (0, 0, 7), 2: (0, 1, 1), 3: (1, 2, 0)}}, used_idx=0, last_batch_head=2
    )
    assert (
        model.check(
            parse_region(good, num_queues=1, queue_size=8, packed=False),
            used_idx=2,
            last_avail_idx=3,
        )
        == []
    )
    bad = build_split_region(
        8, 1, entries={0: {1: (0, 0, 7), 2: (0, 1, 5), 3: (1, 2, 0)}}, used_idx=0, last_batch_head=2
    )
    findings = model.check(
        parse_region(bad, num_queues=1, queue_size=8, packed=False), used_idx=2, last_avail_idx=3
    )
    assert [(f.rule, f.offset) for f in findings] == [("last-batch", 12)]


def test_model_region_used_idx_ahead_or_far_behind() -> None:
    model = InflightModel(1, 8)
    region = parse_region(
        build_split_region(8, 1, used_idx=5), num_queues=1, queue_size=8, packed=False
    )
    findings = model.check(region, used_idx=0, last_avail_idx=0)
    assert [(f.rule, f.offset, f.seen) for f in findings] == [("used-idx", 14, "5")]


def test_model_counter_order_must_follow_pop_order() -> None:
    model = InflightModel(1, 8)
    model.submit(0, 6, "first")
    model.submit(0, 1, "second")
    buf = build_split_region(8, 1, entries={0: {6: (1, 11, 0), 1: (1, 10, 0)}})
    findings = model.check(
        parse_region(buf, num_queues=1, queue_size=8, packed=False), used_idx=0, last_avail_idx=2
    )
    assert [(f.rule, f.seen) for f in findings] == [("counter-order", "[1, 6]")]


def test_model_impossible_last_avail_idx() -> None:
    model = InflightModel(1, 8)
    model.submit(0, 1, "a")
    model.complete(0, 1)
    model.submit(0, 2, "b")
    buf = build_split_region(8, 1, entries={0: {2: (1, 1, 0)}}, used_idx=1, last_batch_head=1)
    region = parse_region(buf, num_queues=1, queue_size=8, packed=False)
    # 0 would mean "nothing popped", but one request was already completed
    findings = model.check(region, used_idx=1, last_avail_idx=0)
    assert [f.rule for f in findings] == ["last-avail-idx"]
    assert model.check(region, used_idx=1, last_avail_idx=2) == []


def test_model_version_zero_after_use() -> None:
    model = InflightModel(1, 8)
    model.submit(0, 1, "a")
    region = parse_region(
        build_split_region(8, 1, version=0), num_queues=1, queue_size=8, packed=False
    )
    assert [f.rule for f in model.check(region, used_idx=0, last_avail_idx=1)] == ["version"]
    fresh = InflightModel(1, 8)
    assert fresh.check(region, used_idx=0, last_avail_idx=0) == []


def test_model_sixteen_bit_wrap() -> None:
    model = InflightModel(1, 4)
    for i in range(65540):
        model.submit(0, i % 4, i, i % 65536)
        model.complete(0, i % 4)
    model.submit(0, 2, "late", 65540 % 65536)
    buf = build_split_region(
        4, 1, entries={0: {2: (1, 99, 0)}}, used_idx=65540 % 65536, last_batch_head=3
    )
    region = parse_region(buf, num_queues=1, queue_size=4, packed=False)
    assert model.check(region, used_idx=65540 % 65536, last_avail_idx=65541 % 65536) == []
    assert dict(model.expectations(0, region_used_idx=4, used_idx=4, last_avail_idx=5).must) == {
        2: "late"
    }


def test_model_packed_uses_buffer_ids() -> None:
    model = InflightModel(1, 8)
    model.submit(0, 7, "p")
    buf = build_packed_region(
        8,
        1,
        free_head=1,
        slots={0: {0: PackedSlot(inflight=1, next=1, last=0, num=1, counter=0, id=7)}},
    )
    region = parse_region(buf, num_queues=1, queue_size=8, packed=True)
    assert model.check(region, used_idx=0, last_avail_idx=1) == []
    empty = parse_region(build_packed_region(8, 1), num_queues=1, queue_size=8, packed=True)
    assert [f.rule for f in model.check(empty, used_idx=0, last_avail_idx=1)] == [
        "must-be-inflight"
    ]


def test_model_misuse_raises() -> None:
    model = InflightModel(2, 8)
    model.submit(0, 1, "a", 0)
    with pytest.raises(InflightModelError, match="still outstanding"):
        model.submit(0, 1, "again")
    with pytest.raises(InflightModelError, match="not the next position"):
        model.submit(0, 2, "b", 5)
    with pytest.raises(InflightModelError, match="not outstanding"):
        model.complete(0, 3)
    with pytest.raises(InflightModelError, match="queue 2"):
        model.submit(2, 0, "x")
    with pytest.raises(InflightModelError, match="outside"):
        model.submit(1, 8, "x")
    model.complete(0, 1)
    with pytest.raises(InflightModelError, match="not outstanding"):
        model.complete(0, 1)  # a second completion of the same request
    region = parse_region(build_split_region(8, 2), num_queues=2, queue_size=8, packed=False)
    with pytest.raises(InflightModelError, match="used->idx 0 but 1 completions"):
        model.check(region, used_idx=[0, 0], last_avail_idx=[1, 0])
    with pytest.raises(InflightModelError, match="one value given for 2 queues"):
        model.check(region, used_idx=1, last_avail_idx=None)


def test_model_keeps_tags_for_exactly_once_accounting() -> None:
    model = InflightModel(1, 8)
    model.submit(0, 1, ("write", 0))
    model.submit(0, 2, ("write", 8))
    done = model.complete(0, 2)
    assert done.tag == ("write", 8) and done.completed and done.used_position == 0
    assert [r.tag for r in model.outstanding(0)] == [("write", 0)]
    assert [r.tag for r in model.completed(0)] == [("write", 8)]


def test_desc_state_split_is_frozen() -> None:
    e = DescStateSplit(0, 16, 1, bytes(5), 0, 0)
    with pytest.raises(AttributeError):
        e.inflight = 0  # type: ignore[misc]


# ----------------------------------------------------------------------------- a real peer


@pytest.mark.peer("dpdk-vhost-blk")
@pytest.mark.parametrize("packed", [False, True])
def test_dpdk_vhost_blk_region_parses_and_matches_the_model(
    tmp_path: pathlib.Path, packed: bool
) -> None:
    """Differential: rte_vhost's vhost_blk (INFLIGHT_SHMFD, split and packed) writes a region
    this parser reads with DPDK's stride, that validates, and that the model accepts after
    I/O and a stop."""
    from vhost_conformance.frontend.blk import ModelDisk
    from vhost_conformance.frontend.channel import Channel
    from vhost_conformance.frontend.device import Session
    from vhost_conformance.frontend.memory import GuestMemory
    from vhost_conformance.peers.dpdk import start_dpdk_vhost_blk
    from vhost_conformance.peers.provision import PeerUnavailable, peer_path

    try:
        peer_path("dpdk-vhost-blk")
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    queue_size = 16
    with (
        start_dpdk_vhost_blk(tmp_path / "dpdk") as peer,
        GuestMemory.simple(32 * 1024 * 1024, regions=1) as memory,
    ):
        session = Session(
            Channel.connect(peer.socket, timeout=10.0), memory, profile="qemu-11.1",
            queue_size=queue_size, packed=packed, event_idx=False, indirect=False,
            model=ModelDisk(128 * 1024 * 1024), timeout=10.0,
        )  # fmt: skip
        try:
            session.connect()
            session.start()
            assert session.inflight is not None, "DPDK offers INFLIGHT_SHMFD: a region was expected"
            expected_stride = (
                dpdk_packed_stride(queue_size) if packed else dpdk_split_stride(queue_size)
            )
            assert session.inflight.mmap_size == expected_stride
            region = parse_region(
                session.inflight.map, num_queues=1, queue_size=queue_size, packed=packed
            )
            queue = region.queues[0]
            # desc_num written at SET_INFLIGHT_FD, version at SET_VRING_KICK (DPDK vhost_user.c)
            assert (queue.version, queue.desc_num) == (1, queue_size)
            assert validate_region(region) == []
            if isinstance(queue, PackedQueueRegion):
                # DPDK vhost_user_get_inflight_fd: wrap counters 1, free list next = j + 1;
                # read at this parser's offsets (SPEC-DIGEST 5.5)
                assert (queue.used_wrap_counter, queue.old_used_wrap_counter) == (1, 1)
                assert [e.next for e in queue.entries] == list(range(1, queue_size + 1))
            model = InflightModel(1, queue_size)
            blk = session.queues[0].blk
            completed = 0
            # packed: the region only; the driver's PackedVirtqueue sees no used entries from
            # DPDK today (wait_used returns [], tests/test_frontend_blk.py fails the same way)
            rounds = 0 if packed else 6
            for round_ in range(rounds):  # 3 descriptors per request: 5 fit in 16
                requests = [blk.write((round_ * 5 + i) * 8, bytes([i]) * 4096) for i in range(5)]
                session.submit(0)  # heads (buffer ids) are assigned when added to the ring
                for req in requests:
                    model.submit(0, req.head, req.tag)
                used = session.wait_used(0, len(requests))
                done_list = blk.complete(used)
                assert len(done_list) == len(requests), (used, done_list)
                for done in done_list:
                    model.complete(0, done.request.head)
                    completed += 1
            bases = session.stop()
            region = parse_region(
                session.inflight.map, num_queues=1, queue_size=queue_size, packed=packed
            )
            assert validate_region(region) == []
            assert region.queues[0].inflight_heads() == []
            last_avail = (
                5 * rounds if packed else bases[0]
            )  # packed: the model's own free-running count
            assert model.check(region, used_idx=completed, last_avail_idx=last_avail) == []
        finally:
            session.close()
