"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture
def short_dir() -> Iterator[pathlib.Path]:
    """A short directory (Unix socket paths must stay under 108 bytes)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="vct-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
