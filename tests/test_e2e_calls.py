"""End-to-end calls: a real relay on loopback, a fake Twilio, and a real agent session
(tests/fake_openai.py, the parrot, the echo agent). Everything goes over real sockets; the
only fakes are the peers the relay would talk to in production."""

from __future__ import annotations

import gc
import inspect
import os
import socket
from collections import Counter

import numpy as np
import orjson
import pytest
import soundfile
import trio
import trio_websocket
from fake_openai import FakeOptions, fake_openai_server, silent_server, tone

from relay.agents.openai import OpenAIRealtimeAgent
from relay.agents.openai_protocol import OpenAIRealtimeProtocol
from relay.media import codec
from relay.media.call import Call
from relay.media.websocket import OP_PING, OP_TEXT, WebSocket, build_frame
from relay.sim import speech
from relay.sim.simulator import simulate


# --- helpers --------------------------------------------------------------------------------
def random_ulaw(ms: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, 8 * ms, dtype=np.uint8).tobytes()


def pcm16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float64)


def sine_fit(x: np.ndarray, rate: int, hz: float) -> tuple[float, float]:
    """Least-squares fit of one sine at ``hz`` (free amplitude and phase): returns
    (amplitude, max |residual|). A click, a dropped or repeated sample, or a phase jump at
    a chunk boundary shows up as a large residual somewhere in the signal."""
    t = np.arange(len(x)) / rate
    basis = np.column_stack([np.sin(2 * np.pi * hz * t), np.cos(2 * np.pi * hz * t)])
    coef, *_ = np.linalg.lstsq(basis, x, rcond=None)
    residual = x - basis @ coef
    return float(np.hypot(*coef)), float(np.max(np.abs(residual)))


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spectrum))])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def live_tasks() -> int:
    """Every task in this Trio run (relay, fakes, test): leaked call tasks would add up."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    return walk(trio.lowlevel.current_root_task())


async def gpt_relay(start_relay, make_config, e2e, oai, *, audio="pcmu", greeting="", **sections):
    cfg = make_config(
        agents={"gpt": e2e.openai_agent(oai, audio=audio, greeting=greeting)},
        default_agent="gpt",
        **sections,
    )
    return await start_relay(cfg)


async def assert_pumped_when_on(relay_, fake, session) -> None:
    """Audio sent once the call is up goes through the uplink pump exactly when it is on
    (media.uplink_pump with the reactor). Audio that arrived while the agent was still
    connecting is read before the pump exists, so this sends some more first."""
    heard = len(session.audio_in)
    more = random_ulaw(100, seed=99)
    await fake.send_media(more)
    if session.input_format == "pcmu":  # all of it (the caller may compare bytes after)
        await session.wait_for(lambda s: len(s.audio_in) >= heard + len(more))
    else:  # resampled: some of it (the filter holds its look-ahead back)
        await session.wait_for(lambda s: len(s.audio_in) > heard)
    media_cfg = relay_.cfg.media
    pumped = relay_.metrics.uplink_pumped
    assert (pumped > 0) == (media_cfg.reactor and media_cfg.uplink_pump), pumped


def assert_direct_when_on(relay_) -> None:
    """The agent's audio after the first frame went through the compiled downlink handler
    (codec.DownlinkHandler) exactly when it is on (media.agent_direct with the reactor)."""
    media_cfg = relay_.cfg.media
    direct = relay_.metrics.agent_direct
    assert (direct > 0) == (media_cfg.reactor and media_cfg.agent_direct), direct


# --- call lifecycle -----------------------------------------------------------------------------
async def test_inbound_call_lifecycle(start_relay, make_config, e2e):
    """Webhook -> TwiML -> stream -> agent session; record incoming -> active -> completed."""
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai)
            port = relay_.port
            call_sid = e2e.sid("CA")
            response, twiml = await relay_.voice(call_sid, to="+15550009999", from_="+15550001234")
            assert response.status == 200
            assert response.headers["content-type"].startswith("text/xml")
            assert twiml is not None and twiml.verbs == ["Connect"]
            assert twiml.stream_url == f"ws://127.0.0.1:{port}/twilio/stream"
            assert twiml.status_callback == f"http://127.0.0.1:{port}/twilio/status"
            assert twiml.status_callback_method == "POST"
            assert set(twiml.parameters) == {"token", "agent", "tenant"}
            assert twiml.parameters["agent"] == "gpt"
            # the token is bound to this CallSid and agent
            assert relay_.state.tokens.verify(f"{call_sid}|default|gpt", twiml.parameters["token"])

            record = relay_.records(call_sid)
            assert (record.status, record.agent) == ("incoming", "gpt")
            assert (record.from_number, record.to_number) == ("+15550001234", "+15550009999")
            # warm start: the agent session opens with the webhook's answer, before the
            # stream (tests/test_warm_start.py)
            await oai.wait_for_session()

            fake = await relay_.connect(call_sid, twiml)
            session = await e2e.agent_session(oai)
            record = await relay_.wait_record(call_sid, "active")
            assert record.stream_sid == fake.stream_sid
            assert relay_.metrics.active_calls == 1
            await fake.send_media(random_ulaw(200, seed=1))
            await session.wait_for(lambda s: len(s.audio_in) == 1600)

            await fake.hang_up()
            await session.wait_closed()
            await relay_.wait_idle()
            record = relay_.records(call_sid)
            assert (record.status, record.end_reason) == ("completed", "caller hung up")
            assert record.duration_s is not None and record.duration_s > 0
            assert record.stats["messages_from_twilio"] >= 12  # start + 10 media + stop
            assert relay_.metrics.calls_total == 1
            assert relay_.metrics.frames_in == 10


async def test_agent_selected_by_called_number(start_relay, make_config, e2e):
    """[numbers] maps the called number to an agent; anything else gets the default."""
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            cfg = make_config(
                agents={
                    "gpt": e2e.openai_agent(oai),
                    "parrot": {"type": "parrot", "greeting": True},
                },
                numbers={"+15550001111": "gpt"},
                default_agent="parrot",
            )
            relay_ = await start_relay(cfg)

            gpt_call = await relay_.dial(to="+15550001111")
            assert gpt_call.parameters["agent"] == "gpt"
            session = await e2e.agent_session(oai)
            assert session.query.get("model") == "gpt-realtime"
            assert relay_.records(gpt_call.call_sid).agent == "gpt"

            parrot_call = await relay_.dial(to="+15550002222")
            assert parrot_call.parameters["agent"] == "parrot"
            # the parrot really answers: its greeting chime, byte for byte
            greeting = speech.mulaw_encode(speech.greeting_chime())
            await parrot_call.wait_for(lambda f: len(f.audio) >= len(greeting))
            assert parrot_call.audio == greeting
            assert len(oai.sessions) == 1  # the parrot call opened no OpenAI session
            assert relay_.records(parrot_call.call_sid).agent == "parrot"

            await gpt_call.hang_up()
            await parrot_call.hang_up()
            await relay_.wait_idle()


async def test_greeting_agent_speaks_first(start_relay, make_config, e2e):
    with trio.fail_after(10):
        async with fake_openai_server(response_ms=400) as oai:
            relay_ = await gpt_relay(
                start_relay, make_config, e2e, oai, greeting="Thanks for calling relay."
            )
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            await fake.wait_for(lambda f: f.audio_ms >= 400)
            assert fake.media_sent == 0  # the caller has not said a word
            assert fake.audio == tone(400, "pcmu", oai.options.tone_hz)

            kinds = [e["type"] for e in session.received]
            assert kinds.index("session.update") < kinds.index("conversation.item.create")
            assert kinds.index("conversation.item.create") < kinds.index("response.create")
            (item,) = session.items_created
            assert item["role"] == "user"
            assert "Thanks for calling relay." in item["content"][0]["text"]
            assert len(session.response_creates) == 1
            record = relay_.records(fake.call_sid)
            assert record.first_agent_audio_ms is not None
            await fake.hang_up()
            await relay_.wait_idle()


# --- audio paths ------------------------------------------------------------------------------
async def test_passthrough_audio_is_byte_identical(start_relay, make_config, e2e):
    """audio="pcmu": μ-law both ways untouched; downlink rechunked to downlink_frame_ms,
    every media frame followed by its mark."""
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai, audio="pcmu")
            frame_bytes = relay_.cfg.media.downlink_frame_ms * 8
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)

            caller = random_ulaw(1000, seed=2)
            await fake.send_media(caller)
            await session.wait_for(lambda s: len(s.audio_in) >= len(caller))
            assert bytes(session.audio_in) == caller
            assert session.input_format == session.output_format == "pcmu"

            reply = random_ulaw(730, seed=3)  # not a whole number of frames
            await session.send_response(audio=reply, chunk_ms=30)  # deltas across frames
            await fake.wait_for(
                lambda f: len(f.audio) >= len(reply) and len(f.marks) == len(f.media)
            )
            assert fake.audio == reply
            sizes = [len(m) for m in fake.media]
            # Frames are at most downlink_frame_ms; a shorter one only where Twilio would
            # otherwise have run dry (the very first delta) or at the end of the answer.
            assert all(0 < n <= frame_bytes for n in sizes)
            # Frames are full except where the agent's audio ran late: a partial frame waits
            # at most 10 ms before it is sent rather than hold audio into dead air, which a
            # loaded machine (parallel tests) does trigger now and then.
            assert sum(n == frame_bytes for n in sizes) >= len(sizes) // 2
            # The first frame leaves with what has come by then: the first 30 ms delta, or
            # more when the next came within the partial frame's 10 ms wait (a loaded run).
            assert sizes[0] % 240 == 0 or sizes[0] == frame_bytes, sizes
            kinds = fake.events
            assert kinds == ["media", "mark"] * len(sizes)  # each frame followed by a mark
            assert len(set(fake.marks)) == len(sizes)
            assert not fake.invalid
            await assert_pumped_when_on(relay_, fake, session)
            await fake.hang_up()
            await relay_.wait_idle()


async def test_resampled_audio_pcm24k(start_relay, make_config, e2e):
    """audio="pcm24k": the agent gets PCM16 24 kHz (3x the samples, minus the resampler's
    hold-back) and its PCM comes back as μ-law 8 kHz of the same duration; a sine stays a
    clean sine of the same frequency both ways (no clicks at frame or delta boundaries)."""
    with trio.fail_after(15):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai, audio="pcm24k")
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)

            amplitude = 0.3 * 32767
            up_hold = int(np.ceil(codec.Resampler(8000, 24000).delay_ms * 24)) + 1
            caller = tone(1000, "pcmu", hz=400.0)
            await fake.send_media(caller)
            expected = 3 * len(caller)  # samples at 24 kHz
            await session.wait_for(lambda s: len(s.audio_in) >= 2 * (expected - up_hold))
            await trio.sleep(0.1)  # nothing more may arrive: there is no more input
            got = pcm16(bytes(session.audio_in))
            assert expected - up_hold <= len(got) <= expected
            assert abs(peak_hz(got, 24000) - 400.0) <= 2.0
            steady = got[240:]  # skip the filter's start-up (10 ms)
            amp, worst = sine_fit(steady, 24000, 400.0)
            assert abs(amp - amplitude) < 0.05 * amplitude
            assert worst < 0.06 * amplitude, f"click in the uplink: residual {worst:.0f}"

            reply = tone(1000, "pcm24k", hz=1000.0)
            down_hold = int(np.ceil(codec.Resampler(24000, 8000).delay_ms * 8)) + 1
            await session.send_response(audio=reply, chunk_ms=35)
            await fake.wait_for(lambda f: len(f.audio) >= 8000 - down_hold)
            await trio.sleep(0.1)
            assert 8000 - down_hold <= len(fake.audio) <= 8000
            heard = speech.mulaw_decode(fake.audio).astype(np.float64)
            assert abs(peak_hz(heard, 8000) - 1000.0) <= 2.0
            amp, worst = sine_fit(heard[80:], 8000, 1000.0)
            assert abs(amp - amplitude) < 0.05 * amplitude
            # μ-law steps are up to 512 at this level: 0.06 A ~ 590 allows them, a click not
            assert worst < 0.06 * amplitude, f"click in the downlink: residual {worst:.0f}"
            await assert_pumped_when_on(relay_, fake, session)
            await fake.hang_up()
            await relay_.wait_idle()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "layered"])
@pytest.mark.parametrize("audio", ["pcmu", "pcm24k"])
async def test_streamed_answer_reaches_twilio_whole(start_relay, make_config, e2e, audio, direct):
    """An answer streamed in real time (one delta per agent read, the usual case): every
    delta after the first is taken from the agent's socket to Twilio's by the compiled
    handler when it is on; the caller gets all of it, each frame with its mark, and the
    session's books count what it generated (what a truncate is clamped to)."""
    with trio.fail_after(15):
        async with fake_openai_server() as oai:
            media = {"agent_direct": direct}
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai, audio=audio, media=media)
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            ms = 1200
            if audio == "pcmu":
                reply = random_ulaw(ms, seed=11)
            else:
                reply = tone(ms, "pcm24k", hz=500.0)
            item = await session.send_response(audio=reply, chunk_ms=40, pace_s=0.04)
            hold_back = 0
            if audio != "pcmu":  # the resampler holds its look-ahead back until the end
                hold_back = int(np.ceil(codec.Resampler(24000, 8000).delay_ms * 8)) + 1
            want = ms * 8 - hold_back
            await fake.wait_for(lambda f: len(f.audio) >= want and len(f.marks) == len(f.media))
            if audio == "pcmu":
                assert fake.audio == reply
            assert fake.events == ["media", "mark"] * len(fake.media)
            assert not fake.invalid
            (call,) = relay_.state.calls
            protocol = call.agent.protocol
            assert protocol.generated_ms(item) == ms
            assert call.downlink.overflow_ms == 0
            assert_direct_when_on(relay_)
            await fake.hang_up()
            await relay_.wait_idle()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "layered"])
