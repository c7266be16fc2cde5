"""Tests of the wire codec: byte-exact layouts, the real QEMU 11.1.3 trace, round trips, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vhost_conformance.frontend import protocol as p

TRACE = Path("/work/shared/data/qemu-11.1.3/boot-io-poweroff-qsd.jsonl")

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
regions = st.builds(p.MemoryRegion, u64, u64, u64, u64)

STRATEGIES: dict[type, st.SearchStrategy[Any]] = {
    p.U64: st.builds(p.U64, u64),
    p.VringState: st.builds(p.VringState, u32, u32),
    p.VringAddr: st.builds(p.VringAddr, u32, u32, u64, u64, u64, u64),
    p.MemoryRegion: regions,
    p.MemoryTable: st.builds(
        p.MemoryTable, st.lists(regions, min_size=1, max_size=8).map(tuple)
    ),
    p.SingleMemoryRegion: st.builds(p.SingleMemoryRegion, regions),
    p.LogBase: st.builds(p.LogBase, u64, u64),
    p.Config: st.binary(max_size=256).flatmap(
        lambda data: st.builds(p.Config, u32, st.just(len(data)), u32, st.just(data))
    ),
    p.Inflight: st.builds(p.Inflight, u64, u64, u16, u16),
    p.VringArea: st.builds(p.VringArea, u64, u64, u64),
    p.IotlbMsg: st.builds(p.IotlbMsg, u64, u64, u64, u8, u8),
    p.DeviceStateTransfer: st.builds(p.DeviceStateTransfer, u32, u32),
    p.Shared: st.builds(p.Shared, st.binary(min_size=16, max_size=16)),
    p.ShmemMap: st.builds(p.ShmemMap, u8, u64, u64, u64, u64),
    p.ShmemConfig: st.builds(
        p.ShmemConfig, u32, st.lists(u64, max_size=256).map(tuple)
    ),
    p.Raw: st.builds(p.Raw, st.binary(max_size=64)),
}


# ------------------------------------------------------------------------------------------
# Constants and enums


def test_constants() -> None:
    assert p.HEADER_SIZE == 12
    assert (p.VERSION, p.FLAG_REPLY, p.FLAG_NEED_REPLY) == (1, 4, 8)
    assert p.MAX_FDS == 8
    assert p.MAX_PAYLOAD_SIZE == 2056 == p.ShmemConfig.SIZE
    assert (p.VRING_F_LOG, p.VRING_NOFD_MASK, p.VRING_IDX_MASK) == (1, 0x100, 0xFF)


def test_enum_values() -> None:
    assert [r.value for r in p.FrontendRequest] == list(range(1, 46))
    assert p.FrontendRequest.GET_VRING_BASE_SKIP_DRAIN.value == 45  # the post-11.1 proposal
    assert p.FrontendRequest.SET_BACKEND_REQ_FD.value == 21
    assert p.FrontendRequest.GET_INFLIGHT_FD.value == 31
    assert p.FrontendRequest.SET_INFLIGHT_FD.value == 32
    assert p.FrontendRequest.GET_SHMEM_CONFIG.value == 44
    assert [r.value for r in p.BackendRequest] == list(range(1, 11))
    assert p.BackendRequest.SHMEM_UNMAP.value == 10
    assert [f.value for f in p.ProtocolFeature] == list(range(24))
    assert p.ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN.value == 23  # the post-11.1 proposal
    assert p.ProtocolFeature.INFLIGHT_SHMFD.value == 12
    assert p.ProtocolFeature.GET_VRING_BASE_INFLIGHT.value == 20
    assert p.ProtocolFeature(22).name == "SHMEM"
    assert p.ProtocolFeature["SHMEM_MAP"] is p.ProtocolFeature.SHMEM
    assert p.VirtioFeature.LOG_ALL.value == 26
    assert p.VirtioFeature.PROTOCOL_FEATURES.value == 30
    assert p.VirtioFeature.RING_RESET.value == 40
    assert p.BlkFeature.ZONED.value == 17


def test_bits_and_names() -> None:
    assert p.bits(0) == []
    assert p.bits(0b1011) == [0, 1, 3]
    # GET_FEATURES reply of qemu-storage-daemon 11.1.3 (QEMU-TRACES.md (a))
    names = p.feature_names(0x175007E44, p.VirtioFeature, p.BlkFeature)
    assert names == [
        "SEG_MAX", "BLK_SIZE", "FLUSH", "TOPOLOGY", "CONFIG_WCE", "MQ", "DISCARD",
        "WRITE_ZEROES", "NOTIFY_ON_EMPTY", "LOG_ALL", "RING_INDIRECT_DESC",
        "RING_EVENT_IDX", "PROTOCOL_FEATURES", "VERSION_1",
    ]  # fmt: skip
    assert p.feature_names(1 << 63 | 1, p.ProtocolFeature) == ["MQ", "bit63"]
    assert p.feature_names(0b100) == ["bit2"]
    assert p.has(0x8F2B, p.ProtocolFeature.REPLY_ACK)
    assert not p.has(0x8F2B, p.ProtocolFeature.INFLIGHT_SHMFD)
    with pytest.raises(p.EncodeError):
        p.bits(-1)


# ------------------------------------------------------------------------------------------
# Header


def test_header_bytes() -> None:
    h = p.Header(p.FrontendRequest.SET_VRING_CALL, 0x9, 8)
    assert h.encode().hex() == "0d000000" "09000000" "08000000"
    assert p.Header.decode(bytes.fromhex("0b000000050000000800000 0".replace(" ", ""))) == (
        p.Header(11, 5, 8)
    )
    assert (h.version, h.is_reply, h.need_reply) == (1, False, True)
    r = p.Header(11, 0x5, 8)
    assert (r.version, r.is_reply, r.need_reply) == (1, True, False)


@pytest.mark.parametrize("size", [0, 11, 13])
def test_header_decode_wrong_size(size: int) -> None:
    with pytest.raises(p.MalformedMessage) as info:
        p.Header.decode(bytes(size))
    assert info.value.expected == "12 bytes"
    assert info.value.seen == f"{size} bytes"
    assert "12 bytes" in str(info.value) and f"{size} bytes" in str(info.value)


# ------------------------------------------------------------------------------------------
# Byte-exact payload fixtures (hand-written hex, native = little-endian)

FIXTURES: list[tuple[object, str]] = [
    (p.U64(0x175007E44), "447e007501000000"),
    (p.VringState(1, 128), "01000000" "80000000"),
    (
        p.VringAddr(2, p.VRING_F_LOG, 0x1000, 0x2000, 0x3000, 0x4000),
        "02000000" "01000000"
        "0010000000000000" "0020000000000000" "0030000000000000" "0040000000000000",
    ),
    (
        p.MemoryRegion(0x0, 0x10000000, 0x7FD173FFF000, 0x0),
        "0000000000000000" "0000001000000000" "00f0ff73d17f0000" "0000000000000000",
    ),
    (
        p.MemoryTable((p.MemoryRegion(1, 2, 3, 4),)),
        "01000000" "00000000"
        "0100000000000000" "0200000000000000" "0300000000000000" "0400000000000000",
    ),
    (
        p.SingleMemoryRegion(p.MemoryRegion(1, 2, 3, 4)),
        "0000000000000000"
        "0100000000000000" "0200000000000000" "0300000000000000" "0400000000000000",
    ),
    (p.LogBase(0x10000, 0x200), "0000010000000000" "0002000000000000"),
    (p.Config(0, 3, 1, b"\xaa\xbb\xcc"), "00000000" "03000000" "01000000" "aabbcc"),
    (
        p.Inflight(0x840, 0, 1, 128),
        "4008000000000000" "0000000000000000" "0100" "8000" "00000000",
    ),
    (p.VringArea(0x101, 4096, 0x2000), "0101000000000000" "0010000000000000" "0020000000000000"),
    (
        p.IotlbMsg(0x1000, 0x2000, 0x3000, p.IotlbMsg.PERM_RW, p.IotlbMsg.TYPE_UPDATE),
        "0010000000000000" "0020000000000000" "0030000000000000" "03" "02" "000000000000",
    ),
    (p.DeviceStateTransfer(1, 0), "01000000" "00000000"),
    (p.Shared(bytes(range(16))), "000102030405060708090a0b0c0d0e0f"),
    (
        p.ShmemMap(3, 0x1000, 0x2000, 0x3000, 1),
        "03" "00000000000000" "0010000000000000" "0020000000000000" "0030000000000000"
        "0100000000000000",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("value", "hexbytes"), FIXTURES, ids=lambda v: type(v).__name__)
def test_fixture_bytes(value: Any, hexbytes: str) -> None:
    data = bytes.fromhex(hexbytes)
    assert value.encode() == data
    assert type(value).decode(data) == value


def test_fixed_sizes() -> None:
    expected = {
        p.U64: 8, p.VringState: 8, p.VringAddr: 40, p.MemoryRegion: 32,
        p.SingleMemoryRegion: 40, p.LogBase: 16, p.Inflight: 24, p.VringArea: 24,
        p.IotlbMsg: 32, p.DeviceStateTransfer: 8, p.Shared: 16, p.ShmemMap: 40,
        p.ShmemConfig: 2056,
    }  # fmt: skip
    for cls, size in expected.items():
        assert size == cls.SIZE, cls  # type: ignore[attr-defined]


def test_shmem_config_bytes() -> None:
    value = p.ShmemConfig(2, (0x1000, 0x200000))
    data = value.encode()
    assert len(data) == 2056
    assert data[:24].hex() == "02000000" "00000000" "0010000000000000" "0000200000000000"
    assert data[24:] == bytes(2056 - 24)
    assert p.ShmemConfig.decode(data) == value
    assert len(value.memory_sizes) == 256
    # a shorter table (8 + 8 * nregions) decodes to the same value
    assert p.ShmemConfig.decode(data[:24]) == value
    for bad in (4, 25, 2064):
        with pytest.raises(p.MalformedPayload, match=f"seen {bad} bytes"):
            p.ShmemConfig.decode(bytes(bad))


def test_inflight_accepts_packed_20_bytes() -> None:
    data = bytes.fromhex("4008000000000000" "0000000000000000" "0200" "0001")
    assert p.Inflight.decode(data) == p.Inflight(0x840, 0, 2, 256)
    # padding value is ignored on decode
    assert p.Inflight.decode(data + b"\xff" * 4) == p.Inflight(0x840, 0, 2, 256)


def test_memory_table_sizes() -> None:
    two = p.MemoryTable((p.MemoryRegion(0, 1, 2, 3), p.MemoryRegion(4, 5, 6, 7)))
    data = two.encode()
    assert len(data) == 8 + 2 * 32  # QEMU's hdr.size
    full = data + bytes(32 * 6)  # the whole C struct (8 regions)
    assert p.MemoryTable.decode(full) == two
    with pytest.raises(p.MalformedPayload) as info:
        p.MemoryTable.decode(data + bytes(32))  # neither 8+32n nor 264
    assert "72 or 264 bytes" in str(info.value) and "104 bytes" in str(info.value)
    with pytest.raises(p.MalformedPayload) as info:
        p.MemoryTable.decode(bytes.fromhex("09000000" "00000000") + bytes(9 * 32))
    assert info.value.seen == 9 and "nregions" in str(info.value)
    with pytest.raises(p.MalformedPayload):
        p.MemoryTable.decode(bytes(8))  # nregions 0
    with pytest.raises(p.EncodeError):
        p.MemoryTable(()).encode()
    with pytest.raises(p.EncodeError):
        p.MemoryTable((p.MemoryRegion(0, 0, 0, 0),) * 9).encode()


def test_config_errors() -> None:
    with pytest.raises(p.MalformedPayload) as info:
        p.Config.decode(bytes.fromhex("00000000" "39000000" "00000000") + bytes(56))
    assert info.value.expected == "69 bytes" and info.value.seen == "68 bytes"
    with pytest.raises(p.MalformedPayload) as info:
        p.Config.decode(bytes.fromhex("00000000" "01010000" "00000000") + bytes(257))
    assert info.value.seen == 257
    with pytest.raises(p.MalformedPayload):
        p.Config.decode(bytes(11))
    with pytest.raises(p.EncodeError):
        p.Config(0, 4, 0, b"abc").encode()
    assert p.Config.request(0, 57).encode() == bytes.fromhex("00000000390000000000000000") + bytes(
        56
    )


def test_encode_out_of_range() -> None:
    with pytest.raises(p.EncodeError, match="vring state"):
        p.VringState(2**32, 0).encode()
    with pytest.raises(p.EncodeError):
        p.Shared(b"short").encode()
    with pytest.raises(p.EncodeError):
        p.ShmemConfig(1, (0,) * 257)


def test_packed_base() -> None:
    num = p.packed_base(0x1234, True, 0x0567, False)
    assert num == 0x0567_9234
    assert p.split_packed_base(num) == (0x1234, True, 0x0567, False)
    assert p.split_packed_base(0x8000_8000) == (0, True, 0, True)
    with pytest.raises(p.EncodeError):
        p.packed_base(0x8000, False, 0, False)


@given(u16, st.booleans(), st.integers(0, 0x7FFF), st.booleans())
def test_packed_base_round_trip(avail: int, aw: bool, used: int, uw: bool) -> None:
    avail &= 0x7FFF
    assert p.split_packed_base(p.packed_base(avail, aw, used, uw)) == (avail, aw, used, uw)


# ------------------------------------------------------------------------------------------
# Round trips and size errors for every payload class


def test_every_payload_class_has_a_strategy() -> None:
    assert set(STRATEGIES) == set(p.PAYLOAD_CLASSES)


@pytest.mark.parametrize("cls", p.PAYLOAD_CLASSES, ids=lambda c: c.__name__)
def test_round_trip(cls: type) -> None:
    @given(STRATEGIES[cls])
    def check(value: Any) -> None:
        data = value.encode()
        assert type(value).decode(data) == value
        assert type(value).decode(data).encode() == data

    check()


@pytest.mark.parametrize(
    "cls", [c for c in p.PAYLOAD_CLASSES if hasattr(c, "SIZE")], ids=lambda c: c.__name__
)
def test_wrong_size_names_layout_and_sizes(cls: Any) -> None:
    for size in (0, cls.SIZE - 1, cls.SIZE + 1):
        with pytest.raises(p.MalformedPayload) as info:
            cls.decode(bytes(size))
        err = info.value
        assert err.layout in str(err)
        assert f"seen {size} bytes" in str(err)
        assert f"{cls.SIZE}" in str(err.expected)
        assert err.seen == f"{size} bytes"


# ------------------------------------------------------------------------------------------
# Messages, tables, framer


def test_encode_request_and_reply() -> None:
    data = p.encode_request(p.FrontendRequest.SET_VRING_KICK, p.U64(0), need_reply=True)
    assert data.hex() == "0c000000" "09000000" "08000000" "0000000000000000"
    data = p.encode_request(p.FrontendRequest.GET_FEATURES)
    assert data.hex() == "01000000" "01000000" "00000000"
    data = p.encode_reply(p.FrontendRequest.GET_VRING_BASE, p.VringState(0, 129))
    assert data.hex() == "0b000000" "05000000" "08000000" "00000000" "81000000"
    assert p.encode_reply(21, b"\0" * 8)[4:8] == b"\x05\0\0\0"


def test_message_properties() -> None:
    m = p.Message(13, 0x9, bytes(8), (7,))
    assert m.header == p.Header(13, 9, 8)
    assert m.need_reply and not m.is_reply
    assert m.encode() == p.encode_request(13, p.U64(0), need_reply=True)
    assert m.decoded() == p.U64(0)
    assert m.name() == "SET_VRING_CALL"
    assert p.Message(3, 1, b"", ()).decoded() is None


def test_message_decoded_reply_layouts() -> None:
    ack = p.Message(p.FrontendRequest.SET_VRING_ENABLE, 0x5, bytes(8))
    assert ack.decoded() == p.U64(0)  # REPLY_ACK, not a vring state
    gvb = p.Message(p.FrontendRequest.GET_VRING_BASE, 0x5, p.VringState(0, 7).encode())
    assert gvb.decoded() == p.VringState(0, 7)
    smt = p.Message(p.FrontendRequest.SET_MEM_TABLE, 0x5, bytes(8))
    assert smt.decoded() == p.U64(0)
    inflight = p.Message(p.FrontendRequest.GET_INFLIGHT_FD, 0x5, p.Inflight(1, 0, 0, 0).encode())
    assert inflight.decoded() == p.Inflight(1, 0, 0, 0)
    be = p.Message(p.BackendRequest.VRING_HOST_NOTIFIER_MSG, 0x9, p.VringArea(0x100, 0, 0).encode())
    assert be.decoded(channel="backend") == p.VringArea(0x100, 0, 0)
    assert be.name("backend") == "BACKEND_VRING_HOST_NOTIFIER_MSG"
    assert p.Message(2, 0x5, bytes(8)).decoded(channel="backend") == p.U64(0)


def test_message_decoded_errors_name_message() -> None:
    with pytest.raises(p.MalformedPayload) as info:
        p.Message(p.FrontendRequest.SET_INFLIGHT_FD, 0x1, bytes(16)).decoded()
    err = info.value
    assert err.request_name == "SET_INFLIGHT_FD"
    assert str(err) == (
        "SET_INFLIGHT_FD: payload 'inflight description': size"
        " (expected 24 or 20 bytes, seen 16 bytes)"
    )
    with pytest.raises(p.MalformedPayload) as info:
        p.Message(p.FrontendRequest.GET_FEATURES, 0x1, bytes(8)).decoded()
    assert "GET_FEATURES" in str(info.value) and "expected 0 bytes" in str(info.value)
    with pytest.raises(p.MalformedPayload) as info:
        p.Message(p.FrontendRequest.GET_VRING_BASE, 0x5, bytes(4)).decoded()
    assert info.value.request_name == "GET_VRING_BASE reply"
    with pytest.raises(p.UnknownRequest):
        p.Message(46, 0x1, b"").decoded()
    with pytest.raises(p.UnknownRequest):
        p.Message(11, 0x1, b"").decoded(channel="backend")


def test_tables_complete() -> None:
    assert set(p.REQUEST_PAYLOAD) == set(p.FrontendRequest)
    assert set(p.FD_EXPECTATIONS) == set(p.FrontendRequest)
    assert set(p.BACKEND_REQUEST_PAYLOAD) == set(p.BackendRequest)
    assert set(p.BACKEND_FD_EXPECTATIONS) == set(p.BackendRequest)
    assert set(p.REPLY_PAYLOAD) <= set(p.FrontendRequest)
    assert p.REQUEST_PAYLOAD[p.FrontendRequest.SET_LOG_BASE] is p.LogBase
    assert p.REQUEST_PAYLOAD[p.FrontendRequest.ADD_MEM_REG] is p.SingleMemoryRegion
    assert p.REPLY_PAYLOAD[p.FrontendRequest.GET_INFLIGHT_FD] is p.Inflight
    assert p.REPLY_PAYLOAD[p.FrontendRequest.GET_SHMEM_CONFIG] is p.ShmemConfig


def test_has_defined_reply() -> None:
    f = p.FrontendRequest
    log_shmfd = 1 << p.ProtocolFeature.LOG_SHMFD
    for req in (f.GET_FEATURES, f.GET_PROTOCOL_FEATURES, f.GET_VRING_BASE, f.GET_QUEUE_NUM,
                f.GET_MAX_MEM_SLOTS, f.GET_CONFIG, f.GET_INFLIGHT_FD, f.GET_STATUS):  # fmt: skip
        assert p.has_defined_reply(req, 0), req
    for req in (f.SET_FEATURES, f.SET_OWNER, f.SET_VRING_NUM, f.SET_VRING_BASE, f.SET_VRING_KICK,
                f.SET_VRING_ENABLE, f.SET_INFLIGHT_FD, f.ADD_MEM_REG, f.SET_STATUS,
                f.SET_BACKEND_REQ_FD, f.SET_MEM_TABLE):  # fmt: skip
        assert not p.has_defined_reply(req, 0xFFFFFF), req
    assert not p.has_defined_reply(f.SET_LOG_BASE, 0)
    assert p.has_defined_reply(f.SET_LOG_BASE, log_shmfd)
    assert p.has_defined_reply(f.SET_MEM_TABLE, 0, postcopy_listening=True)
    assert not p.has_defined_reply(99, 0)
    reply_ack = 1 << p.ProtocolFeature.REPLY_ACK
    assert p.expects_ack(f.SET_VRING_KICK, 0x9, reply_ack)
    assert not p.expects_ack(f.SET_VRING_KICK, 0x1, reply_ack)
    assert not p.expects_ack(f.SET_VRING_KICK, 0x9, 0)
    assert not p.expects_ack(f.GET_FEATURES, 0x9, reply_ack)


def test_fd_expectations() -> None:
    f = p.FrontendRequest
    rule = p.FD_EXPECTATIONS
    assert p.expected_fd_count(rule[f.SET_VRING_CALL], p.U64(0).encode()) == (1, 1)
    assert p.expected_fd_count(rule[f.SET_VRING_CALL], p.U64(0x100).encode()) == (0, 0)
    table = p.MemoryTable((p.MemoryRegion(0, 1, 2, 3),) * 3).encode()
    assert p.expected_fd_count(rule[f.SET_MEM_TABLE], table) == (3, 3)
    assert p.expected_fd_count(rule[f.ADD_MEM_REG], bytes(40)) == (1, 1)
    assert p.expected_fd_count(rule[f.REM_MEM_REG], bytes(40)) == (0, 1)
    assert p.expected_fd_count(rule[f.SET_VRING_NUM], bytes(8)) == (0, 0)
    reply = p.REPLY_FD_EXPECTATIONS[f.GET_INFLIGHT_FD]
    assert p.expected_fd_count(reply, p.Inflight(0, 0, 1, 128).encode()) == (0, 0)
    assert p.expected_fd_count(reply, p.Inflight(4096, 0, 1, 128).encode()) == (1, 1)


def test_parser_byte_by_byte_and_fds() -> None:
    stream = (
        p.encode_request(p.FrontendRequest.SET_VRING_CALL, p.U64(0), need_reply=True)
        + p.encode_request(p.FrontendRequest.SET_OWNER)
        + p.encode_request(p.FrontendRequest.SET_VRING_NUM, p.VringState(0, 128))
    )
    parser = p.MessageParser()
    out: list[p.Message] = []
    for i, byte in enumerate(stream):
        parser.feed(bytes([byte]), [42] if i == 0 else [])
        while (m := parser.next_message()) is not None:
            out.append(m)
    assert [m.request for m in out] == [13, 3, 8]
    assert out[0].fds == (42,) and out[1].fds == () and out[2].fds == ()
    assert out[2].decoded() == p.VringState(0, 128)
    assert parser.pending_bytes == 0


def test_parser_fds_belong_to_last_message_starting_in_chunk() -> None:
    first = p.encode_request(p.FrontendRequest.SET_VRING_NUM, p.VringState(0, 8))
    second = p.encode_request(p.FrontendRequest.SET_VRING_KICK, p.U64(0), need_reply=True)
    parser = p.MessageParser()
    # Linux may return the tail of a message without fds together with the following
    # fd-carrying message in one recvmsg; the fds belong to the second message.
    parser.feed(first[:5])
    parser.feed(first[5:] + second, [9])
    a = parser.next_message()
    b = parser.next_message()
    assert a is not None and b is not None
    assert (a.fds, b.fds) == ((), (9,))
    assert parser.next_message() is None


def test_parser_incomplete_and_pending() -> None:
    parser = p.MessageParser()
    data = p.encode_request(p.FrontendRequest.SET_INFLIGHT_FD, p.Inflight(4096, 0, 1, 128))
    parser.feed(data[:20], [3])
    assert parser.next_message() is None
    assert parser.pending_bytes == 20
    assert parser.pending_fds == (3,)
    assert parser.take_pending_fds() == (3,)
    assert len(parser.pending_fds) == 0


def test_parser_rejects_bad_headers() -> None:
    parser = p.MessageParser()
    parser.feed(p.Header(46, 1, 0).encode())
    with pytest.raises(p.UnknownRequest) as info:
        parser.next_message()
    assert info.value.seen == 46 and "1..45" in str(info.value)

    parser = p.MessageParser()
    parser.feed(p.Header(8, 0x2, 8).encode())
    with pytest.raises(p.MalformedMessage, match="version") as vinfo:
        parser.next_message()
    assert vinfo.value.request_name == "SET_VRING_NUM"

    parser = p.MessageParser()
    parser.feed(p.Header(24, 0x1, 2057).encode())
    with pytest.raises(p.MalformedMessage) as sinfo:
        parser.next_message()
    assert sinfo.value.seen == "2057 bytes" and "2056" in str(sinfo.value)

    backend = p.MessageParser(channel="backend")
    backend.feed(p.Header(11, 0x1, 0).encode())
    with pytest.raises(p.UnknownRequest, match=r"1\.\.10"):
        backend.next_message()


@given(st.lists(st.tuples(st.sampled_from(list(p.FrontendRequest)), st.binary(max_size=64)),
                max_size=8), st.lists(st.integers(1, 40), min_size=1, max_size=20))  # fmt: skip
def test_parser_any_split(messages: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(p.Message(r, 1, data).encode() for r, data in messages)
    parser = p.MessageParser()
    out: list[p.Message] = []
    pos = 0
    i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        parser.feed(stream[pos : pos + step])
        pos += step
        i += 1
        while (m := parser.next_message()) is not None:
            out.append(m)
    assert [(m.request, m.payload) for m in out] == [(int(r), d) for r, d in messages]


# ------------------------------------------------------------------------------------------
# The real QEMU 11.1.3 trace


def _trace_records() -> list[dict[str, Any]]:
    if not TRACE.exists():
        pytest.skip(f"QEMU trace not available at {TRACE}")
    return [r for r in map(json.loads, TRACE.read_text().splitlines()) if "req" in r]


def test_trace_every_message_decodes() -> None:
    records = _trace_records()
    assert len(records) >= 30
    for rec in records:
        payload = bytes.fromhex(rec["hex"])
        assert len(payload) == rec["size"], rec
        msg = p.Message(rec["req"], int(rec["flags"], 16), payload)
        assert msg.name() == rec["name"]
        assert msg.is_reply == (rec["dir"] == "be->fe") == rec["reply"]
        assert msg.need_reply == rec["need_reply"]
        if msg.is_reply:
            assert msg.flags == p.REPLY_FLAGS
        decoded = msg.decoded()
        # re-encoding gives the bytes QEMU / the back-end sent
        assert (decoded.encode() if decoded is not None else b"") == payload, rec  # type: ignore[attr-defined]
        # fd counts QEMU sent match the table
        if not msg.is_reply:
            rule = p.FD_EXPECTATIONS[p.FrontendRequest(msg.request)]
            lo, hi = p.expected_fd_count(rule, payload)
            assert lo <= rec["nfds"] <= hi, rec
        # replies come exactly where the tables say (REPLY_ACK 0x8f2b negotiated)
        if msg.is_reply:
            expected_reply = p.has_defined_reply(msg.request, 0x8F2B) or p.expects_ack(
                msg.request, p.VERSION | p.FLAG_NEED_REPLY, 0x8F2B
            )
            assert expected_reply, rec


def test_trace_values() -> None:
    by_name: dict[tuple[str, str], list[Any]] = {}
    for rec in _trace_records():
        msg = p.Message(rec["req"], int(rec["flags"], 16), bytes.fromhex(rec["hex"]))
        by_name.setdefault((rec["dir"], rec["name"]), []).append(msg.decoded())
    assert by_name[("be->fe", "GET_FEATURES")][0] == p.U64(0x175007E44)
    assert by_name[("be->fe", "GET_PROTOCOL_FEATURES")][0] == p.U64(0x8F2B)
    assert by_name[("be->fe", "GET_MAX_MEM_SLOTS")][0] == p.U64(509)
    assert by_name[("fe->be", "SET_FEATURES")][0] == p.U64(0x170006E44)
    add = by_name[("fe->be", "ADD_MEM_REG")][0]
    assert isinstance(add, p.SingleMemoryRegion)
    assert (add.region.guest_phys_addr, add.region.memory_size) == (0, 0x10000000)
    assert by_name[("fe->be", "SET_VRING_NUM")][0] == p.VringState(0, 128)
    addr = by_name[("fe->be", "SET_VRING_ADDR")][0]
    assert isinstance(addr, p.VringAddr) and addr.flags == 0
    assert addr.avail_user_addr - addr.desc_user_addr == 128 * 16
    cfg_req, cfg_reply = by_name[("fe->be", "GET_CONFIG")][0], by_name[("be->fe", "GET_CONFIG")][0]
    assert isinstance(cfg_req, p.Config) and (cfg_req.offset, cfg_req.size, cfg_req.flags) == (0, 57, 0)
    assert isinstance(cfg_reply, p.Config) and cfg_reply.size == 57
    assert int.from_bytes(cfg_reply.data[:8], "little") == 131072  # capacity in sectors
    assert by_name[("fe->be", "SET_VRING_ENABLE")] == [p.VringState(0, 1), p.VringState(0, 0)]
    assert by_name[("be->fe", "GET_VRING_BASE")] == [p.VringState(0, 129)]
    kick = by_name[("fe->be", "SET_VRING_KICK")][0]
    assert isinstance(kick, p.U64) and (kick.vring_index, kick.nofd) == (0, False)


def test_trace_as_stream_through_parser() -> None:
    records = _trace_records()
    fe = [r for r in records if r["dir"] == "fe->be"]
    parser = p.MessageParser()
    for rec in fe:
        parser.feed(
            p.Message(rec["req"], int(rec["flags"], 16), bytes.fromhex(rec["hex"])).encode(),
            list(range(100, 100 + rec["nfds"])),
        )
    got = []
    while (m := parser.next_message()) is not None:
        got.append((m.name(), len(m.payload), len(m.fds)))
    assert got == [(r["name"], r["size"], r["nfds"]) for r in fe]


# ------------------------------------------------------------------------------------------
# Robustness: arbitrary bytes only ever raise the codec's own errors


@given(st.binary(max_size=300), st.integers(1, 64))
def test_parser_arbitrary_bytes_raise_only_protocol_errors(data: bytes, step: int) -> None:
    parser = p.MessageParser()
    try:
        for i in range(0, len(data), step):
            parser.feed(data[i : i + step])
            while parser.next_message() is not None:
                pass
    except p.MalformedMessage:
        pass


@given(
    st.sampled_from(list(p.FrontendRequest)),
    st.sampled_from([0x1, 0x5, 0x9]),
    st.binary(max_size=300),
)
def test_decoded_arbitrary_payload_raises_only_malformed(
    request: p.FrontendRequest, flags: int, payload: bytes
) -> None:
    try:
        p.Message(request, flags, payload).decoded()
    except p.MalformedPayload as exc:
        assert exc.request_name is not None and exc.request_name.startswith(request.name)
