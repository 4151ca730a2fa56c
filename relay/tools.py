"""Tools a voice agent may call: a small registry of Python callables and HTTP endpoints.

A tool is a function taking the parsed arguments dict and returning a string or anything
JSON-serialisable. :meth:`ToolRegistry.call` never raises for a tool's fault: an unknown
tool, bad arguments JSON, a missing required argument, an exception or a timeout all come
back as a JSON string ``{"error": "..."}`` that is handed to the model as the tool output
(the model can then apologise or retry). Cancellation (the call hung up) does propagate.

Sync functions run in a worker thread by default so a slow one cannot stall the event
loop; the timeout then abandons the thread (it keeps running, its result is dropped).

HTTP tools (:class:`HttpToolSpec`) are defined in an agent's config by URL, method, JSON
schema and timeout; the relay sends the arguments (JSON body, or the query string for
GET/DELETE) with ``httpx.AsyncClient`` (on Trio through anyio) and hands the response body
(truncated) to the agent, or a clear error on timeout, non-2xx or connection failure.
URLs that resolve to private, loopback, link-local or otherwise non-public addresses are
refused unless the tool sets ``allow_private = true``; the request then goes to the checked
address (Host header and TLS SNI keep the name), so DNS cannot swap in another between the
check and the connection. Redirects are not followed. Header values are secrets: masked in
``repr`` and never logged. :func:`resolve_tools` turns an agent's ``tools`` option into
(schemas to announce, registry that runs them) for every adapter.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import orjson
import trio

from .errors import ConfigError, RelayError
from .netguard import AddressRefused, http_target, is_public_address

__all__ = [
    "HttpTool",
    "HttpToolSpec",
    "Tool",
    "ToolRegistry",
    "default_registry",
    "error_json",
    "get_time",
    "is_public_address",
    "resolve_tools",
]

log = logging.getLogger("relay.tools")

ToolFunc = Callable[[dict[str, Any]], Any] | Callable[[dict[str, Any]], Awaitable[Any]]

#: Longest error text returned to the model (exception messages can be long or leaky).
MAX_ERROR_CHARS = 300


def error_json(message: str) -> str:
    return orjson.dumps({"error": message[:MAX_ERROR_CHARS]}).decode("utf-8")


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    func: ToolFunc
    description: str = ""
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )
    is_async: bool = False
    run_in_thread: bool = True
    #: The tool enforces this timeout itself (HTTP tools); the registry's bound then
    #: leaves it room to report its own, clearer error.
    timeout_s: float | None = None

    def schema_openai(self) -> dict[str, Any]:
        """OpenAI Realtime function tool (flat shape used in ``session.tools``)."""
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": dict(self.parameters),
        }


def _is_async_callable(func: Any) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - async callable objects
    )


class ToolRegistry:
    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def register(
        self,
        name: str,
        func: ToolFunc,
        description: str = "",
        parameters_schema: Mapping[str, Any] | None = None,
        *,
        run_in_thread: bool = True,
        timeout_s: float | None = None,
    ) -> Tool:
        """Add (or replace) a tool. ``parameters_schema`` is a JSON Schema object."""
        if not name or not isinstance(name, str):
            raise ValueError("tool name must be a non-empty string")
        if not callable(func):
            raise TypeError(f"tool {name!r}: func is not callable")
        schema = (
            dict(parameters_schema)
            if parameters_schema is not None
            else {"type": "object", "properties": {}}
        )
        tool = Tool(
            name=name,
            func=func,
            description=description,
            parameters=schema,
            is_async=_is_async_callable(func),
            run_in_thread=run_in_thread,
            timeout_s=timeout_s,
        )
        self._tools[name] = tool
        return tool

    def register_http(self, spec: HttpToolSpec) -> Tool:
        """Add an HTTP tool (see :class:`HttpToolSpec`)."""
        return self.register(
            spec.name,
            HttpTool(spec),
            spec.description,
            spec.parameters,
            run_in_thread=False,
            timeout_s=spec.timeout_s,
        )

    def merged(self, other: ToolRegistry) -> ToolRegistry:
        """A registry with this one's tools and ``other``'s (``other`` wins on a name)."""
        out = ToolRegistry()
        out._tools = {**self._tools, **other._tools}
        return out

    def tool(
        self, description: str = "", parameters_schema: Mapping[str, Any] | None = None
    ) -> Callable[[ToolFunc], ToolFunc]:
        """Decorator form of :meth:`register` (the function's name is the tool name)."""

        def deco(func: ToolFunc) -> ToolFunc:
            self.register(func.__name__, func, description, parameters_schema)
            return func

        return deco

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return list(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def subset(self, names: Iterable[str]) -> ToolRegistry:
        """A registry with only ``names`` (KeyError naming the first unknown one)."""
        sub = ToolRegistry()
        for name in names:
            if name not in self._tools:
                raise KeyError(f"unknown tool {name!r}; known: {', '.join(self._tools)}")
            sub._tools[name] = self._tools[name]
        return sub

    def schemas_openai(self) -> list[dict[str, Any]]:
        return [t.schema_openai() for t in self._tools.values()]

    async def call(self, name: str, arguments_json: str, timeout_s: float = 10.0) -> str:
        """Run a tool; the result (or a ``{"error": ...}`` JSON string) as text."""
        tool = self._tools.get(name)
        if tool is None:
            return error_json(f"unknown tool: {name}")
        try:
            args = orjson.loads(arguments_json) if arguments_json and arguments_json.strip() else {}
        except (orjson.JSONDecodeError, TypeError) as exc:
            return error_json(f"invalid arguments JSON: {exc}")
        if not isinstance(args, dict):
            return error_json("arguments must be a JSON object")
        required = tool.parameters.get("required")
        if isinstance(required, list):
            missing = [r for r in required if isinstance(r, str) and r not in args]
            if missing:
                return error_json(f"missing required argument(s): {', '.join(missing)}")
        if tool.timeout_s is not None:
            timeout_s = tool.timeout_s + 1.0  # the tool's own timeout fires first
        result: Any = None
        with trio.move_on_after(timeout_s) as scope:
            try:
                if tool.is_async:
                    result = await tool.func(args)  # type: ignore[misc]
                elif tool.run_in_thread:
                    result = await trio.to_thread.run_sync(
                        partial(tool.func, args), abandon_on_cancel=True
                    )
                else:
                    result = tool.func(args)
                    if inspect.isawaitable(result):  # a callable object returning a coroutine
                        result = await result
            except Exception as exc:
                return error_json(f"tool {name} failed: {type(exc).__name__}: {exc}")
        if scope.cancelled_caught:
            return error_json(f"tool {name} timed out after {timeout_s:g} s")
        if isinstance(result, str):
            return result
        try:
            return orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS).decode("utf-8")
        except TypeError as exc:
            return error_json(f"tool {name} returned a non-JSON result: {exc}")


# --- built-in tools ------------------------------------------------------------------
GET_TIME_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "timezone": {
            "type": "string",
            "description": "IANA time zone such as Europe/Paris; UTC when omitted.",
        }
    },
}