async def test_an_answer_after_hold_music_reaches_the_caller_whole(
    start_relay, make_config, e2e, tmp_path, direct
):
    """Hold music plays until the agent's first audio (the layered path: the hold must
    stop and its tail at Twilio be cleared); the answer, streamed in real time, then
    arrives whole after the clear, from its second delta on through the compiled handler
    when it is on."""
    t = np.arange(2000) / 8000.0
    music = tmp_path / "music.wav"
    soundfile.write(str(music), (0.4 * np.sin(2 * np.pi * 440.0 * t)).astype("float32"), 8000)
    with trio.fail_after(15):
        async with fake_openai_server() as oai:
            agent = e2e.openai_agent(oai, hold="music", hold_music=str(music))
            media = {"agent_direct": direct}
            relay_ = await start_relay(
                make_config(agents={"gpt": agent}, default_agent="gpt", media=media)
            )
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            await fake.wait_for(lambda f: f.audio_ms >= 300)  # the hold music plays
            reply = random_ulaw(1000, seed=21)
            await session.send_response(audio=reply, chunk_ms=40, pace_s=0.04)
            await fake.wait_for(lambda f: len(f.clears) == 1)
            cut = fake.received.index(fake.clears[0])

            def answer(f) -> bytes:
                after = f.received[cut + 1 :]
                return b"".join(media_audio(r.msg) for r in after if r.event == "media")

            await fake.wait_for(lambda f: len(answer(f)) >= len(reply))
            assert answer(fake) == reply
            assert not fake.invalid
            assert_direct_when_on(relay_)
            await fake.hang_up()
            await relay_.wait_idle()


