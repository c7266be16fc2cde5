#!/usr/bin/env python3
"""The watched disk's overhead: the reference back-end on a plain file next to the same back-end
on the watched disk (suites/watched.py, latency 0, journal on), 4 KiB random reads at queue
depth 32 from the Python front-end (bench/iops.py's data path), in the same run.

The two variants alternate ``--repeat`` times and the best run of each is shown (the machine
is shared). Prints IOPS, front-end CPU us/request and the ratio watched / plain. Usage::

    .venv/bin/python bench/watched_disk.py [--seconds 3] [--depth 32] [--repeat 3]

Not a test: nothing is asserted. Needs root and /dev/fuse (scripts/provision-peers --only fuse).
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import sys
import tempfile
from collections.abc import Iterator

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from iops import Result, best, python_frontend_iops
from vhost_conformance.peers.process import Supervised, spawn
from vhost_conformance.suites import watched

DISK_SIZE = 256 << 20


@contextlib.contextmanager
def reference_on(disk: pathlib.Path, directory: pathlib.Path) -> Iterator[pathlib.Path]:
    """The reference back-end serving ``disk``."""
    sock = directory / f"ref-{disk.parent.name}.sock"
    process: Supervised = spawn(
        [sys.executable, "-m", "vhost_conformance.backend", "--socket-path", str(sock),
         "--disk", str(disk)], directory / "ref.log", name="reference-backend")
    with process:
        process.wait_for_socket(sock, 15.0)
        yield sock


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    reason = watched.unavailable()
    if reason is not None:
        print(f"watched disk unavailable: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="vc-bench-watched-") as tmp:
        directory = pathlib.Path(tmp)
        plain = directory / "plain" / "disk.img"
        plain.parent.mkdir()
        with open(plain, "wb") as f:
            f.truncate(DISK_SIZE)
        runs: dict[str, list[Result]] = {"plain file": [], "watched disk": []}
        with watched.watched(plain, directory / "mnt") as disk:
            for _ in range(args.repeat):
                for name, path in (("plain file", plain), ("watched disk", disk.path)):
                    with reference_on(path, directory) as sock:
                        done, elapsed, cpu = python_frontend_iops(
                            sock, seconds=args.seconds, depth=args.depth, disk_size=DISK_SIZE)
                    runs[name].append(Result("reference", name, done, elapsed, cpu=cpu))
            journaled = len(disk.journal())
        plain_best, watched_best = best(runs["plain file"]), best(runs["watched disk"])
        print(f"reference back-end, 4 KiB random reads, QD{args.depth}, best of {args.repeat}")
        print("| disk | IOPS | fe CPU us/req |")
        print("|---|---:|---:|")
        for r in (plain_best, watched_best):
            print(f"| {r.frontend} | {r.iops:,.0f} | {r.cpu_us_per_request or 0:.1f} |")
        print(f"ratio watched / plain: {watched_best.iops / plain_best.iops:.3f} "
              f"(journal entries: {journaled}, reads are not journaled)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
