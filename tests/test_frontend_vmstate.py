"""QEMU migration stream: the in-flight subsection codec, vmdesc, -dump-vmstate and the stream reader."""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vhost_conformance.frontend.inflight import build_split_region, parse_region
from vhost_conformance.frontend.vmstate import (
    INFLIGHT_SUBSECTION,
    InflightState,
    VMStateError,
    compare_dump_vmstate,
    compare_inflight_vmdesc,
    decode_inflight_subsection,
    encode_inflight_subsection,
    extract_device_section,
    find_inflight_subsection,
    inflight_subsection_header,
    inflight_vmdesc,
    read_stream,
    replace_inflight_buffer,
    section_summary,
    vmdesc_size,
)

DATA = pathlib.Path(__file__).resolve().parent / "data"

# SPEC-DIGEST 7.3, the stream bytes of the subsection up to the region.
WORKED_PREFIX = bytes.fromhex(
    "05 17"
    "76 68 6f 73 74 2d 75 73 65 72 2d 62 6c 6b 2f 69 6e 66 6c 69 67 68 74"
    "00 00 00 01"
    "00 00 00 00 00 00 10 80"
    "00 80"
    "05 1c"
    "76 68 6f 73 74 2d 69 6e 66 6c 69 67 68 74 2d 72 65 67 69 6f 6e 2f 62 75 66 66 65 72"
    "00 00 00 00"
)
# SPEC-DIGEST 7.3, the matching vmdesc JSON fragment, verbatim.
WORKED_VMDESC = (
    '{"vmsd_name":"vhost-user-blk/inflight","version":1,"fields":[{"name":"inflight","type":"struct","struct":'
    '{"vmsd_name":"vhost-inflight-region","version":0,"fields":[{"name":"size","type":"uint64","size":8},'
    '{"name":"queue_size","type":"uint16","size":2}],"subsections":[{"vmsd_name":"vhost-inflight-region/buffer",'
    '"version":0,"fields":[{"name":"addr","type":"buffer","size":4224}]}]},"size":4268}]}'
)


def worked_region() -> bytes:
    return build_split_region(
        128, 2, entries={0: {5: (1, 7, 0), 9: (1, 8, 0)}}, used_idx={0: 40}, last_batch_head={0: 4}
    )


# ----------------------------------------------------------------------------- subsection codec


def test_worked_example_is_byte_exact() -> None:
    region = worked_region()
    data = encode_inflight_subsection(region, queue_size=128)
    assert len(data) == 4297
    assert data[: len(WORKED_PREFIX)] == WORKED_PREFIX
    assert len(WORKED_PREFIX) == 1 + 1 + 23 + 4 + 8 + 2 + 1 + 1 + 28 + 4
    assert data[len(WORKED_PREFIX) :] == region
    assert data[len(WORKED_PREFIX) : len(WORKED_PREFIX) + 16] == bytes.fromhex(
        "0000000000000000 0100 8000 0400 2800"
    )
    state, end = decode_inflight_subsection(data)
    assert state == InflightState(4224, 128, region) and end == 4297
    parsed = parse_region(state.buffer, num_queues=2, queue_size=state.queue_size, packed=False)
    assert parsed.queues[0].inflight_heads() == [5, 9]


def test_header_bytes() -> None:
    assert inflight_subsection_header() == WORKED_PREFIX[:29]


def test_worked_example_vmdesc_fragment() -> None:
    assert inflight_vmdesc(4224) == json.loads(WORKED_VMDESC)
    # key order as QEMU writes it
    assert json.dumps(inflight_vmdesc(4224), separators=(",", ":")) == WORKED_VMDESC
    assert vmdesc_size(inflight_vmdesc(4224)) == 4268
    assert compare_inflight_vmdesc(json.loads(WORKED_VMDESC), 4224) == []


def test_vmdesc_comparer_reports_differences() -> None:
    seen = json.loads(WORKED_VMDESC)
    seen["version"] = 2
    seen["fields"][0]["struct"]["subsections"] = []
    seen["fields"][0]["extra"] = True
    diffs = compare_inflight_vmdesc(seen, 4224)
    assert "subsection.version: expected 1, seen 2" in diffs
    assert "subsection.fields[0].struct.subsections: expected 1 item(s), seen 0" in diffs
    assert "subsection.fields[0].extra: unexpected key" in diffs
    assert compare_inflight_vmdesc(json.loads(WORKED_VMDESC), 4096) != []


