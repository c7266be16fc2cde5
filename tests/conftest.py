"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from collections.abc import Iterator

import hypothesis.strategies  # noqa: F401  (see below)
import pytest

# Imported here, before any test: pytester's fixture snapshots sys.modules and, at its
# teardown, drops every module imported during the test. Hypothesis modules first imported
# inside a pytester test were dropped and re-imported half, and a later hypothesis test saw
# two SearchStrategy classes ("Expected a SearchStrategy but got ... (type=LazyStrategy)").


@pytest.fixture
def short_dir() -> Iterator[pathlib.Path]:
    """A short directory (Unix socket paths must stay under 108 bytes)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="vct-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
