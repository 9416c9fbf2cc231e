"""The SSRF guard's URL rules at registration (the API) and at delivery (the worker), against
real Postgres, Redis, the sandbox and a real receiver."""

from __future__ import annotations

import asyncpg
import pytest

from tests.helpers import (
    create_conversation,
    fast_webhook_retries,
    post_turn,
    running_worker,
    wait_ledger,
    wait_turn,
)


@pytest.fixture
def settings(settings):
    return fast_webhook_retries(settings)


@pytest.mark.parametrize("url", [
    "http://[fec0::1]/hook", "http://192.88.99.1/hook", "http://[3fff::1]/hook",
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data",  # NAT64 of 169.254.169.254
])
async def test_addresses_that_are_not_globally_routable_are_refused_at_registration(
    guarded_api, url
):
    response = await guarded_api.post("/v1/conversations", json={"webhook_url": url})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "webhook_url"


@pytest.mark.parametrize("url", [
    "https://user:secret@93.184.215.14/hook", "https://93.184.215.14/in%20side/../hook x",
    "https://93.184.215.14/hook\r\nX-Injected: 1", "https://93.184.215.14:22/hook",
    "https://93.184.215.14:8443/hook\t",
])
async def test_credentials_whitespace_and_low_ports_are_refused_on_create_and_patch(
    guarded_api, database_url, url
):
    created = await guarded_api.post("/v1/conversations",
                                     json={"webhook_url": "https://93.184.215.14:8443/hook"})
    assert created.status_code == 201, created.text
    refused = await guarded_api.post("/v1/conversations", json={"webhook_url": url})
    assert refused.status_code == 422, refused.text
    assert "secret" not in refused.text
    patched = await guarded_api.patch(f"/v1/conversations/{created.json()['id']}",
                                      json={"webhook_url": url})
    assert patched.status_code == 422, patched.text
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT array_agg(webhook_url) FROM conversation") == [
            "https://93.184.215.14:8443/hook"]
    finally:
        await conn.close()


async def test_a_stored_url_with_credentials_is_refused_at_delivery(
    api, settings, receiver, database_url
):
    # Registered before the rule existed: the row is changed behind the API's back.
    conversation = await create_conversation(api, webhook_url=receiver.url)
    with_credentials = receiver.url.replace("http://", "http://user:secret@")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE conversation SET webhook_url = $2 WHERE id = $1",
                           conversation["id"], with_credentials)
    finally:
        await conn.close()
    async with running_worker(settings):
        await wait_turn(api, await post_turn(api, conversation["id"], "Where does this go?"))
        delivery = await wait_ledger(api, conversation["id"], "failed")
    assert receiver.requests == []
    assert delivery["attempts"][0]["error"].startswith("refused: credentials")
