"""QEMU migration stream: the ``vhost-user-blk/inflight`` subsection, and a reader for whole streams.

The in-flight buffer travels inside the ``vhost-user-blk`` device section when protocol
feature 20 (GET_VRING_BASE_INFLIGHT) was negotiated (QEMU 11.x, SPEC-DIGEST 6.3, 7). Its
encoding, from hw/virtio/vhost.c (``vmstate_vhost_inflight_region``, ``.../buffer``) and
migration/vmstate.c (``vmstate_subsection_save``), SPEC-DIGEST 7.3::

    05 17 "vhost-user-blk/inflight" 00000001        subsection, version 1
    <size BE u64> <queue_size BE u16>                vhost-inflight-region (version 0)
    05 1c "vhost-inflight-region/buffer" 00000000   subsection, version 0
    <size raw bytes>                                 VMSTATE_VBUFFER_UINT64: no length prefix

Stream framing (migration/savevm.c, scripts/analyze-migration.py): BE u32 magic "QEVM",
BE u32 version 3, a CONFIGURATION section, SECTION_START/PART/END for iterative state (RAM),
SECTION_FULL per device (``04``, section id, idstr, instance id, version, fields, footer
``7e`` + section id), EOF ``00``, then ``06`` + BE u32 length + the JSON VM description.
RAM data follows migration/ram.c: BE u64 ``offset | RAM_SAVE_FLAG_*`` records.

Bad or truncated input raises :class:`VMStateError` naming the byte and the reason.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "INFLIGHT_SUBSECTION",
    "QEMU_VM_FILE_MAGIC",
    "QEMU_VM_FILE_VERSION",
    "REGION_BUFFER_SUBSECTION",
    "InflightState",
    "RamSummary",
    "Section",
    "Stream",
    "VMStateError",
    "compare_dump_vmstate",
    "compare_inflight_vmdesc",
    "decode_inflight_subsection",
    "encode_inflight_subsection",
    "extract_device_section",
    "find_inflight_subsection",
    "inflight_subsection_header",
    "inflight_vmdesc",
    "read_stream",
    "replace_inflight_buffer",
    "section_summary",
    "vmdesc_size",
]

QEMU_VM_FILE_MAGIC = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION = 0x00000003

# migration/savevm.c section types
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

SECTION_TYPE_NAMES = {
    QEMU_VM_SECTION_START: "SECTION_START",
    QEMU_VM_SECTION_PART: "SECTION_PART",
    QEMU_VM_SECTION_END: "SECTION_END",
    QEMU_VM_SECTION_FULL: "SECTION_FULL",
}

# migration/savevm.c enum qemu_vm_cmd
MIG_CMD_PACKAGED = 9

# migration/ram.c (ram.h in newer trees) RAM_SAVE_FLAG_*
RAM_SAVE_FLAG_FULL = 0x01
RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80  # RDMA only
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100  # removed in QEMU 9.1
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200
ENCODING_FLAG_XBZRLE = 0x1

INFLIGHT_SUBSECTION = "vhost-user-blk/inflight"
INFLIGHT_SUBSECTION_VERSION = 1
REGION_VMSD = "vhost-inflight-region"
REGION_VMSD_VERSION = 0
REGION_BUFFER_SUBSECTION = "vhost-inflight-region/buffer"
REGION_BUFFER_VERSION = 0
DEVICE_VMSD = "vhost-user-blk"

DEFAULT_PAGE_SIZE = 4096  # x86 TARGET_PAGE_SIZE


class VMStateError(ValueError):
    """Bad or truncated migration data: ``offset`` is the byte where reading went wrong."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"byte {offset} (0x{offset:x}): {reason}")
        self.offset = offset
        self.reason = reason


