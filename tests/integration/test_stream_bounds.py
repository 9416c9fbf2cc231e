"""Streams have bounds: they end when their key is revoked, their conversation deleted, or after
MAX_STREAM_S (the client resumes and misses nothing), and SSE streams plus ?wait= long-polls
are capped per tenant across API processes."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import msgspec
import pytest
from redis.asyncio import Redis

from service.app import create_app
from service.config import Settings
from service.db.keys import create_key, revoke_key, split_key
from service.devstack import free_port
from service.domain.keycache import KeyCache
from service.domain.slots import Slots
from service.errors import TooManyStreams
from service.resources import Resources
from tests.helpers import create_conversation, post_turn, running_worker, until
from tests.receivers import serve
from tests.sse import read_events

# Long, so that what ends a stream here is the event itself and not a heartbeat's re-check.
HEARTBEAT_S = 30.0
CAP = 3


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(
        settings, sse_heartbeat_s=HEARTBEAT_S, max_open_streams_per_tenant=CAP)


@contextlib.asynccontextmanager
async def api_process(
    settings: Settings, key: str, resources: Resources | None = None
) -> AsyncIterator[tuple[Resources, httpx.AsyncClient]]:
    """An API process of its own (its resources, its server) and a client with `key`."""
    res = resources or await Resources.open(settings, listen=True)
    try:
        async with serve(create_app(settings, resources=res)) as url, httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as http:
            yield res, http
    finally:
        if resources is None:
            await res.close()


async def make_key(resources: Resources, tenant: str) -> str:
    async with resources.pool.acquire() as conn:
        return (await create_key(conn, tenant))[1]


async def tenant_of(resources: Resources, key: str) -> str:
    return str(await resources.pool.fetchval(
        "SELECT tenant_id FROM api_key WHERE id = $1", split_key(key)))


def watchers(resources: Resources, conversation_id: str) -> int:
    feed = resources.streams.feeds.get(conversation_id)
    return feed.watchers if feed is not None and feed.ready.is_set() else 0


def assert_too_many_streams(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"] == "/problems/too-many-streams"
    assert int(response.headers["retry-after"]) >= 1


async def test_a_stream_ends_at_once_when_its_key_is_revoked(settings, resources, api_key):
    other_key = await make_key(resources, "acme")
    async with api_process(settings, api_key, resources) as (_, http):
        conversation = await create_conversation(http)
        cid = conversation["id"]
        doomed = asyncio.create_task(read_events(http, cid, None, timeout_s=10))
        kept = asyncio.create_task(read_events(
            http, cid, lambda m: m.event == "turn.queued",
            headers={"Authorization": f"Bearer {other_key}"}))
        await until(lambda: watchers(resources, cid) == 2)

        async with resources.pool.acquire() as conn:
            assert await revoke_key(conn, split_key(api_key))
        started = time.monotonic()
        assert await doomed == []  # it ended, well within a heartbeat
        assert time.monotonic() - started < 5 < HEARTBEAT_S
        # The stream opened with the tenant's other key goes on.
        await _post_with(http, other_key, cid)
        assert [m.event for m in await kept] == ["turn.queued"]


async def _post_with(http: httpx.AsyncClient, key: str, conversation_id: str) -> None:
    response = await http.post(f"/v1/conversations/{conversation_id}/turns",
                               json={"input": "Still watched"},
                               headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 202, response.text


async def test_a_stream_ends_when_its_conversation_is_deleted(settings, resources, api_key):
    async with api_process(settings, api_key, resources) as (_, http):
        conversation = await create_conversation(http)
        cid = conversation["id"]
        await post_turn(http, cid, "Queued, no worker")  # event 1
        stream = asyncio.create_task(read_events(http, cid, None, timeout_s=10))
        await until(lambda: watchers(resources, cid) == 1)

        assert (await http.delete(f"/v1/conversations/{cid}")).status_code == 204
        started = time.monotonic()
        messages = await stream
        assert time.monotonic() - started < 5 < HEARTBEAT_S
        # Its open turn is cancelled first; the client hears of it if the stream read it before
        # the deletion took the conversation's events away.
        assert [(m.event, m.id) for m in messages] in (
            [("turn.queued", "1")], [("turn.queued", "1"), ("turn.cancelled", "2")])


async def test_a_stream_ends_after_max_stream_s_and_the_client_resumes_without_gaps(
    settings, api_key, resources
):
    short = msgspec.structs.replace(settings, max_stream_s=0.5, sse_heartbeat_s=0.2)
    async with api_process(short, api_key) as (_, http), running_worker(short):
        conversation = await create_conversation(http)
        cid = conversation["id"]
        for question in ("One", "Two", "Three"):
            await post_turn(http, cid, f"[sandbox:slow=0.5] {question}")
        seen: list[int] = []
        connections = 0
        async with asyncio.timeout(60):
            while len(seen) < 9:  # three turns: queued, running, completed each
                connections += 1
                headers = {"Last-Event-ID": str(seen[-1])} if seen else {}
                messages = await read_events(http, cid, None, headers=headers, timeout_s=5)
                seen += [int(m.id) for m in messages if m.event != "turn.progress"]
        assert seen == list(range(1, 10)), "every event once, in order, across reconnections"
        assert connections >= 2, "each stream ended after MAX_STREAM_S"


async def test_streams_and_long_polls_share_one_cap_per_tenant_across_processes(
    settings, resources, api_key
):
    globex_key = await make_key(resources, "globex")
    tenant = await tenant_of(resources, api_key)
    async with api_process(settings, api_key, resources) as (a, http_a), \
            api_process(settings, api_key) as (b, http_b):
        cid = (await create_conversation(http_a))["id"]
        turn = await post_turn(http_a, cid, "Queued: no worker runs it")
        never = lambda m: False  # noqa: E731
        first = asyncio.create_task(read_events(http_a, cid, never, timeout_s=60))
        second = asyncio.create_task(read_events(http_a, cid, never, timeout_s=60))
        poll = asyncio.create_task(http_b.get(
            f"/v1/conversations/{cid}/turns/{turn['id']}", params={"wait": 60}))
        await until(lambda: a.streams.slots.held(tenant) == 2 and b.streams.slots.held(tenant) == 1)

        # Full, in either process, for a stream or a long-poll.
        async with http_b.stream("GET", f"/v1/conversations/{cid}/events",
                                 headers={"Accept": "text/event-stream"}) as refused:
            await refused.aread()
            assert_too_many_streams(refused)
        assert_too_many_streams(await http_a.get(
            f"/v1/conversations/{cid}/turns/{turn['id']}", params={"wait": 1}))
        # A plain GET is no long-poll, and another tenant has slots of its own.
        assert (await http_a.get(f"/v1/conversations/{cid}/turns/{turn['id']}")).status_code == 200
        globex = httpx.AsyncClient(base_url=str(http_b.base_url), timeout=30,
                                   headers={"Authorization": f"Bearer {globex_key}"})
        async with globex:
            other = (await create_conversation(globex))["id"]
            async with globex.stream("GET", f"/v1/conversations/{other}/events",
                                     headers={"Accept": "text/event-stream"}) as accepted:
                assert accepted.status_code == 200

        # A stream that ends gives its slot back, to any process once it is no longer A's spare
        # (SPARE_S).
        first.cancel()
        await until(lambda: a.streams.slots.held(tenant) == 1)
        await until(lambda: a.streams.slots.spare(tenant) == 0)
        third = asyncio.create_task(read_events(http_b, cid, never, timeout_s=60))
        await until(lambda: b.streams.slots.held(tenant) == 2)
        for task in (second, poll, third):
            task.cancel()
        await asyncio.gather(first, second, poll, third, return_exceptions=True)
        await until(lambda: a.streams.slots.held(tenant) + b.streams.slots.held(tenant) == 0)


async def test_a_dead_process_holds_its_slots_only_until_their_leases_end(resources):
    tenant = f"ten_{secrets.token_hex(6)}"
    live = Slots(resources.queue, lease_s=0.6)
    dying = Slots(resources.queue, lease_s=0.6)
    try:
        await live.take(tenant, 2)
        await dying.take(tenant, 2)
        # Renewed, a live process keeps its slots for as long as it lives (here 3 leases).
        started = time.monotonic()
        while time.monotonic() - started < 1.8:
            with pytest.raises(TooManyStreams):
                await live.take(tenant, 2)
            await asyncio.sleep(0.1)
        # The dying process stops renewing without giving its slot back (as if killed).
        dying._renewer.cancel()
        died = time.monotonic()
        while True:
            try:
                await live.take(tenant, 2)
                break
            except TooManyStreams:
                assert time.monotonic() - died < 0.6 + 2, "the dead process's slot leaked"
                await asyncio.sleep(0.05)
    finally:
        await live.close()
        await dying.close()
        await resources.queue.delete(f"streams:{{{tenant}}}")


async def test_a_slot_given_back_is_the_next_streams_of_the_process_without_asking_redis(
    resources,
):
    tenant = f"ten_{secrets.token_hex(6)}"
    here = Slots(resources.queue, spare_s=0.3)
    there = Slots(resources.queue)
    key = f"streams:{{{tenant}}}"
    try:
        first = await here.take(tenant, 1)
        first.release()
        # The next long-poll here takes the same slot back: same member, nothing new in Redis.
        again = await here.take(tenant, 1)
        assert again.member == first.member
        assert await resources.queue.zrange(key, 0, -1) == [first.member.encode()]
        again.release()
        # Another process counts a spare as open until it has gone back (SPARE_S later) ...
        with pytest.raises(TooManyStreams):
            await there.take(tenant, 1)
        assert here.spare(tenant) == 1
        await until(lambda: here.spare(tenant) == 0)
        # ... and then has its place.
        deadline = time.monotonic() + 5
        while True:
            try:
                taken = await there.take(tenant, 1)
                break
            except TooManyStreams:
                assert time.monotonic() < deadline, "the spare never went back to Redis"
                await asyncio.sleep(0.02)
        assert taken.member != first.member
    finally:
        await here.close()
        await there.close()
        await resources.queue.delete(key)


async def test_while_redis_is_away_each_process_counts_its_own_slots():
    away = Redis(port=free_port(), socket_connect_timeout=1)  # nothing listens there
    slots = Slots(away)
    try:
        held = [await slots.take("ten_alone", 2) for _ in range(2)]
        with pytest.raises(TooManyStreams):
            await slots.take("ten_alone", 2)
        held[0].release()
        await slots.take("ten_alone", 2)  # a slot given back can be taken again
    finally:
        await slots.close()
        await away.aclose()


async def test_the_streams_of_one_key_ask_postgres_about_it_once(settings, api_key):
    """300 streams of one key re-checking it at once (after a change, or without a listening
    connection to trust the cache) make one lookup."""
    lookups = []

    async def log_lookups(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda q: lookups.append(q) if "FROM api_key" in q.query else None)

    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4,
                                     init=log_lookups)
    try:
        keys = KeyCache(None)  # no LISTEN connection: nothing cached, every check asks
        answers = await asyncio.gather(*(keys.is_live(pool, api_key) for _ in range(300)))
        assert answers == [True] * 300
        assert len(lookups) == 1
        async with pool.acquire() as conn:
            assert await revoke_key(conn, split_key(api_key))
        keys.invalidate(split_key(api_key))
        assert not any(await asyncio.gather(*(keys.is_live(pool, api_key) for _ in range(300))))
        assert len(lookups) == 2
    finally:
        await pool.close()
