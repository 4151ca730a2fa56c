"""The control-plane API, ``/api/v1``: tenants, keys, Twilio settings, numbers, agents, calls.

Authentication: ``Authorization: Bearer <key>``. ``POST/GET /api/v1/tenants`` take the
admin key (``security.admin_key``); everything else takes a tenant's API key and sees only
that tenant's data. Another tenant's id answers exactly like an id that does not exist
(404), so the API never tells whether it exists elsewhere.

Errors are JSON, one shape everywhere::

    {"error": {"code": "invalid_field", "field": "account_sid", "message": "..."}}

Bodies are JSON objects (at most 64 KiB); unknown fields and wrong types are refused with
400 naming the field, and nothing is written. Secrets (the Twilio auth token, agents' API
keys) are write-only: stored encrypted, answered masked (``…abcd``), never logged.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import orjson
from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from .. import netguard
from ..agents.registry import validate_agent
from ..config import is_secret_key, mask
from ..control import tenancy, twilio_rest
from ..control.directory import ENV_KEYED_TYPES, agent_options
from ..control.phone import is_e164
from ..control.secretbox import masked, tail
from ..control.store import DEFAULT_TENANT, AgentRow, Conflict, Store
from ..errors import ConfigError, RelayError
from ..netguard import is_public_address
from . import api_calls, api_features

if TYPE_CHECKING:
    from ..state import RelayState

log = logging.getLogger("relay.http.api")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
TOKEN_CHARS = re.compile(r"^[\x21-\x7e]{8,128}$")
NAME_MAX = 200
MAX_NUMBERS = 1000
MAX_PAGE = 200
ACCOUNT_TAKEN = "this account_sid is already configured for another tenant"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def response(self) -> Response:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field:
            body["field"] = self.field
        return _json({"error": body}, self.status)


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status=status, content_type="application/json")


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"no such {what}")


async def json_body(
    fields: Mapping[str, type | tuple[type, ...]],
    required: tuple[str, ...] = (),
    *,
    open_ended: bool = False,
) -> dict[str, Any]:
    """The request's JSON object, checked: known fields, right types, required present.

    ``open_ended``: unknown fields pass (agent options are checked by the agent's own code).
    """
    raw = await request.get_data()
    if not raw:
        data: Any = {}
    else:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "body must be a JSON object")
    for key, value in data.items():
        expected = fields.get(key)
        if expected is None:
            if open_ended:
                continue
            raise ApiError(400, "unknown_field", f"unknown field {key!r}", key)
        if value is not None and (
            not isinstance(value, expected)
            or (isinstance(value, bool) and bool not in _types(expected))
        ):
            names = "/".join(t.__name__ for t in _types(expected))
            raise ApiError(400, "invalid_type", f"{key} must be {names}", key)
    for key in required:
        if data.get(key) in (None, ""):
            raise ApiError(400, "missing_field", f"{key} is required", key)
    return data


def _types(expected: type | tuple[type, ...]) -> tuple[type, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def _name(data: Mapping[str, Any], key: str = "name") -> str:
    name = str(data.get(key) or "").strip()
    if not name or len(name) > NAME_MAX or any(ord(c) < 0x20 for c in name):
        raise ApiError(400, "invalid_field", f"{key}: 1 to {NAME_MAX} printable characters", key)
    return name


def _config_field(message: str, keys: list[str]) -> str:
    """Which option a ConfigError message is about (the API names the field)."""
    match = re.match(r"agents\.[^.:]+\.([A-Za-z0-9_]+)", message)
    if match:
        return match.group(1)
    for key in sorted(keys, key=len, reverse=True):
        if re.search(rf"\b{re.escape(key)}\b", message.split(":", 1)[-1]):
            return key
    return "type" if "type" in message else ""


def split_secrets(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Options to store in clear, and secrets to store encrypted (write-only).

    HTTP tools may carry credentials in ``headers``: then the whole ``tools`` list is kept
    encrypted, and the clear copy (what the API shows) has every header value masked.
    """
    plain = {k: v for k, v in options.items() if not is_secret_key(k)}
    secret = {k: v for k, v in options.items() if is_secret_key(k)}
    tools = options.get("tools")
    if isinstance(tools, list) and any(
        isinstance(tool, Mapping) and tool.get("headers") for tool in tools
    ):
        secret["tools"] = tools
        plain["tools"] = [
            {
                **tool,
                "headers": {k: masked(tail(str(v))) for k, v in tool["headers"].items()},
            }
            if isinstance(tool, Mapping) and isinstance(tool.get("headers"), Mapping)
            else tool
            for tool in tools
        ]
    return plain, secret


def refuse_private_targets(options: Mapping[str, Any]) -> None:
    """A tenant cannot open its tools or webhooks to private addresses: the relay's own
    network (metadata services, databases) is the deployer's, who alone may allow it in
    relay.toml."""
    for key, value in options.items():
        if key.startswith("allow_private") and value:
            raise ApiError(
                400, "invalid_field", f"{key}: only agents in relay.toml may allow it", key
            )
    tools = options.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, Mapping) and tool.get("allow_private"):
                raise ApiError(
                    400,
                    "invalid_field",
                    "tools: allow_private is only for tools defined in relay.toml",
                    "tools",
                )


