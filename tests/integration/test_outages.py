"""Dependencies down, slow or out of connections, as a client of the API sees it: `/readyz` answers
within 2 s whatever happens and fails on Postgres only; Postgres refusing connections, a lock
held elsewhere, a statement that never ends and a slow Postgres are all 503 with Retry-After
within a few seconds, never a 500 or a hang; with Redis away the API keeps serving (the rate
limiter lets requests through and counts that). Servers the tests stop are their own."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import msgspec
import pytest
from prometheus_client import REGISTRY

from service.db.pool import create_pool
from service.devstack import (
    embedded_postgres_unavailable_reason,
)
from service.resources import db_deadlines
from tests.helpers import api_client, create_conversation, wait_until
from tests.servers import own_postgres, own_redis

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(embedded_postgres_unavailable_reason() is not None,
                       reason=str(embedded_postgres_unavailable_reason())),
]

PROBE_BOUND_S = 2.0


async def timed_get(api: httpx.AsyncClient, path: str) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = await api.get(path)
    return response, time.monotonic() - start


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert int(response.headers["retry-after"]) > 0
    assert response.json()["status"] == 503


def fail_open_count() -> float:
    return REGISTRY.get_sample_value("research_rate_limit_fail_open_total") or 0.0


async def test_readyz_reports_redis_and_fails_on_postgres_only_within_2s(settings):
    with own_redis() as redis:
        settings = msgspec.structs.replace(settings, redis_url=redis.url)
        async with api_client(settings) as (api, resources):
            response, took = await timed_get(api, "/readyz")
            assert response.status_code == 200
            assert response.json() == {"status": "ready", "postgres": "ok", "redis": "ok"}

            # Redis hanging (every client paused): reported down, still ready, within 2 s.
            await resources.queue.execute_command("CLIENT", "PAUSE", "4000", "ALL")
            response, took = await timed_get(api, "/readyz")
            assert (response.status_code, response.json()["redis"]) == (200, "down"), response.text
            assert took < PROBE_BOUND_S, took

            # Redis stopped: the same, and the API keeps taking writes (the rate limiter fails
            # open and counts it).
            redis.stop()
            response, took = await timed_get(api, "/readyz")
            assert response.status_code == 200
            assert response.json() == {"status": "ready", "postgres": "ok", "redis": "down"}
            assert took < PROBE_BOUND_S, took
            before = fail_open_count()
            conversation = await create_conversation(api, title="while Redis is away")
            assert (await api.get(f"/v1/conversations/{conversation['id']}")).status_code == 200
            assert fail_open_count() > before

            # Every pool connection taken (by requests stuck elsewhere): 503 within 2 s.
            held = [await resources.pool.acquire() for _ in range(settings.db_pool_max)]
            try:
                response, took = await timed_get(api, "/readyz")
                assert_unavailable(response)
                assert response.json()["postgres"] == "down"
                assert took < PROBE_BOUND_S, took
            finally:
                for conn in held:
                    await resources.pool.release(conn)
            response, _ = await timed_get(api, "/readyz")
            assert response.status_code == 200


async def test_readyz_fails_fast_while_postgres_is_down(settings):
    async with own_postgres() as postgres:
        settings = msgspec.structs.replace(settings, database_url=postgres.url)
        async with api_client(settings) as (api, _):
            assert (await api.get("/readyz")).status_code == 200
            postgres.stop()
            for _ in range(3):
                response, took = await timed_get(api, "/readyz")
                assert_unavailable(response)
                assert response.json()["postgres"] == "down"
                assert took < PROBE_BOUND_S, took
            postgres.start()
            # Ready again once the pool has reconnected (a probe in flight when the server came
            # back may still fail once).
            async def ready() -> bool:
                return (await api.get("/readyz")).status_code == 200

            await wait_until(ready, timeout_s=10, interval=0.2, what="/readyz to answer 200")


async def test_postgres_out_of_connections_is_503_with_retry_after_never_500(settings):
    async with own_postgres(max_connections="20", superuser_reserved_connections="0") as postgres:
        settings = msgspec.structs.replace(settings, database_url=postgres.url, db_pool_min=1)
        async with api_client(settings) as (api, resources):
            conversation = await create_conversation(api)
            # Take every connection the server has left, and the pool's idle one.
            others: list[asyncpg.Connection] = []
            with pytest.raises(asyncpg.TooManyConnectionsError):
                for _ in range(40):
                    others.append(await asyncpg.connect(postgres.url))
            held = await resources.pool.acquire()
            try:
                paths = ["/v1/conversations", f"/v1/conversations/{conversation['id']}"]
                answers = await asyncio.gather(
                    *(api.get(paths[i % 2]) for i in range(10)),
                    *(api.post(f"/v1/conversations/{conversation['id']}/turns",
                               json={"input": f"q{i}"}) for i in range(10)),
                    api.post("/v1/conversations", json={}),
                )
            finally:
                await resources.pool.release(held)
                for conn in others:
                    await conn.close()
            for response in answers:
                assert_unavailable(response)
            # Connections free again: the same requests succeed.
            assert (await api.get(paths[1])).status_code == 200
            response = await api.post(f"/v1/conversations/{conversation['id']}/turns",
                                      json={"input": "after"})
            assert response.status_code == 202, response.text


async def test_a_lock_held_elsewhere_costs_only_its_conversation_a_503_within_seconds(
    settings, resources, api
):
    locked = await create_conversation(api)
    other = await create_conversation(api)
    holder = await asyncpg.connect(settings.database_url)
    try:
        # Another session (a process frozen inside its transaction) holds the conversation.
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT 1 FROM conversation WHERE id = $1 FOR UPDATE", locked["id"])
        start = time.monotonic()
        blocked, free = await asyncio.gather(
            api.post(f"/v1/conversations/{locked['id']}/turns", json={"input": "blocked"}),
            api.post(f"/v1/conversations/{other['id']}/turns", json={"input": "free"}),
        )
        took = time.monotonic() - start
        assert free.status_code == 202, free.text
        assert_unavailable(blocked)
        assert took < settings.db_lock_timeout_s + 2.0, took
        await transaction.rollback()
    finally:
        await holder.close()
    # Nothing was written for the refused request; the conversation works again.
    listed = (await api.get(f"/v1/conversations/{locked['id']}/turns")).json()["data"]
    assert listed == []
    response = await api.post(f"/v1/conversations/{locked['id']}/turns", json={"input": "later"})
    assert response.status_code == 202, response.text


SLOW_WRITES_SQL = """
CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(CASE WHEN NEW.input::text LIKE '%[hang]%' THEN 60 ELSE {seconds} END);
    RETURN NEW;