def media_audio(msg: dict) -> bytes:
    """The audio of a Twilio media message."""
    return codec.b64decode(msg["media"]["payload"])


async def test_downlink_is_paced_by_the_lead_bound(start_relay, make_config, e2e):
    """A burst from the agent is not dumped on Twilio: at most max_lead_ms + one frame is
    ever ahead of real-time playout, so a barge-in has little to throw away."""
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai)
            media_cfg = relay_.cfg.media
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            await session.send_response(audio=random_ulaw(1000, seed=4))  # one burst
            await fake.wait_for(lambda f: f.audio_ms >= 1000)
            arrivals = [r.t for r in fake.of("media")]
            t0 = arrivals[0]
            for i, t in enumerate(arrivals):
                sent_ms = (i + 1) * media_cfg.downlink_frame_ms
                allowed = (t - t0) * 1000 + media_cfg.max_lead_ms + media_cfg.downlink_frame_ms
                assert sent_ms <= allowed + 30, f"frame {i} sent {sent_ms - allowed:.0f} ms early"
            # ... and so the burst took about its own duration minus the lead to send
            span_ms = (arrivals[-1] - t0) * 1000
            assert span_ms >= 1000 - media_cfg.max_lead_ms - 2 * media_cfg.downlink_frame_ms
            await fake.hang_up()
            await relay_.wait_idle()


