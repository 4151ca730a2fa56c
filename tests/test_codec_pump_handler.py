"""PumpHandler: the reactor's handler for Twilio's socket while the uplink pump serves it.

The compiled relay.media._codec.PumpHandler must do what its reference in
relay.media.codec_ref does, on real sockets: fall back to the layered path when it is not
armed or the sockets are not pumpable, count a read sent whole itself (the same counters
the call kept before, relay.media.call), hand mark echoes, every other outcome and every
exception to the call's hooks, and never swallow one.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from frame_cases import frame
from test_codec_twilio_uplink import b64, dtmf, mark, media
from test_codec_uplink_pump import IMPLS, Rig, append

from relay.media import _codec
from relay.media.websocket import OP_TEXT, ProtocolViolation


class Side:
    """Stands in for a WebSocket: the counters the handler keeps and ``pumpable``."""

    def __init__(self) -> None:
        self.messages_in = 0
        self.messages_out = 0
        self.ok = True
        self.asked: list[object] = []

    def pumpable(self, to: object) -> bool:
        self.asked.append(to)
        return self.ok


class Metrics:
    def __init__(self) -> None:
        self.frames_in = 0
        self.uplink_pumped = 0


class Latency:
    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.values.append(value)


class Handled:
    """A PumpHandler on a Rig, with every hook recording what it was given (or the hook
    passed for it)."""

    def __init__(
        self,
        impl: ModuleType,
        on_marks: Callable[[list[str]], object] | None = None,
        on_error: Callable[[Exception], object] | None = None,
        latency: Any = None,
    ) -> None:
        self.rig = Rig(impl)
        self.source, self.dest = Side(), Side()
        self.metrics = Metrics()
        self.latency = Latency() if latency is None else latency
        self.calls: list[tuple[Any, ...]] = []
        self.handler = impl.PumpHandler(
            self.rig.pump,
            self.source,
            self.dest,
            self.metrics,
            self.latency,
            lambda: self.calls.append(("fallback",)),
            on_marks or (lambda marks: self.calls.append(("marks", list(marks)))),
            lambda code, t0: self.calls.append(("result", code, t0)),
            on_error or (lambda exc: self.calls.append(("error", exc))),
        )

    def counters(self) -> tuple[int, int, int, int]:
        m = self.metrics
        return self.source.messages_in, self.dest.messages_out, m.frames_in, m.uplink_pumped

    def close(self) -> None:
        self.rig.close()


@pytest.fixture(params=IMPLS)
def h(request: pytest.FixtureRequest) -> Any:
    handled = Handled(request.param)
    yield handled
    handled.close()


def test_a_read_sent_whole_is_counted_without_the_call(h: Handled) -> None:
    one, two = b"\x01" * 160, b"\x02" * 160
    h.rig.twilio_peer.sendall(media(0, one) + media(20, two))
    h.handler()
    assert h.calls == []
    assert h.counters() == (2, 2, 2, 1)
    assert len(h.latency.values) == 1 and 0.0 <= h.latency.values[0] < 5.0
    assert h.rig.agent_messages() == [append(b64(one)), append(b64(two))]
    assert h.source.asked == [h.dest]


def test_mark_echoes_go_to_the_call_and_count_as_messages_in(h: Handled) -> None:
    audio = b"\x03" * 160
    h.rig.twilio_peer.sendall(mark("m1") + media(0, audio) + mark("m2"))
    h.handler()
    assert h.calls == [("marks", ["m1", "m2"])]
    assert h.counters() == (3, 1, 1, 1)
    assert len(h.latency.values) == 1


def test_nothing_to_read_touches_nothing(h: Handled) -> None:
    h.handler()
    assert h.calls == [] and h.counters() == (0, 0, 0, 0) and h.latency.values == []


@pytest.mark.parametrize("why", ["disarmed", "not pumpable"])
def test_the_layered_path_takes_the_read_when_the_pump_cannot(h: Handled, why: str) -> None:
    if why == "disarmed":
        h.handler.armed = False
    else:
        h.source.ok = False
    data = media(0, b"\x04" * 160)
    h.rig.twilio_peer.sendall(data)
    h.handler()
    assert h.calls == [("fallback",)]
    assert h.counters() == (0, 0, 0, 0)
    # the read is still there for the layered path
    assert h.rig.twilio.recv(1 << 16) == data


def test_other_messages_go_to_the_call_uncounted(h: Handled) -> None:
    audio = b"\x05" * 160
    h.rig.twilio_peer.sendall(media(0, audio) + dtmf("5"))
    before = time.perf_counter()
    h.handler()
    ((what, code, t0),) = h.calls
    assert (what, code) == ("result", _codec.PUMP_PARSED)
    assert before <= t0 <= time.perf_counter()  # the same clock as the call's
    assert h.counters() == (0, 0, 0, 0) and h.latency.values == []
    assert h.rig.pump.rest is not None and h.rig.pump.payloads == [b64(audio)]


def test_the_peer_closing_goes_to_the_call(h: Handled) -> None:
    h.rig.twilio_peer.shutdown(socket.SHUT_WR)
    h.handler()
    assert [c[:2] for c in h.calls] == [("result", _codec.PUMP_CLOSED)]


def test_a_protocol_violation_goes_to_the_call(h: Handled) -> None:
    h.rig.twilio_peer.sendall(frame(OP_TEXT, b"{}", mask=False))  # a client must mask
    h.handler()
    ((what, exc),) = h.calls
    assert what == "error" and isinstance(exc, ProtocolViolation)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_failing_hook_goes_to_the_call(impl: ModuleType) -> None:
    boom = RuntimeError("hook failed")

    def on_marks(marks: list[str]) -> None:
        raise boom

    h = Handled(impl, on_marks=on_marks)
    try:
        h.rig.twilio_peer.sendall(mark("m1") + media(0, b"\x06" * 160))
        h.handler()
        assert h.calls == [("error", boom)]
        assert h.latency.values == []  # the read did not finish
    finally:
        h.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_an_exception_from_the_error_hook_reaches_the_reactor(impl: ModuleType) -> None:
    """The reactor drops the socket of a handler that raises; nothing is swallowed."""

    def on_error(exc: Exception) -> None:
        raise ValueError("error hook failed") from exc

    h = Handled(impl, on_error=on_error)
    try:
        h.rig.twilio_peer.sendall(frame(OP_TEXT, b"{}", mask=False))
        with pytest.raises(ValueError, match="error hook failed"):
            h.handler()
    finally:
        h.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_what_the_kernel_does_not_take_is_counted_then_handed_over(impl: ModuleType) -> None:
    h = Handled(impl)
    try:
        rig = h.rig
        rig.agent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        while True:  # fill the agent's socket (nothing reads its peer end yet)
            try:
                rig.agent.send(b"\0" * 1024)
            except BlockingIOError:
                break
        rig.twilio_peer.sendall(b"".join(media(20 * k, bytes([k]) * 160) for k in range(40)))
        h.handler()
        assert [c[:2] for c in h.calls] == [("result", _codec.PUMP_UNSENT)]
        assert h.counters() == (40, 40, 40, 1)
        assert h.latency.values == []  # the call observes it once the rest is queued
        assert rig.pump.unsent
    finally:
        h.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_the_pump_is_required(impl: ModuleType) -> None:
    with pytest.raises(TypeError):
        impl.PumpHandler(None, *([None] * 8))
