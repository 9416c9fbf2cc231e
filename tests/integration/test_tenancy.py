"""Isolation on every /v1 route: no key, a malformed header or a revoked key is 401, another
tenant's key is 404 (as an unknown id is), and the owner's data is unchanged afterwards.

The routes come from the app's own OpenAPI document, so a new route joins the matrix by itself;
a route with a path id this file cannot fill fails loudly instead of going untested.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import asyncpg
import pytest

from service.db.keys import revoke_key, split_key
from service.devstack import free_port
from service.openapi import render
from tests.helpers import (
    assert_problem,
    create_conversation,
    new_key,
    post_turn,
    running_worker,
    wait_turn,
)

UNAUTHENTICATED = ("/v1/hooks/",)
# A valid body per operation, so that an answer is about the key, not the body.
BODIES: dict[str, Any] = {
    "CreateConversation": {"title": "theirs"},
    "UpdateConversation": {"title": "stolen"},
    "CreateTurn": {"input": "sneaky"},
}
MALFORMED = ["Basic YWxhZGRpbjpvcGVu", "Bearer", "Bearer    ", "Token {key}", "Bearer {key}x",
             "Bearer rsk_", "Bearer rsk_abc_", "Bearer " + "rsk_a_" + "x" * 300, "{key}"]


def operations() -> list[tuple[str, str, str]]:
    """(method, path template, operationId) of every authenticated /v1 route."""
    paths = json.loads(render())["paths"]
    return sorted(
        (method.upper(), path, op["operationId"])
        for path, ops in paths.items() if path.startswith("/v1/")
        and not path.startswith(UNAUTHENTICATED)
        for method, op in ops.items()
    )


async def snapshot(database_url: str, tenant_id: str) -> dict[str, list[str]]:
    """Every row the tenant owns, in every table (rows naming a tenant or a conversation)."""
    conn = await asyncpg.connect(database_url)
    try:
        conversations = [r["id"] for r in await conn.fetch(
            "SELECT id FROM conversation WHERE tenant_id = $1", tenant_id)]
        tables = await conn.fetch(
            "SELECT table_name, array_agg(column_name::text) AS columns"
            " FROM information_schema.columns WHERE table_schema = 'public'"
            " AND table_name <> 'schema_migration' GROUP BY table_name")
        state: dict[str, list[str]] = {}
        for table in tables:
            columns, name = table["columns"], table["table_name"]
            if "tenant_id" in columns:
                where, arg = "tenant_id = $1", tenant_id
            elif "conversation_id" in columns:
                where, arg = "conversation_id = ANY($1::text[])", conversations
            else:
                where, arg = "$1::text IS NOT NULL", ""
            rows = await conn.fetch(
                f'SELECT to_jsonb(x)::text AS row FROM "{name}" x WHERE {where}', arg)
            state[name] = sorted(r["row"] for r in rows)
        return state
    finally:
        await conn.close()


async def delivery_of(settings, api, conversation: dict[str, Any]) -> str:
    """A webhook delivery of the conversation: a turn run to its end by a short-lived worker."""
    async with running_worker(settings):
        await wait_turn(api, await post_turn(api, conversation["id"], "for a delivery"))
        path = f"/v1/conversations/{conversation['id']}/webhook-deliveries"
        for _ in range(100):
            data = (await api.get(path)).json()["data"]
            if data:
                return str(data[0].get("id") or data[0]["delivery_id"])
            await asyncio.sleep(0.05)
        raise AssertionError("no webhook delivery was listed")


@pytest.fixture
async def world(api, api_key, client, resources, settings, database_url) -> dict[str, Any]:
    """acme's conversation, its queued turn and (when routes need one) a webhook delivery."""
    conversation = await create_conversation(api, webhook_url=f"http://127.0.0.1:{free_port()}/hook",
                                             metadata={"owner": "acme"})
    ids = {"conversation_id": conversation["id"]}
    if any("{delivery_id}" in path for _, path, _ in operations()):
        ids["delivery_id"] = await delivery_of(settings, api, conversation)
    ids["turn_id"] = (await post_turn(api, conversation["id"], "a queued question"))["id"]
    revoked = await new_key(resources, "acme")
    async with resources.pool.acquire() as conn:
        assert await revoke_key(conn, split_key(revoked))
        tenant_id = await conn.fetchval("SELECT id FROM tenant WHERE name = 'acme'")
    del client.headers["Authorization"]  # each request below brings its own
    return {"ids": ids, "key": api_key, "revoked": revoked, "tenant_id": tenant_id,
            "other": await new_key(resources, "globex")}


