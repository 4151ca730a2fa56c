"""The control-plane store on SQLite and on a real PostgreSQL (same tests, both engines)."""

from __future__ import annotations

import sqlalchemy as sa
import trio

from relay.control import schema
from relay.control.history import HistoryWriter
from relay.control.secretbox import SecretBox, SecretError
from relay.control.store import DEFAULT_TENANT, Conflict, Store, decode_cursor
from relay.metrics import Metrics
from relay.records import CallRecord

AC = "AC" + "1" * 32
TOKEN = "f" * 32


def open_store(url: str, key: str | None = None) -> Store:
    store = Store(url, SecretBox.from_setting(key or KEY))
    store.upgrade()
    store.ensure_tenant(DEFAULT_TENANT, "default")
    return store


KEY = SecretBox.new_key()


def raw_rows(store: Store, table: sa.Table) -> list[dict]:
    with store.connect() as c:
        return [dict(r._mapping) for r in c.execute(sa.select(table))]


def test_migrations_are_idempotent_and_records_survive_a_restart(store_url):
    store = open_store(store_url)
    assert store.upgrade() == "0002"
    tenant, _, plain = store.create_tenant("acme")
    store.save_call({"call_sid": "CA1", "tenant_id": tenant.id, "status": "completed"})
    store.close()
    again = open_store(store_url)  # a restart: same database, migrations run again
    try:
        assert again.upgrade() == "0002"
        assert again.tenant_for_key(plain) == tenant.id
        assert again.get_call(tenant.id, "CA1")["status"] == "completed"
        assert [t.id for t in again.list_tenants()] == [DEFAULT_TENANT, tenant.id]
    finally:
        again.close()


def test_api_keys_are_stored_hashed_and_revocable(store_url):
    store = open_store(store_url)
    try:
        tenant, _first, plain = store.create_tenant("acme")
        second, plain2 = store.create_key(tenant.id, "ci")
        rows = raw_rows(store, schema.api_keys)
        assert all(plain not in str(r) and plain2 not in str(r) for r in rows)
        assert {r["prefix"] for r in rows} == {plain[:10], plain2[:10]}
        assert store.tenant_for_key(plain2) == tenant.id
        other, _, _ = store.create_tenant("other")
        assert not store.revoke_key(other.id, second.id)  # not theirs
        assert store.revoke_key(tenant.id, second.id)
        assert not store.revoke_key(tenant.id, second.id)  # already revoked
        assert store.tenant_for_key(plain2) is None
        assert store.tenant_for_key(plain) == tenant.id
        assert store.tenant_for_key("rk_" + "x" * 40) is None
        assert store.tenant_for_key("not-a-key") is None
    finally:
        store.close()


def test_twilio_token_is_encrypted_at_rest_and_account_is_one_tenants(store_url):
    store = open_store(store_url)
    try:
        a, _, _ = store.create_tenant("a")
        b, _, _ = store.create_tenant("b")
        store.put_twilio(
            a.id,
            account_sid=AC,
            auth_token=TOKEN,
            region="ie1",
            edge="dublin",
            numbers=["+14155550100", "+14155550101"],
        )
        row = raw_rows(store, schema.twilio_accounts)[0]
        assert TOKEN not in str(row) and row["auth_token_tail"] == TOKEN[-4:]
        account = store.account_by_sid(AC)
        assert account is not None and store.auth_token(account) == TOKEN
        try:
            store.put_twilio(
                b.id, account_sid=AC, auth_token=TOKEN, region=None, edge=None, numbers=[]
            )
        except Conflict as exc:
            assert exc.field == "account_sid"
        else:
            raise AssertionError("a second tenant claimed the same account")
        assert store.get_twilio(b.id) is None
        # saving again keeps the agent mapping of numbers that stay, drops the others
        assert store.set_number_agent(a.id, "+14155550100", "ag_1")
        store.put_twilio(
            a.id,
            account_sid=AC,
            auth_token="e" * 32,
            region=None,
            edge=None,
            numbers=["+14155550100", "+14155550199"],
        )
        numbers = {n.number: n.agent_id for n in store.list_numbers(a.id)}
        assert numbers == {"+14155550100": "ag_1", "+14155550199": None}
        assert store.auth_token(store.get_twilio(a.id)) == "e" * 32
        assert not store.set_number_agent(b.id, "+14155550100", "ag_2")
    finally:
        store.close()


