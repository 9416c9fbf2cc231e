"""Every limit: the boundary is accepted; one past it is refused (problem+json), writing nothing."""

from __future__ import annotations

from typing import Any

import pytest

from service.app import MAX_BODY_BYTES
from tests.helpers import (
    assert_problem,
    counts,
    create_conversation,
    new_key,
    post_turn,
    settings_of,
)


def nested(depth: int) -> dict[str, Any]:
    """An object nested `depth` levels: {"a": {"a": ... {"a": 1}}}."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def object_schema(depth: int) -> dict[str, Any]:
    """A JSON schema whose objects nest `depth` levels."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


async def check_boundary(api, database_url, path: str, ok: dict, too_much: dict,
                         field: str | None = None, ok_status: int = 202) -> None:
    accepted = await api.post(path, json=ok)
    assert accepted.status_code == ok_status, accepted.text
    before = await counts(database_url)
    problem = assert_problem(await api.post(path, json=too_much), 422)
    if field is not None:
        assert any(e["field"] == field for e in problem["errors"]), problem
    assert await counts(database_url) == before


async def test_body_size_boundary(api, database_url):
    conversation = await create_conversation(api)
    path = f"/v1/conversations/{conversation['id']}/turns"
    body = b'{"input": "q"}'
    padded = body + b" " * (MAX_BODY_BYTES - len(body))  # JSON allows trailing whitespace
    headers = {"content-type": "application/json"}
    assert (await api.post(path, content=padded, headers=headers)).status_code == 202
    before = await counts(database_url)
    assert_problem(await api.post(path, content=padded + b" ", headers=headers), 413)
    assert await counts(database_url) == before


async def test_a_hostile_deeply_nested_body_is_refused_not_a_crash(api, database_url):
    conversation = await create_conversation(api)
    depth = 400_000  # 800 kB: under the body limit, far past any decoder's recursion limit
    body = b'{"input": ' + b"[" * depth + b"]" * depth + b"}"
    assert len(body) < MAX_BODY_BYTES
    before = await counts(database_url)
    response = await api.post(f"/v1/conversations/{conversation['id']}/turns", content=body,
                              headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500
    assert_problem(response, response.status_code)
    assert await counts(database_url) == before


async def test_input_length_boundary(api, database_url):
    conversation = await create_conversation(api)
    path = f"/v1/conversations/{conversation['id']}/turns"
    await check_boundary(api, database_url, path, {"input": "x" * 25_000},
                         {"input": "x" * 25_001}, "input")
    # An object input counts as its JSON text: {"q":"…"} is 8 characters plus the value.
    await check_boundary(api, database_url, path, {"input": {"q": "x" * (25_000 - 8)}},
                         {"input": {"q": "x" * (25_001 - 8)}}, "input")


async def test_input_nesting_boundary(api, database_url):
    conversation = await create_conversation(api)
    await check_boundary(api, database_url, f"/v1/conversations/{conversation['id']}/turns",
                         {"input": nested(8)}, {"input": nested(9)}, "input")


async def test_output_schema_depth_boundary(api, database_url):
    conversation = await create_conversation(api)
    json_schema = {"type": "json"}
    await check_boundary(
        api, database_url, f"/v1/conversations/{conversation['id']}/turns",
        {"input": "q", "output_schema": {**json_schema, "json_schema": object_schema(3)}},
        {"input": "q", "output_schema": {**json_schema, "json_schema": object_schema(4)}},
        "output_schema.json_schema",
    )


async def test_json_schema_raw_nesting_is_bounded(api, database_url):
    conversation = await create_conversation(api)
    base = {"type": "object", "properties": {"x": {"type": "string"}}}
    # Nesting outside `properties` does not make a deeper schema, but it is bounded all the
    # same: 16 levels in all pass, 17 do not.
    ok = {**base, "extra": nested(15)}
    deep = {**base, "extra": nested(16)}
    await check_boundary(
        api, database_url, f"/v1/conversations/{conversation['id']}/turns",
        {"input": "q", "output_schema": {"type": "json", "json_schema": ok}},
        {"input": "q", "output_schema": {"type": "json", "json_schema": deep}},
        "output_schema.json_schema",
    )


@pytest.mark.parametrize(
    ("ok", "too_much"),
    [
        ({f"k{i}": "v" for i in range(16)}, {f"k{i}": "v" for i in range(17)}),
        ({"k" * 16: "v"}, {"k" * 17: "v"}),
        ({"k": "v" * 512}, {"k": "v" * 513}),
    ],
    ids=["pairs", "key-length", "value-length"],
)
async def test_metadata_boundaries(api, database_url, ok, too_much):
    await check_boundary(api, database_url, "/v1/conversations", {"metadata": ok},
                         {"metadata": too_much}, ok_status=201)
    conversation = await create_conversation(api)
    await check_boundary(api, database_url, f"/v1/conversations/{conversation['id']}/turns",
                         {"input": "q", "metadata": ok}, {"input": "q", "metadata": too_much})


async def test_page_size_boundaries(api):
    conversation = await create_conversation(api)
    base = f"/v1/conversations/{conversation['id']}"
    for path in ("/v1/conversations", f"{base}/turns", f"{base}/events"):
        for limit in (1, 100):
            assert (await api.get(path, params={"limit": limit})).status_code == 200, path
        for limit in (0, 101):
            response = await api.get(path, params={"limit": limit})
            assert 400 <= response.status_code < 500, path
            assert_problem(response, response.status_code)


async def test_wait_boundaries(api):
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "q")
    path = f"/v1/conversations/{conversation['id']}/turns/{turn['id']}"
    await api.post(f"{path}/cancel")  # terminal, so even wait=60 answers at once
    for wait in ("0", "60"):
        assert (await api.get(path, params={"wait": wait})).status_code == 200
    for wait in ("-0.001", "60.001"):
        response = await api.get(path, params={"wait": wait})
        assert 400 <= response.status_code < 500
        assert_problem(response, response.status_code)


