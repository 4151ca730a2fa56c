"""Baseline relays measured next to the relay by ``python -m bench load``.

They are *peers*, not part of the relay: each is a separate program started in its own
process, driven by the same load generator against the same fake agent.

- ``fastapi_relay``: the common FastAPI + ``websockets`` Twilio/OpenAI sample relay.
- ``pipecat_relay``: a Pipecat pipeline (TwilioFrameSerializer, FastAPI WebSocket
  transport, OpenAI Realtime service); optional, needs ``pip install pipecat-ai``.
"""
