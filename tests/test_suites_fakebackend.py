"""A tiny fake vhost-user-blk back-end for the suites' own tests, and a test of it.

Run as a program (``python tests/test_suites_fakebackend.py --socket-path S --disk D --mode M``)
it listens on S and answers the handshake: GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
GET_QUEUE_NUM, GET_CONFIG/SET_CONFIG (wce only), SET_VRING_NUM (queue 0 only), REPLY_ACK.
Modes make it misbehave on purpose: ``die`` exits with status 3 on the first message,
``hang`` never answers, ``badflags`` answers with flags 0xd, ``segv`` kills itself with
SIGSEGV on the first message, ``closebad`` closes the connection on a request id it does
not know (and serves the next connection), ``deafbad`` does the same and then stops accepting
connections (alive, serving nobody), ``closevalid`` closes the connection on GET_QUEUE_NUM (a
valid request). Imported by pytest, it only defines the test below.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys

FAKE_BACKEND = pathlib.Path(__file__).resolve()


def fake_command(mode: str = "ok") -> str:
    """A --vhost-backend-cmd template running this fake back-end in ``mode``."""
    return f"{sys.executable} {FAKE_BACKEND} --socket-path {{socket}} --disk {{disk}} --mode {mode}"


def main() -> None:
    """Serve connections one after the other until killed."""
    from vhost_conformance.frontend.protocol import (
        REPLY_FLAGS,
        U64,
        Config,
        Message,
        MessageParser,
        ProtocolError,
    )
    from vhost_conformance.frontend.protocol import BlkFeature as B
    from vhost_conformance.frontend.protocol import FrontendRequest as R
    from vhost_conformance.frontend.protocol import ProtocolFeature as P
    from vhost_conformance.frontend.protocol import VirtioFeature as V

    parser = argparse.ArgumentParser()
    parser.add_argument("--socket-path")
    parser.add_argument("--disk")
    parser.add_argument("--mode", default="ok")
    parser.add_argument("--print-capabilities", action="store_true")
    parser.add_argument("--latency-ms", type=int, default=0)  # accepted (slow I/O variant)
    args = parser.parse_args()
    if args.print_capabilities:
        print(json.dumps({"type": "block", "features": []}))
        return
    features = (1 << V.VERSION_1) | (1 << V.PROTOCOL_FEATURES) | (1 << B.SEG_MAX)
    features |= (1 << B.BLK_SIZE) | (1 << B.CONFIG_WCE) | (1 << B.FLUSH)
    protocol = (1 << P.MQ) | (1 << P.REPLY_ACK) | (1 << P.CONFIG)
    size = os.path.getsize(args.disk) if args.disk else 64 << 20
    config = bytearray(60)
    struct.pack_into("<QII", config, 0, size // 512, 0, 126)
    struct.pack_into("<I", config, 20, 512)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(args.socket_path)
    server.listen(4)
    print("fake back-end listening", flush=True)
    while True:
        try:
            conn, _ = server.accept()
        except OSError:  # deafbad closed the listening socket: alive, serving nobody
            signal.pause()
            continue
        framer = MessageParser()
        negotiated = 0

        def reply(request: int, payload: bytes, conn: socket.socket = conn) -> None:
            flags = 0xD if args.mode == "badflags" else REPLY_FLAGS
            conn.sendall(Message(int(request), flags, payload).encode())

        while conn.fileno() >= 0 and (data := conn.recv(4096)):
            framer.feed(data)
            while True:
                try:
                    msg = framer.next_message()
                except ProtocolError:
                    if args.mode not in ("closebad", "deafbad"):
                        raise
                    msg = Message(0x7FFF, 1, b"")  # what it does not know: closed below
                if msg is None:
                    break
                print("got request", msg.request, flush=True)
                if args.mode == "die":
                    print("fake back-end: exiting on purpose", flush=True)
                    os._exit(3)
                if args.mode == "segv":
                    os.kill(os.getpid(), signal.SIGSEGV)
                if args.mode == "hang":
                    continue
                rq = msg.request
                known = rq in set(R)
                if (args.mode in ("closebad", "deafbad") and not known) or (
                    args.mode == "closevalid" and rq == R.GET_QUEUE_NUM
                ):
                    print("fake back-end: closing the connection on request", rq, flush=True)
                    conn.close()
                    if args.mode == "deafbad":
                        server.close()
                    break
                ack = msg.need_reply and negotiated & (1 << P.REPLY_ACK)
                if rq == R.GET_FEATURES:
                    reply(rq, U64(features).encode())
                elif rq == R.GET_PROTOCOL_FEATURES:
                    reply(rq, U64(protocol).encode())
                elif rq == R.SET_PROTOCOL_FEATURES:
                    negotiated = U64.decode(msg.payload).value
                elif rq == R.GET_QUEUE_NUM:
                    reply(rq, U64(1).encode())
                elif rq == R.GET_CONFIG:
                    c = Config.decode(msg.payload)
                    part = bytes(config[c.offset : c.offset + c.size])
                    reply(rq, Config(c.offset, c.size, c.flags, part).encode())
                elif rq == R.SET_CONFIG:
                    c = Config.decode(msg.payload)
                    ok = c.offset == 32 and c.size == 1
                    if ok:
                        config[32] = c.data[0]
                    if ack:
                        reply(rq, U64(0 if ok else 1).encode())
                elif rq == R.SET_VRING_NUM:
                    (index,) = struct.unpack_from("<I", msg.payload)
                    if ack:
                        reply(rq, U64(0 if index == 0 else 1).encode())
                elif ack:
                    reply(rq, U64(0).encode())
        conn.close()


def test_fake_backend_prints_capabilities() -> None:
    done = subprocess.run(
        [sys.executable, str(FAKE_BACKEND), "--print-capabilities"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert json.loads(done.stdout)["type"] == "block"


if __name__ == "__main__":
    main()