# --- barge-in -------------------------------------------------------------------------------------
async def test_barge_in_clear_and_truncate_accuracy(start_relay, make_config, e2e, nursery):
    """Caller talks over a long answer: ``clear`` at once; audio of the interrupted answer
    still streaming from the agent is dropped; truncate names the right item and says how
    much was actually *played* (per mark echoes) within one downlink frame. Echoes of marks
    discarded by the clear, even late ones, never count as played."""
    with trio.fail_after(15):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai)
            frame_ms = relay_.cfg.media.downlink_frame_ms
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)

            # 3 s answer, generated faster than real time (100 ms every 50 ms): deltas are
            # still arriving when the caller interrupts after ~1 s
            item1: list[str] = []
            finished = trio.Event()

            async def long_answer() -> None:
                item1.append(await session.send_response(3000, chunk_ms=100, pace_s=0.05))
                finished.set()

            nursery.start_soon(long_answer)
            await fake.wait_for(lambda f: f.played_ms >= 1000)

            def deltas() -> int:
                return sum(1 for e in session.sent if e["type"] == "response.output_audio.delta")

            deltas_before = deltas()
            t_speech = trio.current_time()
            await session.speech_started(cancel=False)  # the stream keeps coming
            await fake.wait_for(lambda f: len(f.clears) == 1)
            clear = fake.clears[0]
            assert clear.t - t_speech < 0.25
            assert clear.msg == {"event": "clear", "streamSid": fake.stream_sid}
            played_1 = fake.played_ms_at_clear[0]
            assert 1000 <= played_1 < 1400

            await finished.wait()
            await trio.sleep(0.3)
            after = [r for r in fake.received[fake.received.index(clear) + 1 :]]
            assert [r.event for r in after if r.event == "media"] == []
            # it really was still streaming: stale deltas arrived after the barge-in
            assert deltas_before < 25 and deltas() == 30

            truncate = await session.wait_for_event("conversation.item.truncate")
            assert truncate["item_id"] == item1[0]
            assert truncate["content_index"] == 0
            assert abs(truncate["audio_end_ms"] - played_1) <= frame_ms
            assert not session.truncate_errors
            record = relay_.records(fake.call_sid)
            (barge,) = record.barge_ins
            assert barge["response_id"] == item1[0]
            assert barge["heard_ms"] == truncate["audio_end_ms"]
            assert barge["dropped_ms"] > 0
            assert relay_.metrics.barge_ins == 1

            # Twilio echoed the marks pending at the clear: discarded, not played
            discarded = [name for _, name, gone in fake.echoes if gone]
            assert discarded, "the lead bound keeps some marks pending at any time"

            # second answer; mid-way, stale echoes of the discarded marks arrive again
            item2 = await session.send_response(1000)
            await fake.wait_for(lambda f: f.played_ms - played_1 >= 200)
            for name in discarded:
                await fake.echo_mark(name)
            await fake.wait_for(lambda f: f.played_ms - played_1 >= 400)
            await session.speech_started()
            await fake.wait_for(lambda f: len(f.clears) == 2)
            played_2 = fake.played_ms_at_clear[1] - played_1
            truncate2 = await session.wait_for_event("conversation.item.truncate", count=2)
            assert truncate2["item_id"] == item2
            assert abs(truncate2["audio_end_ms"] - played_2) <= frame_ms
            assert not session.truncate_errors
            assert relay_.metrics.errors.get("agent_error", 0) == 0
            assert_direct_when_on(relay_)
            await fake.hang_up()
            await relay_.wait_idle()


