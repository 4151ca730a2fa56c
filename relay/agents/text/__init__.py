"""Text agents on the phone: a chat model (or rules) behind speech-to-text and
text-to-speech. ``conversation`` (sans-IO core), ``llm`` (chat endpoint client and turn
driver), ``speech`` (STT/TTS interfaces), ``vendors`` (cloud STT/TTS), ``local_speech`` +
``espeak`` + ``sphinx_worker`` (offline STT/TTS), ``receptionist`` (rule-based brain),
``agent`` (the Trio layer), ``factory`` (config -> ``cascaded`` / ``local`` agents)."""
