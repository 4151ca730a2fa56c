"""Hold while the agent connects (relay/media/hold.py): files decoded once to μ-law 8 kHz,
checked when the agent is saved, streamed from the stream's start until the agent's first
audio, then cut at once (local queue dropped, Twilio ``clear``); music loops; text holds
are a ``<Say>`` before ``<Connect>``. End to end with a parrot that takes a while to
connect, heard through the built-in Twilio simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import soundfile
import trio
from conftest import ACCOUNT_SID, ADMIN_KEY, AUTH_TOKEN, api_request

from relay.agents import registry
from relay.agents.parrot import ParrotAgent
from relay.agents.registry import validate_agent
from relay.errors import ConfigError
from relay.media import hold
from relay.sim import simulator, speech


class SlowParrot(ParrotAgent):
    """A parrot whose session takes ``connect_delay_s`` to open (a vendor's start-up)."""

    name: ClassVar[str] = "slowparrot"
    delay = 1.0

    @classmethod
    def from_config(cls, options: Any) -> SlowParrot:
        agent = super().from_config({k: v for k, v in options.items() if k != "connect_delay_s"})
        agent.delay = float(options.get("connect_delay_s", 1.0))
        return agent  # type: ignore[return-value]

    async def connect(self, call: Any) -> None:
        await trio.sleep(self.delay)
        await super().connect(call)


@pytest.fixture
def slow_parrot(monkeypatch: Any) -> None:
    monkeypatch.setitem(registry.ADAPTERS, "slowparrot", "test_hold:SlowParrot")


def tone(seconds: float, rate: int, freq: float = 440.0) -> Any:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype("float32")


def write(path: Path, samples: Any, rate: int, **kw: Any) -> str:
    soundfile.write(str(path), samples, rate, **kw)
    return str(path)


# --- decoding -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rate", "fmt"), [(8000, "WAV"), (16000, "WAV"), (44100, "WAV"), (48000, "MP3")]
)
def test_files_decode_once_to_ulaw_8k(tmp_path: Path, rate: int, fmt: str) -> None:
    path = write(tmp_path / f"a.{fmt.lower()}", tone(1.0, rate), rate, format=fmt)
    ulaw = hold.load_file(path, 10.0)
    assert abs(len(ulaw) - 8000) < 1200  # MP3 pads a frame or two
    pcm = speech.mulaw_decode(ulaw).astype(np.float64)
    middle = pcm[2000:6000]
    spectrum = np.abs(np.fft.rfft(middle))
    peak_hz = np.argmax(spectrum) * 8000 / len(middle)
    assert abs(peak_hz - 440) < 10  # the tone survived resampling
    assert 0.3 < np.max(np.abs(middle)) / 32768 < 0.5
    assert hold.load_file(path, 10.0) is ulaw  # cached per file


def test_bad_files_are_refused_naming_the_option(tmp_path: Path) -> None:
    stereo = write(tmp_path / "s.wav", np.stack([tone(0.5, 8000)] * 2, axis=1), 8000)
    long = write(tmp_path / "l.wav", tone(3.0, 8000), 8000)
    text = tmp_path / "t.wav"
    text.write_text("this is not audio")
    cases = [
        ({"hold": "audio", "hold_audio": stereo}, "hold_audio", "mono"),
        ({"hold": "audio", "hold_audio": str(text)}, "hold_audio", "not a WAV or MP3"),
        ({"hold": "audio", "hold_audio": str(tmp_path / "missing.mp3")}, "hold_audio", "read"),
        ({"hold": "music"}, "hold_music", "required"),
        ({"hold": "text_then_music", "hold_music": long}, "hold_text", "required"),
        ({"hold": "jazz"}, "hold", "one of"),
    ]
    for options, key, words in cases:
        with pytest.raises(ConfigError, match=rf"agents\.a\.{key}: .*{words}"):
            validate_agent({"type": "parrot", **options}, where="agents.a")
    assert hold.MAX_AUDIO_S > 3  # the limit itself, below with a small one
    with pytest.raises(ValueError, match="more than 2 s"):
        hold.decode(Path(long).read_bytes(), 2.0, name="l.wav")


def test_player_plays_the_intro_once_then_loops_music() -> None:
    player = hold.HoldPlayer(b"I" * 300, b"M" * 250)
    out = player._chunk(1000)
    assert out == b"I" * 300 + b"M" * 250 + b"M" * 250 + b"M" * 200
    assert player._chunk(100) == b"M" * 50 + b"M" * 50
    once = hold.HoldPlayer(b"I" * 300, b"")
    assert once._chunk(1000) == b"I" * 300 and once._chunk(10) == b""