END $$;
CREATE TRIGGER slow_write BEFORE INSERT ON turn FOR EACH ROW EXECUTE FUNCTION slow_write();
"""


async def test_a_statement_that_never_ends_is_a_503_after_statement_timeout(settings):
    settings = msgspec.structs.replace(settings, db_statement_timeout_s=2.0)
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(SLOW_WRITES_SQL.format(seconds=0))
    finally:
        await conn.close()
    async with api_client(settings) as (api, _):
        conversation = await create_conversation(api)
        start = time.monotonic()
        response = await api.post(f"/v1/conversations/{conversation['id']}/turns",
                                  json={"input": "[hang] a write that would take a minute"})
        took = time.monotonic() - start
        assert_unavailable(response)
        assert took < settings.db_statement_timeout_s + 2.0, took
        assert (await api.get(f"/v1/conversations/{conversation['id']}/turns")).json()["data"] == []


async def test_slow_postgres_answers_every_post_within_seconds(settings):
    """0.3 s per write, 60 clients at once on a pool of 8: each POST is answered, 202 or 503,
    within a few seconds; none hangs, none is a 500."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(SLOW_WRITES_SQL.format(seconds=0.3))
    finally:
        await conn.close()
    async with api_client(settings) as (api, _):
        conversations = [await create_conversation(api) for _ in range(60)]

        async def post(conversation: dict) -> tuple[int, float]:
            start = time.monotonic()
            response = await api.post(f"/v1/conversations/{conversation['id']}/turns",
                                      json={"input": "slow"})
            if response.status_code == 503:
                assert_unavailable(response)
            return response.status_code, time.monotonic() - start

        answers = await asyncio.gather(*(post(c) for c in conversations))
    statuses = {status for status, _ in answers}
    slowest = max(took for _, took in answers)
    print(f"slow postgres: {sorted(s for s, _ in answers).count(202)} x 202, "
          f"{[s for s, _ in answers].count(503)} x 503, slowest {slowest:.2f} s")
    assert statuses <= {202, 503}, statuses
    assert 202 in statuses
    assert slowest < settings.db_acquire_timeout_s + settings.db_statement_timeout_s, slowest


@pytest.mark.parametrize("role", ["api", "worker"])
async def test_every_pool_session_carries_its_roles_deadlines(settings, role):
    deadlines = db_deadlines(settings, role)
    pool = await create_pool(settings.database_url, min_size=1, max_size=2, deadlines=deadlines)
    try:
        async with pool.acquire() as conn:
            shown = {name: await conn.fetchval(f"SELECT current_setting('{name}')")
                     for name in ("statement_timeout", "lock_timeout",
                                  "idle_in_transaction_session_timeout", "tcp_keepalives_idle",
                                  "application_name")}
        # Every acquire (and so every pool.fetch*) waits at most the role's deadline.
        assert pool.acquire().timeout == deadlines.acquire_timeout_s
    finally:
        await pool.close()
    expected = {"api": ("5s", "2s"), "worker": ("30s", "5s")}[role]
    assert shown == {"statement_timeout": expected[0], "lock_timeout": expected[1],
                     "idle_in_transaction_session_timeout": "15s",
                     "tcp_keepalives_idle": "30", "application_name": f"research-service-{role}"}
