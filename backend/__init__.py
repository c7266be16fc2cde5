"""The reference vhost-user-blk back-end (a program and a library).

It shares only the wire codec (:mod:`vhost_conformance.frontend.protocol`) with the front-end.

Program: ``python -m vhost_conformance.backend`` / ``vhost-conformance-backend``
(:mod:`.__main__`, ``--help`` lists the options). Library, bottom-up:

- :mod:`.disk` -- ``Disk.open_file`` / ``Disk.ram``: preadv/pwritev into guest buffers.
- :mod:`.memory` -- ``GuestMemory`` (regions, GPA and user-address translation),
  ``DirtyLog`` (SET_LOG_BASE bitmap), ``full_barrier``.
- :mod:`.inflight` -- the in-flight region: ``SplitInflight``, ``PackedInflight`` (update and
  recovery rules of vhost-user.rst "Inflight I/O tracking"), ``queue_region_stride``.
- :mod:`.vring` -- device-side ``SplitRing`` / ``PackedRing``: chain validation, used
  entries, notification suppression.
- :mod:`.blk` -- virtio-blk config space and request execution.
- :mod:`.faults` -- ``--crash-at`` points and ``--fail-rate``.
- :mod:`.device` -- ``Device``: one connection's message state machine, queues, in-flight
  tracking, drain / bit-20 suspend, request scheduling (sans sockets).
- :mod:`.server` -- ``Server``: the single-threaded selectors event loop (listen / connect).
"""