def test_agents_keep_secrets_encrypted_and_names_unique_per_tenant(store_url):
    store = open_store(store_url)
    try:
        a, _, _ = store.create_tenant("a")
        b, _, _ = store.create_tenant("b")
        row = store.create_agent(
            a.id, "front", "openai", {"voice": "marin"}, {"api_key": "sk-secret-1"}
        )
        assert "sk-secret-1" not in str(raw_rows(store, schema.agents))
        assert store.agent_secrets(row) == {"api_key": "sk-secret-1"}
        store.create_agent(b.id, "front", "parrot", {}, {})  # same name, other tenant: fine
        try:
            store.create_agent(a.id, "front", "parrot", {}, {})
        except Conflict:
            pass
        else:
            raise AssertionError("duplicate agent name accepted")
        assert store.get_agent(b.id, row.id) is None
        store.put_twilio(
            a.id, account_sid=AC, auth_token=TOKEN, region=None, edge=None, numbers=["+14155550100"]
        )
        store.set_number_agent(a.id, "+14155550100", row.id)
        assert store.agent_for_number(a.id, "+14155550100") == row.id
        assert not store.delete_agent(b.id, row.id)
        assert store.delete_agent(a.id, row.id)
        assert store.agent_for_number(a.id, "+14155550100") is None
    finally:
        store.close()


def test_key_rotation_reencrypts_every_secret(store_url):
    old = SecretBox.new_key()
    store = open_store(store_url, old)
    a, _, _ = store.create_tenant("a")
    store.put_twilio(a.id, account_sid=AC, auth_token=TOKEN, region=None, edge=None, numbers=[])
    store.create_agent(a.id, "x", "openai", {}, {"api_key": "sk-abc"})
    store.close()
    new = SecretBox.new_key()
    rotated = open_store(store_url, f"{new},{old}")
    try:
        assert rotated.rotate_secrets() == 2
    finally:
        rotated.close()
    only_new = open_store(store_url, new)  # the old key can now be dropped
    try:
        assert only_new.auth_token(only_new.get_twilio(a.id)) == TOKEN
        assert only_new.agent_secrets(only_new.list_agents(a.id)[0]) == {"api_key": "sk-abc"}
    finally:
        only_new.close()
    only_old = open_store(store_url, old)
    try:
        try:
            only_old.auth_token(only_old.get_twilio(a.id))
        except SecretError:
            pass
        else:
            raise AssertionError("decrypted with a key that was rotated out")
    finally:
        only_old.close()


