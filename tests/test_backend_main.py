"""The back-end program: CLI errors, --print-capabilities, SIGTERM, --fd and --connect."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vhost_conformance.backend.__main__ import main
from vhost_conformance.frontend.channel import Channel
from vhost_conformance.frontend.protocol import U64, FrontendRequest

from tests.backend_helpers import running_backend

PROG = [sys.executable, "-m", "vhost_conformance.backend"]


def test_print_capabilities(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--print-capabilities"]) == 0
    caps = json.loads(capsys.readouterr().out)
    assert caps == {"type": "block", "features": ["read-only", "blk-file"]}


@pytest.mark.parametrize(
    "argv, reason",
    [
        ([], "one of --socket-path, --fd or --connect"),
        (["--socket-path", "/tmp/x"], "--disk"),
        (["--socket-path", "/tmp/x", "--ram-disk", "12Q"], "not a size"),
        (["--socket-path", "/tmp/x", "--ram-disk", "1M", "--queues", "0"], "--queues"),
        (["--socket-path", "/tmp/x", "--ram-disk", "1M", "--blk-size", "1000"], "--blk-size"),
        (
            ["--socket-path", "/tmp/x", "--ram-disk", "1M", "--crash-at", "nowhere"],
            "unknown crash point",
        ),
        (["--socket-path", "/tmp/x", "--ram-disk", "1M", "--crash-at", "after-pop:0"], "positive"),
        (["--socket-path", "/tmp/x", "--ram-disk", "1M", "--fail-rate", "2"], "--fail-rate"),
        (["--socket-path", "/tmp/x", "--disk", "/nonexistent/img"], "cannot open disk"),
        (["--fd", "0", "--ram-disk", "1M"], "--fd 0"),
        (["--socket-path", "a", "--connect", "b", "--ram-disk", "1M"], "not allowed with"),
        (["--bogus"], "unrecognized"),
        (["--socket-path", "/tmp/x", "--ram-disk", "1M", "--log", "/nonexistent/dir/log"], "--log"),
    ],
)
def test_bad_usage_exits_2_with_one_line(
    argv: list[str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and reason in err, err


def test_sigterm_exits_0_and_removes_the_socket(tmp_path: Path) -> None:
    sock = tmp_path / "t.sock"
    with running_backend(sock, "--ram-disk", "1M") as proc:
        ch = Channel.connect(sock, timeout=5.0)
        assert ch.call(FrontendRequest.GET_FEATURES, timeout=5.0) is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        ch.close()
    assert not sock.exists()


def test_fd_mode(tmp_path: Path) -> None:
    path = tmp_path / "fd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    proc = subprocess.Popen(
        [*PROG, "--fd", str(listener.fileno()), "--ram-disk", "1M"], pass_fds=[listener.fileno()]
    )
    listener.close()
    try:
        ch = Channel.connect(path, timeout=5.0)
        reply = ch.call(FrontendRequest.GET_QUEUE_NUM, timeout=5.0)
        assert reply is not None and U64.decode(reply.payload).value == 1
        ch.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0


def test_connect_mode_serves_one_connection(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    listener = Channel.listen(path)
    proc = subprocess.Popen([*PROG, "--connect", str(path), "--ram-disk", "1M", "--queues", "3"])
    try:
        ch = listener.accept(timeout=10.0)
        reply = ch.call(FrontendRequest.GET_QUEUE_NUM, timeout=5.0)
        assert reply is not None and U64.decode(reply.payload).value == 3
        ch.close()
        assert proc.wait(timeout=5) == 0  # the connection ended: the program ends
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_read_only_offers_ro(tmp_path: Path) -> None:
    sock = tmp_path / "ro.sock"
    with running_backend(
        sock, "--ram-disk", "1M", "--read-only", "--no-packed", "--no-inflight-migration"
    ):
        ch = Channel.connect(sock, timeout=5.0)
        feats = ch.call(FrontendRequest.GET_FEATURES, timeout=5.0)
        proto = ch.call(FrontendRequest.GET_PROTOCOL_FEATURES, timeout=5.0)
        assert feats is not None and proto is not None
        f = U64.decode(feats.payload).value
        assert f >> 5 & 1 and not f >> 34 & 1
        assert not U64.decode(proto.payload).value >> 20 & 1
        ch.close()
        time.sleep(0.05)
