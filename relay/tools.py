"""Tools a voice agent may call: a small registry of Python callables.

A tool is a function taking the parsed arguments dict and returning a string or anything
JSON-serialisable. :meth:`ToolRegistry.call` never raises for a tool's fault: an unknown
tool, bad arguments JSON, a missing required argument, an exception or a timeout all come
back as a JSON string ``{"error": "..."}`` that is handed to the model as the tool output
(the model can then apologise or retry). Cancellation (the call hung up) does propagate.

Sync functions run in a worker thread by default so a slow one cannot stall the event
loop; the timeout then abandons the thread (it keeps running, its result is dropped).
"""

from __future__ import annotations

import datetime as _dt
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
import trio

__all__ = ["Tool", "ToolRegistry", "default_registry", "error_json", "get_time"]

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
        )
        self._tools[name] = tool
        return tool

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
    return reg
