"""BASELINE PEER (not the relay): a Twilio relay built the Pipecat way.

One Pipecat pipeline per call, as in Pipecat's Twilio examples: a FastAPI WebSocket
endpoint, ``parse_telephony_websocket`` for Twilio's ``connected``/``start``, a
``TwilioFrameSerializer`` inside a ``FastAPIWebsocketTransport``, and
``OpenAIRealtimeLLMService`` pointed at the benchmark's fake agent:

    transport.input() -> user aggregator -> OpenAI Realtime -> transport.output() -> assistant

Pipecat pipelines carry PCM: the serializer converts Twilio μ-law 8 kHz to PCM, the
OpenAI service resamples to 24 kHz (Pipecat's OpenAI Realtime service always uses PCM
24 kHz), and back. So this peer is compared in the ``pcm24k`` (resampling) mode only.

Benchmark-only choices: no signature validation (Pipecat's examples have none), auto
hang-up via Twilio's REST API off (there is no Twilio here), no ``<Say>`` prompt, logging
at WARNING. Requires ``pip install pipecat-ai fastapi uvicorn``; the harness skips this
peer with a message when Pipecat is not importable.

    python -m bench.peers.pipecat_relay --port 5060 --agent-url ws://127.0.0.1:9000/v1/realtime
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse
from loguru import logger
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.services.openai.realtime.events import (
    AudioConfiguration,
    AudioInput,
    SessionProperties,
    TurnDetection,
)
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)
from pipecat.workers.runner import WorkerRunner

AGENT_URL = os.getenv("BENCH_AGENT_URL", "wss://api.openai.com/v1/realtime")
OPENAI_API_KEY = os.getenv("OPENAI_API_KEY", "sk-bench")

app = FastAPI()


@app.get("/", response_class=JSONResponse)
async def index_page():
    return {"message": "pipecat peer running"}


@app.post("/incoming-call")
async def incoming_call(request: Request):
    twiml = (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
        f'<Stream url="ws://{request.url.netloc}/ws" /></Connect></Response>'
    )
    return HTMLResponse(content=twiml, media_type="application/xml")


@app.websocket("/ws")
async def media_stream(websocket: WebSocket):
    await websocket.accept()
    _, call_data = await parse_telephony_websocket(websocket)
    serializer = TwilioFrameSerializer(
        stream_sid=call_data["stream_id"],
        call_sid=call_data["call_id"],
        params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
    )
    transport = FastAPIWebsocketTransport(
        websocket=websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            add_wav_header=False,
            serializer=serializer,
        ),
    )
    await run_bot(transport)


async def run_bot(transport: FastAPIWebsocketTransport) -> None:
    llm = OpenAIRealtimeLLMService(
        api_key=OPENAI_API_KEY,
        base_url=AGENT_URL,
        settings=OpenAIRealtimeLLMService.Settings(
            system_instruction="You are a helpful phone agent.",
            session_properties=SessionProperties(
                audio=AudioConfiguration(input=AudioInput(turn_detection=TurnDetection()))
            ),
        ),
    )
    context = LLMContext([{"role": "developer", "content": "Say hello!"}])
    aggregators = LLMContextAggregatorPair(context, realtime_service_mode=True)
    pipeline = Pipeline(
        [
            transport.input(),
            aggregators.user(),
            llm,
            transport.output(),
            aggregators.assistant(),
        ]
    )
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(audio_in_sample_rate=8000, audio_out_sample_rate=8000),
    )

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


def main(argv: list[str] | None = None) -> None:
    global AGENT_URL
    parser = argparse.ArgumentParser(description="Pipecat baseline peer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.getenv("PORT", "5060")))
    parser.add_argument("--agent-url", default=AGENT_URL)
    parser.add_argument("--audio", default="pcm24k", choices=["pcm24k"])
    args = parser.parse_args(argv)
    AGENT_URL = args.agent_url
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
