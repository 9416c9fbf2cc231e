"""Parallel's inbound webhook: a replay inside the signature window queues nothing, an odd
timestamp is a 4xx, and with Redis unreachable the check is made due in Postgres (a 204, not a
5xx). Real Postgres and Redis; the app is called over ASGI with no worker, so queued checks stay
in Redis for the test to read."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import msgspec
import pytest

from service.app import create_app
from service.devstack import free_port
from service.domain.push import parallel_signature
from service.resources import Resources
from tests.helpers import create_conversation, post_turn, until

SECRET = "test_parallel_secret"


def signed(body: bytes, webhook_id: str, *, secret: str = SECRET, ts: str | None = None
           ) -> dict[str, str]:
    ts = ts or str(int(time.time()))
    return {"content-type": "application/json", "webhook-id": webhook_id,
            "webhook-timestamp": ts,
            "webhook-signature": parallel_signature(secret, webhook_id, ts, body)}


def status_body(run_id: str, status: str = "completed") -> bytes:
    return json.dumps({"timestamp": "2026-01-01T00:00:00Z", "type": "task_run.status",
                       "data": {"run_id": run_id, "status": status}}).encode()


@contextlib.asynccontextmanager
async def hook_client(resources: Resources) -> AsyncIterator[httpx.AsyncClient]:
    settings = msgspec.structs.replace(resources.settings, parallel_webhook_secret=SECRET)
    res = dataclasses.replace(resources, settings=settings)
    transport = httpx.ASGITransport(app=create_app(settings, resources=res))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


@pytest.fixture
async def hook(resources) -> AsyncIterator[httpx.AsyncClient]:
    async with hook_client(resources) as http:
        yield http


async def queued_checks(resources: Resources) -> list[str]:
    jobs = await resources.queue.zrange(resources.settings.queue_name, 0, -1)
    return [j.decode() for j in jobs if j.startswith(b"check_turn:")]


async def forget_check(resources: Resources, run_id: str) -> None:
    """What the worker leaves once it ran the check: neither the job nor its queue entry."""
    await resources.queue.delete(f"arq:job:check_turn:{run_id}")
    await resources.queue.zrem(resources.settings.queue_name, f"check_turn:{run_id}")


def run_id(name: str) -> str:
    """A run id of this test alone: a check's job id (`check_turn:<run id>`) is global in Redis,
    so a fixed one would meet the job a run of the suite before left on the same server."""
    return f"trun_{name}_{secrets.token_hex(6)}"


async def test_a_replayed_delivery_is_answered_2xx_and_queues_no_new_check(hook, resources):
    run = run_id("replayed")
    body = status_body(run)
    headers = signed(body, "whevent_once")
    assert (await hook.post("/v1/hooks/parallel", content=body, headers=headers)).status_code == 204
    assert await queued_checks(resources) == [f"check_turn:{run}"]
    await forget_check(resources, run)  # the check ran

    for _ in range(3):  # the captured request, sent again within the 300 s window
        again = await hook.post("/v1/hooks/parallel", content=body, headers=headers)
        assert again.status_code == 204, again.text
    assert await queued_checks(resources) == []

    # Another delivery (a new webhook-id) about the same run is checked again.
    fresh = await hook.post("/v1/hooks/parallel", content=body, headers=signed(body, "whevent_2"))
    assert fresh.status_code == 204
    assert await queued_checks(resources) == [f"check_turn:{run}"]


async def test_an_unsigned_request_does_not_use_up_a_genuine_webhook_id(hook, resources):
    run = run_id("genuine")
    body = status_body(run)
    forged = signed(body, "whevent_target", secret="guessed")
    assert (await hook.post("/v1/hooks/parallel", content=body, headers=forged)).status_code == 401
    assert await queued_checks(resources) == []
    genuine = await hook.post("/v1/hooks/parallel", content=body,
                              headers=signed(body, "whevent_target"))
    assert genuine.status_code == 204
    assert await queued_checks(resources) == [f"check_turn:{run}"]


@pytest.mark.parametrize("ts", [
    "²".encode("latin-1"),  # as a client sends it in latin-1: str.isdigit() says yes, int() no
    "²".encode(), "١٧٥١٤٩٨٩٧٥".encode(), b"+1751498975", b" 1751498975", b"1e9", b"9" * 40, b"",
])
async def test_a_timestamp_that_is_not_ascii_digits_is_a_4xx(hook, resources, ts):
    body = status_body("trun_ts")
    headers = {**signed(body, "whevent_ts"), "webhook-timestamp": ts}
    response = await hook.post("/v1/hooks/parallel", content=body, headers=headers)
    assert response.status_code in (400, 401), response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert await queued_checks(resources) == []


@pytest.mark.parametrize("body", [
    status_body("trun_\x00"), b'{"type": "task_run.status", "data": {"run_id": "\xff"}}',
    json.dumps({"type": "task_run.status", "data": {"run_id": "r", "status": "s\x00"}}).encode(),
])
async def test_a_signed_body_postgres_cannot_store_is_400(hook, resources, body):
    response = await hook.post(
        "/v1/hooks/parallel", content=body, headers=signed(body, "whevent_b"))
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert await queued_checks(resources) == []


@contextlib.contextmanager
def own_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True
                             ).stdout.strip() != b"PONG":
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", server
    finally:
        server.terminate()
        server.wait(10)


async def test_with_redis_down_the_check_is_made_due_in_postgres_and_the_hook_gets_204(
    api, settings, database_url
):
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "q")
    conn = await asyncpg.connect(database_url)
    try:
        # Running, its next check far out as in push mode (no worker here): only the webhook
        # can bring the check forward.
        await conn.execute("UPDATE turn SET status = 'running', run_id = 'trun_redis_down',"
                           " next_check_at = now() + interval '1 hour' WHERE id = $1", turn["id"])
        with own_redis() as (redis_url, server):
            res = await Resources.open(msgspec.structs.replace(settings, redis_url=redis_url))
            try:
                server.terminate()
                server.wait(10)
                body = status_body("trun_redis_down", "running")
                async with hook_client(res) as hook:
                    response = await hook.post("/v1/hooks/parallel", content=body,
                                               headers=signed(body, "whevent_redis_down"))
            finally:
                await res.close()
        assert response.status_code == 204, response.text
        due = await conn.fetchval("SELECT next_check_at <= now() FROM turn WHERE id = $1",
                                  turn["id"])
        assert due, "the webhook's check was not made due in Postgres"
    finally:
        await conn.close()


async def test_a_stored_runs_webhook_wakes_the_followers_through_postgres_and_queues_no_job(
    hook, api, resources, database_url
):
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "q")
    run = run_id("stored")
    conn = await asyncpg.connect(database_url)
    woken: list[str] = []
    try:
        await conn.execute("UPDATE turn SET status = 'running', run_id = $2,"
                           " next_check_at = now() + interval '1 hour' WHERE id = $1",
                           turn["id"], run)
        # What a worker's follower listens to.
        await conn.add_listener("turn_checks", lambda *args: woken.append(args[-1]))
        body = status_body(run, "completed")
        response = await hook.post("/v1/hooks/parallel", content=body,
                                   headers=signed(body, "whevent_stored"))
        assert response.status_code == 204, response.text
        row = await conn.fetchrow("SELECT next_check_at <= now() AS due, reported_status"
                                  " FROM turn WHERE id = $1", turn["id"])
        assert row["due"] and row["reported_status"] == "completed"
        await until(lambda: woken == ["due"])
        assert await queued_checks(resources) == []
        # A later "running" (delivered out of order) keeps what the run was reported to be.
        body = status_body(run, "running")
        response = await hook.post("/v1/hooks/parallel", content=body,
                                   headers=signed(body, "whevent_stored_late"))
        assert response.status_code == 204
        assert await conn.fetchval("SELECT reported_status FROM turn WHERE id = $1",
                                   turn["id"]) == "completed"
    finally:
        await conn.close()
