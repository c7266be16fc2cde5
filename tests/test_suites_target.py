"""The back-end under test: templates, profiles, the launch strategies, the capability probe."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import signal
import socket
import sys
import threading
import time

import pytest
from test_suites_fakebackend import fake_command
from vhost_conformance.frontend.protocol import BlkFeature, ProtocolFeature, VirtioFeature
from vhost_conformance.suites.target import (
    BackendStartFailed,
    BackendStartHang,
    BackendTarget,
    CommandTarget,
    ExternalSocketTarget,
    Profile,
    SlowIo,
    SlowIoUnsupported,
    TargetError,
    TargetFactory,
    UsageError,
    builtin_profile_names,
    command_profile,
    connecting_profile,
    load_profile,
    parse_size,
    probe_capabilities,
    render_command,
)


def test_parse_size() -> None:
    assert parse_size("64M") == 64 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("4096") == 4096
    assert parse_size("128MiB") == 128 << 20
    with pytest.raises(UsageError, match="cannot read 'lots'"):
        parse_size("lots")
    with pytest.raises(UsageError, match="must be positive"):
        parse_size(0)


def test_render_command_splits_then_fills() -> None:
    argv = render_command(
        "srv --socket {socket} --name 'a b' {{literal}}", {"socket": "/tmp/x y.sock"}
    )
    assert argv == ["srv", "--socket", "/tmp/x y.sock", "--name", "a b", "{literal}"]
    with pytest.raises(UsageError, match=r"unknown placeholder\(s\) \{sockt\}"):
        render_command("srv {sockt}", {"socket": "s"})
    with pytest.raises(UsageError, match="empty"):
        render_command("", {})


def test_command_templates_need_a_socket() -> None:
    with pytest.raises(UsageError, match=r"no \{socket\} placeholder"):
        command_profile("srv --disk {disk}")
    with pytest.raises(UsageError, match=r"unknown placeholder\(s\) \{port\}"):
        command_profile("srv --socket {socket} --port {port}")
    profile = command_profile("srv --socket {socket}", "connect")
    assert (profile.socket_mode, profile.slow_io.possible, profile.deviations) == (
        "connect",
        False,
        (),
    )
    with pytest.raises(UsageError, match="gives no 'socket' path"):
        Profile(name="p", command="srv --dir {workdir}")
    assert Profile(name="p", command="srv --dir {workdir}", socket="{workdir}/s.sock").socket
    with pytest.raises(UsageError, match="socket_mode must be"):
        Profile(name="p", command="srv {socket}", socket_mode="both")  # type: ignore[arg-type]


def test_builtin_profiles() -> None:
    assert builtin_profile_names() == [
        "dpdk-testpmd", "dpdk-vhost-blk", "passt", "qsd", "qsd-11.1", "reference",
        "vhost-user-blk-contrib", "virtiofsd",
    ]
    reference = load_profile("reference")
    assert reference.slow_io.args == "--latency {latency_ms}" and reference.shares_disk
    qsd = load_profile("qsd")
    assert qsd.slow_io.command is not None and "latency-ns={latency_ns}" in qsd.slow_io.command
    assert qsd.shares_disk and qsd.needs == ("{cache}/bin/qsd-7.2",)
    assert {"VU-BACKEND-2", "VU-HDR-2"} <= {d.case for d in qsd.deviations}
    assert all("observed" in d.reason or "conventions" in d.reason for d in qsd.deviations)
    dpdk = load_profile("dpdk-vhost-blk")
    assert dpdk.socket == "{workdir}/vhost.socket" and not dpdk.slow_io.possible
    assert "latency" in dpdk.slow_io.unsupported and not dpdk.shares_disk
    assert load_profile("qsd-11.1").needs == ("{cache}/bin/qsd-11.1",)
    with pytest.raises(UsageError, match="unknown back-end profile 'nope'"):
        load_profile("nope")


def test_user_profile_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "acme.toml"
    path.write_text(
        'command = "acme-blk --sock {socket} --img {disk}"\n'
        'disk_size = "16M"\nshares_disk = true\n'
        '[slow_io]\ncommand = "acme-blk --sock {socket} --img {disk} --delay-ns {latency_ns}"\n'
        '[[deviation]]\ncase = "VU-GVB-3"\nreason = "drains only the first queue (bug 12)"\n'
    )
    profile = load_profile(str(path))
    assert (profile.name, profile.disk_size, profile.shares_disk) == ("acme", 16 << 20, True)
    assert profile.deviations[0].reason == "drains only the first queue (bug 12)"
    path.write_text('command = "a {socket}"\ncolour = "blue"\n')
    with pytest.raises(UsageError, match=r"unknown key.*colour"):
        load_profile(str(path))
    path.write_text('command = "a {socket}"\n[[deviation]]\ncase = "VU-GVB-3"\n')
    with pytest.raises(UsageError, match="needs both 'case' and 'reason'"):
        load_profile(str(path))
    path.write_text("command = [")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_profile(str(path))


def test_slow_io_variants_of_the_command(short_dir: pathlib.Path) -> None:
    args = Profile(name="a", command="srv {socket}", slow_io=SlowIo(args="--latency {latency_ms}"))
    target = CommandTarget(args, short_dir / "a")
    assert target.argv() == ["srv", str(short_dir / "a" / "vhost.sock")]
    target._latency_ms = 50
    assert target.argv() == ["srv", str(short_dir / "a" / "vhost.sock"), "--latency", "50"]
    replaced = Profile(
        name="b", command="srv {socket}", slow_io=SlowIo(command="slow {socket} {latency_ns}")
    )
    target = CommandTarget(replaced, short_dir / "b")
    target._latency_ms = 2
    assert target.argv() == ["slow", str(short_dir / "b" / "vhost.sock"), "2000000"]
    none = CommandTarget(Profile(name="c", command="srv {socket}"), short_dir / "c")
    with pytest.raises(SlowIoUnsupported, match="no way to make"), none.slow_io(10):
        pass


def test_print_capabilities_command(short_dir: pathlib.Path) -> None:
    python = CommandTarget(load_profile("reference"), short_dir / "r")
    assert python.print_capabilities_argv() == [
        sys.executable,
        "-m",
        "vhost_conformance.backend",
        "--print-capabilities",
    ]
    plain = CommandTarget(Profile(name="p", command="/usr/bin/srv --s {socket}"), short_dir / "p")
    assert plain.print_capabilities_argv() == ["/usr/bin/srv", "--print-capabilities"]


def test_socket_paths_must_be_short() -> None:
    with pytest.raises(UsageError, match="shorter than 108"):
        CommandTarget(Profile(name="p", command="srv {socket}"), pathlib.Path("/tmp/" + "x" * 120))


def test_command_target_runs_and_stops_a_backend(short_dir: pathlib.Path) -> None:
    target = CommandTarget(command_profile(fake_command()), short_dir / "t", stop_timeout=5)
    _: BackendTarget = target  # the Protocol is structural (mypy checks it)
    path = target.start()
    try:
        assert target.alive() and target.pid is not None and target.exit_status() is None
        assert (short_dir / "t" / "disk.img").stat().st_size == 64 << 20
        with contextlib.closing(target.connect_socket(5)) as sock:
            caps = probe_capabilities(sock, 5)
        assert caps.offers(VirtioFeature.VERSION_1) and caps.offers(BlkFeature.CONFIG_WCE)
        assert caps.offers(ProtocolFeature.REPLY_ACK) and not caps.offers(
            ProtocolFeature.INFLIGHT_SHMFD
        )
        assert caps.queue_num == 1 and caps.config is not None and len(caps.config) == 57
        assert int.from_bytes(caps.config[:8], "little") == (64 << 20) // 512
        assert "fake back-end listening" in target.log_tail()
        assert os.path.exists(path)
    finally:
        target.stop()
    assert not target.alive() and target.stopped_by_us
    assert target.exit_status() == -signal.SIGTERM
    assert not os.path.exists(path)
    assert target.restart() == path and target.alive()
    target.stop()


def test_a_backend_that_exits_at_start_gives_its_status(short_dir: pathlib.Path) -> None:
    profile = command_profile(
        f"{sys.executable} -c 'import sys; print(\"bye\"); sys.exit(4)' {{socket}}"
    )
    target = CommandTarget(profile, short_dir / "t")
    with pytest.raises(BackendStartFailed, match="exited with status 4 before listening") as info:
        target.start()
    assert info.value.exit_status == 4 and "bye" in info.value.log_tail


def test_a_backend_that_never_listens_is_a_start_hang(short_dir: pathlib.Path) -> None:
    profile = command_profile(f"{sys.executable} -c 'import time; time.sleep(60)' {{socket}}")
    target = CommandTarget(profile, short_dir / "t", start_timeout=0.5, stop_timeout=2)
    started = time.monotonic()
    with pytest.raises(BackendStartHang, match=r"did not listen .* within 0.5 s"):
        target.start()
    assert time.monotonic() - started < 10
    assert not target.alive(), "a back-end that missed its start deadline is stopped"


def test_connect_mode_accepts_the_backend(short_dir: pathlib.Path) -> None:
    path = str(short_dir / "listen.sock")
    profile = Profile(name="ext", command=None, socket_mode="connect", socket=path)
    target = CommandTarget(profile, short_dir / "t")
    assert target.start() == path and target.alive()
    with pytest.raises(BackendStartHang, match="did not connect"):
        target.connect_socket(0.2)

    def backend_connects() -> None:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        client.sendall(b"hello")
        client.close()

    thread = threading.Thread(target=backend_connects)
    thread.start()
    with contextlib.closing(target.connect_socket(5)) as conn:
        assert conn.recv(5) == b"hello"
    thread.join(5)
    target.stop()
    assert not os.path.exists(path)


def test_external_socket_target(short_dir: pathlib.Path) -> None:
    missing = ExternalSocketTarget(str(short_dir / "none.sock"))
    with pytest.raises(TargetError, match="does not exist"):
        missing.start()
    runner = CommandTarget(command_profile(fake_command()), short_dir / "t")
    path = runner.start()
    factory = TargetFactory(external_socket=path, rundir=short_dir / "run")
    try:
        target = factory.new("VU-HDR-2")
        assert isinstance(target, ExternalSocketTarget)
        assert target.start() == path and target.alive() and target.exit_status() is None
        assert target.capabilities.offers(ProtocolFeature.CONFIG)
        with pytest.raises(SlowIoUnsupported), target.slow_io(5):
            pass
    finally:
        factory.close()
        runner.stop()


def test_factory_gives_each_case_its_own_backend_and_probes_once(short_dir: pathlib.Path) -> None:
    factory = TargetFactory(
        profile=command_profile(fake_command()), worker="gw7", rundir=short_dir / "run"
    )
    try:
        first, second = factory.new("VU-HDR-1"), factory.new("VU-HDR-1")
        assert isinstance(first, CommandTarget) and isinstance(second, CommandTarget)
        assert first.workdir != second.workdir and first.socket_path != second.socket_path
        assert first.values["file_prefix"] != second.values["file_prefix"]
        assert "gw7" in first.values["file_prefix"]
        caps = factory.capabilities()
        assert factory.capabilities() is caps
        assert first.capabilities is caps
        first.start()
        second.start()
        assert first.alive() and second.alive()
        factory.release(first)
        assert not first.alive() and not first.workdir.exists()
    finally:
        factory.close()
    assert not second.alive()
    assert not (short_dir / "run").exists()


def test_factory_probe_of_a_dying_backend_is_a_crash(short_dir: pathlib.Path) -> None:
    factory = TargetFactory(profile=command_profile(fake_command("die")), rundir=short_dir / "run")
    try:
        with pytest.raises(BackendStartFailed, match="closed the connection") as info:
            factory.capabilities()
        assert info.value.exit_status == 3
        assert "exiting on purpose" in info.value.log_tail
        with pytest.raises(BackendStartFailed):  # remembered, not probed again
            factory.capabilities()
    finally:
        factory.close()


def test_connecting_profiles() -> None:
    with pytest.raises(UsageError, match="'qsd' has no connect_command"):
        connecting_profile(load_profile("qsd"))
    reference = connecting_profile(load_profile("reference"))
    assert reference.socket_mode == "connect" and reference.command is not None
    assert "--connect {socket}" in reference.command
    assert connecting_profile(reference) is reference
    with pytest.raises(UsageError, match=r"connect_command .* has no \{socket\}"):
        Profile(name="p", command="srv {socket}", connect_command="srv --to {workdir}/x")


def test_reference_backend_connects_to_us(short_dir: pathlib.Path) -> None:
    pytest.importorskip("vhost_conformance.backend.__main__", reason="reference back-end missing")
    target = CommandTarget(connecting_profile(load_profile("reference")), short_dir / "t")
    try:
        target.start()
        with contextlib.closing(target.connect_socket(10)) as sock:
            caps = probe_capabilities(sock, 5)
        assert caps.offers(ProtocolFeature.INFLIGHT_SHMFD)
        assert caps.offers(ProtocolFeature.GET_VRING_BASE_INFLIGHT)
    finally:
        target.stop()
    assert not target.alive()


def test_prestarted_backends_are_each_handed_to_one_case(short_dir: pathlib.Path) -> None:
    profile = dataclasses.replace(command_profile(fake_command()), prestart=2)
    factory = TargetFactory(profile=profile, rundir=short_dir / "run")
    try:
        assert factory.prestart == 2
        first = factory.new("VU-HDR-1")
        assert isinstance(first, CommandTarget) and first.alive()
        assert factory.pool_hits == 1 and len(factory._pool) == 2  # refilled at once
        assert first.start() == first.socket_path and os.path.exists(first.socket_path)
        pids = {first.pid}
        for label in ("VU-HDR-2", "VU-HDR-3", "probe"):
            other = factory.new(label)
            assert isinstance(other, CommandTarget)
            other.start()
            assert other.pid not in pids and other.socket_path != first.socket_path
            pids.add(other.pid)
        # a pre-started instance that died while waiting is never handed out
        spare = factory._pool[0]
        spare.send_signal(signal.SIGKILL)
        assert spare.wait_exit(5) == -signal.SIGKILL
        fresh = factory.new("VU-HDR-4")
        assert fresh is not spare and isinstance(fresh, CommandTarget)
        fresh.start()
        with contextlib.closing(fresh.connect_socket(5)) as sock:
            assert probe_capabilities(sock, 5).offers(VirtioFeature.VERSION_1)
        pooled = list(factory._pool)
    finally:
        factory.close()
    assert all(not t.alive() for t in pooled) and not (short_dir / "run").exists()


def test_prestart_is_checked_and_off_in_connect_mode(tmp_path: pathlib.Path) -> None:
    with pytest.raises(UsageError, match="prestart must be an integer from 0 to 8"):
        Profile(name="p", command="srv {socket}", prestart=9)
    path = tmp_path / "p.toml"
    path.write_text('command = "srv {socket}"\nprestart = "2"\n')
    with pytest.raises(UsageError, match="prestart must be int, got str"):
        load_profile(str(path))
    assert load_profile("reference").prestart == 2
    assert connecting_profile(load_profile("reference")).prestart == 0
    factory = TargetFactory(
        profile=Profile(name="c", command=None, socket_mode="connect", prestart=2),
        rundir=tmp_path / "run",
    )
    assert factory.prestart == 0
    factory.close()


def test_leaving_slow_io_relaunches_without_waiting(short_dir: pathlib.Path) -> None:
    profile = Profile(
        name="fake",
        command=fake_command(),
        slow_io=SlowIo(args="--latency-ms {latency_ms}"),
    )
    target = CommandTarget(profile, short_dir / "t")
    target.start()
    try:
        with target.slow_io(7):
            assert "--latency-ms" in (target.argv() or [])
        assert target.alive() and "--latency-ms" not in (target.argv() or [])
        with contextlib.closing(target.connect_socket(5)) as sock:  # waits until it listens
            assert probe_capabilities(sock, 5).queue_num == 1
    finally:
        target.stop()


def test_python_backends_read_a_private_bytecode_cache(tmp_path: pathlib.Path) -> None:
    import subprocess

    code = (
        "import sys; from vhost_conformance.suites.target import python_env\n"
        "assert python_env(['qemu-storage-daemon', '--help']) is None\n"
        "env = python_env([sys.executable, '-m', 'vhost_conformance.backend'])\n"
        "print(env['PYTHONPYCACHEPREFIX'] if env else 'none')\n"
    )
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    for own_prefix, expected in ((None, "cache"), (str(tmp_path / "own"), "none")):
        env = {**base, "TMPDIR": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
        if own_prefix:
            env["PYTHONPYCACHEPREFIX"] = own_prefix
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        prefix = out.stdout.strip()
        if expected == "none":
            assert prefix == "none"  # the user chose where bytecode goes: left alone
            continue
        assert prefix == str(tmp_path / f"vc-pycache-{os.getuid()}")
        compiled = [p.name for p in pathlib.Path(prefix).rglob("*.pyc")]
        assert any(name.startswith("protocol.") for name in compiled), compiled
        assert any(name.startswith("server.") for name in compiled), compiled


def test_builtin_name_wins_over_a_directory_of_that_name(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `run --backend qsd --report qsd` twice: the second run found ./qsd (a folder) and
    # tried to read it as a profile file
    (tmp_path / "qsd").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_profile("qsd").name == "qsd"


def test_one_connection_needs_listen_mode() -> None:
    with pytest.raises(UsageError, match="one_connection needs socket_mode 'listen'"):
        Profile(name="p", command="srv {socket}", socket_mode="connect", one_connection=True)


def test_one_connection_backend_gets_a_fresh_instance_per_connection(
    short_dir: pathlib.Path,
) -> None:
    """The real contrib/vhost-user-blk exits after its one connection: that is not a death
    (alive() stays true, exit status 0), and the next connection gets a new instance."""
    from vhost_conformance.frontend.channel import Channel
    from vhost_conformance.frontend.protocol import FrontendRequest
    from vhost_conformance.peers.provision import available

    if not available("vhost-user-blk-contrib"):
        pytest.skip("contrib vhost-user-blk not provisioned (scripts/provision-peers)")
    profile = load_profile("vhost-user-blk-contrib")
    assert profile.one_connection
    target = CommandTarget(profile, short_dir / "c", stop_timeout=5)
    try:
        target.start()
        for round_ in (1, 2):
            channel = Channel(target.connect_socket(5.0))
            try:
                assert channel.call(FrontendRequest.GET_FEATURES, timeout=5.0) is not None
            finally:
                channel.close()
            assert target.wait_exit(5.0) == 0, target.log_tail()  # it exits after one
            assert target.alive(), f"round {round_}: a clean exit after its connection"
            assert not target.stopped_by_us
        assert target._starts == 2
    finally:
        target.stop()
    assert not target._running()


def test_slow_io_route_knob_watched_disk_or_none() -> None:
    """A profile's own latency knob first; without one, the watched disk when the command uses
    {disk}; ``slow_io.via = "disk"`` chooses the watched disk; DPDK (no {disk}) has neither."""
    from vhost_conformance.suites.target import load_profile, profile_from_mapping

    assert load_profile("reference").slow_io_route() == "knob"
    assert load_profile("qsd-11.1").slow_io_route() == "knob"
    assert load_profile("dpdk-vhost-blk").slow_io_route() is None
    assert "no {disk}" in load_profile("dpdk-vhost-blk").slow_io_unsupported()
    plain = {"command": "srv --socket {socket} --disk {disk}"}
    assert profile_from_mapping(plain, "p", "t").slow_io_route() == "disk"
    chosen = {**plain, "slow_io": {"args": "--latency {latency_ms}", "via": "disk"}}
    assert profile_from_mapping(chosen, "p", "t").slow_io_route() == "disk"
    with pytest.raises(UsageError):
        profile_from_mapping({**plain, "slow_io": {"via": "tmpfs"}}, "p", "t")


def test_profile_resize_signal() -> None:
    """``resize_signal`` (VU-SUSP-3 provokes a BACKEND_CONFIG_CHANGE_MSG with it) is a signal
    name; the reference profile names SIGUSR1; anything else is a usage error."""
    from vhost_conformance.suites.target import UsageError, load_profile, profile_from_mapping

    assert load_profile("reference").resize_signal == "SIGUSR1"
    assert profile_from_mapping({"command": "x {socket}"}, "p", "t").resize_signal is None
    with pytest.raises(UsageError, match="resize_signal"):
        profile_from_mapping({"command": "x {socket}", "resize_signal": "USR1"}, "p", "t")


def test_profile_resize_qmp() -> None:
    """``resize_qmp`` (a QMP monitor socket template) needs ``resize_node``; the qsd profiles
    name both and start the daemon with that monitor."""
    from vhost_conformance.suites.target import UsageError, load_profile, profile_from_mapping

    for name in ("qsd", "qsd-11.1"):
        profile = load_profile(name)
        assert profile.resize_qmp == "{workdir}/qmp.sock" and profile.resize_node == "f0"
        assert profile.command is not None and "--monitor chardev=qmp0" in profile.command
    with pytest.raises(UsageError, match="resize_node"):
        profile_from_mapping({"command": "x {socket}", "resize_qmp": "{workdir}/q"}, "p", "t")
