"""The fencing race with real processes: a slow Parallel answer, one worker's Postgres traffic
held past its attempt's lease, Redis flushed. Another worker takes the turn over; when the first
worker's traffic flows again its late answer is recorded as an extra run, with its run id, and
the turn keeps the second attempt's run. Every run is recorded against its attempt."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import msgspec
import pytest
import redis.asyncio as aioredis

from service.app import create_app
from service.db import attempts
from service.db.keys import create_key
from service.resources import Resources
from tests.helpers import create_conversation, post_turn, sandbox_runs, set_faults, wait_turn
from tests.processes import WorkerProcess
from tests.stoppable import held_proxy, redis_process

pytestmark = pytest.mark.slow

ANSWER_DELAY_S = 5.0  # well inside the create timeout: the answer does come back


@pytest.fixture
def settings(settings):
    """One by one (PARALLEL_TASK_GROUPS=off): the window these tests measure only exists there;
    in group mode a lost create's run is adopted (tests/integration/test_task_groups.py)."""
    return msgspec.structs.replace(settings, parallel_task_groups="off")


def through(database_url: str, port: int) -> str:
    parts = urlsplit(database_url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}"))


async def wait_row(database_url: str, turn_id: str, condition, timeout_s: float) -> dict:
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            row = dict(await conn.fetchrow(
                "SELECT status, run_id, start_attempts, doubtful_attempts FROM turn WHERE id = $1",
                turn_id))
            extra = await attempts.extra_runs(conn, turn_id)
            row["extra"] = {r["attempt"]: r["run_id"] for r in extra}
            if condition(row):
                return row
            assert time.monotonic() < deadline, row
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


@pytest.mark.parametrize("stored", [False, True], ids=["before", "after"])
async def test_a_late_answer_held_past_the_lease_is_recorded_against_its_attempt(
    settings, sandbox, database_url, stored
):
    """The held answer reaches Postgres before or after the newer attempt stored its run."""
    with redis_process() as own_redis:
        settings = msgspec.structs.replace(
            settings, redis_url=own_redis.url, start_lease_s=12.0, create_timeout_s=8.0,
            reconcile_interval_s=1)
        resources = await Resources.open(settings, listen=True)
        async with resources.pool.acquire() as conn:
            key = (await create_key(conn, "acme"))[1]
        transport = httpx.ASGITransport(app=create_app(settings, resources=resources))
        pg = urlsplit(database_url)
        try:
            async with held_proxy(pg.hostname, pg.port) as proxy, httpx.AsyncClient(
                transport=transport, base_url="http://testserver",
                headers={"Authorization": f"Bearer {key}"},
            ) as api:
                conversation = await create_conversation(api)
                set_faults(sandbox.url, create_answer_delay_s=ANSWER_DELAY_S)
                turn = await post_turn(api, conversation["id"], "who records my run?")
                frozen = msgspec.structs.replace(
                    settings, database_url=through(database_url, proxy.port))
                with WorkerProcess(frozen) as first:
                    deadline = time.monotonic() + 30
                    while not sandbox_runs(sandbox.url, turn["id"]):  # made, not yet answered
                        assert time.monotonic() < deadline, first.output()
                        await asyncio.sleep(0.05)
                    proxy.hold()  # its answer comes in 5 s; storing it waits in the network
                    client = aioredis.from_url(own_redis.url)
                    await client.flushdb()  # its start job is gone too
                    await client.aclose()
                    # The second worker serves a queue of its own: the first one, whose Redis
                    # traffic still flows, would otherwise take its jobs and hang on Postgres.
                    with WorkerProcess(msgspec.structs.replace(
                            settings, queue_name=f"{settings.queue_name}:b")):
                        # The lease runs out; the second worker's reconciler starts attempt 2.
                        await wait_row(database_url, turn["id"], lambda r: (
                            r["start_attempts"] == 2 and (r["run_id"] is not None or not stored)
                        ), 60)
                        proxy.release()
                        row = await wait_row(database_url, turn["id"], lambda r: r["extra"], 30)
                        done = await wait_turn(api, turn, timeout_s=30)
                    assert "extra_run" in first.output()
        finally:
            await resources.close()
    runs = {int(r["metadata"]["rs_attempt"]): r["run_id"]
            for r in sandbox_runs(sandbox.url, turn["id"])}
    assert len(sandbox_runs(sandbox.url, turn["id"])) == 2
    assert done["status"] == "completed"
    assert done["run_id"] == runs[2]  # the turn kept attempt 2's run
    assert row["extra"] == {1: runs[1]}  # attempt 1's late answer, with its run id
    assert row["doubtful_attempts"] == [1]