# --- calls ------------------------------------------------------------------------------------
async def test_music_plays_until_the_agent_speaks_then_stops_at_once(
    start_relay, make_config, slow_parrot, tmp_path
):
    music_path = write(tmp_path / "music.wav", tone(0.25, 8000, 440.0), 8000)
    music = hold.load_file(music_path, 60)
    cfg = make_config(
        agents={
            "desk": {
                "type": "slowparrot",
                "connect_delay_s": 1.0,
                "greeting": True,
                "hold": "music",
                "hold_music": music_path,
            }
        },
        default_agent="desk",
    )
    relay_ = await start_relay(cfg)
    heard_path = tmp_path / "heard.wav"
    with trio.fail_after(20):
        result = await simulator.place_call(
            relay_.base_url,
            AUTH_TOKEN,
            account_sid=ACCOUNT_SID,
            duration_s=3.0,
            audio=b"\xff" * 8000 * 3,  # a silent caller: nothing to barge in with
            record_path=heard_path,
        )
    assert result.ok, result.outcome
    record = relay_.records(result.call_sid)
    # hold audio reached the caller before the agent could have said anything ...
    assert result.first_agent_audio_s is not None and result.first_agent_audio_s < 1.0
    # ... and is not counted as the agent's first audio
    assert record.first_agent_audio_ms is not None and record.first_agent_audio_ms >= 1000
    assert result.clears == 1  # the hold's tail at Twilio was cleared at the first word
    heard = soundfile.read(str(heard_path), dtype="int16")[0]
    music_pcm = speech.mulaw_decode(music)
    chime = speech.mulaw_decode(speech.mulaw_encode(speech.greeting_chime()))
    start = _find(heard, music_pcm[:400])  # where the hold music starts
    assert 0 <= start and not np.any(heard[:start])  # nothing else before it
    loops = 3  # at least three loops of the 250 ms music before the agent's 1 s start
    expected = np.tile(music_pcm, loops)
    assert np.array_equal(heard[start : start + len(expected)], expected)
    chime_at = _find(heard, chime[:400])
    assert chime_at > start + len(expected)
    # no overlap: the chime plays whole and clean; no gap: at most one 20 ms tick of silence
    assert np.array_equal(heard[chime_at : chime_at + len(chime)], chime)
    before = heard[:chime_at]
    last_hold = len(before) - int(np.argmax(np.abs(before[::-1]) > 0))
    assert chime_at - last_hold <= 160 + 8
    assert relay_.state.hold_library.failures == 0


async def test_text_hold_is_said_before_the_stream(start_relay, make_config, tmp_path):
    music_path = write(tmp_path / "music.mp3", tone(0.5, 16000), 16000, format="MP3")
    cfg = make_config(
        agents={
            "desk": {
                "type": "parrot",
                "hold": "text_then_music",
                "hold_text": "Please hold while we connect you.",
                "hold_voice": "Polly.Joanna-Neural",
                "hold_music": music_path,
            }
        },
        default_agent="desk",
    )
    relay_ = await start_relay(cfg)
    with trio.fail_after(10):
        _response, twiml = await relay_.voice()
    assert twiml is not None and twiml.verbs == ["Say", "Connect"]
    assert twiml.root[0].text == "Please hold while we connect you."
    assert twiml.root[0].get("voice") == "Polly.Joanna-Neural"


async def test_api_refuses_a_hold_file_that_is_not_audio(start_relay, make_config, tmp_path):
    relay_ = await start_relay(make_config())
    bad = tmp_path / "hold.mp3"
    bad.write_bytes(b"ID3 but not really an mp3" * 10)
    status, body = await api_request(relay_, "POST", "/api/v1/tenants", ADMIN_KEY, {"name": "h"})
    key = body["api_key"]["key"]
    status, answer = await api_request(
        relay_,
        "POST",
        "/api/v1/agents",
        key,
        {"name": "x", "type": "parrot", "hold": "music", "hold_music": str(bad)},
    )
    assert status == 400 and answer["error"]["field"] == "hold_music", answer


async def test_unreachable_hold_url_means_silence_not_a_failed_call(start_relay, make_config):
    cfg = make_config(
        agents={
            "desk": {"type": "parrot", "hold": "music", "hold_music": "http://127.0.0.1:9/x.mp3"}
        },
        default_agent="desk",
    )
    relay_ = await start_relay(cfg)
    with trio.fail_after(20):
        result = await simulator.place_call(
            relay_.base_url, AUTH_TOKEN, account_sid=ACCOUNT_SID, duration_s=1.0
        )
    assert result.ok, result.outcome
    assert relay_.state.hold_library.failures == 1  # loopback refused: not a public address
    assert relay_.metrics.errors["hold_audio"] == 1


def _find(haystack: Any, needle: Any) -> int:
    """Index of the first exact occurrence of ``needle`` in ``haystack`` (-1: none)."""
    n = len(needle)
    candidates = np.flatnonzero(haystack[: len(haystack) - n + 1] == needle[0])
    for i in candidates:
        if np.array_equal(haystack[i : i + n], needle):
            return int(i)
    return -1
