"""The back-end's dispatch table: one handler per request, typed by its decoded payload."""

from __future__ import annotations

from types import NoneType

import pytest
from vhost_conformance.backend.core import RequestError
from vhost_conformance.backend.device import HANDLERS, Device, Handler
from vhost_conformance.frontend.protocol import (
    REQUEST_PAYLOAD,
    U64,
    FrontendRequest,
    Message,
    VringState,
)


def test_each_handler_takes_what_the_codec_decodes() -> None:
    """The payload type of every handler is the request's layout in the codec's table."""
    for request, handler in HANDLERS.items():
        layout = REQUEST_PAYLOAD[request]
        assert handler.payload is (NoneType if layout is None else layout), request.name


def test_a_payload_of_another_type_is_refused() -> None:
    """The dispatcher's one isinstance check names the request and both types."""
    calls: list[object] = []

    def method(device: Device, msg: Message, payload: VringState, fds: list[int]) -> None:
        calls.append(payload)

    handler = Handler(VringState, method)
    device = object.__new__(Device)  # run() never looks at the device before the check
    msg = Message(FrontendRequest.SET_VRING_NUM, 0x1, b"")
    with pytest.raises(RequestError, match="SET_VRING_NUM: payload decoded as U64, the "
                                           "handler takes VringState"):
        handler.run(device, FrontendRequest.SET_VRING_NUM, msg, U64(1), [])
    assert calls == []
    handler.run(device, FrontendRequest.SET_VRING_NUM, msg, VringState(0, 8), [])
    assert calls == [VringState(0, 8)]

