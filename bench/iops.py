#!/usr/bin/env python3
"""4 KiB random-read IOPS at queue depth 32: the Python front-end next to ``qemu-img bench``
(QEMU 11.1.3's libblkio driver, a C front-end) against the same back-end in the same run.

Back-ends: qemu-storage-daemon 11.1 exporting ``null-co`` (no data kept, no disk time), and
the reference back-end (``python -m vhost_conformance.backend --ram-disk``). Prints a table
with both front-ends' IOPS per back-end and the ratio Python / C.

The Python data path batches: it keeps ``depth`` requests in flight, and each turn reaps
every used entry there is (``Session.reap_batch``), completes them without copying the data
(``BlkDriver.complete_views``), re-adds as many requests in one call (``BlkDriver.read_many``:
each request slot keeps its data buffer and indirect table), publishes once and kicks at
most once (only when the device asks for it: EVENT_IDX). ``--copy`` measures the general
API instead (one ``read`` per request, ``complete`` copying the data out). Usage::

    .venv/bin/python bench/iops.py [--seconds 5] [--depth 32] [--count 200000] [--repeat 2]
        [--backends qsd,reference] [--copy] [--profile FILE]

Not a test: nothing is asserted, numbers vary with the machine (2 cores here; back-end and
front-end share them).
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import pathlib
import pstats
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from vhost_conformance.frontend.blk import SECTOR_SIZE
from vhost_conformance.frontend.channel import Channel
from vhost_conformance.frontend.device import Session
from vhost_conformance.frontend.memory import GuestMemory
from vhost_conformance.peers.process import Supervised, spawn
from vhost_conformance.peers.provision import PeerUnavailable
from vhost_conformance.peers.qemu import qemu_img_bench
from vhost_conformance.peers.qsd import NullDisk, start_qsd

DISK_SIZE = 1 << 30
BLOCK = 4096


@dataclass
class Result:
    """One measurement."""

    backend: str
    frontend: str
    requests: int
    seconds: float
    note: str = ""
    #: CPU seconds the front-end process used (user + system), when known
    cpu: float | None = None

    @property
    def cpu_us_per_request(self) -> float | None:
        """Front-end CPU time per request in microseconds (load-independent-ish)."""
        if self.cpu is None or not self.requests:
            return None
        return self.cpu / self.requests * 1e6

    @property
    def iops(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def python_frontend_iops(socket: pathlib.Path, *, seconds: float, depth: int,
                         disk_size: int = DISK_SIZE, seed: int = 1, copy: bool = False
                         ) -> tuple[int, float, float]:
    """Run 4 KiB random reads at ``depth`` for about ``seconds``; (requests, elapsed,
    CPU seconds of this process meanwhile). The bulk path (``BlkDriver.read_many``,
    ``complete_views``: no copy of the data read) unless ``copy``: then one ``read`` per
    request and ``complete`` (the data copied out as bytes)."""
    blocks = disk_size // BLOCK
    sectors_per_block = BLOCK // SECTOR_SIZE
    rng = random.Random(seed)
    with GuestMemory.create([(0, 64 << 20)]) as memory:
        s = Session(Channel.connect(socket, timeout=10.0), memory, timeout=10.0,
                    queue_size=max(128, depth * 2))
        try:
            s.connect()
            s.start()
            q = s.queues[0]
            blk, vq = q.blk, q.vq
            # the random offsets are drawn before the clock starts (qemu-img bench computes
            # its offsets by adding a step, which costs it nothing either)
            offsets = [rng.randrange(blocks) * sectors_per_block for _ in range(1 << 16)]
            sectors = itertools.cycle(offsets)
            islice = itertools.islice
            read, read_many = blk.read, blk.read_many
            complete = blk.complete if copy else blk.complete_views
            submit = s.submit

            def add(n: int) -> None:
                if copy:
                    for _ in range(n):
                        read(next(sectors), sectors_per_block)
                else:
                    read_many(islice(sectors, n), sectors_per_block)
                submit(0)

            done = 0
            add(depth)
            cpu0 = time.process_time()
            start = time.perf_counter()
            deadline = start + seconds
            batch = max(1, depth // 2)
            reap_batch = s.reap_batch
            clock = time.perf_counter
            while True:
                # one notification per half queue of completions, reaped at once
                used = reap_batch(0, batch, timeout=1.0)
                if not used:
                    raise RuntimeError(f"no completion within 1 s ({len(vq.in_flight)} in flight)")
                completions = complete(used)
                done += len(completions)
                for c in completions:
                    if c.status:
                        raise RuntimeError(f"request {c.tag}: status {c.status}")
                if clock() >= deadline:
                    break
                add(len(completions))
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu0
            # let the rest complete so the stop is clean
            s.wait_used(0, len(vq.in_flight), timeout=5.0, on_used=blk.complete)
            s.stop()
        finally:
            s.close()
    return done, elapsed, cpu


@contextmanager
def qsd_null(directory: pathlib.Path) -> Iterator[pathlib.Path]:
    """qemu-storage-daemon 11.1 exporting null-co."""
    with start_qsd(directory / "qsd.sock", NullDisk(DISK_SIZE), version="11.1") as peer:
        yield peer.socket


@contextmanager
def reference(directory: pathlib.Path) -> Iterator[pathlib.Path]:
    """The reference back-end on a RAM disk."""
    sock = directory / "ref.sock"
    process: Supervised = spawn(
        [sys.executable, "-m", "vhost_conformance.backend", "--socket-path", str(sock),
         "--ram-disk", f"{DISK_SIZE >> 20}M"],
        directory / "ref.log", name="reference-backend")
    with process:
        process.wait_for_socket(sock, 15.0)
        yield sock


Starter = Callable[[pathlib.Path], AbstractContextManager[pathlib.Path]]


def best(results: list[Result]) -> Result:
    """The fastest of repeated runs (the machine is shared: slower runs met other load)."""
    top = max(results, key=lambda r: r.iops)
    runs = ", ".join(f"{r.iops:.0f}" for r in results)
    return Result(top.backend, top.frontend, top.requests, top.seconds,
                  note=top.note or (f"best of {len(results)}: {runs}" if len(results) > 1 else ""),
                  cpu=top.cpu)


def measure(name: str, start: Starter, directory: pathlib.Path,
            args: argparse.Namespace) -> list[Result]:
    """Both front-ends against one back-end, alternating ``--repeat`` times (a fresh
    back-end instance for each run); the best run of each."""
    python: list[Result] = []
    c: list[Result] = []
    for _ in range(args.repeat):
        with start(directory) as sock:
            n, t, cpu = python_frontend_iops(sock, seconds=args.seconds, depth=args.depth,
                                             copy=args.copy)
            python.append(Result(name, "python (vhost_conformance)", n, t, cpu=cpu))
        with start(directory) as sock:
            try:
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                iops = qemu_img_bench(sock, count=args.count, depth=args.depth, size=BLOCK,
                                      timeout=120.0)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                # qemu-img is the child reaped in between (its start-up included)
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                c.append(Result(name, "qemu-img bench (libblkio)", args.count,
                                args.count / iops, cpu=cpu))
            except Exception as exc:  # report it in the table, do not abort the run
                c.append(Result(name, "qemu-img bench (libblkio)", 0, 0.0,
                                note=str(exc)[:200]))
    return [best(python), best(c)]


def table(results: list[Result]) -> str:
    """A plain-text table, with the Python/C ratio per back-end."""
    lines = [f"{'back-end':<26} {'front-end':<28} {'requests':>9} {'seconds':>8} {'IOPS':>10}"
             f" {'fe CPU us/req':>13}"]
    for r in results:
        per = r.cpu_us_per_request
        lines.append(f"{r.backend:<26} {r.frontend:<28} {r.requests:>9} {r.seconds:>8.2f} "
                     f"{r.iops:>10.0f} {'-' if per is None else f'{per:.1f}':>13}"
                     + (f"  ({r.note})" if r.note else ""))
    by_backend: dict[str, dict[str, float]] = {}
    for r in results:
        by_backend.setdefault(r.backend, {})[r.frontend.split()[0]] = r.iops
    lines.append("")
    for backend, rates in by_backend.items():
        py, c = rates.get("python", 0.0), rates.get("qemu-img", 0.0)
        ratio = f"{py / c:.3f}" if c else "n/a"
        lines.append(f"{backend}: python / qemu-img = {ratio}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="how long the Python front-end runs per back-end")
    parser.add_argument("--count", type=int, default=200_000,
                        help="requests qemu-img bench submits per back-end")
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2,
                        help="alternate the two front-ends this many times, keep the best")
    parser.add_argument("--backends", default="qsd,reference")
    parser.add_argument("--copy", action="store_true",
                        help="Python front-end: one read() per request and complete() copying "
                             "the data out (the general API) instead of read_many/complete_views")
    parser.add_argument("--profile", type=pathlib.Path,
                        help="cProfile the Python front-end against qsd, write stats here")
    args = parser.parse_args(argv)
    starts: dict[str, tuple[str, Starter]] = {"qsd": ("qemu-storage-daemon 11.1", qsd_null),
              "reference": ("reference back-end", reference)}
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="vc-bench-") as tmp:
        directory = pathlib.Path(tmp)
        if args.profile is not None:
            with qsd_null(directory) as sock:
                profiler = cProfile.Profile()
                profiler.runcall(python_frontend_iops, sock, seconds=args.seconds,
                                 depth=args.depth, copy=args.copy)
                profiler.dump_stats(args.profile)
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            return 0
        for key in args.backends.split(","):
            name, start = starts[key]
            try:
                results += measure(name, start, directory, args)
            except PeerUnavailable as exc:
                results.append(Result(name, "-", 0, 0.0, note=str(exc)))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
