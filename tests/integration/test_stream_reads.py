"""Watchers share their reads: a turn costs about the same Postgres transactions whether one
client or 300 watch its conversation (an SSE stream each), or wait for it (`?wait=` each).

Transactions are counted as Postgres counts them, `xact_commit` of the test's database in
pg_stat_database. A backend reports its counts when it goes idle, but at most once a second
(else up to 10 s later), so before each count every connection of the API's and the worker's
pools runs `pg_stat_force_next_flush()`; those queries are subtracted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import asyncpg
import httpx
import msgspec
import pytest

from service.app import create_app
from service.config import Settings
from tests.helpers import create_conversation, post_turn, set_faults, until, wait_turn
from tests.receivers import serve
from tests.sse import read_events

WATCHERS = 300
CREATE_HELD_S = 10.0  # long enough for 300 long-polls to start on a loaded machine


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Unlimited requests per minute: 300 streams open at once. The worker's periodic work (the
    # retention sweep, the reconciler, the group streams' lease rounds, the idle loops' looks)
    # as rare as it goes: it commits transactions of its own, more the longer a measurement
    # takes on a loaded machine.
    return msgspec.structs.replace(
        settings, max_open_streams_per_tenant=2 * WATCHERS, rate_limit_per_min=0,
        retention_sweep_interval_s=600, reconcile_interval_s=600, group_lease_s=600.0,
        follower_idle_s=10.0, db_pool_min=8, db_pool_max=8)  # pools that do not resize


@pytest.fixture
async def server(settings, resources, api_key) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(create_app(settings, resources=resources)) as url, httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    ) as http:
        yield http


@pytest.fixture
async def admin(pg_admin_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to another database, so that counting adds nothing to the test's."""
    conn = await asyncpg.connect(pg_admin_url)
    yield conn
    await conn.close()


async def flush_stats(pool: asyncpg.Pool) -> int:
    """Make every connection of the pool report its counts now; returns how many it holds."""
    conns = [await pool.acquire() for _ in range(pool.get_size())]
    try:
        for conn in conns:
            await conn.execute("SELECT pg_stat_force_next_flush()")
    finally:
        for conn in conns:
            await pool.release(conn)
    return len(conns)


def counter(admin: asyncpg.Connection, settings: Settings, pools: Callable[[], list[asyncpg.Pool]]):
    database = urlsplit(settings.database_url).path.lstrip("/")

    async def committed() -> int:
        """Transactions committed in the test's database so far, not counting the flushes."""
        flushes = 0
        for pool in pools():
            flushes += await flush_stats(pool)
        total = await admin.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", database)
        return int(total) - flushes

    return committed


async def cost(committed: Callable[[], Awaitable[int]], run: Callable[[], Awaitable[None]]) -> int:
    """Transactions committed while `run` ran, less what a reading of the count adds itself
    (a flush's own transaction can be counted by the next reading): measured just before."""
    before = await committed()
    before, offset = await committed(), await committed() - before
    await run()
    return await committed() - before - offset


def watching(resources, conversation_id: str, count: int):
    def holds() -> bool:
        feed = resources.streams.feeds.get(conversation_id)
        return feed is not None and feed.watchers == count and feed.ready.is_set()
    return holds


async def test_300_stream_watchers_cost_a_turn_at_most_twice_the_transactions_of_one(
    settings, resources, server, api, worker, admin
):
    committed = counter(admin, settings, lambda: [resources.pool, worker.ctx["resources"].pool])

    async def turn_watched_by(count: int) -> int:
        cid = (await create_conversation(api))["id"]
        readers = [asyncio.create_task(read_events(
            server, cid, lambda m: m.event == "turn.completed", timeout_s=120))
            for _ in range(count)]
        await until(watching(resources, cid, count), timeout_s=120)

        async def turn() -> None:
            await post_turn(api, cid, "Watched")
            for messages in await asyncio.gather(*readers):
                assert [m.event for m in messages if m.event != "turn.progress"] == [
                    "turn.queued", "turn.running", "turn.completed"]

        return await cost(committed, turn)

    await turn_watched_by(1)  # the first turn also makes the worker's task group: not counted
    one = await turn_watched_by(1)
    many = await turn_watched_by(WATCHERS)
    print(f"transactions of a turn: {one} with 1 watcher, {many} with {WATCHERS}")
    assert many <= 2 * one, f"{many} transactions with {WATCHERS} watchers, {one} with one"


async def test_300_long_polls_cost_a_turn_at_most_twice_the_transactions_of_one(
    settings, resources, api, worker, sandbox, admin
):
    """The sandbox holds each create for a while, so the long-polls are all waiting before the
    turn's run exists; counting starts then, with the worker idle (its start-up work done)."""
    await until(lambda: "resources" in worker.ctx)
    committed = counter(admin, settings, lambda: [resources.pool, worker.ctx["resources"].pool])

    async def turn_awaited_by(count: int) -> int:
        cid = (await create_conversation(api))["id"]
        turn = await post_turn(api, cid, "Awaited")
        path = f"/v1/conversations/{cid}/turns/{turn['id']}"
        polls = [asyncio.create_task(api.get(path, params={"wait": 60})) for _ in range(count)]
        await until(watching(resources, cid, count), timeout_s=CREATE_HELD_S)
        # Each long-poll reads the turn once as it starts, and the worker begins the start
        # attempt: wait until all that has committed.
        before, previous = await committed(), None
        while before != previous:
            previous, before = before, await committed()

        async def answered() -> None:
            for answer in await asyncio.gather(*polls):
                assert answer.status_code == 200, answer.text
                assert answer.json()["status"] == "completed"

        return await cost(committed, answered)

    # The first turn also makes the worker's task group: not counted.
    await wait_turn(api, await post_turn(api, (await create_conversation(api))["id"], "Warm-up"))
    set_faults(sandbox.url, create_delay_s=CREATE_HELD_S)
    one = await turn_awaited_by(1)
    many = await turn_awaited_by(WATCHERS)
    print(f"transactions of a turn: {one} with 1 long-poll, {many} with {WATCHERS}")
    assert many <= 2 * one, f"{many} transactions with {WATCHERS} long-polls, {one} with one"
