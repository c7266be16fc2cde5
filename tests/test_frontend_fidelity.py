"""frontend/fidelity.py: two traces agree when direction, name, flags, size, fd count and the
deterministic payload fields agree; host addresses and a GET_VRING_BASE reply's base may
differ; the guest driver's RESET_DEVICE in QEMU's trace is left out; any other difference is
reported with its position."""

from __future__ import annotations

from vhost_conformance.frontend.channel import WireTrace
from vhost_conformance.frontend.fidelity import differences
from vhost_conformance.frontend.protocol import (
    U64,
    FrontendRequest,
    Message,
    VringAddr,
    VringState,
)

F = FrontendRequest


def _trace(*messages: tuple[str, Message]) -> WireTrace:
    trace = WireTrace()
    for direction, message in messages:
        trace.record(direction, "main", message)  # type: ignore[arg-type]
    return trace


def _session(addr: int, base: int, *, flags: int = 1, reset: bool = False) -> WireTrace:
    msgs: list[tuple[str, Message]] = [
        ("fe->be", Message(F.GET_FEATURES, 1, b"")),
        ("be->fe", Message(F.GET_FEATURES, 5, U64(1 << 32).encode())),
    ]
    if reset:
        msgs.append(("fe->be", Message(F.RESET_DEVICE, 1, b"")))
    msgs += [
        ("fe->be", Message(F.SET_FEATURES, flags, U64(1 << 32).encode())),
        ("fe->be", Message(F.SET_VRING_ADDR, 1, VringAddr(0, 0, addr, addr + 4096,
                                                          addr + 2048, 0).encode())),
        ("fe->be", Message(F.GET_VRING_BASE, 1, VringState(0, 0).encode())),
        ("be->fe", Message(F.GET_VRING_BASE, 5, VringState(0, base).encode())),
    ]  # fmt: skip
    return _trace(*msgs)


def test_agreeing_traces() -> None:
    """Host addresses, the stop's base and the guest's RESET_DEVICE do not count."""
    emulated = _session(0x7F0000000000, 4).entries()
    real = _session(0x7E0000000000, 33, reset=True).entries()
    assert differences(emulated, real) == []


def test_flags_difference_is_reported() -> None:
    """NEED_REPLY on QEMU's SET_FEATURES but not on ours: one line naming position 2."""
    found = differences(_session(1, 1).entries(), _session(1, 1, flags=9).entries())
    assert len(found) == 1 and found[0].startswith("message 2:") and "flags=0x9" in found[0]


def test_missing_message_is_reported() -> None:
    """QEMU sent a message more than the emulation."""
    real = _session(1, 1).entries()
    extra = _trace(("fe->be", Message(F.SET_STATUS, 1, U64(0).encode()))).entries()
    found = differences(real, [*real, *extra])
    assert found == ["QEMU has 1 more message(s): fe->be SET_STATUS flags=0x1 size=8 fds=0 value=0"]