async def test_no_stale_media_after_clear_under_backpressure(start_relay, make_config, e2e):
    """Twilio reads slowly, so the relay's writes queue up behind its socket lock when the
    caller barges in. Frames the playout task takes from the buffer while the ``clear`` is
    still being written must not reach Twilio after it (the caller would hear the
    interrupted answer go on)."""
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai)
            fake = await relay_.dial(rcvbuf=4096)
            session = await e2e.agent_session(oai)
            await session.send_response(5000)  # one burst, paced out by the relay
            await fake.wait_for(lambda f: f.audio_ms >= 300)
            fake.pause_reading()
            (call,) = relay_.state.calls
            # the playout task is now blocked in a write, holding the socket's lock
            await relay_.wait_until(call.ws._send_lock.locked, timeout=4)
            await session.speech_started()
            await trio.sleep(0.3)  # the barge-in waits for the lock, playout frames come due
            fake.resume_reading()
            await fake.wait_for(lambda f: len(f.clears) == 1)
            await trio.sleep(0.4)
            after = fake.received[fake.received.index(fake.clears[0]) + 1 :]
            stale = [r for r in after if r.event == "media"]
            assert not stale, f"{len(stale)} media frame(s) of the interrupted answer after clear"
            assert fake.closed is None
            await fake.hang_up()
            await relay_.wait_idle()


async def test_speech_with_nothing_playing_is_not_a_barge_in(start_relay, make_config, e2e):
    """The answer has fully played (every mark echoed): the relay holds nothing and neither
    does Twilio. Caller speech then interrupts nothing: no clear, no truncate, not counted
    or recorded as a barge-in (it used to be: "caller heard 0 ms of None")."""
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai)
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            await session.send_response(300)
            await fake.wait_for(lambda f: f.played_ms >= 300 and len(f.echoes) == 3)
            # the relay has read the last echo: nothing queued, no mark pending
            (call,) = relay_.state.calls
            await relay_.wait_until(lambda: call.downlink.idle)
            events_before = len(fake.received)
            await session.speech_started()
            await session.caller_transcript("hello?")  # processed after speech_started
            await relay_.wait_until(lambda: relay_.records(fake.call_sid).transcript)
            await trio.sleep(0.1)
            assert not fake.clears and len(fake.received) == events_before
            assert not session.truncates and not session.truncate_errors
            assert relay_.metrics.barge_ins == 0
            assert relay_.records(fake.call_sid).barge_ins == []
            # the next answer plays normally
            await session.send_response(200)
            await fake.wait_for(lambda f: f.audio_ms >= 500)
            await fake.hang_up()
            await relay_.wait_idle()


# --- DTMF and hang-ups -----------------------------------------------------------------------
async def test_dtmf_recorded_and_hash_hangs_up_after_the_last_mark(start_relay, make_config):
    """Parrot: "#" -> goodbye chime + hang-up. The relay closes the stream only once the
    last mark of the goodbye has been echoed (the caller heard the last word)."""
    with trio.fail_after(10):
        relay_ = await start_relay(make_config())
        fake = await relay_.dial(mark_delay=0.3)  # a slow network: echoes come late
        await fake.send_dtmf("1")
        await fake.send_dtmf("#")
        closed = await fake.wait_closed(8)
        assert closed.code == 1000
        bye = speech.mulaw_encode(speech.goodbye_chime())
        assert fake.audio == bye
        played = [(t, name) for t, name, gone in fake.echoes if not gone]
        assert [name for _, name in played] == fake.marks  # every mark echoed as played ...
        last_echo = played[-1][0]
        assert fake.closed_at is not None and fake.closed_at >= last_echo  # ... before the close
        assert fake.closed_at - last_echo < 0.5
        await relay_.wait_idle()
        record = relay_.records(fake.call_sid)
        assert record.dtmf == ["1", "#"]
        assert (record.status, record.end_reason) == ("completed", "caller pressed #")


async def test_one_read_of_media_dtmf_ping_and_a_gap(start_relay, make_config, e2e):
    """Media, a DTMF, more media, a ping and media after a 20 ms gap in one TCP write: the
    uplink's compiled step takes the leading media, the rest goes through the general path
    in order. The agent hears every frame in order with the gap filled by silence; the
    DTMF is recorded; nothing counts as an error."""
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai)
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            await fake.send_media(random_ulaw(40, seed=11))  # the stream is up and flowing
            await session.wait_for(lambda s: s.audio_in_ms >= 40)
            before = bytes(session.audio_in)
            frames = [random_ulaw(20, seed=20 + k) for k in range(4)]

            def text(message: dict) -> bytes:
                fake.seq += 1
                message = {"event": message["event"], "sequenceNumber": str(fake.seq), **message}
                return build_frame(OP_TEXT, orjson.dumps(message), mask=True)

            dtmf = {"event": "dtmf", "streamSid": fake.stream_sid, "dtmf": {"digit": "5"}}
            wire = text(fake.media_message(frames[0])) + text(fake.media_message(frames[1]))
            wire += text(dtmf) + text(fake.media_message(frames[2]))
            wire += build_frame(OP_PING, b"still there?", mask=True)
            fake.ts_ms += 20  # one frame never sent: a 20 ms gap
            wire += text(fake.media_message(frames[3]))
            await fake.ws.stream.send_all(wire)
            want = before + frames[0] + frames[1] + frames[2] + b"\xff" * 160 + frames[3]
            await session.wait_for(lambda s: len(s.audio_in) >= len(want))
            assert bytes(session.audio_in) == want
            await fake.hang_up()
            await relay_.wait_idle()
            assert relay_.records(fake.call_sid).dtmf == ["5"]
            assert not relay_.metrics.errors


