"""frontend.sequences: the steps per profile, partial selection, the negotiation rule."""

from __future__ import annotations

import pytest
from vhost_conformance.frontend.device import PROFILES
from vhost_conformance.frontend.protocol import ProtocolFeature
from vhost_conformance.frontend.sequences import (
    GET_CONFIG_LEN,
    QEMU_PROTOCOL_MASK,
    SEQUENCES,
    agree_protocol,
)

P = ProtocolFeature


def test_every_profile_has_its_sequences_and_one_config_len() -> None:
    assert set(SEQUENCES) == set(PROFILES)
    assert {p.config_len for p in PROFILES.values()} == {GET_CONFIG_LEN}


def test_qemu_11_1_start_and_stop_order() -> None:
    seqs = SEQUENCES["qemu-11.1"]
    names = seqs.start.names
    # QEMU-TRACES correction 5 and 12: kick injected after SET_VRING_KICK, DRIVER_OK last
    assert names.index("SET_VRING_KICK") + 1 == names.index("inject kick")
    assert names[-1] == "SET_STATUS DRIVER_OK"
    assert seqs.stop.names == ("SET_VRING_ENABLE 0", "GET_VRING_BASE", "SET_STATUS 0")


def test_qemu_7_2_has_no_status_and_no_injection() -> None:
    seqs = SEQUENCES["qemu-7.2"]
    assert not any("STATUS" in n or n == "inject kick" for n in seqs.start.names + seqs.stop.names)


def test_partial_selection() -> None:
    start = SEQUENCES["qemu-11.1"].start
    first = start.select(until="SET_VRING_ADDR")
    second = start.select(begin="SET_VRING_KICK", without=["inject kick"])
    assert [s.name for s in first] + [s.name for s in second] == [
        n for n in start.names if n != "inject kick"
    ]
    # a step a profile leaves out may be named in without=, any other unknown name is refused
    assert SEQUENCES["qemu-7.2"].start.select(without=["inject kick"])
    with pytest.raises(ValueError, match="no step"):
        start.select(until="SET_VRING_KIK")


def test_agree_protocol_is_qemus_rule() -> None:
    offer = (1 << P.XEN_MMAP) | (1 << P.GET_VRING_BASE_INFLIGHT) | (1 << P.REPLY_ACK) | (1 << 40)
    agreed = agree_protocol(offer)
    assert agreed == 1 << P.REPLY_ACK  # XEN_MMAP dropped, bit 20 without 12 dropped, unknown masked
    with_12 = offer | (1 << P.INFLIGHT_SHMFD)
    assert agree_protocol(with_12) & (1 << P.GET_VRING_BASE_INFLIGHT)
    assert not agree_protocol(with_12, inflight_migration=False) & (1 << P.GET_VRING_BASE_INFLIGHT)
    assert agree_protocol(with_12, wanted=1 << P.INFLIGHT_SHMFD) == 1 << P.INFLIGHT_SHMFD
    assert agree_protocol(QEMU_PROTOCOL_MASK + 1) == 0


def test_qemu_next_tracks_the_skip_drain_proposal() -> None:
    """qemu-next (a proposal, not a release): 11.1.3's order; bit 23 known and agreed only
    with bits 20 and 12; the default profile stays qemu-11.1 and masks bit 23 off."""
    from vhost_conformance.frontend.device import Session

    assert PROFILES["qemu-next"].skip_drain and PROFILES["qemu-next"].proposal
    assert not PROFILES["qemu-11.1"].skip_drain and PROFILES["qemu-11.1"].proposal is None
    assert SEQUENCES["qemu-next"].stop.names == SEQUENCES["qemu-11.1"].stop.names
    assert SEQUENCES["qemu-next"].start.names == SEQUENCES["qemu-11.1"].start.names
    assert Session.__init__.__kwdefaults__["profile"] == "qemu-11.1"
    full = sum(1 << b for b in (P.REPLY_ACK, P.INFLIGHT_SHMFD, P.GET_VRING_BASE_INFLIGHT,
                                P.GET_VRING_BASE_SKIP_DRAIN))
    bit23 = 1 << P.GET_VRING_BASE_SKIP_DRAIN
    assert not agree_protocol(full) & bit23  # 11.1.3 does not know it
    assert agree_protocol(full, skip_drain=True) == full
    assert not agree_protocol(full, skip_drain=True, inflight_migration=False) & bit23
    without_20 = full & ~(1 << P.GET_VRING_BASE_INFLIGHT)
    assert not agree_protocol(without_20, skip_drain=True) & bit23
    without_12 = full & ~(1 << P.INFLIGHT_SHMFD)
    assert not agree_protocol(without_12, skip_drain=True) & bit23
    assert not agree_protocol(full, skip_drain=True, wanted=full & ~(1 << 20)) & bit23


def test_connect_is_one_sequence_for_every_profile() -> None:
    """QEMU's connect (vhost_dev_init, then GET_CONFIG at realize) as named steps, the same
    for every profile; SET_OWNER after the protocol negotiation, the rings' call and error
    eventfds before GET_CONFIG (QEMU-TRACES (a))."""
    names = SEQUENCES["qemu-11.1"].connect.names
    assert {s.connect.names for s in SEQUENCES.values()} == {names}
    assert names[0] == "GET_FEATURES" and names[-1] == "GET_CONFIG"
    assert names.index("SET_PROTOCOL_FEATURES") < names.index("SET_OWNER") < names.index(
        "GET_FEATURES again") < names.index("SET_VRING_CALL") < names.index("SET_VRING_ERR")
    assert [s.name for s in SEQUENCES["qemu-7.2"].connect.select(until="SET_OWNER")][-1] == (
        "SET_OWNER")


def test_after_hooks_run_once_a_step_is_done_for_every_queue() -> None:
    """Steps.run's ``after``: a per-queue step's hook runs once, after its last queue; a
    hook on a step the sequence lacks is refused unless a profile may leave it out."""
    from types import SimpleNamespace

    from vhost_conformance.frontend.sequences import Run, Step, Steps

    log: list[str] = []

    def record(name: str) -> Step:
        per_queue = name.startswith("per")
        return Step(name, lambda _s, _r, q: log.append(f"{name}{'' if q is None else q}"),
                    per_queue=per_queue)

    seq = Steps("test", (record("first"), record("per-a"), record("per-b"), record("last")))
    session = SimpleNamespace(queues=[0, 1])
    seq.run(session, Run(), seq.steps,  # type: ignore[arg-type]
            {"first": lambda: log.append("after first"), "per-a": lambda: log.append("after a"),
             "SET_STATUS 0": lambda: log.append("never")})
    assert log == ["first", "after first", "per-a0", "per-b0", "per-a1", "per-b1", "after a",
                   "last"]
    with pytest.raises(ValueError, match="no step 'lats'"):
        seq.run(session, Run(), seq.steps, {"lats": lambda: None})  # type: ignore[arg-type]