def get_time(args: Mapping[str, Any]) -> dict[str, str]:
    """The current date and time, optionally in an IANA time zone."""
    tz_name = args.get("timezone") or "UTC"
    if not isinstance(tz_name, str):
        raise ValueError("timezone must be a string")
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        tz = _dt.UTC if tz_name.upper() == "UTC" else ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {tz_name!r}") from None
    now = _dt.datetime.now(tz)
    return {
        "timezone": tz_name,
        "iso": now.isoformat(timespec="seconds"),
        "weekday": now.strftime("%A"),
    }


def default_registry() -> ToolRegistry:
    """A fresh registry holding the built-in tools (``get_time``)."""
    reg = ToolRegistry()
    reg.register(
        "get_time",
        get_time,
        "Get the current date and time.",
        GET_TIME_SCHEMA,
        run_in_thread=False,  # microseconds of work: no thread hop
    )
    from .control import transfer  # the call engine runs it (relay/control/transfer.py)

    reg.register(
        transfer.TOOL_NAME,
        transfer.tool_placeholder,
        transfer.TOOL_DESCRIPTION,
        transfer.TOOL_SCHEMA,
        run_in_thread=False,
    )
    return reg


# --- HTTP tools --------------------------------------------------------------------------
#: Longest response body handed to the model, in characters (the rest is cut off).
MAX_RESPONSE_CHARS = 8000
#: At most this much of a response is downloaded at all.
MAX_RESPONSE_BYTES = 256 * 1024
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_QUERY_METHODS = frozenset({"GET", "DELETE"})
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_HTTP_KEYS = frozenset(
    {
        "name",
        "description",
        "url",
        "method",
        "parameters",
        "timeout_s",
        "headers",
        "allow_private",
        "max_response_chars",
        "type",
    }
)