async def test_uplink_backpressure_keeps_the_order(start_relay, make_config, e2e):
    """The agent stops reading: the relay's writes to it back up (the uplink pump's write
    is cut short and the rest queued), and the pump stands aside until that queue has
    drained, so no frame overtakes another. When the agent reads again it hears every
    frame once, in order, and the pump takes over again."""
    with trio.fail_after(15):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai, audio="pcmu")
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            first = random_ulaw(400, seed=5)
            await fake.send_media(first)
            await session.wait_for(lambda s: len(s.audio_in) >= len(first))
            await assert_pumped_when_on(relay_, fake, session)
            first = bytes(session.audio_in)  # everything the agent heard so far
            (call,) = relay_.state.calls
            assert call.agent is not None
            splice = call.agent.audio_splice()
            assert splice is not None and splice[0].raw_socket is not None
            agent_ws = splice[0]
            # small buffers on both ends, so a few KiB of messages back up
            agent_ws.raw_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            session.ws._stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            session.stall()
            burst = b""
            while agent_ws.send_backlog_since is None and len(burst) < 8000 * 10:
                chunk = random_ulaw(500, seed=len(burst))
                await fake.send_media(chunk)
                burst += chunk
                await trio.sleep(0.01)
            assert agent_ws.send_backlog_since is not None  # it did back up
            pumped = relay_.metrics.uplink_pumped
            session.resume()
            want = first + burst
            await session.wait_for(lambda s: len(s.audio_in) >= len(want))
            assert bytes(session.audio_in) == want
            last = random_ulaw(200, seed=7)
            await fake.send_media(last)
            await session.wait_for(lambda s: len(s.audio_in) >= len(want + last))
            assert bytes(session.audio_in) == want + last
            assert relay_.metrics.uplink_pumped > pumped  # the pump is back
            await fake.hang_up()
            await relay_.wait_idle()
            assert not relay_.metrics.errors


async def test_a_protocol_violation_mid_call_closes_that_call(start_relay, make_config, e2e):
    """An unmasked frame from Twilio while audio flows through the uplink pump (RFC 6455
    §5.1: a client masks every frame): the call closes with 1002, counted once, and its
    agent session is closed; the audio before it reached the agent."""
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai)
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            caller = random_ulaw(400, seed=9)
            await fake.send_media(caller)
            await session.wait_for(lambda s: len(s.audio_in) >= len(caller))
            assert bytes(session.audio_in) == caller
            await fake.ws.stream.send_all(build_frame(OP_TEXT, b"{}", mask=False))
            closed = await fake.wait_closed()
            assert closed.code == 1002
            await session.wait_closed()
            await relay_.wait_idle()
            assert dict(relay_.metrics.errors) == {"twilio_closed": 1}
            record = relay_.records(fake.call_sid)
            assert record.end_reason == "twilio closed (1002)"


async def test_caller_stop_closes_agent_session(start_relay, make_config, e2e):
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai)
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            await fake.send_media(random_ulaw(100, seed=5))
            await session.wait_for(lambda s: s.appends >= 5)
            await fake.send_stop()  # stop only: the relay must not wait for our close
            await session.wait_closed()
            closed = await fake.wait_closed()
            assert closed.code == 1000
            await relay_.wait_idle()
            assert relay_.records(fake.call_sid).end_reason == "caller hung up"
            assert not relay_.metrics.errors


async def test_twilio_socket_drop_without_stop(start_relay, make_config, e2e):
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai)
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            await fake.send_media(random_ulaw(100, seed=6))
            await session.wait_for(lambda s: s.appends >= 5)
            await fake.drop()
            await session.wait_closed()
            await relay_.wait_idle()
            record = relay_.records(fake.call_sid)
            assert (record.status, record.end_reason) == ("completed", "caller hung up")


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_agent_closes_relay_plays_buffered_audio_then_hangs_up(
    start_relay, make_config, e2e, how
):
    """The agent goes away mid-call (close frame, or its TCP dies): the caller still hears
    everything the relay holds, and the relay hangs up after the last mark."""
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai)
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            reply = random_ulaw(650, seed=7)
            await session.send_response(audio=reply)
            if how == "close":
                await session.close()
            else:
                await session.abort()  # the agent's TCP dies, no close frame
            closed = await fake.wait_closed()
            assert closed.code == 1000
            assert fake.audio == reply  # everything buffered was played ...
            played = [t for t, _, gone in fake.echoes if not gone]
            assert len(played) == len(fake.marks)
            assert fake.closed_at >= played[-1]  # ... to its last mark
            await relay_.wait_idle()
            record = relay_.records(fake.call_sid)
            assert record.end_reason == "agent disconnected"
            assert relay_.metrics.errors["agent_disconnected"] == 1


async def test_agent_connect_timeout_ends_the_call_quickly(start_relay, make_config, e2e):
    with trio.fail_after(10):
        async with silent_server() as url:
            cfg = make_config(
                agents={"gpt": {"type": "openai", "url": url, "api_key": "sk-x-0123456789"}},
                default_agent="gpt",
                media={"agent_connect_timeout_s": 0.5},
            )
            relay_ = await start_relay(cfg)
            fake = await relay_.dial()
            t0 = trio.current_time()
            closed = await fake.wait_closed(3)
            assert 0.45 <= trio.current_time() - t0 < 1.5
            assert closed.code == 1000
            await relay_.wait_idle()
            record = relay_.records(fake.call_sid)
            assert (record.status, record.end_reason) == ("completed", "agent connect timed out")
            assert relay_.metrics.errors["agent_connect"] == 1