def fill(path: str, ids: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in ids, f"no id for {{{name}}} in {path}: teach test_tenancy.world to make one"
        return ids[name]

    return re.sub(r"\{(\w+)\}", one, path)


async def send(client, method: str, path: str, operation: str, auth: str | None,
               **headers: str):
    if auth is not None:
        headers["Authorization"] = auth
    body = BODIES.get(operation) if method in ("POST", "PATCH", "PUT") else None
    return await client.request(method, path, json=body, headers=headers)


async def queued_jobs(resources) -> int:
    return await resources.queue.zcard(resources.settings.queue_name)


async def check_unchanged(world, database_url, resources, attempt) -> None:
    before = await snapshot(database_url, world["tenant_id"]), await queued_jobs(resources)
    assert before[0]["conversation"] and before[0]["turn"] and before[0]["event"]
    await attempt()
    after = await snapshot(database_url, world["tenant_id"]), await queued_jobs(resources)
    assert after == before


@pytest.mark.parametrize("case", ["no key", "malformed", "revoked"])
async def test_without_a_valid_key_every_route_is_401(client, world, database_url, resources, case):
    ops = operations()
    assert len(ops) >= 12
    assert {"ListSources", "GetTranscript"} <= {operation for *_, operation in ops}

    async def attempt() -> None:
        if case == "no key":
            auths = [None]
        elif case == "revoked":
            auths = [f"Bearer {world['revoked']}"]
        else:
            auths = [m.format(key=world["key"]) for m in MALFORMED]
        for method, template, operation in ops:
            for auth in auths:
                response = await send(client, method, fill(template, world["ids"]), operation, auth)
                assert response.status_code == 401, (method, template, auth, response.text)
                assert_problem(response, 401)
                assert response.headers["www-authenticate"] == "Bearer"

    await check_unchanged(world, database_url, resources, attempt)


async def test_another_tenants_key_finds_nothing_of_ours(client, world, database_url, resources):
    other = f"Bearer {world['other']}"
    owned = list(world["ids"].values())

    async def attempt() -> None:
        for method, template, operation in operations():
            path = fill(template, world["ids"])
            response = await send(client, method, path, operation, other)
            if "{" in template:
                assert response.status_code == 404, (method, template, response.text)
                assert_problem(response, 404)
            else:  # their own collection: fine to use, and none of ours in it
                assert response.status_code < 300, (method, template, response.text)
                assert not any(i in response.text for i in owned), (method, template)
        # Nor when they look for ours by its metadata or its status (it has a queued turn).
        for query in ("metadata.owner=acme", "status=active", "status=active&metadata.owner=acme",
                      "status=idle"):
            response = await send(client, "GET", f"/v1/conversations?{query}", "", other)
            assert response.status_code == 200, (query, response.text)
            assert not any(i in response.text for i in owned), query
        # The event stream, as SSE, is refused the same way.
        stream = await send(client, "GET", fill("/v1/conversations/{conversation_id}/events",
                                                world["ids"]), "", other,
                            accept="text/event-stream")
        assert_problem(stream, 404)
        # So is the transcript as markdown, and with our turn's id.
        transcript = await send(
            client, "GET", fill("/v1/conversations/{conversation_id}/transcript?turn_id={turn_id}",
                                world["ids"]), "", other, accept="text/markdown")
        assert_problem(transcript, 404)

    await check_unchanged(world, database_url, resources, attempt)
    # An unknown id answers exactly as another tenant's does.
    unknown = await send(client, "GET", "/v1/conversations/conv_000000000000000000000000", "",
                         other)
    theirs = await send(client, "GET", fill("/v1/conversations/{conversation_id}", world["ids"]),
                        "", other)
    assert unknown.status_code == theirs.status_code == 404
    assert unknown.json()["title"] == theirs.json()["title"]


async def test_the_owner_still_sees_everything(client, world):
    headers = {"Authorization": f"Bearer {world['key']}"}
    conversation_id = world["ids"]["conversation_id"]
    mine = (await client.get(f"/v1/conversations/{conversation_id}", headers=headers)).json()
    assert mine["title"] is None and mine["metadata"] == {"owner": "acme"}
    found = await client.get("/v1/conversations", headers=headers,
                             params={"metadata.owner": "acme", "status": "active"})
    assert [c["id"] for c in found.json()["data"]] == [conversation_id]
    turn = await client.get(f"/v1/conversations/{conversation_id}/turns/{world['ids']['turn_id']}",
                            headers=headers)
    assert turn.json()["status"] == "queued"


async def test_parent_turn_id_must_be_a_turn_of_this_conversation(api, client, resources,
                                                                  database_url):
    first = await create_conversation(api)
    second = await create_conversation(api)
    mine = await post_turn(api, first["id"], "in the first conversation")
    other = {"Authorization": f"Bearer {await new_key(resources, 'globex')}"}
    theirs = (await client.post("/v1/conversations", json={}, headers=other)).json()
    their_turn = (await client.post(f"/v1/conversations/{theirs['id']}/turns",
                                    json={"input": "theirs"}, headers=other)).json()
    for parent in (mine["id"], their_turn["id"], "turn_unknown"):
        problem = assert_problem(await api.post(
            f"/v1/conversations/{second['id']}/turns",
            json={"input": "branch", "parent_turn_id": parent}), 422)
        assert [e["field"] for e in problem["errors"]] == ["parent_turn_id"]
    # Their conversation cannot adopt our turn either.
    problem = assert_problem(await client.post(
        f"/v1/conversations/{theirs['id']}/turns",
        json={"input": "branch", "parent_turn_id": mine["id"]}, headers=other), 422)
    assert (await api.get(f"/v1/conversations/{second['id']}/turns")).json()["data"] == []
