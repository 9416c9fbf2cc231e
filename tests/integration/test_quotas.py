"""Rate limits per key (shared through Redis), monthly budgets per tenant, the usage report."""

from __future__ import annotations

import asyncio
import secrets
from decimal import Decimal

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from service.app import create_app
from service.db import usage as usage_db
from service.db.keys import create_key
from service.domain.ratelimits import RateLimiter, check_rate, lease_size, retry_after_s
from service.domain.usage import month_start
from service.errors import RateLimited
from service.resources import Resources
from tests.helpers import (
    assert_problem,
    counts,
    create_conversation,
    post_turn,
    set_faults,
    settings_of,
    wait_turn,
    wait_until,
)
from worker.jobs import repair_quotas


async def key_for(resources: Resources, tenant: str, **options) -> dict[str, str]:
    async with resources.pool.acquire() as conn:
        key = (await create_key(conn, tenant, **options))[1]
    return {"Authorization": f"Bearer {key}"}


# Rate limits


async def test_the_request_past_the_limit_is_429_and_another_key_is_unaffected(client, resources):
    limited = await key_for(resources, "acme", rate_limit_per_min=5)
    other = await key_for(resources, "acme")
    for _ in range(5):
        assert (await client.get("/v1/conversations", headers=limited)).status_code == 200
    refused = await client.get("/v1/conversations", headers=limited)
    problem = assert_problem(refused, 429)
    assert problem["type"].endswith("rate-limited")
    assert 1 <= int(refused.headers["retry-after"]) <= 120
    assert refused.headers["x-request-id"]
    assert (await client.get("/v1/conversations", headers=other)).status_code == 200
    # Refused requests are not counted, but the key stays limited for the rest of the window.
    assert_problem(await client.get("/v1/conversations", headers=limited), 429)


async def test_a_refused_write_writes_nothing(client, resources, database_url):
    limited = await key_for(resources, "acme", rate_limit_per_min=1)
    assert (await client.post("/v1/conversations", json={}, headers=limited)).status_code == 201
    before = await counts(database_url)
    assert_problem(await client.post("/v1/conversations", json={}, headers=limited), 429)
    assert await counts(database_url) == before


