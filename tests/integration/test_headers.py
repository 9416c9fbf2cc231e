"""Every answer carries X-Request-ID (and the request's log lines carry it too); problem+json never
carries a stack trace or SQL."""

from __future__ import annotations

import asyncpg
import structlog

from service.logs import CONTEXT_PROCESSORS
from tests.helpers import assert_problem, create_conversation


async def test_every_kind_of_answer_carries_a_request_id(api, client, resources):
    from service.db.keys import create_key

    async with resources.pool.acquire() as conn:
        limited = (await create_key(conn, "acme", rate_limit_per_min=1))[1]
    conversation = await create_conversation(api)
    answers = {
        "200": await api.get("/v1/conversations"),
        "201": await api.post("/v1/conversations", json={}),
        "202": await api.post(f"/v1/conversations/{conversation['id']}/turns", json={"input": "q"}),
        "400": await api.get("/v1/conversations", params={"cursor": "garbage"}),
        "401": await client.get("/v1/conversations", headers={"Authorization": "Bearer nope"}),
        "404": await api.get("/v1/conversations/conv_missing"),
        "404 no route": await api.get("/v1/nowhere"),
        "413": await api.post("/v1/conversations", content=b"{" + b" " * 1_000_000 + b"}",
                              headers={"content-type": "application/json"}),
        "422": await api.post("/v1/conversations", json={"surprise": 1}),
        "healthz": await client.get("/healthz"),
    }
    for _ in range(2):
        answers["429"] = await client.get("/v1/conversations",
                                          headers={"Authorization": f"Bearer {limited}"})
    assert answers["429"].status_code == 429
    ids = {name: response.headers.get("x-request-id") for name, response in answers.items()}
    assert all(ids.values()), ids
    assert len(set(ids.values())) == len(ids)  # one per request


async def test_a_safe_incoming_request_id_is_echoed_and_an_unsafe_one_replaced(api):
    echoed = await api.get("/v1/conversations", headers={"X-Request-ID": "trace-42.a_b"})
    assert echoed.headers["x-request-id"] == "trace-42.a_b"
    for unsafe in (b"has space", b"x" * 129, b"semi;colon", "ünï".encode()):
        response = await api.get("/v1/conversations", headers={b"X-Request-ID": unsafe})
        assert response.headers["x-request-id"].startswith("req_")


async def test_log_lines_of_a_request_carry_its_id(api):
    with structlog.testing.capture_logs(
        processors=list(CONTEXT_PROCESSORS)
    ) as lines:
        response = await api.get("/v1/conversations/conv_missing",
                                 headers={"X-Request-ID": "find-me-in-the-logs"})
    assert response.status_code == 404
    mine = [line for line in lines if line.get("event") == "request"]
    assert mine and all(line["request_id"] == "find-me-in-the-logs" for line in mine)


async def test_an_internal_error_is_a_bare_500_problem_with_no_trace_or_sql(api, database_url):
    conversation = await create_conversation(api)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("ALTER TABLE turn RENAME TO turn_gone")
    finally:
        await conn.close()
    with structlog.testing.capture_logs(
        processors=list(CONTEXT_PROCESSORS)
    ) as lines:
        response = await api.get(f"/v1/conversations/{conversation['id']}/turns",
                                 headers={"X-Request-ID": "the-failing-one"})
    problem = assert_problem(response, 500)
    assert problem["detail"] == "The server failed; the error was logged."
    for leak in ("Traceback", "SELECT", "turn_gone", "relation", "asyncpg", "File \""):
        assert leak not in response.text
    # The log has what the answer does not, under the same request id.
    logged = [line for line in lines if line.get("log_level") == "error"]
    assert logged and logged[0]["request_id"] == "the-failing-one"
