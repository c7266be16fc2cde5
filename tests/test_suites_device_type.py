"""The device type of a back-end: the profile's, else its --print-capabilities "type", else
block; the capability probe and `vhost-conformance probe` ask GET_CONFIG only of a block
device and name device feature bits by the device type."""

from __future__ import annotations

import contextlib
import json
import pathlib
import struct
import subprocess
import sys

import pytest
from test_suites_fakebackend import fake_command
from vhost_conformance.frontend.channel import WireTrace
from vhost_conformance.frontend.protocol import FrontendRequest, Message, device_feature_names
from vhost_conformance.suites.device_type import DEFAULT_DEVICE_TYPE, from_print_capabilities
from vhost_conformance.suites.target import (
    CommandTarget,
    Profile,
    TargetFactory,
    command_profile,
    probe_capabilities,
)


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_type_read_from_stdout(tmp_path: pathlib.Path) -> None:
    found = from_print_capabilities(_py('print(\'{"type": "net", "features": []}\')'), tmp_path)
    assert found.name == "net" and '"type"' in found.source


@pytest.mark.parametrize(
    ("code", "why"),
    [
        ("import sys; sys.exit(3)", "status 3"),
        ("import sys; print('{\"type\": \"net\"}', file=sys.stderr)", "no JSON"),  # passt's way
        ("print('[1, 2]')", "no JSON"),
        ("print('{\"type\": \"\"}')", "no JSON"),
        ("import time; time.sleep(30)", "did not exit within 0.5 s"),
    ],
)
def test_unreadable_type_is_block_with_the_reason(
    code: str, why: str, tmp_path: pathlib.Path
) -> None:
    found = from_print_capabilities(_py(code), tmp_path, timeout=0.5)
    assert found.name == DEFAULT_DEVICE_TYPE and why in found.source


def test_factory_prefers_the_profile_then_print_capabilities(short_dir: pathlib.Path) -> None:
    script = short_dir / "caps.py"
    script.write_text('print(\'{"type": "fs"}\')\n')
    caps = f"{sys.executable} {script}"
    cases = {
        "block": Profile(name="a", command="srv {socket}"),
        "fs": Profile(name="b", command="srv {socket}", print_capabilities=caps),
        "net": Profile(name="c", command="srv {socket}", print_capabilities=caps,
                       device_type="net"),
    }
    for expected, profile in cases.items():
        factory = TargetFactory(profile=profile, rundir=short_dir / profile.name)
        try:
            assert factory.device_type().name == expected, factory.device_type()
            assert factory.device_type() is factory.device_type()  # asked once
        finally:
            factory.close()


def test_probe_asks_config_of_a_block_device_only_and_names_bits_by_type(short_dir: pathlib.Path) -> None:
    target = CommandTarget(command_profile(fake_command()), short_dir / "t", stop_timeout=5)
    target.start()
    try:
        with contextlib.closing(target.connect_socket(5)) as sock:
            assert probe_capabilities(sock, 5).config is not None  # the fake offers CONFIG
        target.restart()
        with contextlib.closing(target.connect_socket(5)) as sock:
            caps = probe_capabilities(sock, 5, device_type="net")
        assert caps.config is None and caps.queue_num == 1
        # the fake offers VIRTIO_BLK_F_SEG_MAX (bit 2): on a net device bit 2 has net's name
        assert "CTRL_GUEST_OFFLOADS" in caps.feature_names()
        assert "SEG_MAX" not in caps.feature_names()
    finally:
        target.stop()


def test_feature_names_per_device_type() -> None:
    value = 1 << 2 | 1 << 32
    assert device_feature_names(value, "block") == ["SEG_MAX", "VERSION_1"]
    assert device_feature_names(value, "net") == ["CTRL_GUEST_OFFLOADS", "VERSION_1"]
    assert device_feature_names(1, "fs") == ["NOTIFICATION"]
    assert device_feature_names(value, "gpu") == ["bit2", "VERSION_1"]


@pytest.mark.parametrize(("device_type", "names"), [
    ("block", ["SEG_MAX", "VERSION_1"]),
    ("net", ["CTRL_GUEST_OFFLOADS", "VERSION_1"]),
    (None, ["bit2", "VERSION_1"]),
])
def test_wire_trace_names_feature_bits_by_device_type(device_type: str | None,
                                                      names: list[str]) -> None:
    """A trace names a feature word's device bits by its device type's table (a session
    sets its own); without one only the transport bits are named."""
    value = struct.pack("<Q", 1 << 2 | 1 << 32)
    trace = WireTrace(device_type)
    trace.record("be->fe", "main", Message(FrontendRequest.GET_FEATURES, 0x5, value))
    trace.record("fe->be", "main", Message(FrontendRequest.SET_FEATURES, 0x1, value))
    trace.record("fe->be", "main", Message(FrontendRequest.SET_PROTOCOL_FEATURES, 0x1,
                                           struct.pack("<Q", 1 << 0)))
    first, second, protocol = trace.entries()
    assert first.payload is not None and first.payload["names"] == names
    assert second.payload is not None and second.payload["names"] == names
    assert protocol.payload is not None and protocol.payload["names"] == ["MQ"]


def test_cli_probe_of_a_net_profile_asks_no_config(tmp_path: pathlib.Path) -> None:
    profile = tmp_path / "as-net.toml"
    profile.write_text(
        'name = "as-net"\n'
        'command = "{python} -m vhost_conformance.backend --socket-path {socket} --disk {disk}"\n'
        'device_type = "net"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "vhost_conformance.cli", "probe", "--backend", str(profile)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["device_type"] == "net" and "config" not in out
    assert "SEG_MAX" not in out["feature_names"] and "CTRL_GUEST_OFFLOADS" in out["feature_names"]


def test_case_traces_name_feature_bits_by_the_probed_type(tmp_path: pathlib.Path) -> None:
    """A case's wire trace (here VU-ACK-3's, failing on a knob) names the virtio bits of a
    feature word by the back-end's device type: the reference back-end declared net has its
    bit 2 named CTRL_GUEST_OFFLOADS, not SEG_MAX."""
    profile = tmp_path / "as-net.toml"
    profile.write_text(
        'name = "as-net"\n'
        'command = "{python} -m vhost_conformance.backend --socket-path {socket} --disk {disk}'
        ' --misbehave ack-without-reply-ack"\n'
        'device_type = "net"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "vhost_conformance.cli", "run", "--backend", str(profile),
         "--case", "VU-ACK-3", "--report", str(tmp_path / "r"), "-n", "0"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    [case] = json.loads((tmp_path / "r" / "report.json").read_text())["cases"]
    assert case["verdict"] in ("fail", "non-strict") and case["trace"], case
    entries = case["trace"] if isinstance(case["trace"], list) else case["trace"]["entries"]
    words = [e["payload"]["names"] for e in entries
             if e["name"] == "GET_FEATURES" and e["direction"] == "be->fe" and e["payload"]]
    assert words and all("CTRL_GUEST_OFFLOADS" in w and "SEG_MAX" not in w for w in words), words