async def test_the_default_limit_comes_from_settings_and_zero_is_unlimited(client, resources):
    settings_of(resources, rate_limit_per_min=3)
    default = await key_for(resources, "acme")
    unlimited = await key_for(resources, "acme", rate_limit_per_min=0)
    statuses = [(await client.get("/v1/conversations", headers=default)).status_code
                for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    for _ in range(10):
        assert (await client.get("/v1/conversations", headers=unlimited)).status_code == 200


async def test_the_count_is_shared_by_api_processes(client, settings, resources):
    headers = await key_for(resources, "acme", rate_limit_per_min=4)
    second = await Resources.open(settings)  # another process's pool and Redis connection
    try:
        transport = httpx.ASGITransport(app=create_app(settings, resources=second))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as other:
            statuses = []
            for api in (client, other, client, other, client, other):
                statuses.append((await api.get("/v1/conversations", headers=headers)).status_code)
    finally:
        await second.close()
    assert statuses == [200, 200, 200, 200, 429, 429]


async def test_without_redis_requests_are_let_through(client, resources):
    headers = await key_for(resources, "acme", rate_limit_per_min=1)
    broken = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    working, resources.limiter = resources.limiter, RateLimiter(broken)
    try:
        for _ in range(3):
            assert (await client.get("/v1/conversations", headers=headers)).status_code == 200
    finally:
        await broken.aclose()
        resources.limiter = working


async def test_the_window_slides_across_minutes(resources):
    key_id = secrets.token_hex(6)
    start = 6_000_000 * 60.0  # the start of a minute
    for _ in range(10):
        await check_rate(resources.queue, key_id, 10, now=start + 1)
    with pytest.raises(RateLimited) as refused:
        await check_rate(resources.queue, key_id, 10, now=start + 2)
    # 58 s to the next minute, then 6 s more until 10 * (1 - elapsed) + 1 <= 10.
    assert refused.value.retry_after == 64
    # Half-way through the next minute the last one's 10 count for 5: 5 more fit, not 6.
    for _ in range(5):
        await check_rate(resources.queue, key_id, 10, now=start + 90)
    with pytest.raises(RateLimited) as refused:
        await check_rate(resources.queue, key_id, 10, now=start + 90)
    assert refused.value.retry_after == retry_after_s(10, 5, 10, 0.5) == 6


async def test_leases_never_let_a_key_past_its_limit_across_processes(resources):
    # Two API processes share a key limited to 1,000 a minute: each leases 10 requests at a time.
    key_id, minute = secrets.token_hex(6), 6_000_000 * 60.0
    calls = 0

    class CountingRedis:
        async def eval(self, *args):
            nonlocal calls
            calls += 1
            return await resources.queue.eval(*args)

    processes = [RateLimiter(CountingRedis()), RateLimiter(CountingRedis())]
    assert lease_size(1000) == 10 and lease_size(199) == 1 and lease_size(10**9) == 100
    allowed = refused = 0
    for i in range(1200):
        try:
            await processes[i % 3 % 2].check(key_id, 1000, now=minute + 1 + i / 100)
            allowed += 1
        except RateLimited:
            refused += 1
    # Never more than the limit; at most the other process's unspent lease fewer.
    assert 1000 - 10 <= allowed <= 1000
    assert refused == 1200 - allowed
    counted = int(await resources.queue.get(f"ratelimit:{{{key_id}}}:{int(minute // 60)}"))
    assert allowed <= counted <= 1000
    # Redis was asked once a lease (and once per refused request), not once a request.
    assert calls <= 1000 / 10 + refused + 2


async def test_a_lease_is_not_spent_in_the_next_minute(resources):
    key_id, minute = secrets.token_hex(6), 6_000_000 * 60.0
    limiter = RateLimiter(resources.queue)
    await limiter.check(key_id, 1000, now=minute + 59)  # leases 10, spends 1
    await limiter.check(key_id, 1000, now=minute + 61)  # a new minute: a new lease
    assert int(await resources.queue.get(f"ratelimit:{{{key_id}}}:6000000")) == 10
    assert int(await resources.queue.get(f"ratelimit:{{{key_id}}}:6000001")) == 10


# Budgets


async def test_a_tenant_at_its_budget_gets_402_and_another_is_unaffected(
    client, resources, database_url
):
    # Three lite turns ($0.005 each) fit in $0.015; the fourth does not.
    acme = await key_for(resources, "acme", monthly_budget_usd=Decimal("0.015"))
    globex = await key_for(resources, "globex", monthly_budget_usd=Decimal("0.015"))
    mine = (await client.post("/v1/conversations", json={}, headers=acme)).json()
    path = f"/v1/conversations/{mine['id']}/turns"
    for question in ("one", "two", "three"):
        response = await client.post(path, json={"input": question}, headers=acme)
        assert response.status_code == 202
    before = await counts(database_url)
    problem = assert_problem(await client.post(path, json={"input": "four"}, headers=acme), 402)
    assert problem["type"].endswith("budget-exceeded")
    assert "$0.0150 of $0.0150 is used" in problem["detail"]
    assert await counts(database_url) == before
    theirs = (await client.post("/v1/conversations", json={}, headers=globex)).json()
    response = await client.post(f"/v1/conversations/{theirs['id']}/turns", json={"input": "q"},
                                 headers=globex)
    assert response.status_code == 202


async def test_a_turn_that_would_pass_the_budget_is_refused_a_cheaper_one_fits(client, resources):
    acme = await key_for(resources, "acme", monthly_budget_usd=Decimal("0.03"))
    conversation = (await client.post("/v1/conversations", json={}, headers=acme)).json()
    path = f"/v1/conversations/{conversation['id']}/turns"
    assert (await client.post(path, json={"input": "q", "processor": "core"},
                              headers=acme)).status_code == 202  # $0.025
    assert_problem(await client.post(path, json={"input": "q", "processor": "core"},
                                     headers=acme), 402)
    assert (await client.post(path, json={"input": "q"}, headers=acme)).status_code == 202


async def test_turns_cancelled_before_a_run_give_the_budget_back(client, resources):
    acme = await key_for(resources, "acme", monthly_budget_usd=Decimal("0.005"))
    conversation = (await client.post("/v1/conversations", json={}, headers=acme)).json()
    path = f"/v1/conversations/{conversation['id']}/turns"
    turn = (await client.post(path, json={"input": "q"}, headers=acme)).json()
    assert_problem(await client.post(path, json={"input": "q"}, headers=acme), 402)
    await client.post(f"{path}/{turn['id']}/cancel", headers=acme)  # no worker: never ran
    assert (await client.post(path, json={"input": "q"}, headers=acme)).status_code == 202


async def test_concurrent_turns_cannot_both_take_the_last_of_the_budget(client, resources):
    acme = await key_for(resources, "acme", monthly_budget_usd=Decimal("0.01"))
    conversations = [(await client.post("/v1/conversations", json={}, headers=acme)).json()
                     for _ in range(6)]
    responses = await asyncio.gather(*(
        client.post(f"/v1/conversations/{c['id']}/turns", json={"input": "q"}, headers=acme)
        for c in conversations
    ))
    assert sorted(r.status_code for r in responses) == [202, 202, 402, 402, 402, 402]


async def test_an_idempotent_replay_is_answered_even_at_the_budget(client, resources):
    acme = await key_for(resources, "acme", monthly_budget_usd=Decimal("0.005"))
    conversation = (await client.post("/v1/conversations", json={}, headers=acme)).json()
    path = f"/v1/conversations/{conversation['id']}/turns"
    headers = {**acme, "Idempotency-Key": "k"}
    first = await client.post(path, json={"input": "q"}, headers=headers)
    again = await client.post(path, json={"input": "q"}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()


async def test_usage_adds_up_to_the_turns_estimated_costs(api, worker, sandbox, resources):
    first = await create_conversation(api)
    second = await create_conversation(api, processor="core")
    done = await wait_turn(api, await post_turn(api, first["id"], "ran"))  # lite, has a run
    reserved = await post_turn(api, first["id"], "[sandbox:slow=30] reserved", processor="pro")
    core = await post_turn(api, second["id"], "[sandbox:slow=30] core one")
    doomed = await create_conversation(api)
    await wait_turn(api, await post_turn(api, doomed["id"], "ran, then deleted"))
    assert (await api.delete(f"/v1/conversations/{doomed['id']}")).status_code == 204
    for turn in (reserved, core):  # started: no other create may take the fault below
        await wait_turn(api, turn, statuses={"running"})
    # Failed without a run (Parallel refused to create it), so never billed: not counted.
    set_faults(sandbox.url, create_status=402, create_status_count=1)
    refusing = await create_conversation(api, processor="core")
    refused = await wait_turn(api, await post_turn(api, refusing["id"], "refused by Parallel"))
    assert refused["status"] == "failed" and refused["run_id"] is None

    usage = (await api.get("/v1/usage")).json()
    assert done["status"] == "completed"
    assert usage["budget_usd"] is None
    assert usage["total_usd"] == pytest.approx(0.005 + 0.100 + 0.025 + 0.005)
    assert {p["processor"]: (p["turns"], p["usd"]) for p in usage["by_processor"]} == {
        "lite": (2, pytest.approx(0.010)), "pro": (1, pytest.approx(0.100)),
        "core": (1, pytest.approx(0.025)),
    }
    assert {c["conversation_id"]: (c["turns"], c["usd"]) for c in usage["by_conversation"]} == {
        first["id"]: (2, pytest.approx(0.105)), second["id"]: (1, pytest.approx(0.025)),
        doomed["id"]: (1, pytest.approx(0.005)),
    }
    for part in ("by_processor", "by_conversation"):
        assert sum(p["usd"] for p in usage[part]) == pytest.approx(usage["total_usd"])
    # Every transition above (start, complete, a refused create, a delete) kept the quota
    # counters equal to what the turns say.
    assert await usage_db.drifted_tenants(resources.pool, month_start()) == []


async def test_usage_is_per_calendar_month(api, database_url):
    conversation = await create_conversation(api)
    await post_turn(api, conversation["id"], "last month")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE turn SET created_at = date_trunc('month', now()) - interval '1 day'")
        last_month = await conn.fetchval(
            "SELECT to_char(date_trunc('month', now()) - interval '1 day', 'YYYY-MM')")
    finally:
        await conn.close()
    await post_turn(api, conversation["id"], "this month", processor="base")
    this = (await api.get("/v1/usage")).json()
    before = (await api.get("/v1/usage", params={"month": last_month})).json()
    assert (this["total_usd"], before["total_usd"]) == (pytest.approx(0.010), pytest.approx(0.005))
    assert before["month"] == last_month
    assert [p["processor"] for p in this["by_processor"]] == ["base"]
    for bad in ("2026-13", "26-01", "soon", "0000-01"):
        response = await api.get("/v1/usage", params={"month": bad})
        assert_problem(response, response.status_code)
        assert 400 <= response.status_code < 500


# The command line


async def test_keys_create_sets_a_rate_limit_and_a_monthly_budget(client, database_url,
                                                                    monkeypatch, capsys):
    from service import cli

    monkeypatch.setenv("DATABASE_URL", database_url)
    await asyncio.to_thread(cli.main, ["keys", "create", "--tenant", "acme", "--rate-limit",
                                       "3/min", "--monthly-budget", "0.005"])
    headers = {"Authorization": f"Bearer {capsys.readouterr().out.splitlines()[-1]}"}
    conversation = (await client.post("/v1/conversations", json={}, headers=headers)).json()
    path = f"/v1/conversations/{conversation['id']}/turns"
    assert (await client.post(path, json={"input": "q"}, headers=headers)).status_code == 202
    assert_problem(await client.post(path, json={"input": "q"}, headers=headers), 402)
    assert_problem(await client.get("/v1/usage", headers=headers), 429)
    await asyncio.to_thread(cli.main, ["keys", "list"])
    assert "\t3/min\t$0.0050/month" in capsys.readouterr().out
    for bad in (["--rate-limit", "fast"], ["--monthly-budget", "-1"], ["--monthly-budget", "NaN"]):
        with pytest.raises(SystemExit):
            cli.main(["keys", "create", "--tenant", "acme", *bad])


# Exact under concurrency, without a lock on the tenant (docs/design.md §2, "Quotas")

RACE = 25


# Every new turn's commit waits for this advisory lock (a deferred trigger that runs before the
# quota trigger, triggers of one event running in the order of their names), which `race` holds
# until all the requests the pool has room for are waiting: their quota checks then run
# together, not one after the other.
GATE_KEY = 0x51554F54
GATE_SQL = f"""
CREATE FUNCTION gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared({GATE_KEY});
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER a_gate AFTER INSERT ON turn DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION gate();
"""


async def race(client, resources: Resources, headers: dict[str, str]) -> list[int]:
    """One POST of a lite turn ($0.005) to each of RACE new conversations at once, their
    commits released together."""
    ids = [(await client.post("/v1/conversations", json={}, headers=headers)).json()["id"]
           for _ in range(RACE)]
    gate = await asyncpg.connect(resources.settings.database_url)
    try:
        await gate.execute(GATE_SQL)
        await gate.execute("SELECT pg_advisory_lock($1)", GATE_KEY)
        posts = asyncio.gather(*(
            client.post(f"/v1/conversations/{c}/turns", json={"input": "q"}, headers=headers)
            for c in ids
        ))
        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        room = resources.settings.db_pool_max - 1  # the pool's connections but one
        await wait_until(lambda: _at_least(gate, waiting, room), what="the commits to wait")
        await gate.execute("SELECT pg_advisory_unlock($1)", GATE_KEY)
        responses = await posts
        await gate.execute("DROP TRIGGER a_gate ON turn; DROP FUNCTION gate()")
    finally:
        await gate.close()
    for response in responses:
        if response.status_code != 202:
            assert_problem(response, response.status_code)
    return sorted(r.status_code for r in responses)


async def _at_least(conn: asyncpg.Connection, query: str, count: int) -> bool:
    return bool(await conn.fetchval(query) >= count)


async def counters(database_url: str, tenant: str) -> tuple[int, Decimal]:
    """The tenant's quota counters: open turns, and this month's spend."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT q.open_turns FROM quota_open_turns q JOIN tenant t"
            "        ON t.id = q.tenant_id WHERE t.name = $1),"
            " (SELECT s.usd FROM quota_month_spend s JOIN tenant t ON t.id = s.tenant_id"
            "  WHERE t.name = $1 AND s.month = date_trunc('month', now() AT TIME ZONE 'UTC'))",
            tenant)
        assert row is not None
        return row[0], row[1]
    finally:
        await conn.close()


async def test_25_concurrent_turns_with_a_budget_for_5_admit_exactly_5(
    client, resources, database_url
):
    acme = await key_for(resources, "acme", monthly_budget_usd=Decimal("0.025"))
    assert await race(client, resources, acme) == [202] * 5 + [402] * (RACE - 5)
    assert (await client.get("/v1/usage", headers=acme)).json()["total_usd"] == pytest.approx(0.025)
    assert await counters(database_url, "acme") == (5, Decimal("0.025"))


async def test_25_concurrent_turns_with_room_for_5_open_admit_exactly_5(
    client, resources, database_url
):
    settings_of(resources, max_open_turns_per_tenant=5)
    acme = await key_for(resources, "acme")
    assert await race(client, resources, acme) == [202] * 5 + [429] * (RACE - 5)
    assert await counters(database_url, "acme") == (5, Decimal("0.025"))


# Holds a turn's creation inside its INSERT (server-side) while the rest of the test runs.
HOLD_MARKER = "[hold-here]"
HOLD_SQL = f"""
CREATE FUNCTION hold_point() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.input::text LIKE '%{HOLD_MARKER}%' THEN PERFORM pg_sleep(4); END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER hold_point BEFORE INSERT ON turn FOR EACH ROW EXECUTE FUNCTION hold_point();
"""


async def test_a_held_turn_creation_does_not_hold_up_its_tenants_other_conversations(
    client, resources, database_url
):
    """One POST's transaction is held open (4 s, past the 2 s lock timeout) inside its INSERT:
    the same tenant's POSTs to other conversations, each under its open-turn limit and budget,
    are accepted meanwhile, and the held one is accepted when it ends."""
    settings_of(resources, max_open_turns_per_tenant=50)
    acme = await key_for(resources, "acme", monthly_budget_usd=Decimal("1"))
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(HOLD_SQL)
    finally:
        await conn.close()
    ids = [(await client.post("/v1/conversations", json={}, headers=acme)).json()["id"]
           for _ in range(7)]
    held = asyncio.create_task(client.post(
        f"/v1/conversations/{ids[0]}/turns", json={"input": f"{HOLD_MARKER} held"},
        headers=acme))

    async def holding() -> bool:
        count = await resources.pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'")
        return bool(count)

    await wait_until(holding, what="the held INSERT to be sleeping")
    for _ in range(2):  # two rounds: each conversation's second turn too
        responses = await asyncio.gather(*(
            client.post(f"/v1/conversations/{c}/turns", json={"input": "q"}, headers=acme)
            for c in ids[1:]))
        assert [r.status_code for r in responses] == [202] * 6, [r.text for r in responses]
    assert not held.done(), "the other turns waited for the held one"
    assert (await held).status_code == 202
    assert await counters(database_url, "acme") == (13, Decimal("0.065"))


async def test_the_repair_recounts_drifted_counters_and_the_limits_hold_again(
    client, resources, database_url
):
    acme = await key_for(resources, "acme", monthly_budget_usd=Decimal("0.025"))
    conversation = (await client.post("/v1/conversations", json={}, headers=acme)).json()
    path = f"/v1/conversations/{conversation['id']}/turns"
    first = (await client.post(path, json={"input": "q"}, headers=acme)).json()
    await client.post(path, json={"input": "q"}, headers=acme)
    await client.post(f"{path}/{first['id']}/cancel", headers=acme)  # never ran: refunded
    assert await counters(database_url, "acme") == (1, Decimal("0.005"))
    assert await repair_quotas({"resources": resources}) == 0  # nothing drifted
    # Changed by hand, outside the service: the counters no longer match the turns.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE quota_open_turns SET open_turns = 1000")
        await conn.execute("UPDATE quota_month_spend SET usd = 0")
    finally:
        await conn.close()
    refused = await client.post(path, json={"input": "q"}, headers=acme)
    assert_problem(refused, 429)
    assert await repair_quotas({"resources": resources}) == 1
    assert await counters(database_url, "acme") == (1, Decimal("0.005"))
    assert await race(client, resources, acme) == [202] * 4 + [402] * (RACE - 4)


async def test_the_repair_running_during_a_race_keeps_the_limits_exact(
    client, resources, database_url
):
    settings_of(resources, max_open_turns_per_tenant=5)
    acme = await key_for(resources, "acme")
    await client.post("/v1/conversations", json={}, headers=acme)
    repairs = asyncio.gather(*(repair_quotas({"resources": resources}) for _ in range(10)))
    assert await race(client, resources, acme) == [202] * 5 + [429] * (RACE - 5)
    await repairs
    assert await counters(database_url, "acme") == (5, Decimal("0.025"))