async def test_adapter_connect_timeout_is_reported_as_a_timeout(start_relay, make_config, e2e):
    """The adapter's own connect_timeout_s firing first is still a timeout, not a failure."""
    with trio.fail_after(10):
        async with fake_openai_server(FakeOptions(hang_handshake=True)) as oai:
            cfg = make_config(
                agents={"gpt": e2e.openai_agent(oai, connect_timeout_s=0.3)},
                default_agent="gpt",
                media={"agent_connect_timeout_s": 5.0},
            )
            relay_ = await start_relay(cfg)
            fake = await relay_.dial()
            await fake.wait_closed(3)
            await relay_.wait_idle()
            assert relay_.records(fake.call_sid).end_reason == "agent connect timed out"


async def test_agent_refused_ends_the_call(start_relay, make_config, e2e):
    with trio.fail_after(10):
        async with fake_openai_server(reject_status=401) as oai:
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai)
            fake = await relay_.dial()
            await oai.wait_for_rejection()
            closed = await fake.wait_closed(3)
            assert closed.code == 1000
            await relay_.wait_idle()
            assert relay_.records(fake.call_sid).end_reason == "agent connect failed"
            assert relay_.metrics.errors["agent_connect"] == 1


# --- robustness ------------------------------------------------------------------------------
async def test_half_dead_twilio_socket_times_out(start_relay, make_config, e2e):
    """Twilio stops reading (its TCP window stays shut) while the agent talks: bounded
    sends time out, the call ends, nothing leaks. The lead bound is lifted so the relay
    writes faster than real time and the tiny receive window fills at once."""
    with trio.fail_after(10):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(
                start_relay,
                make_config,
                e2e,
                oai,
                media={"send_timeout_s": 0.3, "max_lead_ms": 600_000},
            )
            fake = await relay_.dial(read=False, rcvbuf=4096)
            session = await e2e.agent_session(oai)
            t0 = trio.current_time()
            try:
                await session.send_response(20_000, chunk_ms=1000)  # ~210 kB of JSON to Twilio
            except trio_websocket.ConnectionClosed:
                pass  # the relay may hang up on the agent before the response is all sent
            await relay_.wait_idle(5)
            assert trio.current_time() - t0 < 3
            await session.wait_closed()
            record = relay_.records(fake.call_sid)
            assert record.status == "completed"
            assert "timed out" in record.end_reason, record.end_reason
            assert relay_.metrics.errors["twilio_send_timeout"] == 1
            await trio.aclose_forcefully(fake.ws.stream)


async def test_no_leaks_after_calls(start_relay, make_config, e2e):
    """After calls end every way, no call state, task or file descriptor remains."""
    with trio.fail_after(15):
        async with fake_openai_server() as oai:
            relay_ = await gpt_relay(start_relay, make_config, e2e, oai)

            async def dial(index: int):
                # one at a time, so that OpenAI session ``index`` belongs to this call
                fake = await relay_.dial()
                return fake, await e2e.agent_session(oai, index)

            async def talk_and_end(fake, session, ending: str) -> None:
                await fake.send_media(random_ulaw(100, seed=len(ending)))
                await session.wait_for(lambda s: s.appends >= 5)
                await session.send_response(200)
                await fake.wait_for(lambda f: f.audio_ms >= 200)
                if ending == "stop":
                    await fake.hang_up()
                elif ending == "drop":
                    await fake.drop()
                else:
                    await session.close()
                    await fake.wait_closed()
                await session.wait_closed()

            await talk_and_end(*await dial(0), "stop")  # warm-up: lazy imports, first use
            await relay_.wait_idle()
            await trio.sleep(0.2)
            baseline, tasks = open_fds(), live_tasks()
            # With the cyclic collector off, whatever of a call outlives it sits in a
            # reference cycle: in `relay serve` that waits for a rare full collection
            # (relay/gcpolicy.py), so an ended call must be freed by reference counting.
            gc.collect()
            gc.disable()
            try:
                calls = [await dial(i) for i in (1, 2, 3)]
                async with trio.open_nursery() as endings:
                    for (fake, session), ending in zip(
                        calls, ("stop", "drop", "agent"), strict=True
                    ):
                        endings.start_soon(talk_and_end, fake, session, ending)
                del calls, fake, session
                await relay_.wait_idle()
                assert not relay_.state.calls and relay_.metrics.active_calls == 0
                await trio.sleep(0.2)
                kept = Counter(
                    type(o).__name__
                    for o in gc.get_objects()
                    if isinstance(o, Call | OpenAIRealtimeProtocol | OpenAIRealtimeAgent)
                    # the relay's end of a Twilio stream (the fake Twilio's are client side)
                    or (isinstance(o, WebSocket) and not o.client_side)
                )
                assert not kept, kept
            finally:
                gc.enable()
            # sockets close asynchronously on the peers' side: give them a moment
            await relay_.wait_until(lambda: open_fds() <= baseline, timeout=3)
            await relay_.wait_until(lambda: live_tasks() <= tasks, timeout=3)
            assert relay_.metrics.calls_total == 4


