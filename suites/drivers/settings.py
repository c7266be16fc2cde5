"""Numbers the suite reads from the environment (a case's tunable), each refused with a
clear usage error naming the variable when it does not parse or is out of range."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import pytest

N = TypeVar("N", int, float)


def env_number(name: str, default: N, convert: Callable[[str], N],
               valid: Callable[[N], bool], what: str) -> N:  # fmt: skip
    """``$name`` converted by ``convert`` (``default`` when unset or empty); a value that does
    not convert or is not ``valid`` raises ``pytest.UsageError`` "$name must be <what>"."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = convert(raw)
    except ValueError:
        raise pytest.UsageError(f"${name} must be {what}, got {raw!r}") from None
    if not valid(value):
        raise pytest.UsageError(f"${name} must be {what}, got {raw!r}")
    return value