@settings(max_examples=80, deadline=None)
@given(
    buffer=st.binary(max_size=5000), queue_size=st.integers(0, 0xFFFF), lead=st.binary(max_size=8)
)
def test_round_trip(buffer: bytes, queue_size: int, lead: bytes) -> None:
    data = lead + encode_inflight_subsection(buffer, queue_size=queue_size) + b"\x7e"
    state, end = decode_inflight_subsection(data, len(lead))
    assert state == InflightState(len(buffer), queue_size, buffer)
    assert end == len(data) - 1
    assert vmdesc_size(inflight_vmdesc(len(buffer))) + 29 == end - len(lead)


def test_truncated_subsection_raises_at_every_position() -> None:
    data = encode_inflight_subsection(bytes(range(64)), queue_size=4)
    for cut in range(len(data)):
        with pytest.raises(VMStateError) as info:
            decode_inflight_subsection(data[:cut])
        assert 0 <= info.value.offset <= cut
        assert "truncated" in info.value.reason or "has not been loaded" in info.value.reason


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, 0x04, "expected subsection marker 0x05, seen 0x04"),
        (2, ord("w"), "expected subsection 'vhost-user-blk/inflight'"),
        (28, 2, "expected version_id 1, seen 2"),
        (39, 0x7E, "inflight buffer subsection has not been loaded"),
        (41, ord("x"), "expected subsection 'vhost-inflight-region/buffer'"),
        (72, 1, "expected version_id 0, seen 1"),
    ],
)
def test_bad_subsection_bytes_name_the_byte(offset: int, value: int, message: str) -> None:
    data = bytearray(encode_inflight_subsection(bytes(8), queue_size=4))
    data[offset] = value
    with pytest.raises(VMStateError, match=message) as info:
        decode_inflight_subsection(bytes(data))
    assert info.value.offset <= offset
    assert str(info.value).startswith(f"byte {info.value.offset} ")


def test_size_larger_than_the_data() -> None:
    data = bytearray(encode_inflight_subsection(bytes(8), queue_size=4))
    struct.pack_into(">Q", data, 29, 1 << 40)
    with pytest.raises(VMStateError, match=r"addr \(1099511627776 bytes from size\)"):
        decode_inflight_subsection(bytes(data))


# ----------------------------------------------------------------------------- -dump-vmstate


def load_dump() -> dict[str, Any]:
    return dict(json.loads((DATA / "dump-vmstate-vhost-user-blk.handmade.json").read_text()))


def test_dump_vmstate_fixture_matches() -> None:
    assert compare_dump_vmstate(load_dump()) == []


def test_dump_vmstate_differences_are_named() -> None:
    dump = load_dump()
    sub = dump["vhost-user-blk"]["Description"]["Subsections"][0]
    sub["version_id"] = 2
    region = sub["Fields"][0]["Description"]
    region["Fields"][1]["size"] = 4
    del region["Subsections"]
    diffs = compare_dump_vmstate(dump)
    assert any("vhost-user-blk/inflight.version_id: expected 1, seen 2" in d for d in diffs)
    assert any("queue_size.size: expected 2, seen 4" in d for d in diffs)
    assert any("vhost-inflight-region/buffer: missing" in d for d in diffs)
    missing = load_dump()
    missing["vhost-user-blk"]["Description"]["Subsections"] = []
    assert compare_dump_vmstate(missing) == [
        f"vhost-user-blk/Subsections/{INFLIGHT_SUBSECTION}: missing"
    ]
    assert compare_dump_vmstate({}) == ["vhost-user-blk: no such device in the dump"]


def test_real_dump_vmstate_if_captured() -> None:
    real = sorted(DATA.glob("dump-vmstate-qemu-11*.json"))
    if not real:
        pytest.skip("no real `qemu-system-x86_64 -dump-vmstate` output in tests/data yet")
    for path in real:
        assert compare_dump_vmstate(json.loads(path.read_text())) == [], path.name


# ----------------------------------------------------------------------------- synthetic streams

PAGE = 4096


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def counted(s: str) -> bytes:
    return bytes([len(s)]) + s.encode()


