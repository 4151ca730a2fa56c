"""relay.http.server over loopback: one port for webhooks and the media WebSocket, dispatch,
upgrade checks, admission control, timeouts and shutdown."""

from __future__ import annotations

import orjson
import pytest
import trio

import relay.http.server
from relay.http.server import RelayServer
from relay.media.websocket import OP_TEXT, build_frame


async def test_binds_port_zero_and_sets_public_url(start_relay, make_config):
    with trio.fail_after(5):
        cfg = make_config()
        relay_ = await start_relay(cfg)
        assert relay_.port > 0
        # with port 0 and no public_url the relay advertises what it actually bound
        assert cfg.server.public_url == f"http://127.0.0.1:{relay_.port}"
        assert cfg.stream_url == f"ws://127.0.0.1:{relay_.port}/twilio/stream"


async def test_explicit_public_url_is_kept(start_relay, make_config):
    with trio.fail_after(5):
        cfg = make_config(server={"public_url": "https://relay.example.com"})
        await start_relay(cfg)
        assert cfg.public_url == "https://relay.example.com"
        assert cfg.stream_url == "wss://relay.example.com/twilio/stream"


async def test_http_and_websocket_share_one_port(start_relay, make_config):
    """Plain HTTP goes to the Quart app, the stream path to the media WebSocket."""
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        health = await relay_.get("/healthz")
        assert health.status == 200
        assert orjson.loads(health.body) == {"status": "ok", "active_calls": 0}
        fake = await relay_.dial()
        record = await relay_.wait_record(fake.call_sid, "active")
        assert record.stream_sid == fake.stream_sid
        assert relay_.metrics.active_calls == 1
        # the webhook port still answers while a call holds a stream
        assert (await relay_.get("/healthz")).status == 200
        await fake.hang_up()
        await relay_.wait_idle()


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("GET", []),  # no upgrade at all
        ("POST", [("Upgrade", "websocket"), ("Connection", "Upgrade")]),
        ("GET", [("Upgrade", "websocket"), ("Connection", "Upgrade")]),  # no key/version
        (
            "GET",
            [
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Sec-WebSocket-Version", "8"),
            ],
        ),
    ],
)
async def test_stream_path_without_a_valid_upgrade_is_400(
    start_relay, make_config, e2e, method, headers
):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        response = await e2e.http_request(relay_.port, method, "/twilio/stream", headers=headers)
        assert response.status == 400
        assert relay_.metrics.errors["ws_bad_upgrade"] == 1
        assert not relay_.state.calls


async def test_pipelined_start_after_upgrade_is_not_lost(start_relay, make_config, e2e):
    """Bytes that arrive in the same TCP segment as the upgrade request (Twilio's
    ``connected`` + ``start`` can) must reach the call: they are the ``leftover``."""
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        call_sid = e2e.sid("CA")
        _, twiml = await relay_.voice(call_sid)
        assert twiml is not None
        stream_sid = e2e.sid("MZ")
        start = {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": stream_sid,
            "start": {
                "accountSid": "AC" + "0" * 32,
                "streamSid": stream_sid,
                "callSid": call_sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": twiml.parameters,
            },
        }
        connected = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        pipelined = build_frame(OP_TEXT, orjson.dumps(connected), mask=True) + build_frame(
            OP_TEXT, orjson.dumps(start), mask=True
        )
        ws = await relay_.open_stream(pipelined=pipelined)
        record = await relay_.wait_record(call_sid, "active")
        assert record.stream_sid == stream_sid
        await ws.aclose(1000)
        await relay_.wait_idle()
        assert relay_.records(call_sid).end_reason == "caller hung up"


