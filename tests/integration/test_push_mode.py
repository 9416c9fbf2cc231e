"""Push mode: Parallel's webhook (sent by the sandbox) ends a turn long before polling would,
and a forged or replayed one is refused and changes nothing."""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import httpx
import msgspec
import pytest
import redis.asyncio as aioredis

from service.app import create_app
from service.domain.push import parallel_signature
from service.resources import Resources
from tests.helpers import (
    create_conversation,
    post_turn,
    running_worker,
    sandbox_record,
    wait_turn,
    wait_until,
)
from tests.receivers import serve

SANDBOX_SECRET = "sandbox_webhook_secret"  # SandboxConfig.webhook_secret's default


@pytest.fixture
async def push(settings, api_key):
    """The API under uvicorn with push mode on, and a worker whose polls are 30 s apart; runs are
    created one by one (push beside group mode: tests/integration/test_task_groups.py)."""
    api_settings = msgspec.structs.replace(settings, parallel_webhook_secret=SANDBOX_SECRET,
                                           parallel_task_groups="off")
    resources = await Resources.open(api_settings, listen=True)
    try:
        async with serve(create_app(api_settings, resources=resources)) as url:
            worker_settings = msgspec.structs.replace(
                api_settings, public_base_url=url, poll_initial_s=30.0, poll_max_s=30.0)
            async with running_worker(worker_settings), httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
            ) as http:
                yield http
    finally:
        await resources.close()


def hook_headers(body: bytes, *, secret: str = SANDBOX_SECRET, age_s: float = 0) -> dict[str, str]:
    webhook_id, ts = "whevent_test", str(int(time.time() - age_s))
    return {"content-type": "application/json", "webhook-id": webhook_id, "webhook-timestamp": ts,
            "webhook-signature": parallel_signature(secret, webhook_id, ts, body)}


async def test_a_turn_completes_from_parallels_webhook_before_any_poll(push, sandbox):
    conversation = await create_conversation(push)
    started = time.monotonic()
    turn = await wait_turn(push, await post_turn(push, conversation["id"], "Pushed, not polled"),
                           timeout_s=15)
    assert turn["status"] == "completed"
    assert time.monotonic() - started < 10, "the first poll would come after 30 s"
    hooks = (await sandbox_record(sandbox.url, "webhooks"))["data"]
    mine = [h for h in hooks if h["run_id"] == turn["run_id"]]
    assert mine and mine[-1]["status_code"] == 204 and mine[-1]["ok"]
    # The webhook said "completed": the check asked for the result alone, as the SDK loop would.
    calls = (await sandbox_record(sandbox.url, "calls"))["data"]
    assert [(c["method"], c["path"].rsplit("/", 1)[-1]) for c in calls
            if c["run_id"] == turn["run_id"]] == [("POST", "runs"), ("GET", "result")]


async def test_a_webhook_that_says_completed_too_early_changes_nothing_but_a_check(push, sandbox):
    # A stale or mistaken "completed" (signed by Parallel's secret) for a run still active: the
    # result is not there, so the check falls back to the run's status and keeps following it.
    conversation = await create_conversation(push)
    turn = await wait_turn(push, await post_turn(push, conversation["id"], "[sandbox:slow=4] S"),
                           statuses={"running"})
    body = json.dumps({"timestamp": "2026-01-01T00:00:00Z", "type": "task_run.status",
                       "data": {"run_id": turn["run_id"], "status": "completed"}}).encode()
    assert (await post_hook(push, body, hook_headers(body))).status_code == 204

    def calls_of_the_run() -> list[dict] | None:
        calls = [c for c in httpx.get(f"{sandbox.url}/_sandbox/calls").json()["data"]
                 if c["run_id"] == turn["run_id"]]
        return calls if len(calls) >= 3 else None

    # The check's result call waits 1 s, then the check asks for the status.
    calls = await wait_until(calls_of_the_run, what="the check's result and status calls")
    still = (await push.get(f"/v1/conversations/{conversation['id']}/turns/{turn['id']}")).json()
    assert still["status"] == "running" and still["output"] is None
    assert [(c["method"], c["path"].rsplit("/", 1)[-1], c["status"]) for c in calls][:3] == [
        ("POST", "runs", 202), ("GET", "result", 408), ("GET", turn["run_id"], 200),
    ]
    done = await wait_turn(push, turn, timeout_s=15)  # the real webhook, when the run ends
    assert done["status"] == "completed" and done["output"]["content"]