class StreamBuilder:
    """Writes a stream the way migration/savevm.c and migration/ram.c lay it out."""

    def __init__(self, *, footers: bool = True, capabilities: tuple[str, ...] = ()) -> None:
        self.footers = footers
        self.parts: list[bytes] = [b"QEVM", be32(3)]
        self.devices: list[dict[str, Any]] = []
        machine = "pc-q35-11.1"
        config = b"\x07" + be32(len(machine)) + machine.encode()
        config_desc: dict[str, Any] = {
            "vmsd_name": "configuration",
            "version": 1,
            "fields": [
                {"name": "len", "type": "uint32", "size": 4},
                {"name": "name", "type": "buffer", "size": len(machine)},
            ],
        }
        if capabilities:
            caps = b"".join(counted(c) for c in capabilities)
            config += (
                b"\x05"
                + counted("configuration/capabilities")
                + be32(1)
                + be32(len(capabilities))
                + caps
            )
        self.parts.append(config)
        self.config_desc = config_desc

    def footer(self, sid: int) -> bytes:
        return b"\x7e" + be32(sid) if self.footers else b""

    def ram_start(self, sid: int, blocks: dict[str, int]) -> None:
        body = be64(sum(blocks.values()) | 0x04)
        for name, length in blocks.items():
            body += counted(name) + be64(length)
        body += be64(0x10)
        self.parts.append(
            b"\x01" + be32(sid) + counted("ram") + be32(0) + be32(4) + body + self.footer(sid)
        )

    def ram_chunk(self, kind: int, sid: int, records: bytes) -> None:
        self.parts.append(bytes([kind]) + be32(sid) + records + be64(0x10) + self.footer(sid))

    def command(self, cmd: int, payload: bytes = b"") -> None:
        self.parts.append(b"\x08" + struct.pack(">HH", cmd, len(payload)) + payload)

    def device(
        self, sid: int, idstr: str, body: bytes, desc: dict[str, Any], version: int = 1
    ) -> None:
        self.parts.append(
            b"\x04" + be32(sid) + counted(idstr) + be32(0) + be32(version) + body + self.footer(sid)
        )
        self.devices.append({"name": idstr, "instance_id": 0, **desc})

    def finish(self, *, vmdesc: bool = True) -> bytes:
        out = b"".join(self.parts) + b"\x00"
        if vmdesc:
            text = json.dumps(
                {"configuration": self.config_desc, "page_size": PAGE, "devices": self.devices}
            )
            out += b"\x06" + be32(len(text)) + text.encode()
        return out


def page(block: str | None, addr: int, fill: int) -> bytes:
    flags = 0x08 | (0x20 if block is None else 0)
    return be64(addr | flags) + (counted(block) if block else b"") + bytes([fill]) * PAGE


def zero(block: str | None, addr: int) -> bytes:
    flags = 0x02 | (0x20 if block is None else 0)
    return be64(addr | flags) + (counted(block) if block else b"") + b"\x00"


BLK = "0000:00:04.0/vhost-user-blk"


def virtio_opaque(sid: int) -> bytes:
    # Opaque virtio state, with decoys: a footer pattern not followed by a section, and a copy
    # of the subsection header whose "size" runs past the data.
    return (
        bytes(range(40))
        + b"\x7e"
        + be32(sid)
        + b"\x99"
        + inflight_subsection_header()
        + be64(1 << 50)
        + bytes(30)
        + b"\x05\x0evirtio/started\x00\x00\x00\x01\x01"
    )


