"""The PocketSphinx recogniser process (``python -m relay.agents.text.sphinx_worker``).

Why a process and not a thread: PocketSphinx's Python binding holds the GIL while it
decodes (measured: a thread decoding 100 ms chunks stalled the event loop for up to
380 ms), which would delay every other call's audio. Here it runs in its own process, so
the relay's loop never waits for it and recognition uses the other cores.

One process serves many calls (sessions). Framing on stdin/stdout, little-endian: a header
``op:u8 session:u32 length:u32`` then ``length`` bytes.

=======  =============================================  =====================================
op       request payload                                reply
=======  =============================================  =====================================
INIT 0   JSON {corpus, lw, discount}: builds the        INIT, JSON {ok} or {error}
         domain language model (ARPA) and dictionary
OPEN 1   -                                              -
AUDIO 2  μ-law 8 kHz (upsampled to 16 kHz here)         -
END 3    - (decodes the utterance)                      END, JSON {text, decode_ms, cpu_ms}
CLOSE 4  -                                              -
=======  =============================================  =====================================

An utterance is decoded whole at its end rather than while it streams in: PocketSphinx's
batch cepstral mean normalisation then sees all of it, which measured clearly more accurate
on 8 kHz audio (streamed 20 ms chunks lost words such as "hours" and "person"), for ~50-150 ms
of decoding after the caller stops.

The acoustic model is the US English one shipped inside the ``pocketsphinx`` wheel (16 kHz):
phone audio is upsampled with the relay's own resampler. A small n-gram model built from
the receptionist's domain sentences (not the wheel's general model, which gets about half
the words wrong on 8 kHz audio and is ~10x slower) makes it robust.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
import tempfile
import time
from typing import Any, BinaryIO

HEADER = struct.Struct("<BII")
OP_INIT, OP_OPEN, OP_AUDIO, OP_END, OP_CLOSE = 0, 1, 2, 3, 4


def build_model(corpus: str, directory: str, discount: float = 0.1) -> tuple[str, str]:
    """ARPA trigram model + pronunciation dictionary for the words of ``corpus``."""
    import pocketsphinx
    from pocketsphinx.lm import ArpaBoLM

    text = "\n".join(line.strip().lower() for line in corpus.splitlines() if line.strip())
    lm = ArpaBoLM(text=text, case="lower", add_start=True, discount_mass=discount)
    lm.compute()
    arpa = os.path.join(directory, "domain.arpa")
    with open(arpa, "w", encoding="utf-8") as f:
        lm.write(f)
    words = set(text.split())
    entries: list[str] = []
    cmudict = os.path.join(pocketsphinx.get_model_path(), "en-us", "cmudict-en-us.dict")
    with open(cmudict, encoding="utf-8") as f:
        for line in f:
            word = line.split(" ", 1)[0]
            if word.split("(", 1)[0] in words:
                entries.append(line)
    dictionary = os.path.join(directory, "domain.dict")
    with open(dictionary, "w", encoding="utf-8") as f:
        f.writelines(entries)
    return arpa, dictionary


def _write(out: BinaryIO, op: int, session: int, payload: bytes) -> None:
    out.write(HEADER.pack(op, session, len(payload)) + payload)
    out.flush()


def _read_exact(inp: BinaryIO, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = inp.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve(inp: BinaryIO, out: BinaryIO, workdir: str) -> None:
    import orjson
    import pocketsphinx

    from relay.media import codec

    config: dict[str, Any] = {}
    decoders: dict[int, Any] = {}
    utterances: dict[int, bytearray] = {}
    while True:
        head = _read_exact(inp, HEADER.size)
        if head is None:
            return
        op, session, length = HEADER.unpack(head)
        payload = _read_exact(inp, length) if length else b""
        if payload is None:
            return
        if op == OP_INIT:
            try:
                spec = orjson.loads(payload)
                arpa, dictionary = build_model(spec["corpus"], workdir, spec.get("discount", 0.1))
                config = {
                    "lm": arpa,
                    "dict": dictionary,
                    "samprate": 16000,
                    "lw": float(spec.get("lw", 10.0)),
                    "loglevel": "FATAL",
                }
                pocketsphinx.Decoder(**config)  # fail here, not in the first call
                _write(out, OP_INIT, 0, orjson.dumps({"ok": True}))
            except Exception as exc:  # reported to the relay, which fails the call's connect
                _write(out, OP_INIT, 0, orjson.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        elif op == OP_OPEN:
            decoders[session] = pocketsphinx.Decoder(**config)
        elif op == OP_AUDIO:
            if session in decoders:  # kept as is; upsampled and decoded at END, whole
                utterances.setdefault(session, bytearray()).extend(payload)
        elif op == OP_END:
            t0, c0 = time.perf_counter(), time.process_time()
            text = ""
            decoder = decoders.get(session)
            pcm = utterances.pop(session, None)
            if decoder is not None and pcm:
                # one fresh resampler per utterance: the result never depends on how the
                # audio was cut into messages
                upsampler = codec.UlawToPcm(16000)
                audio = upsampler.feed(bytes(pcm)) + upsampler.flush()
                decoder.start_utt()
                decoder.process_raw(audio, False, True)
                decoder.end_utt()
                hyp = decoder.hyp()
                text = hyp.hypstr if hyp is not None else ""
            reply = {
                "text": text,
                "decode_ms": round((time.perf_counter() - t0) * 1000, 2),
                "cpu_ms": round((time.process_time() - c0) * 1000, 2),
            }
            _write(out, OP_END, session, orjson.dumps(reply))
        elif op == OP_CLOSE:
            decoders.pop(session, None)
            utterances.pop(session, None)


def main() -> None:
    # The pool passes the directory for the model files and removes it with the process
    # (it kills its processes at the end of the run); run by hand, the worker makes its own.
    if len(sys.argv) > 1:
        serve(sys.stdin.buffer, sys.stdout.buffer, sys.argv[1])
        return
    workdir = tempfile.mkdtemp(prefix="relay-sphinx-")
    try:
        serve(sys.stdin.buffer, sys.stdout.buffer, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