# --- the built-in simulator against the relay -----------------------------------------------------
async def test_simulator_calls_against_the_parrot(start_relay, make_config):
    """relay.sim.simulator (an independent trio-websocket Twilio) places two concurrent calls:
    the parrot answers each, every frame carries a mark, status callbacks are recorded."""
    with trio.fail_after(15):
        relay_ = await start_relay(make_config())
        caller = speech.make_script([("silence", 0.2), ("speech", 0.8), ("silence", 2.2)])
        results = await simulate(
            relay_.base_url,
            relay_.cfg.twilio.auth_token,
            calls=2,
            duration_s=3.2,
            audio=caller,
            stagger_s=0.1,
        )
        for result in results:
            assert result.ok, result.outcome
            assert result.hung_up_by == "caller"
            assert result.invalid_messages == result.binary_frames == 0
            assert result.media_received > 0 and result.marks_received == result.media_received
            assert result.heard_ms >= 500  # the parrot repeated the utterance
            assert not [w for w in result.warnings if not w.startswith("stream url has a port")]
        await relay_.wait_idle()
        for result in results:
            record = relay_.records(result.call_sid)
            assert (record.status, record.end_reason) == ("completed", "caller hung up")
            callbacks = record.status_callbacks
            events = [cb.get("StreamEvent") or cb.get("CallStatus") for cb in callbacks]
            assert "stream-started" in events and "completed" in events
            assert len(record.transcript) >= 2  # caller utterance + parrot echo


# --- the same behaviour without the media reactor ------------------------------------------------
WITHOUT_REACTOR = [
    test_passthrough_audio_is_byte_identical,
    test_resampled_audio_pcm24k,
    test_barge_in_clear_and_truncate_accuracy,
    test_no_stale_media_after_clear_under_backpressure,
    test_agent_closes_relay_plays_buffered_audio_then_hangs_up,
    test_half_dead_twilio_socket_times_out,
    test_no_leaks_after_calls,
]


# --- the same behaviour without the uplink pump ---------------------------------------------------
WITHOUT_PUMP = [
    test_passthrough_audio_is_byte_identical,
    test_resampled_audio_pcm24k,
    test_a_protocol_violation_mid_call_closes_that_call,
    test_barge_in_clear_and_truncate_accuracy,
    test_one_read_of_media_dtmf_ping_and_a_gap,
    test_twilio_socket_drop_without_stop,
    test_half_dead_twilio_socket_times_out,
    test_no_leaks_after_calls,
]


@pytest.mark.parametrize("case", WITHOUT_PUMP, ids=lambda f: f.__name__[5:])
async def test_same_behaviour_without_the_uplink_pump(case, start_relay, make_config, e2e, nursery):
    """media.uplink_pump = false: Twilio's reads go to the agent through the Python
    layers (WebSocket.recv_nowait, the adapter's send_audio_b64_many, write_nowait).
    Same assertions, other path."""

    def config_without_pump(**kwargs):
        media = {**kwargs.pop("media", {}), "uplink_pump": False}
        return make_config(media=media, **kwargs)

    fixtures = {"start_relay": start_relay, "make_config": config_without_pump, "e2e": e2e}
    fixtures["nursery"] = nursery
    wanted = inspect.signature(case).parameters
    await case(**{name: fixtures[name] for name in wanted})


# --- the same behaviour without the compiled downlink handler ----------------------------------
WITHOUT_DIRECT = [
    test_passthrough_audio_is_byte_identical,
    test_downlink_is_paced_by_the_lead_bound,
    test_barge_in_clear_and_truncate_accuracy,
    test_no_stale_media_after_clear_under_backpressure,
    test_agent_closes_relay_plays_buffered_audio_then_hangs_up,
    test_no_leaks_after_calls,
]


@pytest.mark.parametrize("case", WITHOUT_DIRECT, ids=lambda f: f.__name__[5:])
async def test_same_behaviour_without_the_downlink_handler(
    case, start_relay, make_config, e2e, nursery
):
    """media.agent_direct = false: the agent's reads go to Twilio through the Python
    layers (the adapter's read and parse, the call's events, write_nowait). Same
    assertions, other path."""

    def config_without_direct(**kwargs):
        media = {**kwargs.pop("media", {}), "agent_direct": False}
        return make_config(media=media, **kwargs)

    fixtures = {"start_relay": start_relay, "make_config": config_without_direct, "e2e": e2e}
    fixtures["nursery"] = nursery
    fixtures["how"] = "abort"
    wanted = inspect.signature(case).parameters
    await case(**{name: fixtures[name] for name in wanted})


@pytest.mark.parametrize("case", WITHOUT_REACTOR, ids=lambda f: f.__name__[5:])
async def test_same_behaviour_with_a_task_per_socket(case, start_relay, make_config, e2e, nursery):
    """media.reactor = false (and platforms without epoll): each socket is read by its
    call's own task, through the same handlers. Same assertions, other I/O path."""

    def config_without_reactor(**kwargs):
        media = {**kwargs.pop("media", {}), "reactor": False}
        return make_config(media=media, **kwargs)

    fixtures = {"start_relay": start_relay, "make_config": config_without_reactor, "e2e": e2e}
    fixtures["nursery"] = nursery
    fixtures["how"] = "abort"  # the agent's TCP dies (the harder of the two cases)
    wanted = inspect.signature(case).parameters
    await case(**{name: fixtures[name] for name in wanted})