def build_stream(
    region: bytes,
    queue_size: int,
    *,
    footers: bool = True,
    vmdesc: bool = True,
    capabilities: tuple[str, ...] = (),
    idstr: str = BLK,
) -> tuple[bytes, bytes]:
    """A whole synthetic stream and the vhost-user-blk payload in it."""
    b = StreamBuilder(footers=footers, capabilities=capabilities)
    b.ram_start(0, {"pc.ram": 4 * PAGE, "/rom@etc/acpi/tables": PAGE})
    records = (
        page("pc.ram", 0, 0xAA)
        + page(None, PAGE, 0x7E)
        + zero(None, 2 * PAGE)
        + be64(3 * PAGE | 0x40 | 0x20)
        + b"\x01"
        + struct.pack(">H", 5)
        + b"xbzrl"
        + be64(0x200)
        + page("/rom@etc/acpi/tables", 0, 0x05)
    )
    b.ram_chunk(0x02, 0, records)
    b.command(0x0B)
    b.ram_chunk(0x03, 0, zero("pc.ram", 3 * PAGE))
    b.device(
        1,
        "timer",
        be64(123) + be64(456) + bytes(16),
        {
            "vmsd_name": "timer",
            "version": 2,
            "fields": [
                {"name": "cpu_ticks_offset", "type": "int64", "size": 8},
                {"name": "dummy", "type": "int64", "size": 8},
                {"name": "regs", "array_len": 4, "type": "uint32", "size": 4},
            ],
        },
    )
    virtio = virtio_opaque(2)
    payload = virtio + encode_inflight_subsection(region, queue_size=queue_size)
    b.device(
        2,
        idstr,
        payload,
        {
            "vmsd_name": "vhost-user-blk",
            "version": 1,
            "fields": [{"name": "virtio", "type": "virtio", "size": len(virtio)}],
            "subsections": [inflight_vmdesc(len(region))],
        },
    )
    b.device(
        3,
        "0000:00:1f.0/ICH9LPC",
        b"\x01\x02\x03",
        {
            "vmsd_name": "ICH9LPC",
            "version": 1,
            "fields": [{"name": "d", "type": "buffer", "size": 3}],
        },
    )
    return b.finish(vmdesc=vmdesc), payload


def test_synthetic_stream_is_walked() -> None:
    region = worked_region()
    data, payload = build_stream(region, 128)
    stream = read_stream(data)
    assert stream.machine == "pc-q35-11.1" and stream.page_size == PAGE
    kinds = [(s.kind_name, s.idstr, s.located_by) for s in stream.sections]
    assert kinds == [
        ("SECTION_START", "ram", "parsed"),
        ("SECTION_PART", "ram", "parsed"),
        ("SECTION_END", "ram", "parsed"),
        ("SECTION_FULL", "timer", "vmdesc"),
        ("SECTION_FULL", BLK, "vmdesc"),
        ("SECTION_FULL", "0000:00:1f.0/ICH9LPC", "vmdesc"),
    ]
    start, part, end = stream.sections[:3]
    assert start.ram is not None and start.ram.blocks == {
        "pc.ram": 4 * PAGE,
        "/rom@etc/acpi/tables": PAGE,
    }
    assert part.ram is not None and (
        part.ram.pages,
        part.ram.zero_pages,
        part.ram.xbzrle_pages,
    ) == (3, 1, 1)
    assert part.ram.multifd_flushes == 1
    assert end.ram is not None and end.ram.zero_pages == 1
    assert all(s.has_footer for s in stream.sections)
    assert [c[1] for c in stream.commands] == [0x0B]
    blk = stream.find_device("vhost-user-blk")
    assert data[blk.body_start : blk.body_end] == payload
    assert stream.vmdesc is not None and stream.vmdesc_offset == stream.eof_offset + 1
    state, section, offset = find_inflight_subsection(stream)
    assert section is blk and state == InflightState(4224, 128, region)
    assert offset == blk.body_end - 4297
    assert compare_inflight_vmdesc(stream.vmdesc_device(blk)["subsections"][0], state.size) == []  # type: ignore[index]


def test_stream_without_vmdesc_uses_footers_and_header_search() -> None:
    region = worked_region()
    data, payload = build_stream(region, 128, vmdesc=False)
    stream = read_stream(data)
    assert stream.vmdesc is None
    assert [s.located_by for s in stream.sections[3:]] == ["footer-scan"] * 3
    blk = stream.find_device(BLK)
    assert data[blk.body_start : blk.body_end] == payload
    state, _, offset = find_inflight_subsection(stream)
    assert state.buffer == region and offset == blk.body_end - 4297


def test_stream_without_footers_needs_the_vmdesc() -> None:
    data, payload = build_stream(worked_region(), 128, footers=False)
    stream = read_stream(data)
    assert not any(s.has_footer for s in stream.sections)
    blk = stream.find_device("vhost-user-blk")
    assert data[blk.body_start : blk.body_end] == payload
    bare, _ = build_stream(worked_region(), 128, footers=False, vmdesc=False)
    with pytest.raises(VMStateError, match="cannot find the end of section 1"):
        read_stream(bare)


