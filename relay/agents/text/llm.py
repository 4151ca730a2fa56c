"""The conversation core: a *brain* (a chat model, or the rule-based receptionist) driven
turn by turn over a :class:`~relay.agents.text.conversation.History`, with tools.

Nothing here opens a Trio socket: the only I/O is ``httpx.AsyncClient`` (which runs on
Trio through anyio), and tool calls go through a runner the caller passes in. The cascaded
Media Streams agent (``relay/agents/text/agent.py``) uses it, and a Twilio-native speech
mode can use it unchanged.

:class:`ChatCompletionsBrain` speaks to any OpenAI-compatible ``POST {llm_url}/chat/completions``
(OpenAI, Groq, Together, OpenRouter, vLLM, llama.cpp, Ollama, ...) with ``stream: true``.
Timeouts are httpx's: ``connect_timeout_s`` for the TCP/TLS connect and ``idle_timeout_s``
for each read (response headers, then every chunk: a model that stops streaming fails the
turn instead of leaving the caller in silence). Cancelling the awaiting scope (barge-in)
leaves the ``async with client.stream(...)`` block, which closes the response and, its
body being unread, the connection: the server sees the client go away at once.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from .conversation import ChatStream, ChatStreamError, History, SSEParser, ToolCall

__all__ = [
    "Brain",
    "BrainTurn",
    "ChatCompletionsBrain",
    "Conversation",
    "LLMError",
    "LLMOptions",
    "ReplyResult",
    "chat_tools",
]

log = logging.getLogger("relay.agents.text")

#: (text delta) -> None, called synchronously as the model streams
TextSink = Callable[[str], None]
ToolRunner = Callable[[ToolCall], Awaitable[str]]


class LLMError(Exception):
    """The model endpoint failed for this turn (HTTP error, timeout, broken stream)."""


@dataclass
class BrainTurn:
    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    #: perf_counter stamps: request sent, first text delta parsed (None: no text)
    t_request: float = 0.0
    t_first_text: float | None = None


class Brain(Protocol):
    name: str

    async def stream(
        self, messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]], on_text: TextSink
    ) -> BrainTurn: ...

    async def aclose(self) -> None: ...


def chat_tools(schemas: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Relay's flat tool schemas (``relay.tools.resolve_tools``) -> Chat Completions form."""
    out: list[dict[str, Any]] = []
    for schema in schemas:
        if "function" in schema:  # already nested
            out.append(dict(schema))
            continue
        out.append(
            {
                "type": "function",
                "function": {
                    "name": schema.get("name", ""),
                    "description": schema.get("description", ""),
                    "parameters": dict(schema.get("parameters") or {"type": "object"}),
                },
            }
        )
    return out


# --- an OpenAI-compatible Chat Completions endpoint -----------------------------------------
_SSL_CONTEXT: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    # Built once per process: creating one costs ~20 ms of CPU (loading the trust store),
    # which would stall every call's media path if done per call.
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


@dataclass(frozen=True)
class LLMOptions:
    url: str  # base URL, e.g. https://api.openai.com/v1
    model: str
    api_key: str = ""
    temperature: float | None = None
    max_tokens: int | None = None
    connect_timeout_s: float = 3.0
    idle_timeout_s: float = 4.0
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/chat/completions"

    def __repr__(self) -> str:
        key = f"…{self.api_key[-4:]}" if len(self.api_key) > 8 else ("***" if self.api_key else "")
        return f"LLMOptions(url={self.url!r}, model={self.model!r}, api_key={key!r})"


