"""``TargetFactory``: one back-end under test per case (own work dir, socket, disk, process),
named by the xdist worker, pre-started instances (``prestart``), and the capability probe and
device type, each found once per run."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from vhost_conformance.suites.capabilities import (
    Capabilities,
    probe_capabilities,
)
from vhost_conformance.suites.device_type import (
    DEFAULT_DEVICE_TYPE,
    DeviceType,
    from_print_capabilities,
)
from vhost_conformance.suites.profile import Profile
from vhost_conformance.suites.target_command import CommandTarget
from vhost_conformance.suites.target_errors import (
    BackendStartFailed,
    BackendStartHang,
    TargetError,
    UsageError,
)
from vhost_conformance.suites.target_external import ExternalSocketTarget
from vhost_conformance.suites.target_protocol import DEFAULT_START_TIMEOUT, BackendTarget

_LABEL = re.compile(r"[^A-Za-z0-9_.-]+")


class TargetFactory:
    """Makes one back-end under test per case (own work dir, socket, disk, process), named by
    the xdist worker, and probes capabilities once per run on a dedicated instance."""

    def __init__(
        self,
        *,
        profile: Profile | None = None,
        external_socket: str | None = None,
        worker: str = "main",
        rundir: Path | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        probe_timeout: float = 5.0,
        maker: Callable[[str, Path], BackendTarget | None] | None = None,
    ) -> None:
        if (profile is None) == (external_socket is None):
            raise UsageError("give exactly one of a back-end profile or an external socket")
        self.profile = profile
        self.external_socket = external_socket
        self.worker = worker
        self.start_timeout = start_timeout
        self.probe_timeout = probe_timeout
        self.maker = maker
        base = os.environ.get("VHOST_CONFORMANCE_RUNDIR", tempfile.gettempdir())
        self.rundir = rundir or Path(tempfile.mkdtemp(prefix=f"vc-{worker}-", dir=base))
        self._count = itertools.count(1)
        self._targets: list[BackendTarget] = []
        #: pre-started instances (profile.prestart), oldest first; each is handed out once
        self._pool: list[CommandTarget] = []
        self.pool_hits = 0
        self._capabilities: Capabilities | None = None
        self._probe_error: TargetError | None = None
        self._device_type: DeviceType | None = None

    @property
    def name(self) -> str:
        """The back-end's name for reports."""
        return self.profile.name if self.profile is not None else "external"

    @property
    def command(self) -> str | None:
        """The command template, if we run the back-end."""
        return self.profile.command if self.profile is not None else None

    @property
    def prestart(self) -> int:
        """How many instances are kept pre-started (the profile's ``prestart``, listen mode)."""
        profile = self.profile
        if profile is None or profile.command is None or profile.socket_mode != "listen":
            return 0
        return profile.prestart

    def _workdir(self, label: str) -> Path:
        return self.rundir / f"{next(self._count):03d}-{_LABEL.sub('_', label)[:32]}"

    def _fill_pool(self) -> None:
        """Launch instances until ``prestart`` are waiting (no wait for them to listen)."""
        while len(self._pool) < self.prestart:
            assert self.profile is not None
            target = CommandTarget(
                self.profile,
                self._workdir("prestarted"),
                worker=self.worker,
                start_timeout=self.start_timeout,
                probe=self,
            )
            try:
                target.launch()
            except TargetError:
                # the ordinary start path will run it again and report the failure
                target.stop()
                self._forget(target)
                return
            self._targets.append(target)
            self._pool.append(target)

    def warm(self) -> None:
        """Launch the pre-started instances now (e.g. while pytest finishes collecting)."""
        if self.prestart:
            self._fill_pool()

    def _from_pool(self) -> CommandTarget | None:
        """A pre-started instance still running (dead ones are discarded), or None."""
        while self._pool:
            target = self._pool.pop(0)
            if target.alive():
                self.pool_hits += 1
                return target
            target.stop()
            self._forget(target)
        return None

    def new(self, label: str = "case") -> BackendTarget:
        """A new back-end in its own work directory, used by one case only: a pre-started
        instance (``prestart``; start() then waits until it listens) or a not yet started one."""
        workdir = self._workdir(label)
        target: BackendTarget | None = None
        if self.maker is not None:
            target = self.maker(label, workdir)
        if target is None and self.prestart:
            self._fill_pool()
            target = self._from_pool()
            self._fill_pool()
            if target is not None:
                return target
        if target is None:
            if self.profile is not None:
                target = CommandTarget(
                    self.profile,
                    workdir,
                    worker=self.worker,
                    start_timeout=self.start_timeout,
                    probe=self,
                )
            else:
                assert self.external_socket is not None
                target = ExternalSocketTarget(self.external_socket, probe=self)
        self._targets.append(target)
        return target

    def device_type(self) -> DeviceType:
        """The device type (suites.device_type): the profile's, else the ``type`` its
        ``print_capabilities`` command prints (run once), else block."""
        if self._device_type is None:
            profile = self.profile
            if profile is not None and profile.device_type is not None:
                self._device_type = DeviceType(profile.device_type, "the profile's device_type")
            elif profile is not None and profile.print_capabilities is not None:
                workdir = self._workdir("device-type")
                workdir.mkdir(parents=True, exist_ok=True)
                probe = CommandTarget(profile, workdir, worker=self.worker)
                argv = probe.print_capabilities_argv()
                assert argv is not None
                self._device_type = from_print_capabilities(argv, workdir)
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                self._device_type = DeviceType(
                    DEFAULT_DEVICE_TYPE, "neither a device_type nor a print_capabilities command"
                )
        return self._device_type

    def capabilities(self) -> Capabilities:
        """Probe once (a dedicated instance, stopped afterwards), then the cached result."""
        if self._capabilities is not None:
            return self._capabilities
        if self._probe_error is not None:
            raise self._probe_error
        target = self.new("probe")
        try:
            target.start()
            with contextlib.closing(target.connect_socket(self.probe_timeout)) as sock:
                self._capabilities = probe_capabilities(
                    sock, self.probe_timeout, device_type=self.device_type().name
                )
        except TargetError as exc:
            if isinstance(exc, BackendStartHang | BackendStartFailed) and not exc.log_tail:
                exc.log_tail = target.log_tail()
            if isinstance(exc, BackendStartFailed) and exc.exit_status is None:
                # EOF can reach us a moment before the dying process is reapable
                if isinstance(target, CommandTarget):
                    target.wait_exit(1.0)
                if not target.alive():
                    exc.exit_status = target.exit_status()
            self._probe_error = exc
            raise
        finally:
            target.stop()
            self._forget(target)
        return self._capabilities

    def _forget(self, target: BackendTarget) -> None:
        with contextlib.suppress(ValueError):
            self._targets.remove(target)
        workdir = getattr(target, "workdir", None)
        if isinstance(workdir, Path):
            shutil.rmtree(workdir, ignore_errors=True)

    def release(self, target: BackendTarget, *, keep_files: bool = False) -> None:
        """Stop a target made here and (unless ``keep_files``) remove its work directory."""
        target.stop()
        if keep_files:
            with contextlib.suppress(ValueError):
                self._targets.remove(target)
        else:
            self._forget(target)

    def close(self) -> None:
        """Stop every target still running (pre-started ones too) and remove the run directory."""
        self._pool.clear()
        for target in list(self._targets):
            with contextlib.suppress(Exception):
                target.stop()
        self._targets.clear()
        shutil.rmtree(self.rundir, ignore_errors=True)
