"""Twilio-native speech: a text agent on the phone with no speech vendor of relay's own.

Twilio recognises the caller and speaks the agent's text with its own voices; relay only
deals in text (``[agents.NAME] type = "twilio-speech"``):

* ``mode = "conversation-relay"`` (default): ``<Connect><ConversationRelay>``, a WebSocket
  of text on relay's lean WebSocket path (:mod:`.conversation_relay`);
* ``mode = "gather"``: ``<Gather input="speech">`` + ``<Say>`` webhooks, one per turn, for
  accounts without ConversationRelay (:mod:`.gather`, routes in
  ``relay/http/twilio_speech_hooks.py``).

Both drive the text agents' conversation core (``relay/agents/text/llm.py``) unchanged.
"""

from .config import TwilioSpeechAgent

__all__ = ["TwilioSpeechAgent"]
