"""Secret rotation: every secret replaced within the last 24 hours keeps signing beside the new
one, checked with both libraries receivers use (`standardwebhooks` and `svix`). Time moves by
hand: the test shifts the stored expiries back instead of sleeping a day."""

from __future__ import annotations

import secrets

import asyncpg
import pytest
import standardwebhooks
import svix.webhooks

from service.db.migrate import load_migrations
from service.domain.conversations import MAX_PREVIOUS_SECRETS
from tests.helpers import (
    create_conversation,
    fast_webhook_retries,
    post_turn,
    wait_ledger,
    wait_turn,
    with_database,
)
from tests.receivers import Received, Receiver

UNRELATED_SECRET = "whsec_" + "QUJD" * 10 + "QUI="


@pytest.fixture
def settings(settings):
    return fast_webhook_retries(settings)


async def age_secrets(resources, conversation_id: str, seconds: float) -> None:
    """Make the conversation's rotations `seconds` older, as if that much time had passed."""
    async with resources.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE previous_webhook_secret SET expires_at = expires_at - make_interval(secs => $2)"
            " WHERE conversation_id = $1", conversation_id, seconds)
        await conn.execute(
            "UPDATE conversation SET webhook_secret_previous_until = "
            "webhook_secret_previous_until - make_interval(secs => $2) WHERE id = $1",
            conversation_id, seconds)


def verifies(secret: str, request: Received) -> bool:
    """Whether both libraries accept the request with `secret` (and agree on it)."""
    try:
        standardwebhooks.Webhook(secret).verify(request.body, request.headers)
        by_standard = True
    except standardwebhooks.WebhookVerificationError:
        by_standard = False
    try:
        svix.webhooks.Webhook(secret).verify(request.body, request.headers)
        by_svix = True
    except svix.webhooks.WebhookVerificationError:
        by_svix = False
    assert by_standard == by_svix, f"standardwebhooks says {by_standard}, svix {by_svix}"
    return by_standard


async def rotate(api, conversation_id: str) -> str:
    response = await api.post(f"/v1/conversations/{conversation_id}/webhook-secret/rotate")
    assert response.status_code == 200, response.text
    return response.json()["webhook_secret"]


async def redelivered(api, receiver: Receiver, delivery_id: str) -> Received:
    """The request of a fresh send of the delivery (signed with the secrets live now)."""
    seen = len(receiver.requests)
    response = await api.post(f"/v1/webhook-deliveries/{delivery_id}/redeliver")
    assert response.status_code == 202, response.text
    return (await receiver.wait_for(seen + 1))[seen]


async def test_every_secret_replaced_within_24_hours_keeps_signing(
    api, worker, receiver, resources
):
    conversation = await create_conversation(api, webhook_url=receiver.url)
    cid, oldest = conversation["id"], conversation["webhook_secret"]
    await wait_turn(api, await post_turn(api, cid, "Who won in 2022?"))
    delivery = await wait_ledger(api, cid, "delivered")
    [first] = receiver.requests
    assert verifies(oldest, first)

    middle = await rotate(api, cid)
    await age_secrets(resources, cid, 23 * 3600)  # the first rotation was 23 h ago
    newest = await rotate(api, cid)

    # Two rotations within 24 h: a receiver still holding the oldest secret verifies.
    request = await redelivered(api, receiver, delivery["id"])
    assert len(request.headers["webhook-signature"].split()) == 3
    assert all(verifies(s, request) for s in (oldest, middle, newest))
    assert request.headers["webhook-id"] == first.headers["webhook-id"]

    # 24 h and a second after the oldest was replaced it no longer signs; the middle one does.
    await age_secrets(resources, cid, 3601)
    request = await redelivered(api, receiver, delivery["id"])
    assert len(request.headers["webhook-signature"].split()) == 2
    assert not verifies(oldest, request)
    assert verifies(middle, request) and verifies(newest, request)

    # A day after the last rotation only the current secret signs.
    await age_secrets(resources, cid, 23 * 3600)
    request = await redelivered(api, receiver, delivery["id"])
    assert len(request.headers["webhook-signature"].split()) == 1
    assert not verifies(middle, request) and verifies(newest, request)
    assert not verifies(UNRELATED_SECRET, request)