def test_call_rows_upsert_order_callbacks_and_page_newest_first(store_url):
    store = open_store(store_url)
    try:
        a, _, _ = store.create_tenant("a")
        b, _, _ = store.create_tenant("b")
        for i in range(7):
            store.save_call(
                {
                    "call_sid": f"CA{i:02d}",
                    "tenant_id": a.id,
                    "status": "incoming",
                    "created_at": 1000 + i // 2,
                }
            )
        store.save_call(
            {"call_sid": "CAb", "tenant_id": b.id, "status": "incoming", "created_at": 5000}
        )
        # an update writes only what it names
        store.save_call({"call_sid": "CA03", "status": "active", "from_number": "+1415"})
        store.save_call({"call_sid": "CA03", "end_reason": "caller hung up", "status": "completed"})
        call = store.get_call(a.id, "CA03")
        assert (call["status"], call["from"], call["end_reason"]) == (
            "completed",
            "+1415",
            "caller hung up",
        )
        assert store.get_call(b.id, "CA03") is None
        for seq in ("3", "1", "2"):
            store.add_status_callback(
                "CA03", a.id, {"SequenceNumber": seq, "CallStatus": "x"}, None
            )
        store.add_status_callback("CA03", b.id, {"SequenceNumber": "9"}, "completed")  # not b's
        assert [e["SequenceNumber"] for e in store.get_call(a.id, "CA03")["status_callbacks"]] == [
            "1",
            "2",
            "3",
        ]
        # a terminal status completes a call that never got a stream
        store.add_status_callback("CA00", a.id, {"SequenceNumber": "1"}, "no-answer")
        assert (
            store.get_call(a.id, "CA00")["status"],
            store.get_call(a.id, "CA00")["end_reason"],
        ) == ("completed", "no-answer")
        seen, cursor = [], None
        while True:
            page = store.list_calls(a.id, 3, cursor)
            seen += [c["call_sid"] for c in page.calls]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert seen == ["CA06", "CA05", "CA04", "CA03", "CA02", "CA01", "CA00"]
        assert store.prune_calls(1002) == 4
        assert [c["call_sid"] for c in store.list_calls(a.id, 50, None).calls] == [
            "CA06",
            "CA05",
            "CA04",
        ]
        for bad in ("", "!!", "bm90LWEtY3Vyc29y"):
            try:
                decode_cursor(bad)
            except ValueError:
                pass
            else:
                raise AssertionError(bad)
    finally:
        store.close()


async def test_history_writer_persists_off_the_loop_and_flushes(store_url):
    store = open_store(store_url)
    metrics = Metrics()
    writer = HistoryWriter(store, metrics)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            record = CallRecord("CAw", from_number="+14155550100", tenant_id=DEFAULT_TENANT)
            writer.save(record, DEFAULT_TENANT)
            record.status = "active"
            record.started_at = record.created_at + 0.5
            writer.save(record, DEFAULT_TENANT)
            record.status = "completed"
            record.end_reason = "caller hung up"
            record.ended_at = record.started_at + 2.0
            record.transcript.append({"role": "caller", "text": "hi"})
            writer.save(record, DEFAULT_TENANT)
            writer.status_callback(
                "CAw",
                DEFAULT_TENANT,
                {"SequenceNumber": "0", "CallStatus": "completed"},
                "completed",
            )
            with trio.fail_after(10):
                assert await writer.flush()
            nursery.cancel_scope.cancel()
        call = store.get_call(DEFAULT_TENANT, "CAw")
        assert (call["status"], call["end_reason"], call["duration_ms"]) == (
            "completed",
            "caller hung up",
            2000,
        )
        assert call["transcript"] == [{"role": "caller", "text": "hi"}]
        assert call["status_callbacks"] == [{"SequenceNumber": "0", "CallStatus": "completed"}]
        # snapshots of one call queued together are written once (the newest)
        assert writer.written + writer.superseded == 4 and writer.failed == 0
    finally:
        store.close()


async def test_history_writer_survives_a_failing_write(store_url):
    store = open_store(store_url)
    metrics = Metrics()
    writer = HistoryWriter(store, metrics)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)

            def broken() -> None:
                raise RuntimeError("disk on fire")

            writer.submit(broken)
            writer.save(CallRecord("CAok"), DEFAULT_TENANT)
            with trio.fail_after(10):
                assert await writer.flush()
            nursery.cancel_scope.cancel()
        assert store.get_call(None, "CAok") is not None
        assert writer.failed == 1 and metrics.errors["store"] == 1
    finally:
        store.close()


def test_in_memory_store_serves_several_threads_at_once():
    """The in-memory database is one shared connection: a transaction on one thread must
    never be rolled back by another thread returning the connection (a regression: a key
    created on the event-loop thread vanished while a worker thread wrote a record)."""
    import threading

    store = open_store("sqlite://")
    tenant, _, _ = store.create_tenant("a")
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            while not stop.is_set():
                store.create_tenant("x")
                store.list_keys(tenant.id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=churn) for _ in range(3)]
    for th in threads:
        th.start()
    try:
        lost = 0
        for _ in range(200):
            _key, plain = store.create_key(tenant.id, "k")
            lost += store.tenant_for_key(plain) != tenant.id
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert errors == [] and lost == 0
