"""BASELINE PEER (not the relay): the common FastAPI + ``websockets`` Twilio relay.

Modelled on Twilio's sample "speech-assistant-openai-realtime-api-python" (FastAPI app,
``/incoming-call`` answering ``<Connect><Stream>`` TwiML, ``/media-stream`` WebSocket,
``websockets.connect`` to OpenAI Realtime; media -> ``input_audio_buffer.append``;
``response.output_audio.delta`` -> Twilio ``media`` + ``mark``; ``speech_started`` ->
``clear`` + ``conversation.item.truncate``). Deliberately kept as close to the sample as
possible, including its shortcomings, because that is what it is measured as:

- it does NOT validate X-Twilio-Signature (the sample doesn't);
- it connects to the agent before Twilio's ``start`` and can send ``streamSid: null``;
- when Twilio hangs up normally, ``iter_text`` just ends and the agent socket is left open
  until the next agent message fails to send.

Changes for the benchmark only: the agent URL, port and audio come from argv/env; the
stream URL in the TwiML is ``ws://<host:port>`` (no TLS on loopback); no ``<Say>`` prompt;
the per-event console logging is off.

    python -m bench.peers.fastapi_relay --port 5050 --agent-url ws://127.0.0.1:9000/v1/realtime
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os

import uvicorn
import websockets
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.websockets import WebSocketDisconnect

AGENT_URL = os.getenv("BENCH_AGENT_URL", "wss://api.openai.com/v1/realtime")
OPENAI_API_KEY = os.getenv("OPENAI_API_KEY", "sk-bench")
VOICE = "alloy"
SYSTEM_MESSAGE = "You are a helpful and bubbly AI assistant."
SHOW_TIMING_MATH = False

app = FastAPI()


@app.get("/", response_class=JSONResponse)
async def index_page():
    return {"message": "Twilio Media Stream Server is running!"}


@app.api_route("/incoming-call", methods=["GET", "POST"])
async def handle_incoming_call(request: Request):
    """Answer the voice webhook with <Connect><Stream> TwiML."""
    host = request.url.netloc
    twiml = (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
        f'<Stream url="ws://{host}/media-stream" /></Connect></Response>'
    )
    return HTMLResponse(content=twiml, media_type="application/xml")


@app.websocket("/media-stream")
async def handle_media_stream(websocket: WebSocket):
    """Bridge Twilio <-> the agent, exactly in the sample's shape."""
    await websocket.accept()

    async with websockets.connect(
        f"{AGENT_URL}?model=gpt-realtime",
        additional_headers={"Authorization": f"Bearer {OPENAI_API_KEY}"},
    ) as openai_ws:
        await initialize_session(openai_ws)

        stream_sid = None
        latest_media_timestamp = 0
        last_assistant_item = None
        mark_queue: list[str] = []
        response_start_timestamp_twilio = None

        async def receive_from_twilio():
            nonlocal stream_sid, latest_media_timestamp
            try:
                async for message in websocket.iter_text():
                    data = json.loads(message)
                    if data["event"] == "media" and openai_ws.state.name == "OPEN":
                        latest_media_timestamp = int(data["media"]["timestamp"])
                        audio_append = {
                            "type": "input_audio_buffer.append",
                            "audio": data["media"]["payload"],
                        }
                        await openai_ws.send(json.dumps(audio_append))
                    elif data["event"] == "start":
                        stream_sid = data["start"]["streamSid"]
                        latest_media_timestamp = 0
                    elif data["event"] == "mark":
                        if mark_queue:
                            mark_queue.pop(0)
            except WebSocketDisconnect:
                if openai_ws.state.name == "OPEN":
                    await openai_ws.close()

        async def send_to_twilio():
            nonlocal stream_sid, last_assistant_item, response_start_timestamp_twilio
            try:
                async for openai_message in openai_ws:
                    response = json.loads(openai_message)
                    kind = response.get("type")
                    if kind == "response.output_audio.delta" and "delta" in response:
                        audio_payload = base64.b64encode(
                            base64.b64decode(response["delta"])
                        ).decode("utf-8")
                        audio_delta = {
                            "event": "media",
                            "streamSid": stream_sid,
                            "media": {"payload": audio_payload},
                        }
                        await websocket.send_json(audio_delta)

                        if response.get("item_id") and response["item_id"] != last_assistant_item:
                            response_start_timestamp_twilio = latest_media_timestamp
                            last_assistant_item = response["item_id"]

                        await send_mark(websocket, stream_sid)

                    if response.get("type") == "input_audio_buffer.speech_started":
                        if last_assistant_item:
                            await handle_speech_started_event()
            except Exception as e:
                if SHOW_TIMING_MATH:
                    print(f"Error in send_to_twilio: {e}")

        async def handle_speech_started_event():
            nonlocal response_start_timestamp_twilio, last_assistant_item
            if mark_queue and response_start_timestamp_twilio is not None:
                elapsed_time = latest_media_timestamp - response_start_timestamp_twilio
                if last_assistant_item:
                    truncate_event = {
                        "type": "conversation.item.truncate",
                        "item_id": last_assistant_item,
                        "content_index": 0,
                        "audio_end_ms": elapsed_time,
                    }
                    await openai_ws.send(json.dumps(truncate_event))

                await websocket.send_json({"event": "clear", "streamSid": stream_sid})

                mark_queue.clear()
                last_assistant_item = None
                response_start_timestamp_twilio = None

        async def send_mark(connection, stream_sid):
            if stream_sid:
                mark_event = {
                    "event": "mark",
                    "streamSid": stream_sid,
                    "mark": {"name": "responsePart"},
                }
                await connection.send_json(mark_event)
                mark_queue.append("responsePart")

        await asyncio.gather(receive_from_twilio(), send_to_twilio())


async def initialize_session(openai_ws):
    """Configure the agent session: μ-law both ways, server VAD (GA event shape)."""
    session_update = {
        "type": "session.update",
        "session": {
            "type": "realtime",
            "model": "gpt-realtime",
            "output_modalities": ["audio"],
            "audio": {
                "input": {
                    "format": {"type": "audio/pcmu"},
                    "turn_detection": {"type": "server_vad"},
                },
                "output": {"format": {"type": "audio/pcmu"}, "voice": VOICE},
            },
            "instructions": SYSTEM_MESSAGE,
        },
    }
    await openai_ws.send(json.dumps(session_update))


def main(argv: list[str] | None = None) -> None:
    global AGENT_URL
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.getenv("PORT", "5050")))
    parser.add_argument("--agent-url", default=AGENT_URL)
    parser.add_argument("--audio", default="pcmu", choices=["pcmu"], help="μ-law passthrough only")
    args = parser.parse_args(argv)
    AGENT_URL = args.agent_url
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