def test_x_ignore_shared_adds_block_addresses() -> None:
    b = StreamBuilder(capabilities=("x-ignore-shared",))
    b.parts.append(
        b"\x01"
        + be32(0)
        + counted("ram")
        + be32(0)
        + be32(4)
        + be64(PAGE | 0x04)
        + counted("pc.ram")
        + be64(PAGE)
        + be64(0x1000_0000)
        + be64(0x10)
        + b.footer(0)
    )
    stream = read_stream(b.finish())
    assert stream.capabilities == ["x-ignore-shared"]
    assert stream.sections[0].ram is not None and stream.sections[0].ram.blocks == {"pc.ram": PAGE}


def test_no_inflight_subsection_is_an_error() -> None:
    b = StreamBuilder()
    b.device(
        0,
        BLK,
        bytes(10),
        {
            "vmsd_name": "vhost-user-blk",
            "version": 1,
            "fields": [{"name": "virtio", "type": "virtio", "size": 10}],
        },
    )
    stream = read_stream(b.finish())
    with pytest.raises(
        VMStateError, match=r"no 'vhost-user-blk/inflight' subsection in .* feature 20"
    ):
        find_inflight_subsection(stream)
    with pytest.raises(VMStateError, match="no 'vhost-user-blk' device section"):
        find_inflight_subsection(read_stream(StreamBuilder().finish()))


def small_stream() -> bytes:
    region = build_split_region(4, 1, entries={0: {2: (1, 1, 0)}})
    data, _ = build_stream(region, 4)
    return extract_device_section(data, "vhost-user-blk")


def test_extract_device_section_makes_a_small_valid_stream() -> None:
    region = worked_region()
    data, payload = build_stream(region, 128)
    small = extract_device_section(data, "vhost-user-blk")
    assert len(small) < len(data) - 3 * PAGE
    stream = read_stream(small)
    assert [s.idstr for s in stream.sections] == [BLK]
    assert stream.vmdesc is not None and [d["name"] for d in stream.vmdesc["devices"]] == [BLK]
    assert b'", "' in small[stream.vmdesc_offset or 0 :]  # QEMU's separators (QEMU-TRACES 10)
    state, section, _ = find_inflight_subsection(stream)
    assert state.buffer == region and small[section.body_start : section.body_end] == payload
    with pytest.raises(VMStateError, match="no device section"):
        extract_device_section(data, "virtio-net")


def test_truncation_at_every_position_of_a_small_stream() -> None:
    data = small_stream()
    eof = read_stream(data).eof_offset
    for cut in range(len(data)):
        try:
            stream = read_stream(data[:cut])
        except VMStateError as err:
            assert 0 <= err.offset <= cut, (cut, str(err))
            continue
        # the only valid prefix: everything up to EOF, without the optional description
        assert cut == eof + 1 and stream.vmdesc is None, cut


@pytest.mark.parametrize(
    ("mutate", "message", "offset"),
    [
        (lambda d: b"QEVN" + d[4:], "file magic", 0),
        (lambda d: d[:4] + be32(2) + d[8:], "file version: expected 3, seen 2", 4),
        (lambda d: d + b"junk", "after EOF", None),
    ],
)
def test_corrupt_streams(mutate: Any, message: str, offset: int | None) -> None:
    with pytest.raises(VMStateError, match=message) as info:
        read_stream(mutate(small_stream()))
    if offset is not None:
        assert info.value.offset == offset


def test_footer_id_mismatch_and_unknown_section_type() -> None:
    b = StreamBuilder()
    b.parts.append(
        b"\x01"
        + be32(0)
        + counted("ram")
        + be32(0)
        + be32(4)
        + be64(0x04)
        + be64(0x10)
        + b"\x7e"
        + be32(9)
    )
    with pytest.raises(VMStateError, match="section footer: expected section id 0, seen 9"):
        read_stream(b.finish())
    b = StreamBuilder()
    b.parts.append(b"\x09")
    data = b.finish()
    with pytest.raises(VMStateError, match="unknown section type 0x09") as info:
        read_stream(data)
    assert data[info.value.offset] == 0x09
    b = StreamBuilder()
    b.parts.append(b"\x02" + be32(5))
    with pytest.raises(VMStateError, match="SECTION_PART for unknown section id 5"):
        read_stream(b.finish())


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (be64(0x08 | 0x20) + bytes(PAGE), "CONTINUE before any block idstr"),
        (be64(0x08) + counted("nope") + bytes(PAGE), "unknown block 'nope'"),
        (be64(0x400), "unknown RAM flags 0x400"),
        (be64(0x80), "RAM_SAVE_FLAG_HOOK"),
        (be64(0x40) + counted("pc.ram") + b"\x02", "XBZRLE encoding flag: expected 1, seen 2"),
    ],
)
def test_bad_ram_records(records: bytes, message: str) -> None:
    b = StreamBuilder()
    b.ram_start(0, {"pc.ram": PAGE})
    b.ram_chunk(0x02, 0, records)
    with pytest.raises(VMStateError, match=message):
        read_stream(b.finish())


