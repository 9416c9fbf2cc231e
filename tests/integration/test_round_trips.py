"""What a turn costs in statements, counted on the pools' own connections: creating one is one
statement and no transaction (two when a turn is ahead of it); a start attempt, storing its
run and the run's end are one statement each (migration 0014's functions), as is a feed's read;
a conversation without a webhook writes no outbox row (issue 16: fewer round trips per turn).
The turn those functions write into events, built in SQL, is the turn as the API shows it."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import httpx
import msgspec
import pytest

from service.config import Settings
from service.db.streams import read_feed
from service.domain import attempts, lifecycle
from service.domain.feeds import LINGER_S, Feed
from service.models import Turn
from tests.helpers import create_conversation, post_turn, until

POOL = 3


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Every connection opened up front, so the logger below is on all of them.
    return msgspec.structs.replace(settings, db_pool_min=POOL, db_pool_max=POOL)


@asynccontextmanager
async def logged(*pools: asyncpg.Pool) -> AsyncIterator[list[str]]:
    """Every statement the pools' connections send while the block runs (BEGIN and COMMIT
    included), each as its first line."""
    statements: list[str] = []

    def log(query: asyncpg.connection.LoggedQuery) -> None:
        text = " ".join(query.query.split())
        if "typeinfo_tree" not in text and "set_config('jit'" not in text:  # asyncpg's own,
            statements.append(text[:80])  # once per connection and type

    held = [(pool, await pool.acquire()) for pool in pools for _ in range(POOL)]
    # The connections themselves, not the pool's proxies (which refuse calls once released).
    connections = [proxy._con for _, proxy in held]
    for pool, proxy in held:
        await pool.release(proxy)
    for conn in connections:
        conn.add_query_logger(log)
    try:
        yield statements
    finally:
        for conn in connections:
            conn.remove_query_logger(log)


def kinds(statements: list[str]) -> Counter[str]:
    return Counter("BEGIN" if s.startswith("BEGIN") else s.split(" ")[0] for s in statements)


async def test_creating_a_turn_behind_another_is_two_statements_and_no_transaction(api, resources):
    conversation = await create_conversation(api)
    hub = resources.hub
    for _ in range(3):
        # The key's lookup is cached from the warm-up on, once the listening connection that
        # invalidates the cache is up (on a loaded machine it can come up after the first
        # request) and while it stays up (if it was remade meanwhile, count again).
        await until(lambda: hub.connected)
        epoch = hub.epoch
        await post_turn(api, conversation["id"], "warm up")
        async with logged(resources.pool) as statements:
            await post_turn(api, conversation["id"], "counted")
        if hub.epoch == epoch:
            break
    print("POST turn:", len(statements), statements)
    # The turn and its event written in one statement; the turn ahead (the warm-up) is still
    # open, so the new one's head is read once more.
    assert len(statements) == 2, statements
    assert kinds(statements)["BEGIN"] == 0
    assert not any("FOR UPDATE" in s for s in statements)


async def test_creating_a_conversations_first_turn_is_one_statement(api, resources):
    conversation = await create_conversation(api)
    await until(lambda: resources.hub.connected)
    await post_turn(api, (await create_conversation(api))["id"], "warm up the key")
    async with logged(resources.pool) as statements:
        await post_turn(api, conversation["id"], "counted")
    assert len(statements) == 1, statements
    assert kinds(statements)["BEGIN"] == 0


async def test_a_start_its_run_and_its_end_are_one_statement_each(
    api, resources
):
    pool, settings = resources.pool, resources.settings
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "counted")
    async with logged(pool) as begun_statements:
        begun, _ = await attempts.begin_attempt(pool, settings, turn["id"])
    assert isinstance(begun, attempts.Begun)
    async with logged(pool) as recorded_statements:
        outcome, _ = await attempts.record_run(pool, begun.turn, begun.number, "trun_counted",
                                                "trun_counted", 1.0)
    assert outcome == "started"
    async with logged(pool) as completed_statements:
        completed, _ = await lifecycle.complete(pool, turn["id"],
                                                {"type": "text", "content": "done"}, [])
    assert completed is not None and completed.status == "completed"
    assert begun_statements == ["SELECT * FROM begin_attempt($1, $2, $3, $4, $5, $6, $7)"]
    assert recorded_statements == ["SELECT * FROM record_run($1, $5, $2, $3, $4, $6, $7)"]
    assert len(completed_statements) == 1 and "finish_turn" in completed_statements[0]
    events = (await api.get(f"/v1/conversations/{conversation['id']}/events")).json()["data"]
    assert [e["type"] for e in events] == ["turn.queued", "turn.running", "turn.completed"]
    deliveries = await pool.fetchval(
        "SELECT count(*) FROM webhook_delivery WHERE conversation_id = $1", conversation["id"])
    assert deliveries == 0


async def test_a_conversation_with_a_webhook_still_writes_its_delivery_with_the_status(
    api, resources, receiver
):
    """The cancel's transaction (the conversation and the turn locked, then finish_turn)
    writes the turn, its event and its delivery together."""
    conversation = await create_conversation(api, webhook_url=receiver.url)
    turn = await post_turn(api, conversation["id"], "with a webhook")
    async with logged(resources.pool) as statements:
        await api.post(f"/v1/conversations/{conversation['id']}/turns/{turn['id']}/cancel")
    assert kinds(statements)["BEGIN"] == 1, statements
    delivery = await resources.pool.fetchrow(
        "SELECT event_type, payload FROM webhook_delivery WHERE conversation_id = $1",
        conversation["id"])
    assert delivery["event_type"] == "turn.cancelled"
    events = (await api.get(f"/v1/conversations/{conversation['id']}/events")).json()["data"]
    # The body a receiver gets: the event as the API shows it, its time the event's.
    assert delivery["payload"] == {"type": "turn.cancelled", "timestamp": events[-1]["created_at"],
                                   "data": events[-1]}


async def test_the_turn_written_in_sql_is_the_turn_as_the_api_shows_it(api, resources):
    """turn_data (migration 0014) builds every event's turn after a start or an end: for a turn
    in each state, it is what msgspec makes of the row (the API's own encoding)."""
    pool, settings = resources.pool, resources.settings
    conversation = await create_conversation(api)
    cid = conversation["id"]

    async def started(question: str) -> dict:
        turn = await post_turn(api, cid, question)
        begun, _ = await attempts.begin_attempt(pool, settings, turn["id"])
        assert isinstance(begun, attempts.Begun), begun
        await attempts.record_run(pool, begun.turn, begun.number, f"trun_{question}",
                                  f"int_{question}", 1.0)
        return turn

    first = await started("first")
    basis = [{"field": "content", "citations": [{"url": "https://a.example", "title": None,
                                                 "excerpts": ["é ✓ \"quoted\""]}],
              "reasoning": "because", "confidence": "high"}]
    await lifecycle.complete(pool, first["id"], {"type": "json", "content": {"n": 1.5}}, basis)
    second = await started("second")  # chained to the first, left running
    behind = await post_turn(api, cid, "queued behind")
    await lifecycle.fail(pool, second["id"], {"code": "run_failed", "message": "no"})
    for turn in (behind, None):  # queued, then running: cancelled
        turn = turn or await started("fourth")
        cancelled = await api.post(f"/v1/conversations/{cid}/turns/{turn['id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
    rows = await pool.fetch(
        "SELECT t.*, turn_data(t) AS data FROM turn t WHERE t.conversation_id = $1", cid)
    statuses = set()
    for row in rows:
        shown = msgspec.to_builtins(msgspec.convert(
            {k: row[k] for k in Turn.__struct_fields__}, Turn))
        assert row["data"] == shown
        statuses.add(row["status"])
    assert statuses == {"completed", "failed", "cancelled"}
    events = (await api.get(f"/v1/conversations/{cid}/events")).json()["data"]
    running = [e["data"] for e in events if e["type"] == "turn.running"]
    assert [r["context"] for r in running] == ["none", "chained", "chained"]
    assert running[1]["previous_interaction_id"] == "int_first"
    assert events[-1]["data"]["upstream_may_continue"] is True


async def long_polled(
    api, resources, question: str, conversation_id: str | None = None
) -> tuple[Feed, httpx.Response]:
    """POST a turn (in a new conversation, or in `conversation_id`), long-poll it, and run it
    (begin, its run recorded, complete) while the long-poll waits: the poll's feed and its
    answer."""
    pool, settings = resources.pool, resources.settings
    cid = conversation_id or (await create_conversation(api))["id"]
    turn = await post_turn(api, cid, question)
    path = f"/v1/conversations/{cid}/turns/{turn['id']}"
    poll = asyncio.create_task(api.get(path, params={"wait": 30}))
    await until(lambda: (feed := resources.streams.feeds.get(cid)) is not None
                and feed.watchers == 1 and feed.ready.is_set())
    feed = resources.streams.feeds.get(cid)
    assert feed is not None
    begun, _ = await attempts.begin_attempt(pool, settings, turn["id"])
    assert isinstance(begun, attempts.Begun)
    run_id = f"trun_{turn['id']}"
    await attempts.record_run(pool, begun.turn, begun.number, run_id, run_id, 1.0)
    await until(lambda: feed.running == (turn["id"], run_id))
    await lifecycle.complete(pool, turn["id"], {"type": "text", "content": "done"}, [])
    answer = await poll
    assert answer.status_code == 200 and answer.json()["status"] == "completed"
    assert answer.json() == (await api.get(path)).json()
    assert feed.running is None
    return feed, answer


async def test_a_long_poll_is_answered_from_the_notifications_without_reading_the_events(
    api, resources
):
    """The feed reads the conversation once as the long-poll joins it; the turn's three events
    then come in their notifications, and the answer is the turn as GET shows it."""
    feed, _ = await long_polled(api, resources, "awaited")
    assert feed.reads == 1, feed.reads


async def test_the_next_long_poll_of_a_conversation_finds_its_feed_read(api, resources):
    """A client's loop (the answer, the follow-up's POST, its long-poll) finds the feed its
    last long-poll left: still following the notifications, so the second turn costs no read
    of the conversation's events either. Nobody watching, the feed goes LINGER_S later."""
    feed, first = await long_polled(api, resources, "first")
    cid = first.json()["conversation_id"]
    again, second = await long_polled(api, resources, "second", cid)
    assert again is feed and feed.reads == 1, feed.reads
    assert second.json()["previous_interaction_id"] == first.json()["interaction_id"]
    assert feed.watchers == 0
    await until(lambda: resources.streams.feeds.get(cid) is None, timeout_s=LINGER_S + 5)
    assert feed.task is not None
    await until(feed.task.done)  # its reader stops (a cancelled task ends a loop pass later)


async def test_an_event_too_large_for_a_notification_is_read_instead(api, resources):
    """A 20,000-character question makes every event of its turn larger than a NOTIFY payload:
    the notifications carry only the conversation, and the feed reads each event."""
    feed, _ = await long_polled(api, resources, "x" * 20_000)
    assert feed.reads >= 3, feed.reads  # the first read, then one per event after it


async def test_a_feed_reads_its_conversation_in_one_statement(api, resources):
    """A feed's read (its conversation's running turn and events, from one snapshot) is one
    statement, not a read-only transaction of three."""
    pool = resources.pool
    conversation = await create_conversation(api)
    first = await post_turn(api, conversation["id"], "first")
    begun, _ = await attempts.begin_attempt(pool, resources.settings, first["id"])
    assert isinstance(begun, attempts.Begun)
    await attempts.record_run(pool, begun.turn, begun.number, "trun_fed", "int_fed", 1.0)
    async with logged(pool) as statements:
        tail = await read_feed(pool, conversation["id"], None, 10)
        after = await read_feed(pool, conversation["id"], 1, 10)
        empty = await read_feed(pool, conversation["id"], 2, 10)
    assert len(statements) == 3 and kinds(statements)["BEGIN"] == 0, statements
    assert [e.type for e in tail.events] == ["turn.queued", "turn.running"]
    assert [e.sequence for e in after.events] == [2]
    assert empty.exists and empty.events == []
    assert tail.running == after.running == empty.running == (first["id"], "trun_fed")
    gone = await read_feed(pool, "conv_missing", None, 10)
    assert not gone.exists and gone.running is None
