"""Voice-agent adapters. ``registry`` maps a config ``type`` to a factory."""