class ChatCompletionsBrain:
    """Streaming client of one OpenAI-compatible chat endpoint (one per call)."""

    name = "chat"

    def __init__(self, options: LLMOptions) -> None:
        import httpx  # the relay imports it lazily elsewhere too

        self.options = options
        self._client = httpx.AsyncClient(
            verify=_ssl_context(),
            timeout=httpx.Timeout(
                connect=options.connect_timeout_s,
                read=options.idle_timeout_s,
                write=options.idle_timeout_s,
                pool=options.connect_timeout_s,
            ),
            trust_env=False,
            follow_redirects=False,
        )
        self.requests = 0
        self.cancelled = 0
        #: prompt/completion tokens from the usage chunk (lost on cancel: counted locally)
        self.usage: dict[str, int] = {"prompt_tokens": 0, "completion_tokens": 0}
        self.streamed_chars = 0

    def request_body(
        self, messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        o = self.options
        body: dict[str, Any] = {
            "model": o.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if tools:
            body["tools"] = chat_tools(tools)
            body["tool_choice"] = "auto"
        if o.temperature is not None:
            body["temperature"] = o.temperature
        if o.max_tokens is not None:
            body["max_tokens"] = o.max_tokens
        body.update(o.extra_body)
        return body

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.options.api_key:
            headers["Authorization"] = f"Bearer {self.options.api_key}"
        headers.update(self.options.headers)
        return headers

    async def stream(
        self, messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]], on_text: TextSink
    ) -> BrainTurn:
        import httpx

        from ...errors import RelayError
        from ...netguard import http_target

        body = orjson.dumps(self.request_body(messages, tools))
        parser = SSEParser()
        acc = ChatStream()
        turn = BrainTurn("")
        self.requests += 1
        completed = False
        try:
            turn.t_request = time.perf_counter()
            # a tenant's agent (relay.netguard): the endpoint's host resolved and checked
            # public at every request, and that address is the one connected to
            url, headers, extensions = await http_target(
                self.options.endpoint, self.headers(), what="chat model"
            )
            async with self._client.stream(
                "POST", url, content=body, headers=headers, extensions=extensions
            ) as response:
                if response.status_code != 200:
                    detail = b""
                    async for chunk in response.aiter_bytes():
                        detail += chunk
                        if len(detail) > 2000:
                            break
                    text = " ".join(detail.decode("utf-8", "replace").split())[:200]
                    raise LLMError(f"HTTP {response.status_code}" + (f": {text}" if text else ""))
                async for chunk in response.aiter_raw():
                    for event in parser.feed(chunk):
                        for delta in acc.feed(event.data):
                            if turn.t_first_text is None:
                                turn.t_first_text = time.perf_counter()
                            self.streamed_chars += len(delta)
                            on_text(delta)
                    if acc.done:
                        break
            completed = True
        except ChatStreamError as exc:
            raise LLMError(str(exc)) from None
        except RelayError as exc:  # refused (private address) or not resolvable
            raise LLMError(str(exc)) from None
        except httpx.TimeoutException as exc:
            raise LLMError(f"timed out ({type(exc).__name__})") from None
        except (httpx.HTTPError, OSError) as exc:
            raise LLMError(f"request failed: {type(exc).__name__}: {exc}") from None
        finally:
            if not completed:
                self.cancelled += 1
        if not acc.done and acc.finish_reason is None and not acc.tool_calls():
            raise LLMError("stream ended before the reply was complete")
        if acc.usage:
            for key in ("prompt_tokens", "completion_tokens"):
                value = acc.usage.get(key)
                if isinstance(value, int):
                    self.usage[key] += value
        turn.text = acc.text
        turn.tool_calls = acc.tool_calls()
        turn.finish_reason = acc.finish_reason
        return turn

    async def aclose(self) -> None:
        await self._client.aclose()


# --- the turn driver -----------------------------------------------------------------------
@dataclass
class ReplyResult:
    text: str
    #: indexes of the assistant messages this reply wrote, in order
    messages: list[int] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    rounds: int = 0
    #: BrainTurn of each round (timing stamps)
    turns: list[BrainTurn] = field(default_factory=list)


class Conversation:
    """History + brain + tools: :meth:`reply` answers the last user message.

    ``on_text`` gets the reply's text as it streams; ``on_round`` is called with the history
    index of each assistant message once its text is complete (before its tools run), so
    a speaker can flush a clause that was waiting for more text ("Let me check." is heard
    while the tool runs). A cancelled reply (barge-in) still leaves an assistant message
    with the text streamed so far; the agent then cuts it to what the caller heard."""

    def __init__(
        self,
        brain: Brain,
        history: History,
        *,
        tools: Sequence[Mapping[str, Any]] = (),
        run_tool: ToolRunner | None = None,
        max_tool_rounds: int = 4,
        final_tools: frozenset[str] = frozenset(),
    ) -> None:
        self.brain = brain
        self.history = history
        self.tools = list(tools)
        self.run_tool = run_tool
        self.max_tool_rounds = max_tool_rounds
        #: tools after which the model is not asked again (hang-up, transfer)
        self.final_tools = final_tools
        #: history index of the assistant message a failed or cancelled round left
        self.partial_index: int | None = None

    async def reply(
        self, on_text: TextSink, on_round: Callable[[int], None] | None = None
    ) -> ReplyResult:
        result = ReplyResult("")
        self.partial_index = None
        while True:
            streamed: list[str] = []

            def sink(delta: str, streamed: list[str] = streamed) -> None:
                streamed.append(delta)
                on_text(delta)

            allow_tools = self.tools if result.rounds < self.max_tool_rounds else []
            try:
                turn = await self.brain.stream(self.history.request_messages(), allow_tools, sink)
            except BaseException:
                if streamed:  # cancelled or failed mid-stream: keep what was generated
                    self.partial_index = self.history.add_assistant("".join(streamed))
                raise
            result.turns.append(turn)
            result.rounds += 1
            calls = turn.tool_calls if self.run_tool is not None else []
            index = self.history.add_assistant(turn.text, calls)
            result.messages.append(index)
            result.text += turn.text
            if on_round is not None:
                on_round(index)
            if not calls:
                return result
            result.tool_calls += calls
            assert self.run_tool is not None
            for call in calls:
                output = await self.run_tool(call)
                self.history.add_tool_result(call.id, output)
            if all(call.name in self.final_tools for call in calls):
                return result
