"""Back-ends of other device types on the control-plane families: dpdk-testpmd's net_vhost
(vhost-user-net), Debian 13's passt --vhost-user (vhost-user-net) and virtiofsd
(vhost-user-fs). A short selection ends in
verdicts, none `error`; the handshake cases pass (or need a feature not offered) and the blk families are `unsupported`
naming the device type."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vhost_conformance.peers.provision import cache_dir

SELECTION = (
    "test_replies_carry_version_1 or test_get_queue_num or test_get_config_reply_size"
    " or test_flush_offered_with_config_wce"
)
#: profile -> (the file provisioning leaves in the cache, device type)
PROFILES = {
    "dpdk-testpmd": ("bin/dpdk-testpmd-vhost", "net"),
    "passt": ("bin/passt-vhost", "net"),
    "virtiofsd": ("trixie-root/usr/libexec/virtiofsd", "fs"),
}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_control_plane_verdicts(profile: str, tmp_path: Path) -> None:
    needed, kind = PROFILES[profile]
    if not (cache_dir() / needed).exists():
        pytest.skip(f"{needed} not provisioned (scripts/provision-peers)")
    proc = subprocess.run(
        [sys.executable, "-m", "vhost_conformance.cli", "run", "--backend", profile,
         "--report", str(tmp_path / "r"), "-n", "0", "-k", SELECTION],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    cases = {c["id"]: c for c in json.loads((tmp_path / "r" / "report.json").read_text())["cases"]}
    assert cases, proc.stdout
    assert all(c["verdict"] != "error" for c in cases.values()), cases
    handshake = [c for c in cases.values() if c["family"] == "handshake"]
    # GET_QUEUE_NUM needs the MQ protocol feature, which passt does not offer
    assert handshake and all(c["verdict"] in ("pass", "unsupported") for c in handshake), handshake
    assert any(c["verdict"] == "pass" for c in handshake), handshake
    config = [c for c in cases.values() if c["family"] == "config"]
    assert config and all(c["verdict"] == "unsupported" for c in config), config
    assert all(f"{kind} device" in c["reason"] for c in config), config
    # a handshake-family case about virtio-blk's feature bits is blk-only too
    flush = cases["VU-FEAT-11"]
    assert flush["verdict"] == "unsupported" and f"{kind} device" in flush["reason"], flush
