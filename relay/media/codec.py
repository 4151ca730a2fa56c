"""The relay's audio codec API: the compiled relay.media._codec, re-exported.

relay.media._codec is not optional (the per-frame budget depends on it);
relay.media.codec_ref is its pure-Python specification with the same names, used by the tests.
"""

from __future__ import annotations

try:
    from relay.media._codec import (
        PUMP_CLOSED,
        PUMP_IDLE,
        PUMP_PARSED,
        PUMP_SENT,
        PUMP_UNSENT,
        DownlinkBuffer,
        DownlinkHandler,
        Histogram,
        PcmToUlaw,
        PumpHandler,
        ReactorCore,
        Resampler,
        ServerFrameParser,
        TwilioFrameParser,
        UlawToPcm,
        UplinkJitterBuffer,
        UplinkPump,
        alaw_decode,
        alaw_encode,
        b64decode,
        client_audio_frame,
        client_b64_frames,
        timer_expirations,
        twilio_frames,
        twilio_uplink,
        ulaw_decode,
        ulaw_encode,
        ws_mask,
    )
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "The compiled extension relay.media._codec is missing: run `pip install -e .` with a C "
        "compiler available."
    ) from exc

__all__ = [
    "PUMP_CLOSED",
    "PUMP_IDLE",
    "PUMP_PARSED",
    "PUMP_SENT",
    "PUMP_UNSENT",
    "DownlinkBuffer",
    "DownlinkHandler",
    "Histogram",
    "PcmToUlaw",
    "PumpHandler",
    "ReactorCore",
    "Resampler",
    "ServerFrameParser",
    "TwilioFrameParser",
    "UlawToPcm",
    "UplinkJitterBuffer",
    "UplinkPump",
    "alaw_decode",
    "alaw_encode",
    "b64decode",
    "client_audio_frame",
    "client_b64_frames",
    "timer_expirations",
    "twilio_frames",
    "twilio_uplink",
    "ulaw_decode",
    "ulaw_encode",
    "ws_mask",
]
