"""Outbound webhooks against a real receiver: signatures, retries, the ledger, redelivery,
rotation, the SSRF guard, and a worker SIGKILLed with a delivery outstanding."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from standardwebhooks import Webhook

from tests.helpers import (
    create_conversation,
    fast_webhook_retries,
    ledger,
    new_key,
    post_turn,
    running_worker,
    wait_ledger,
    wait_turn,
)
from tests.processes import WorkerProcess


@pytest.fixture
def settings(settings):
    return fast_webhook_retries(settings)


async def test_a_completed_turn_is_posted_once_signed_with_the_answer(api, worker, receiver):
    conversation = await create_conversation(api, webhook_url=receiver.url)
    secret = conversation["webhook_secret"]
    turn = await wait_turn(api, await post_turn(api, conversation["id"], "Who won in 2022?"))
    assert turn["status"] == "completed"

    [request] = await receiver.wait_for(1)
    payload = Webhook(secret).verify(request.body, request.headers)
    assert payload["type"] == "turn.completed"
    event = payload["data"]
    assert event["type"] == "turn.completed" and event["turn_id"] == turn["id"]
    assert event["sequence"] == 3  # queued, running, completed
    assert event["data"]["output"] == turn["output"]
    assert event["data"]["basis"][0]["citations"], "the payload carries the citations"
    assert payload["timestamp"] == event["created_at"]
    assert request.headers["webhook-id"].startswith("msg_")

    delivery = await wait_ledger(api, conversation["id"], "delivered")
    await asyncio.sleep(0.6)  # longer than a retry: nothing more may come
    assert len(receiver.requests) == 1
    assert delivery["webhook_id"] == request.headers["webhook-id"]
    assert delivery["event_sequence"] == 3 and delivery["event_type"] == "turn.completed"
    [attempt] = delivery["attempts"]
    assert attempt["status_code"] == 200 and attempt["error"] is None
    assert attempt["response_excerpt"] == "answer 200" and attempt["latency_ms"] >= 0


async def test_failing_receiver_gets_the_same_webhook_id_until_it_answers_2xx(
    api, worker, receiver
):
    receiver.statuses = [500, 500, 500]
    conversation = await create_conversation(api, webhook_url=receiver.url)
    await wait_turn(api, await post_turn(api, conversation["id"], "What is the tallest mountain?"))

    requests = await receiver.wait_for(4)
    delivery = await wait_ledger(api, conversation["id"], "delivered")
    await asyncio.sleep(0.8)  # four retry intervals: nothing more after the 200
    assert len(receiver.requests) == 4
    assert {r.headers["webhook-id"] for r in requests} == {delivery["webhook_id"]}
    assert len({r.body for r in requests}) == 1, "every attempt sends the same payload"
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 500, 200]
    assert [a["attempt"] for a in delivery["attempts"]] == [1, 2, 3, 4]
    assert delivery["attempts"][0]["error"] == "HTTP 500"
    assert delivery["attempt_count"] == 4 and delivery["delivered_at"] is not None


async def test_a_delivery_is_failed_once_the_schedule_is_spent(api, worker, receiver):
    receiver.default = 503
    conversation = await create_conversation(api, webhook_url=receiver.url)
    turn = await post_turn(api, conversation["id"], "[sandbox:slow=5] a question to cancel")
    cancel = await api.post(f"/v1/conversations/{conversation['id']}/turns/{turn['id']}/cancel")
    assert cancel.status_code == 200

    delivery = await wait_ledger(api, conversation["id"], "failed")
    assert delivery["event_type"] == "turn.cancelled"
    assert [a["status_code"] for a in delivery["attempts"]] == [503] * 5  # 1 + 4 retries
    assert delivery["next_attempt_at"] is None
    assert Webhook(conversation["webhook_secret"]).verify(
        receiver.requests[0].body, receiver.requests[0].headers)["type"] == "turn.cancelled"


async def test_redeliver_after_rotation_is_signed_with_both_secrets(
    api, worker, receiver, resources
):
    conversation = await create_conversation(api, webhook_url=receiver.url)
    old_secret = conversation["webhook_secret"]
    await wait_turn(api, await post_turn(api, conversation["id"], "[sandbox:fail] doomed"))
    delivery = await wait_ledger(api, conversation["id"], "delivered")
    assert delivery["event_type"] == "turn.failed"

    rotated = await api.post(f"/v1/conversations/{conversation['id']}/webhook-secret/rotate")
    new_secret = rotated.json()["webhook_secret"]
    response = await api.post(f"/v1/webhook-deliveries/{delivery['id']}/redeliver")
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "pending"

    first, again = await receiver.wait_for(2)
    assert again.headers["webhook-id"] == first.headers["webhook-id"] == delivery["webhook_id"]
    assert again.body == first.body
    assert len(again.headers["webhook-signature"].split()) == 2
    for secret in (old_secret, new_secret):
        assert Webhook(secret).verify(again.body, again.headers)["data"]["data"]["error"]
    redelivered = await wait_ledger(api, conversation["id"], "delivered")
    assert [a["attempt"] for a in redelivered["attempts"]] == [1, 2]

    # Another tenant sees neither the ledger nor the delivery.
    other = {"Authorization": f"Bearer {await new_key(resources, 'other')}"}
    assert (await api.post(f"/v1/webhook-deliveries/{delivery['id']}/redeliver",
                           headers=other)).status_code == 404
    assert (await api.get(f"/v1/conversations/{conversation['id']}/webhook-deliveries",
                          headers=other)).status_code == 404
    assert (await api.post("/v1/webhook-deliveries/whd_nope/redeliver")).status_code == 404


async def test_without_webhook_url_nothing_is_queued(api, worker):
    conversation = await create_conversation(api)
    await wait_turn(api, await post_turn(api, conversation["id"], "No hook here"))
    assert await ledger(api, conversation["id"]) == []


REFUSED_URLS = [
    "http://127.0.0.1/hook", "http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data",
    "http://192.168.1.20:8080/hook", "http://[::1]/hook", "http://[::ffff:10.0.0.1]/hook",
    "http://[fd00:ec2::254]/", "http://0.0.0.0/hook", "http://2130706433/hook",
    "http://localhost:8080/hook",
]


@pytest.mark.parametrize("url", REFUSED_URLS)
async def test_private_webhook_urls_are_refused_when_the_guard_is_on(guarded_api, url):
    response = await guarded_api.post("/v1/conversations", json={"webhook_url": url})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["errors"][0]["field"] == "webhook_url"


async def test_the_guard_applies_to_patch_and_lets_public_addresses_through(guarded_api):
    created = await guarded_api.post("/v1/conversations",
                                     json={"webhook_url": "https://93.184.215.14/hook"})
    assert created.status_code == 201, created.text
    path = f"/v1/conversations/{created.json()['id']}"
    refused = await guarded_api.patch(path, json={"webhook_url": "http://10.1.2.3/hook"})
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["field"] == "webhook_url"
    bad_scheme = await guarded_api.post("/v1/conversations", json={"webhook_url": "ftp://x.org/"})
    assert bad_scheme.status_code == 422


async def test_the_guard_is_checked_again_at_delivery_time(api, settings, receiver):
    # Registered while private addresses were allowed; the worker's guard is on.
    conversation = await create_conversation(api, webhook_url=receiver.url)
    async with running_worker(msgspec.structs.replace(settings, webhook_allow_private=False)):
        await wait_turn(api, await post_turn(api, conversation["id"], "Where does this go?"))
        delivery = await wait_ledger(api, conversation["id"], "failed")
    assert receiver.requests == []
    assert delivery["attempts"][0]["error"].startswith("refused: 127.0.0.1 resolves to")
    assert delivery["attempts"][0]["status_code"] is None


@pytest.mark.slow
async def test_a_worker_killed_after_the_turn_completed_still_delivers(api, settings, receiver):
    # The worker dies while its first attempt is in flight (the receiver is slow to answer).
    # Nothing was recorded, so the claim's lease (2 x 1 s + 5 s) makes the delivery due again.
    settings = msgspec.structs.replace(settings, webhook_timeout_s=1)
    receiver.delay_s = 5
    conversation = await create_conversation(api, webhook_url=receiver.url)
    turn = await post_turn(api, conversation["id"], "Will this webhook survive a crash?")
    with WorkerProcess(settings) as first:
        [in_flight] = await receiver.wait_for(1, timeout_s=60)
        first.kill()
    assert (await api.get(f"/v1/conversations/{conversation['id']}/turns/{turn['id']}")
            ).json()["status"] == "completed"
    [pending] = await ledger(api, conversation["id"])
    assert pending["status"] == "pending" and pending["attempts"] == []

    receiver.delay_s = 0
    with WorkerProcess(settings):
        delivered = await wait_ledger(api, conversation["id"], "delivered", timeout_s=60)
    first_request, last = receiver.requests
    assert first_request is in_flight
    assert last.headers["webhook-id"] == in_flight.headers["webhook-id"] == pending["webhook_id"]
    payload = Webhook(conversation["webhook_secret"]).verify(last.body, last.headers)
    assert payload["type"] == "turn.completed" and payload["data"]["turn_id"] == turn["id"]
    assert [a["status_code"] for a in delivered["attempts"]] == [200]
