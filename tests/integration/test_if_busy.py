"""`if_busy` on POST …/turns: what a new question does while its conversation has an open turn.

`enqueue` (the default) waits behind it; `reject` answers 409 `/problems/conversation-busy` and
writes nothing; `interrupt` cancels every open turn, as the cancel route does, in the
transaction that queues the new one. Real Postgres, Redis, worker and sandbox throughout.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from tests.helpers import (
    assert_problem,
    create_conversation,
    post_turn,
    sandbox_runs,
    settings_of,
    wait_turn,
    wait_until,
)

TABLES = ("conversation", "turn", "event", "webhook_delivery", "webhook_attempt",
          "deleted_usage", "turn_extra_run")
# The worker's own schedule of a running turn's checks, which moves while it runs.
SCHEDULE = ("next_check_at", "check_count")


@pytest.fixture
def settings(settings):
    """Deadlines far from the tests' waits: ten requests at once queue on one conversation's row
    lock (and on the pool of 8) for longer than the API's 2 s on a loaded machine, and these
    tests are about what is written, not about how long a request may wait (test_outages is)."""
    return msgspec.structs.replace(settings, db_lock_timeout_s=30.0, db_acquire_timeout_s=30.0)


async def snapshot(database_url: str) -> dict[str, list[str]]:
    """Every row of the tables a turn could touch, as text: any insert, update or delete shows."""
    conn = await asyncpg.connect(database_url)
    try:
        return {table: [r[0] for r in await conn.fetch(
            f"SELECT (to_jsonb(x) - $1::text[])::text AS row FROM {table} x ORDER BY row",
            list(SCHEDULE))] for table in TABLES}
    finally:
        await conn.close()


def turns_path(conversation: dict[str, Any]) -> str:
    return f"/v1/conversations/{conversation['id']}/turns"


async def turns_of(api: httpx.AsyncClient, conversation: dict[str, Any]) -> list[dict[str, Any]]:
    page = (await api.get(turns_path(conversation), params={"limit": 100})).json()
    assert page["next_cursor"] is None
    turns: list[dict[str, Any]] = page["data"]
    return turns


async def events_of(api: httpx.AsyncClient, conversation: dict[str, Any]) -> list[dict[str, Any]]:
    page = (await api.get(f"/v1/conversations/{conversation['id']}/events",
                          params={"limit": 100})).json()
    events: list[dict[str, Any]] = page["data"]
    return events


async def get_turn(api: httpx.AsyncClient, turn: dict[str, Any]) -> dict[str, Any]:
    response = await api.get(f"/v1/conversations/{turn['conversation_id']}/turns/{turn['id']}")
    assert response.status_code == 200, response.text
    fetched: dict[str, Any] = response.json()
    return fetched


# reject ---------------------------------------------------------------------------------------


async def test_reject_while_a_turn_runs_is_409_conversation_busy_and_writes_nothing(
    api, worker, database_url, receiver
):
    conversation = await create_conversation(api, webhook_url=receiver.url)
    running = await post_turn(api, conversation["id"], "[sandbox:slow=30] long research")
    await wait_turn(api, running, statuses={"running"})
    before, usage = await snapshot(database_url), (await api.get("/v1/usage")).json()

    response = await api.post(turns_path(conversation), headers={"Idempotency-Key": "ask-1"},
                              json={"input": "Are you done?", "if_busy": "reject"})

    problem = assert_problem(response, 409)
    assert problem["type"] == "/problems/conversation-busy"
    assert problem["title"] == "Conversation busy"
    assert running["id"] in problem["detail"] and "running" in problem["detail"]
    assert await snapshot(database_url) == before  # no turn, event, delivery, usage, key
    assert (await api.get("/v1/usage")).json() == usage
    assert [t["id"] for t in await turns_of(api, conversation)] == [running["id"]]
    assert (await get_turn(api, running))["status"] == "running"

    # The refusal recorded nothing, so its key is free: once the conversation is idle again,
    # the same request is decided afresh (and queued).
    await api.post(f"{turns_path(conversation)}/{running['id']}/cancel")
    again = await api.post(turns_path(conversation), headers={"Idempotency-Key": "ask-1"},
                           json={"input": "Are you done?", "if_busy": "reject"})
    assert again.status_code == 202, again.text
    assert (await wait_turn(api, again.json()))["status"] == "completed"


async def test_reject_while_a_turn_is_queued_is_409_too(api, database_url):
    # No worker: the first turn stays queued.
    conversation = await create_conversation(api)
    queued = await post_turn(api, conversation["id"], "first")
    before = await snapshot(database_url)
    response = await api.post(turns_path(conversation),
                              json={"input": "second", "if_busy": "reject"})
    assert assert_problem(response, 409)["type"] == "/problems/conversation-busy"
    assert queued["id"] in response.json()["detail"]
    assert await snapshot(database_url) == before


async def test_reject_on_an_idle_conversation_queues_the_turn(api, worker):
    conversation = await create_conversation(api)
    first = await post_turn(api, conversation["id"], "Who won?", if_busy="reject")
    assert first["status"] == "queued"
    done = await wait_turn(api, first)
    assert done["status"] == "completed"
    # Idle again (its only turn completed): a second reject is queued, chained as usual.
    second = await post_turn(api, conversation["id"], "By how much?", if_busy="reject")
    second = await wait_turn(api, second)
    assert second["status"] == "completed"
    assert second["previous_interaction_id"] == done["interaction_id"]


async def test_enqueue_is_the_default_and_waits_behind_the_open_turn(api, worker):
    conversation = await create_conversation(api)
    slow = await post_turn(api, conversation["id"], "[sandbox:slow=1] first")
    behind = await post_turn(api, conversation["id"], "second", if_busy="enqueue")
    done = await wait_turn(api, behind)
    assert (await get_turn(api, slow))["status"] == "completed"
    assert done["previous_interaction_id"] == (await get_turn(api, slow))["interaction_id"]


async def test_an_unknown_if_busy_is_422_naming_the_field(api, database_url):
    conversation = await create_conversation(api)
    before = await snapshot(database_url)
    for value in ("replace", "", 1, None, "REJECT"):
        response = await api.post(turns_path(conversation),
                                  json={"input": "q", "if_busy": value})
        problem = assert_problem(response, 422)
        assert [e["field"] for e in problem["errors"]] == ["if_busy"], problem
    assert await snapshot(database_url) == before


# interrupt ------------------------------------------------------------------------------------


async def test_interrupt_cancels_the_running_and_queued_turns_and_chains_past_them(api, worker):
    conversation = await create_conversation(api)
    answered = await wait_turn(api, await post_turn(api, conversation["id"], "Who won?"))
    running = await post_turn(api, conversation["id"], "[sandbox:slow=30] Why?")
    await wait_turn(api, running, statuses={"running"})
    queued = await post_turn(api, conversation["id"], "And then?")

    response = await api.post(turns_path(conversation),
                              json={"input": "Actually: by how much?", "if_busy": "interrupt"})

    assert response.status_code == 202, response.text
    new = response.json()
    assert new["status"] == "queued" and new["parent_turn_id"] == queued["id"]
    was_running, was_queued = await get_turn(api, running), await get_turn(api, queued)
    assert was_running["status"] == "cancelled" and was_running["upstream_may_continue"] is True
    assert was_queued["status"] == "cancelled" and was_queued["upstream_may_continue"] is False
    done = await wait_turn(api, new)
    assert done["status"] == "completed"
    # Its parent and grandparent were cancelled: it chains to the nearest completed ancestor.
    assert done["previous_interaction_id"] == answered["interaction_id"]
    # The cancels are events like any other, written before the new turn's turn.queued.
    events = [(e["type"], e["turn_id"]) for e in await events_of(api, conversation)][6:]
    assert events[:3] == [("turn.cancelled", queued["id"]), ("turn.cancelled", running["id"]),
                          ("turn.queued", new["id"])]


async def test_interrupt_of_an_idle_conversation_just_queues(api, worker):
    conversation = await create_conversation(api)
    done = await wait_turn(api, await post_turn(api, conversation["id"], "Q", if_busy="interrupt"))
    assert done["status"] == "completed"
    assert [e["type"] for e in await events_of(api, conversation)] == [
        "turn.queued", "turn.running", "turn.completed"]


async def test_interrupt_frees_the_open_turn_limit_it_would_otherwise_hit(api, resources):
    settings_of(resources, max_open_turns_per_conversation=2)
    conversation = await create_conversation(api)
    for question in ("one", "two"):
        await post_turn(api, conversation["id"], question)
    full = await api.post(turns_path(conversation), json={"input": "three"})
    assert assert_problem(full, 429)["type"] == "/problems/too-many-open-turns"
    replaced = await api.post(turns_path(conversation),
                              json={"input": "three", "if_busy": "interrupt"})
    assert replaced.status_code == 202, replaced.text
    assert [t["status"] for t in await turns_of(api, conversation)] == [
        "cancelled", "cancelled", "queued"]


async def test_a_refused_interrupt_cancels_nothing(api, database_url):
    # The cancels and the new turn are one transaction: when the new turn is refused (here an
    # unknown processor), the open turns stay as they were.
    conversation = await create_conversation(api)
    await post_turn(api, conversation["id"], "first")
    before = await snapshot(database_url)
    response = await api.post(turns_path(conversation), json={
        "input": "second", "processor": "no-such-processor", "if_busy": "interrupt"})
    assert assert_problem(response, 422)["errors"][0]["field"] == "processor"
    assert await snapshot(database_url) == before


async def test_concurrent_interrupts_leave_exactly_one_open_turn(api, worker):
    conversation = await create_conversation(api)
    first = await post_turn(api, conversation["id"], "[sandbox:slow=30] first")
    await wait_turn(api, first, statuses={"running"})

    responses = await asyncio.gather(*(
        api.post(turns_path(conversation),
                 json={"input": f"[sandbox:slow=3] instead {n}", "if_busy": "interrupt"})
        for n in range(10)
    ))

    assert [r.status_code for r in responses] == [202] * 10, [r.text for r in responses]
    turns = await turns_of(api, conversation)
    assert len(turns) == 11
    assert sorted(t["seq"] for t in turns) == list(range(1, 12))
    open_turns = [t for t in turns if t["status"] in ("queued", "running")]
    assert len(open_turns) == 1, [(t["seq"], t["status"]) for t in turns]
    # The survivor is the last one queued: each interrupt cancelled everything before it.
    assert open_turns[0]["seq"] == 11
    assert [t["status"] for t in turns[:10]] == ["cancelled"] * 10
    assert turns[0]["upstream_may_continue"] is True
    events = await events_of(api, conversation)
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    cancelled = [e["turn_id"] for e in events if e["type"] == "turn.cancelled"]
    assert sorted(cancelled) == sorted(t["id"] for t in turns[:10])  # each cancelled once
    assert (await wait_turn(api, open_turns[0]))["status"] == "completed"


async def test_a_late_result_of_an_interrupted_turn_is_recorded_nowhere(
    api, worker, sandbox, receiver
):
    conversation = await create_conversation(api, webhook_url=receiver.url)
    interrupted = await post_turn(api, conversation["id"], "[sandbox:slow=1.5] long research")
    await wait_turn(api, interrupted, statuses={"running"})
    new = await post_turn(api, conversation["id"], "Instead, this", if_busy="interrupt")
    assert (await wait_turn(api, new))["status"] == "completed"

    # Its Parallel run goes on and completes upstream; afterwards the follower has had every
    # chance to look at it: a further turn starts, runs and completes after that.
    await wait_until(lambda: sandbox_runs(sandbox.url, interrupted["id"])[0]["status"]
                     == "completed", 20, what="the interrupted turn's run to finish upstream")
    after = await wait_turn(api, await post_turn(api, conversation["id"], "And after?"))
    assert after["status"] == "completed"

    final = await get_turn(api, interrupted)
    assert final["status"] == "cancelled" and final["upstream_may_continue"] is True
    assert final["output"] is None and final["basis"] is None
    assert [e["type"] for e in await events_of(api, conversation)
            if e["turn_id"] == interrupted["id"]] == ["turn.queued", "turn.running",
                                                      "turn.cancelled"]
    requests = await receiver.wait_for(3)
    sent = [(b["type"], b["data"]["turn_id"])
            for b in (msgspec.json.decode(r.body) for r in requests)]
    assert sorted(sent) == sorted([("turn.cancelled", interrupted["id"]),
                                   ("turn.completed", new["id"]),
                                   ("turn.completed", after["id"])])
    deliveries = (await api.get(f"/v1/conversations/{conversation['id']}/webhook-deliveries")
                  ).json()["data"]
    assert len(deliveries) == 3


# Idempotency-Key ------------------------------------------------------------------------------


async def test_a_replay_answers_the_first_answer_whatever_the_state_now(api, database_url):
    # No worker: turns stay queued, so the conversation stays busy.
    conversation = await create_conversation(api)
    path = turns_path(conversation)
    first = await api.post(path, headers={"Idempotency-Key": "r1"},
                           json={"input": "Q1", "if_busy": "reject"})
    assert first.status_code == 202
    # Now busy (its own turn is queued): a reject replayed still answers the first 202.
    replay = await api.post(path, headers={"Idempotency-Key": "r1"},
                            json={"input": "Q1", "if_busy": "reject"})
    assert replay.status_code == 202 and replay.json() == first.json()

    interrupt = await api.post(path, headers={"Idempotency-Key": "i1"},
                               json={"input": "Q2", "if_busy": "interrupt"})
    assert interrupt.status_code == 202
    assert (await get_turn(api, first.json()))["status"] == "cancelled"
    before = await snapshot(database_url)
    # Replaying the interrupt answers its first answer and cancels nothing again: its own
    # turn, the open one now, stays queued.
    again = await api.post(path, headers={"Idempotency-Key": "i1"},
                           json={"input": "Q2", "if_busy": "interrupt"})
    assert again.status_code == 202 and again.json() == interrupt.json()
    assert (await get_turn(api, interrupt.json()))["status"] == "queued"
    assert await snapshot(database_url) == before

    # The same key with another if_busy is another body: 409 as for any other difference.
    other = await api.post(path, headers={"Idempotency-Key": "i1"},
                           json={"input": "Q2", "if_busy": "reject"})
    assert assert_problem(other, 409)["type"] == "/problems/conflict"
    assert await snapshot(database_url) == before


async def test_a_replay_answers_the_first_answer_after_the_turn_completed(api, worker):
    conversation = await create_conversation(api)
    path = turns_path(conversation)
    body = {"input": "[sandbox:slow=0.5] Q", "if_busy": "interrupt"}
    first = await api.post(path, headers={"Idempotency-Key": "done-1"}, json=body)
    await wait_turn(api, first.json())
    busy = await post_turn(api, conversation["id"], "[sandbox:slow=30] now busy")
    await wait_turn(api, busy, statuses={"running"})
    replay = await api.post(path, headers={"Idempotency-Key": "done-1"}, json=body)
    assert replay.status_code == 202 and replay.json() == first.json()
    assert (await get_turn(api, busy))["status"] == "running"  # not interrupted by the replay

