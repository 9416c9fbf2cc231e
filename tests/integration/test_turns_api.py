"""Turn routes: idempotency, cancel, long-poll, events, and the turn a client sees."""

from __future__ import annotations

import asyncio
import time

from tests.helpers import create_conversation, post_turn, sandbox_runs, wait_turn, wait_until


async def test_create_answers_202_with_location_and_a_queued_turn(api):
    conversation = await create_conversation(api)
    response = await api.post(f"/v1/conversations/{conversation['id']}/turns",
                              json={"input": "Why is the sky blue?", "metadata": {"k": "v"}})
    assert response.status_code == 202
    turn = response.json()
    location = f"/v1/conversations/{conversation['id']}/turns/{turn['id']}"
    assert response.headers["location"] == location
    assert turn["status"] == "queued"
    assert turn["seq"] == 1
    assert turn["processor"] == "lite"
    assert turn["output_schema"] == {"type": "text"}
    assert turn["metadata"] == {"k": "v"}
    assert turn["run_id"] is None and turn["output"] is None and turn["error"] is None
    assert turn["upstream_may_continue"] is False
    fetched = await api.get(response.headers["location"])
    assert fetched.json() == turn


async def test_same_idempotency_key_creates_one_turn_and_one_run(api, worker, sandbox):
    conversation = await create_conversation(api)
    path = f"/v1/conversations/{conversation['id']}/turns"
    headers = {"Idempotency-Key": "order-42"}
    first = await api.post(path, json={"input": "Once only"}, headers=headers)
    second = await api.post(path, json={"input": "Once only"}, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()

    done = await wait_turn(api, first.json())
    again = await api.post(path, json={"input": "Once only"}, headers=headers)
    assert again.json()["id"] == done["id"]
    listed = (await api.get(path)).json()["data"]
    assert [t["id"] for t in listed] == [done["id"]]
    assert len(sandbox_runs(sandbox.url, done["id"])) == 1


async def test_same_idempotency_key_with_another_body_is_409(api):
    conversation = await create_conversation(api)
    path = f"/v1/conversations/{conversation['id']}/turns"
    await api.post(path, json={"input": "First"}, headers={"Idempotency-Key": "k1"})
    response = await api.post(path, json={"input": "Second"}, headers={"Idempotency-Key": "k1"})
    assert response.status_code == 409
    assert response.headers["content-type"].startswith("application/problem+json")
    assert len((await api.get(path)).json()["data"]) == 1


async def test_concurrent_requests_with_one_idempotency_key_create_one_turn(api):
    conversation = await create_conversation(api)
    path = f"/v1/conversations/{conversation['id']}/turns"
    responses = await asyncio.gather(*(
        api.post(path, json={"input": "Race"}, headers={"Idempotency-Key": "same"})
        for _ in range(5)
    ))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1


async def test_cancel_a_queued_turn(api):
    # No worker runs here, so the turn stays queued until cancelled.
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "Never mind")
    path = f"/v1/conversations/{conversation['id']}/turns/{turn['id']}/cancel"
    response = await api.post(path)
    assert response.status_code == 200
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["upstream_may_continue"] is False
    assert cancelled["completed_at"] is not None
    assert (await api.post(path)).json()["status"] == "cancelled"  # idempotent


async def test_cancel_a_running_turn_ignores_its_late_result(api, worker, sandbox):
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "[sandbox:slow=1.0] long research")
    await wait_turn(api, turn, statuses={"running"})
    response = await api.post(f"/v1/conversations/{conversation['id']}/turns/{turn['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.json()["upstream_may_continue"] is True

    # Let the upstream run finish, then give the follower time to look at it again: the turn
    # must stay cancelled (this sleep checks that nothing happens).
    await wait_until(lambda: sandbox_runs(sandbox.url, turn["id"])[0]["status"] == "completed",
                     10, what="the upstream run to finish")
    await asyncio.sleep(1.0)
    final = (await api.get(f"/v1/conversations/{conversation['id']}/turns/{turn['id']}")).json()
    assert final["status"] == "cancelled"
    assert final["output"] is None and final["basis"] is None
    events = (await api.get(f"/v1/conversations/{conversation['id']}/events")).json()["data"]
    assert [e["type"] for e in events] == ["turn.queued", "turn.running", "turn.cancelled"]


async def test_cancel_lets_the_next_turn_run(api, worker):
    conversation = await create_conversation(api)
    slow = await post_turn(api, conversation["id"], "[sandbox:slow=5] very slow")
    following = await post_turn(api, conversation["id"], "next")
    await api.post(f"/v1/conversations/{conversation['id']}/turns/{slow['id']}/cancel")
    done = await wait_turn(api, following)
    assert done["status"] == "completed"
    assert done["previous_interaction_id"] is None  # the cancelled turn gave no context


async def test_cancel_of_a_completed_turn_is_409(api, worker):
    conversation = await create_conversation(api)
    turn = await wait_turn(api, await post_turn(api, conversation["id"], "Quick"))
    response = await api.post(f"/v1/conversations/{conversation['id']}/turns/{turn['id']}/cancel")
    assert response.status_code == 409
    assert response.json()["status"] == 409


async def test_wait_returns_as_soon_as_the_turn_ends(api, worker):
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "Fast one")
    started = time.monotonic()
    response = await api.get(f"/v1/conversations/{conversation['id']}/turns/{turn['id']}",
                             params={"wait": 20})
    assert response.json()["status"] == "completed"
    assert time.monotonic() - started < 10


async def test_wait_runs_out_and_answers_the_turn_as_it_is(api):
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "Nobody will run this")
    started = time.monotonic()
    response = await api.get(f"/v1/conversations/{conversation['id']}/turns/{turn['id']}",
                             params={"wait": 1})
    assert response.status_code == 200
    assert response.json()["status"] == "queued"
    assert 0.9 <= time.monotonic() - started < 5


async def test_events_list_every_status_change_in_order(api, worker):
    conversation = await create_conversation(api)
    turn = await wait_turn(api, await post_turn(api, conversation["id"], "Q"))
    page = (await api.get(f"/v1/conversations/{conversation['id']}/events")).json()
    assert [e["type"] for e in page["data"]] == ["turn.queued", "turn.running", "turn.completed"]
    assert [e["sequence"] for e in page["data"]] == [1, 2, 3]
    assert page["data"][-1]["data"] == turn
    assert all(e["turn_id"] == turn["id"] for e in page["data"])
    after = (await api.get(f"/v1/conversations/{conversation['id']}/events",
                           params={"after": 2})).json()
    assert [e["sequence"] for e in after["data"]] == [3]
    first = (await api.get(f"/v1/conversations/{conversation['id']}/events",
                           params={"limit": 1})).json()
    assert [e["sequence"] for e in first["data"]] == [1]
    rest = (await api.get(f"/v1/conversations/{conversation['id']}/events",
                          params={"after": first["next_cursor"]})).json()
    assert [e["sequence"] for e in rest["data"]] == [2, 3]


async def test_turn_pages_are_oldest_first_with_cursors(api):
    conversation = await create_conversation(api)
    for i in range(5):
        await post_turn(api, conversation["id"], f"q{i}")
    path = f"/v1/conversations/{conversation['id']}/turns"
    first = (await api.get(path, params={"limit": 2})).json()
    second = (await api.get(path, params={"limit": 2, "cursor": first["next_cursor"]})).json()
    third = (await api.get(path, params={"limit": 2, "cursor": second["next_cursor"]})).json()
    assert [t["seq"] for t in first["data"] + second["data"] + third["data"]] == [1, 2, 3, 4, 5]
    assert third["next_cursor"] is None