async def test_forged_and_replayed_webhooks_are_refused_and_change_nothing(
    push, database_url, redis_url
):
    conversation = await create_conversation(push)
    turn = await wait_turn(push, await post_turn(push, conversation["id"], "[sandbox:slow=3] Slow"),
                           statuses={"running"})
    body = json.dumps({"timestamp": "2026-01-01T00:00:00Z", "type": "task_run.status",
                       "data": {"run_id": turn["run_id"], "status": "completed"}}).encode()
    conn = await asyncpg.connect(database_url)
    try:
        before = await conn.fetchval("SELECT next_check_at FROM turn WHERE id = $1", turn["id"])
        forged = hook_headers(body, secret="not-the-secret")
        replayed = hook_headers(body, age_s=600)  # a captured delivery, sent again later
        other_body = hook_headers(b"{}")["webhook-signature"]
        tampered = {**hook_headers(body), "webhook-signature": other_body}
        for headers in (forged, replayed, tampered, {"content-type": "application/json"}):
            response = await post_hook(push, body, headers)
            assert response.status_code == 401, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
        await asyncio.sleep(0.3)
        after = await conn.fetchrow("SELECT status, next_check_at FROM turn WHERE id = $1",
                                    turn["id"])
        assert after["status"] == "running" and after["next_check_at"] == before
    finally:
        await conn.close()
    redis = aioredis.from_url(redis_url)
    assert not await redis.exists(f"arq:job:check_turn:{turn['run_id']}")
    await redis.aclose()

    # The genuine webhook, when the run ends, still completes the turn at once.
    done = await wait_turn(push, turn, timeout_s=15)
    assert done["status"] == "completed"


async def test_a_signed_webhook_needs_no_api_key_and_must_be_a_task_run_status(push):
    body = json.dumps({"timestamp": "2026-01-01T00:00:00Z", "type": "task_run.status",
                       "data": {"run_id": "trun_unknown", "status": "completed"}}).encode()
    assert (await post_hook(push, body, hook_headers(body))).status_code == 204
    bad = await post_hook(push, b"not json", hook_headers(b"not json"))
    assert bad.status_code == 400


async def post_hook(api: httpx.AsyncClient, body: bytes, headers: dict[str, str]) -> httpx.Response:
    """POST to the inbound route as Parallel does: no API key."""
    async with httpx.AsyncClient(base_url=str(api.base_url)) as anonymous:
        return await anonymous.post("/v1/hooks/parallel", content=body, headers=headers)


async def test_a_webhook_check_that_races_the_recording_of_its_run_is_not_lost(
    api, resources, settings, monkeypatch
):
    # An instant run's webhook can be checked while the worker that created the run is still
    # committing its id: the check's UPDATE skips the uncommitted row, and the commit lands
    # before the check asks whether the run is known. The run must still be checked now, not
    # left to the safety-net poll.
    from types import SimpleNamespace

    from service.db import turns as turn_db
    from worker import jobs

    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "instant")  # no worker: stays queued
    recording = await asyncpg.connect(settings.database_url)
    tx = recording.transaction()
    await tx.start()
    await recording.execute(
        "UPDATE turn SET status = 'running', run_id = 'trun_race', started_at = now(), "
        "next_check_at = now() + interval '1 hour' WHERE id = $1", turn["id"],
    )
    real_check_now, reads = turn_db.check_now, []

    async def check_now_then_commit(pool, run_id):
        found = await real_check_now(pool, run_id)
        if not reads:
            await tx.commit()  # the run's recording commits right after the first read
        reads.append(found)
        return found

    monkeypatch.setattr(turn_db, "check_now", check_now_then_commit)
    woken = []
    ctx = {"resources": resources, "follower": SimpleNamespace(wake=lambda: woken.append(1)),
           "job_try": 1}
    try:
        assert await jobs.check_turn(ctx, "trun_race", "running") == turn["id"]
    finally:
        await recording.close()
    assert reads[0] is None, "the race did happen"
    assert woken == [1]
    due = await resources.pool.fetchval(
        "SELECT next_check_at <= now() FROM turn WHERE id = $1", turn["id"]
    )
    assert due


async def test_a_finished_run_reported_while_its_id_is_being_committed_is_checked_at_once(
    api, resources, settings, monkeypatch, sandbox
):
    # The same race when the webhook says the run ended: the job claims the turn and checks the
    # run itself, so it must retry its claim once the recording has committed.
    from types import SimpleNamespace

    from service.db import turns as turn_db
    from worker import jobs

    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "instant")
    run = (await resources.parallel.create_run(
        input="instant", processor="lite", output_schema={"type": "text"},
        previous_interaction_id=None, metadata={},
    ))
    await wait_sandbox_run(resources.parallel, run.run_id)
    recording = await asyncpg.connect(settings.database_url)
    tx = recording.transaction()
    await tx.start()
    await recording.execute(
        "UPDATE turn SET status = 'running', run_id = $2, interaction_id = $3, started_at = now(),"
        " next_check_at = now() + interval '1 hour' WHERE id = $1",
        turn["id"], run.run_id, run.interaction_id,
    )
    real_claim, claims = turn_db.claim_run, []

    async def claim_then_commit(pool, run_id, lease_s):
        found = await real_claim(pool, run_id, lease_s)
        if not claims:
            await tx.commit()
        claims.append(found)
        return found

    monkeypatch.setattr(turn_db, "claim_run", claim_then_commit)
    ctx = {"resources": resources, "follower": SimpleNamespace(wake=lambda: None), "job_try": 1}
    try:
        assert await jobs.check_turn(ctx, run.run_id, "completed") == turn["id"]
    finally:
        await recording.close()
    assert claims[0] is None and claims[1] is not None
    done = (await api.get(f"/v1/conversations/{conversation['id']}/turns/{turn['id']}")).json()
    assert done["status"] == "completed" and done["output"]["content"]


async def wait_sandbox_run(parallel, run_id: str) -> None:
    for _ in range(100):
        if (await parallel.retrieve(run_id)).status == "completed":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the sandbox run did not complete")
