"""The disk: sizes, file and RAM disks, bounds."""

from __future__ import annotations

from pathlib import Path

import pytest
from vhost_conformance.backend.disk import Disk, DiskError, parse_size


@pytest.mark.parametrize(
    "text, value",
    [("4096", 4096), ("64M", 64 << 20), ("1G", 1 << 30), ("512k", 512 << 10), ("2GiB", 2 << 30)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_parse_size_rejects() -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size("12Q")


def test_ram_disk_read_write_bounds() -> None:
    disk = Disk.ram(1 << 20)
    try:
        assert disk.capacity_sectors == 2048
        disk.write_from(4096, [memoryview(b"a" * 512), memoryview(b"b" * 512)])
        buf = bytearray(1024)
        assert disk.read_into(4096, [memoryview(buf)]) == 1024
        assert bytes(buf) == b"a" * 512 + b"b" * 512
        disk.write_zeroes(4096, 512)
        disk.read_into(4096, [memoryview(buf)])
        assert bytes(buf) == bytes(512) + b"b" * 512
        with pytest.raises(DiskError, match="outside the disk"):
            disk.read_into((1 << 20) - 512, [memoryview(bytearray(1024))])
    finally:
        disk.close()


def test_file_disk_read_only(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(b"\x11" * 4096)
    disk = Disk.open_file(str(img), read_only=True)
    try:
        with pytest.raises(DiskError, match="read-only"):
            disk.write_from(0, [memoryview(b"x" * 512)])
        buf = bytearray(512)
        disk.read_into(512, [memoryview(buf)])
        assert bytes(buf) == b"\x11" * 512
    finally:
        disk.close()
    with pytest.raises(DiskError, match="cannot open"):
        Disk.open_file(str(tmp_path / "missing"))
