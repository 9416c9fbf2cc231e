"""Creating a turn in one statement (service.domain.lifecycle's fast path): what it writes is
what the transaction under the conversation's lock wrote, and it never strands a turn."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import msgspec
import pytest

from service.config import Settings
from tests.helpers import create_conversation, post_turn, until


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # A POST that waits for a row the test holds must outwait the test's look at it, however
    # loaded the machine (the default lock_timeout, 2 s, answers 503 sooner).
    return msgspec.structs.replace(settings, db_lock_timeout_s=30.0,
                                  db_statement_timeout_s=40.0)


@pytest.mark.parametrize("key", [None, "key-1"])
async def test_the_queued_event_carries_the_turn_as_it_was_answered(api, key):
    conversation = await create_conversation(api)
    headers = {"Idempotency-Key": key} if key else {}
    answer = await api.post(f"/v1/conversations/{conversation['id']}/turns",
                            json={"input": {"q": "Who won?"}, "metadata": {"a": "b"}},
                            headers=headers)
    assert answer.status_code == 202, answer.text
    events = (await api.get(f"/v1/conversations/{conversation['id']}/events")).json()["data"]
    assert [e["type"] for e in events] == ["turn.queued"]
    assert events[0]["data"] == answer.json()
    if key:  # the stored first answer is the same turn
        again = await api.post(f"/v1/conversations/{conversation['id']}/turns",
                               json={"input": {"q": "Who won?"}, "metadata": {"a": "b"}},
                               headers=headers)
        assert again.json() == answer.json()


@pytest.mark.parametrize("at", [
    datetime(2026, 12, 1, 20, 5, 3, 123456, tzinfo=UTC),
    datetime(2026, 12, 1, 20, 5, 3, 120000, tzinfo=UTC),
    datetime(2026, 12, 1, 20, 5, 3, tzinfo=UTC),  # no fraction: msgspec writes none
])
async def test_created_at_is_written_in_sql_as_msgspec_writes_it(database_url, at):
    conn = await asyncpg.connect(database_url)
    try:
        written = await conn.fetchval("SELECT api_time($1::timestamptz)", at)
    finally:
        await conn.close()
    assert written == msgspec.json.encode(at).decode().strip('"')


async def test_turns_posted_at_once_to_one_conversation_are_numbered_without_gaps(api):
    conversation = await create_conversation(api)
    path = f"/v1/conversations/{conversation['id']}/turns"
    answers = await asyncio.gather(*(api.post(path, json={"input": f"Q{n}"}) for n in range(8)))
    assert [a.status_code for a in answers] == [202] * 8
    assert sorted(a.json()["seq"] for a in answers) == list(range(1, 9))
    events = (await api.get(f"/v1/conversations/{conversation['id']}/events")).json()["data"]
    assert [e["sequence"] for e in events] == list(range(1, 9))
    assert sorted(e["data"]["seq"] for e in events) == list(range(1, 9))
    after = (await api.get(f"/v1/conversations/{conversation['id']}")).json()
    assert after["turn_count"] == 8
    assert after["last_turn_id"] == next(a.json()["id"] for a in answers if a.json()["seq"] == 8)


async def test_a_turn_queued_while_the_one_ahead_ends_is_started(api, resources, database_url):
    """The one statement counts open turns as of its start. Here the turn ahead ends in a
    transaction that holds the conversation's row (as the worker's end does) while the new
    turn's statement waits for that row: the ending transaction cannot see the new turn, and
    the statement counted the turn ahead as open. The new turn must still get its start job."""
    conversation = await create_conversation(api)
    ahead = await post_turn(api, conversation["id"], "ahead")
    holder = await asyncpg.connect(database_url)
    try:
        ending = holder.transaction()
        await ending.start()
        await holder.execute("SELECT 1 FROM conversation WHERE id = $1 FOR UPDATE",
                             conversation["id"])
        await holder.execute(
            "UPDATE turn SET status = 'cancelled', completed_at = now() WHERE id = $1",
            ahead["id"])
        posting = asyncio.ensure_future(post_turn(api, conversation["id"], "next"))

        async def waiting_for_the_row() -> bool:
            return bool(await holder.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"))

        await until(waiting_for_the_row)
        await ending.commit()
        following = await posting
    finally:
        await holder.close()
    job = f"arq:job:start_turn:{following['id']}"
    assert await resources.queue.exists(job), "the new turn was left without a start job"
