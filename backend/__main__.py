"""``python -m vhost_conformance.backend`` / ``vhost-conformance-backend``: the reference
vhost-user-blk back-end program.

Follows vhost-user.rst "Backend program conventions": ``--socket-path PATH`` (listen),
``--fd N`` (an already listening socket), ``--print-capabilities`` (JSON, type "block",
features "read-only" and "blk-file", as docs/interop/vhost-user.json describes), no
daemonizing, exit 0 on SIGTERM. Bad usage: exit 2 with a one-line reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Sequence
from types import FrameType

from vhost_conformance.backend.disk import Disk, DiskError, parse_size
from vhost_conformance.backend.faults import (
    CRASH_POINTS,
    MISBEHAVIOURS,
    Faults,
    parse_crash_at,
    parse_misbehave,
)
from vhost_conformance.backend.options import BackendOptions
from vhost_conformance.backend.server import Server

CAPABILITIES = {"type": "block", "features": ["read-only", "blk-file"]}


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = _Parser(
        prog="vhost-conformance-backend",
        description="Reference vhost-user-blk back-end (in-flight tracking, protocol bit 20).",
        epilog="misbehaviours (--misbehave, for the suite's own mutation tests):\n"
        + "\n".join(f"  {name:24} {what}" for name, what in MISBEHAVIOURS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen on this Unix socket")
    where.add_argument("--fd", type=int, metavar="N", help="serve this already listening socket fd")
    where.add_argument("--connect", metavar="PATH", help="connect to a listening front-end")
    p.add_argument(
        "--print-capabilities", action="store_true", help="print capabilities (JSON), exit"
    )
    disk = p.add_mutually_exclusive_group()
    disk.add_argument("--disk", "--blk-file", dest="disk", metavar="FILE", help="raw image file")
    disk.add_argument("--ram-disk", metavar="SIZE", help="RAM disk of SIZE (e.g. 64M)")
    p.add_argument(
        "--queues", type=int, default=1, metavar="N", help="number of queues (default 1)"
    )
    p.add_argument("--read-only", action="store_true", help="offer VIRTIO_BLK_F_RO, refuse writes")
    p.add_argument("--blk-size", type=int, default=512, metavar="N", help="logical block size")
    p.add_argument(
        "--latency", type=float, default=0.0, metavar="MS", help="per-request latency of disk requests (ms; GET_ID completes at once)"
    )
    p.add_argument(
        "--no-inflight-migration",
        action="store_true",
        help="do not offer GET_VRING_BASE_INFLIGHT (protocol bit 20)",
    )
    p.add_argument(
        "--no-skip-drain",
        action="store_true",
        help="do not offer GET_VRING_BASE_SKIP_DRAIN (protocol bit 23, a post-11.1 proposal; "
        "offered with bit 20 by default: QEMU 11.1.3 masks it off)",
    )
    p.add_argument("--no-packed", action="store_true", help="do not offer VIRTIO_F_RING_PACKED")
    p.add_argument(
        "--crash-at",
        metavar="POINT[:N]",
        help=f"SIGKILL ourselves at the Nth request reaching POINT ({', '.join(CRASH_POINTS)})",
    )
    p.add_argument("--fail-rate", type=float, default=0.0, metavar="P", help="IOERR probability")
    p.add_argument("--seed", type=int, default=0, help="seed of --fail-rate")
    p.add_argument(
        "--misbehave",
        metavar="NAME[,NAME]",
        default="",
        help="break these spec clauses on purpose (listed below)",
    )
    p.add_argument("--log", metavar="FILE", help="log to FILE (default stderr)")
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: messages)"
    )
    return p


def _program_knobs(args: argparse.Namespace, argv: Sequence[str]) -> frozenset[str]:
    """The --misbehave knobs that break the program conventions (vhost-user.rst "Backend
    program conventions"), applied to the command line before anything else."""
    try:
        knobs = parse_misbehave(args.misbehave)
    except ValueError as exc:
        raise _UsageError(f"--misbehave: {exc}") from None
    if "no-fd-option" in knobs and args.fd is not None:
        raise _UsageError("unrecognized arguments: --fd")
    if "socket-path-equals-unknown" in knobs and any(
        a.startswith("--socket-path=") for a in argv
    ):
        raise _UsageError("unrecognized arguments: --socket-path=... (only --socket-path PATH)")
    return knobs


def _options(args: argparse.Namespace) -> tuple[BackendOptions, Faults]:
    if not 1 <= args.queues <= 256:
        raise _UsageError(f"--queues {args.queues}: must be 1..256")
    bs = args.blk_size
    if bs < 512 or bs > 65536 or bs & (bs - 1):
        raise _UsageError(f"--blk-size {bs}: must be a power of two in 512..65536")
    if not 0 <= args.latency <= 600_000:
        raise _UsageError(f"--latency {args.latency}: must be 0..600000 ms")
    if not 0.0 <= args.fail_rate <= 1.0:
        raise _UsageError(f"--fail-rate {args.fail_rate}: must be a probability in 0..1")
    point, count = None, 1
    if args.crash_at:
        try:
            point, count = parse_crash_at(args.crash_at)
        except ValueError as exc:
            raise _UsageError(f"--crash-at: {exc}") from None
    try:
        misbehave = parse_misbehave(args.misbehave)
    except ValueError as exc:
        raise _UsageError(f"--misbehave: {exc}") from None
    options = BackendOptions(
        queues=args.queues,
        read_only=args.read_only,
        blk_size=bs,
        latency=args.latency / 1000.0,
        inflight_migration=not args.no_inflight_migration,
        skip_drain=not args.no_skip_drain,
        packed=not args.no_packed,
    )
    return options, Faults(point, count, args.fail_rate, args.seed, misbehave)


def _listen_socket(args: argparse.Namespace) -> socket.socket | None:
    if args.fd is not None:
        try:
            mode = os.fstat(args.fd).st_mode
        except OSError as exc:
            raise _UsageError(f"--fd {args.fd}: {exc.strerror}") from None
        if not stat.S_ISSOCK(mode):
            raise _UsageError(f"--fd {args.fd}: not a socket")
        sock = socket.socket(fileno=args.fd)
        if sock.family != socket.AF_UNIX or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            sock.detach()
            raise _UsageError(f"--fd {args.fd}: not a listening Unix socket")
        return sock
    if args.socket_path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(args.socket_path) and stat.S_ISSOCK(
                os.stat(args.socket_path).st_mode
            ):
                os.unlink(args.socket_path)
            sock.bind(args.socket_path)
            sock.listen(4)
        except OSError as exc:
            sock.close()
            raise _UsageError(f"--socket-path {args.socket_path}: {exc.strerror}") from None
        return sock
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the back-end; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        knobs = _program_knobs(args, argv)
        if args.print_capabilities and _print_capabilities(args, knobs):
            return 0
        if args.socket_path is None and args.fd is None and args.connect is None:
            raise _UsageError("one of --socket-path, --fd or --connect is required")
        if args.disk is None and args.ram_disk is None:
            raise _UsageError("one of --disk (--blk-file) or --ram-disk is required")
        options, faults = _options(args)
        try:
            disk = (
                Disk.open_file(args.disk, read_only=args.read_only)
                if args.disk is not None
                else Disk.ram(parse_size(args.ram_disk), read_only=args.read_only)
            )
        except (DiskError, ValueError) as exc:
            if "init-failure-exit-0" in knobs:
                print(f"vhost-conformance-backend: {exc}", file=sys.stderr)
                return 0
            raise _UsageError(str(exc)) from None
        try:
            _setup_logging(args)
        except OSError as exc:
            disk.close()
            raise _UsageError(f"--log {args.log}: {exc.strerror}") from None
    except _UsageError as exc:
        print(f"vhost-conformance-backend: {exc}", file=sys.stderr)
        return 2
    try:
        try:
            listen = _listen_socket(args)
        except _UsageError as exc:
            print(f"vhost-conformance-backend: {exc}", file=sys.stderr)
            return 2
        server = Server(options, disk, faults, listen_sock=listen, connect_path=args.connect)

        _install_signals(server, faults)
        logging.getLogger("vhost_conformance.backend").info(
            "serving %s on %s (queues %d, latency %.1f ms, bit 20 %s)",
            disk.name,
            args.socket_path or (f"fd {args.fd}" if args.fd is not None else args.connect),
            options.queues,
            args.latency,
            "offered" if options.inflight_migration else "not offered",
        )
        try:
            status = server.run()
        except OSError as exc:
            print(f"vhost-conformance-backend: {exc}", file=sys.stderr)
            return 1
        finally:
            signal.set_wakeup_fd(-1)
            if listen is not None:
                listen.close()
                if args.socket_path is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(args.socket_path)
        return status
    finally:
        disk.close()


def _print_capabilities(args: argparse.Namespace, knobs: frozenset[str]) -> bool:
    """``--print-capabilities``: print them (vhost-user.rst "Backend program conventions");
    True when the program ends there (unless the print-capabilities-serves knob)."""
    try:
        bent = "capabilities-not-json" in parse_misbehave(args.misbehave)
    except ValueError as exc:
        raise _UsageError(f"--misbehave: {exc}") from None
    if bent:
        print("vhost-conformance-backend: a block device (read-only, blk-file)")
        return True
    print(json.dumps(CAPABILITIES, indent=2))
    if "print-capabilities-serves" not in knobs:
        return True
    sys.stdout.flush()
    return False


def _install_signals(server: Server, faults: Faults) -> None:
    """SIGTERM/SIGINT stop the server (the ignore-sigterm knob skips the first SIGTERM),
    SIGUSR1 sends a config change; signals wake the server's loop."""
    ignored: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGUSR1:
            if server.device is not None:
                server.device.send_config_change()
            return
        if signum == signal.SIGTERM and faults.on("ignore-sigterm") and not ignored:
            ignored.append(signum)  # the first one: a second SIGTERM ends the program
            return
        faults.stopping = True
        server.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, on_signal)
    signal.set_wakeup_fd(server.wakeup_fd, warn_on_full_buffer=False)


def _setup_logging(args: argparse.Namespace) -> None:
    level = (
        logging.WARNING
        if args.verbose == 0
        else logging.INFO
        if args.verbose == 1
        else logging.DEBUG
    )
    handler: logging.Handler = (
        logging.FileHandler(args.log) if args.log else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("vhost_conformance.backend")
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


if __name__ == "__main__":
    sys.exit(main())