def test_vmdesc_size_counts_arrays_and_nested_subsections() -> None:
    entry = {
        "fields": [
            {"name": "a", "type": "uint8", "size": 1},
            {"name": "r", "array_len": 3, "type": "uint16", "size": 2},
        ],
        "subsections": [
            {
                "vmsd_name": "dev/sub",
                "version": 1,
                "fields": [{"name": "x", "type": "uint32", "size": 4}],
            }
        ],
    }
    assert vmdesc_size(entry) == 1 + 6 + (2 + 7 + 4 + 4)


def test_inflight_device_found_by_vmsd_name_even_with_another_idstr() -> None:
    region = build_split_region(4, 1)
    data, _ = build_stream(region, 4, idstr="0000:00:04.0/renamed-device")
    stream = read_stream(data)
    state, section, _ = find_inflight_subsection(stream)
    assert section.idstr == "0000:00:04.0/renamed-device"
    assert state.size == len(region) and state.queue_size == 4


def test_real_qemu_11_1_3_device_section_without_inflight() -> None:
    # tests/data/README.md: QEMU 11.1.3 against qemu-storage-daemon (no bit 20 negotiated).
    data = (DATA / "qemu-11.1.3-q35-vhost-user-blk-qsd.stream").read_bytes()
    stream = read_stream(data)
    assert stream.machine == "pc-q35-11.1" and stream.page_size == 4096
    assert stream.vmdesc is not None and list(stream.vmdesc) == [
        "configuration",
        "page_size",
        "devices",
    ]
    (blk,) = stream.sections
    assert blk.idstr == "0000:00:01.0/vhost-user-blk" and blk.version_id == 1
    assert blk.located_by == "vmdesc" and blk.has_footer
    entry = stream.vmdesc_device(blk)
    assert entry is not None and entry["vmsd_name"] == "vhost-user-blk"
    assert [f["name"] for f in entry["fields"]] == ["virtio"] and "subsections" not in entry
    # QEMU-TRACES correction 10: the device state ends with the "virtio/started" subsection,
    # which is where vhost-user-blk/inflight would follow.
    tail = data[blk.body_end - 21 : blk.body_end]
    assert tail == b"\x05\x0evirtio/started" + be32(1) + b"\x01"
    with pytest.raises(VMStateError, match="feature 20") as info:
        find_inflight_subsection(stream)
    assert info.value.offset == blk.body_start
    # the same boundaries without the JSON description (footer scan)
    bare = read_stream(data[: stream.eof_offset + 1])
    assert (bare.sections[0].body_end, bare.sections[0].located_by) == (blk.body_end, "footer-scan")
    # extracting again is idempotent
    assert extract_device_section(data, "vhost-user-blk") == data


def test_real_qemu_11_1_3_inflight_subsection() -> None:
    # tests/data/README.md: QEMU 11.1.3 (inflight-migration=on) + the reference back-end
    # (bits 12 and 20), one request suspended at GET_VRING_BASE.
    data = (DATA / "qemu-11.1.3-q35-vhost-user-blk-reference-inflight.stream").read_bytes()
    stream = read_stream(data)
    state, section, offset = find_inflight_subsection(stream)
    assert (state.size, state.queue_size) == (2112, 128)
    # the subsection directly follows "virtio/started" (QEMU-TRACES 10) and ends the payload
    assert data[offset - 21 : offset] == b"\x05\x0evirtio/started" + be32(1) + b"\x01"
    assert offset + 29 + 10 + 34 + 2112 == section.body_end
    # byte-exact: our encoder writes what QEMU wrote
    assert (
        encode_inflight_subsection(state.buffer, queue_size=128) == data[offset : section.body_end]
    )
    entry = stream.vmdesc_device(section)
    assert entry is not None and entry["fields"] == [
        {"name": "virtio", "type": "virtio", "size": offset - section.body_start}
    ]
    assert entry["subsections"] == [inflight_vmdesc(2112)]
    region = parse_region(state.buffer, num_queues=1, queue_size=state.queue_size, packed=False)
    (queue,) = region.queues
    assert region.stride == 2112
    assert (queue.version, queue.desc_num, queue.used_idx) == (1, 128, 5)
    assert [(e.index, e.counter) for e in queue.inflight_entries()] == [(0, 6)]


