"""dpdk-testpmd's net_vhost (vhost-user-net) on the control-plane families: a short
selection ends in verdicts, none `error`, and the blk families are `unsupported` with the
device type named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vhost_conformance.peers.provision import available

SELECTION = "test_replies_carry_version_1 or test_get_queue_num or test_get_config_reply_size"


@pytest.mark.skipif(not available("dpdk-testpmd-vhost"), reason="run scripts/provision-peers")
def test_testpmd_control_plane_verdicts(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vhost_conformance.cli", "run", "--backend", "dpdk-testpmd",
         "--report", str(tmp_path / "r"), "-n", "0", "-k", SELECTION],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    cases = {c["id"]: c for c in json.loads((tmp_path / "r" / "report.json").read_text())["cases"]}
    assert cases, proc.stdout
    assert all(c["verdict"] != "error" for c in cases.values()), cases
    handshake = [c for c in cases.values() if c["family"] == "handshake"]
    assert handshake and all(c["verdict"] == "pass" for c in handshake), handshake
    config = [c for c in cases.values() if c["family"] == "config"]
    assert config and all(c["verdict"] == "unsupported" for c in config), config
    assert all("net device" in c["reason"] for c in config), config
