"""Bad input is a clear 4xx problem+json, and nothing is written."""

from __future__ import annotations

import asyncpg
import pytest

from tests.helpers import create_conversation, forgotten, new_key, post_turn

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


@pytest.mark.parametrize("body", [{"input": "x" * 25_001}, {"input": "ok", "processor": "warp"}])
async def test_an_unknown_conversation_is_told_before_a_bad_body(api, database_url, body):
    """The body is checked before the turn's one statement; a missing conversation still comes
    first, as for every request about a conversation."""
    response = await api.post("/v1/conversations/conv_missing/turns", json=body)
    assert_problem(response, 404)
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


@pytest.mark.parametrize("wait", ["-1", "61", "soon", "nan", "inf", "-inf", "1e400", "%00"])
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


# --- Text Postgres cannot store, numbers past its columns (none of them may be a 5xx) ---

async def written(database_url: str) -> tuple[int, ...]:
    """Rows and the newest row version of every table a request may write: an INSERT, UPDATE
    or DELETE committed by the request changes it."""
    conn = await asyncpg.connect(database_url)
    try:
        return tuple(await conn.fetchrow(
            "SELECT (SELECT count(*) FROM conversation), (SELECT count(*) FROM turn),"
            " (SELECT count(*) FROM event),"
            " (SELECT coalesce(max(xmin::text::bigint), 0) FROM conversation),"
            " (SELECT coalesce(max(xmin::text::bigint), 0) FROM turn)"))
    finally:
        await conn.close()


NUL_TURN_BODIES = [
    {"input": "a\x00b"},
    {"input": {"question\x00": "q"}},
    {"input": {"question": ["fine", {"deep": "x\x00"}]}},
    {"input": "ok", "metadata": {"k\x00": "v"}},
    {"input": "ok", "metadata": {"k": "v\x00"}},
    {"input": "ok", "output_schema": {"type": "text", "description": "d\x00"}},
    {"input": "ok", "output_schema": {"type": "json", "json_schema": {
        "type": "object", "properties": {"a\x00": {"type": "string"}}}}},
    {"input": "ok", "parent_turn_id": "turn_\x00"},
]


@pytest.mark.parametrize("body", NUL_TURN_BODIES)
async def test_a_nul_anywhere_in_a_turn_body_is_422_and_writes_nothing(api, database_url, body):
    conversation = await create_conversation(api)
    before = await written(database_url)
    problem = assert_problem(
        await api.post(f"/v1/conversations/{conversation['id']}/turns", json=body), 422)
    assert problem["errors"][0]["message"] == "contains NUL or an unpaired surrogate"
    assert await written(database_url) == before


@pytest.mark.parametrize("body", [
    {"title": "t\x00"}, {"metadata": {"k\x00": "v"}}, {"metadata": {"k": "\x00"}},
    {"webhook_url": "https://example.com/\x00"},
])
async def test_a_nul_in_a_conversation_body_is_422_on_create_and_on_patch(
    api, database_url, body
):
    conversation = await create_conversation(api, title="kept")
    before = await written(database_url)
    assert_problem(await api.post("/v1/conversations", json=body), 422)
    assert_problem(await api.patch(f"/v1/conversations/{conversation['id']}", json=body), 422)
    assert await written(database_url) == before
    assert (await api.get(f"/v1/conversations/{conversation['id']}")).json()["title"] == "kept"


@pytest.mark.parametrize("raw", [
    b'{"input": "\xff"}', b'{"input": "caf\xc3"}', b'{"input": "\xed\xa0\x80"}',
    b'{"input": "ok", "metadata": {"\xfe": "v"}}', b'{"input": "\\ud800"}',
])
async def test_a_body_that_is_not_utf8_is_400(api, database_url, raw):
    conversation = await create_conversation(api)
    before = await written(database_url)
    for method, path in [("POST", f"/v1/conversations/{conversation['id']}/turns"),
                         ("POST", "/v1/conversations"),
                         ("PATCH", f"/v1/conversations/{conversation['id']}")]:
        response = await api.request(method, path, content=raw,
                                     headers={"content-type": "application/json"})
        assert_problem(response, 400)
    assert await written(database_url) == before


@pytest.mark.parametrize("bad", ["%00", "x%00y", "%FF", "%ED%A0%80", "%C3"])
async def test_nul_or_invalid_utf8_in_a_path_id_is_400(api, database_url, bad):
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "q")
    before = await written(database_url)
    base = f"/v1/conversations/{conversation['id']}"
    for method, path in [
        ("GET", f"/v1/conversations/conv_{bad}"), ("PATCH", f"/v1/conversations/{bad}"),
        ("DELETE", f"/v1/conversations/conv{bad}"), ("POST", f"/v1/conversations/{bad}/turns"),
        ("GET", f"{base}/turns/turn_{bad}"), ("POST", f"{base}/turns/{bad}/cancel"),
        ("GET", f"/v1/conversations/{bad}/events"), ("GET", f"/v1/conversations/{bad}/sources"),
        ("GET", f"/v1/conversations/{bad}/webhook-deliveries"),
        ("POST", f"/v1/webhook-deliveries/{bad}/redeliver"),
        ("POST", f"/v1/conversations/{bad}/webhook-secret/rotate"),
        ("POST", f"{base}/turns/{turn['id']}{bad}/cancel"),
    ]:
        body = {"input": "x"} if method == "POST" else {"title": "x"} if method == "PATCH" else None
        response = await api.request(method, path, json=body)
        assert 400 <= response.status_code < 500, (method, path, response.text)
        if response.status_code != 404:  # a route that does not exist at all is 404 too
            assert_problem(response, 400)
    assert await written(database_url) == before


