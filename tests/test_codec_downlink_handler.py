"""DownlinkHandler: the reactor's handler for an OpenAI Realtime agent's socket.

The compiled relay.media._codec.DownlinkHandler must do what its reference in
relay.media.codec_ref does, on real sockets: take a read that holds only audio deltas of
known, untruncated items from the agent's socket to Twilio's (the session's books, the
downlink, the frames and marks, the counters the call kept before, relay.media.call),
hand everything else to the call's hooks parsed and in order, fall back when it is not
armed or the call is not ready, and never swallow an exception.
"""

from __future__ import annotations

import base64
import json
import math
import socket
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from frame_cases import frame
from test_codec_pump_handler import Latency
from test_codec_uplink_pump import readable_bytes

from relay.media import _codec, codec_ref
from relay.media.websocket import OP_PING, OP_TEXT, Control, FrameParser, ProtocolViolation

IMPLS = [pytest.param(_codec, id="compiled"), pytest.param(codec_ref, id="ref")]
MEDIA = b'{"event":"media","streamSid":"MZ1","media":{"payload":"'
MARK = b'{"event":"mark","streamSid":"MZ1","mark":{"name":"'
NOW_S = 100.0


def delta(item_id: str, audio: bytes) -> bytes:
    """An OpenAI Realtime (GA) audio delta as the server frames it (unmasked)."""
    msg = {
        "type": "response.output_audio.delta",
        "event_id": "ev_1",
        "response_id": "resp_1",
        "item_id": item_id,
        "output_index": 0,
        "content_index": 0,
        "delta": base64.b64encode(audio).decode(),
    }
    return frame(OP_TEXT, json.dumps(msg).encode(), mask=False)


def other(kind: str = "response.output_audio.done", item_id: str = "item_A") -> bytes:
    return frame(OP_TEXT, json.dumps({"type": kind, "item_id": item_id}).encode(), mask=False)


class Metrics:
    def __init__(self) -> None:
        self.frames_out = 0
        self.agent_direct = 0


class Handled:
    """A DownlinkHandler between two socket pairs (the agent writes to ``agent_peer``,
    Twilio reads ``twilio_peer``), every hook recording what it was given."""

    def __init__(
        self,
        impl: ModuleType,
        *,
        to_ulaw: Any = None,
        on_rest: Callable[..., object] | None = None,
        on_unsent: Callable[[bytes], bool] | None = None,
        control: Callable[[int, bytes], Any] = Control,
    ) -> None:
        self.impl = impl
        self.agent, self.agent_peer = socket.socketpair()
        self.twilio, self.twilio_peer = socket.socketpair()
        for s in (self.agent, self.twilio, self.twilio_peer):
            s.setblocking(False)
        self.parser = impl.ServerFrameParser(
            max_message=1 << 16,
            control=control,
            violation=ProtocolViolation,
            openai_audio=True,
        )
        self.downlink = impl.DownlinkBuffer(frame_ms=100, max_lead_ms=200)
        self.items: dict[str, int] = {"item_A": 0}
        self.truncated: set[str] = set()
        self.protocol = SimpleNamespace(events_in=0)
        self.source = SimpleNamespace(messages_in=0, last_received=None)
        self.dest = SimpleNamespace(messages_out=0)
        self.call = SimpleNamespace(_current_rid=None, _playout_due=math.inf)
        self.metrics, self.latency = Metrics(), Latency()
        self.ready = True
        self.calls: list[tuple[Any, ...]] = []
        self.handler = impl.DownlinkHandler(
            self.agent.fileno(),
            self.twilio.fileno(),
            self.source,
            self.dest,
            self.parser,
            self.downlink,
            self.items,
            self.truncated,
            self.protocol,
            to_ulaw,
            MEDIA,
            MARK,
            self.call,
            self.metrics,
            self.latency,
            lambda: NOW_S,
            True,
            lambda: self.ready,
            lambda: self.calls.append(("fallback",)),
            lambda err: self.calls.append(("closed", err)),
            on_rest or (lambda items, k, t, pushed: self.calls.append(("rest", items, k, pushed))),
            on_unsent or (lambda rest: self.calls.append(("unsent", len(rest))) or True),
            lambda: self.calls.append(("wake",)),
            lambda exc: self.calls.append(("error", exc)),
        )
        self._frames = FrameParser(expect_masked=False, max_message=1 << 20)

    def twilio_messages(self) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self._frames.feed(readable_bytes(self.twilio_peer))]

    def close(self) -> None:
        for s in (self.agent, self.agent_peer, self.twilio, self.twilio_peer):
            s.close()


