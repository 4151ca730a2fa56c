"""The Quart-Trio app served by Hypercorn on the relay's one port (see ``server.py``).

* ``/twilio/voice``, ``/twilio/status``  Twilio's webhooks (``twilio_hooks.py``)
* ``/api/v1/...``                          the tenants' control-plane API (``api.py``)
* ``/healthz``, ``/metrics``, ``/calls``   operations (``ops.py``; admin key)

The media stream (``/twilio/stream``) never reaches this app: ``server.py`` hands it to the
lean WebSocket path before HTTP parsing gets involved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quart_trio import QuartTrio

from . import api, ops, twilio_hooks, twilio_speech_hooks

if TYPE_CHECKING:
    from ..state import RelayState

# Twilio's webhook bodies are a few hundred bytes and API bodies a few KB; anything near
# this is not a legitimate request.
MAX_BODY_BYTES = 64 * 1024


def create_app(state: RelayState) -> QuartTrio:
    app = QuartTrio("relay")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    twilio_hooks.register(app, state)
    twilio_speech_hooks.register(app, state)  # ConversationRelay / <Gather> agents
    ops.register(app, state)
    api.register(app, state)
    return app
