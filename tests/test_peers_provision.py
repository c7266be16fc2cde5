"""peers.provision: the cache directory and the lookup of provisioned peers."""

from __future__ import annotations

import os
import pathlib

import pytest
from vhost_conformance.peers import provision
from vhost_conformance.peers.provision import PeerUnavailable, available, cache_dir, peer_path


def test_cache_dir_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setenv(provision.CACHE_ENV, str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv(provision.CACHE_ENV)
    assert cache_dir() == pathlib.Path("/var/cache/vhost-conformance")


def test_missing_peer_says_how_to_provision_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setenv(provision.CACHE_ENV, str(tmp_path))
    with pytest.raises(PeerUnavailable) as caught:
        peer_path("dpdk-vhost-blk")
    assert caught.value.name == "dpdk-vhost-blk"
    assert str(tmp_path / "bin" / "dpdk-vhost-blk") in caught.value.reason
    assert "scripts/provision-peers --only dpdk-vhost-blk" in str(caught.value)
    assert not available("dpdk-vhost-blk")


def test_qemu_wrappers_point_at_the_trixie_root_step(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setenv(provision.CACHE_ENV, str(tmp_path))
    with pytest.raises(PeerUnavailable, match="--only trixie-root"):
        peer_path("qemu-system-x86_64-11.1")
    with pytest.raises(PeerUnavailable, match="--only guest"):
        peer_path("guest-kernel")


def test_unknown_peer_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv(provision.CACHE_ENV, str(tmp_path))
    with pytest.raises(PeerUnavailable, match=r"'qsd-9\.9'.*unknown peer"):
        peer_path("qsd-9.9")


def test_present_wrapper_is_found_and_must_be_executable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setenv(provision.CACHE_ENV, str(tmp_path))
    wrapper = tmp_path / "bin" / "qsd-7.2"
    wrapper.parent.mkdir()
    wrapper.write_text("#!/bin/sh\n")
    wrapper.chmod(0o644)
    if os.geteuid() != 0:  # root may execute anything with any x bit; this checks the mode only
        with pytest.raises(PeerUnavailable, match="not executable"):
            peer_path("qsd-7.2")
    wrapper.chmod(0o755)
    assert peer_path("qsd-7.2") == wrapper
    assert available("qsd-7.2")


def test_guest_artefacts_are_plain_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setenv(provision.CACHE_ENV, str(tmp_path))
    (tmp_path / "guest").mkdir()
    (tmp_path / "guest" / "initrd.img").write_bytes(b"\x1f\x8b")
    assert peer_path("guest-initrd") == tmp_path / "guest" / "initrd.img"
