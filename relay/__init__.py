"""relay: answer Twilio calls with AI voice agents, one Trio nursery per call."""

__version__ = "0.1.0"