async def test_rotations_past_the_limit_within_24_hours_answer_429_and_change_nothing(
    api, worker, receiver, resources
):
    conversation = await create_conversation(api, webhook_url=receiver.url)
    cid = conversation["id"]
    issued = [conversation["webhook_secret"]]
    for _ in range(MAX_PREVIOUS_SECRETS):
        issued.append(await rotate(api, cid))

    refused = await api.post(f"/v1/conversations/{cid}/webhook-secret/rotate")
    assert refused.status_code == 429, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert 23 * 3600 < int(refused.headers["retry-after"]) <= 24 * 3600

    # Every issued secret signs, and only those: the refused rotation made no secret.
    await wait_turn(api, await post_turn(api, cid, "Who won in 2022?"))
    [request] = await receiver.wait_for(1)
    assert len(request.headers["webhook-signature"].split()) == len(issued)
    assert all(verifies(s, request) for s in issued)

    # Once the oldest rotations are a day old, rotating works again.
    await age_secrets(resources, cid, 24 * 3600 + 1)
    issued.append(await rotate(api, cid))
    delivery = await wait_ledger(api, cid, "delivered")
    request = await redelivered(api, receiver, delivery["id"])
    assert len(request.headers["webhook-signature"].split()) == 2
    assert verifies(issued[-2], request) and verifies(issued[-1], request)
    assert not verifies(issued[0], request)


async def test_rotation_needs_a_webhook_url_and_the_tenants_own_conversation(api, resources):
    plain = await create_conversation(api)
    response = await api.post(f"/v1/conversations/{plain['id']}/webhook-secret/rotate")
    assert response.status_code == 422, response.text
    missing = await api.post("/v1/conversations/conv_nope/webhook-secret/rotate")
    assert missing.status_code == 404, missing.text
    assert await resources.pool.fetchval("SELECT count(*) FROM previous_webhook_secret") == 0


async def test_migration_0007_keeps_the_secret_a_rotation_replaced_before_it(pg_admin_url):
    """A secret replaced under the previous release (one previous secret per conversation)
    still signs after the upgrade; one that had expired does not come back."""
    name = f"research_m7_{secrets.token_hex(4)}"
    url = await clone_empty(pg_admin_url, name)
    conn = await asyncpg.connect(url)
    try:
        before, [(_, _, sql_0007)] = split_migrations(7)
        for _, _, sql in before:
            await conn.execute(sql)
        await conn.execute(
            "INSERT INTO tenant (id, name) VALUES ('ten_1', 'acme');"
            "INSERT INTO conversation (id, tenant_id, processor, webhook_url, webhook_secret,"
            "    webhook_secret_previous, webhook_secret_previous_until) VALUES"
            " ('conv_live', 'ten_1', 'lite', 'https://example.com/', 'whsec_new', 'whsec_old',"
            "  now() + interval '3 hours'),"
            " ('conv_gone', 'ten_1', 'lite', 'https://example.com/', 'whsec_new2', 'whsec_old2',"
            "  now() - interval '1 second')")
        await conn.execute(sql_0007)
        rows = await conn.fetch("SELECT conversation_id, secret, expires_at > now() + "
                                "interval '2 hours' AS kept FROM previous_webhook_secret")
        assert [tuple(r) for r in rows] == [("conv_live", "whsec_old", True)]
    finally:
        await conn.close()
        admin = await asyncpg.connect(pg_admin_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def clone_empty(admin_url: str, name: str) -> str:
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return with_database(admin_url, name)


def split_migrations(version: int) -> tuple[list[tuple[int, str, str]], list[tuple[int, str, str]]]:
    """The migrations before `version`, and `version` itself."""
    every = load_migrations()
    return [m for m in every if m[0] < version], [m for m in every if m[0] == version]
