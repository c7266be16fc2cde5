"""The back-end under test: one ``typing.Protocol`` and its launch strategies.

A back-end under test is reached one of three ways (DESIGN.md "The back-end under test"):

- :class:`CommandTarget`: we run a command template (placeholders ``{socket}``, ``{disk}``,
  ``{workdir}``, ...); the back-end listens on ``{socket}`` (the default) and we connect;
- :class:`CommandTarget` with ``socket_mode = "connect"`` (``--vhost-backend-connects``): we
  listen on ``{socket}`` and the back-end connects to us; the command is optional (someone
  else may start the back-end and point it at our socket);
- :class:`ExternalSocketTarget`: someone else runs the back-end; we only know its socket.

Profiles (``suites/profiles/*.toml`` or a user's TOML file with the same keys) describe a
back-end: command, socket mode, disk size, how to make its I/O slow, whether two instances can
share one disk, and known deviations. Every target owns its work directory (socket, disk image,
log), named by the pytest-xdist worker id, so that any split of the cases over workers works.

Each job has its module; this one names them all for callers (``from ...suites.target import``):

| module | what |
|---|---|
| ``target_protocol`` | ``BackendTarget`` and ``CapabilityProbe`` (the protocols), deadlines, socket helpers |
| ``target_command`` | ``CommandTarget`` (we run the command) and ``python_env`` |
| ``target_external`` | ``ExternalSocketTarget`` (someone else runs it) |
| ``target_factory`` | ``TargetFactory`` (one target per case, pre-started pool, probe once) |
| ``profile`` | ``Profile`` and its loaders, command templates, device-type scoping |
| ``target_errors`` | ``TargetError`` and its kinds, ``UsageError`` |
| ``capabilities`` | ``Capabilities`` and the wire probe |
"""

from __future__ import annotations

from vhost_conformance.suites.capabilities import Capabilities as Capabilities
from vhost_conformance.suites.capabilities import Feature as Feature
from vhost_conformance.suites.capabilities import feature_label as feature_label
from vhost_conformance.suites.capabilities import probe_capabilities as probe_capabilities
from vhost_conformance.suites.profile import BLK_REQUEST_CASES as BLK_REQUEST_CASES
from vhost_conformance.suites.profile import COMMAND_PLACEHOLDERS as COMMAND_PLACEHOLDERS
from vhost_conformance.suites.profile import CONTROL_PLANE_FAMILIES as CONTROL_PLANE_FAMILIES
from vhost_conformance.suites.profile import QUEUES_PLACEHOLDERS as QUEUES_PLACEHOLDERS
from vhost_conformance.suites.profile import SLOW_IO_PLACEHOLDERS as SLOW_IO_PLACEHOLDERS
from vhost_conformance.suites.profile import Profile as Profile
from vhost_conformance.suites.profile import ProfileDeviation as ProfileDeviation
from vhost_conformance.suites.profile import SlowIo as SlowIo
from vhost_conformance.suites.profile import SocketMode as SocketMode
from vhost_conformance.suites.profile import builtin_profile_names as builtin_profile_names
from vhost_conformance.suites.profile import cache_dir as cache_dir
from vhost_conformance.suites.profile import check_template as check_template
from vhost_conformance.suites.profile import command_profile as command_profile
from vhost_conformance.suites.profile import connecting_profile as connecting_profile
from vhost_conformance.suites.profile import load_profile as load_profile
from vhost_conformance.suites.profile import parse_size as parse_size
from vhost_conformance.suites.profile import profile_from_mapping as profile_from_mapping
from vhost_conformance.suites.profile import render_command as render_command
from vhost_conformance.suites.profile import template_fields as template_fields
from vhost_conformance.suites.target_command import CommandTarget as CommandTarget
from vhost_conformance.suites.target_command import python_env as python_env
from vhost_conformance.suites.target_errors import BackendStartFailed as BackendStartFailed
from vhost_conformance.suites.target_errors import BackendStartHang as BackendStartHang
from vhost_conformance.suites.target_errors import SlowIoUnsupported as SlowIoUnsupported
from vhost_conformance.suites.target_errors import TargetError as TargetError
from vhost_conformance.suites.target_errors import UsageError as UsageError
from vhost_conformance.suites.target_external import ExternalSocketTarget as ExternalSocketTarget
from vhost_conformance.suites.target_factory import TargetFactory as TargetFactory
from vhost_conformance.suites.target_protocol import (
    DEFAULT_CONNECT_TIMEOUT as DEFAULT_CONNECT_TIMEOUT,
)
from vhost_conformance.suites.target_protocol import DEFAULT_START_TIMEOUT as DEFAULT_START_TIMEOUT
from vhost_conformance.suites.target_protocol import DEFAULT_STOP_TIMEOUT as DEFAULT_STOP_TIMEOUT
from vhost_conformance.suites.target_protocol import BackendTarget as BackendTarget
from vhost_conformance.suites.target_protocol import CapabilityProbe as CapabilityProbe