async def test_concurrent_call_limit(start_relay, make_config, e2e):
    """At max_calls the upgrade is refused with 503 and the webhook answers <Reject>."""
    with trio.fail_after(5):
        relay_ = await start_relay(make_config(server={"max_calls": 1}))
        first = await relay_.dial()
        await relay_.wait_record(first.call_sid, "active")

        # a stream for a second call: refused before the upgrade
        with pytest.raises(e2e.UpgradeRefused) as refused:
            await relay_.open_stream()
        assert refused.value.status == 503
        assert relay_.metrics.calls_rejected["concurrent_limit"] == 1

        # a second webhook: rejected busy, so the caller is not billed
        busy_sid = e2e.sid("CA")
        response, twiml = await relay_.voice(busy_sid)
        assert response.status == 200
        assert twiml is not None and twiml.verbs == ["Reject"]
        assert twiml.root.find("Reject").get("reason") == "busy"
        record = relay_.records(busy_sid)
        assert (record.status, record.end_reason) == ("rejected", "concurrent limit")
        assert relay_.metrics.calls_rejected["concurrent_limit"] == 2

        # capacity comes back when the first call ends
        await first.hang_up()
        await relay_.wait_idle()
        second = await relay_.dial()
        await relay_.wait_record(second.call_sid, "active")
        await second.hang_up()
        await relay_.wait_idle()


async def test_no_start_event_times_out_with_1008(start_relay, make_config):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config(media={"start_timeout_s": 0.3}))
        fake = await relay_.dial(start=False)
        await fake.send_connected()
        t0 = trio.current_time()
        closed = await fake.wait_closed()
        assert closed.code == 1008
        assert 0.25 <= trio.current_time() - t0 < 1.5
        assert relay_.metrics.errors["start_timeout"] == 1
        assert relay_.metrics.calls_total == 0
        await relay_.wait_idle()


async def test_silent_connection_is_dropped_after_head_timeout(
    start_relay, make_config, monkeypatch
):
    """A client that connects and never sends a request head must not hold a task."""
    monkeypatch.setattr(relay.http.server, "HEAD_TIMEOUT_S", 0.2)
    with trio.fail_after(5):
        relay_ = await start_relay(make_config())
        stream = await trio.open_tcp_stream("127.0.0.1", relay_.port)
        t0 = trio.current_time()
        assert await stream.receive_some(100) == b""  # the relay closed it
        assert trio.current_time() - t0 < 1.5
        await stream.aclose()


async def test_max_call_duration(start_relay, make_config):
    with trio.fail_after(5):
        relay_ = await start_relay(make_config(calls={"max_duration_s": 0.4}))
        fake = await relay_.dial()
        closed = await fake.wait_closed(3)
        assert closed.code == 1000
        await relay_.wait_idle()
        record = relay_.records(fake.call_sid)
        assert (record.status, record.end_reason) == ("completed", "max duration")


async def test_server_shutdown_ends_every_call(make_config, nursery, e2e):
    """Cancelling serve() ends calls too: agent sessions and sockets closed, counters back."""
    with trio.fail_after(5):
        cfg = make_config()
        server = RelayServer(cfg)
        scope = trio.CancelScope()

        async def serve(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                await server.serve(task_status=task_status)

        await nursery.start(serve)
        relay_ = e2e.Relay(server, nursery)  # the handle only; the server runs in our scope
        fake = await relay_.dial()
        await relay_.wait_record(fake.call_sid, "active")
        scope.cancel()
        closed = await fake.wait_closed()
        assert closed.code == 1000
        await relay_.wait_idle()
        assert relay_.records(fake.call_sid).status == "completed"


async def test_a_bug_in_one_call_does_not_end_the_server(
    start_relay, make_config, e2e, monkeypatch
):
    """An unexpected exception in one connection's handling is logged, counted and closes
    that connection; the listener and other calls go on."""
    from relay.media import call as call_module

    relay_ = await start_relay(make_config(default_agent="echo"))
    original = call_module.Call.run
    calls = 0

    async def broken_once(self):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("simulated bug")
        await original(self)

    monkeypatch.setattr(call_module.Call, "run", broken_once)
    with trio.fail_after(10):
        first = await relay_.dial(start=False)
        await first.wait_closed()
        second = await relay_.dial()  # the server still accepts and serves calls
        await second.send_media(b"\xff" * 160)
        await second.wait_for(lambda f: len(f.audio) >= 160)
        await second.hang_up()
        await relay_.wait_idle()
    assert relay_.server.state.metrics.errors["internal"] == 1
