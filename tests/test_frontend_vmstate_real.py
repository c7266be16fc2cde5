"""``frontend/vmstate.py`` and ``frontend/inflight.py`` on real QEMU 11.1.3 migration streams
captured by ``scripts/capture-migration-stream`` (tests/data/qemu-11.1.3-captures.md): the
reference back-end suspended a request at GET_VRING_BASE (protocol feature 20), QEMU carried the
region in ``vhost-user-blk/inflight``."""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Any

import pytest
from vhost_conformance.frontend.inflight import parse_region, validate_region
from vhost_conformance.frontend.vmstate import (
    INFLIGHT_SUBSECTION,
    compare_dump_vmstate,
    compare_inflight_vmdesc,
    encode_inflight_subsection,
    extract_device_section,
    find_inflight_subsection,
    inflight_vmdesc,
    read_stream,
    replace_inflight_buffer,
)

DATA = pathlib.Path(__file__).resolve().parent / "data"
PREFIX = "qemu-11.1.3-q35-vhost-user-blk-reference-inflight-"
# name suffix -> (num_queues, packed, region size): what the capture printed (captures.md)
CAPTURES = {
    "2q": (2, False, 4224),
    "1q-packed": (1, True, 4160),
}
DUMP = DATA / "qemu-11.1.3-dump-vmstate-vhost-user-blk.json"


def _load(layout: str) -> bytes:
    path = DATA / f"{PREFIX}{layout}.stream"
    if not path.exists():
        pytest.fail(f"{path.name} missing: run scripts/capture-migration-stream (see captures.md)")
    return path.read_bytes()


@pytest.mark.parametrize("layout", sorted(CAPTURES))
def test_real_stream_subsection_found_and_region_valid(layout: str) -> None:
    num_queues, packed, size = CAPTURES[layout]
    data = _load(layout)
    assert len(data) < 200_000  # the cut-down stream, not the 77 MB original
    stream = read_stream(data)
    assert stream.machine == "pc-q35-11.1"
    (section,) = stream.devices()
    assert section.idstr.endswith("/vhost-user-blk") and section.has_footer
    state, found_in, offset = find_inflight_subsection(stream)
    assert found_in is section
    assert (state.size, state.queue_size, len(state.buffer)) == (size, 128, size)
    # SPEC-DIGEST 7.3: the subsection header as QEMU wrote it
    name = INFLIGHT_SUBSECTION.encode()
    assert data[offset : offset + 2 + len(name) + 4] == (
        bytes([0x05, len(name)]) + name + struct.pack(">I", 1)
    )
    region = parse_region(state.buffer, num_queues=num_queues, queue_size=128, packed=packed)
    assert [str(f) for f in validate_region(region)] == []
    # the tiny guest has one vCPU, so Linux drives queue 0 only: QEMU never starts queue 1
    # (no ring address) and the back-end leaves its header zero ("not initialised", version 0)
    assert [(q.version, q.desc_num) for q in region.queues] == [(1, 128)] + [(0, 0)] * (
        num_queues - 1
    )
    # the capture's check: exactly the request the back-end suspended is marked, on queue 0
    inflight = [q.inflight_heads() for q in region.queues]
    assert len(inflight[0]) == 1 and all(not heads for heads in inflight[1:]), inflight


@pytest.mark.parametrize("layout", sorted(CAPTURES))
def test_real_stream_reencodes_byte_exact(layout: str) -> None:
    data = _load(layout)
    stream = read_stream(data)
    state, section, offset = find_inflight_subsection(stream)
    # the in-flight subsection ends the device payload (QEMU-TRACES correction 10)
    assert encode_inflight_subsection(state.buffer, queue_size=state.queue_size) == bytes(
        data[offset : section.body_end]
    )
    # the whole cut-down stream survives decode + re-encode of its region, and a second cut
    assert replace_inflight_buffer(data, state.buffer) == data
    assert extract_device_section(data, "vhost-user-blk") == data
    # a changed region lands where QEMU put it, nothing else moves
    forged = bytearray(state.buffer)
    forged[-1] ^= 0xFF
    out = replace_inflight_buffer(data, bytes(forged))
    diff = [i for i in range(len(data)) if data[i] != out[i]]
    assert diff == [section.body_end - 1]


