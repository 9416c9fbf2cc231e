"""Conversation routes: create, list, read, change, rotate, delete."""

from __future__ import annotations

import asyncpg

from tests.helpers import create_conversation, post_turn, sandbox_runs, wait_turn


async def test_create_returns_the_conversation_and_a_secret_only_with_a_webhook(api):
    plain = await create_conversation(api, title="t", metadata={"team": "risk"})
    assert "webhook_secret" not in plain
    assert plain["title"] == "t" and plain["metadata"] == {"team": "risk"}
    assert plain["processor"] == "lite" and plain["status"] == "idle"
    assert plain["turn_count"] == 0 and plain["last_turn_id"] is None
    hooked = await create_conversation(api, webhook_url="https://example.com/hook")
    assert hooked["webhook_secret"].startswith("whsec_")
    fetched = (await api.get(f"/v1/conversations/{hooked['id']}")).json()
    assert "webhook_secret" not in fetched
    assert fetched["webhook_url"] == "https://example.com/hook"


async def test_list_is_newest_first_and_pages_with_cursors(api):
    ids = [(await create_conversation(api, title=str(i)))["id"] for i in range(5)]
    first = (await api.get("/v1/conversations", params={"limit": 2})).json()
    second = (await api.get("/v1/conversations",
                            params={"limit": 2, "cursor": first["next_cursor"]})).json()
    third = (await api.get("/v1/conversations",
                           params={"limit": 2, "cursor": second["next_cursor"]})).json()
    seen = [c["id"] for c in first["data"] + second["data"] + third["data"]]
    assert seen == list(reversed(ids))
    assert third["next_cursor"] is None


async def test_patch_changes_only_what_is_sent_and_gives_a_secret_once(api):
    conversation = await create_conversation(api, title="before", metadata={"a": "1"})
    path = f"/v1/conversations/{conversation['id']}"
    changed = (await api.patch(path, json={"title": "after"})).json()
    assert changed["title"] == "after" and changed["metadata"] == {"a": "1"}
    assert "webhook_secret" not in changed
    hooked = (await api.patch(path, json={"webhook_url": "https://example.com/h"})).json()
    assert hooked["webhook_secret"].startswith("whsec_")
    again = (await api.patch(path, json={"webhook_url": "https://example.com/other"})).json()
    assert "webhook_secret" not in again
    cleared = (await api.patch(path, json={"title": None, "processor": "core"})).json()
    assert cleared["title"] is None and cleared["processor"] == "core"
    assert (await api.patch(path, json={"processor": None})).status_code == 422


async def test_rotate_gives_a_new_secret_and_needs_a_webhook(api):
    hooked = await create_conversation(api, webhook_url="https://example.com/hook")
    rotated = await api.post(f"/v1/conversations/{hooked['id']}/webhook-secret/rotate")
    assert rotated.status_code == 200
    assert rotated.json()["webhook_secret"].startswith("whsec_")
    assert rotated.json()["webhook_secret"] != hooked["webhook_secret"]
    plain = await create_conversation(api)
    rotated = await api.post(f"/v1/conversations/{plain['id']}/webhook-secret/rotate")
    assert rotated.status_code == 422


async def test_status_is_active_while_a_turn_is_open(api, worker):
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "q")
    current = (await api.get(f"/v1/conversations/{conversation['id']}")).json()
    assert current["status"] == "active"
    assert current["turn_count"] == 1 and current["last_turn_id"] == turn["id"]
    await wait_turn(api, turn)
    assert (await api.get(f"/v1/conversations/{conversation['id']}")).json()["status"] == "idle"


async def test_delete_cancels_open_turns_then_removes_everything(
    api, worker, sandbox, database_url
):
    conversation = await create_conversation(api)
    done = await wait_turn(api, await post_turn(api, conversation["id"], "kept until delete"))
    running = await post_turn(api, conversation["id"], "[sandbox:slow=3] in flight")
    await wait_turn(api, running, statuses={"running"})
    response = await api.delete(f"/v1/conversations/{conversation['id']}")
    assert response.status_code == 204
    assert (await api.get(f"/v1/conversations/{conversation['id']}")).status_code == 404
    assert (await api.delete(f"/v1/conversations/{conversation['id']}")).status_code == 404
    conn = await asyncpg.connect(database_url)
    try:
        for table in ("turn", "event"):
            assert await conn.fetchval(
                f"SELECT count(*) FROM {table} WHERE conversation_id = $1", conversation["id"]) == 0
    finally:
        await conn.close()
    assert len(sandbox_runs(sandbox.url, done["id"])) == 1
