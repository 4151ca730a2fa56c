"""Call recording (relay/media/recording.py): a stereo WAV per call, caller left, agent right
as heard, time-aligned, written as the call runs with bounded memory, served to the owning
tenant only, pruned with the store's retention. End to end over loopback with the fake
OpenAI Realtime server; the long-call bound is checked by feeding the recorder an hour of
audio directly (no hour of waiting)."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import trio
from conftest import api_request
from fake_openai import fake_openai_server, tone

from relay.agents.registry import validate_agent
from relay.control.store import DEFAULT_TENANT
from relay.errors import ConfigError
from relay.media import recording
from relay.metrics import Metrics
from relay.records import CallRecord

SILENCE = b"\xff"


def gpt(e2e: Any, oai: Any, **extra: Any) -> dict[str, Any]:
    return e2e.openai_agent(oai, record=True, **extra)


def config(make_config: Any, tmp_path: Path, agent: dict[str, Any], **sections: Any) -> Any:
    return make_config(
        agents={"gpt": agent},
        default_agent="gpt",
        calls={"recordings_dir": str(tmp_path / "rec"), **sections.pop("calls", {})},
        **sections,
    )


def active_spans(channel: Any, threshold: int = 500) -> list[tuple[float, float]]:
    """(start s, end s) of the stretches where ``channel`` is not silent (20 ms grid)."""
    frames = len(channel) // 160
    loud = [np.abs(channel[i * 160 : (i + 1) * 160]).max() > threshold for i in range(frames)]
    spans: list[tuple[float, float]] = []
    for i, on in enumerate(loud):
        if on and (i == 0 or not loud[i - 1]):
            spans.append((i * 0.02, i * 0.02))
        if on:
            spans[-1] = (spans[-1][0], (i + 1) * 0.02)
    return spans


async def finished(relay_: Any, call_sid: str) -> Any:
    record = await relay_.wait_record(call_sid, "completed")
    await relay_.wait_until(lambda: record.recording.get("status") == "complete")
    return record


# --- options ------------------------------------------------------------------------------------
def test_record_option_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"agents\.x\.record: "):
        validate_agent({"type": "parrot", "record": "yes please"}, where="agents.x")
    validate_agent({"type": "parrot", "record": True})


def test_default_directory_is_next_to_the_sqlite_database(make_config) -> None:
    cfg = make_config()
    cfg.store.url = "sqlite:////srv/relay/relay.db"
    assert recording.default_directory(cfg) == Path("/srv/relay/recordings")
    cfg.calls.recordings_dir = "/data/rec"
    assert recording.default_directory(cfg) == Path("/data/rec")
    assert recording.recording_path(Path("/r"), "tn_1", "../etc") is None


# --- calls ----------------------------------------------------------------------------------------
async def test_both_sides_are_recorded_time_aligned(start_relay, make_config, e2e, tmp_path):
    with trio.fail_after(20):
        async with fake_openai_server(response_ms=500) as oai:
            agent = gpt(e2e, oai, greeting="Hello!")
            relay_ = await start_relay(config(make_config, tmp_path, agent))
            fake = await relay_.dial()
            # the caller: 1 s of silence, 0.6 s of a 1 kHz tone, 0.6 s of silence (Twilio's
            # timestamps are 20 ms apart from 0, whatever the wall clock does)
            caller_tone = tone(600, "pcmu", hz=1000.0)
            await fake.send_media(SILENCE * 8000 + caller_tone + SILENCE * 4800, realtime=True)
            await fake.hang_up()
            record = await finished(relay_, fake.call_sid)
    path = tmp_path / "rec" / DEFAULT_TENANT / f"{fake.call_sid}.wav"
    assert record.recording["status"] == "complete"
    assert record.recording["url"] == f"/api/v1/calls/{fake.call_sid}/recording"
    info = soundfile.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (8000, 2, "PCM_16")
    assert record.recording["bytes"] == os.path.getsize(path)
    pcm, _rate = soundfile.read(str(path), dtype="int16")
    left, right = active_spans(pcm[:, 0]), active_spans(pcm[:, 1])
    # left: the caller's tone exactly where Twilio's timestamps put it
    assert left == [(1.0, 1.6)]
    # right: the greeting (500 ms), starting when relay sent it to Twilio
    [(start, end)] = right
    assert abs(start - record.first_agent_audio_ms / 1000.0) <= 0.04
    assert abs((end - start) - 0.5) <= 0.04
    assert len(pcm) / 8000 >= 2.2  # the whole call: the caller's 2.2 s at least


async def test_a_barge_in_cuts_what_the_caller_never_heard(start_relay, make_config, e2e, tmp_path):
    with trio.fail_after(20):
        async with fake_openai_server() as oai:
            relay_ = await start_relay(config(make_config, tmp_path, gpt(e2e, oai)))
            fake = await relay_.dial()
            session = await e2e.agent_session(oai)
            await session.send_response(ms=3000)  # a burst: relay paces it in real time
            await fake.wait_for(lambda f: f.played_ms >= 800)
            await session.speech_started()  # the caller talks over it: clear
            await fake.wait_for(lambda f: bool(f.clears))
            await fake.send_media(SILENCE * 4000, realtime=True)
            await fake.hang_up()
            record = await finished(relay_, fake.call_sid)
    [barge_in] = record.barge_ins
    pcm, _rate = soundfile.read(record_path(tmp_path, fake.call_sid), dtype="int16")
    [(start, end)] = active_spans(pcm[:, 1])
    heard_s = barge_in["heard_ms"] / 1000.0
    assert 0.8 <= heard_s < 2.0
    assert abs((end - start) - heard_s) <= 0.12  # what was cleared is not in the file


def record_path(tmp_path: Path, call_sid: str) -> str:
    return str(tmp_path / "rec" / DEFAULT_TENANT / f"{call_sid}.wav")


async def test_recording_is_served_to_the_owning_tenant_only(
    start_relay, make_config, e2e, tmp_path
):
    with trio.fail_after(20):
        async with fake_openai_server(response_ms=300) as oai:
            cfg = make_config(
                agents={"gpt": gpt(e2e, oai, greeting="Hi"), "plain": e2e.openai_agent(oai)},
                numbers={"+15550001111": "plain"},
                default_agent="gpt",
                calls={"recordings_dir": str(tmp_path / "rec")},
            )
            relay_ = await start_relay(cfg)
            store = relay_.state.control.store
            _key, owner = store.create_key(DEFAULT_TENANT, "owner")
            other_tenant, _k, stranger = store.create_tenant("someone else")
            fake = await relay_.dial()
            await fake.wait_for(lambda f: f.audio_ms >= 300)
            url = f"/api/v1/calls/{fake.call_sid}/recording"
            status, body = await api_request(relay_, "GET", url, owner)
            assert status == 409 and body["error"]["code"] == "recording_in_progress"
            await fake.send_media(SILENCE * 4000, realtime=True)
            await fake.hang_up()
            await finished(relay_, fake.call_sid)
            plain = await relay_.dial(to="+15550001111")
            await plain.hang_up()
            await relay_.wait_record(plain.call_sid, "completed")
            await relay_.state.control.history.flush()

            response = await e2e.http_request(
                relay_.port, "GET", url, headers=[("Authorization", f"Bearer {owner}")]
            )
            assert response.status == 200
            assert response.headers["content-type"] == "audio/wav"
            with open(record_path(tmp_path, fake.call_sid), "rb") as fh:
                assert response.body == fh.read()
            for key, target in (
                (stranger, url),  # another tenant: as if the call did not exist
                (owner, f"/api/v1/calls/{plain.call_sid}/recording"),  # not recorded
                (owner, "/api/v1/calls/CA" + "0" * 32 + "/recording"),  # no such call
            ):
                status, body = await api_request(relay_, "GET", target, key)
                assert status == 404, (target, body)
            status, _ = await api_request(relay_, "GET", url, None)
            assert status == 401
            assert other_tenant.id != DEFAULT_TENANT


async def test_an_hour_of_call_holds_seconds_of_audio(tmp_path: Path) -> None:
    """Feed a recorder an hour of a call (caller frames every 20 ms, agent frames of
    100 ms) as fast as possible: what it holds stays a few seconds, the file grows as it
    goes, and both sides land where they belong."""
    writer = recording.RecordingWriter(tmp_path, Metrics())
    record = CallRecord("CA" + "1" * 32)
    seconds = 3600

    def code(k: int) -> int:  # a μ-law byte per second of call, never silence
        return 0x10 + k % 0x60

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        rec = writer.start(record)
        assert rec is not None
        frame_b64 = {c: base64.b64encode(bytes([c]) * 160).decode() for c in range(256)}
        queued_max = 0
        for k in range(seconds):
            for i in range(50):  # the caller: 50 frames a second
                rec.caller(k * 1000 + i * 20, frame_b64[code(k)])
                if i % 5 == 0:  # the agent: a 100 ms frame every 100 ms, from second 0.5 on
                    rec.agent([(bytes([0xFF - code(k)]) * 800, "m", "r")], k * 1000 + i * 20 + 500)
            queued_max = max(queued_max, writer._pending)
            if k % 10 == 0:
                await trio.sleep(0)  # let the writer thread take its chunks
        rec.close()
        assert await writer.flush(60)
        nursery.cancel_scope.cancel()
    # at most (SLACK + CHUNK + one agent frame) of audio per channel, ever
    bound = (recording.SLACK_MS + recording.CHUNK_MS + 100) * 8 * 2
    assert rec.peak_pending <= bound
    assert queued_max < recording.QUEUE_LIMIT
    assert record.recording["status"] == "complete"
    assert record.recording["late_ms"] == 0 and record.recording["dropped_ms"] == 0
    path = tmp_path / "default" / f"{record.call_sid}.wav"
    info = soundfile.info(str(path))
    assert info.channels == 2 and abs(info.duration - (seconds + 0.5)) < 0.2
    for k in (0, 1, 1799, 3599):
        pcm, _ = soundfile.read(str(path), dtype="int16", start=k * 8000 + 4000, frames=1)
        expect_left = np.frombuffer(recording.codec.ulaw_decode(bytes([code(k)])), "<i2")[0]
        expect_right = np.frombuffer(recording.codec.ulaw_decode(bytes([0xFF - code(k)])), "<i2")[0]
        assert (pcm[0, 0], pcm[0, 1]) == (expect_left, expect_right)


async def test_a_full_writer_queue_drops_chunks_and_counts_them(tmp_path, monkeypatch):
    monkeypatch.setattr(recording, "QUEUE_LIMIT", 80)
    metrics = Metrics()
    writer = recording.RecordingWriter(tmp_path, metrics)
    writer.running = True  # accepting, but its task never drains: a stuck disk
    rec = writer.start(CallRecord("CA" + "2" * 32))
    assert rec is not None
    payload = base64.b64encode(b"\x10" * 160).decode()
    for i in range(30 * 50):  # 30 s of caller audio
        rec.caller(i * 20, payload)
    assert writer._pending == 80 - 64  # the queue's bound (room kept for closes)
    assert rec.dropped_samples > 0 and metrics.errors["recording_backlog"] > 0
    assert rec.peak_pending <= (recording.SLACK_MS + recording.CHUNK_MS + 20) * 8


def test_retention_prunes_old_recordings(tmp_path: Path) -> None:
    writer = recording.RecordingWriter(tmp_path, Metrics(), retention_days=30)
    (tmp_path / "tn_1").mkdir()
    old, new = tmp_path / "tn_1" / "CAold.wav", tmp_path / "tn_1" / "CAnew.wav"
    for path in (old, new):
        path.write_bytes(recording.wav_header(0))
    month_ago = time.time() - 31 * 86400
    os.utime(old, (month_ago, month_ago))
    assert writer.prune() == 1
    assert not old.exists() and new.exists()
    assert recording.RecordingWriter(tmp_path, Metrics(), retention_days=0).prune() == 0
