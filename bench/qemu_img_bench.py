#!/usr/bin/env python3
"""``qemu-img bench`` (QEMU 11.1.3's libblkio driver ``virtio-blk-vhost-user``, a C front-end)
against the reference back-end and against qemu-storage-daemon 11.1.3, in the same run and on the
same kind of disk; prints IOPS per back-end and the ratio reference / qemu-storage-daemon.

Disk kinds (``--disk-kind``):

- ``file`` (default): both serve one raw image file in a temporary directory (page cache, no
  O_DIRECT on either side): reference ``--disk FILE``, qemu-storage-daemon ``driver=file``.
- ``ram``: reference ``--ram-disk`` (a memfd, data kept) and qemu-storage-daemon ``null-co``
  (no data kept: a lower bound on its cost, so the ratio flatters it).

Usage::

    .venv/bin/python bench/qemu_img_bench.py [--count 50000] [--depth 32] [--runs 3]
        [--disk-kind file|ram] [--write] [--size-mb 256]

Each back-end gets ``--runs`` runs (interleaved, a fresh back-end each) of ``qemu-img bench -c COUNT -d DEPTH -s 4096 -t none``
(random offsets, 4 KiB) and the median is reported. Not a test: nothing is asserted; the machine
has 2 cores that QEMU and the back-end share.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from vhost_conformance.peers.process import Supervised, spawn
from vhost_conformance.peers.provision import PeerUnavailable, peer_path
from vhost_conformance.peers.qemu import qemu_img_bench
from vhost_conformance.peers.qsd import FileDisk, NullDisk, create_raw_image, start_qsd


@contextmanager
def reference_backend(
    sock: pathlib.Path, disk_kind: str, image: pathlib.Path, size: int
) -> Iterator[Supervised]:
    """The reference back-end serving ``image`` (file) or a RAM disk of ``size`` bytes."""
    disk = ["--disk", str(image)] if disk_kind == "file" else ["--ram-disk", str(size)]
    argv = [
        sys.executable, "-m", "vhost_conformance.backend", "--socket-path", str(sock), *disk,
    ]  # fmt: skip
    with spawn(argv, sock.with_suffix(".log"), name="reference-backend") as process:
        process.wait_for_socket(sock, timeout=10)
        yield process


@contextmanager
def qsd_backend(
    sock: pathlib.Path, disk_kind: str, image: pathlib.Path, size: int
) -> Iterator[object]:
    """qemu-storage-daemon 11.1.3 exporting ``image`` (driver=file) or null-co of ``size``."""
    disk = FileDisk(image) if disk_kind == "file" else NullDisk(size)
    with start_qsd(sock, disk, version="11.1") as peer:
        yield peer


Starter = Callable[[pathlib.Path, str, pathlib.Path, int], AbstractContextManager[object]]
BACKENDS: dict[str, Starter] = {
    "reference": reference_backend,
    "qemu-storage-daemon-11.1": qsd_backend,
}


def measure_once(
    name: str, run: int, work: pathlib.Path, args: argparse.Namespace, image: pathlib.Path
) -> float:
    """IOPS of one qemu-img bench run against a fresh start of back-end ``name``."""
    sock = work / f"{name}-{run}.sock"
    with BACKENDS[name](sock, args.disk_kind, image, args.size_mb << 20):
        iops = qemu_img_bench(
            sock, count=args.count, depth=args.depth, write=args.write, timeout=300
        )
    print(f"  run {run + 1} {name}: {iops:,.0f} IOPS", flush=True)
    return iops


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns 0, or 2 when a peer is not provisioned."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=50000, help="requests per run")
    p.add_argument("--depth", type=int, default=32, help="queue depth")
    p.add_argument("--runs", type=int, default=3, help="runs per back-end (median reported)")
    p.add_argument("--disk-kind", choices=["file", "ram"], default="file")
    p.add_argument("--write", action="store_true", help="writes instead of reads")
    p.add_argument("--size-mb", type=int, default=256, help="disk size (MiB)")
    args = p.parse_args(argv)
    try:
        for peer in ("qemu-img-11.1", "qsd-11.1"):
            peer_path(peer)
    except PeerUnavailable as exc:
        print(f"qemu_img_bench: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="qemu-img-bench-") as tmp:
        work = pathlib.Path(tmp)
        image = create_raw_image(work / "disk.img", args.size_mb << 20)
        if args.disk_kind == "file":
            # Fill it, so reads hit allocated pages in both back-ends, not holes.
            with open(image, "r+b") as f:
                chunk = bytes(range(256)) * 4096
                for _ in range((args.size_mb << 20) // len(chunk)):
                    f.write(chunk)
        op = "write" if args.write else "read"
        print(
            f"qemu-img bench (libblkio virtio-blk-vhost-user), 4 KiB random {op}s, depth "
            f"{args.depth}, {args.count} requests x {args.runs} runs, disk: {args.disk_kind}"
        )
        t0 = time.monotonic()
        # Interleaved, so a burst of load on the machine hits both back-ends alike.
        seen: dict[str, list[float]] = {name: [] for name in BACKENDS}
        for run in range(args.runs):
            for name in BACKENDS:
                seen[name].append(measure_once(name, run, work, args, image))
        medians = {name: statistics.median(values) for name, values in seen.items()}
    print(f"\n{'back-end':<28}{'median IOPS':>14}")
    for name, iops in medians.items():
        print(f"{name:<28}{iops:>14,.0f}")
    ratio = medians["reference"] / medians["qemu-storage-daemon-11.1"]
    print(
        f"ratio reference / qemu-storage-daemon-11.1: {ratio:.3f} "
        f"({time.monotonic() - t0:.1f} s in all)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
