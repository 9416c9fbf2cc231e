"""Bad input is a clear 4xx problem+json, and nothing is written."""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import new_key
from tests.helpers import create_conversation, forgotten, post_turn

TOO_DEEP = {"type": "object", "properties": {"a": {"type": "object", "properties": {
    "b": {"type": "object", "properties": {"c": {"type": "object", "properties": {
        "d": {"type": "string"}}}}}}}}}


async def counts(database_url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(database_url)
    try:
        return (await conn.fetchval("SELECT count(*) FROM turn"),
                await conn.fetchval("SELECT count(*) FROM event"))
    finally:
        await conn.close()


def assert_problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert body["status"] == status
    assert "Traceback" not in response.text
    return body


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({}, 422, "input"),
        ({"input": ""}, 422, "input"),
        ({"input": {}}, 422, "input"),
        ({"input": None}, 422, "input"),
        ({"input": 42}, 422, "input"),
        ({"input": ["a"]}, 422, "input"),
        ({"input": "ok", "surprise": 1}, 422, None),
        ({"input": "x" * 25_001}, 422, "input"),
        ({"input": "ok", "processor": "warp-drive"}, 422, "processor"),
        ({"input": "ok", "processor": 5}, 422, "processor"),
        ({"input": "ok", "output_schema": {"type": "xml"}}, 422, None),
        ({"input": "ok", "output_schema": {"type": "json"}}, 422, None),
        ({"input": "ok", "output_schema": {"type": "json", "json_schema": {"type": "string"}}},
         422, "output_schema.json_schema"),
        ({"input": "ok", "output_schema": {"type": "json", "json_schema": TOO_DEEP}},
         422, "output_schema.json_schema"),
        ({"input": "ok", "output_schema": "text"}, 422, None),
        ({"input": "ok", "metadata": {"a-key-longer-than-16": "v"}}, 422, None),
        ({"input": "ok", "metadata": {"k": "v" * 513}}, 422, None),
        ({"input": "ok", "metadata": {"k": 1}}, 422, None),
        ({"input": "ok", "parent_turn_id": "turn_nope"}, 422, "parent_turn_id"),
    ],
)
async def test_bad_turn_bodies_are_refused_and_nothing_is_written(
    api, database_url, body, status, field
):
    conversation = await create_conversation(api)
    before = await counts(database_url)
    response = await api.post(f"/v1/conversations/{conversation['id']}/turns", json=body)
    problem = assert_problem(response, status)
    if field is not None:
        assert any(e["field"] == field for e in problem["errors"]), problem
    assert await counts(database_url) == before


async def test_input_at_the_limit_is_accepted(api):
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "x" * 25_000)
    assert len(turn["input"]) == 25_000


async def test_malformed_json_is_400(api):
    conversation = await create_conversation(api)
    response = await api.post(f"/v1/conversations/{conversation['id']}/turns",
                              content=b'{"input": "unterminated',
                              headers={"content-type": "application/json"})
    assert_problem(response, 400)


async def test_oversized_body_is_413(api):
    conversation = await create_conversation(api)
    response = await api.post(f"/v1/conversations/{conversation['id']}/turns",
                              json={"input": "x" * 2_000_000})
    assert_problem(response, 413)


async def test_unknown_conversation_is_404(api, database_url):
    response = await api.post("/v1/conversations/conv_missing/turns", json={"input": "hello"})
    assert_problem(response, 404)
    assert_problem(await api.get("/v1/conversations/conv_missing"), 404)
    assert_problem(await api.get("/v1/conversations/conv_missing/turns"), 404)
    assert_problem(await api.get("/v1/conversations/conv_missing/events"), 404)
    assert await counts(database_url) == (0, 0)


@pytest.mark.parametrize("cursor", ["garbage", "WzVd!", "eyJ4Ijp0cnVlfQ"])
async def test_bad_cursor_is_400(api, cursor):
    conversation = await create_conversation(api)
    assert_problem(await api.get(f"/v1/conversations/{conversation['id']}/turns",
                                 params={"cursor": cursor}), 400)
    assert_problem(await api.get("/v1/conversations", params={"cursor": cursor}), 400)


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"limit": "ten"}])
async def test_bad_page_size_is_refused(api, params):
    response = await api.get("/v1/conversations", params=params)
    assert 400 <= response.status_code < 500
    assert_problem(response, response.status_code)


@pytest.mark.parametrize("wait", ["-1", "61", "soon"])
async def test_bad_wait_is_refused(api, wait):
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "q")
    response = await api.get(f"/v1/conversations/{conversation['id']}/turns/{turn['id']}",
                             params={"wait": wait})
    assert_problem(response, response.status_code)
    assert 400 <= response.status_code < 500


@pytest.mark.parametrize(
    "body",
    [{"title": 5}, {"processor": "nope"}, {"metadata": {"k": 5}}, {"webhook_url": "ftp://x"},
     {"webhook_url": "not a url"}, {"unknown": True}, {"title": "t" * 201}],
)
async def test_bad_conversation_bodies_are_refused(api, database_url, body):
    response = await api.post("/v1/conversations", json=body)
    assert_problem(response, 422)
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM conversation") == 0
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer"}, {"Authorization": "Basic abc"},
     {"Authorization": "Bearer rsk_nope_nope"}, {"Authorization": "Bearer " + "x" * 5000}],
)
async def test_missing_or_wrong_api_key_is_401(client, headers):
    for method, path in [("GET", "/v1/conversations"), ("POST", "/v1/conversations"),
                         ("GET", "/v1/conversations/conv_x/turns/turn_y"),
                         ("POST", "/v1/conversations/conv_x/turns")]:
        response = await client.request(method, path, headers=headers, json={"input": "x"})
        assert_problem(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"


async def test_a_revoked_key_is_refused_on_the_next_request(client, resources):
    from service.db.keys import revoke_key, split_key

    key = await new_key(resources, "acme")
    headers = {"Authorization": f"Bearer {key}"}
    assert (await client.get("/v1/conversations", headers=headers)).status_code == 200
    async with resources.pool.acquire() as conn:
        assert await revoke_key(conn, split_key(key))
    await forgotten(resources, key)  # the API process has Postgres's notification of it
    assert_problem(await client.get("/v1/conversations", headers=headers), 401)


async def test_another_tenants_ids_are_404(api, client, resources, worker):
    conversation = await create_conversation(api, webhook_url="https://example.com/hook")
    turn = await post_turn(api, conversation["id"], "mine")
    other = {"Authorization": f"Bearer {await new_key(resources, 'globex')}"}
    base = f"/v1/conversations/{conversation['id']}"
    for method, path, body in [
        ("GET", base, None), ("PATCH", base, {"title": "stolen"}), ("DELETE", base, None),
        ("GET", f"{base}/turns", None), ("POST", f"{base}/turns", {"input": "x"}),
        ("GET", f"{base}/turns/{turn['id']}", None),
        ("POST", f"{base}/turns/{turn['id']}/cancel", None),
        ("GET", f"{base}/events", None), ("POST", f"{base}/webhook-secret/rotate", None),
    ]:
        response = await client.request(method, path, headers=other, json=body)
        assert_problem(response, 404)
    assert (await client.get("/v1/conversations", headers=other)).json()["data"] == []
    mine = (await api.get(base)).json()
    assert mine["title"] is None and mine["turn_count"] == 1
