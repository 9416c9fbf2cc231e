"""Every keyed /v1 answer carries the IETF RateLimit-Policy and RateLimit fields, read here with a
structured-field parser (http-sf), so a client can pace itself before it meets a 429."""

from __future__ import annotations

from typing import Any

import http_sf
import httpx

from service.db.keys import create_key
from service.resources import Resources
from tests.helpers import create_conversation


async def key_for(resources: Resources, **options: Any) -> dict[str, str]:
    async with resources.pool.acquire() as conn:
        key = (await create_key(conn, "acme", **options))[1]
    return {"Authorization": f"Bearer {key}"}


def fields(response: httpx.Response) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the policy's parameters, the current limit's parameters) of the "default" policy."""
    assert response.headers.get_list("ratelimit-policy") == [response.headers["ratelimit-policy"]]
    ((policy_name, policy),) = http_sf.parse(response.headers["ratelimit-policy"].encode(),
                                             tltype="list")
    ((name, current),) = http_sf.parse(response.headers["ratelimit"].encode(), tltype="list")
    assert policy_name == name == "default"
    assert isinstance(current["r"], int) and isinstance(current["t"], int)
    return policy, current


async def test_every_answer_of_a_key_says_what_it_has_left(client, resources):
    headers = await key_for(resources, rate_limit_per_min=5)
    left = []
    for _ in range(5):
        response = await client.get("/v1/conversations", headers=headers)
        assert response.status_code == 200
        policy, current = fields(response)
        assert policy == {"q": 5, "w": 60}
        assert 1 <= current["t"] <= 60
        left.append(current["r"])
    assert left == [4, 3, 2, 1, 0]

    refused = await client.get("/v1/conversations", headers=headers)
    assert refused.status_code == 429
    policy, current = fields(refused)
    assert policy == {"q": 5, "w": 60}
    assert current["r"] == 0
    assert current["t"] == int(refused.headers["retry-after"]) >= 1


async def test_leased_counts_still_go_down_one_by_one(client, resources):
    """600 a minute: this process leases 6 requests at a time, and still counts each one."""
    headers = await key_for(resources)  # the settings' default, 600
    left = []
    for _ in range(15):
        response = await client.get("/v1/conversations", headers=headers)
        policy, current = fields(response)
        assert policy == {"q": resources.settings.rate_limit_per_min, "w": 60}
        left.append(current["r"])
    first = left[0]
    assert first <= 599
    assert left == list(range(first, first - 15, -1))


async def test_writes_errors_and_streams_carry_them_too(client, resources):
    headers = await key_for(resources, rate_limit_per_min=100)
    api = httpx.AsyncClient(transport=client._transport, base_url="http://testserver",
                            headers=headers)
    async with api:
        conversation = await create_conversation(api)
        answers = [
            await api.post("/v1/conversations", json={}),
            await api.get(f"/v1/conversations/{conversation['id']}"),
            await api.get("/v1/conversations/conv_missing"),
            await api.post("/v1/conversations", json={"title": 5}),
            await api.get(f"/v1/conversations/{conversation['id']}/events"),
        ]
    assert [a.status_code for a in answers] == [201, 200, 404, 422, 200]
    remaining = [fields(answer)[1]["r"] for answer in answers]
    assert remaining == sorted(remaining, reverse=True) and len(set(remaining)) == 5


async def test_answers_without_a_key_or_limit_carry_none(client, resources):
    unlimited = await key_for(resources, rate_limit_per_min=0)
    for response in (
        await client.get("/v1/conversations", headers=unlimited),
        await client.get("/v1/conversations"),  # 401
        await client.get("/healthz"),
    ):
        assert "ratelimit" not in response.headers and "ratelimit-policy" not in response.headers