@pytest.fixture(params=IMPLS)
def h(request: pytest.FixtureRequest) -> Any:
    handled = Handled(request.param)
    yield handled
    handled.close()


def audio(ms: int, byte: int) -> bytes:
    return bytes([byte]) * (8 * ms)


def test_deltas_of_a_known_item_go_to_twilio_in_one_call(h: Handled) -> None:
    one, two = audio(100, 1), audio(100, 2)
    h.agent_peer.sendall(delta("item_A", one) + delta("item_A", two))
    h.handler()
    assert h.calls == []
    got = h.twilio_messages()
    assert [m["event"] for m in got] == ["media", "mark", "media", "mark"]
    assert base64.b64decode(got[0]["media"]["payload"]) == one
    assert base64.b64decode(got[2]["media"]["payload"]) == two
    assert [got[1]["mark"]["name"], got[3]["mark"]["name"]] == ["1", "2"]
    # the books and counters the adapter and the call kept on the layered path
    assert h.items == {"item_A": 1600}
    assert h.protocol.events_in == 2 and h.source.messages_in == 2
    assert h.source.last_received == NOW_S
    assert h.dest.messages_out == 4
    assert h.metrics.frames_out == 2 and h.metrics.agent_direct == 1
    assert len(h.latency.values) == 1 and 0.0 <= h.latency.values[0] < 5.0
    assert h.call._current_rid == "item_A"
    assert h.downlink.pending_marks == 2


def test_audio_past_the_lead_waits_and_wakes_the_playout(h: Handled) -> None:
    h.agent_peer.sendall(delta("item_A", audio(400, 3)))
    h.handler()
    got = h.twilio_messages()
    assert [m["event"] for m in got].count("media") == 3  # lead 200 ms: 3 frames go now
    assert h.downlink.buffered_ms == 100
    assert h.calls == [("wake",)]  # the fourth is due before the playout planned to wake


def test_no_wake_when_the_playout_is_due_first(h: Handled) -> None:
    h.call._playout_due = 0.0
    h.agent_peer.sendall(delta("item_A", audio(400, 3)))
    h.handler()
    assert h.calls == []


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(lambda: delta("item_new", audio(20, 4)), id="new-item"),
        pytest.param(other, id="other-message"),
        pytest.param(lambda: frame(OP_PING, b"hi", mask=False), id="control-frame"),
    ],
)
def test_anything_else_goes_to_the_call_in_order(h: Handled, first: Callable[[], bytes]) -> None:
    h.agent_peer.sendall(delta("item_A", audio(100, 5)) + first() + delta("item_A", audio(20, 6)))
    h.handler()
    (call,) = h.calls
    kind, items, k, pushed = call
    assert (kind, k, pushed, len(items)) == ("rest", 1, True, 3)
    assert items[2] == ("item_A", audio(20, 6))  # not taken: the call carries on from k
    assert h.twilio_messages() == []  # a barge-in later in the read must still drop it
    assert h.downlink.buffered_ms == 100
    assert h.items == {"item_A": 800} and h.source.messages_in == 1
    assert h.metrics.agent_direct == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_only_str_and_bytes_pairs_are_deltas(impl: ModuleType) -> None:
    """A control callback that makes a pair of a ping is handed over, not booked."""
    h = Handled(impl, control=lambda opcode, payload: ("item_A", payload.decode()))
    try:
        h.agent_peer.sendall(frame(OP_PING, b"hi", mask=False) + delta("item_A", audio(20, 1)))
        h.handler()
        ((kind, items, k, pushed),) = h.calls
        assert (kind, k, pushed, items[0]) == ("rest", 0, False, ("item_A", "hi"))
        assert h.items == {"item_A": 0} and h.protocol.events_in == 0
    finally:
        h.close()


def test_a_truncated_item_goes_to_the_call(h: Handled) -> None:
    h.truncated.add("item_A")
    h.agent_peer.sendall(delta("item_A", audio(20, 7)))
    h.handler()
    assert [(c[0], c[2], c[3]) for c in h.calls] == [("rest", 0, False)]
    assert h.items == {"item_A": 0} and h.protocol.events_in == 0