class _Reader:
    """Bounds-checked big-endian reads; every failure names the offset and what was read."""

    def __init__(self, data: bytes | memoryview, pos: int = 0, end: int | None = None) -> None:
        self.data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        self.pos = pos
        self.end = len(data) if end is None else end

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            left = max(self.end - self.pos, 0)
            raise VMStateError(self.pos, f"truncated: {what} needs {n} byte(s), {left} left")

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def u8(self, what: str) -> int:
        self.need(1, what)
        value = self.data[self.pos]
        self.pos += 1
        return int(value)

    def be16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def be32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "big")

    def be64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "big")

    def counted_str(self, what: str) -> str:
        start = self.pos
        length = self.u8(f"{what} length")
        raw = self.take(length, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise VMStateError(start + 1, f"{what} is not ASCII: {raw!r}") from None

    def peek(self) -> int | None:
        return int(self.data[self.pos]) if self.pos < self.end else None


# --------------------------------------------------------------------------------------------
# The in-flight subsection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InflightState:
    """What ``vhost-user-blk/inflight`` carries: region size, queue size, the raw region bytes."""

    size: int
    queue_size: int
    buffer: bytes


def _subsection_header(name: str, version: int) -> bytes:
    raw = name.encode("ascii")
    return bytes([QEMU_VM_SUBSECTION, len(raw)]) + raw + struct.pack(">I", version)


def inflight_subsection_header() -> bytes:
    """The exact 29 bytes that open the subsection (used to locate it in opaque device state)."""
    return _subsection_header(INFLIGHT_SUBSECTION, INFLIGHT_SUBSECTION_VERSION)


def encode_inflight_subsection(buffer: bytes | bytearray | memoryview, *, queue_size: int) -> bytes:
    """Encode the in-flight buffer exactly as QEMU 11.1.3 writes it (SPEC-DIGEST 7.3)."""
    raw = bytes(buffer)
    if not 0 <= queue_size <= 0xFFFF:
        raise ValueError(f"queue_size {queue_size} does not fit the u16 field")
    return b"".join(
        (
            inflight_subsection_header(),
            struct.pack(">QH", len(raw), queue_size),
            _subsection_header(REGION_BUFFER_SUBSECTION, REGION_BUFFER_VERSION),
            raw,
        )
    )


def _expect_subsection(r: _Reader, name: str, version: int, context: str) -> None:
    start = r.pos
    kind = r.u8(f"{context}: subsection marker")
    if kind != QEMU_VM_SUBSECTION:
        raise VMStateError(start, f"{context}: expected subsection marker 0x05, seen 0x{kind:02x}")
    length = r.u8(f"{context}: subsection name length")
    raw = r.take(length, f"{context}: subsection name")
    if raw != name.encode("ascii"):
        raise VMStateError(start + 2, f"{context}: expected subsection {name!r}, seen {raw!r}")
    seen_version = r.be32(f"{name} version_id")
    if seen_version != version:
        raise VMStateError(r.pos - 4, f"{name}: expected version_id {version}, seen {seen_version}")


def decode_inflight_subsection(
    data: bytes | memoryview, offset: int = 0
) -> tuple[InflightState, int]:
    """Decode the subsection starting at ``offset``; return it and the offset just past it."""
    r = _Reader(data, offset)
    _expect_subsection(r, INFLIGHT_SUBSECTION, INFLIGHT_SUBSECTION_VERSION, "vhost-user-blk")
    size = r.be64(f"{REGION_VMSD}.size")
    queue_size = r.be16(f"{REGION_VMSD}.queue_size")
    if r.peek() != QEMU_VM_SUBSECTION:
        # hw/virtio/vhost.c vhost_inflight_region_post_load
        seen = "end of data" if r.peek() is None else f"0x{r.peek():02x}"
        raise VMStateError(
            r.pos,
            f"inflight buffer subsection has not been loaded: expected 0x05 + "
            f"{REGION_BUFFER_SUBSECTION!r}, seen {seen}",
        )
    _expect_subsection(r, REGION_BUFFER_SUBSECTION, REGION_BUFFER_VERSION, REGION_VMSD)
    buffer = r.take(size, f"{REGION_BUFFER_SUBSECTION} addr ({size} bytes from size)")
    return InflightState(size, queue_size, buffer), r.pos


# --------------------------------------------------------------------------------------------
# JSON VM description (vmdesc) and -dump-vmstate
# --------------------------------------------------------------------------------------------


def inflight_vmdesc(size: int) -> dict[str, Any]:
    """The vmdesc JSON object QEMU writes for the subsection of a ``size``-byte region.

    Key order as migration/vmstate.c writes it (vmstate_save_state_v, vmsd_desc_field_start/
    end): a struct field's ``size`` counts its nested subsections (10 + 34 + size).
    """
    buffer_header = len(_subsection_header(REGION_BUFFER_SUBSECTION, REGION_BUFFER_VERSION))
    return {
        "vmsd_name": INFLIGHT_SUBSECTION,
        "version": INFLIGHT_SUBSECTION_VERSION,
        "fields": [
            {
                "name": "inflight",
                "type": "struct",
                "struct": {
                    "vmsd_name": REGION_VMSD,
                    "version": REGION_VMSD_VERSION,
                    "fields": [
                        {"name": "size", "type": "uint64", "size": 8},
                        {"name": "queue_size", "type": "uint16", "size": 2},
                    ],
                    "subsections": [
                        {
                            "vmsd_name": REGION_BUFFER_SUBSECTION,
                            "version": REGION_BUFFER_VERSION,
                            "fields": [{"name": "addr", "type": "buffer", "size": size}],
                        }
                    ],
                },
                "size": 8 + 2 + buffer_header + size,
            }
        ],
    }


def compare_inflight_vmdesc(seen: Mapping[str, Any], size: int) -> list[str]:
    """Differences between a vmdesc subsection object and :func:`inflight_vmdesc` (``[]`` = same)."""
    return _diff_json(inflight_vmdesc(size), seen, "subsection")


def _diff_json(expected: Any, seen: Any, path: str) -> list[str]:
    if isinstance(expected, dict):
        if not isinstance(seen, Mapping):
            return [f"{path}: expected an object, seen {type(seen).__name__}"]
        out = []
        for key, value in expected.items():
            if key not in seen:
                out.append(f"{path}.{key}: missing (expected {value!r})")
            else:
                out += _diff_json(value, seen[key], f"{path}.{key}")
        out += [f"{path}.{key}: unexpected key" for key in seen if key not in expected]
        return out
    if isinstance(expected, list):
        if not isinstance(seen, list):
            return [f"{path}: expected a list, seen {type(seen).__name__}"]
        if len(seen) != len(expected):
            return [f"{path}: expected {len(expected)} item(s), seen {len(seen)}"]
        out = []
        for i, (e, s) in enumerate(zip(expected, seen, strict=True)):
            out += _diff_json(e, s, f"{path}[{i}]")
        return out
    return [] if expected == seen else [f"{path}: expected {expected!r}, seen {seen!r}"]


# What `qemu-system-x86_64 -dump-vmstate FILE` must show for vhost-user-blk (PEERS.md; the
# format is migration/savevm.c dump_vmstate_vmsd: "name", "version_id", "Fields" with
# "field"/"size"/"Description", "Subsections").
_EXPECTED_DUMP = {
    "name": INFLIGHT_SUBSECTION,
    "version_id": INFLIGHT_SUBSECTION_VERSION,
    "fields": {
        "inflight": {
            "name": REGION_VMSD,
            "version_id": REGION_VMSD_VERSION,
            "fields": {"size": 8, "queue_size": 2},
            "subsections": {REGION_BUFFER_SUBSECTION: (REGION_BUFFER_VERSION, ("addr",))},
        }
    },
}


def compare_dump_vmstate(dump: Mapping[str, Any], device: str = DEVICE_VMSD) -> list[str]:
    """Check a parsed ``-dump-vmstate`` JSON against the documented in-flight structure.

    ``vhost-user-blk`` -> subsection ``vhost-user-blk/inflight`` (version 1) -> field
    ``inflight`` described by ``vhost-inflight-region`` {``size`` u64, ``queue_size`` u16} ->
    subsection ``vhost-inflight-region/buffer`` {``addr``}. Returns differences; ``[]`` = match.
    """
    entry = dump.get(device)
    if not isinstance(entry, Mapping):
        return [f"{device}: no such device in the dump"]
    desc = entry.get("Description")
    if not isinstance(desc, Mapping):
        return [f"{device}: no Description"]
    out: list[str] = []
    if desc.get("name") != device:
        out.append(f"{device}.Description.name: expected {device!r}, seen {desc.get('name')!r}")
    sub = _named(desc.get("Subsections"), INFLIGHT_SUBSECTION)
    path = f"{device}/Subsections/{INFLIGHT_SUBSECTION}"
    if sub is None:
        return [*out, f"{path}: missing"]
    if sub.get("version_id") != INFLIGHT_SUBSECTION_VERSION:
        out.append(
            f"{path}.version_id: expected {INFLIGHT_SUBSECTION_VERSION}, seen {sub.get('version_id')!r}"
        )
    fields = sub.get("Fields") or []
    inflight = next(
        (f for f in fields if isinstance(f, Mapping) and f.get("field") == "inflight"), None
    )
    if inflight is None:
        return [*out, f"{path}/Fields/inflight: missing"]
    region = inflight.get("Description")
    rpath = f"{path}/Fields/inflight/Description"
    if not isinstance(region, Mapping):
        return [*out, f"{rpath}: missing"]
    if region.get("name") != REGION_VMSD:
        out.append(f"{rpath}.name: expected {REGION_VMSD!r}, seen {region.get('name')!r}")
    if region.get("version_id") != REGION_VMSD_VERSION:
        out.append(
            f"{rpath}.version_id: expected {REGION_VMSD_VERSION}, seen {region.get('version_id')!r}"
        )
    region_fields = [f for f in region.get("Fields") or [] if isinstance(f, Mapping)]
    names = [f.get("field") for f in region_fields]
    if names != ["size", "queue_size"]:
        out.append(f"{rpath}/Fields: expected ['size', 'queue_size'], seen {names!r}")
    for f in region_fields:
        want = {"size": 8, "queue_size": 2}.get(str(f.get("field")))
        if want is not None and f.get("size") != want:
            out.append(
                f"{rpath}/Fields/{f.get('field')}.size: expected {want}, seen {f.get('size')!r}"
            )
    buf = _named(region.get("Subsections"), REGION_BUFFER_SUBSECTION)
    bpath = f"{rpath}/Subsections/{REGION_BUFFER_SUBSECTION}"
    if buf is None:
        return [*out, f"{bpath}: missing"]
    if buf.get("version_id") != REGION_BUFFER_VERSION:
        out.append(
            f"{bpath}.version_id: expected {REGION_BUFFER_VERSION}, seen {buf.get('version_id')!r}"
        )
    buf_names = [f.get("field") for f in buf.get("Fields") or [] if isinstance(f, Mapping)]
    if buf_names != ["addr"]:
        out.append(f"{bpath}/Fields: expected ['addr'], seen {buf_names!r}")
    return out


def _named(items: Any, name: str) -> Mapping[str, Any] | None:
    if not isinstance(items, list):
        return None
    for item in items:
        if isinstance(item, Mapping) and item.get("name") == name:
            return item
    return None


def vmdesc_size(entry: Mapping[str, Any]) -> int:
    """Bytes a vmdesc device (or subsection) object says were written for its fields+subsections.

    A field's ``size`` is what it wrote (struct fields include their nested subsections); a
    compressed array (``array_len``) describes its first element only; each subsection adds
    ``1 + 1 + len(name) + 4`` header bytes (migration/vmstate.c vmstate_subsection_save).
    """
    total = 0
    for f in entry.get("fields", []):
        total += int(f["size"]) * int(f.get("array_len", 1))
    for sub in entry.get("subsections", []):
        total += 2 + len(str(sub["vmsd_name"]).encode()) + 4 + vmdesc_size(sub)
    return total


# --------------------------------------------------------------------------------------------
# Whole streams
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RamSummary:
    """What a RAM section chunk carried (counted, the page data is skipped)."""

    blocks: dict[str, int] = field(default_factory=dict)  # idstr -> used_length
    pages: int = 0
    zero_pages: int = 0
    xbzrle_pages: int = 0
    multifd_flushes: int = 0


@dataclass(slots=True)
class Section:
    """One section chunk of the stream.

    ``start`` is the offset of its type byte, ``body_start``..``body_end`` its payload (after
    the header, before the footer), ``end`` the offset after the footer. ``located_by`` says
    how the end of an opaque payload was found: ``"parsed"`` (RAM), ``"vmdesc"`` (field sizes
    of the JSON description) or ``"footer-scan"``.
    """

    kind: int
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    start: int
    body_start: int
    body_end: int
    end: int
    has_footer: bool
    located_by: str
    ram: RamSummary | None = None

    @property
    def kind_name(self) -> str:
        """``SECTION_FULL`` etc."""
        return SECTION_TYPE_NAMES.get(self.kind, f"0x{self.kind:02x}")


@dataclass(slots=True)
class Stream:
    """A walked migration stream (see :func:`read_stream`)."""

    data: bytes
    version: int
    machine: str | None
    capabilities: list[str]
    page_size: int
    configuration_span: tuple[int, int] | None
    sections: list[Section]
    commands: list[tuple[int, int, bytes]]  # (offset, command, data)
    eof_offset: int
    vmdesc: dict[str, Any] | None
    vmdesc_offset: int | None

    def devices(self) -> list[Section]:
        """The SECTION_FULL sections, in stream order."""
        return [s for s in self.sections if s.kind == QEMU_VM_SECTION_FULL]

    def find_device(self, idstr_prefix: str) -> Section:
        """The one SECTION_FULL whose idstr (or its last path component) starts with the prefix."""
        hits = [s for s in self.devices() if _idstr_matches(s.idstr, idstr_prefix)]
        if len(hits) != 1:
            names = [s.idstr for s in hits] or [s.idstr for s in self.devices()]
            what = "several" if hits else "no"
            raise VMStateError(0, f"{what} device section(s) match {idstr_prefix!r}: {names}")
        return hits[0]

    def vmdesc_device(self, section: Section) -> dict[str, Any] | None:
        """The JSON description entry of a device section, if the stream has one."""
        return _vmdesc_entry(self.vmdesc, section.idstr, section.instance_id)

    def section_bytes(self, section: Section) -> bytes:
        """The whole section chunk: header, payload, footer."""
        return self.data[section.start : section.end]


def _idstr_matches(idstr: str, prefix: str) -> bool:
    return idstr.startswith(prefix) or idstr.rsplit("/", 1)[-1].startswith(prefix)


def _vmdesc_entry(
    vmdesc: Mapping[str, Any] | None, idstr: str, instance_id: int
) -> dict[str, Any] | None:
    if not vmdesc:
        return None
    for dev in vmdesc.get("devices", []):
        if dev.get("name") == idstr and int(dev.get("instance_id", -1)) == instance_id:
            return dict(dev)
    return None


def _find_vmdesc(data: bytes) -> tuple[int, dict[str, Any]] | None:
    """Locate ``06 <BE u32 len> {json}`` that ends exactly at the end of the data."""
    end = len(data)
    pos = data.rfind(b"\x06", max(0, end - 64 * 1024 * 1024), end - 5)
    floor = max(0, end - 64 * 1024 * 1024)
    while pos >= floor and pos != -1:
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if pos + 5 + length == end and data[pos + 5 : pos + 6] == b"{":
            try:
                parsed = json.loads(data[pos + 5 :].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                parsed = None
            if isinstance(parsed, dict):
                return pos, parsed
        pos = data.rfind(b"\x06", floor, pos)
    return None


def read_stream(data: bytes | bytearray | memoryview, *, page_size: int | None = None) -> Stream:
    """Walk a whole migration stream (as ``migrate exec:cat > FILE`` writes it).

    RAM sections are parsed record by record (page data skipped); device sections are opaque:
    their end is found from the JSON description's field sizes, else by finding the footer
    ``7e`` + section id followed by a plausible next section. ``page_size`` overrides the
    description's ``page_size`` (default 4096).
    """
    raw = bytes(data)
    trailer = _find_vmdesc(raw)
    vmdesc = trailer[1] if trailer else None
    explicit_page_size = page_size is not None
    if page_size is None:
        page_size = int(vmdesc.get("page_size", DEFAULT_PAGE_SIZE)) if vmdesc else DEFAULT_PAGE_SIZE
    if page_size <= 0 or page_size & (page_size - 1):
        raise VMStateError(0, f"page size {page_size} is not a power of two")
    r = _Reader(raw)
    magic = r.be32("file magic")
    if magic != QEMU_VM_FILE_MAGIC:
        raise VMStateError(
            0, f"file magic: expected 0x{QEMU_VM_FILE_MAGIC:08x} ('QEVM'), seen 0x{magic:08x}"
        )
    version = r.be32("file version")
    if version != QEMU_VM_FILE_VERSION:
        raise VMStateError(4, f"file version: expected {QEMU_VM_FILE_VERSION}, seen {version}")
    stream = Stream(raw, version, None, [], page_size, None, [], [], -1, None, None)
    by_id: dict[int, Section] = {}
    ram_ctx = _RamContext()
    while True:
        start = r.pos
        kind = r.u8("section type")
        if kind == QEMU_VM_EOF:
            stream.eof_offset = start
            break
        if kind == QEMU_VM_CONFIGURATION:
            if stream.configuration_span is not None or stream.sections:
                raise VMStateError(start, "CONFIGURATION section after the stream's first section")
            _read_configuration(
                r, stream, vmdesc, keep_page_size=explicit_page_size or vmdesc is not None
            )
            stream.configuration_span = (start, r.pos)
            continue
        if kind == QEMU_VM_COMMAND:
            command = r.be16("command id")
            length = r.be16("command length")
            payload = r.take(length, f"command {command} data")
            if command == MIG_CMD_PACKAGED:
                raise VMStateError(start, "MIG_CMD_PACKAGED (postcopy package) is not supported")
            stream.commands.append((start, command, payload))
            continue
        section = _read_section(r, stream, kind, start, vmdesc, by_id, ram_ctx)
        by_id.setdefault(section.section_id, section)
        stream.sections.append(section)
    # After EOF: nothing, or the JSON VM description ending the data.
    if r.pos == len(raw):
        return stream
    if trailer is None or trailer[0] != r.pos:
        raise VMStateError(
            r.pos,
            "after EOF: expected 0x06 + BE u32 length + JSON VM description ending the stream",
        )
    stream.vmdesc, stream.vmdesc_offset = vmdesc, trailer[0]
    return stream


def _read_section(
    r: _Reader,
    stream: Stream,
    kind: int,
    start: int,
    vmdesc: Mapping[str, Any] | None,
    by_id: dict[int, Section],
    ram_ctx: _RamContext,
) -> Section:
    """One START/FULL/PART/END section whose type byte at ``start`` was read: its header (a
    PART/END one names a section seen before), its body (RAM parsed, a device's located) and
    its footer."""
    raw = stream.data
    if kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
        section_id = r.be32("section id")
        idstr = r.counted_str("section idstr")
        instance_id = r.be32("instance id")
        version_id = r.be32("version id")
    elif kind in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
        section_id = r.be32("section id")
        first = by_id.get(section_id)
        if first is None:
            raise VMStateError(
                start + 1, f"{SECTION_TYPE_NAMES[kind]} for unknown section id {section_id}"
            )
        idstr, instance_id, version_id = first.idstr, first.instance_id, first.version_id
    else:
        raise VMStateError(start, f"unknown section type 0x{kind:02x}")
    body_start = r.pos
    section = Section(
        kind,
        section_id,
        idstr,
        instance_id,
        version_id,
        start,
        body_start,
        body_start,
        body_start,
        False,
        "",
    )
    if idstr == "ram" and kind != QEMU_VM_SECTION_FULL:
        section.ram = _read_ram(
            r, stream.page_size, ram_ctx, ignore_shared="x-ignore-shared" in stream.capabilities
        )
        section.body_end = r.pos
        section.located_by = "parsed"
    else:
        entry = (
            _vmdesc_entry(vmdesc, idstr, instance_id) if kind == QEMU_VM_SECTION_FULL else None
        )
        section.body_end, section.located_by = _find_body_end(
            raw, body_start, section_id, entry, by_id
        )
        r.pos = section.body_end
    if r.peek() == QEMU_VM_SECTION_FOOTER:
        footer_at = r.pos
        r.skip(1, "section footer")
        seen_id = r.be32("section footer id")
        if seen_id != section_id:
            raise VMStateError(
                footer_at, f"section footer: expected section id {section_id}, seen {seen_id}"
            )
        section.has_footer = True
    section.end = r.pos
    return section


def _read_configuration(
    r: _Reader, stream: Stream, vmdesc: Mapping[str, Any] | None, *, keep_page_size: bool
) -> None:
    # migration/savevm.c vmstate_configuration: len u32, name[len], then subsections.
    length = r.be32("configuration.len")
    name = r.take(length, "configuration.name")
    stream.machine = name.decode("ascii", "replace")
    while r.peek() == QEMU_VM_SUBSECTION:
        at = r.pos
        r.skip(1, "subsection marker")
        sub = r.counted_str("configuration subsection name")
        if not sub.startswith("configuration/"):
            raise VMStateError(at, f"configuration: unexpected subsection {sub!r}")
        r.be32(f"{sub} version_id")
        if sub == "configuration/target-page-bits":
            bits = r.be32("target_page_bits")
            if not keep_page_size:
                stream.page_size = 1 << bits
        elif sub == "configuration/capabilities":
            count = r.be32("caps_count")
            for i in range(count):
                stream.capabilities.append(r.counted_str(f"capability {i}"))
        elif sub == "configuration/uuid":
            r.skip(16, "uuid")
        else:
            desc = None
            for s in (vmdesc or {}).get("configuration", {}).get("subsections", []):
                if s.get("vmsd_name") == sub:
                    desc = s
            if desc is None:
                raise VMStateError(
                    at, f"configuration: unknown subsection {sub!r} and no description of it"
                )
            r.skip(vmdesc_size(desc), sub)


@dataclass(slots=True)
class _RamContext:
    # What ram_load_precopy keeps across chunks: the block list from MEM_SIZE and the last
    # block a page named (RAM_SAVE_FLAG_CONTINUE refers to it, also across iterations).
    blocks: dict[str, int] = field(default_factory=dict)
    block: str | None = None


def _read_ram(r: _Reader, page_size: int, ctx: _RamContext, *, ignore_shared: bool) -> RamSummary:
    # migration/ram.c ram_save_setup / ram_save_iterate / ram_load_precopy
    summary = RamSummary()
    mask = page_size - 1
    while True:
        at = r.pos
        word = r.be64("RAM record (offset | flags)")
        flags, addr = word & mask, word & ~mask
        if flags & RAM_SAVE_FLAG_MEM_SIZE:
            total = addr
            while total > 0:
                name = r.counted_str("RAM block idstr")
                used_length = r.be64(f"RAM block {name!r} used_length")
                if used_length > total:
                    raise VMStateError(
                        r.pos - 8,
                        f"RAM block {name!r} length {used_length} exceeds the {total} bytes left of MEM_SIZE",
                    )
                total -= used_length
                summary.blocks[name] = used_length
                ctx.blocks[name] = used_length
                if ignore_shared:
                    r.skip(8, f"RAM block {name!r} mr->addr (x-ignore-shared)")
            flags &= ~RAM_SAVE_FLAG_MEM_SIZE
        if flags & (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_XBZRLE):
            if flags & RAM_SAVE_FLAG_CONTINUE:
                if ctx.block is None:
                    raise VMStateError(at, "RAM page with CONTINUE before any block idstr")
            else:
                ctx.block = r.counted_str("RAM page block idstr")
                if ctx.block not in ctx.blocks:
                    raise VMStateError(at, f"RAM page for unknown block {ctx.block!r}")
            if addr >= ctx.blocks[ctx.block]:
                raise VMStateError(
                    at,
                    f"RAM page offset 0x{addr:x} past the end of block {ctx.block!r} (0x{ctx.blocks[ctx.block]:x})",
                )
            if flags & RAM_SAVE_FLAG_ZERO:
                r.skip(1, "zero page fill byte")
                summary.zero_pages += 1
            elif flags & RAM_SAVE_FLAG_PAGE:
                r.skip(page_size, f"RAM page data ({page_size} bytes)")
                summary.pages += 1
            else:
                encoding = r.u8("XBZRLE encoding flag")
                if encoding != ENCODING_FLAG_XBZRLE:
                    raise VMStateError(
                        r.pos - 1, f"XBZRLE encoding flag: expected 1, seen {encoding}"
                    )
                length = r.be16("XBZRLE length")
                r.skip(length, "XBZRLE data")
                summary.xbzrle_pages += 1
            flags &= ~(
                RAM_SAVE_FLAG_ZERO
                | RAM_SAVE_FLAG_PAGE
                | RAM_SAVE_FLAG_XBZRLE
                | RAM_SAVE_FLAG_CONTINUE
            )
        if flags & RAM_SAVE_FLAG_HOOK:
            raise VMStateError(at, "RAM_SAVE_FLAG_HOOK (RDMA) is not supported")
        if flags & RAM_SAVE_FLAG_COMPRESS_PAGE:
            raise VMStateError(
                at, "RAM_SAVE_FLAG_COMPRESS_PAGE (removed in QEMU 9.1) is not supported"
            )
        if flags & RAM_SAVE_FLAG_MULTIFD_FLUSH:
            summary.multifd_flushes += 1
            flags &= ~RAM_SAVE_FLAG_MULTIFD_FLUSH
        if flags & RAM_SAVE_FLAG_EOS:
            if flags & ~RAM_SAVE_FLAG_EOS:
                raise VMStateError(at, f"RAM EOS record with other flags 0x{flags:x}")
            return summary
        if flags:
            raise VMStateError(at, f"unknown RAM flags 0x{flags:x} in record 0x{word:016x}")


def _plausible_next(data: bytes, pos: int, by_id: Mapping[int, Section], own_id: int) -> bool:
    """Whether a section boundary at ``pos`` is followed by something a stream can hold next."""
    if pos >= len(data):
        return False
    kind = data[pos]
    if kind == QEMU_VM_EOF:
        rest = len(data) - pos - 1
        return rest == 0 or data[pos + 1] == QEMU_VM_VMDESCRIPTION
    if kind in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
        if pos + 5 > len(data):
            return False
        sid = int.from_bytes(data[pos + 1 : pos + 5], "big")
        return sid in by_id
    if kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
        if pos + 6 > len(data):
            return False
        sid = int.from_bytes(data[pos + 1 : pos + 5], "big")
        n = data[pos + 5]
        name = data[pos + 6 : pos + 6 + n]
        return (
            sid != own_id
            and sid not in by_id
            and n > 0
            and len(name) == n
            and all(0x20 < c < 0x7F for c in name)
            and pos + 6 + n + 8 <= len(data)
        )
    if kind == QEMU_VM_COMMAND:
        return pos + 5 <= len(data)
    return False


def _find_body_end(
    data: bytes,
    body_start: int,
    section_id: int,
    entry: Mapping[str, Any] | None,
    by_id: Mapping[int, Section],
) -> tuple[int, str]:
    footer = bytes([QEMU_VM_SECTION_FOOTER]) + section_id.to_bytes(4, "big")
    if entry is not None and "fields" in entry:
        end = body_start + vmdesc_size(entry)
        if end <= len(data) and (
            data[end : end + 5] == footer and _plausible_next(data, end + 5, by_id, section_id)
        ):
            return end, "vmdesc"
        if end <= len(data) and _plausible_next(data, end, by_id, section_id):
            return end, "vmdesc"
    pos = data.find(footer, body_start)
    while pos != -1:
        if _plausible_next(data, pos + 5, by_id, section_id):
            return pos, "footer-scan"
        pos = data.find(footer, pos + 1)
    name = entry.get("name") if entry else None
    raise VMStateError(
        body_start,
        f"cannot find the end of section {section_id} ({name or 'no JSON description'}): "
        f"no footer 7e {section_id:08x} followed by a valid section",
    )


def find_inflight_subsection(
    stream: Stream, device: str = DEVICE_VMSD
) -> tuple[InflightState, Section, int]:
    """Locate and decode ``vhost-user-blk/inflight`` inside the ``vhost-user-blk`` device section.

    First at the offset the JSON description gives (sum of the device's field sizes), else
    by searching the subsection's exact header bytes in the section payload; a hit counts only
    if it decodes and ends at the payload's end (or at another subsection). Returns the state,
    the section and the absolute offset of the subsection.
    """
    candidates = [
        s
        for s in stream.devices()
        if _idstr_matches(s.idstr, device)
        or (stream.vmdesc_device(s) or {}).get("vmsd_name") == device
    ]
    if not candidates:
        raise VMStateError(
            0, f"no {device!r} device section in the stream: {[s.idstr for s in stream.devices()]}"
        )
    problems: list[str] = []
    for section in candidates:
        entry = stream.vmdesc_device(section)
        offsets: list[int] = []
        if entry is not None:
            offsets.append(
                section.body_start
                + sum(int(f["size"]) * int(f.get("array_len", 1)) for f in entry.get("fields", []))
            )
        header = inflight_subsection_header()
        pos = stream.data.find(header, section.body_start, section.body_end)
        while pos != -1:
            if pos not in offsets:
                offsets.append(pos)
            pos = stream.data.find(header, pos + 1, section.body_end)
        for offset in offsets:
            try:
                state, end = decode_inflight_subsection(
                    memoryview(stream.data)[: section.body_end], offset
                )
            except VMStateError as err:
                problems.append(f"{section.idstr}: {err}")
                continue
            if end == section.body_end or stream.data[end] == QEMU_VM_SUBSECTION:
                return state, section, offset
            problems.append(
                f"{section.idstr}: candidate at byte {offset} ends at {end}, the payload at {section.body_end}"
            )
    where = candidates[0].body_start
    listed = [
        [
            str(sub.get("vmsd_name"))
            for sub in (stream.vmdesc_device(s) or {}).get("subsections", [])
        ]
        for s in candidates
    ]
    header = inflight_subsection_header()
    if not any(INFLIGHT_SUBSECTION in names for names in listed) and not any(
        stream.data.find(header, s.body_start, s.body_end) != -1 for s in candidates
    ):
        raise VMStateError(
            where,
            f"no {INFLIGHT_SUBSECTION!r} subsection in {[s.idstr for s in candidates]} (subsections "
            f"the JSON description lists: {listed}); QEMU writes it only when protocol "
            "feature 20 (GET_VRING_BASE_INFLIGHT) was negotiated",
        )
    detail = "; ".join(problems) if problems else "header bytes not present"
    raise VMStateError(where, f"no {INFLIGHT_SUBSECTION!r} subsection found: {detail}")


def extract_device_section(data: bytes | bytearray | memoryview, idstr_prefix: str) -> bytes:
    """Cut one device's section out of a whole stream into a small valid stream.

    The result holds the header, the CONFIGURATION section, that SECTION_FULL verbatim, EOF and
    a JSON description reduced to that device (same separators as QEMU: ", " and ": "), so
    :func:`read_stream` and :func:`find_inflight_subsection` work on it like on the original.
    """
    stream = read_stream(data)
    section = stream.find_device(idstr_prefix)
    parts = [struct.pack(">II", QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION)]
    if stream.configuration_span is not None:
        a, b = stream.configuration_span
        parts.append(stream.data[a:b])
    parts.append(stream.section_bytes(section))
    parts.append(bytes([QEMU_VM_EOF]))
    if stream.vmdesc is not None:
        reduced = {k: v for k, v in stream.vmdesc.items() if k != "devices"}
        entry = stream.vmdesc_device(section)
        reduced["devices"] = [entry] if entry is not None else []
        text = json.dumps(reduced).encode("utf-8")
        parts.append(bytes([QEMU_VM_VMDESCRIPTION]) + struct.pack(">I", len(text)) + text)
    return b"".join(parts)


def replace_inflight_buffer(
    data: bytes | bytearray | memoryview,
    buffer: bytes | bytearray | memoryview,
    *,
    queue_size: int | None = None,
) -> bytes:
    """A copy of the stream whose ``vhost-user-blk/inflight`` region is ``buffer``.

    For feeding a destination (``-incoming "exec:cat FILE"``) a forged region. The subsection
    must end the device payload (it does in QEMU 11.1.3); if the size changes, the JSON
    description's sizes are rewritten too (QEMU's separators). ``queue_size`` defaults to the
    stream's.
    """
    stream = read_stream(data)
    state, section, offset = find_inflight_subsection(stream)
    _, end = decode_inflight_subsection(memoryview(stream.data)[: section.body_end], offset)
    if end != section.body_end:
        raise VMStateError(
            end, "the in-flight subsection does not end the device payload; not rewritten"
        )
    new = encode_inflight_subsection(
        buffer, queue_size=state.queue_size if queue_size is None else queue_size
    )
    out = stream.data[:offset] + new + stream.data[end : stream.eof_offset + 1]
    if stream.vmdesc is None:
        return out + stream.data[stream.eof_offset + 1 :]
    vmdesc = json.loads(json.dumps(stream.vmdesc))
    for dev in vmdesc.get("devices", []):
        if (
            dev.get("name") == section.idstr
            and int(dev.get("instance_id", -1)) == section.instance_id
        ):
            dev["subsections"] = [
                inflight_vmdesc(len(memoryview(buffer).cast("B")))
                if sub.get("vmsd_name") == INFLIGHT_SUBSECTION
                else sub
                for sub in dev.get("subsections", [])
            ]
    text = json.dumps(vmdesc).encode("utf-8")
    return out + bytes([QEMU_VM_VMDESCRIPTION]) + struct.pack(">I", len(text)) + text


def section_summary(stream: Stream) -> list[str]:
    """One line per section (for logs and reports)."""
    lines = []
    for s in stream.sections:
        extra = ""
        if s.ram is not None:
            extra = f" ram: {len(s.ram.blocks)} block(s), {s.ram.pages} page(s), {s.ram.zero_pages} zero"
        lines.append(
            f"{s.start:>10} {s.kind_name:<13} id={s.section_id} {s.idstr!r} v{s.version_id} "
            f"payload {s.body_end - s.body_start} B ({s.located_by}){extra}"
        )
    return lines
