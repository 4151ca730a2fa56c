"""``relay db | tenants | keys | numbers | calls`` as a deployer runs them: real processes
(``python -m relay``) against an SQLite file store in a temporary directory (and once
against a real PostgreSQL), Twilio's REST API played by tests/fake_twilio_rest.py run as a
process of its own. What the CLI wrote is read back through the store."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.control.secretbox import SecretBox, SecretError
from relay.control.store import DEFAULT_TENANT, Store

TESTS = Path(__file__).resolve().parent
PUBLIC = "https://relay.example.com"
DEFAULT_SID, DEFAULT_TOKEN = "AC" + "1" * 32, "default-account-token-1234"
TENANT_SID, TENANT_TOKEN = "AC" + "2" * 32, "tenant-account-token-5678"
N1, N2, N3, N4 = "+14155550501", "+14155550502", "+14155550503", "+14155550504"


# --- helpers --------------------------------------------------------------------------------
def cli_env() -> dict[str, str]:
    """The test runner's environment without anything that configures a relay."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RELAY_") and k not in ("OPENAI_API_KEY", "GEMINI_API_KEY")
    }


def relay(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return relay_all(cwd, args, ok=ok)[0]


def relay_all(
    cwd: Path, *commands: tuple[str, ...], ok: bool = True
) -> list[subprocess.CompletedProcess[str]]:
    """Independent invocations at once (each costs about a second of imports and a
    migration check, so a test waits for the slowest, not the sum). ``ok``: all exit 0."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "relay", *args],
            cwd=cwd,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    results = []
    for args, proc in zip(commands, procs, strict=True):
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        result = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
        assert "Traceback" not in stderr, (args, stderr)
        if ok:
            assert proc.returncode == 0, (args, stdout, stderr)
        results.append(result)
    return results


def toml_value(value: Any) -> str:
    return json.dumps(value)  # strings, numbers and booleans: the same spelling in TOML


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/data/relay.db"


def open_store(url: str, key: str) -> Store:
    store = Store(url, SecretBox.from_setting(key))
    store.upgrade()
    return store


def table(stdout: str) -> list[list[str]]:
    """Rows of a CLI table (split on runs of two or more spaces), header first."""
    import re

    return [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines() if line.strip()]


@contextlib.contextmanager
def fake_twilio_process(tmp_path: Path, accounts: dict[str, Any]) -> Iterator[str]:
    """tests/fake_twilio_rest.py as a process; yields its base URL."""
    spec = tmp_path / "accounts.json"
    spec.write_text(json.dumps(accounts))
    proc = subprocess.Popen(
        [
            sys.executable,
            str(TESTS / "fake_twilio_rest.py"),
            "--port",
            "0",
            "--accounts",
            str(spec),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=15), "the fake Twilio did not start"
        yield str(json.loads(proc.stdout.readline())["url"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fake_numbers(url: str, account_sid: str) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/_fake/state", timeout=5) as response:
        state = json.loads(response.read())
    return {n["phone_number"]: n for n in state[account_sid]["numbers"].values()}


def fake_writes(url: str, account_sid: str) -> int:
    with urllib.request.urlopen(f"{url}/_fake/requests", timeout=5) as response:
        requests = json.loads(response.read())
    return sum(1 for r in requests if r["method"] == "POST" and r["user"] == account_sid)


def store_config(tmp_path: Path, url: str, key: str | None, name: str = "relay.toml") -> str:
    security = {"encryption_key": key} if key else {}
    return str(write_config(tmp_path / name, {"store": {"url": url}, "security": security}))


# --- db ---------------------------------------------------------------------------------------
def test_db_upgrade_and_new_key(tmp_path):
    config = store_config(tmp_path, sqlite_url(tmp_path), None)
    upgrade, *new_keys = relay_all(
        tmp_path,
        ("db", "upgrade", "--config", config),
        ("db", "new-key"),
        ("db", "new-key"),
    )
    assert "schema at revision 0002" in upgrade.stdout
    assert (tmp_path / "data" / "relay.db").exists()
    # with no encryption_key, an SQLite store's key file sits beside the database (0600)
    assert (tmp_path / "data" / "secret.key").stat().st_mode & 0o777 == 0o600
    keys = {p.stdout.strip() for p in new_keys}
    assert len(keys) == 2
    for key in keys:
        SecretBox.from_setting(key)  # a usable Fernet key
    # --config given before the sub-command names the same store (not ./relay-data)
    out = relay(tmp_path, "db", "--config", config, "upgrade")
    assert "data/relay.db" in out.stdout
    assert not (tmp_path / "relay-data").exists()


# --- tenants and keys --------------------------------------------------------------------------
def test_tenants_and_keys(tmp_path):
    key = SecretBox.new_key()
    url = sqlite_url(tmp_path)
    config = store_config(tmp_path, url, key)
    open_store(url, key).close()  # the schema exists: the invocations below may overlap
    created, refused = relay_all(
        tmp_path,
        ("tenants", "create", "Acme Dental", "--config", config),
        ("tenants", "create", "   ", "--config", config),
        ok=False,
    )
    assert created.returncode == 0, created.stderr
    first, second_line = created.stdout.splitlines()[:2]
    tenant_id = first.split()[1]
    assert first.split(None, 2) == ["tenant", tenant_id, "Acme Dental"]
    plain = second_line.split()[-1]
    assert tenant_id.startswith("tn_") and plain.startswith("rk_")
    assert "shown once" in created.stdout
    assert refused.returncode == 2 and "tenant name" in refused.stderr

    listed, issued = relay_all(
        tmp_path,
        ("tenants", "list", "--config", config),
        ("keys", "create", "--tenant", tenant_id, "--name", "ci", "--config", config),
    )
    rows = table(listed.stdout)
    assert rows[0] == ["ID", "NAME", "CREATED"]
    assert [r[:2] for r in rows[1:]] == [
        [DEFAULT_TENANT, "default (relay.toml)"],
        [tenant_id, "Acme Dental"],
    ]
    second_id = issued.stdout.split()[1].rstrip(":")
    second = issued.stdout.split()[2]
    assert second_id.startswith("key_") and second.startswith("rk_")

    store = open_store(url, key)
    try:
        assert store.tenant_for_key(plain) == tenant_id  # the printed keys work
        assert store.tenant_for_key(second) == tenant_id
    finally:
        store.close()

    keys, revoked, unknown = relay_all(
        tmp_path,
        ("keys", "list", "--tenant", tenant_id, "--config", config),
        ("keys", "revoke", "--tenant", tenant_id, second_id, "--config", config),
        ("keys", "revoke", "--tenant", tenant_id, "key_0000000000000000", "--config", config),
        ok=False,
    )
    rows = table(keys.stdout)
    assert rows[0] == ["ID", "PREFIX", "NAME", "CREATED", "REVOKED"]
    assert [r[0] for r in rows[1:]][-1] == second_id and len(rows) == 3
    assert rows[1][1] == plain[:10] + "…" and rows[2][1:3] == [second[:10] + "…", "ci"]
    assert plain not in keys.stdout and second not in keys.stdout  # prefixes only
    assert revoked.returncode == 0 and f"key {second_id} revoked" in revoked.stdout
    assert unknown.returncode == 1 and "no active key" in unknown.stderr

    store = open_store(url, key)
    try:
        assert store.tenant_for_key(second) is None
        assert store.tenant_for_key(plain) == tenant_id
    finally:
        store.close()


# --- numbers --------------------------------------------------------------------------------------
def test_numbers_sync_for_the_default_tenant_and_an_api_tenant(tmp_path):
    accounts = {
        DEFAULT_SID: {
            "auth_token": DEFAULT_TOKEN,
            "numbers": [
                {"phone_number": N1},
                {"phone_number": N2, "voice_application_sid": "AP" + "a" * 32},
            ],
        },
        TENANT_SID: {"auth_token": TENANT_TOKEN, "numbers": [{"phone_number": N3}]},
    }
    key = SecretBox.new_key()
    url = sqlite_url(tmp_path)
    # an API tenant whose settings were saved through the store
    store = open_store(url, key)
    try:
        store.ensure_tenant(DEFAULT_TENANT, "default (relay.toml)")
        tenant, _k, _plain = store.create_tenant("acme")
        store.put_twilio(
            tenant.id,
            account_sid=TENANT_SID,
            auth_token=TENANT_TOKEN,
            region=None,
            edge=None,
            numbers=[N3],
        )
    finally:
        store.close()
    with fake_twilio_process(tmp_path, accounts) as twilio_url:
        sections: dict[str, dict[str, Any]] = {
            "store": {"url": url},
            "security": {"encryption_key": key},
            "twilio": {
                "account_sid": DEFAULT_SID,
                "auth_token": DEFAULT_TOKEN,
                "api_base_url": twilio_url,
            },
            "numbers": {N1: "parrot", N2: "parrot", N4: "parrot"},
            "agents.parrot": {"type": "parrot"},
        }
        config = str(write_config(tmp_path / "relay.toml", sections))
        sync = ("numbers", "sync", "--config", config, "--public-url", PUBLIC)

        # the default tenant: relay.toml's [twilio] account and the E.164 keys of [numbers]
        out = relay(tmp_path, *sync)
        rows = {r[0]: r[1:] for r in table(out.stdout)[1:]}
        assert rows[N1] == ["updated", "set VoiceUrl, StatusCallback"]
        assert rows[N2][0] == "skipped" and "TwiML App" in rows[N2][1]
        assert rows[N4] == ["skipped", "not on this account"]
        numbers = fake_numbers(twilio_url, DEFAULT_SID)
        assert numbers[N1]["voice_url"] == f"{PUBLIC}/twilio/voice"
        assert numbers[N1]["voice_method"] == "POST"
        assert numbers[N1]["status_callback"] == f"{PUBLIC}/twilio/status"
        assert numbers[N1]["status_callback_method"] == "POST"
        assert numbers[N2]["voice_url"] == ""
        writes = fake_writes(twilio_url, DEFAULT_SID)

        again, api_tenant = relay_all(
            tmp_path, (*sync, "--tenant", DEFAULT_TENANT), (*sync, "--tenant", tenant.id)
        )
        # idempotent: the second run writes nothing
        assert {r[0]: r[2] for r in table(again.stdout)[1:]}[N1] == "already configured"
        assert fake_writes(twilio_url, DEFAULT_SID) == writes
        # the API tenant's numbers, with its own account
        assert table(api_tenant.stdout)[1][:2] == [N3, "updated"]
        assert fake_numbers(twilio_url, TENANT_SID)[N3]["voice_url"] == f"{PUBLIC}/twilio/voice"
        assert fake_writes(twilio_url, TENANT_SID) == 1

    # Twilio gone: the whole run fails with one error line (no traceback); the last sync
    # stays on record
    gone, listed = relay_all(
        tmp_path,
        (*sync, "--tenant", tenant.id),
        ("numbers", "list", "--tenant", tenant.id, "--config", config),
        ok=False,
    )
    assert gone.returncode == 1 and "sync failed" in gone.stderr
    assert "unreachable" in gone.stderr
    assert listed.returncode == 0 and table(listed.stdout)[1] == [N3, "(default)", "updated"]
    for out in (gone, listed, again, api_tenant):
        assert TENANT_TOKEN not in out.stdout + out.stderr
        assert DEFAULT_TOKEN not in out.stdout + out.stderr


# --- calls ---------------------------------------------------------------------------------------
def insert_calls(store: Store, tenant_id: str) -> list[str]:
    """Three calls of ``tenant_id``, oldest first (the first one rejected)."""
    sids = [f"CA{i:032x}" for i in range(1, 4)]
    for i, sid in enumerate(sids):
        store.save_call(
            {
                "call_sid": sid,
                "tenant_id": tenant_id,
                "status": "completed" if i else "rejected",
                "reject_reason": "" if i else "concurrent_limit",
                "end_reason": "caller hung up" if i else "concurrent limit",
                "from_number": "+14155550100",
                "to_number": N1,
                "agent": "parrot",
                "created_at": 1_700_000_000_000 + i * 1000,
                "started_at": 1_700_000_000_000 + i * 1000 if i else None,
                "ended_at": 1_700_000_002_500 + i * 1000 if i else None,
                "duration_ms": 2500 if i else None,
                "details": {"transcript": [{"role": "agent", "text": f"hi {i}"}]},
            }
        )
    for seq, status in (("1", "completed"), ("0", "ringing")):  # out of order
        store.add_status_callback(
            sids[2], tenant_id, {"SequenceNumber": seq, "CallStatus": status}, None
        )
    return sids


def test_calls_table_and_show(tmp_path):
    key = SecretBox.new_key()
    url = sqlite_url(tmp_path)
    config = store_config(tmp_path, url, key)
    default_call = "CA" + "d" * 32
    store = open_store(url, key)
    try:
        store.ensure_tenant(DEFAULT_TENANT, "default")
        tenant, _k, _p = store.create_tenant("acme")
        sids = insert_calls(store, tenant.id)
        store.save_call(
            {
                "call_sid": default_call,
                "tenant_id": DEFAULT_TENANT,
                "status": "completed",
                "created_at": 1,
            }
        )
    finally:
        store.close()

    everything, paged, shown, missing, bad_cursor = relay_all(
        tmp_path,
        ("calls", "--config", config),
        ("calls", "--tenant", tenant.id, "--limit", "2", "--config", config),
        ("calls", "show", sids[2], "--config", config),
        ("calls", "show", "CA" + "9" * 32, "--config", config),
        ("calls", "--cursor", "bm90LWEtY3Vyc29y", "--config", config),
        ok=False,
    )
    rows = table(everything.stdout)
    assert rows[0] == [
        "CALL SID",
        "STARTED",
        "DIR",
        "FROM",
        "TO",
        "AGENT",
        "STATUS",
        "END",
        "SECONDS",
    ]
    assert [r[0] for r in rows[1:]] == [*reversed(sids), default_call]  # newest first
    assert rows[1][2:] == [
        "inbound",
        "+14155550100",
        N1,
        "parrot",
        "completed",
        "caller hung up",
        "2.5",
    ]
    assert rows[3][6:] == ["rejected", "concurrent limit"]

    lines = paged.stdout.strip().splitlines()
    assert [r[0] for r in table("\n".join(lines[:-1]))[1:]] == [sids[2], sids[1]]
    assert lines[-1].startswith("more: relay calls --cursor ")

    call = json.loads(shown.stdout)
    assert call["call_sid"] == sids[2] and call["duration_ms"] == 2500
    assert call["transcript"] == [{"role": "agent", "text": "hi 2"}]
    assert [c["SequenceNumber"] for c in call["status_callbacks"]] == ["0", "1"]
    assert missing.returncode == 1 and "no call" in missing.stderr
    assert bad_cursor.returncode == 2 and "--cursor" in bad_cursor.stderr


# --- key rotation --------------------------------------------------------------------------------
def test_rotate_key_then_read_secrets_with_only_the_new_key(tmp_path):
    old, new = SecretBox.new_key(), SecretBox.new_key()
    url = sqlite_url(tmp_path)
    store = open_store(url, old)
    try:
        tenant, _k, _p = store.create_tenant("acme")
        store.put_twilio(
            tenant.id,
            account_sid=TENANT_SID,
            auth_token=TENANT_TOKEN,
            region=None,
            edge=None,
            numbers=[],
        )
        store.create_agent(
            tenant.id, "gpt", "openai", {"voice": "marin"}, {"api_key": "sk-rotate-me-0001"}
        )
    finally:
        store.close()

    # a key that opens nothing leaves everything as it was, and says so in one line
    wrong = relay(
        tmp_path,
        "db",
        "rotate-key",
        "--config",
        store_config(tmp_path, url, SecretBox.new_key(), "wrong.toml"),
        ok=False,
    )
    assert wrong.returncode == 1 and "secret_decrypt" in wrong.stderr
    rotated = relay(
        tmp_path, "db", "rotate-key", "--config", store_config(tmp_path, url, f"{new},{old}")
    )
    assert "re-encrypted 2 stored secret(s)" in rotated.stdout
    for out in (wrong, rotated):
        assert TENANT_TOKEN not in out.stdout + out.stderr

    only_new = open_store(url, new)  # the old key can be dropped now
    try:
        assert only_new.auth_token(only_new.get_twilio(tenant.id)) == TENANT_TOKEN
        assert only_new.agent_secrets(only_new.list_agents(tenant.id)[0]) == {
            "api_key": "sk-rotate-me-0001"
        }
    finally:
        only_new.close()
    only_old = open_store(url, old)
    try:
        with pytest.raises(SecretError):
            only_old.auth_token(only_old.get_twilio(tenant.id))
    finally:
        only_old.close()


# --- PostgreSQL ----------------------------------------------------------------------------------
def test_cli_on_postgresql(tmp_path, pg_server_url):
    from pgserver import reset_database

    reset_database(pg_server_url)
    key = SecretBox.new_key()
    config = store_config(tmp_path, pg_server_url, key)
    upgrade = relay(tmp_path, "db", "upgrade", "--config", config)
    assert "schema at revision 0002" in upgrade.stdout and "postgresql" in upgrade.stdout

    out = relay(tmp_path, "tenants", "create", "acme", "--config", config)
    tenant_id = out.stdout.split()[1]
    plain = out.stdout.splitlines()[1].split()[-1]
    store = open_store(pg_server_url, key)
    try:
        assert store.tenant_for_key(plain) == tenant_id
        sids = insert_calls(store, tenant_id)
    finally:
        store.close()
    out = relay(tmp_path, "calls", "--config", config)
    assert [r[0] for r in table(out.stdout)[1:]] == list(reversed(sids))