def test_an_empty_delta_is_counted_and_sends_nothing(h: Handled) -> None:
    h.agent_peer.sendall(delta("item_A", b""))
    h.handler()
    assert h.calls == [] and h.twilio_messages() == []
    assert h.protocol.events_in == 1 and h.source.messages_in == 1
    assert h.metrics.agent_direct == 1 and h.metrics.frames_out == 0
    assert h.call._current_rid is None


@pytest.mark.parametrize("armed", [False, True])
def test_falls_back_when_disarmed_or_not_ready(h: Handled, armed: bool) -> None:
    h.handler.armed = armed
    h.ready = False
    h.agent_peer.sendall(delta("item_A", audio(20, 8)))
    h.handler()
    assert h.calls == [("fallback",)]
    assert h.agent.recv(1 << 16)  # the read is left for the layered path


def test_nothing_to_read_touches_nothing(h: Handled) -> None:
    h.handler()
    assert h.calls == [] and h.source.last_received is None and h.metrics.agent_direct == 0


def test_end_of_stream_goes_to_on_closed(h: Handled) -> None:
    h.agent_peer.shutdown(socket.SHUT_WR)
    h.handler()
    assert h.calls == [("closed", 0)]


def test_a_protocol_violation_goes_to_on_error(h: Handled) -> None:
    h.agent_peer.sendall(frame(OP_TEXT, b"{}", mask=True))  # servers must not mask
    h.handler()
    ((kind, exc),) = h.calls
    assert kind == "error" and isinstance(exc, ProtocolViolation) and exc.code == 1002


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("queued", [True, False])
def test_a_write_cut_short_is_handed_over(impl: ModuleType, queued: bool) -> None:
    handed: list[int] = []

    def on_unsent(rest: bytes) -> bool:
        handed.append(len(rest))
        return queued

    h = Handled(impl, on_unsent=on_unsent)
    try:
        h.twilio.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        while True:  # fill Twilio's socket: the peer is not reading
            try:
                h.twilio.send(b"x" * 4096)
            except BlockingIOError:
                break
        h.agent_peer.sendall(delta("item_A", audio(200, 9)))
        h.handler()
        assert len(handed) == 1 and handed[0] > 0
        assert h.dest.messages_out == 4
        assert h.metrics.frames_out == (2 if queued else 0)
        assert len(h.latency.values) == (1 if queued else 0)
    finally:
        h.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_failing_hook_goes_to_on_error(impl: ModuleType) -> None:
    def on_rest(*_: object) -> None:
        raise RuntimeError("bug in a hook")

    h = Handled(impl, on_rest=on_rest)
    try:
        h.agent_peer.sendall(other())
        h.handler()
        ((kind, exc),) = h.calls
        assert kind == "error" and str(exc) == "bug in a hook"
    finally:
        h.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_pcm_is_converted_on_the_way(impl: ModuleType) -> None:
    h = Handled(impl, to_ulaw=impl.PcmToUlaw(24000))
    try:
        pcm = bytes(range(256)) * 30  # 7,680 bytes: 160 ms of PCM16 24 kHz
        h.agent_peer.sendall(delta("item_A", pcm))
        h.handler()
        expected = impl.PcmToUlaw(24000).feed(pcm)
        got = h.twilio_messages()
        sent = b"".join(
            base64.b64decode(m["media"]["payload"]) for m in got if m["event"] == "media"
        )
        assert sent and sent == expected[: len(sent)]  # the rest waits in the downlink
        assert h.items == {"item_A": len(pcm)}
    finally:
        h.close()


def test_compiled_and_reference_send_the_same_bytes() -> None:
    sizes = [37, 100, 250, 0, 80, 400, 13]
    wire: list[bytes] = []
    for impl in (_codec, codec_ref):
        h = Handled(impl)
        try:
            h.call._playout_due = 0.0
            for i, ms in enumerate(sizes):
                h.agent_peer.sendall(delta("item_A", audio(ms, i + 1)))
                h.handler()
            wire.append(readable_bytes(h.twilio_peer))
            assert h.calls == []
        finally:
            h.close()
    assert wire[0] == wire[1] and wire[0]
