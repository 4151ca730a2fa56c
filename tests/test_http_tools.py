"""relay.tools HTTP tools against a real HTTP server on loopback (tests/fake_http.py):
success, timeout, non-2xx, connection failure, the private-address refusal, cancellation,
configuration errors and secret masking, and the shared ``resolve_tools`` helper."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio
from fake_http import Request, http_server, json_reply

from relay.errors import ConfigError
from relay.tools import (
    HttpToolSpec,
    ToolRegistry,
    default_registry,
    is_public_address,
    resolve_tools,
)

SCHEMA = {
    "type": "object",
    "properties": {"order": {"type": "string"}},
    "required": ["order"],
}


def err(text: str) -> str:
    data = json.loads(text)
    assert set(data) == {"error"}, text
    return str(data["error"])


def registry_with(url: str, **kw: Any) -> ToolRegistry:
    kw.setdefault("allow_private", True)  # the test server is on loopback
    reg = ToolRegistry()
    reg.register_http(
        HttpToolSpec(
            name="lookup_order", url=url, description="Find an order.", parameters=SCHEMA, **kw
        )
    )
    return reg


async def test_post_json_and_response_body() -> None:
    async def respond(req: Request) -> tuple[int, bytes]:
        return json_reply({"order": req.json["order"], "status": "shipped"})

    with trio.fail_after(5):
        async with http_server(respond) as server:
            reg = registry_with(
                server.url("/orders/lookup"), headers={"Authorization": "Bearer SECRET-123"}
            )
            out = await reg.call("lookup_order", '{"order": "A-17"}')
            assert json.loads(out) == {"order": "A-17", "status": "shipped"}
            (req,) = server.requests
            assert req.method == "POST" and req.path == "/orders/lookup"
            assert req.json == {"order": "A-17"}
            assert req.headers["content-type"] == "application/json"
            assert req.headers["authorization"] == "Bearer SECRET-123"


async def test_get_sends_arguments_as_query() -> None:
    with trio.fail_after(5):
        async with http_server(lambda req: (200, b"plain text answer")) as server:
            reg = registry_with(server.url("/find"), method="get")
            out = await reg.call("lookup_order", '{"order": "A 17", "n": 2, "deep": {"x": 1}}')
            assert out == "plain text answer"
            (req,) = server.requests
            assert req.method == "GET" and req.body == b""
            assert req.query == "order=A+17&n=2&deep=%7B%22x%22%3A1%7D"


async def test_long_body_is_truncated() -> None:
    with trio.fail_after(5):
        async with http_server(lambda req: (200, b"x" * 100_000)) as server:
            reg = registry_with(server.url(), max_response_chars=1000)
            out = await reg.call("lookup_order", '{"order": "1"}')
            assert out.startswith("x" * 1000) and out.endswith("[truncated]") and len(out) < 1100


async def test_timeout_is_a_clear_error() -> None:
    async def hang(req: Request) -> tuple[int, bytes]:
        await trio.sleep_forever()
        raise AssertionError

    with trio.fail_after(5):
        async with http_server(hang) as server:
            reg = registry_with(server.url(), timeout_s=0.3)
            t0 = trio.current_time()
            out = await reg.call("lookup_order", '{"order": "1"}')
            assert "timed out after 0.3 s" in err(out)
            assert trio.current_time() - t0 < 2.0
            await server.wait_for(lambda s: s.disconnects == 1)  # the request was abandoned


@pytest.mark.parametrize("status", [500, 404, 302])
async def test_non_2xx_is_an_error_with_the_status(status: int) -> None:
    with trio.fail_after(5):
        async with http_server(lambda req: (status, b'{"detail": "database down"}')) as server:
            reg = registry_with(server.url())
            message = err(await reg.call("lookup_order", '{"order": "1"}'))
            assert f"HTTP {status}" in message and "lookup_order" in message
            assert "database down" in message


async def test_connection_refused_is_an_error() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    reg = registry_with(f"http://127.0.0.1:{port}/x")
    with trio.fail_after(5):
        assert "request failed" in err(await reg.call("lookup_order", '{"order": "1"}'))


async def test_private_addresses_are_refused_by_default(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(5):
        async with http_server(lambda req: (200, b"should not be reached")) as server:
            for url in (server.url("/x"), f"http://localhost:{server.port}/x"):
                reg = registry_with(url, allow_private=False, headers={"X-Key": "SECRET-9"})
                with caplog.at_level(logging.WARNING, logger="relay.tools"):
                    message = err(await reg.call("lookup_order", '{"order": "1"}'))
                assert "refused" in message and "allow_private" in message
            assert not server.requests
            assert "SECRET-9" not in caplog.text


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # CGNAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("not an address", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(address) is public


async def test_cancellation_abandons_the_request() -> None:
    """The call hangs up mid-request: the tool call is cancelled (it runs in the call's
    nursery) and the connection to the endpoint is closed at once."""

    async def hang(req: Request) -> tuple[int, bytes]:
        await trio.sleep_forever()
        raise AssertionError

    with trio.fail_after(5):
        async with http_server(hang) as server:
            reg = registry_with(server.url(), timeout_s=30)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reg.call, "lookup_order", '{"order": "1"}')
                await server.wait_for(lambda s: len(s.requests) == 1)
                nursery.cancel_scope.cancel()
            await server.wait_for(lambda s: s.disconnects == 1)
            assert server.answered == 0


async def test_missing_required_argument_never_reaches_the_endpoint() -> None:
    with trio.fail_after(5):
        async with http_server(lambda req: (200, b"{}")) as server:
            reg = registry_with(server.url())
            assert "missing required" in err(await reg.call("lookup_order", "{}"))
            assert not server.requests


# --- configuration ------------------------------------------------------------------------
def test_spec_from_config_and_masking() -> None:
    spec = HttpToolSpec.from_config(
        {
            "name": "lookup_order",
            "description": "Find an order.",
            "url": "https://api.example.com/orders?api_key=QUERYSECRET",
            "method": "post",
            "parameters": json.dumps(SCHEMA),
            "timeout_s": "2.5",
            "headers": {"Authorization": "Bearer HEADERSECRET"},
        }
    )
    assert (spec.method, spec.timeout_s, spec.allow_private) == ("POST", 2.5, False)
    assert spec.parameters == SCHEMA
    for text in (repr(spec), str(spec), repr(default_registry()), f"{spec}"):
        assert "HEADERSECRET" not in text and "QUERYSECRET" not in text
    assert "Authorization" in repr(spec) and "api.example.com/orders" in repr(spec)
    assert spec.schema_openai() == {
        "type": "function",
        "name": "lookup_order",
        "description": "Find an order.",
        "parameters": SCHEMA,
    }


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"name": "x"}, "url"),
        ({"url": "https://a.example/"}, "name"),
        ({"name": "x", "url": "ftp://a.example/"}, "url"),
        ({"name": "x", "url": "https:///nohost"}, "url"),
        ({"name": "bad name!", "url": "https://a.example/"}, "name"),
        ({"name": "x", "url": "https://a.example/", "method": "TRACE"}, "method"),
        ({"name": "x", "url": "https://a.example/", "timeout_s": "soon"}, "timeout_s"),
        ({"name": "x", "url": "https://a.example/", "timeout_s": 0}, "timeout_s"),
        ({"name": "x", "url": "https://a.example/", "parameters": "{nope"}, "parameters"),
        ({"name": "x", "url": "https://a.example/", "headers": "Bearer"}, "headers"),
        ({"name": "x", "url": "https://a.example/", "headers": {"A": "b\r\nX: y"}}, "headers"),
        ({"name": "x", "url": "https://a.example/", "verb": "GET"}, "verb"),
    ],
)
def test_spec_errors_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        HttpToolSpec.from_config(table, "agents.*.tools[3]")
    assert "agents.*.tools[3]" in str(info.value) and key in str(info.value)


def test_resolve_tools_mixes_names_http_and_schemas() -> None:
    http = {"name": "lookup_order", "url": "https://api.example.com/x", "parameters": SCHEMA}
    bare = {"type": "function", "name": "engine_tool", "parameters": {"type": "object"}}
    schemas, reg = resolve_tools(["get_time", http, bare])
    assert [s["name"] for s in schemas] == ["get_time", "lookup_order", "engine_tool"]
    assert reg is not None and reg.names() == ["get_time", "lookup_order"]
    # JSON text (environment overrides) and comma-separated names
    schemas, reg = resolve_tools(json.dumps([http]))
    assert [s["name"] for s in schemas] == ["lookup_order"] and reg is not None
    schemas, reg = resolve_tools("get_time")
    assert reg is not None and reg.names() == ["get_time"]
    assert resolve_tools(None) == ([], None)
    # an explicit registry is kept (not mutated) and extended
    own = ToolRegistry()
    own.register("mine", lambda a: "ok")
    schemas, reg = resolve_tools(["mine", http], own)
    assert reg is not None and reg.names() == ["mine", "lookup_order"] and own.names() == ["mine"]
    with pytest.raises(ConfigError, match=r"tools\[1\]"):
        resolve_tools([http, http])
    with pytest.raises(ConfigError, match="unknown tool"):
        resolve_tools(["nope"])
    with pytest.raises(ConfigError, match=r"tools\[0\]\.name"):
        resolve_tools([{"url": "https://a.example/"}])
