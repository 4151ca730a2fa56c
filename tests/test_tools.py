"""relay.tools: the tool registry never raises for a tool's fault."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import trio

from relay.tools import ToolRegistry, default_registry, error_json


def err(text: str) -> str:
    data = json.loads(text)
    assert set(data) == {"error"}
    return str(data["error"])


async def test_sync_async_and_result_types() -> None:
    reg = ToolRegistry()
    reg.register("echo", lambda a: a["text"], "Echo.", {"type": "object", "required": ["text"]})

    async def add(args: dict[str, Any]) -> dict[str, int]:
        await trio.sleep(0)
        return {"sum": args["a"] + args["b"]}

    reg.register("add", add)
    assert await reg.call("echo", '{"text": "hi"}') == "hi"  # str results go through as is
    assert json.loads(await reg.call("add", '{"a": 2, "b": 3}')) == {"sum": 5}
    assert "echo" in reg and len(reg) == 2 and reg.names() == ["echo", "add"]


async def test_sync_tools_run_in_a_worker_thread() -> None:
    main = threading.get_ident()
    reg = ToolRegistry()
    reg.register("where", lambda a: threading.get_ident() != main)
    reg.register("inline", lambda a: threading.get_ident() == main, run_in_thread=False)
    assert await reg.call("where", "{}") == "true"
    assert await reg.call("inline", "") == "true"  # empty arguments mean {}


async def test_async_callable_object() -> None:
    class Tool:
        async def __call__(self, args: dict[str, Any]) -> str:
            return "called"

    reg = ToolRegistry()
    reg.register("obj", Tool())
    assert await reg.call("obj", "{}") == "called"


async def test_errors_become_json() -> None:
    reg = ToolRegistry()

    def boom(args: dict[str, Any]) -> None:
        raise RuntimeError("kaput")

    reg.register("boom", boom)
    reg.register("needs", lambda a: "ok", parameters_schema={"type": "object", "required": ["x"]})
    reg.register("weird", lambda a: object())
    assert "unknown tool" in err(await reg.call("nope", "{}"))
    assert "invalid arguments JSON" in err(await reg.call("boom", "{not json"))
    assert "JSON object" in err(await reg.call("boom", "[1, 2]"))
    assert "RuntimeError: kaput" in err(await reg.call("boom", "{}"))
    assert "missing required argument(s): x" in err(await reg.call("needs", "{}"))
    assert await reg.call("needs", '{"x": 1}') == "ok"
    assert "non-JSON" in err(await reg.call("weird", "{}"))
    assert len(err(error_json("x" * 10_000))) <= 300


async def test_timeouts_async_and_blocking_sync() -> None:
    reg = ToolRegistry()

    async def slow(args: dict[str, Any]) -> str:
        await trio.sleep(10)
        return "late"

    reg.register("slow", slow)

    def blocking(args: dict[str, Any]) -> str:
        time.sleep(0.5)
        return "late"

    reg.register("blocking", blocking)
    with trio.fail_after(3):
        start = trio.current_time()
        assert "timed out" in err(await reg.call("slow", "{}", timeout_s=0.05))
        assert "timed out" in err(await reg.call("blocking", "{}", timeout_s=0.05))
        assert trio.current_time() - start < 0.4


async def test_cancellation_propagates() -> None:
    reg = ToolRegistry()

    async def slow(args: dict[str, Any]) -> str:
        await trio.sleep(10)
        return "late"

    reg.register("slow", slow)
    with trio.move_on_after(0.05) as scope:
        await reg.call("slow", "{}", timeout_s=5)
    assert scope.cancelled_caught


def test_schemas_and_decorator_and_subset() -> None:
    reg = ToolRegistry()

    @reg.tool("Say hello.", {"type": "object", "properties": {"name": {"type": "string"}}})
    def hello(args: dict[str, Any]) -> str:
        return "hello"

    assert reg.schemas_openai() == [
        {
            "type": "function",
            "name": "hello",
            "description": "Say hello.",
            "parameters": {"type": "object", "properties": {"name": {"type": "string"}}},
        }
    ]
    assert reg.subset(["hello"]).names() == ["hello"]
    with pytest.raises(KeyError):
        reg.subset(["missing"])
    with pytest.raises(ValueError):
        reg.register("", hello)
    with pytest.raises(TypeError):
        reg.register("x", "not callable")  # type: ignore[arg-type]


async def test_builtin_get_time() -> None:
    reg = default_registry()
    assert reg.names() == ["get_time", "transfer_call"]  # transfer_call: relay/control/transfer.py
    out = json.loads(await reg.call("get_time", "{}"))
    assert out["timezone"] == "UTC" and "T" in out["iso"] and out["iso"].endswith("+00:00")
    paris = json.loads(await reg.call("get_time", '{"timezone": "Europe/Paris"}'))
    assert paris["timezone"] == "Europe/Paris"
    assert "unknown time zone" in err(await reg.call("get_time", '{"timezone": "Mars/Base"}'))
