"""End to end: `vhost-conformance run` against three real back-ends, `report` renders their
matrix, Chromium opens report.html and matrix.html, and known deviations turn into xfail/xpass.

A small case selection keeps it quick; the full suite is exercised by ./run-suite.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest
from vhost_conformance.peers.provision import available

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "test-output"
CHROMIUM = pathlib.Path("/usr/bin/chromium")
#: Cases that every back-end answers quickly; VU-HDR-2 and VU-ACK-3 differ between them.
SELECTION = (
    "test_replies_carry_version_1 or test_reply_flags_are_exactly_0x5 or test_get_queue_num"
    " or test_no_ack_without_reply_ack or test_bit_20_only_with_bit_12"
    " or test_get_config_reply_size"
)
BACKENDS = {"reference": None, "qsd": "qsd-7.2", "dpdk-vhost-blk": "dpdk-vhost-blk"}


def vc(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """Run the installed CLI as a user would, with a deadline."""
    return subprocess.run(
        [sys.executable, "-m", "vhost_conformance.cli", *args],
        capture_output=True, text=True, timeout=300, cwd=cwd,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, pathlib.Path]]:
    """One `run` per back-end with the small selection; report folders by back-end name."""
    base = tmp_path_factory.mktemp("e2e")
    out: dict[str, pathlib.Path] = {}
    for name, peer in BACKENDS.items():
        if peer is not None and not available(peer):
            continue
        proc = vc("run", "--backend", name, "--report", str(base / name), "-n", "0",
                  "-k", SELECTION, cwd=base)
        assert proc.returncode in (0, 1), f"{name}: exit {proc.returncode}\n{proc.stderr}"
        assert (base / name / "report.json").exists(), proc.stdout + proc.stderr
        out[name] = base / name
    yield out


def test_run_writes_every_rendering_and_exits_0_for_reference(
    runs: dict[str, pathlib.Path],
) -> None:
    folder = runs["reference"]
    for name in ("report.json", "junit.xml", "summary.md", "report.html"):
        assert (folder / name).stat().st_size > 0, name
    report = json.loads((folder / "report.json").read_text())
    assert report["backend"]["name"] == "reference"
    verdicts = {c["id"]: c["verdict"] for c in report["cases"]}
    assert len(verdicts) == 6
    assert set(verdicts.values()) == {"pass"}, verdicts
    assert report["gate"] == 0


def test_matrix_of_three_backends(runs: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    if len(runs) < 3:
        pytest.skip(f"only {sorted(runs)} provisioned: run ./scripts/provision-peers")
    proc = vc("report", *(str(p / "report.json") for p in runs.values()),
              "-o", str(tmp_path / "matrix"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "matrix" / "matrix.md").read_text()
    for name in runs:
        assert name in md
    # The matrix holds one row per case and says how each back-end fared.
    assert "VU-HDR-2" in md and "VU-MQ-1" in md
    html = (tmp_path / "matrix" / "matrix.html").read_text()
    assert "<script" in html and "http://" not in html.replace("http://www.w3.org", "")
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "matrix-3-backends.md").write_text(md)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium not installed "
                    "(./scripts/provision-peers --only chromium)")
def test_real_report_and_matrix_in_chromium(
    runs: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from test_reports_html_browser import DevToolsPipe  # the project's DevTools client

    proc = vc("report", *(str(p / "report.json") for p in runs.values()),
              "-o", str(tmp_path / "matrix"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pipe = DevToolsPipe(tmp_path / "profile", tmp_path / "chromium.log")
    try:
        for page, shot in ((runs["reference"] / "report.html", "e2e-report.png"),
                           (tmp_path / "matrix" / "matrix.html", "e2e-matrix.png")):
            session = pipe.open_page(page.as_uri())
            assert pipe.evaluate(session, "document.body.dataset.ready") == "true", page
            if page.name == "report.html":
                # The "pass" filter shows every case of this all-pass run.
                pipe.evaluate(session, "document.getElementById('filter-pass').click()")
                shown = pipe.evaluate(session, "document.getElementById('shown-count').textContent")
                assert shown.startswith("6 of 6"), shown
            png = base64.b64decode(
                pipe.call("Page.captureScreenshot", {"format": "png"}, session=session)["data"])
            OUTPUT.mkdir(exist_ok=True)
            (OUTPUT / shot).write_bytes(png)
            pipe.evaluate(session, "1")
            assert pipe.problems(session) == [], page
    finally:
        pipe.close()


def test_known_deviations_xfail_and_xpass(tmp_path: pathlib.Path) -> None:
    """A listed failing case becomes xfail with its reason; a listed passing one, xpass."""
    if not available("qsd-7.2"):
        pytest.skip("qemu-storage-daemon not provisioned (./scripts/provision-peers --only qsd)")
    deviations = tmp_path / "deviations.toml"
    deviations.write_text(
        '[[deviation]]\nid = "VU-HDR-2"\nreason = "libvhost-user echoes NEED_REPLY in replies"\n'
        '[[deviation]]\nid = "VU-MQ-1"\nreason = "listed although it passes"\n'
    )
    # A profile like qsd's but without its own deviations, so only our file applies.
    profile = tmp_path / "plain-qsd.toml"
    profile.write_text(
        'name = "plain-qsd"\n'
        'command = "{cache}/bin/qsd-7.2 --blockdev driver=file,node-name=f0,filename={disk} '
        '--export type=vhost-user-blk,id=e0,addr.type=unix,addr.path={socket},node-name=f0,'
        'writable=on"\n'
        'disk_size = "64M"\n'
    )
    proc = vc("run", "--profile", str(profile), "--known-deviations", str(deviations),
              "--report", str(tmp_path / "r"), "-n", "0",
              "-k", "test_reply_flags_are_exactly_0x5 or test_get_queue_num", cwd=tmp_path)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    verdicts = {c["id"]: c for c in report["cases"]}
    assert verdicts["VU-HDR-2"]["verdict"] == "xfail", verdicts["VU-HDR-2"]
    assert "echoes NEED_REPLY" in (verdicts["VU-HDR-2"]["deviation"] or "")
    assert verdicts["VU-MQ-1"]["verdict"] == "xpass", verdicts["VU-MQ-1"]
    # An expected failure does not fail the gate.
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_must_failure_exits_1(tmp_path: pathlib.Path) -> None:
    """Without the deviation, qemu-storage-daemon's VU-HDR-2 failure fails the gate: exit 1."""
    if not available("qsd-7.2"):
        pytest.skip("qemu-storage-daemon not provisioned (./scripts/provision-peers --only qsd)")
    profile = tmp_path / "plain-qsd.toml"
    profile.write_text(
        'name = "plain-qsd"\n'
        'command = "{cache}/bin/qsd-7.2 --blockdev driver=file,node-name=f0,filename={disk} '
        '--export type=vhost-user-blk,id=e0,addr.type=unix,addr.path={socket},node-name=f0,'
        'writable=on"\n'
        'disk_size = "64M"\n'
    )
    env_dir = tmp_path / "r"
    proc = vc("run", "--profile", str(profile), "--report", str(env_dir), "-n", "0",
              "-k", "test_reply_flags_are_exactly_0x5", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (env_dir / "summary.md").read_text()
    assert "VU-HDR-2" in summary
    assert os.path.getsize(env_dir / "junit.xml") > 0