@pytest.mark.parametrize("query", [
    "cursor=%00", "cursor=abc%00", "limit=%00", "cursor=%FF", "limit=1&x=%C3%28",
])
async def test_nul_or_invalid_utf8_in_the_query_is_400(api, query):
    conversation = await create_conversation(api)
    for path in ("/v1/conversations", f"/v1/conversations/{conversation['id']}/turns",
                 f"/v1/conversations/{conversation['id']}/events"):
        assert_problem(await api.get(f"{path}?{query}"), 400)


@pytest.mark.parametrize("value", [b"key\x00", b"\xff\xfe", b"caf\xc3"])
async def test_nul_or_invalid_utf8_in_a_header_is_400(api, database_url, value):
    conversation = await create_conversation(api)
    before = await written(database_url)
    response = await api.post(f"/v1/conversations/{conversation['id']}/turns",
                              json={"input": "q"}, headers={"Idempotency-Key": value})
    assert_problem(response, 400)
    response = await api.get("/v1/conversations", headers={"Authorization": b"Bearer rsk_" + value})
    assert_problem(response, 400)
    assert await written(database_url) == before


def cursor_of(*values) -> str:
    from service.domain.cursors import encode_cursor

    return encode_cursor(*values)


@pytest.mark.parametrize("number", [2**31, 2**63, 2**64, -1])
async def test_cursors_past_the_column_range_are_400(api, number):
    conversation = await create_conversation(api)
    base = f"/v1/conversations/{conversation['id']}"
    assert_problem(await api.get(f"{base}/turns", params={"cursor": cursor_of(number)}), 400)
    assert_problem(await api.get(f"{base}/webhook-deliveries",
                                 params={"cursor": cursor_of(number * 2**32)}), 400)
    assert_problem(await api.get(f"{base}/events", params={"cursor": str(number * 2**32)}), 400)


@pytest.mark.parametrize("values", [
    ("9999-12-31T23:59:59-23:59", "conv_x"), ("0001-01-01T00:00:00+23:59", "conv_x"),
    ("2026-01-01T00:00:00Z", "conv_\x00"), ("2026-01-01T00:00:00Z", "c" * 300),
])
async def test_conversation_cursors_postgres_cannot_take_are_400(api, values):
    assert_problem(await api.get("/v1/conversations", params={"cursor": cursor_of(*values)}), 400)


async def test_a_naive_time_in_a_conversation_cursor_is_read_as_utc(api):
    first = await create_conversation(api)
    second = await create_conversation(api)
    page = (await api.get("/v1/conversations", params={"limit": 1})).json()
    assert page["data"][0]["id"] == second["id"]
    naive = cursor_of(first["created_at"].rstrip("Z"), second["id"])  # as utc, no offset
    rest = (await api.get("/v1/conversations", params={"cursor": page["next_cursor"]})).json()
    assert [c["id"] for c in rest["data"]] == [first["id"]]
    response = await api.get("/v1/conversations", params={"cursor": naive})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("params", "headers", "status"), [
    ({"after": str(2**63)}, {}, 422), ({"after": str(2**64)}, {}, 422), ({"after": "-1"}, {}, 422),
    ({"limit": str(2**63)}, {}, 422), ({"limit": str(2**31)}, {}, 422),
    ({}, {"Last-Event-ID": str(2**63)}, 400),
    ({}, {"Last-Event-ID": "99999999999999999999999"}, 400),
    ({}, {"Last-Event-ID": "²".encode()}, 400), ({}, {"Last-Event-ID": "٣".encode()}, 400),
    ({}, {"Last-Event-ID": "-5"}, 400), ({}, {"Last-Event-ID": "1_000"}, 400),
])
async def test_sequences_past_int8_or_not_ascii_digits_are_refused(api, params, headers, status):
    conversation = await create_conversation(api)
    response = await api.get(f"/v1/conversations/{conversation['id']}/events", params=params,
                             headers=headers)
    assert_problem(response, status)


async def test_the_largest_sequences_are_still_answered(api):
    conversation = await create_conversation(api)
    path = f"/v1/conversations/{conversation['id']}/events"
    for params, headers in [({"after": str(2**63 - 1)}, {}), ({"after": str(2**31)}, {}),
                            ({}, {"Last-Event-ID": str(2**63 - 1)})]:
        response = await api.get(path, params=params, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["data"] == []
