"""Outages met by real processes: a worker process under a Redis outage, and an API process frozen
(SIGSTOP) inside a turn transaction while another API process serves everyone else."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal

import asyncpg
import httpx
import msgspec
import pytest

from service.db.keys import create_key
from service.devstack import free_port
from service.domain.turns import create_turn
from service.queue import START_TURN, enqueue_start_turn
from service.schemas import TurnCreate
from tests.helpers import api_client, create_conversation, post_turn, wait_turn
from tests.processes import ApiProcess, WorkerProcess
from tests.servers import own_postgres, own_redis

pytestmark = pytest.mark.slow

# A turn created while Redis was away starts within this long of Redis answering again.
RESUME_BOUND_S = 5.0


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout_s: float, what: str
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.05)


async def turn_status(database_url: str, turn_id: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        return str(await conn.fetchval("SELECT status FROM turn WHERE id = $1", turn_id))
    finally:
        await conn.close()


async def test_worker_outlives_a_redis_outage_and_starts_waiting_turns_within_seconds(
    settings, sandbox
):
    with own_redis() as redis:
        # The cron reconciler alone would take up to a minute: recovery must not wait for it.
        settings = msgspec.structs.replace(settings, redis_url=redis.url, reconcile_interval_s=60)
        async with api_client(settings) as (api, resources):
            busy = await create_conversation(api)
            idle = await create_conversation(api)
            first = await post_turn(api, busy["id"], "[sandbox:slow=3] runs through the outage")
            behind = await post_turn(api, busy["id"], "queued behind it")
            with WorkerProcess(settings) as worker:
                await wait_turn(api, first, timeout_s=30, statuses={"running"})
                redis.stop()
                assert worker.process is not None
                await eventually(lambda: "redis_unavailable" in worker.output()
                                 or worker.process.poll() is not None, 10,
                                 "the worker meets the outage")
                assert worker.process.poll() is None, worker.output()[-3000:]
                # Committed while Redis is away: its enqueue failed, only Postgres knows it.
                tenant_id = await resources.pool.fetchval(
                    "SELECT tenant_id FROM conversation WHERE id = $1", idle["id"])
                during = await create_turn(resources.pool, None, settings, tenant_id, idle["id"],
                                           TurnCreate(input="asked during the outage"), None)
                # The running turn ends meanwhile (the follower needs Postgres only); starting
                # the one behind it needed Redis.
                await wait_turn(api, first, timeout_s=30)
                await asyncio.sleep(2)  # the outage lasts: a few more failed probes
                assert worker.process.poll() is None, worker.output()[-3000:]
                redis.start()
                back = time.monotonic()
                for turn_id in (during.id, behind["id"]):
                    await eventually(
                        lambda turn_id=turn_id: _started(settings.database_url, turn_id),
                        RESUME_BOUND_S + 5, f"turn {turn_id} starts")
                took = time.monotonic() - back
                print(f"turns started {took:.2f} s after Redis returned")
                assert took <= RESUME_BOUND_S, took
                await wait_turn(api, behind, timeout_s=30)
                assert worker.process.poll() is None
                assert "redis_recovered" in worker.output()


async def _started(database_url: str, turn_id: str) -> bool:
    return await turn_status(database_url, turn_id) in ("running", "completed")


async def test_a_start_deferred_by_a_postgres_outage_runs_within_seconds_of_its_return(
    settings, sandbox
):
    async with own_postgres() as postgres:
        settings = msgspec.structs.replace(settings, database_url=postgres.url)
        async with api_client(settings) as (api, resources):
            conversation = await create_conversation(api)
            tenant_id = await resources.pool.fetchval(
                "SELECT tenant_id FROM conversation WHERE id = $1", conversation["id"])
            turn = await create_turn(resources.pool, None, settings, tenant_id, conversation["id"],
                                     TurnCreate(input="started once Postgres is back"), None)
            redis = resources.queue
            job_id = f"{START_TURN}:{turn.id}"
            with WorkerProcess(settings) as worker:
                await eventually(lambda: redis.exists(f"{settings.queue_name}:health-check"),
                                 30, "the worker is up")
                postgres.stop()
                await enqueue_start_turn(redis, settings.queue_name, turn.id)

                async def deferred_long() -> bool:
                    # The 4th try failed: arq now defers the job 8 s (1, 2, 4, 8 s, ...).
                    tries = int(await redis.get(f"arq:retry:{job_id}") or 0)
                    score = await redis.zscore(settings.queue_name, job_id)
                    return tries >= 4 and score is not None and score > time.time() * 1000 + 4000

                await eventually(deferred_long, 40, "the start job backs off")
                postgres.start()
                back = time.monotonic()
                await eventually(lambda: _started(postgres.url, turn.id), 30, "the turn starts")
                took = time.monotonic() - back
                print(f"the deferred start ran {took:.2f} s after Postgres returned")
                assert took <= RESUME_BOUND_S, (took, worker.output()[-2000:])


FREEZE_MARKER = "[freeze-here]"
# The frozen API's INSERT sleeps this long server-side: the test stops the process meanwhile, so
# it is frozen inside its transaction, holding the conversation's lock.
FREEZE_SQL = f"""
CREATE FUNCTION freeze_point() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.input::text LIKE '%{FREEZE_MARKER}%' THEN PERFORM pg_sleep(1.5); END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER freeze_point BEFORE INSERT ON turn FOR EACH ROW EXECUTE FUNCTION freeze_point();
"""
IDLE_TIMEOUT_S = 5.0
FREEZE_S = 60.0  # as long as issue 17 asks: the freeze outlasts every deadline of the API
LOAD_CONVERSATIONS = 4
SAME_TENANT_CONVERSATIONS = 2


async def post_load(api: httpx.AsyncClient, clients: list[tuple[str, dict[str, str]]],
                    seconds: float) -> list[tuple[int, float]]:
    """One client per (conversation, its tenant's headers), each POSTing a turn every 0.5 s:
    (status, seconds) of each answer."""
    answers: list[tuple[int, float]] = []
    end = time.monotonic() + seconds

    async def client(conversation_id: str, headers: dict[str, str]) -> None:
        while time.monotonic() < end:
            start = time.monotonic()
            response = await api.post(f"/v1/conversations/{conversation_id}/turns",
                                      json={"input": "[sandbox:slow=0.2] load"}, headers=headers)
            answers.append((response.status_code, time.monotonic() - start))
            await asyncio.sleep(0.5)

    await asyncio.gather(*(client(c, h) for c, h in clients))
    return answers


def p95(answers: list[tuple[int, float]]) -> float:
    times = sorted(t for _, t in answers)
    return times[min(len(times) - 1, int(0.95 * len(times)))]


# "reject" creates the turn in a transaction under the conversation's lock; "enqueue" (the
# default) in one statement that commits on its own (docs/design.md §2, "Round trips of a turn").
@pytest.mark.parametrize("if_busy", ["reject", "enqueue"], ids=["transaction", "one-statement"])
async def test_an_api_frozen_while_creating_a_turn_costs_only_its_conversation(
    settings, sandbox, if_busy
):
    settings = msgspec.structs.replace(
        settings, db_idle_in_transaction_timeout_s=IDLE_TIMEOUT_S, log_format="json")
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(FREEZE_SQL)
        # The frozen conversation's tenant (with a budget: its quota counters are checked on
        # every new turn), and one tenant per load client.
        keys = [(await create_key(conn, f"tenant-{n}", monthly_budget_usd=Decimal(100)))[1]
                for n in range(1 + 2 * LOAD_CONVERSATIONS)]
    finally:
        await conn.close()
    frozen_api = ApiProcess(settings, free_port()).start()
    healthy_api = ApiProcess(settings, free_port()).start()
    headers = {"Authorization": f"Bearer {keys[0]}"}
    tenants = [{"Authorization": f"Bearer {key}"} for key in keys[1:]]
    try:
        with WorkerProcess(settings):
            async with httpx.AsyncClient(base_url=healthy_api.url, headers=headers,
                                         timeout=60) as api, \
                    httpx.AsyncClient(base_url=frozen_api.url, headers=headers,
                                      timeout=FREEZE_S + 30) as frozen_client:
                frozen = await create_conversation(api)
                loads = []
                for tenant in tenants:
                    api.headers.update(tenant)
                    loads.append(((await create_conversation(api))["id"], tenant))
                api.headers.update(headers)
                # The frozen tenant's own other conversations are loaded during the freeze too:
                # no lock of the tenant is held across a turn's creation (docs/design.md §2).
                same_tenant = [((await create_conversation(api))["id"], headers)
                               for _ in range(SAME_TENANT_CONVERSATIONS)]
                baseline_clients = loads[:LOAD_CONVERSATIONS]
                freeze_clients = loads[LOAD_CONVERSATIONS:] + same_tenant
                await post_load(api, baseline_clients, 2.0)  # warm up: connections, caches
                baseline = await post_load(api, baseline_clients, 6.0)

                stuck = asyncio.create_task(frozen_client.post(
                    f"/v1/conversations/{frozen['id']}/turns",
                    json={"input": f"{FREEZE_MARKER} the request that freezes",
                          "if_busy": if_busy}))
                await eventually(lambda: _sleeping_in_insert(settings.database_url), 10,
                                 "the frozen API's INSERT is running")
                assert frozen_api.process is not None
                os.kill(frozen_api.process.pid, signal.SIGSTOP)
                stopped = time.monotonic()
                try:
                    load = asyncio.create_task(post_load(api, freeze_clients, FREEZE_S - 2))
                    resumed_after = await _first_accepted(api, frozen["id"], stopped)
                    during = await load
                    await asyncio.sleep(max(0.0, FREEZE_S - (time.monotonic() - stopped)))
                finally:
                    os.kill(frozen_api.process.pid, signal.SIGCONT)
                answer = await stuck
                turns = (await api.get(f"/v1/conversations/{frozen['id']}/turns")).json()["data"]
    finally:
        frozen_api.stop()
        healthy_api.stop()
    print(f"baseline: {len(baseline)} POSTs, p95 {p95(baseline) * 1000:.0f} ms; "
          f"frozen API: {len(during)} POSTs, p95 {p95(during) * 1000:.0f} ms; "
          f"the frozen conversation accepted a turn again {resumed_after:.1f} s after SIGSTOP")
    assert {status for status, _ in baseline} == {202}
    assert {status for status, _ in during} == {202}
    assert p95(during) <= 2 * p95(baseline) + 0.05, (p95(during), p95(baseline))
    if if_busy == "reject":
        # The server ended the frozen session (idle in transaction) and so released the lock:
        # after the INSERT's sleep, the idle timeout, and one lock wait of the request that got
        # through.
        assert resumed_after <= 1.5 + IDLE_TIMEOUT_S + settings.db_lock_timeout_s + 2.0
        # The frozen process's request was rolled back with its session: 503, nothing written.
        assert answer.status_code == 503, answer.text
        assert [t["input"] for t in turns] == ["after the freeze"]
    else:
        # The statement committed on the server while its process was frozen (its lock held
        # only for the INSERT's sleep); resumed, the process finds its answer lost to its own
        # deadline, reads the turn by its id and answers it: a committed turn is never an error.
        assert resumed_after <= 1.5 + settings.db_lock_timeout_s + 2.0
        assert answer.status_code == 202, answer.text
        assert [t["input"] for t in turns] == [
            f"{FREEZE_MARKER} the request that freezes", "after the freeze"]
        assert answer.json()["id"] == turns[0]["id"]


async def _sleeping_in_insert(database_url: str) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        return bool(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
            "AND application_name = 'research-service-api'"))
    finally:
        await conn.close()


async def _first_accepted(api: httpx.AsyncClient, conversation_id: str, since: float) -> float:
    """POST to the frozen conversation until accepted (503 meanwhile); seconds after `since`."""
    while True:
        response = await api.post(f"/v1/conversations/{conversation_id}/turns",
                                  json={"input": "after the freeze"})
        if response.status_code == 202:
            return time.monotonic() - since
        assert response.status_code == 503, response.text
        assert "retry-after" in response.headers
        assert time.monotonic() - since < 30, "the frozen conversation never came back"
        await asyncio.sleep(0.2)
