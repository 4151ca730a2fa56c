"""A tiny HTTP/1.1 server on loopback (h11) for HTTP tool tests.

Each request is recorded (method, target, headers, body) and answered by the test's
``respond`` function, which returns ``(status, body)`` or ``(status, body, headers)`` and may
``await`` (sleep past a timeout, or forever). ``disconnects`` counts requests whose client
went away before an answer was sent: how a cancelled tool call shows up at the server.

Usage::

    async with http_server(lambda req: (200, b'{"ok": true}')) as server:
        url = server.url("/lookup")
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import orjson
import trio

__all__ = ["FakeHttpServer", "Request", "http_server"]


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]


Reply = tuple[int, bytes] | tuple[int, bytes, list[tuple[str, str]]]
Responder = Callable[[Request], Reply | Awaitable[Reply]]


@dataclass
class FakeHttpServer:
    respond: Responder
    port: int = 0
    requests: list[Request] = field(default_factory=list)
    disconnects: int = 0
    answered: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(
        self, predicate: Callable[[FakeHttpServer], bool], timeout: float = 5.0
    ) -> None:
        with trio.fail_after(timeout):
            while not predicate(self):
                await self._changed.wait()

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
            req = Request(
                request.method.decode(),
                request.target.decode(),
                {k.decode().lower(): v.decode("latin-1") for k, v in request.headers},
                bytes(body),
            )
            self.requests.append(req)
            self._notify()
            reply = await self._answer(req, stream)
            if reply is None:
                return
            status, payload, *rest = reply
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
            headers += rest[0] if rest else []
            headers.append(("Connection", "close"))
            out = conn.send(h11.Response(status_code=status, headers=headers))
            out += conn.send(h11.Data(data=payload)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(out or b"")
            self.answered += 1
            self._notify()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _answer(self, req: Request, stream: trio.SocketStream) -> Reply | None:
        """Run the responder, but notice a client that goes away meanwhile."""
        result: list[Reply] = []
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                reply = self.respond(req)
                if inspect.isawaitable(reply):
                    reply = await reply
                result.append(reply)
                nursery.cancel_scope.cancel()

            async def watch_eof() -> None:
                try:
                    while await stream.receive_some(4096):
                        pass
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                self.disconnects += 1
                self._notify()
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            nursery.start_soon(watch_eof)
        return result[0] if result else None


@asynccontextmanager
async def http_server(respond: Responder) -> AsyncIterator[FakeHttpServer]:
    server = FakeHttpServer(respond)
    body_error: Exception | None = None
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        try:
            yield server
        except Exception as exc:  # re-raised outside the nursery: no ExceptionGroup
            body_error = exc
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error


def json_reply(obj: Any, status: int = 200) -> tuple[int, bytes]:
    return status, orjson.dumps(obj)