async def test_open_turns_per_conversation(api, resources, database_url):
    settings_of(resources, max_open_turns_per_conversation=2)
    conversation = await create_conversation(api)
    path = f"/v1/conversations/{conversation['id']}/turns"
    first = await post_turn(api, conversation["id"], "one")
    await post_turn(api, conversation["id"], "two")
    before = await counts(database_url)
    problem = assert_problem(await api.post(path, json={"input": "three"}), 429)
    assert problem["type"].endswith("too-many-open-turns")
    assert "2 turns queued or running" in problem["detail"]
    assert await counts(database_url) == before
    # Another conversation has its own allowance; a finished turn frees a place.
    await post_turn(api, (await create_conversation(api))["id"], "elsewhere")
    await api.post(f"{path}/{first['id']}/cancel")
    await post_turn(api, conversation["id"], "three")


async def test_open_turns_per_tenant(api, client, resources, database_url):
    settings_of(resources, max_open_turns_per_tenant=3)
    conversations = [await create_conversation(api) for _ in range(3)]
    for conversation in conversations:
        await post_turn(api, conversation["id"], "q")
    before = await counts(database_url)
    path = f"/v1/conversations/{conversations[0]['id']}/turns"
    problem = assert_problem(await api.post(path, json={"input": "q"}), 429)
    assert "account already has 3 turns" in problem["detail"]
    assert await counts(database_url) == before
    other = {"Authorization": f"Bearer {await new_key(resources, 'globex')}"}
    theirs = (await client.post("/v1/conversations", json={}, headers=other)).json()
    response = await client.post(f"/v1/conversations/{theirs['id']}/turns", json={"input": "q"},
                                 headers=other)
    assert response.status_code == 202


async def test_processors_are_checked_against_the_configured_list(api, resources, database_url):
    settings_of(resources, processors=["lite", "core-fast"])
    conversation = await create_conversation(api)
    await check_boundary(api, database_url, f"/v1/conversations/{conversation['id']}/turns",
                         {"input": "q", "processor": "core-fast"},
                         {"input": "q", "processor": "core"}, "processor")
    before = await counts(database_url)
    assert_problem(await api.post("/v1/conversations", json={"processor": "base"}), 422)
    assert await counts(database_url) == before