def agent_json(row: AgentRow, secrets: Mapping[str, Any]) -> dict[str, Any]:
    options = dict(row.options)
    for key, value in secrets.items():  # masked like the Twilio token: …abcd
        if key != "tools":  # tools: the clear copy already has its header values masked
            options[key] = masked(tail(str(value)))
    return {
        "id": row.id,
        "name": row.name,
        "type": row.type,
        "options": options,
        "source": "api",
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def register(app: Quart, state: RelayState) -> None:
    cfg = state.cfg
    metrics = state.metrics
    control = state.control

    def store() -> Store:
        if control.store is None:
            raise ApiError(503, "no_store", "this relay runs without a store ([store] url)")
        return control.store

    def bearer() -> str:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else ""

    def endpoint(*, admin: bool = False) -> Callable[[F], F]:
        """Authenticate, run, and turn every failure into the one JSON error shape."""

        def deco(fn: F) -> F:
            @wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    if admin:
                        key = cfg.security.admin_key
                        if not key or not hmac.compare_digest(bearer().encode(), key.encode()):
                            metrics.error("api_auth")
                            raise ApiError(401, "unauthorized", "admin key required")
                        return await fn(*args, **kwargs)
                    db = store()
                    tenant = await db.run(db.tenant_for_key, bearer()) if bearer() else None
                    if tenant is None:
                        metrics.error("api_auth")
                        raise ApiError(401, "unauthorized", "a valid tenant API key is required")
                    return await fn(tenant, *args, **kwargs)
                except ApiError as exc:
                    metrics.api[f"{exc.status}"] += 1
                    if exc.status >= 500:
                        log.warning("api %s %s: %s", request.method, request.path, exc.message)
                    return exc.response()
                except RelayError as exc:
                    metrics.error(exc.kind)
                    metrics.api["503"] += 1
                    log.error("api %s %s failed: %s", request.method, request.path, exc)
                    return ApiError(503, exc.kind, str(exc)).response()

            return wrapper  # type: ignore[return-value]

        return deco

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Any:
        # Oversized bodies (413), unknown routes, wrong methods: JSON under /api/.
        if request.path.startswith("/api/"):
            return ApiError(
                exc.code or 500,
                (exc.name or "error").lower().replace(" ", "_"),
                exc.description or "",
            ).response()
        return exc

    # -- tenants and keys -----------------------------------------------------------------
    @app.post("/api/v1/tenants")
    @endpoint(admin=True)
    async def create_tenant() -> Any:
        data = await json_body({"name": str}, ("name",))
        db = store()
        tenant, key, plain = await db.run(db.create_tenant, _name(data))
        log.info("tenant %s (%s) created", tenant.id, tenant.name)
        return _json({"tenant": tenant.to_json(), "api_key": {**key.to_json(), "key": plain}}, 201)

    @app.get("/api/v1/tenants")
    @endpoint(admin=True)
    async def list_tenants() -> Any:
        db = store()
        return _json({"tenants": [t.to_json() for t in await db.run(db.list_tenants)]})

    @app.post("/api/v1/keys")
    @endpoint()
    async def create_key(tenant: str) -> Any:
        data = await json_body({"name": str})
        name = _name(data) if data.get("name") else ""
        db = store()
        key, plain = await db.run(db.create_key, tenant, name)
        return _json({**key.to_json(), "key": plain}, 201)

    @app.get("/api/v1/keys")
    @endpoint()
    async def list_keys(tenant: str) -> Any:
        db = store()
        return _json({"keys": [k.to_json() for k in await db.run(db.list_keys, tenant)]})

    @app.delete("/api/v1/keys/<key_id>")
    @endpoint()
    async def revoke_key(tenant: str, key_id: str) -> Any:
        db = store()
        if not await db.run(db.revoke_key, tenant, key_id):
            raise not_found("key")
        return Response("", status=204)

    # -- Twilio settings and numbers --------------------------------------------------------
    async def sync(tenant: str) -> dict[str, Any]:
        try:
            report = await tenancy.sync_tenant_numbers(cfg, store(), tenant)
        except tenancy.NotConfigured as exc:
            raise ApiError(409, "not_configured", str(exc)) from None
        result: dict[str, Any] = report.to_json()
        return result

    async def twilio_settings_json(tenant: str) -> dict[str, Any]:
        db = store()
        account = await db.run(db.get_twilio, tenant)
        if account is None:
            raise ApiError(404, "not_configured", "no Twilio settings saved")
        rows = await db.run(db.list_numbers, tenant)
        return {
            "account_sid": account.account_sid,
            "auth_token": masked(account.auth_token_tail),
            "phone_numbers": [r.number for r in rows],
            "region": account.region,
            "edge": account.edge,
            "updated_at": account.updated_at,
        }

    @app.put("/api/v1/settings/twilio")
    @endpoint()
    async def put_twilio(tenant: str) -> Any:
        data = await json_body(
            {
                "account_sid": str,
                "auth_token": str,
                "phone_numbers": list,
                "region": str,
                "edge": str,
            },
            ("account_sid", "auth_token"),
        )
        if tenant == DEFAULT_TENANT:
            raise ApiError(
                409, "configured_in_file", "the default tenant's Twilio account is in relay.toml"
            )
        sid = data["account_sid"]
        if not ACCOUNT_SID.match(sid):
            raise ApiError(
                400, "invalid_field", "account_sid: AC followed by 32 hex digits", "account_sid"
            )
        # Twilio's SIDs are lower-case hex, and webhooks carry them so: one spelling per
        # account, or "AC…ABC" would slip past the one-tenant-per-account constraint.
        sid = "AC" + sid[2:].lower()
        token = data["auth_token"]
        if not TOKEN_CHARS.match(token):
            raise ApiError(
                400, "invalid_field", "auth_token: 8 to 128 printable characters", "auth_token"
            )
        numbers = data.get("phone_numbers") or []
        if len(numbers) > MAX_NUMBERS:
            raise ApiError(400, "invalid_field", f"at most {MAX_NUMBERS} numbers", "phone_numbers")
        for number in numbers:
            if not isinstance(number, str) or not is_e164(number):
                raise ApiError(
                    400,
                    "invalid_field",
                    f"phone_numbers: {str(number)[:20]!r} is not E.164 (+ country code digits, "
                    "at most 15)",
                    "phone_numbers",
                )
        region, edge = data.get("region") or None, data.get("edge") or None
        if region is not None and region not in twilio_rest.REGIONS:
            raise ApiError(
                400, "invalid_field", f"region: one of {', '.join(twilio_rest.REGIONS)}", "region"
            )
        if edge is not None and edge not in twilio_rest.EDGES:
            raise ApiError(
                400, "invalid_field", f"edge: one of {', '.join(twilio_rest.EDGES)}", "edge"
            )
        if sid == cfg.twilio.account_sid:
            # relay.toml's account is the default tenant's: its webhooks are checked with
            # the configured token, so another tenant's copy would never answer a call.
            raise ApiError(409, "conflict", ACCOUNT_TAKEN, "account_sid")
        # Credentials Twilio positively refuses are not saved: otherwise anyone could claim
        # an Account SID they do not hold (and have its webhooks checked with their token).
        # Twilio unreachable or slow is not a refusal: the settings are saved and the
        # numbers report says what failed.
        probe = tenancy.TenantTwilio(sid, token, region, edge, [])
        async with probe.client(cfg) as rest:
            try:
                await rest.fetch_account()
            except twilio_rest.TwilioRestError as exc:
                if exc.kind in ("twilio_auth", "twilio_not_found"):
                    raise ApiError(
                        400,
                        "invalid_credentials",
                        f"Twilio refused this account_sid and auth_token ({exc.message})",
                        "auth_token",
                    ) from None
        db = store()
        try:
            await db.run(
                lambda: db.put_twilio(
                    tenant,
                    account_sid=sid,
                    auth_token=token,
                    region=region,
                    edge=edge,
                    numbers=numbers,
                )
            )
        except Conflict as exc:
            raise ApiError(409, "conflict", ACCOUNT_TAKEN, exc.field) from None
        control.directory.forget()
        log.info("tenant %s saved Twilio account %s (token %s)", tenant, sid, mask(token))
        report = await sync(tenant)
        return _json({"settings": await twilio_settings_json(tenant), "numbers": report})

    @app.get("/api/v1/settings/twilio")
    @endpoint()
    async def get_twilio(tenant: str) -> Any:
        return _json(await twilio_settings_json(tenant))

    @app.post("/api/v1/settings/twilio/verify")
    @endpoint()
    async def verify_twilio(tenant: str) -> Any:
        try:
            account = await tenancy.tenant_twilio(cfg, store(), tenant)
        except tenancy.NotConfigured as exc:
            raise ApiError(404, "not_configured", str(exc)) from None
        async with account.client(cfg) as rest:
            try:
                info = await rest.fetch_account()
            except twilio_rest.TwilioRestError as exc:
                return _json(
                    {
                        "ok": False,
                        "error": {
                            "kind": exc.kind,
                            "status": exc.status,
                            "code": exc.code,
                            "message": exc.message,
                        },
                    }
                )
        return _json(
            {
                "ok": info.get("status") == "active",
                "account": {
                    "sid": info.get("sid"),
                    "friendly_name": info.get("friendly_name"),
                    "status": info.get("status"),
                },
            }
        )

    @app.post("/api/v1/numbers/sync")
    @endpoint()
    async def sync_route(tenant: str) -> Any:
        await json_body({})
        return _json({"numbers": await sync(tenant)})

    @app.get("/api/v1/numbers")
    @endpoint()
    async def list_numbers(tenant: str) -> Any:
        db = store()
        return _json({"numbers": [n.to_json() for n in await db.run(db.list_numbers, tenant)]})

    @app.patch("/api/v1/numbers/<number>")
    @endpoint()
    async def patch_number(tenant: str, number: str) -> Any:
        data = await json_body({"agent": str})
        if "agent" not in data:
            raise ApiError(400, "missing_field", "agent is required (null to unset)", "agent")
        if not is_e164(number):
            raise ApiError(400, "invalid_field", "number must be E.164", "number")
        agent = data["agent"]
        if agent is not None and await control.directory.agent(tenant, agent) is None:
            raise ApiError(400, "invalid_field", f"no agent {agent!r}", "agent")
        db = store()
        if not await db.run(db.set_number_agent, tenant, number, agent):
            raise not_found("number")
        control.directory.forget()
        rows = await db.run(db.list_numbers, tenant)
        return _json(next(r.to_json() for r in rows if r.number == number))

    # -- agents -----------------------------------------------------------------------------
    async def refuse_private_endpoints(options: Mapping[str, Any]) -> None:
        """A tenant's agent endpoints (``url``, ``llm_url``, ``stt_url``, ``prep_webhook``…)
        must resolve to public addresses: the relay's own network is the deployer's. Checked
        when saved; [security] allow_private_urls lifts it for installs that need it."""
        if cfg.security.allow_private_urls:
            return
        for key, value in options.items():
            if not isinstance(value, str) or not (
                key == "url" or key.endswith(("_url", "_webhook"))
            ):
                continue
            parts = urlsplit(value)
            host = parts.hostname
            if not host:
                continue  # the adapter's own validation names a malformed URL
            try:
                port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
                addresses = await netguard.resolve(host, port)  # checked again at connect
            except (OSError, ValueError):
                raise ApiError(
                    400, "invalid_field", f"{key}: cannot resolve {host!r}", key
                ) from None
            if not addresses or not all(is_public_address(a) for a in addresses):
                raise ApiError(
                    400,
                    "invalid_field",
                    f"{key}: {host!r} is a private, loopback or link-local address",
                    key,
                )

    def check_agent(options: dict[str, Any]) -> None:
        refuse_private_targets(options)
        if options.get("type") in ENV_KEYED_TYPES and not str(options.get("api_key") or "").strip():
            # The adapter would fall back to the relay's own OPENAI_API_KEY (etc.): a
            # stored agent would run on the deployer's key and could send it to any url.
            raise ApiError(
                400,
                "invalid_field",
                "api_key: required for an agent stored through the API",
                "api_key",
            )
        try:
            validate_agent(options, where="agents.agent", env_fallback=False)
        except ConfigError as exc:
            message = str(exc).replace("agents.agent.", "").replace("agents.agent: ", "")
            field = _config_field(str(exc), list(options))
            raise ApiError(400, "invalid_field", message, field) from None

    def config_agents_json() -> list[dict[str, Any]]:
        out = []
        for name, opts in cfg.agents.items():
            options = {
                k: (masked(tail(str(v))) if is_secret_key(k) else v)
                for k, v in opts.items()
                if k != "type"
            }
            out.append(
                {
                    "id": name,
                    "name": name,
                    "type": opts.get("type"),
                    "options": options,
                    "source": "relay.toml",
                }
            )
        return out

    async def stored_agent(tenant: str, agent_id: str) -> AgentRow:
        db = store()
        row = await db.run(db.get_agent, tenant, agent_id)
        if row is None:
            if tenant == DEFAULT_TENANT and agent_id in cfg.agents:
                raise ApiError(409, "configured_in_file", "this agent is defined in relay.toml")
            raise not_found("agent")
        return row

    @app.post("/api/v1/agents")
    @endpoint()
    async def create_agent(tenant: str) -> Any:
        data = await json_body({"name": str, "type": str}, ("name", "type"), open_ended=True)
        name = _name(data)
        options = {k: v for k, v in data.items() if k != "name" and v is not None}
        check_agent(options)
        await refuse_private_endpoints(options)
        kind = options.pop("type")
        plain, secret = split_secrets(options)
        db = store()
        try:
            row = await db.run(db.create_agent, tenant, name, kind, plain, secret)
        except Conflict as exc:
            raise ApiError(409, "conflict", str(exc), exc.field) from None
        return _json(agent_json(row, secret), 201)

    @app.get("/api/v1/agents")
    @endpoint()
    async def list_agents(tenant: str) -> Any:
        db = store()
        rows = await db.run(db.list_agents, tenant)
        out = config_agents_json() if tenant == DEFAULT_TENANT else []
        out += [agent_json(r, db.agent_secrets(r)) for r in rows]
        return _json({"agents": out})

    @app.get("/api/v1/agents/<agent_id>")
    @endpoint()
    async def get_agent(tenant: str, agent_id: str) -> Any:
        if tenant == DEFAULT_TENANT and agent_id in cfg.agents:
            return _json(next(a for a in config_agents_json() if a["id"] == agent_id))
        row = await stored_agent(tenant, agent_id)
        return _json(agent_json(row, store().agent_secrets(row)))

    @app.patch("/api/v1/agents/<agent_id>")
    @endpoint()
    async def patch_agent(tenant: str, agent_id: str) -> Any:
        data = await json_body({"name": str, "type": str}, open_ended=True)
        row = await stored_agent(tenant, agent_id)
        db = store()
        merged = agent_options(db, row)
        for key, value in data.items():
            if key == "name":
                continue
            if value is None:  # null removes an option
                merged.pop(key, None)
            else:
                merged[key] = value
        check_agent(merged)
        await refuse_private_endpoints(merged)
        kind = merged.pop("type")
        name = _name(data) if "name" in data else row.name
        plain, secret = split_secrets(merged)
        try:
            updated = await db.run(db.update_agent, tenant, agent_id, name, kind, plain, secret)
        except Conflict as exc:
            raise ApiError(409, "conflict", str(exc), exc.field) from None
        if updated is None:
            raise not_found("agent")
        control.directory.forget()
        return _json(agent_json(updated, secret))

    @app.delete("/api/v1/agents/<agent_id>")
    @endpoint()
    async def delete_agent(tenant: str, agent_id: str) -> Any:
        await stored_agent(tenant, agent_id)
        db = store()
        if not await db.run(db.delete_agent, tenant, agent_id):
            raise not_found("agent")
        control.directory.forget()
        return Response("", status=204)

    api_calls.register(app, state, endpoint)  # placing, hanging up, transferring calls
    api_features.register(app, state, endpoint)  # webhook signing secret, recordings

    # -- call history -----------------------------------------------------------------------
    @app.get("/api/v1/calls")
    @endpoint()
    async def list_calls(tenant: str) -> Any:
        try:
            limit = int(request.args.get("limit", "50"))
        except ValueError:
            raise ApiError(400, "invalid_field", "limit must be an integer", "limit") from None
        if not 1 <= limit <= MAX_PAGE:
            raise ApiError(400, "invalid_field", f"limit must be 1 to {MAX_PAGE}", "limit")
        cursor = request.args.get("cursor") or None
        db = store()
        try:
            page = await db.run(db.list_calls, tenant, limit, cursor)
        except ValueError as exc:
            raise ApiError(400, "invalid_field", str(exc), "cursor") from None
        return _json({"calls": page.calls, "next_cursor": page.next_cursor})

    @app.get("/api/v1/calls/<call_sid>")
    @endpoint()
    async def get_call(tenant: str, call_sid: str) -> Any:
        db = store()
        call = await db.run(db.get_call, tenant, call_sid)
        if call is None:
            raise not_found("call")
        return _json(call)