def test_truncating_the_real_fixture_raises_with_a_sensible_offset() -> None:
    data = (DATA / "qemu-11.1.3-q35-vhost-user-blk-reference-inflight.stream").read_bytes()
    eof = read_stream(data).eof_offset
    # every cut in the headers, the in-flight subsection, the footer, EOF and the JSON;
    # a sample of cuts in the opaque virtio state
    cuts = {*range(0, 200), *range(eof - 2300, len(data)), *range(200, eof - 2300, 61)}
    for cut in sorted(cuts):
        try:
            stream = read_stream(data[:cut])
        except VMStateError as err:
            assert 0 <= err.offset <= cut, (cut, str(err))
            continue
        assert cut == eof + 1 and stream.vmdesc is None, cut
        state, _, _ = find_inflight_subsection(stream)
        assert state.size == 2112


def test_real_qemu_inflight_stream_if_captured() -> None:
    real = sorted(DATA.glob("qemu-11*-inflight*.stream"))
    if not real:
        pytest.skip(
            "no real QEMU 11.1.3 stream with the vhost-user-blk/inflight subsection in tests/data yet"
        )
    for path in real:
        stream = read_stream(path.read_bytes())
        state, section, _ = find_inflight_subsection(stream)
        entry = stream.vmdesc_device(section)
        assert entry is not None
        subs = [
            s for s in entry.get("subsections", []) if s.get("vmsd_name") == INFLIGHT_SUBSECTION
        ]
        assert len(subs) == 1 and compare_inflight_vmdesc(subs[0], state.size) == [], path.name
        assert state.size == len(state.buffer)


def test_broken_inflight_subsection_in_a_device_is_reported() -> None:
    good = encode_inflight_subsection(bytes(64), queue_size=4)
    broken = good[:39] + b"\x7e" + good[40:]  # the buffer subsection marker replaced
    b = StreamBuilder()
    b.device(
        0,
        BLK,
        bytes(10) + broken,
        {
            "vmsd_name": "vhost-user-blk",
            "version": 1,
            "fields": [{"name": "virtio", "type": "virtio", "size": 10}],
            "subsections": [inflight_vmdesc(64)],
        },
    )
    stream = read_stream(b.finish())
    with pytest.raises(
        VMStateError, match="inflight buffer subsection has not been loaded"
    ) as info:
        find_inflight_subsection(stream)
    assert info.value.offset == stream.sections[0].body_start


def test_replace_inflight_buffer_same_and_other_size() -> None:
    data = (DATA / "qemu-11.1.3-q35-vhost-user-blk-reference-inflight.stream").read_bytes()
    state, _, _ = find_inflight_subsection(read_stream(data))
    # the same size: mark head 3 in flight too (counter 7)
    forged = bytearray(state.buffer)
    struct.pack_into("=B5sHQ", forged, 16 + 3 * 16, 1, bytes(5), 0, 7)
    out = replace_inflight_buffer(data, forged)
    assert len(out) == len(data)
    new_state, _, _ = find_inflight_subsection(read_stream(out))
    region = parse_region(new_state.buffer, num_queues=1, queue_size=128, packed=False)
    assert region.queues[0].inflight_heads() == [0, 3]
    # another size (a 2064-byte stride): payload and JSON description follow
    smaller = build_split_region(128, 1, stride=2064, entries={0: {9: (1, 1, 0)}})
    out = replace_inflight_buffer(data, smaller)
    stream = read_stream(out)
    new_state, section, _ = find_inflight_subsection(stream)
    assert new_state == InflightState(2064, 128, smaller)
    entry = stream.vmdesc_device(section)
    assert entry is not None and entry["subsections"] == [inflight_vmdesc(2064)]
    assert [line.split()[1] for line in section_summary(stream)] == ["SECTION_FULL"]
