"""Redis refusing connections after a commit: the committed write is answered as a success (the
reconciler enqueues later), and a replayed POST enqueues what its first request could not.

Redis here is a redis-server of the test's own, stopped and started again by the test.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import httpx
import msgspec
import pytest

from service.app import create_app
from service.db.keys import create_key
from service.domain import runs
from service.resources import Resources
from tests.helpers import create_conversation, post_turn, running_worker, wait_turn
from tests.stoppable import RedisProcess, redis_process


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    with redis_process() as server:
        yield server


@pytest.fixture
def redis_settings(settings, own_redis):
    return msgspec.structs.replace(settings, redis_url=own_redis.url, reconcile_interval_s=1)


@pytest.fixture
async def stack(redis_settings) -> AsyncIterator[tuple[Resources, httpx.AsyncClient]]:
    resources = await Resources.open(redis_settings, listen=True)
    async with resources.pool.acquire() as conn:
        key = (await create_key(conn, "acme"))[1]
    transport = httpx.ASGITransport(app=create_app(redis_settings, resources=resources))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                     headers={"Authorization": f"Bearer {key}"}) as api:
            yield resources, api
    finally:
        await resources.close()


async def queued_job(resources: Resources, turn_id: str) -> bool:
    return await resources.queue.zscore(resources.settings.queue_name,
                                        f"start_turn:{turn_id}") is not None


async def test_turns_committed_while_redis_is_down_are_answered_and_run_once_it_is_back(
    stack, own_redis, redis_settings
):
    resources, api = stack
    conversation = await create_conversation(api)
    own_redis.stop()
    started = time.monotonic()
    first = await post_turn(api, conversation["id"], "Asked while Redis is down")
    second = await post_turn(api, conversation["id"], "And a follow-up")
    cancel = await api.post(
        f"/v1/conversations/{conversation['id']}/turns/{first['id']}/cancel")
    assert cancel.status_code == 200, cancel.text  # its follow-up's enqueue failed after commit
    assert cancel.json()["status"] == "cancelled"
    assert time.monotonic() - started < 5  # a refused connection is not waited for
    listed = (await api.get(f"/v1/conversations/{conversation['id']}/turns")).json()["data"]
    assert [(t["id"], t["status"]) for t in listed] == [
        (first["id"], "cancelled"), (second["id"], "queued")]

    own_redis.start()
    assert not await queued_job(resources, second["id"])
    async with running_worker(redis_settings):
        done = await wait_turn(api, second, timeout_s=60)  # the reconciler enqueued it
    assert done["status"] == "completed"


async def test_a_finished_turn_whose_next_turn_cannot_be_enqueued_is_still_finished(
    stack, own_redis, redis_settings
):
    resources, api = stack
    conversation = await create_conversation(api)
    first = await post_turn(api, conversation["id"], "Ends while Redis is down")
    second = await post_turn(api, conversation["id"], "Waits for it")
    await resources.pool.execute(
        "UPDATE turn SET status = 'running', run_id = 'trun_x', interaction_id = 'trun_x', "
        "started_at = now() WHERE id = $1", first["id"])
    own_redis.stop()
    ended = await runs.finish(resources.pool, resources.queue, redis_settings, first["id"],
                              "failed", error={"code": "run_failed", "message": "it failed"})
    assert ended is not None and ended.status == "failed"
    turn = (await api.get(f"/v1/conversations/{conversation['id']}/turns/{second['id']}")).json()
    assert turn["status"] == "queued"


async def test_a_replayed_post_enqueues_the_turn_its_first_request_could_not(
    stack, own_redis
):
    resources, api = stack
    conversation = await create_conversation(api)
    path = f"/v1/conversations/{conversation['id']}/turns"
    headers = {"Idempotency-Key": "retry-me"}
    own_redis.stop()
    first = await api.post(path, json={"input": "Committed, never enqueued"}, headers=headers)
    assert first.status_code == 202
    own_redis.start()
    assert not await queued_job(resources, first.json()["id"])

    again = await api.post(path, json={"input": "Committed, never enqueued"}, headers=headers)
    assert again.status_code == 202
    assert again.json() == first.json()
    assert await queued_job(resources, first.json()["id"])  # not left to the reconciler