@pytest.mark.parametrize("layout", sorted(CAPTURES))
def test_real_stream_vmdesc_matches_our_encoder(layout: str) -> None:
    data = _load(layout)
    stream = read_stream(data)
    state, section, offset = find_inflight_subsection(stream)
    entry = stream.vmdesc_device(section)
    assert entry is not None and entry["vmsd_name"] == "vhost-user-blk"
    subs = [s for s in entry.get("subsections", []) if s.get("vmsd_name") == INFLIGHT_SUBSECTION]
    assert len(subs) == 1
    assert compare_inflight_vmdesc(subs[0], state.size) == []
    assert subs[0] == inflight_vmdesc(state.size)
    # the "virtio" field's size is the distance from the payload start to the subsection
    assert entry["fields"] == [
        {"name": "virtio", "type": "virtio", "size": offset - section.body_start}
    ]


def _tree_from_dump(desc: dict[str, Any]) -> dict[str, Any]:
    """-dump-vmstate form (name, version_id, Fields/Description, Subsections) -> a plain tree."""
    return {
        "name": desc["name"],
        "version": desc["version_id"],
        "fields": [
            (f["field"], _tree_from_dump(f["Description"]) if "Description" in f else None)
            for f in desc.get("Fields", [])
        ],
        "subsections": [_tree_from_dump(s) for s in desc.get("Subsections", [])],
    }


def _tree_from_vmdesc(desc: dict[str, Any]) -> dict[str, Any]:
    """Stream JSON description form (vmsd_name, version, fields/struct, subsections) -> the same."""
    return {
        "name": desc["vmsd_name"],
        "version": desc["version"],
        "fields": [
            (f["name"], _tree_from_vmdesc(f["struct"]) if "struct" in f else None)
            for f in desc.get("fields", [])
        ],
        "subsections": [_tree_from_vmdesc(s) for s in desc.get("subsections", [])],
    }


def test_encoder_structure_matches_real_dump_vmstate() -> None:
    dump = json.loads(DUMP.read_text())
    assert dump["vmschkmachine"] == {"Name": "pc-q35-11.1"}
    assert compare_dump_vmstate(dump) == []
    device = dump["vhost-user-blk"]["Description"]
    (inflight,) = [s for s in device["Subsections"] if s["name"] == INFLIGHT_SUBSECTION]
    # our encoder's description of the subsection has QEMU's names, versions and nesting
    assert _tree_from_vmdesc(inflight_vmdesc(2112)) == _tree_from_dump(inflight)
    # and fixed-size fields have the sizes our encoder writes (BE u64 size, BE u16 queue_size)
    region = inflight["Fields"][0]["Description"]
    assert [(f["field"], f["size"]) for f in region["Fields"]] == [("size", 8), ("queue_size", 2)]
    encoded = encode_inflight_subsection(bytes(16), queue_size=4)
    header = 2 + len(INFLIGHT_SUBSECTION) + 4
    assert encoded[header : header + 10] == struct.pack(">QH", 16, 4)


def test_dump_vmstate_capture_agrees_with_the_earlier_one() -> None:
    # scripts/capture-migration-stream regenerated it; tests/data/README.md lists the first copy
    earlier = DATA / "dump-vmstate-qemu-11.1.3-vhost-user-blk.json"
    if not earlier.exists():
        pytest.skip(f"{earlier.name} not in tests/data")
    assert json.loads(DUMP.read_text()) == json.loads(earlier.read_text())


def test_real_stream_of_a_device_never_started() -> None:
    # QEMU 11.1.3 (capture-migration-stream --before-start): bit 20 negotiated at connect, VM
    # paused by -S, so no region was ever allocated; QEMU still writes the subsection, with size
    # 0 and queue_size 0, and its own destination refuses to load it ("failed to allocate shared
    # memory": tests/test_backend_qemu.py::test_migration_before_the_device_started).
    data = _load("1q-unstarted")
    stream = read_stream(data)
    state, section, offset = find_inflight_subsection(stream)
    assert (state.size, state.queue_size, state.buffer) == (0, 0, b"")
    assert offset + 29 + 10 + 34 == section.body_end  # headers only, no buffer bytes
    assert encode_inflight_subsection(b"", queue_size=0) == bytes(data[offset : section.body_end])
    entry = stream.vmdesc_device(section)
    assert entry is not None
    (sub,) = [s for s in entry["subsections"] if s["vmsd_name"] == INFLIGHT_SUBSECTION]
    assert sub == inflight_vmdesc(0) and compare_inflight_vmdesc(sub, 0) == []