def _url_for_display(url: str) -> str:
    """scheme://host[:port]/path: a query string may carry a secret."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}" + (
        "?…" if parts.query else ""
    )


@dataclass(frozen=True, slots=True)
class HttpToolSpec:
    """A tool that calls an HTTP endpoint (config: one table of an agent's ``tools``)::

    tools = [{name = "lookup_order", description = "Find an order by number.",
              url = "https://api.example.com/orders/lookup", method = "POST",
              parameters = {type = "object", properties = {order = {type = "string"}},
                            required = ["order"]},
              timeout_s = 5, headers = {Authorization = "Bearer …"}}]
    """

    name: str
    url: str
    description: str = ""
    method: str = "POST"
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )
    timeout_s: float = 5.0
    headers: Mapping[str, str] = field(default_factory=dict)
    allow_private: bool = False
    max_response_chars: int = MAX_RESPONSE_CHARS

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str) or len(self.name) > 64:
            raise ValueError("name must be 1-64 characters")
        if not set(self.name) <= _NAME_CHARS:
            raise ValueError(f"name {self.name!r} may only use letters, digits, _ and -")
        parts = urlsplit(self.url) if isinstance(self.url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host/..., got {_safe_repr(self.url)}")
        method = str(self.method).upper()
        if method not in HTTP_METHODS:
            raise ValueError(f"method must be one of {', '.join(HTTP_METHODS)}")
        object.__setattr__(self, "method", method)
        if not isinstance(self.parameters, Mapping):
            raise ValueError("parameters must be a JSON schema object")
        if not (isinstance(self.timeout_s, int | float) and 0 < self.timeout_s <= 600):
            raise ValueError("timeout_s must be a number of seconds in (0, 600]")
        if not isinstance(self.headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.headers.items()
        ):
            raise ValueError("headers must map names to string values")
        for key, value in self.headers.items():
            if any(c in key + value for c in "\r\n\0"):
                raise ValueError(f"headers {key!r} contains a line break")
        if not (isinstance(self.max_response_chars, int) and self.max_response_chars > 0):
            raise ValueError("max_response_chars must be a positive integer")

    def __repr__(self) -> str:
        headers = {k: "***" for k in self.headers}
        return (
            f"HttpToolSpec(name={self.name!r}, method={self.method!r}, "
            f"url={_url_for_display(self.url)!r}, timeout_s={self.timeout_s:g}, "
            f"headers={headers!r}, allow_private={self.allow_private!r})"
        )

    __str__ = __repr__

    @classmethod
    def from_config(
        cls, table: Mapping[str, Any], where: str = "agents.*.tools[0]"
    ) -> HttpToolSpec:
        """Build from a config table; ConfigError names the key (``{where}.url``, ...)."""
        unknown = sorted(set(table) - _HTTP_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for key in ("name", "url", "description", "method"):
            if key in table:
                if not isinstance(table[key], str):
                    raise ConfigError(f"{where}.{key}: expected a string")
                kwargs[key] = table[key]
        if "parameters" in table:
            params = table["parameters"]
            if isinstance(params, str):
                try:
                    params = orjson.loads(params)
                except orjson.JSONDecodeError:
                    raise ConfigError(f"{where}.parameters: not valid JSON") from None
            if not isinstance(params, Mapping):
                raise ConfigError(f"{where}.parameters: expected a JSON schema object")
            kwargs["parameters"] = dict(params)
        if "timeout_s" in table:
            try:
                kwargs["timeout_s"] = float(table["timeout_s"])
            except (TypeError, ValueError):
                raise ConfigError(f"{where}.timeout_s: expected a number") from None
            if not math.isfinite(kwargs["timeout_s"]):
                raise ConfigError(f"{where}.timeout_s: expected a finite number")
        if "headers" in table:
            headers = table["headers"]
            if not isinstance(headers, Mapping):
                raise ConfigError(f"{where}.headers: expected a table of strings")
            kwargs["headers"] = {str(k): str(v) for k, v in headers.items()}
        if "allow_private" in table:
            value = table["allow_private"]
            if isinstance(value, str):
                value = value.strip().lower() in ("1", "true", "yes", "on")
            if not isinstance(value, bool | int):
                raise ConfigError(f"{where}.allow_private: expected a boolean")
            kwargs["allow_private"] = bool(value)
        if "max_response_chars" in table:
            try:
                kwargs["max_response_chars"] = int(table["max_response_chars"])
            except (TypeError, ValueError):
                raise ConfigError(f"{where}.max_response_chars: expected an integer") from None
        for key in ("name", "url"):
            if key not in kwargs:
                raise ConfigError(f"{where}.{key}: required for an HTTP tool")
        try:
            return cls(**kwargs)
        except ValueError as exc:
            field_name = str(exc).split(" ", 1)[0]
            key = field_name if field_name in _HTTP_KEYS else "name"
            raise ConfigError(f"{where}.{key}: {exc}") from None

    def schema_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": dict(self.parameters),
        }


def _safe_repr(value: Any) -> str:
    return repr(_url_for_display(value)) if isinstance(value, str) else repr(value)


class HttpTool:
    """The callable behind an :class:`HttpToolSpec` (async; never raises for the endpoint's
    fault: errors come back as :func:`error_json` strings)."""

    def __init__(self, spec: HttpToolSpec) -> None:
        self.spec = spec

    def __repr__(self) -> str:
        return f"HttpTool({self.spec!r})"

    async def __call__(self, args: dict[str, Any]) -> str:
        spec = self.spec
        with trio.move_on_after(spec.timeout_s) as scope:
            return await self._request(args)
        assert scope.cancelled_caught
        return error_json(f"tool {spec.name} timed out after {spec.timeout_s:g} s")

    async def _request(self, args: dict[str, Any]) -> str:
        import httpx  # imported on first use: most deployments never call an HTTP tool

        spec = self.spec
        host = urlsplit(spec.url).hostname or ""
        try:
            # relay.netguard: the request goes to the address just checked (Host and SNI
            # keep the name), so DNS cannot swap in another between check and connect
            url, headers, extensions = await http_target(
                spec.url,
                spec.headers,
                what=f"tool {spec.name}",
                refuse_private=not spec.allow_private,
            )
        except AddressRefused:
            return error_json(
                f"tool {spec.name} refused: {host} resolves to a private or local "
                "address (set allow_private = true for internal services)"
            )
        except RelayError as exc:  # the name does not resolve
            return error_json(str(exc))
        params: dict[str, str] | None = None
        content: bytes | None = None
        if spec.method in _QUERY_METHODS:
            params = {
                str(k): v if isinstance(v, str) else orjson.dumps(v).decode("utf-8")
                for k, v in args.items()
            }
        else:
            content = orjson.dumps(args)
            headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Accept", "application/json, text/plain;q=0.9, */*;q=0.5")
        body = bytearray()
        try:
            async with (
                httpx.AsyncClient(
                    timeout=spec.timeout_s, follow_redirects=False, trust_env=False
                ) as client,
                client.stream(
                    spec.method,
                    url,
                    params=params,
                    content=content,
                    headers=headers,
                    extensions=extensions,
                ) as response,
            ):
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) >= MAX_RESPONSE_BYTES:
                        break
                status = response.status_code
                encoding = response.encoding or "utf-8"
        except httpx.TimeoutException:
            return error_json(f"tool {spec.name} timed out after {spec.timeout_s:g} s")
        except (httpx.HTTPError, OSError) as exc:
            return error_json(f"tool {spec.name}: request failed: {type(exc).__name__}: {exc}")
        try:
            text = bytes(body).decode(encoding, "replace")
        except LookupError:
            text = bytes(body).decode("utf-8", "replace")
        if 200 <= status < 300:
            if len(text) > spec.max_response_chars:
                text = text[: spec.max_response_chars] + " …[truncated]"
            return text if text else orjson.dumps({"status": status}).decode("utf-8")
        snippet = " ".join(text.split())[:200]
        return error_json(f"tool {spec.name}: HTTP {status}" + (f": {snippet}" if snippet else ""))


def resolve_tools(
    value: Any, registry: ToolRegistry | None = None, *, where: str = "agents.*.tools"
) -> tuple[list[dict[str, Any]], ToolRegistry | None]:
    """An agent's ``tools`` option -> (schemas to announce, registry that runs them).

    ``value`` may be a ToolRegistry, or a list (TOML array, JSON text or comma-separated
    names) of: tool names (looked up in ``registry`` or the built-in registry), HTTP tool
    tables (with ``url``, see :class:`HttpToolSpec`), or bare schema tables (announced
    only; the engine's process-wide registry must run them). Schemas come back in the flat
    ``{"type":"function","name","description","parameters"}`` shape; each adapter maps
    them to its vendor's. ConfigError names the offending entry."""
    from .errors import ConfigError

    if value is None or value == "" or value == []:
        return ([], registry)
    if isinstance(value, ToolRegistry):
        return (value.schemas_openai(), value)
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    names: list[str] = []
    http = ToolRegistry()
    http_schemas: list[dict[str, Any]] = []
    others: list[Any] = []
    for index, item in enumerate(value):
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, Mapping) and "url" in item:
            spec = HttpToolSpec.from_config(item, f"{where}[{index}]")
            if spec.name in http:
                raise ConfigError(f"{where}[{index}].name: duplicate tool {spec.name!r}")
            http.register_http(spec)
            http_schemas.append(spec.schema_openai())
        else:
            others.append(item)
    schemas: list[dict[str, Any]] = []
    if names:
        source = registry if registry is not None else default_registry()
        try:
            sub = source.subset(names)
        except KeyError as exc:
            raise ConfigError(f"{where}: {exc.args[0]}") from None
        schemas = sub.schemas_openai()
        if registry is None:
            registry = sub
    for schema in http_schemas:
        if any(s.get("name") == schema["name"] for s in schemas):
            raise ConfigError(f"{where}: duplicate tool {schema['name']!r}")
    if len(http):
        registry = http if registry is None else registry.merged(http)
    return (schemas + http_schemas + others, registry)
