"""A local OpenAI-compatible HTTP server: ``POST /v1/chat/completions`` streaming SSE (text
and tool calls) and ``POST /v1/audio/speech`` (PCM 24 kHz, chunked), on h11 over loopback.

Refuses what the real API refuses (400/401 with an OpenAI-style error body): a missing or
wrong ``Authorization: Bearer``; a body that is not JSON; no ``model`` or ``messages``;
tools in the flat Realtime shape (Chat Completions wants ``{"type": "function",
"function": {...}}``); a ``tool`` message whose ``tool_call_id`` answers no preceding
assistant ``tool_calls``; an assistant tool call left without its ``tool`` answer; speech
with a ``response_format`` it does not know or ``input`` over 4096 characters.

Replies are scripted per request by ``respond(body) -> Reply``: text (streamed in small
deltas, ``chunk_delay_s`` apart), tool calls (split into fragments by index), an HTTP
status, a hang (headers never sent, or the stream stops mid-way). Every request is
recorded; ``disconnects`` counts streams the client closed before the end (a cancelled
model stream), ``completed`` those sent to ``[DONE]``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import numpy as np
import orjson
import trio

__all__ = ["FakeLLM", "Reply", "fake_llm"]

DEFAULT_KEY = "sk-fake-llm-0123456789abcdef"
SPEECH_FORMATS = {"mp3", "opus", "aac", "flac", "wav", "pcm"}


@dataclass
class Reply:
    text: str = ""
    #: (name, arguments JSON) per call
    tool_calls: list[tuple[str, str]] = field(default_factory=list)
    status: int = 200
    #: never send the response head
    hang: bool = False
    #: stop sending (but keep the connection) after this many text deltas
    stall_after: int | None = None
    chunk_delay_s: float = 0.01
    first_token_delay_s: float = 0.0
    #: omit tool call indexes (Gemini/Ollama style)
    no_index: bool = False


@dataclass
class FakeLLM:
    respond: Callable[[dict[str, Any]], Reply]
    api_key: str = DEFAULT_KEY
    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    speech_requests: list[dict[str, Any]] = field(default_factory=list)
    disconnects: int = 0
    completed: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    # -- validation ---------------------------------------------------------------------------
    def check_chat(self, body: Any) -> str | None:
        if not isinstance(body, dict):
            return "body must be a JSON object"
        if not body.get("model"):
            return "you must provide a model parameter"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty array"
        for i, tool in enumerate(body.get("tools") or []):
            if (
                not isinstance(tool, dict)
                or tool.get("type") != "function"
                or "function" not in tool
            ):
                return f"Missing required parameter: 'tools[{i}].function'"
        open_calls: set[str] = set()
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in ("system", "user", "assistant", "tool", "developer"):
                return f"messages[{i}].role: invalid"
            if role == "tool":
                if m.get("tool_call_id") not in open_calls:
                    return (
                        f"messages[{i}]: messages with role 'tool' must be a response to a "
                        "preceding message with 'tool_calls'"
                    )
                open_calls.discard(m["tool_call_id"])
                continue
            if open_calls:
                return "an assistant message with 'tool_calls' must be followed by tool messages"
            if role == "assistant":
                for call in m.get("tool_calls") or []:
                    open_calls.add(call.get("id"))
                if not m.get("tool_calls") and m.get("content") is None:
                    return f"messages[{i}]: assistant content is required without tool_calls"
        return None

    # -- HTTP -----------------------------------------------------------------------------------
    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            request: h11.Request | None = None
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            assert request is not None
            headers = {k.decode().lower(): v.decode() for k, v in request.headers}
            path = request.target.decode().partition("?")[0]
            if headers.get("authorization") != f"Bearer {self.api_key}":
                await self._error(conn, stream, 401, "Incorrect API key provided")
                return
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                await self._error(conn, stream, 400, "We could not parse the JSON body")
                return
            if path.endswith("/chat/completions"):
                await self._chat(conn, stream, parsed)
            elif path.endswith("/audio/speech"):
                await self._speech(conn, stream, parsed)
            else:
                await self._error(conn, stream, 404, f"unknown path {path}")
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _error(
        self, conn: h11.Connection, stream: trio.SocketStream, status: int, message: str
    ) -> None:
        if status in (400, 401, 404):
            self.refusals.append(message)
            self.notify()
        payload = orjson.dumps({"error": {"message": message, "type": "invalid_request_error"}})
        out = conn.send(
            h11.Response(
                status_code=status,
                headers=[
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(payload))),
                ],
            )
        )
        out += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
        await stream.send_all(out)

    async def _send(self, conn: h11.Connection, stream: trio.SocketStream, data: bytes) -> None:
        await stream.send_all(conn.send(h11.Data(data=data)))

    async def _chat(self, conn: h11.Connection, stream: trio.SocketStream, body: Any) -> None:
        problem = self.check_chat(body)
        if problem is not None:
            await self._error(conn, stream, 400, problem)
            return
        self.requests.append(body)
        self.notify()
        reply = self.respond(body)
        if reply.hang:
            await self._wait_gone(stream)
            return
        if reply.status != 200:
            await self._error(
                conn, stream, reply.status, "The server had an error while processing your request."
            )
            return
        await stream.send_all(
            conn.send(
                h11.Response(status_code=200, headers=[("Content-Type", "text/event-stream")])
            )
        )
        try:
            await trio.sleep(reply.first_token_delay_s)
            await self._send(conn, stream, b": keep-alive\n\n")

            def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
                chunk = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "model": body["model"],
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
                return b"data: " + orjson.dumps(chunk) + b"\r\n\r\n"

            await self._send(conn, stream, event({"role": "assistant", "content": ""}))
            words = [w + " " for w in reply.text.split(" ")] if reply.text else []
            if words:
                words[-1] = words[-1][:-1]
            for n, word in enumerate(words):
                if reply.stall_after is not None and n >= reply.stall_after:
                    await self._wait_gone(stream)
                    return
                await self._send(conn, stream, event({"content": word}))
                await trio.sleep(reply.chunk_delay_s)
            for index, (name, args) in enumerate(reply.tool_calls):
                first: dict[str, Any] = {
                    "id": f"call_{len(self.requests)}_{index}",
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
                if not reply.no_index:
                    first["index"] = index
                await self._send(conn, stream, event({"tool_calls": [first]}))
                half = len(args) // 2
                for part in (args[:half], args[half:]):
                    frag: dict[str, Any] = {"function": {"arguments": part}}
                    if not reply.no_index:
                        frag["index"] = index
                    await self._send(conn, stream, event({"tool_calls": [frag]}))
            finish = "tool_calls" if reply.tool_calls else "stop"
            await self._send(conn, stream, event({}, finish))
            usage = {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": len(words)}}
            await self._send(conn, stream, b"data: " + orjson.dumps(usage) + b"\n\n")
            await self._send(conn, stream, b"data: [DONE]\n\n")
            await stream.send_all(conn.send(h11.EndOfMessage()))
            self.completed += 1
            self.notify()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.disconnects += 1
            self.notify()

    async def _wait_gone(self, stream: trio.SocketStream) -> None:
        """Hold the connection until the client closes it (then count a disconnect)."""
        try:
            while await stream.receive_some(4096):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.disconnects += 1
        self.notify()

    async def _speech(self, conn: h11.Connection, stream: trio.SocketStream, body: Any) -> None:
        if not isinstance(body, dict) or not body.get("model") or not body.get("voice"):
            await self._error(conn, stream, 400, "model and voice are required")
            return
        text = body.get("input")
        if not isinstance(text, str) or not text or len(text) > 4096:
            await self._error(conn, stream, 400, "input must be 1 to 4096 characters")
            return
        fmt = body.get("response_format", "mp3")
        if fmt not in SPEECH_FORMATS:
            await self._error(conn, stream, 400, f"Invalid response_format {fmt!r}")
            return
        self.speech_requests.append(body)
        self.notify()
        # 60 ms of 24 kHz PCM per character, in 100 ms chunks
        n = 24000 * 60 * len(text) // 1000
        t = np.arange(n) / 24000
        pcm = (np.sin(2 * math.pi * 300 * t) * 0.3 * 32767).astype("<i2").tobytes()
        await stream.send_all(
            conn.send(h11.Response(status_code=200, headers=[("Content-Type", "audio/pcm")]))
        )
        try:
            for i in range(0, len(pcm), 4801):  # odd sizes: samples split across chunks
                await self._send(conn, stream, pcm[i : i + 4801])
                await trio.sleep(0)
            await stream.send_all(conn.send(h11.EndOfMessage()))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.disconnects += 1


@asynccontextmanager
async def fake_llm(respond: Callable[[dict[str, Any]], Reply]) -> AsyncIterator[FakeLLM]:
    server = FakeLLM(respond)
    body_error: Exception | None = None
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        try:
            yield server
        except Exception as exc:
            body_error = exc
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
