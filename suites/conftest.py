"""Make the shared I/O fixtures of :mod:`vhost_conformance.suites.drivers` visible to the
suite modules (the plugin's own fixtures come from its ``pytest11`` entry point)."""

from __future__ import annotations

from vhost_conformance.suites.drivers import (
    make_session,
    pytest_configure,
    vhost_memory,
    vhost_session,
)

__all__ = ["make_session", "pytest_configure", "vhost_memory", "vhost_session"]
