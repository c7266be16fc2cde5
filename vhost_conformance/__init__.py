"""vhost-conformance: an implementation-neutral conformance suite for vhost-user back-ends.

The distribution maps four top-level folders of the repository to sub-packages:
``frontend/`` (a QEMU-like vhost-user front-end, a library), ``backend/`` (the reference
vhost-user-blk back-end), ``suites/`` (conformance cases and the pytest plugin) and
``reports/`` (result model and its renderings).
"""

from __future__ import annotations

__version__ = "0.1.0"
